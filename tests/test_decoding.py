"""Decoding against references: HF `generate`, exact softmax, exhaustive search, teacher forcing.

Every expected value comes from outside the decoding loop: Hugging Face's PyTorch T5 greedy search, the
softmax of teacher-forced logits in float64 NumPy, brute-force enumeration of all sequences, or the model's
full-sequence (teacher-forced) pass, which shares no code with the cached `decode_step` loop.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from rest_jax import decoding
from rest_jax.model.t5 import T5Config, Transformer, init_params

TINY = T5Config(vocab_size=48, emb_dim=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                head_dim=8, mlp_dim=64)


@functools.lru_cache(maxsize=None)
def _params(config: T5Config, seed: int = 0):
    # Jitted: eager (op-by-op) initialisation costs seconds of CPU per model.
    init = jax.jit(lambda rng: nn.unbox(init_params(Transformer(config), rng)))
    return init(jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def _forward(config: T5Config):
    return jax.jit(lambda p, x, y: Transformer(config).apply({"params": p}, x, y))


# Most tests share these shapes and sampler settings so that XLA compiles few programs.
B, S, N, L = 3, 7, 5, 10
TOP_K = 20


def _sources(batch: int = B, length: int = S, vocab: int = TINY.vocab_size, seed: int = 1) -> jax.Array:
    tokens = np.random.default_rng(seed).integers(2, vocab, (batch, length))
    # Ragged sources: row i keeps length - i tokens (padding must be masked out).
    keep = np.arange(length)[None, :] < (length - np.arange(batch) % length)[:, None]
    return jnp.asarray(np.where(keep, tokens, 0), jnp.int32)


def _eos_prone(params, strength: float):
    """Parameters whose decoder emits EOS with a probability set by `strength` (at every step).

    A large constant in embedding dimension 0 dominates the decoder's residual stream, so after the final
    RMSNorm that dimension is large and positive; routing it only to the EOS logit adds an EOS bias.
    """
    params = jax.tree_util.tree_map(lambda x: x, params)
    params["token_embedder"]["embedding"] = params["token_embedder"]["embedding"].at[:, 0].add(10.0)
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = kernel.at[0, :].set(0.0).at[0, 1].set(strength)
    return params


def _teacher_forced_log_probs(config, params, sources, targets) -> np.ndarray:
    """float64 log-softmax [b, L, V] of the full-sequence pass on `targets` (no decode cache involved)."""
    logits = _forward(config)(params, sources, decoding.shift_right(targets))
    logits = np.asarray(logits, np.float64)
    return logits - _logsumexp(logits)


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def _softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(x - _logsumexp(x))


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Boolean mask of the smallest most-likely set with mass >= top_p (mass strictly before < top_p)."""
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    mask = np.zeros_like(probs, bool)
    mask[order[before < top_p]] = True
    return mask


# ---------------------------------------------------------------------------------------------------------
# Greedy against Hugging Face


@pytest.mark.parametrize("feed_forward_proj,tied", [("gated-gelu", False), ("relu", True)])
def test_greedy_matches_hf_generate(tmp_path, feed_forward_proj, tied):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    convert = pytest.importorskip("rest_jax.convert")
    torch.manual_seed(0)
    hf_config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj=feed_forward_proj, tie_word_embeddings=tied, dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf_model = transformers.T5ForConditionalGeneration(hf_config).eval()
    hf_model.save_pretrained(tmp_path)
    config, params = convert.load_hf_checkpoint(tmp_path)

    max_len = 12
    sources = np.asarray(_sources(6, 9, hf_config.vocab_size, seed=3))
    with torch.no_grad():
        hf = hf_model.generate(input_ids=torch.tensor(sources, dtype=torch.long),
                               attention_mask=torch.tensor(sources > 0, dtype=torch.long),
                               do_sample=False, num_beams=1, max_new_tokens=max_len, min_new_tokens=0)
    hf = hf.numpy()[:, 1:]  # drop the decoder start token
    expected = np.zeros((len(sources), max_len), np.int64)
    expected[:, :hf.shape[1]] = hf

    ours = decoding.greedy(params, config, jnp.asarray(sources), max_decode_len=max_len)
    np.testing.assert_array_equal(np.asarray(ours.tokens), expected)
    # The comparison means something only if some outputs are long and some stop early.
    lengths = np.asarray(ours.lengths)
    assert lengths.max() > 3, lengths
    ended = (expected == 1).any(1)
    np.testing.assert_array_equal(lengths[ended], (expected == 1).argmax(1)[ended] + 1)


