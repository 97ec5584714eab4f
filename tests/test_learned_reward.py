"""`learned` reward: data preparation, training with the shared loop, and the registered reward.

The learning test is a synthetic QE task whose score is a known function of (source, candidate): the fraction
of candidate words that occur in the source, the other words being drawn from the same word list (so the model
must compare candidate with source, not just recognise words). A tiny model trained for 80 steps (killed and
resumed at 40) must rank fresh held-out pairs with Spearman > 0.5 (scipy's spearmanr as the reference), while
the untrained model does not.
"""

import json
import os
import pathlib
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import sacrebleu

from rest_jax import gin_utils, inspection, optim, partitioning, reward_model, rewards
from rest_jax.data import grow_store as gs
from rest_jax.data import vocab as vocab_lib
from rest_jax.model import heads
from rest_jax.model.t5 import T5Config
from rest_jax.rewards import learned

scipy_stats = pytest.importorskip("scipy.stats")
REPO = pathlib.Path(__file__).resolve().parents[1]

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
    examples = reward_model.RewardExamples(sources, candidates, None, scores)
    config = T5Config(vocab_size=40, emb_dim=64, num_heads=4, head_dim=16, mlp_dim=128, num_encoder_layers=2,
                      num_decoder_layers=1)
    model = heads.RegressionModel(config, pooling="mean")
    mesh = partitioning.create_mesh((4, 2))
    out = tmp_path / "reward"

    def run(num_steps):
        opt = optim.create_optimizer("adamw", schedule=optim.learning_rate_schedule("constant", 3e-3,
                                                                                     warmup_steps=10))
        return reward_model.train_reward_model(examples, word_vocab, str(out), model=model, max_input_length=24,
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
    assert reward_model.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).correlation, abs=1e-12)
    assert reward_model.pearson(a, b) == pytest.approx(scipy_stats.pearsonr(a, b)[0], abs=1e-12)
    assert np.isnan(reward_model.spearman(np.ones(5), np.arange(5)))


def test_examples_from_parallel_are_scored_by_the_teacher():
    sources = ["ein Hund läuft", "zwei Katzen schlafen", "eine Frau liest ein Buch"]
    references = ["a dog runs", "two cats are sleeping", "a woman reads a book"]
    ex = reward_model.examples_from_parallel(sources, references, teacher="chrf", candidates_per_source=5, seed=3)
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
    ex = reward_model.examples_from_grow_store(str(tmp_path / "store"))
    assert len(ex) == 6
    by_pair = {(s, c): y for s, c, y in zip(ex.sources, ex.candidates, ex.scores)}
    assert by_pair[("ein Hund", "a dog")] == pytest.approx(0.25) and by_pair[("eine Katze", "the")] == 0.75
    no_refs = reward_model.examples_from_grow_store(str(tmp_path / "store"), include_references=False)
    assert len(no_refs) == 4 and all(c != r for c, r in zip(no_refs.candidates, no_refs.references))
    rescored = reward_model.examples_from_grow_store(str(tmp_path / "store"), rescore_with="chrf")
    for c, r, y in zip(rescored.candidates, rescored.references, rescored.scores):
        assert y == pytest.approx(sacrebleu.sentence_chrf(c, [r]).score / 100, abs=1e-5)


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="example 1 .*not a finite value in"):
        reward_model.RewardExamples(["a", "b"], ["x", "y"], None, [0.5, 1.5])
    with pytest.raises(ValueError, match="equally many"):
        reward_model.RewardExamples(["a"], ["x", "y"], None, [0.5, 0.5])
    with pytest.raises(FileNotFoundError, match="no_model.*reward_model.json"):
        rewards.get("learned", model_dir=str(tmp_path / "no_model"))
    with pytest.raises(ValueError, match="exactly one of grow_store"):
        reward_model.train_learned_reward(output_dir=str(tmp_path / "o"), vocabulary="v.model")
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


def _synthetic_store(path, n_sources, seed):
    """A Grow store of `_synthetic` pairs: 3 candidates and the reference (= the source's words) per source."""
    rng = np.random.default_rng(seed)
    writer = gs.GrowStoreWriter(path, grow_index=1, source_ids=list(range(n_sources)), num_samples=3)
    records = []
    for s in range(n_sources):
        src, cands, _ = _synthetic(3, seed=int(rng.integers(1 << 30)))
        for j, cand in [(gs.REFERENCE_SAMPLE_ID, src[0])] + list(enumerate(cands)):
            records.append({"source_id": s, "sample_id": j, "source_text": src[0], "candidate_text": cand,
                            "reference_text": src[0], "source_tokens": [5, 1], "candidate_tokens": [6, 1],
                            "reward": 0.5})
    writer.write_shard(0, records)
    writer.write_metadata()
    return str(path)


