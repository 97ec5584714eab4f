"""`learned` reward: data preparation, training with the shared loop, and the registered reward.

The learning test is a synthetic QE task whose score is a known function of (source, candidate): the fraction
of candidate words that occur in the source, the other words being drawn from the same word list (so the model
must compare candidate with source, not just recognise words). A tiny model trained for 80 steps (killed and
resumed at 40) must rank fresh held-out pairs with Spearman > 0.5 (scipy's spearmanr as the reference), while
the untrained model does not.
"""

import pathlib

import gin
import numpy as np
import pytest
import sacrebleu

from rest_jax import gin_utils, optim, partitioning, rewards
from rest_jax.data import grow_store as gs
from rest_jax.data import vocab as vocab_lib
from rest_jax.model import heads
from rest_jax.model.t5 import T5Config
from rest_jax.rewards import learned

scipy_stats = pytest.importorskip("scipy.stats")

WORDS = [f"w{i:02d}" for i in range(30)]


def _synthetic(n: int, seed: int):
    """Sources of 6 distinct words; candidates of 4-8 words, each from the source with a per-pair probability,
    else a word not in the source. Score = fraction of candidate words found in the source."""
    rng = np.random.default_rng(seed)
    sources, candidates, scores = [], [], []
    for _ in range(n):
        src = list(rng.choice(WORDS, 6, replace=False))
        outside = [w for w in WORDS if w not in src]
        length, p = int(rng.integers(4, 9)), rng.uniform()
        cand = [str(rng.choice(src)) if rng.uniform() < p else str(rng.choice(outside)) for _ in range(length)]
        sources.append(" ".join(src))
        candidates.append(" ".join(cand))
        scores.append(sum(w in src for w in cand) / length)
    return sources, candidates, np.array(scores, np.float32)


@pytest.fixture(scope="module")
def word_vocab(tmp_path_factory):
    sources, candidates, _ = _synthetic(200, seed=5)
    texts = [learned.format_input(s, c) for s, c in zip(sources, candidates)]
    # A word-level model: every synthetic word is one token (pad, eos, unk, 'source:', 'candidate:', 30 words).
    return vocab_lib.train_vocabulary(texts, str(tmp_path_factory.mktemp("vocab")), vocab_size=35,
                                      model_type="word", num_threads=1)


def test_trained_qe_model_ranks_heldout_pairs(tmp_path, word_vocab):
    sources, candidates, scores = _synthetic(800, seed=0)
    examples = learned.RewardExamples(sources, candidates, None, scores)
    config = T5Config(vocab_size=40, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128, num_encoder_layers=2,
                      num_decoder_layers=1)
    model = heads.RegressionModel(config, pooling="mean")
    mesh = partitioning.create_mesh((4, 2))
    out = tmp_path / "reward"

    def run(num_steps):
        opt = optim.create_optimizer("adamw", schedule=optim.learning_rate_schedule("constant", 3e-3,
                                                                                     warmup_steps=10))
        return learned.train_reward_model(examples, word_vocab, str(out), model=model, max_input_length=24,
                                          batch_size=32, num_steps=num_steps, eval_fraction=0.2, eval_period=1000,
                                          checkpoint_period=40, mesh=mesh, optimizer=opt, show_progress=False)

    first = run(40)
    assert first["step"] == 40 and abs(first["heldout_initial"]["spearman"]) < 0.3  # untrained: no ranking
    second = run(80)  # a rerun with more steps resumes from step 40
    assert second["step"] == 80 and second["train"]["steps_run"] == 40

    reward = rewards.get("learned", model_dir=str(out), batch_size=16, mesh=mesh)
    assert reward.needs_reference is False
    test_sources, test_candidates, test_scores = _synthetic(300, seed=1)
    predicted = rewards.score_pairs(reward, test_sources, test_candidates)
    assert predicted.dtype == np.float32 and np.all((predicted >= 0) & (predicted <= 1))
    rho = scipy_stats.spearmanr(predicted, test_scores).correlation
    assert rho > 0.5, f"held-out Spearman {rho:.3f}"
    assert second["heldout"]["spearman"] > 0.45  # the loop's own held-out split (179 pairs)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 50).astype(float)
    b = a + rng.normal(0, 2, 50).round()
    assert learned.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).correlation, abs=1e-12)
    assert learned.pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0], abs=1e-12)
    assert np.isnan(learned.spearman(np.ones(5), np.arange(5)))