def test_temperature_zero_is_greedy_also_when_traced():
    params, sources = _params(TINY), _sources()
    ref = decoding.greedy(params, TINY, sources, max_decode_len=L)
    # Greedy = argmax of the teacher-forced logits at every step.
    log_probs = _teacher_forced_log_probs(TINY, params, sources, ref.tokens)
    valid = np.arange(L)[None] < np.asarray(ref.lengths)[:, None]
    np.testing.assert_array_equal(np.asarray(ref.tokens)[valid], log_probs.argmax(-1)[valid])
    traced = decoding.sample(params, TINY, sources, jax.random.PRNGKey(5), num_samples=N, max_decode_len=L,
                             temperature=jnp.float32(0.0), top_k=TOP_K)
    for i in range(N):
        np.testing.assert_array_equal(np.asarray(traced.tokens[:, i]), np.asarray(ref.tokens))


# ---------------------------------------------------------------------------------------------------------
# Sampling distribution


SMALL_VOCAB = T5Config(vocab_size=16, emb_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                       head_dim=8, mlp_dim=64)


@functools.lru_cache(maxsize=None)
def _first_token_counts(temperature: float, top_k: int, top_p: float, candidates: int = 64, num: int = 20000):
    params = _params(SMALL_VOCAB)
    source = jnp.array([[5, 9, 3, 7, 0]], jnp.int32)
    out = decoding.sample(params, SMALL_VOCAB, source, jax.random.PRNGKey(3), num_samples=num, max_decode_len=1,
                          temperature=temperature, top_k=top_k, top_p=top_p, top_p_candidates=candidates)
    logits = _forward(SMALL_VOCAB)(params, source, jnp.zeros((1, 1), jnp.int32))
    counts = np.bincount(np.asarray(out.tokens[0, :, 0]), minlength=SMALL_VOCAB.vocab_size)
    return counts, np.asarray(logits[0, 0], np.float64)


