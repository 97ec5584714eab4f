"""Decoding: temperature sampling (top-k, top-p), greedy, beam search, and teacher-forced scoring.

ReST's Grow step (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2 and Algorithm 1) samples N translations per
source from the current policy and keeps, for the offline-RL losses of the Improve step (Sec. 3, Appendix
on BVMPO/OAC), the log-probability of every sampled token under the policy. Everything here is a pure
jitted function of explicit state, in the manner of Tunix:

1. encode each source once and compute its cross-attention keys/values once (`Transformer.encode`,
   `Transformer.cross_attention_kv`); the N samples (or beams) of a source share them through the model's
   grouped layout (decode rows [b * n], cross K/V [layers, b, s, h, d]);
2. a `jax.lax.while_loop` over positions whose state is the self-attention cache, the emitted tokens and
   their log-probabilities; it stops as soon as every row has emitted EOS (or at `max_decode_len`).

All shapes are fixed by (batch, source length, N, max_decode_len), so XLA compiles one program per shape;
`pad_to_bucket` rounds ragged source lengths up to a few bucket lengths to keep that number small.
Nothing here pins a sharding: inputs sharded along the batch on the 'data' mesh axis stay sharded.

Conventions (T5/T5X): pad = 0, EOS = 1, decoder start token = 0. Outputs are 0-padded after EOS and include
the EOS. Unlike T5X's `temperature_sample`, whose default `topk=1` is greedy, plain sampling is the default
here (`top_k=0` and `top_p=1.0` mean "off"); `temperature=0` means greedy.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rest_jax.data.special_tokens import EOS_ID, PAD_ID
from rest_jax.model.decoder_only import DecoderOnly, DecoderOnlyConfig
from rest_jax.model.t5 import T5Config, Transformer
from rest_jax.model.translation_lm import TranslationLM

Array = jax.Array
PyTree = Any

DECODER_START_ID = 0

# Vocabulary block of the two-level inverse-CDF sampler: a cumulative sum over ~sqrt(V) block sums then over
# one block costs a few passes over the logits, where Gumbel-max would draw V random numbers per row per
# step (measured 25x slower at V=32k on CPU).
_SAMPLER_BLOCK = 128


class DecodeOutput(NamedTuple):
    """Samples of `sample` (shapes [b, N, ...]) or `greedy` (shapes [b, ...]).

    Attributes:
      tokens: int32 [..., L] emitted tokens, EOS included, 0 after it.
      lengths: int32 [...] number of emitted tokens including the EOS (L when no EOS was emitted).
      token_log_probs: float32 [..., L] log-probability of each emitted token under the untempered policy
        softmax (before temperature, top-k and top-p), 0 on padding.
      sum_log_probs: float32 [...] sum of `token_log_probs`.
    """

    tokens: Array
    lengths: Array
    token_log_probs: Array
    sum_log_probs: Array


class BeamSearchOutput(NamedTuple):
    """Beams of `beam_search`, best first.

    Attributes:
      tokens: int32 [b, beam_size, L], EOS included, 0 after it; `tokens[:, 0]` is the best sequence.
      scores: float32 [b, beam_size] length-normalised scores sum_log_probs / length_penalty(lengths).
      lengths: int32 [b, beam_size] including the EOS.
      sum_log_probs: float32 [b, beam_size] untempered log-probability of each sequence.
    """

    tokens: Array
    scores: Array
    lengths: Array
    sum_log_probs: Array


# ---------------------------------------------------------------------------------------------------------
# Model plumbing


def _config_of(model_or_config: Transformer | T5Config) -> T5Config:
    if isinstance(model_or_config, T5Config):
        return model_or_config
    if isinstance(model_or_config, Transformer):
        return model_or_config.config
    raise TypeError(f"Expected a rest_jax Transformer or T5Config, got {type(model_or_config).__name__}.")


def _check_tokens(name: str, tokens: Any, ndim: int = 2) -> None:
    if tokens.ndim != ndim:
        raise ValueError(f"{name} must have rank {ndim} ([batch, length]), got shape {tuple(tokens.shape)}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must hold integer token ids, got dtype {tokens.dtype}.")


def _loop_params(params: PyTree, dtype: str) -> PyTree:
    """The parameters a decode loop reads: under bfloat16 activations every matrix is rounded to bfloat16 once,
    before the loop, instead of at every step inside it, where XLA:CPU leaves the casts (each step read the
    float32 weights and wrote a bfloat16 copy: ~5% of a bfloat16 Grow step on the IWSLT shape).
    Nothing changes numerically: every read of a matrix rounds it to the activation dtype first
    (`layers.matmul`, `Embed`, the relative-position table), and vectors (norm scales) stay float32."""
    if jnp.dtype(dtype) == jnp.float32:
        return params
    return jax.tree.map(lambda x: x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x,
                        params)


def _prefill(model: Transformer, params: PyTree, encoder_input_tokens: Array) -> tuple[dict, Array]:
    """Encodes the b sources once and returns their cross-attention K/V [layers, b, s, h, d] and mask."""
    encoded = model.apply({"params": params}, encoder_input_tokens, method=Transformer.encode)
    cross_kv = model.apply({"params": params}, encoded, method=Transformer.cross_attention_kv)
    return cross_kv, encoder_input_tokens > 0


def _decode_step(model: Transformer, params: PyTree, tokens: Array, index: Array, cache: dict,
                 cross_kv: dict, encoder_mask: Array) -> tuple[Array, dict]:
    return model.apply({"params": params}, tokens, index, cache, cross_kv, encoder_mask,
                       method=Transformer.decode_step)


# ---------------------------------------------------------------------------------------------------------
# Token selection


def _sample_categorical(key: Array, logits: Array) -> Array:
    """One draw per row from softmax(logits) [rows, V] by a two-level inverse CDF (exact up to rounding).

    Tokens with logit -inf (filtered by top-k/top-p) have probability exactly 0 and are never drawn.
    """
    rows, vocab = logits.shape
    block = min(_SAMPLER_BLOCK, vocab)
    num_blocks = -(-vocab // block)
    probs = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    probs = jnp.pad(probs, ((0, 0), (0, num_blocks * block - vocab)))
    blocks = probs.reshape(rows, num_blocks, block)
    block_cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)
    # u in (0, 1], so the target mass is > 0 and the first token reaching it has positive probability.
    target = (1.0 - jax.random.uniform(key, (rows,), jnp.float32)) * block_cdf[:, -1]
    block_index = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), num_blocks - 1)
    before = jnp.take_along_axis(block_cdf, jnp.maximum(block_index - 1, 0)[:, None], axis=1)[:, 0]
    before = jnp.where(block_index > 0, before, 0.0)
    inner = jnp.take_along_axis(blocks, block_index[:, None, None], axis=1)[:, 0]
    inner_cdf = jnp.cumsum(inner, axis=-1) + before[:, None]
    within = jnp.sum(inner_cdf < target[:, None], axis=-1)
    # Rounding can leave the target just above the block's last partial sum: fall back to the block's last
    # token of positive probability rather than a zero-probability one.
    last_positive = jnp.max(jnp.where(inner > 0, jnp.arange(block), -1), axis=-1)
    within = jnp.minimum(within, last_positive)
    return (block_index * block + within).astype(jnp.int32)


def _argmax(logits: Array) -> Array:
    """First index of the row maximum, by two float max-reductions.

    XLA:CPU lowers `jnp.argmax` to a variadic (value, index) reduce that does not vectorise: 35 ms on
    [256, 32000] logits (a quarter of an IWSLT-shape decode step) against 7 ms for this. Indices below
    2**24 are exact in float32.
    """
    top = jnp.max(logits, axis=-1, keepdims=True)
    negative_index = jnp.where(logits == top, -jnp.arange(logits.shape[-1], dtype=jnp.float32), -jnp.inf)
    return (-jnp.max(negative_index, axis=-1)).astype(jnp.int32)


def _top_p_mask_sorted(sorted_logits: Array, top_p: Array) -> Array:
    """Keeps the smallest prefix of descending logits whose probability mass reaches `top_p`."""
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    return mass_before < top_p  # the most likely token always survives


def _top_p_filter(scaled: Array, top_p: Array, candidates: int) -> Array:
    """Nucleus filter over the full vocabulary without sorting it: -inf outside the nucleus.

    The nucleus is {p >= t} for the largest t whose set still has mass >= top_p. Rows whose `candidates`
    most likely tokens already hold that mass get t exactly from those (sorted by `lax.top_k`); the others
    (flat distributions) by bisection on t, 40 masked sums. A full sort of [256, 32000] logits takes ~2 s
    on CPU, far more than the whole decode step.
    """
    vocab = scaled.shape[-1]
    probs = jax.nn.softmax(scaled, axis=-1)
    top, _ = jax.lax.top_k(probs, min(candidates, vocab))
    keep = (jnp.cumsum(top, axis=-1) - top) < top_p
    threshold = jnp.min(jnp.where(keep, top, jnp.inf), axis=-1)
    covered = jnp.sum(top, axis=-1) >= top_p

    def bisect(_):
        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            enough = jnp.sum(jnp.where(probs >= mid[:, None], probs, 0.0), axis=-1) >= top_p
            return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

        lo, _ = jax.lax.fori_loop(0, 40, halve, (jnp.zeros_like(threshold), top[:, 0]))
        return jnp.where(covered, threshold, lo)

    if candidates < vocab:
        threshold = jax.lax.cond(jnp.all(covered), lambda _: threshold, bisect, None)
    return jnp.where(probs >= threshold[:, None], scaled, -jnp.inf)


def _select(key: Array, logits: Array, temperature: Array, top_k: int, top_p: Array | None,
            greedy: bool | None, top_p_candidates: int = 64) -> Array:
    """Next token per row from untempered logits [rows, V].

    Order as in HF and T5X: temperature, then top-k, then top-p on the tempered distribution. `greedy` is
    True/False when the temperature is known at trace time (0 / > 0), None when it is traced.
    """
    if greedy:
        return _argmax(logits)
    scaled = logits / jnp.maximum(temperature, 1e-6).astype(logits.dtype)
    if top_k > 0:
        # lax.top_k returns values sorted descending, so top-p needs no further sort.
        values, indices = jax.lax.top_k(scaled, top_k)
        if top_p is not None:
            values = jnp.where(_top_p_mask_sorted(values, top_p), values, -jnp.inf)
        choice = _sample_categorical(key, values)
        token = jnp.take_along_axis(indices, choice[:, None], axis=1)[:, 0].astype(jnp.int32)
    elif top_p is not None:
        token = _sample_categorical(key, _top_p_filter(scaled, top_p, top_p_candidates))
    else:
        token = _sample_categorical(key, scaled)
    if greedy is None:  # a traced temperature of 0 still means greedy
        token = jnp.where(temperature > 0, token, _argmax(logits))
    return token


# ---------------------------------------------------------------------------------------------------------
# Sampling


def _check_sampling(vocab_size: int, num_samples: int, max_decode_len: int, temperature: float | Array,
                    top_k: int, top_p: float, top_p_candidates: int) -> bool:
    """Raises on bad sampling settings; returns whether the temperature is known at trace time."""
    if num_samples < 1 or max_decode_len < 1:
        raise ValueError(f"num_samples ({num_samples}) and max_decode_len ({max_decode_len}) must be >= 1.")
    if top_k < 0 or top_k > vocab_size:
        raise ValueError(f"top_k must be in [0, vocab_size={vocab_size}], got {top_k}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_p_candidates < 1:
        raise ValueError(f"top_p_candidates must be >= 1, got {top_p_candidates}.")
    # Python and NumPy scalars are known at trace time (one program each); jax arrays may be traced.
    is_static = not isinstance(temperature, jax.Array)
    if is_static and temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}.")
    return is_static


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "max_decode_len", "top_k", "use_top_p",
                                             "top_p_candidates", "greedy", "eos_id", "ignore_eos"))
def _sample_jit(params: PyTree, encoder_input_tokens: Array, rng: Array, temperature: Array, top_p: Array, *,
                config: T5Config, num_samples: int, max_decode_len: int, top_k: int, use_top_p: bool,
                top_p_candidates: int, greedy: bool | None, eos_id: int, ignore_eos: bool) -> DecodeOutput:
    model = Transformer(config)
    params = _loop_params(params, config.dtype)
    batch = encoder_input_tokens.shape[0]
    rows = batch * num_samples
    length = max_decode_len
    cross_kv, encoder_mask = _prefill(model, params, encoder_input_tokens)

    def cond(state):
        index, _, _, _, done, _, _ = state
        return (index < length) & ~jnp.all(done)

    def body(state):
        index, last, tokens, log_probs, done, lengths, cache = state
        logits, cache = _decode_step(model, params, last, index, cache, cross_kv, encoder_mask)
        key = jax.random.fold_in(rng, index)
        token = _select(key, logits, temperature, top_k, top_p if use_top_p else None, greedy, top_p_candidates)
        # Gather then normalise: never materialises a [rows, V] log-softmax.
        token_log_prob = (jnp.take_along_axis(logits, token[:, None], axis=1)[:, 0]
                          - jax.nn.logsumexp(logits, axis=-1))
        token = jnp.where(done, PAD_ID, token)
        token_log_prob = jnp.where(done, 0.0, token_log_prob)
        lengths = lengths + (~done).astype(jnp.int32)
        if not ignore_eos:
            done = done | (token == eos_id)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], index, axis=1)
        log_probs = jax.lax.dynamic_update_slice_in_dim(log_probs, token_log_prob[:, None], index, axis=1)
        return index + 1, token, tokens, log_probs, done, lengths, cache

    state = (
        jnp.array(0, jnp.int32),
        jnp.full((rows,), DECODER_START_ID, jnp.int32),
        jnp.zeros((rows, length), jnp.int32),
        jnp.zeros((rows, length), jnp.float32),
        jnp.zeros((rows,), bool),
        jnp.zeros((rows,), jnp.int32),
        model.init_cache(rows, length),
    )
    _, _, tokens, log_probs, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    shape = (batch, num_samples)
    log_probs = log_probs.reshape(shape + (length,))
    return DecodeOutput(tokens.reshape(shape + (length,)), lengths.reshape(shape), log_probs,
                        jnp.sum(log_probs, axis=-1))


def sample(params: PyTree, model_or_config: Transformer | TranslationLM | T5Config, encoder_input_tokens: Array,
           rng: Array, num_samples: int = 1, max_decode_len: int = 128, temperature: float | Array = 1.0,
           top_k: int = 0, top_p: float = 1.0, eos_id: int = EOS_ID, ignore_eos: bool = False,
           top_p_candidates: int = 64) -> DecodeOutput:
    """Draws `num_samples` translations per source from the policy (ReST Grow step, Sec. 2).

    Args:
      params: model parameters (boxed or plain).
      model_or_config: the `Transformer` or its `T5Config`, or a decoder-only `TranslationLM` (its sources'
        prompts are sampled from with `sample_lm`).
      encoder_input_tokens: int [b, s] sources, 0-padded; may be sharded along b.
      rng: PRNG key; the output is a deterministic function of it.
      num_samples: N samples per source; they share the source's encoding and cross-attention K/V.
      max_decode_len: L, the most tokens emitted per sample (EOS included).
      temperature: softmax temperature; 0 means greedy. May be a traced scalar.
      top_k: keep the k most likely tokens (0: off).
      top_p: nucleus sampling, keep the smallest set of tokens with mass >= top_p (1.0: off).
      eos_id: end-of-sequence id.
      ignore_eos: keep sampling after EOS, emitting exactly L tokens per row (benchmarks).
      top_p_candidates: top-p without top-k first looks for the nucleus among this many most likely tokens
        and bisects only for rows whose nucleus is larger (exact either way; this only tunes speed).

    Returns:
      `DecodeOutput` with shapes [b, N, L] and [b, N].
    """
    if isinstance(model_or_config, TranslationLM):
        # A decoder-only policy: the same prompts its training batches make (`TranslationLM.prompts`).
        if ignore_eos:
            raise ValueError("ignore_eos is for the encoder-decoder sampler (benchmarks).")
        _check_tokens("encoder_input_tokens", encoder_input_tokens)
        prompt, mask = model_or_config.prompts(encoder_input_tokens)
        return sample_lm(params, model_or_config, prompt, mask, rng, num_samples=num_samples,
                         max_decode_len=max_decode_len, temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_ids=(eos_id, *model_or_config.stop_ids), stop_sequences=model_or_config.stop_sequences,
                         top_p_candidates=top_p_candidates)
    config = _config_of(model_or_config)
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    is_static = _check_sampling(config.vocab_size, num_samples, max_decode_len, temperature, top_k, top_p,
                                top_p_candidates)
    return _sample_jit(nn.unbox(params), encoder_input_tokens, rng, jnp.asarray(temperature, jnp.float32),
                       jnp.asarray(top_p, jnp.float32), config=config, num_samples=int(num_samples),
                       max_decode_len=int(max_decode_len), top_k=int(top_k), use_top_p=bool(top_p < 1.0),
                       top_p_candidates=int(top_p_candidates),
                       greedy=bool(float(temperature) == 0.0) if is_static else None, eos_id=int(eos_id),
                       ignore_eos=bool(ignore_eos))


def greedy(params: PyTree, model_or_config: Transformer | T5Config, encoder_input_tokens: Array,
           max_decode_len: int = 128, eos_id: int = EOS_ID) -> DecodeOutput:
    """Greedy decoding: the argmax token at every step. Returns `DecodeOutput` with shapes [b, L] and [b]."""
    out = sample(params, model_or_config, encoder_input_tokens, jax.random.PRNGKey(0), num_samples=1,
                 max_decode_len=max_decode_len, temperature=0.0, eos_id=eos_id)
    return DecodeOutput(*(x[:, 0] for x in out))


# ---------------------------------------------------------------------------------------------------------
# Decoder-only LMs (issue 17): prompts in, completions out


@functools.partial(jax.jit, static_argnames=("config", "num_samples", "max_decode_len", "top_k", "use_top_p",
                                             "top_p_candidates", "greedy", "stop_ids", "stop_sequences"))
def _sample_lm_jit(params: PyTree, prompt_tokens: Array, prompt_mask: Array, rng: Array, temperature: Array,
                   top_p: Array, *, config: DecoderOnlyConfig, num_samples: int, max_decode_len: int, top_k: int,
                   use_top_p: bool, top_p_candidates: int, greedy: bool | None,
                   stop_ids: tuple[int, ...], stop_sequences: tuple[tuple[int, ...], ...] = ()) -> DecodeOutput:
    model = DecoderOnly(config)
    params = _loop_params(params, config.dtype)
    batch, prompt_length = prompt_tokens.shape
    rows, length = batch * num_samples, max_decode_len
    # Rows grouped by prompt, as in `sample`; each row keeps its own copy of the prompt's keys/values.
    prompts, mask = jnp.repeat(prompt_tokens, num_samples, axis=0), jnp.repeat(prompt_mask, num_samples, axis=0)
    logits, cache = model.apply({"params": params}, prompts, mask, prompt_length + length,
                                method=DecoderOnly.prefill)
    key_mask = jnp.concatenate([mask, jnp.ones((rows, length), bool)], axis=1)
    next_position = jnp.sum(mask.astype(jnp.int32), axis=1)  # left padding does not count
    stops = jnp.asarray(stop_ids, jnp.int32)

    def cond(state):
        t, _, _, _, done, _, _ = state
        return (t < length) & ~jnp.all(done)

    def body(state):
        t, logits, tokens, log_probs, done, lengths, cache = state
        token = _select(jax.random.fold_in(rng, t), logits, temperature, top_k, top_p if use_top_p else None,
                        greedy, top_p_candidates)
        token_log_prob = jnp.take_along_axis(logits, token[:, None], axis=1)[:, 0] - jax.nn.logsumexp(logits, -1)
        token = jnp.where(done, PAD_ID, token)
        token_log_prob = jnp.where(done, 0.0, token_log_prob)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(token[:, None] == stops[None, :], axis=-1)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)
        for seq in stop_sequences:  # the completion now ends with the k tokens of a stop sequence
            k = len(seq)
            last = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(t + 1 - k, 0), k, axis=1)
            done = done | ((t + 1 >= k) & jnp.all(last == jnp.asarray(seq, jnp.int32)[None, :], axis=1))
        log_probs = jax.lax.dynamic_update_slice_in_dim(log_probs, token_log_prob[:, None], t, axis=1)
        logits, cache = model.apply({"params": params}, token, next_position + t, prompt_length + t, cache,
                                    key_mask, method=DecoderOnly.decode_step)
        return t + 1, logits, tokens, log_probs, done, lengths, cache

    state = (jnp.array(0, jnp.int32), logits, jnp.zeros((rows, length), jnp.int32),
             jnp.zeros((rows, length), jnp.float32), jnp.zeros((rows,), bool), jnp.zeros((rows,), jnp.int32), cache)
    _, _, tokens, log_probs, _, lengths, _ = jax.lax.while_loop(cond, body, state)
    shape = (batch, num_samples)
    log_probs = log_probs.reshape(shape + (length,))
    return DecodeOutput(tokens.reshape(shape + (length,)), lengths.reshape(shape), log_probs,
                        jnp.sum(log_probs, axis=-1))


def sample_lm(params: PyTree, model_or_config: DecoderOnly | DecoderOnlyConfig, prompt_tokens: Array,
              prompt_mask: Array, rng: Array, num_samples: int = 1, max_decode_len: int = 128,
              temperature: float | Array = 1.0, top_k: int = 0, top_p: float = 1.0,
              stop_ids: Sequence[int] = (EOS_ID,), stop_sequences: Sequence[Sequence[int]] = (),
              top_p_candidates: int = 64) -> DecodeOutput:
    """Draws `num_samples` completions of each prompt from a decoder-only LM (ReST's Grow, Sec. 2).

    The prompts run through the model in one pass that fills the cache (`DecoderOnly.prefill`); then one
    `jax.lax.while_loop` step per new token, until every row has emitted a stop token or `max_decode_len`.

    Args:
      params: model parameters (boxed or plain).
      model_or_config: the `DecoderOnly` model or its config.
      prompt_tokens: int [b, P] prompts, left-padded so that all end at column P - 1.
      prompt_mask: bool [b, P], True on real prompt tokens (a start token 0 counts when marked True).
      rng, num_samples, temperature, top_k, top_p, top_p_candidates: as in `sample`.
      max_decode_len: L, the most tokens emitted per completion (a stop token included).
      stop_ids: tokens that end a completion (EOS; e.g. also the newline token of a one-line format).
      stop_sequences: token sequences after which a completion ends (a stop text of several tokens).

    Returns:
      `DecodeOutput` with shapes [b, N, L] and [b, N]; token log-probs are untempered.
    """
    config = model_or_config.config if isinstance(model_or_config, DecoderOnly) else model_or_config
    if not isinstance(config, DecoderOnlyConfig):
        raise TypeError(f"Expected a DecoderOnly model or DecoderOnlyConfig, got {type(model_or_config).__name__}.")
    _check_tokens("prompt_tokens", prompt_tokens)
    if tuple(np.shape(prompt_mask)) != tuple(prompt_tokens.shape):
        raise ValueError(f"prompt_mask has shape {np.shape(prompt_mask)}, prompt_tokens {prompt_tokens.shape}.")
    if not stop_ids:
        raise ValueError("stop_ids must name at least one token (EOS).")
    is_static = _check_sampling(config.vocab_size, num_samples, max_decode_len, temperature, top_k, top_p,
                                top_p_candidates)
    return _sample_lm_jit(nn.unbox(params), jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask, bool), rng,
                          jnp.asarray(temperature, jnp.float32), jnp.asarray(top_p, jnp.float32), config=config,
                          num_samples=int(num_samples), max_decode_len=int(max_decode_len), top_k=int(top_k),
                          use_top_p=bool(top_p < 1.0), top_p_candidates=int(top_p_candidates),
                          greedy=bool(float(temperature) == 0.0) if is_static else None,
                          stop_ids=tuple(int(i) for i in stop_ids),
                          stop_sequences=tuple(tuple(int(i) for i in s) for s in stop_sequences))


# ---------------------------------------------------------------------------------------------------------
# Beam search


def length_penalty(length: Array, alpha: float | Array) -> Array:
    """GNMT length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016), as in T5X's beam search."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


