"""`metricx` reward vs MetricX's definition computed with Hugging Face PyTorch mT5.

Reference pipeline (google-research/metricx predict.py + models.py, re-expressed here): HF T5 tokenizer with
truncation to max_input_length, drop the last token (EOS), pad; encoder; one decoder step from token 0; the
decoder state times lm_head's row at the score id (times d_model**-0.5 when the config ties embeddings);
clamp to [0, 25]. The model is a random small `MT5ForConditionalGeneration` saved with `save_pretrained` and a
config.json as published MetricX files have it (tie_word_embeddings false); the tokenizer is a SentencePiece
model trained here on a few sentences.
"""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from rest_jax import partitioning, rewards  # noqa: E402
from rest_jax.data import vocab as vocab_lib  # noqa: E402
from rest_jax.rewards import metricx  # noqa: E402

SENTENCES = [
    "source: Ein Hund läuft im Park. candidate: A dog runs in the park. reference: A dog is running in the park.",
    "candidate: The cat sat on the mat. source: Die Katze saß auf der Matte.",
    "Zwei Männer spielen Fußball auf einer Wiese.", "Two men are playing football on a meadow.",
    "Eine Frau liest ein Buch im Café.", "A woman reads a book in the cafe.",
    "Kinder spielen am Strand mit einem Ball.", "Children play with a ball on the beach.",
] * 4
SOURCES = ["Ein Hund läuft im Park.", "Zwei Männer spielen Fußball.", "Eine Frau liest.", "Kinder spielen.",
           "Die Katze saß auf der Matte.", "Ein Hund läuft im Park."]
CANDIDATES = ["A dog runs in the park.", "Two men play soccer on a meadow in the sun.", "A woman",
              "", "The cat sat on the mat.", "A cat runs in the park park park park park."]
REFERENCES = ["A dog is running in the park.", "Two men are playing football.", "A woman is reading.",
              "Children are playing.", "The cat sat on the mat.", "A dog is running in the park."]
SCORE_ID = 93  # one of the 4 ids past the SentencePiece pieces: never an input token
MAX_LEN = 24  # short enough that the longest inputs are truncated


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spm")
    path = vocab_lib.train_vocabulary(SENTENCES, str(out), vocab_size=90, num_threads=1)
    shutil.copy(path, out / "spiece.model")  # the name HF tokenizers (and MetricX folders) use
    return out


def _decoder_states(model, tokenizer, texts):
    ids = [tokenizer(t, max_length=MAX_LEN, truncation=True)["input_ids"][:-1] for t in texts]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        enc = model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        dec = model.decoder(input_ids=torch.zeros((len(texts), 1), dtype=torch.long), encoder_hidden_states=enc,
                            encoder_attention_mask=mask).last_hidden_state
    return dec[:, 0]