def _reference(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    probs = _softmax(logits / temperature)
    if top_k:
        probs = np.where(probs >= np.sort(probs)[-top_k], probs, 0.0)
        probs /= probs.sum()
    if top_p < 1.0:
        probs = np.where(_nucleus(probs, top_p), probs, 0.0)
        probs /= probs.sum()
    return probs


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    if np.any(counts[probs == 0] > 0):
        return 0.0  # a token outside the reference support was drawn
    support = probs > 0
    return stats.chisquare(counts[support], probs[support] * counts.sum()).pvalue


@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_first_token_distribution_matches_tempered_softmax(temperature):
    counts, logits = _first_token_counts(temperature, 0, 1.0)
    assert _chi_square_pvalue(counts, _reference(logits, temperature)) > 1e-3
    # The test has the power to see a 15% temperature error (and untempered sampling).
    for wrong in (temperature * 0.85, temperature * 1.15):
        assert _chi_square_pvalue(counts, _reference(logits, wrong)) < 1e-6, wrong
    if temperature != 1.0:
        assert _chi_square_pvalue(counts, _reference(logits, 1.0)) < 1e-6


# candidates=2: the nucleus is larger than the 2 most likely tokens, so top-p takes the bisection path.
@pytest.mark.parametrize("top_k,top_p,candidates", [(4, 1.0, 64), (0, 0.7, 64), (0, 0.7, 2), (3, 0.6, 64)])
def test_first_token_distribution_with_top_k_top_p(top_k, top_p, candidates):
    temperature = 1.3
    counts, logits = _first_token_counts(temperature, top_k, top_p, candidates)
    assert _chi_square_pvalue(counts, _reference(logits, temperature, top_k, top_p)) > 1e-3
    # Off-by-one sets, or truncation applied before the temperature, are detected.
    if top_k and top_p == 1.0:
        assert _chi_square_pvalue(counts, _reference(logits, temperature, top_k + 1)) < 1e-6
        assert _chi_square_pvalue(counts, _reference(logits, temperature, top_k - 1)) < 1e-6
    assert _chi_square_pvalue(counts, _reference(logits, 1.0, top_k, top_p)) < 1e-6
    assert _chi_square_pvalue(counts, _reference(logits, temperature)) < 1e-6


@pytest.mark.parametrize("temperature,top_k,top_p,candidates",
                         [(1.5, 3, 1.0, 64), (0.8, 0, 0.5, 64), (0.8, 0, 0.5, 2), (2.0, 5, 0.6, 64)])
def test_top_k_top_p_never_emit_excluded_tokens(temperature, top_k, top_p, candidates):
    params, sources = _params(TINY), _sources()
    length = L
    out = decoding.sample(params, TINY, sources, jax.random.PRNGKey(7), num_samples=40, max_decode_len=length,
                          temperature=temperature, top_k=top_k, top_p=top_p, top_p_candidates=candidates)
    batch = decoding.samples_to_batch(sources, out)
    log_probs = _teacher_forced_log_probs(TINY, params, batch["encoder_input_tokens"],
                                          batch["decoder_target_tokens"])
    tokens = np.asarray(batch["decoder_target_tokens"])
    valid = np.asarray(batch["decoder_loss_weights"]) > 0
    assert valid[:, 1:].sum() > 300, "too few multi-token samples to test later steps"
    # Allowed sets from the teacher-forced logits, with a small margin for float32 near-ties between the
    # cached and full-sequence passes.
    emitted = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    if top_k:
        kth = np.sort(log_probs, -1)[..., -top_k]
        assert np.all(emitted[valid] >= kth[valid] - 1e-4)
    if top_p < 1.0:
        probs = _softmax(log_probs / temperature)
        if top_k:
            probs = np.where(log_probs >= np.sort(log_probs, -1)[..., -top_k:-top_k + 1], probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        emitted_p = np.take_along_axis(probs, tokens[..., None], -1)
        mass_before = np.where(probs > emitted_p, probs, 0.0).sum(-1)
        assert np.all(mass_before[valid] < top_p + 1e-4)


# ---------------------------------------------------------------------------------------------------------
# Log-probabilities, lengths and padding


def test_token_log_probs_equal_teacher_forced_scores():
    params, sources = _eos_prone(_params(TINY), 1.0), _sources()
    length = L
    # Temperature and top-k change what is drawn, not the untempered log-probs that are returned.
    out = decoding.sample(params, TINY, sources, jax.random.PRNGKey(11), num_samples=N, max_decode_len=length,
                          temperature=1.7, top_k=TOP_K)
    batch = decoding.samples_to_batch(sources, out)
    log_probs = _teacher_forced_log_probs(TINY, params, batch["encoder_input_tokens"],
                                          batch["decoder_target_tokens"])
    tokens = np.asarray(batch["decoder_target_tokens"])
    weights = np.asarray(batch["decoder_loss_weights"])
    expected = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0] * weights
    got = np.asarray(out.token_log_probs).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out.sum_log_probs).ravel(), expected.sum(-1), atol=1e-4, rtol=1e-5)
    # score_batch (T5X semantics) gives the same sums from the loss weights.
    np.testing.assert_allclose(np.asarray(decoding.score_batch(params, TINY, batch)), expected.sum(-1),
                               atol=1e-4, rtol=1e-5)

    # Lengths count up to and including the first EOS; everything after it is 0.
    lengths = np.asarray(out.lengths).ravel()
    assert len(set(lengths.tolist())) > 3 and lengths.max() == length, lengths
    for row, n in zip(tokens, lengths):
        assert (row[:n - 1] != 1).all()
        assert n == length or row[n - 1] == 1
        assert (row[n:] == 0).all()


def test_score_batch_uses_target_padding_without_loss_weights():
    params, sources = _params(TINY), _sources()
    targets = np.zeros((B, L), np.int32)
    targets[0, :4], targets[1, :3], targets[2, :L] = [5, 7, 9, 1], [4, 4, 1], np.arange(L) + 2
    log_probs = _teacher_forced_log_probs(TINY, params, sources, targets)
    expected = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * (targets > 0)
    got = decoding.score_batch(params, TINY, {"encoder_input_tokens": sources, "decoder_target_tokens": targets})
    np.testing.assert_allclose(np.asarray(got), expected.sum(-1), atol=1e-4, rtol=1e-5)
    with pytest.raises(KeyError, match="decoder_target_tokens"):
        decoding.score_batch(params, TINY, {"encoder_input_tokens": sources})