@functools.partial(jax.jit, static_argnames=("config", "beam_size", "max_decode_len", "eos_id"))
def _beam_search_jit(params: PyTree, encoder_input_tokens: Array, alpha: Array, *, config: T5Config,
                     beam_size: int, max_decode_len: int, eos_id: int) -> BeamSearchOutput:
    model = Transformer(config)
    params = _loop_params(params, config.dtype)
    batch = encoder_input_tokens.shape[0]
    k, length, vocab = beam_size, max_decode_len, config.vocab_size
    cross_kv, encoder_mask = _prefill(model, params, encoder_input_tokens)
    neg_inf = jnp.array(-jnp.inf, jnp.float32)
    max_penalty = jnp.maximum(length_penalty(jnp.array(1), alpha), length_penalty(jnp.array(length), alpha))

    def cond(state):
        index, live_log_probs, _, _, finished_scores, _, _, _ = state
        # Log-probs only fall as sequences grow, so a live beam can at best score live / max penalty: once
        # every finished slot beats that, no live beam can enter the top k (exact early stop).
        best_live = live_log_probs[:, 0] / max_penalty
        improvable = jnp.any(best_live > finished_scores[:, -1])
        return (index < length) & improvable

    def body(state):
        (index, live_log_probs, live_tokens, cache, finished_scores, finished_log_probs, finished_tokens,
         finished_lengths) = state
        last = jax.lax.dynamic_slice_in_dim(live_tokens, jnp.maximum(index - 1, 0), 1, axis=2)[..., 0]
        last = jnp.where(index == 0, DECODER_START_ID, last).reshape(batch * k)
        logits, cache = _decode_step(model, params, last, index, cache, cross_kv, encoder_mask)
        log_probs = jax.nn.log_softmax(logits, axis=-1).reshape(batch, k, vocab)
        candidates = (live_log_probs[:, :, None] + log_probs).reshape(batch, k * vocab)
        # 2k candidates guarantee k survivors that have not ended, even if k of them emit EOS.
        cand_log_probs, flat = jax.lax.top_k(candidates, 2 * k)
        cand_beam, cand_token = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_tokens = jnp.take_along_axis(live_tokens, cand_beam[:, :, None], axis=1)
        cand_tokens = jax.lax.dynamic_update_slice_in_dim(cand_tokens, cand_token[:, :, None], index, axis=2)
        # A hypothesis ends with EOS or on reaching max_decode_len (then it is scored as it stands).
        ended = (cand_token == eos_id) | (index == length - 1)
        new_length = index + 1
        cand_scores = jnp.where(ended, cand_log_probs / length_penalty(new_length, alpha), neg_inf)

        all_scores = jnp.concatenate([finished_scores, cand_scores], axis=1)
        finished_scores, pick = jax.lax.top_k(all_scores, k)
        finished_log_probs = jnp.take_along_axis(
            jnp.concatenate([finished_log_probs, cand_log_probs], axis=1), pick, axis=1)
        finished_tokens = jnp.take_along_axis(
            jnp.concatenate([finished_tokens, cand_tokens], axis=1), pick[:, :, None], axis=1)
        finished_lengths = jnp.take_along_axis(
            jnp.concatenate([finished_lengths, jnp.full_like(cand_token, new_length)], axis=1), pick, axis=1)

        live_log_probs, pick = jax.lax.top_k(jnp.where(ended, neg_inf, cand_log_probs), k)
        live_tokens = jnp.take_along_axis(cand_tokens, pick[:, :, None], axis=1)
        origin = jnp.take_along_axis(cand_beam, pick, axis=1)  # [b, k] parent beam of each new live beam

        def reorder(c):  # decoder rows are axis 1 of every cache array (`Transformer.init_cache`)
            c = c.reshape((c.shape[0], batch, k) + c.shape[2:])
            c = jnp.take_along_axis(c, origin.reshape((1, batch, k) + (1,) * (c.ndim - 3)), axis=2)
            return c.reshape((c.shape[0], batch * k) + c.shape[3:])

        cache = jax.tree_util.tree_map(reorder, cache)
        return (index + 1, live_log_probs, live_tokens, cache, finished_scores, finished_log_probs,
                finished_tokens, finished_lengths)

    # Only beam 0 is live at the start so that the k copies of the start token do not fill the beam.
    live_log_probs = jnp.tile(jnp.concatenate([jnp.zeros((1,)), jnp.full((k - 1,), -jnp.inf)]), (batch, 1))
    state = (
        jnp.array(0, jnp.int32),
        live_log_probs.astype(jnp.float32),
        jnp.zeros((batch, k, length), jnp.int32),
        model.init_cache(batch * k, length),
        jnp.full((batch, k), -jnp.inf, jnp.float32),
        jnp.full((batch, k), -jnp.inf, jnp.float32),
        jnp.zeros((batch, k, length), jnp.int32),
        jnp.zeros((batch, k), jnp.int32),
    )
    _, _, _, _, scores, log_probs, tokens, lengths = jax.lax.while_loop(cond, body, state)
    # Zero everything after the EOS (live continuations may have written into those slots).
    tokens = jnp.where(jnp.arange(length) < lengths[:, :, None], tokens, PAD_ID)
    return BeamSearchOutput(tokens, scores, lengths, log_probs)