def test_refreshed_reward_model_starts_from_the_old_one_and_fits_the_teacher(tmp_path, word_vocab):
    """The refresh (run_rest.refresh_reward_model) measures the old model on held-out sources, then fits chrF.

    Reference: the old model's held-out metrics computed here by scoring the same held-out pairs with the old
    `learned` reward (so the refresh must start from its trunk *and* head) against chrF by sacreBLEU."""
    mesh = partitioning.create_mesh((4, 2))
    sources, candidates, scores = _synthetic(400, seed=3)
    config = T5Config(vocab_size=40, emb_dim=32, num_heads=2, head_dim=16, mlp_dim=64, num_encoder_layers=1,
                      num_decoder_layers=1)
    old_dir = str(tmp_path / "old")
    opt = optim.create_optimizer("adamw", schedule=optim.learning_rate_schedule("constant", 3e-3, warmup_steps=0))
    reward_model.train_reward_model(reward_model.RewardExamples(sources, candidates, None, scores), word_vocab,
                                    old_dir, model=heads.RegressionModel(config), max_input_length=24,
                                    batch_size=32, num_steps=30, mesh=mesh, optimizer=opt, show_progress=False)
    store = _synthetic_store(tmp_path / "store", 60, seed=4)
    gin.bind_parameter("reward_refresh/learning_rate_schedule.name", "constant")
    gin.bind_parameter("reward_refresh/learning_rate_schedule.base_learning_rate", 3e-3)
    gin.bind_parameter("reward_refresh/learning_rate_schedule.warmup_steps", 0)
    gin.bind_parameter("reward_refresh/create_optimizer.optimizer", "adamw")
    try:
        result = reward_model.refresh_reward_model(old_dir, [store], str(tmp_path / "new"), num_steps=60,
                                                   batch_size=32, eval_fraction=0.25, seed=1, mesh=mesh)
    finally:
        gin.clear_config()
    examples = reward_model.examples_from_grow_store(store)
    _, heldout = reward_model.split_by_source(examples.sources, 0.25, 1)
    src = [examples.sources[i] for i in heldout]
    cand = [examples.candidates[i] for i in heldout]
    teacher = np.array([sacrebleu.sentence_chrf(c, [examples.references[i]]).score / 100
                        for c, i in zip(cand, heldout)])
    old = rewards.score_pairs(rewards.get("learned", model_dir=old_dir, batch_size=16, mesh=mesh), src, cand)
    want = reward_model.regression_metrics(old, teacher)
    for key in ("mse", "pearson", "spearman"):
        assert result["heldout_initial"][key] == pytest.approx(want[key], abs=2e-4), key
    assert result["heldout"]["mse"] < result["heldout_initial"]["mse"], result  # fitted to the teacher
    new = rewards.score_pairs(rewards.get("learned", model_dir=str(tmp_path / "new"), batch_size=16, mesh=mesh),
                              src, cand)
    assert reward_model.regression_metrics(new, teacher)["mse"] == pytest.approx(result["heldout"]["mse"], abs=2e-4)
    description = json.loads((tmp_path / "new" / "reward_model.json").read_text())
    assert description["refresh"]["from"] == old_dir and description["refresh"]["stores"] == [store]


@pytest.mark.slow
def test_rest_with_reward_model_refresh_scores_the_next_grow_with_the_refreshed_model(tmp_path, word_vocab):
    """`rest` with run_rest.refresh_reward_model: after Grow 1 the learned reward is retrained on its store, and
    Grow 2's samples carry the new model's scores (recomputed here with each model), not the old one's."""
    mesh = partitioning.create_mesh((1, 1), devices=jax.devices()[:1])
    sources, candidates, scores = _synthetic(200, seed=6)
    config = T5Config(vocab_size=40, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                      num_decoder_layers=1)
    old = str(tmp_path / "reward_model")
    reward_model.train_reward_model(reward_model.RewardExamples(sources, candidates, None, scores), word_vocab, old,
                                    model=heads.RegressionModel(config), max_input_length=32, batch_size=8,
                                    num_steps=4, mesh=mesh, show_progress=False)
    run = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "rest_jax.main", "rest", "--gin_file=experiments/demo.gin",
         "--gin_file=rewards/learned.gin", f"--gin.MODEL_DIR='{run}'", f"--gin.REWARD_MODEL_DIR='{old}'",
         *inspection.TINY_RUN_OVERRIDES, "--gin.run_rest.num_grow_steps=2", "--gin.run_rest.best_of_n_ns=()",
         "--gin.run_rest.refresh_reward_model=True", "--gin.refresh_reward_model.num_steps=6",
         # The untrained reward model scores everything near 0.5, under the default thresholds.
         "--gin.refresh_reward_model.batch_size=8", "--gin.improve_step.filter_method='none'"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((run / "report.json").read_text())
    (refresh,) = report["reward_refreshes"]
    assert refresh["from"] == old and refresh["stores"] == [str(run / "grow_1" / "store")]
    assert set(refresh["heldout_initial"]) >= {"mse", "spearman"} and set(refresh["heldout"]) >= {"mse", "spearman"}
    data = gs.GrowStore(str(run / "grow_2" / "store")).as_numpy(["source_text", "candidate_text", "reward"])
    pairs = ([str(s) for s in data["source_text"]], [str(c) for c in data["candidate_text"]])
    new_scores = rewards.score_pairs(rewards.get("learned", model_dir=refresh["dir"], mesh=mesh), *pairs)
    old_scores = rewards.score_pairs(rewards.get("learned", model_dir=old, mesh=mesh), *pairs)
    np.testing.assert_allclose(data["reward"], new_scores, atol=1e-5)
    assert np.abs(data["reward"] - old_scores).max() > 1e-3


def test_reward_refresh_without_a_learned_reward_fails_before_training(tmp_path):
    """A refresh needs a model to refresh: with chrF the run stops at once, before BC trains or a vocabulary."""
    from rest_jax import rest  # pylint: disable=import-outside-toplevel

    with pytest.raises(ValueError, match="refresh_reward_model=True needs a learned reward model.*'chrf'"):
        rest.run_rest(model_dir=str(tmp_path / "run"), task="demo_synthetic", reward_name="chrf",
                      refresh_reward_model=True)
    assert not (tmp_path / "run").exists()