def test_sampling_is_deterministic_per_key_and_stops_at_eos():
    params, sources = _params(TINY), _sources()
    kwargs = dict(num_samples=N, max_decode_len=L, top_k=TOP_K)
    a = decoding.sample(params, TINY, sources, jax.random.PRNGKey(1), **kwargs)
    b = decoding.sample(params, TINY, sources, jax.random.PRNGKey(1), **kwargs)
    c = decoding.sample(params, TINY, sources, jax.random.PRNGKey(2), **kwargs)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))

    # A policy that always prefers EOS: every row ends at step 1, with EOS counted in the length.
    eos_params = _eos_prone(params, 100.0)
    out = decoding.sample(eos_params, TINY, sources, jax.random.PRNGKey(1), **kwargs)
    np.testing.assert_array_equal(np.asarray(out.lengths), 1)
    np.testing.assert_array_equal(np.asarray(out.tokens[..., 0]), 1)
    np.testing.assert_array_equal(np.asarray(out.tokens[..., 1:]), 0)
    forced = decoding.sample(eos_params, TINY, sources, jax.random.PRNGKey(1), ignore_eos=True, **kwargs)
    np.testing.assert_array_equal(np.asarray(forced.lengths), L)
    assert (np.asarray(forced.tokens) == 1).mean() > 0.9


# ---------------------------------------------------------------------------------------------------------
# Beam search


BEAM_VOCAB = T5Config(vocab_size=6, emb_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=2,
                      head_dim=8, mlp_dim=64)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 3.0])
def test_beam_search_finds_exhaustive_best(alpha):
    vocab, length = BEAM_VOCAB.vocab_size, 4
    params = jax.tree_util.tree_map(lambda x: x, _params(BEAM_VOCAB, seed=4))  # a copy: the cache is shared
    # Sharpen the policy so that sequences of different lengths compete.
    params["decoder"]["logits_dense"]["kernel"] = params["decoder"]["logits_dense"]["kernel"] * 2.0
    sources = jnp.array([[3, 4, 2, 5, 0], [2, 2, 5, 0, 0]], jnp.int32)

    # Every hypothesis: m - 1 non-EOS tokens then EOS (m <= L), or L non-EOS tokens (cut at max length).
    non_eos = [t for t in range(vocab) if t != 1]
    hyps = [list(p) + [1] for m in range(1, length + 1) for p in itertools.product(non_eos, repeat=m - 1)]
    hyps += [list(p) for p in itertools.product(non_eos, repeat=length)]
    targets = np.array([h + [0] * (length - len(h)) for h in hyps], np.int32)
    lengths = np.array([len(h) for h in hyps])

    # beam_size >= the number of live prefixes (5 ** 3) makes beam search exact.
    out = decoding.beam_search(params, BEAM_VOCAB, sources, beam_size=125, alpha=alpha, max_decode_len=length)
    for i in range(len(sources)):
        src = jnp.repeat(sources[i:i + 1], len(hyps), axis=0)
        log_probs = _teacher_forced_log_probs(BEAM_VOCAB, params, src, targets)
        token_lp = np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
        seq_lp = (token_lp * (np.arange(length) < lengths[:, None])).sum(-1)
        scores = seq_lp / ((5.0 + lengths) / 6.0) ** alpha
        best = np.argsort(-scores, kind="stable")
        np.testing.assert_array_equal(np.asarray(out.tokens[i, 0]), targets[best[0]])
        assert int(out.lengths[i, 0]) == lengths[best[0]]
        np.testing.assert_allclose(float(out.sum_log_probs[i, 0]), seq_lp[best[0]], rtol=1e-4, atol=1e-4)
        # The whole beam is the exhaustive top 125, in order.
        np.testing.assert_allclose(np.asarray(out.scores[i]), scores[best[:125]], rtol=1e-4, atol=1e-4)
    if alpha == 3.0:
        assert int(out.lengths[:, 0].max()) > 1  # the length penalty mattered somewhere