def beam_search(params: PyTree, model_or_config: Transformer | T5Config, encoder_input_tokens: Array,
                beam_size: int = 4, alpha: float = 0.6, max_decode_len: int = 128,
                eos_id: int = EOS_ID) -> BeamSearchOutput:
    """Beam search with the GNMT length penalty, scores = log p(y|x) / ((5 + |y|) / 6) ** alpha.

    The b * beam_size decoder rows share each source's cross-attention K/V. A hypothesis ends when it emits
    EOS or reaches `max_decode_len`; the search stops early once no live beam can still enter the top
    `beam_size` finished ones. With beam_size at least the number of live prefixes the search is exhaustive.

    Returns:
      `BeamSearchOutput`, beams sorted best first ([b, beam_size, L]).
    """
    if isinstance(model_or_config, TranslationLM):
        raise ValueError("Beam search is implemented for the encoder-decoder only; decode a decoder-only policy "
                         "greedily or by sampling (e.g. evaluate.method = 'greedy').")
    config = _config_of(model_or_config)
    _check_tokens("encoder_input_tokens", encoder_input_tokens)
    if beam_size < 1 or max_decode_len < 1:
        raise ValueError(f"beam_size ({beam_size}) and max_decode_len ({max_decode_len}) must be >= 1.")
    if 2 * beam_size > beam_size * config.vocab_size:
        raise ValueError(f"vocab_size {config.vocab_size} too small for beam search.")
    return _beam_search_jit(nn.unbox(params), encoder_input_tokens, jnp.asarray(alpha, jnp.float32),
                            config=config, beam_size=int(beam_size), max_decode_len=int(max_decode_len),
                            eos_id=int(eos_id))