def _save_model(folder, vocab_size, tied: bool, seed: int, tokenizer):
    torch.manual_seed(seed)
    config = transformers.MT5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2,
                                    num_decoder_layers=2, dropout_rate=0.0, relative_attention_num_buckets=8,
                                    relative_attention_max_distance=16, tie_word_embeddings=tied)
    model = transformers.MT5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
        if not tied:
            model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab_size, 32))
        # Aim the score row so that scores spread over and beyond [0, 25] (both clip ends and the linear part
        # exercised): centre + its main direction of variation. The score id is never an input token, so
        # editing its (tied) embedding does not change the states.
        texts = [metricx.format_input(s, c, r, 24, qe=False) for s, c, r in zip(SOURCES, CANDIDATES, REFERENCES)]
        states = _decoder_states(model, tokenizer, texts)
        centre = states.mean(0)
        unit_centre = centre / centre.dot(centre)  # state . unit_centre ~= 1 for every state
        direction = torch.linalg.svd(states - centre, full_matrices=False).Vh[0]
        direction = direction - direction.dot(centre) * unit_centre  # orthogonal to the centre
        proj = states @ direction
        low, high = proj.min(), proj.max()
        # Scores ~ 12.5 + 40 (proj - mid) / (high - low): from about -7.5 to 32.5.
        row = (12.5 - 40.0 * (low + high) / 2 / (high - low)) * unit_centre + 40.0 * direction / (high - low)
        if tied:
            row = row * config.d_model ** 0.5
        (model.shared.weight if tied else model.lm_head.weight)[SCORE_ID] = row
    model.save_pretrained(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # As the published MetricX files (written by transformers 4.x); transformers 5 always writes true for mT5.
    cfg.update(tie_word_embeddings=tied, architectures=["MT5ForRegression"])
    cfg.pop("scale_decoder_outputs", None)
    cfg_path.write_text(json.dumps(cfg))
    return model


def _reference_scores(model, tokenizer, texts, tied: bool) -> np.ndarray:
    """MetricX's MT5ForRegression forward (before the clamp), in PyTorch float64 on the HF modules."""
    model = model.double()
    state = _decoder_states(model, tokenizer, texts)
    if tied:
        state = state * model.config.d_model ** -0.5
    weight = model.shared.weight if tied else model.lm_head.weight
    scores = (state @ weight.T)[:, SCORE_ID].detach().numpy()
    model.float()
    return scores


def test_format_input_exact_strings():
    f = metricx.format_input
    assert f("S", "C", "R", 24, qe=False) == "source: S candidate: C reference: R"
    assert f("S", "C", None, 24, qe=True) == "source: S candidate: C"
    assert f("S", "C", "R", 24, qe=True) == "source: S candidate: C"  # QE ignores a given reference
    assert f("S", "C", "R", 23, qe=False) == "candidate: C reference: R"
    assert f("S", "C", None, 23, qe=True) == "candidate: C source: S"
    with pytest.raises(ValueError, match="needs a reference"):
        f("S", "C", None, 24, qe=False)
    with pytest.raises(ValueError, match="version"):
        f("S", "C", "R", 22)


def test_tokenize_matches_hf_tokenizer_with_eos_removed(spm_dir):
    vocab = vocab_lib.load_vocabulary(str(spm_dir / "spiece.model"))
    hf = transformers.T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)
    texts = [metricx.format_input(s, c, r, 24, qe=False) for s, c, r in zip(SOURCES, CANDIDATES, REFERENCES)]
    ours = metricx.tokenize(vocab, texts, MAX_LEN)
    for text, got in zip(texts, ours):
        expected = hf(text, max_length=MAX_LEN, truncation=True)["input_ids"][:-1]
        assert got == expected, text
        assert 1 not in got and len(got) <= MAX_LEN - 1
    assert any(len(t) == MAX_LEN - 1 for t in ours)  # truncation exercised


@pytest.mark.parametrize("tied", [False, True], ids=["published_untied", "tied_rescaled"])
def test_metricx_matches_pytorch_definition(tmp_path, spm_dir, tied):
    folder = tmp_path / "metricx"
    vocab_size = vocab_lib.load_vocabulary(str(spm_dir / "spiece.model")).vocab_size + 4
    assert vocab_size == SCORE_ID + 1
    hf_tok = transformers.T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)
    model = _save_model(folder, vocab_size, tied, seed=int(tied), tokenizer=hf_tok)
    shutil.copy(spm_dir / "spiece.model", folder / "spiece.model")  # found without vocab_path
    mesh = partitioning.create_mesh((4, 2))
    for version, qe in ((24, False), (24, True), (23, True)):
        reward = rewards.get("metricx", checkpoint_path=str(folder), version=version, qe=qe, batch_size=4,
                             max_input_length=MAX_LEN, score_token_id=SCORE_ID, mesh=mesh, min_length=8)
        assert reward.needs_reference == (not qe)
        refs = None if qe else REFERENCES
        texts = reward.inputs(SOURCES, CANDIDATES, refs)
        expected = _reference_scores(model, hf_tok, texts, tied)
        raw = reward.metricx_scores(SOURCES, CANDIDATES, refs, clip=False)
        np.testing.assert_allclose(raw, expected, atol=1e-4, rtol=1e-5)
        clipped = np.clip(expected, 0.0, 25.0)
        assert reward.metricx_scores(SOURCES, CANDIDATES, refs) == pytest.approx(clipped, abs=1e-4)
        unit = rewards.score_pairs(reward, SOURCES, CANDIDATES, refs, batch_size=5)
        np.testing.assert_allclose(unit, 1.0 - clipped / 25.0, atol=1e-5)
        if version == 24 and not qe:
            assert (expected < 0).any() and (expected > 25).any() and ((expected > 0) & (expected < 25)).any()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_metricx"
    with pytest.raises(FileNotFoundError, match="no_such_metricx.*must be downloaded by the user"):
        rewards.get("metricx", checkpoint_path=str(missing))
    with pytest.raises(FileNotFoundError, match="must be downloaded"):
        rewards.get("metricx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        rewards.get("metricx", checkpoint_path=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="tokenizer not found"):
        metricx.find_vocabulary(None, str(tmp_path / "empty"))