def _reference_beam_search(params, source, beam_size, alpha, length):
    """Beam search in float64 NumPy on teacher-forced log-probs (T5X semantics: 2k candidates per step, a
    hypothesis ends at EOS or at max length, the best `beam_size` finished ones are kept)."""
    live, finished = [((), 0.0)], []
    for t in range(length):
        prefixes = np.zeros((len(live), length), np.int32)
        for r, (seq, _) in enumerate(live):
            prefixes[r, :t] = seq
        log_probs = _teacher_forced_log_probs(TINY, params, jnp.repeat(source[None], len(live), 0), prefixes)
        candidates = [(seq + (tok,), lp + log_probs[r, t, tok]) for r, (seq, lp) in enumerate(live)
                      for tok in range(TINY.vocab_size)]
        candidates = sorted(candidates, key=lambda c: -c[1])[:2 * beam_size]
        ended = [c for c in candidates if c[0][-1] == 1 or t == length - 1]
        finished += [(seq, lp, lp / ((5.0 + len(seq)) / 6.0) ** alpha) for seq, lp in ended]
        finished = sorted(finished, key=lambda f: -f[2])[:beam_size]
        live = [c for c in candidates if c[0][-1] != 1][:beam_size]
    return finished


def test_small_beam_matches_reference_beam_search():
    # EOS bias that depends on the previous token (via its embedding's dimension 0), so that ending early
    # and continuing compete and k vs 2k candidates per step matters.
    params = jax.tree_util.tree_map(lambda x: x, _params(TINY))
    offsets = np.random.default_rng(0).uniform(0.0, 20.0, TINY.vocab_size)
    params["token_embedder"]["embedding"] = params["token_embedder"]["embedding"].at[:, 0].add(offsets)
    kernel = params["decoder"]["logits_dense"]["kernel"]
    params["decoder"]["logits_dense"]["kernel"] = 3.0 * kernel.at[0, :].set(0.0).at[0, 1].set(0.3)
    sources = _sources()
    beam_size, alpha = 3, 0.6
    out = decoding.beam_search(params, TINY, sources, beam_size=beam_size, alpha=alpha, max_decode_len=L)
    lengths = np.asarray(out.lengths)
    assert len(set(lengths.ravel().tolist())) > 2, lengths  # EOS competes with continuing
    for i in range(B):
        expected = _reference_beam_search(params, np.asarray(sources[i]), beam_size, alpha, L)
        for j, (seq, lp, score) in enumerate(expected):
            np.testing.assert_array_equal(np.asarray(out.tokens[i, j, :len(seq)]), seq)
            assert int(out.lengths[i, j]) == len(seq)
            np.testing.assert_allclose(float(out.scores[i, j]), score, rtol=1e-4, atol=1e-4)


def test_small_beam_prefers_better_than_greedy_and_matches_reported_scores():
    params, sources = _params(TINY), _sources()
    length, alpha = L, 0.6
    beams = decoding.beam_search(params, TINY, sources, beam_size=3, alpha=alpha, max_decode_len=length)
    tokens, lengths = np.asarray(beams.tokens).reshape(-1, length), np.asarray(beams.lengths).ravel()
    src = jnp.repeat(sources, 3, axis=0)  # beams are grouped by source
    log_probs = _teacher_forced_log_probs(TINY, params, src, tokens)
    token_lp = np.take_along_axis(log_probs, tokens[..., None], -1)[..., 0]
    seq_lp = (token_lp * (np.arange(length) < lengths[:, None])).sum(-1)
    np.testing.assert_allclose(np.asarray(beams.sum_log_probs).ravel(), seq_lp, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(beams.scores).ravel(),
                               seq_lp / ((5.0 + lengths) / 6.0) ** alpha, atol=1e-4, rtol=1e-5)
    assert np.all(np.diff(np.asarray(beams.scores), axis=1) <= 1e-6)
    # The best beam scores at least as well as the greedy hypothesis under the same penalty.
    g = decoding.greedy(params, TINY, sources, max_decode_len=length)
    g_scores = np.asarray(g.sum_log_probs) / ((5.0 + np.asarray(g.lengths)) / 6.0) ** alpha
    assert np.all(np.asarray(beams.scores[:, 0]) >= g_scores - 1e-4)