# ---------------------------------------------------------------------------------------------------------
# Scoring


def _target_weights(batch: Mapping[str, Array]) -> Array:
    if "decoder_loss_weights" in batch and batch["decoder_loss_weights"] is not None:
        return jnp.asarray(batch["decoder_loss_weights"], jnp.float32)
    return (jnp.asarray(batch["decoder_target_tokens"]) > 0).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model",))
def _token_scores_jit(params: PyTree, encoder_input_tokens: Array, decoder_input_tokens: Array,
                      decoder_target_tokens: Array, weights: Array, *, model: Transformer | TranslationLM) -> Array:
    logits = model.apply({"params": params}, encoder_input_tokens, decoder_input_tokens)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(log_probs, decoder_target_tokens[..., None].astype(jnp.int32), axis=-1)
    return target[..., 0] * weights


def token_scores(params: PyTree, model_or_config: Transformer | TranslationLM | T5Config,
                 batch: Mapping[str, Array]) -> Array:
    """Teacher-forced log p(target_t | target_<t, source) per position [b, T], 0 where weights are 0.

    Weights are `decoder_loss_weights` when the batch has them, else `decoder_target_tokens > 0`.
    `decoder_input_tokens` defaults to the targets shifted right with start token 0. A `TranslationLM` scores
    the targets as completions of the sources' prompts.
    """
    model = model_or_config
    if not isinstance(model, TranslationLM):
        model = Transformer(_config_of(model_or_config))
    for name in ("encoder_input_tokens", "decoder_target_tokens"):
        if name not in batch:
            raise KeyError(f"score batch lacks feature {name!r}; has {sorted(batch)}.")
        _check_tokens(name, batch[name])
    targets = jnp.asarray(batch["decoder_target_tokens"])
    inputs = batch.get("decoder_input_tokens")
    if inputs is None:
        inputs = shift_right(targets)
    weights = _target_weights(batch)
    if weights.shape != targets.shape:
        raise ValueError(f"decoder_loss_weights shape {weights.shape} != decoder_target_tokens {targets.shape}.")
    return _token_scores_jit(nn.unbox(params), jnp.asarray(batch["encoder_input_tokens"]), jnp.asarray(inputs),
                             targets, weights, model=model)