def test_examples_from_parallel_are_scored_by_the_teacher():
    sources = ["ein Hund läuft", "zwei Katzen schlafen", "eine Frau liest ein Buch"]
    references = ["a dog runs", "two cats are sleeping", "a woman reads a book"]
    ex = learned.examples_from_parallel(sources, references, teacher="chrf", candidates_per_source=5, seed=3)
    assert len(ex) == 3 * 6
    for s, c, r, score in zip(ex.sources, ex.candidates, ex.references, ex.scores):
        assert references[sources.index(s)] == r
        assert score == pytest.approx(sacrebleu.sentence_chrf(c, [r]).score / 100, abs=1e-5)
    assert sum(c == r for c, r in zip(ex.candidates, ex.references)) >= 3  # references included, score 1
    assert len(set(ex.candidates)) > 6  # corruptions vary


def test_examples_from_grow_store(tmp_path):
    writer = gs.GrowStoreWriter(tmp_path / "store", grow_index=1, source_ids=[0, 1], num_samples=2)
    records = []
    for s, (src, ref) in enumerate([("ein Hund", "a dog"), ("eine Katze", "a cat")]):
        for j, cand in [(gs.REFERENCE_SAMPLE_ID, ref), (0, f"{ref} {ref}"), (1, "the")]:
            records.append({"source_id": s, "sample_id": j, "source_text": src, "candidate_text": cand,
                            "reference_text": ref, "source_tokens": [5, 1], "candidate_tokens": [6, 1],
                            "reward": 0.25 * (j + 2)})
    writer.write_shard(0, records)
    writer.write_metadata()
    ex = learned.examples_from_grow_store(str(tmp_path / "store"))
    assert len(ex) == 6
    by_pair = {(s, c): y for s, c, y in zip(ex.sources, ex.candidates, ex.scores)}
    assert by_pair[("ein Hund", "a dog")] == pytest.approx(0.25) and by_pair[("eine Katze", "the")] == 0.75
    no_refs = learned.examples_from_grow_store(str(tmp_path / "store"), include_references=False)
    assert len(no_refs) == 4 and all(c != r for c, r in zip(no_refs.candidates, no_refs.references))
    rescored = learned.examples_from_grow_store(str(tmp_path / "store"), rescore_with="chrf")
    for c, r, y in zip(rescored.candidates, rescored.references, rescored.scores):
        assert y == pytest.approx(sacrebleu.sentence_chrf(c, [r]).score / 100, abs=1e-5)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="example 1 .*not a finite value in"):
        learned.RewardExamples(["a", "b"], ["x", "y"], None, [0.5, 1.5])
    with pytest.raises(ValueError, match="equally many"):
        learned.RewardExamples(["a"], ["x", "y"], None, [0.5, 0.5])
    with pytest.raises(FileNotFoundError, match="no_model.*reward_model.json"):
        rewards.get("learned", model_dir=str(tmp_path / "no_model"))
    with pytest.raises(ValueError, match="exactly one of grow_store"):
        learned.train_learned_reward(output_dir=str(tmp_path / "o"), vocabulary="v.model")
    assert learned.format_input("S", "C") == "source: S candidate: C"
    assert learned.format_input("S", "C", "R") == "source: S candidate: C reference: R"


def test_reward_gin_files_bind_real_knobs():
    configs = pathlib.Path(__file__).resolve().parents[1] / "configs" / "rewards"
    cases = {"metricx.gin": ["METRICX_CHECKPOINT = '/m'"], "learned.gin": ["REWARD_MODEL_DIR = '/r'"],
             "train_learned_qe.gin": ["REWARD_MODEL_DIR = '/r'", "VOCABULARY = '/v'", "GROW_STORE = '/g'"]}
    model = configs.parent / "models" / "rest_iwslt.gin"
    try:
        for name, bindings in cases.items():
            gin.clear_config()
            files = [str(configs / name)] + ([str(model)] if name.startswith("train") else [])
            # As the command line parses them: includes are found under configs/, whatever ran before.
            gin_utils.parse(files, [gin_utils.Binding(b, b) for b in bindings], gin_utils.default_search_paths())
            if not name.startswith("train"):
                assert gin.query_parameter("REWARD/macro.value") == name[:-len(".gin")]
        assert gin.query_parameter("train_learned_reward.use_reference") is False
        with gin.config_scope("reward"):  # the model gin's encoder (rest_iwslt: 6 x 512), one decoder layer
            assert (T5Config().num_encoder_layers, T5Config().emb_dim, T5Config().num_decoder_layers) == (6, 512, 1)
    finally:
        gin.clear_config()