# ---------------------------------------------------------------------------------------------------------
# Structure: encode once, share cross K/V; sharding along the batch


def _all_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in list(eqn.invars) + list(eqn.outvars) if hasattr(v.aval, "shape")]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            shapes += _all_shapes(sub)
    return shapes


def _while_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    shapes = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            shapes += [tuple(v.aval.shape) for v in eqn.invars]
        for sub in jax.core.jaxprs_in_params(eqn.params):
            shapes += _while_operand_shapes(sub)
    return shapes


@pytest.mark.parametrize("search", ["sample", "beam"])
def test_sources_encoded_once_and_cross_kv_shared(search):
    config = TINY
    b, n, s, length = 2, 3, 5, 7
    params, sources = _params(config), _sources(b, s)
    if search == "sample":
        fn = lambda p, x: decoding.sample(p, config, x, jax.random.PRNGKey(0), num_samples=n,
                                          max_decode_len=length)
    else:
        fn = lambda p, x: decoding.beam_search(p, config, x, beam_size=n, max_decode_len=length)
    jaxpr = jax.make_jaxpr(fn)(params, sources).jaxpr
    layers, h, d, e = config.num_decoder_layers, config.num_heads, config.head_dim, config.emb_dim
    loop_inputs = _while_operand_shapes(jaxpr)
    # The loop carries per-source cross K/V and a per-row self-attention cache.
    assert (layers, b, s, h, d) in loop_inputs
    assert Transformer(config).init_cache(b * n, length)["k"].shape in loop_inputs
    # Nothing anywhere holds per-row copies of a source: no encoder activations or K/V for b * n rows.
    shapes = set(_all_shapes(jaxpr))
    for per_row in [(b * n, s), (b * n, s, e), (b * n, s, h, d), (layers, b * n, s, h, d), (b, n, s, h, d)]:
        assert per_row not in shapes, per_row


def test_sampling_sharded_along_batch_matches_single_device():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (simulated) devices")
    params, sources = _params(TINY), _sources(8, 6)
    kwargs = dict(num_samples=2, max_decode_len=6, top_k=10)
    ref = decoding.sample(params, TINY, sources, jax.random.PRNGKey(9), **kwargs)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.device_put(sources, NamedSharding(mesh, P("data")))
    out = decoding.sample(params, TINY, sharded, jax.random.PRNGKey(9), **kwargs)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.token_log_probs), np.asarray(ref.token_log_probs), atol=1e-5)
    # Outputs stay split along the batch: each device holds its own sources' samples.
    for leaf in out:
        assert not leaf.sharding.is_fully_replicated
        assert leaf.addressable_shards[0].data.shape[0] == 1
    beams = decoding.beam_search(params, TINY, sharded, beam_size=2, max_decode_len=6)
    ref_beams = decoding.beam_search(params, TINY, sources, beam_size=2, max_decode_len=6)
    np.testing.assert_array_equal(np.asarray(beams.tokens), np.asarray(ref_beams.tokens))
    assert not beams.tokens.sharding.is_fully_replicated


# ---------------------------------------------------------------------------------------------------------
# Input handling


def test_bucketing_and_bad_input():
    assert decoding.bucket_length(1) == 16
    assert decoding.bucket_length(17) == 32
    padded = decoding.pad_to_bucket([[5, 6, 1], [7, 1]])
    assert padded.shape == (2, 16) and padded.dtype == np.int32
    np.testing.assert_array_equal(padded[:, :3], [[5, 6, 1], [7, 1, 0]])
    assert padded[:, 3:].sum() == 0
    with pytest.raises(ValueError, match="largest bucket"):
        decoding.pad_to_bucket([[3] * 600])
    params = _params(TINY)
    with pytest.raises(ValueError, match="rank 2"):
        decoding.sample(params, TINY, jnp.ones((4,), jnp.int32), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="top_p"):
        decoding.sample(params, TINY, jnp.ones((1, 4), jnp.int32), jax.random.PRNGKey(0), top_p=0.0)
    with pytest.raises(TypeError, match="Transformer or T5Config"):
        decoding.greedy(params, "tiny", jnp.ones((1, 4), jnp.int32))