def score_batch(params: PyTree, model_or_config: Transformer | TranslationLM | T5Config,
                batch: Mapping[str, Array]) -> Array:
    """Sum of target log-probabilities per example [b], like T5X's `EncoderDecoderModel.score_batch`."""
    return jnp.sum(token_scores(params, model_or_config, batch), axis=-1)


def shift_right(targets: Array, start_id: int = DECODER_START_ID) -> Array:
    """Decoder inputs from targets: prepend the start token, drop the last position."""
    targets = jnp.asarray(targets)
    return jnp.concatenate([jnp.full_like(targets[:, :1], start_id), targets[:, :-1]], axis=1)


def samples_to_batch(encoder_input_tokens: Array, out: DecodeOutput) -> dict[str, Array]:
    """Flattens samples [b, N, L] into a T5X-style batch [b * N, L] (e.g. to score them or train on them)."""
    b, n, length = out.tokens.shape
    targets = out.tokens.reshape(b * n, length)
    weights = (jnp.arange(length) < out.lengths.reshape(b * n, 1)).astype(jnp.float32)
    return {
        "encoder_input_tokens": jnp.repeat(jnp.asarray(encoder_input_tokens), n, axis=0),
        "decoder_input_tokens": shift_right(targets),
        "decoder_target_tokens": targets,
        "decoder_loss_weights": weights,
    }


# ---------------------------------------------------------------------------------------------------------
# Ragged input


def bucket_length(length: int, buckets: Sequence[int] = (16, 32, 64, 128, 256, 512)) -> int:
    """The smallest bucket >= length (so XLA compiles one program per bucket, not per length)."""
    for bucket in sorted(buckets):
        if length <= bucket:
            return bucket
    raise ValueError(f"Source length {length} exceeds the largest bucket {max(buckets)}; add a bucket.")


def pad_to_bucket(sequences: Sequence[Sequence[int]], buckets: Sequence[int] | None = None) -> np.ndarray:
    """Pads ragged token lists to int32 [len(sequences), bucket_length(longest)] with 0."""
    longest = max((len(s) for s in sequences), default=1)
    width = bucket_length(longest) if buckets is None else bucket_length(longest, buckets)
    out = np.zeros((len(sequences), width), np.int32)
    for i, seq in enumerate(sequences):
        out[i, :len(seq)] = seq
    return out
