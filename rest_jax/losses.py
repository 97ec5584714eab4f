"""Losses for supervised (BC) training and the ReST Improve step, as pure JAX functions.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2 and experiments) compares Improve losses on the
filtered Grow data: BC/NLL (the best, the default), GOLD, BVMPO and offline actor-critic (OAC); ReST-EM's reward-weighted
NLL (Singh et al. 2023) is a natural extra. Conventions are T5X's: logits [B, T, V] (float32 or wider),
`decoder_target_tokens` [B, T] int, `decoder_loss_weights` [B, T] float, 0 on padding.

`cross_entropy_loss` returns sums (T5X style) so the caller normalises per target token; `make_loss_fn` wraps it
as BC's loss on a network for `trainer.make_train_step` (gin: label smoothing, z-loss). The Improve losses
share one signature,

    loss_fn(batch, outputs, step=0) -> (scalar loss, metrics dict)

and are already normalised, because V-MPO's top-half selection and softmax weights are batch-level and do
not decompose into per-example sums. They are registered by name (`bc`, `rwbc`, `gold`, `bvmpo`, `oac`, the
preference losses `dpo` and `ipo`, plus `value` for value-network training) and every knob is gin-configurable;
`improve_step.loss_name` picks one.

Batch keys: `decoder_target_tokens`, `decoder_loss_weights`, optional `example_weights` [B] (multiplied
into the token weights; 0 drops an example, e.g. the filter mask), `reward` [B] (sequence reward R(x, y) in
[0, 1], the Grow store's field), `num_steps` [] (the run's number of updates; BVMPO anneals λ over it),
`behaviour_log_probs` [B, T] (the Grow policy's per-token log-probs; DPO/IPO, whose batches are pairs);
packed rows (bc, rwbc) add `decoder_segment_ids` and `token_rewards` [B, T].
Outputs keys: `logits` (policy), `values` [B, T] (value network), `bc_logits` [B, T, V] (the frozen BC
policy: BVMPO's KL term, GOLD's p_MLE), `old_logits` [B, T, V] (BVMPO's trust-region anchor), `vmpo_eta`
and `vmpo_alpha` (unconstrained scalars, BVMPO; see `init_vmpo_params`).
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import gin
import jax
import jax.numpy as jnp

Array = jax.Array
# The train step's loss of a network: (params, batch, dropout rng or None) -> (loss, aux metrics).
NetworkLossFn = Callable[[Any, Mapping[str, Array], Array | None], tuple[Array, dict[str, Array]]]
Metrics = dict[str, Array]
LossFn = Callable[..., tuple[Array, Metrics]]

TARGETS = "decoder_target_tokens"
WEIGHTS = "decoder_loss_weights"
EXAMPLE_WEIGHTS = "example_weights"
REWARD = "reward"
NUM_STEPS = "num_steps"
SEGMENTS = "decoder_segment_ids"  # packed rows (improve_step.pack): several examples per row
TOKEN_REWARDS = "token_rewards"  # [B, T] with packed rows: the reward of each token's example


# ------------------------------------------------------------------------------------------- primitives


def _wide(x: Array) -> Array:
    """At least float32 (bf16 logits are upcast; float64 stays float64 for reference tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _safe_div(num: Array, den: Array) -> Array:
    return num / jnp.where(den > 0, den, 1.0)


def _check_shapes(logits: Array, targets: Array, weights: Array | None = None) -> None:
    if logits.ndim != 3 or targets.shape != logits.shape[:2]:
        raise ValueError(f"logits must be [B, T, V] and targets [B, T]; got {logits.shape} and {targets.shape}")
    if weights is not None and weights.shape != targets.shape:
        raise ValueError(f"weights shape {weights.shape} != targets shape {targets.shape}")


def token_log_probs(logits: Array, targets: Array) -> Array:
    """log π(targets | prefix) per token, [B, T]."""
    _check_shapes(logits, targets)
    log_p = jax.nn.log_softmax(_wide(logits), axis=-1)
    return jnp.take_along_axis(log_p, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def _token_cross_entropy(logits: Array, targets: Array, label_smoothing: float, z_loss: float
                         ) -> tuple[Array, Array]:
    """Per-token T5X cross entropy (label smoothing, normalising constant, z-loss), and the z-loss part.

    With q the smoothed target and Z the softmax normaliser, -Σ_v q_v log p_v = log Z − Σ_v q_v logit_v
    because Σ_v q_v = 1, so neither the one-hot q nor log p is ever built over the vocabulary.
    """
    return _smoothed_cross_entropy(_wide(logits), targets.astype(jnp.int32), label_smoothing, z_loss)


def _smoothing_weights(vocab: int, label_smoothing: float) -> tuple[float, float, float]:
    """(weight of the target, weight of every other token, entropy of the smoothed target)."""
    confidence = 1.0 - label_smoothing
    low = label_smoothing / (vocab - 1)
    # Subtracting the entropy makes a perfect prediction cost 0 (T5X's convention).
    normalizing = -(confidence * math.log(confidence) + (vocab - 1) * low * math.log(low + 1e-20)) \
        if label_smoothing > 0 else 0.0
    return confidence, low, normalizing


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _smoothed_cross_entropy(logits: Array, targets: Array, label_smoothing: float, z_loss: float
                            ) -> tuple[Array, Array]:
    return _smoothed_cross_entropy_fwd(logits, targets, label_smoothing, z_loss)[0]


def _smoothed_cross_entropy_fwd(logits: Array, targets: Array, label_smoothing: float, z_loss: float):
    confidence, low, normalizing = _smoothing_weights(logits.shape[-1], label_smoothing)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    sum_logits = jnp.sum(logits, axis=-1) if label_smoothing > 0 else 0.0
    z = z_loss * jnp.square(log_z)
    loss = log_z - (confidence - low) * target_logit - low * sum_logits + z - normalizing
    return (loss, z), (logits, targets, log_z)


def _smoothed_cross_entropy_bwd(label_smoothing: float, z_loss: float, residuals: tuple, cotangents: tuple):
    # A hand-written backward pass: autodiff of the forward builds the one-hot target and several
    # [B, T, V] intermediates (~5% of an IWSLT-shape train step on CPU); this is one fused pass.
    logits, targets, log_z = residuals
    g_loss, g_z = cotangents
    confidence, low, _ = _smoothing_weights(logits.shape[-1], label_smoothing)
    probs = jnp.exp(logits - log_z[..., None])
    # d loss / d logits = p (1 + 2 z_loss log Z) − q; d z / d logits = 2 z_loss log Z p.
    scale = g_loss * (1.0 + 2.0 * z_loss * log_z) + g_z * 2.0 * z_loss * log_z
    is_target = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
    soft = jnp.where(is_target, confidence, low)
    grad = probs * scale[..., None] - g_loss[..., None] * soft
    return grad.astype(logits.dtype), None


_smoothed_cross_entropy.defvjp(_smoothed_cross_entropy_fwd, _smoothed_cross_entropy_bwd)


def cross_entropy_loss(
    logits: Array, targets: Array, weights: Array, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> tuple[Array, Array, Array]:
    """T5X's weighted cross entropy: returns (total_loss, total_z_loss, num_tokens), all summed.

    Per token: -Σ_v q_v log softmax(logits)_v + z_loss·log(Z)² − H(q), with q the smoothed target
    (1 − label_smoothing on the target, label_smoothing/(V − 1) elsewhere) and H(q) its entropy, so a
    perfect prediction of q costs 0. total_loss includes the z-loss; num_tokens = Σ weights. Divide by
    num_tokens for the per-token loss (supervised BC training and the `bc` Improve loss).
    """
    _check_shapes(logits, targets, weights)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    loss, z = _token_cross_entropy(logits, targets, label_smoothing, z_loss)
    weights = _wide(weights)
    return jnp.sum(loss * weights), jnp.sum(z * weights), jnp.sum(weights)


def teacher_forced_logits(model: Any, params: Any, batch: Mapping[str, Array],
                          rng: Array | None = None) -> Array:
    """Logits [b, t, vocab] of a T5X-style batch for either family (dropout when `rng` is given)."""
    return model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                       encoder_segment_ids=batch.get("encoder_segment_ids"),
                       decoder_segment_ids=batch.get("decoder_segment_ids"), enable_dropout=rng is not None,
                       rngs=None if rng is None else {"dropout": rng})


@gin.configurable(denylist=["model"])
def make_loss_fn(model: Any, label_smoothing: float = 0.0, z_loss: float = 1e-4) -> NetworkLossFn:
    """Token-level NLL (behaviour cloning, ReST Sec. 2) normalised per target token.

    Args:
      model: A network of `policy.build_network` (either family).
      label_smoothing: Mass spread over the other tokens (T5X convention: a perfect prediction of the
        smoothed target costs 0).
      z_loss: Coefficient of log(Z)^2, which keeps the softmax normaliser near 1 (T5X default 1e-4).

    Returns:
      `loss_fn(params, batch, rng) -> (loss, aux)`, aux holding z_loss, accuracy and num_tokens.
    """
    def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array | None) -> tuple[Array, dict[str, Array]]:
        logits = teacher_forced_logits(model, params, batch, rng)
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        total, total_z, num_tokens = cross_entropy_loss(logits, targets, weights, label_smoothing, z_loss)
        denom = jnp.maximum(num_tokens, 1.0)
        # "Target logit is the largest" rather than argmax: the same except for exact ties, and XLA CPU
        # lowers argmax over a 32k vocabulary to a slow (value, index) reduction (~5% of a step).
        target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        correct = jnp.sum((target_logits >= jnp.max(logits, axis=-1)) * weights)
        return total / denom, {"z_loss": total_z / denom, "accuracy": correct / denom, "num_tokens": num_tokens}

    return loss_fn


def monte_carlo_returns(rewards: Array, weights: Array, discount: float = 1.0) -> Array:
    """Per-token Monte-Carlo return of a terminal sequence reward: G_t = discount^(#valid tokens after t)·R.

    The reward arrives at the last non-padding token, so with discount 1 (the default) every token's
    return is R (REST.md "BVMPO": the value net predicts this per token). Padding positions get 0.
    """
    mask = (weights > 0).astype(_wide(rewards).dtype)
    return mask * jnp.power(discount, _tokens_after(mask)) * _wide(rewards)[:, None]


def _tokens_after(mask: Array) -> Array:
    """Valid tokens strictly after each position, [B, T]."""
    return jnp.flip(jnp.cumsum(jnp.flip(mask, -1), -1), -1) - mask


def kl_divergence(p_logits: Array, q_logits: Array) -> Array:
    """KL(p ‖ q) = Σ_v p_v (log p_v − log q_v) per token, [B, T]."""
    log_p = jax.nn.log_softmax(_wide(p_logits), -1)
    log_q = jax.nn.log_softmax(_wide(q_logits), -1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)


def _mean_over_tokens(x: Array, weights: Array) -> Array:
    return _safe_div(jnp.sum(x * weights), jnp.sum(weights))


# ----------------------------------------------------------------------------------------------- registry

_LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Registers an Improve loss `fn(batch, outputs, step=0, **knobs) -> (loss, metrics)` under `name`."""

    def decorator(fn: LossFn) -> LossFn:
        if name in _LOSSES and _LOSSES[name] is not fn:
            raise ValueError(f"loss {name!r} is already registered")
        _LOSSES[name] = fn
        return fn

    return decorator


def loss_names() -> list[str]:
    return sorted(_LOSSES)


def get_loss(name: str) -> LossFn:
    """The loss registered as `name`; KeyError with close matches and all names otherwise."""
    if name not in _LOSSES:
        close = difflib.get_close_matches(str(name), loss_names(), n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown Improve loss {name!r}.{hint} Known losses: {loss_names()}")
    return _LOSSES[name]


def _need(mapping: Mapping[str, Any], key: str, loss: str, where: str, what: str) -> Array:
    if key not in mapping:
        raise KeyError(f"loss {loss!r} needs {where}[{key!r}] ({what}); {where} has keys {sorted(mapping)}")
    return mapping[key]


def _targets_and_weights(batch: Mapping[str, Array], loss: str) -> tuple[Array, Array]:
    targets = _need(batch, TARGETS, loss, "batch", "[B, T] int target ids")
    weights = _wide(jnp.asarray(_need(batch, WEIGHTS, loss, "batch", "[B, T] float, 0 on padding")))
    if EXAMPLE_WEIGHTS in batch:
        weights = weights * _wide(jnp.asarray(batch[EXAMPLE_WEIGHTS]))[:, None]
    return targets, weights


def _reward(batch: Mapping[str, Array], loss: str) -> Array:
    return _wide(jnp.asarray(_need(batch, REWARD, loss, "batch", "[B] sequence reward R(x, y) in [0, 1]")))


# ------------------------------------------------------------------------------------------ Improve losses


@register_loss("bc")
@gin.configurable(denylist=["batch", "outputs", "step"])
def bc_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
            label_smoothing: float = 0.0, z_loss: float = 0.0) -> tuple[Array, Metrics]:
    """Token NLL on the filtered data (ReST Sec. 2 'behaviour cloning'), per target token.

    Dropped examples have zero weight (`decoder_loss_weights` or `example_weights`).
    """
    del step
    targets, weights = _targets_and_weights(batch, "bc")
    logits = _need(outputs, "logits", "bc", "outputs", "[B, T, V] policy logits")
    total, total_z, num = cross_entropy_loss(logits, targets, weights, label_smoothing, z_loss)
    loss = _safe_div(total, num)
    return loss, {"loss": loss, "z_loss": _safe_div(total_z, num), "num_tokens": num}


@register_loss("rwbc")
@gin.configurable(denylist=["batch", "outputs", "step"])
def rwbc_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
              weighting: str = "normalized", beta: float = 1.0, label_smoothing: float = 0.0
              ) -> tuple[Array, Metrics]:
    """Reward-weighted NLL: Σ_{b,t} c_b w_bt NLL_bt / Σ w_bt, c_b from the sequence reward r_b.

    weighting: "raw" c = r; "normalized" c = r / mean(r); "exp" c = exp(r/β) / mean(exp(r/β)) (reward-
    weighted regression). Means run over the batch's examples with any weight, so the loss scale stays
    that of BC. This is ReST-EM's M-step with a non-binary reward (Singh et al. 2023, arXiv 2312.06585).
    Packed rows (`decoder_segment_ids`, improve_step.pack) carry each token's example reward in
    `token_rewards` [B, T]; an example is then a segment.
    """
    del step
    targets, weights = _targets_and_weights(batch, "rwbc")
    logits = _need(outputs, "logits", "rwbc", "outputs", "[B, T, V] policy logits")
    _check_shapes(logits, targets, weights)
    if SEGMENTS in batch:  # r per token; an example's first token counts it once in the means
        r = _wide(jnp.asarray(_need(batch, TOKEN_REWARDS, "rwbc", "batch", "[B, T] reward of each token's example")))
        segments = jnp.asarray(batch[SEGMENTS])
        first = (segments > 0) & (segments != jnp.pad(segments[:, :-1], ((0, 0), (1, 0))))
        counted = (first & (weights > 0)).astype(r.dtype)
    else:
        r = _reward(batch, "rwbc")[:, None]
        counted = (jnp.sum(weights, -1, keepdims=True) > 0).astype(r.dtype)
    num = jnp.sum(counted)
    if weighting == "raw":
        c = r
    elif weighting == "normalized":
        total = jnp.sum(r * counted)
        c = r / jnp.where(total > 0, _safe_div(total, num), 1.0)
    elif weighting == "exp":
        if beta <= 0:
            raise ValueError(f"rwbc_loss.beta must be > 0, got {beta}")
        shifted = (r - jnp.max(jnp.where(counted > 0, r, -jnp.inf))) / beta  # Max-shift for stability.
        e = jnp.exp(jnp.minimum(shifted, 0.0))
        c = _safe_div(e, _safe_div(jnp.sum(e * counted), num))
    else:
        raise ValueError(f"rwbc_loss.weighting must be 'raw', 'normalized' or 'exp', got {weighting!r}")
    nll, _ = _token_cross_entropy(logits, targets, label_smoothing, 0.0)
    c = jax.lax.stop_gradient(c)
    loss = _safe_div(jnp.sum(c * weights * nll), jnp.sum(weights))
    return loss, {"loss": loss, "mean_example_weight": _safe_div(jnp.sum(c * counted), num),
                  "num_tokens": jnp.sum(weights)}


def truncated_returns(per_token_rewards: Array, mask: Array, horizon: int, discount: float = 1.0) -> Array:
    """Q̂_t = Σ_{j=0..horizon} discount^j r_{t+j}, rewards past the sequence end counted as 0."""
    r = per_token_rewards * mask
    q = jnp.zeros_like(r)
    for j in range(min(horizon + 1, r.shape[1])):
        shifted = jnp.pad(r[:, j:], ((0, 0), (0, j)))
        q = q + (discount ** j) * shifted
    return q * mask


@register_loss("gold")
@gin.configurable(denylist=["batch", "outputs", "step"])
def gold_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
              reward_type: str = "prob", horizon: int = 5, discount: float = 1.0,
              importance_floor: float = 0.2, reward_floor: float = 0.1, log_prob_baseline: float = -10.0,
              mle_logits_key: str = "bc_logits", importance_logits_key: str | None = None
              ) -> tuple[Array, Metrics]:
    """GOLD (Pang & He 2021, arXiv 2009.07839, Alg. 1), an off-policy PG baseline of ReST's experiments.

    loss = −Σ_{b,t} w_bt · ŵ_bt · Q̂_bt · log π_θ(a_t | s_t) / Σ w_bt, with
      ŵ_t = clip(stop_grad(π̃(a_t | s_t)), importance_floor, 1): per-token importance weight; π̃ is the
        policy itself (REST.md) or, when `importance_logits_key` names an outputs entry, a lagged copy as
        in GOLD's Alg. 1;
      r_t from the MLE model's log-prob ℓ_t = log p_MLE(a_t | s_t), p_MLE = softmax(outputs[mle_logits_key]),
        the frozen BC policy at every Grow step (GOLD's p_MLE is the MLE model, not the policy that sampled):
        "prob" (GOLD-p): r_t = max(exp ℓ_t, reward_floor);
        "log_prob" (GOLD-s): r_t = max(ℓ_t − log_prob_baseline, reward_floor);
      Q̂_t = Σ_{j=0..horizon} discount^j r_{t+j}: the current token plus `horizon` = 5 future ones, as in
        the authors' code (github.com/yzpang/gold-off-policy-text-gen-iclr21, criterion, suffix of 5);
        there, positions past the row end count as probability 1; here tokens after EOS add 0.
    Defaults (GOLD-p, u = 0.2, floor 0.1) are the authors' IWSLT14 De-En script's settings. The Grow store's
    `behaviour_logprobs` are not used: from Grow 2 on they are a ReST policy's, and they are taken at the
    sampling temperature.
    """
    del step
    targets, weights = _targets_and_weights(batch, "gold")
    logits = _need(outputs, "logits", "gold", "outputs", "[B, T, V] policy logits")
    mle_logits = _need(outputs, mle_logits_key, "gold", "outputs", "[B, T, V] logits of the frozen MLE (BC) policy")
    _check_shapes(logits, targets, weights)
    mle = jax.lax.stop_gradient(token_log_probs(mle_logits, targets))
    log_pi = token_log_probs(logits, targets)
    if importance_logits_key is None:
        pi_tilde = jnp.exp(log_pi)
    else:
        pi_tilde = jnp.exp(token_log_probs(
            _need(outputs, importance_logits_key, "gold", "outputs", "[B, T, V] lagged policy logits"), targets))
    iw = jax.lax.stop_gradient(jnp.clip(pi_tilde, importance_floor, 1.0))
    if reward_type == "prob":
        r = jnp.exp(mle)
    elif reward_type == "log_prob":
        r = mle - log_prob_baseline
    else:
        raise ValueError(f"gold_loss.reward_type must be 'prob' or 'log_prob', got {reward_type!r}")
    mask = (weights > 0).astype(r.dtype)
    q = jax.lax.stop_gradient(truncated_returns(jnp.maximum(r, reward_floor), mask, horizon, discount))
    loss = -_mean_over_tokens(iw * q * log_pi, weights)
    return loss, {"loss": loss, "importance_weight": _mean_over_tokens(iw, weights),
                  "return": _mean_over_tokens(q, weights), "num_tokens": jnp.sum(weights)}


@gin.configurable(denylist=["step", "num_steps"])
def bc_kl_weight(step: Array | int, num_steps: Array | int | None = None, start: float = 1.0, end: float = 1e-5,
                 decay_steps: int | None = None) -> Array:
    """λ(step) of BVMPO's λ·KL(π_BC ‖ π): geometric from `start` to `end` over `decay_steps`, then `end`.

    REST.md: λ annealed from 1 to 1e-5; the shape (log-linear) is a choice, so each decade takes equal steps.
    `decay_steps` None anneals over the run's `num_steps` (an Improve step's length, passed by the loss from
    `batch['num_steps']`), or 10,000 updates when that is unknown too.
    """
    horizon = decay_steps if decay_steps is not None else (10_000 if num_steps is None else num_steps)
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / jnp.maximum(jnp.asarray(horizon, jnp.float32), 1.0), 0.0, 1.0)
    return start * jnp.power(end / start, frac)


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def init_vmpo_params(eta: float = 1.0, alpha: float = 1.0) -> dict[str, Array]:
    """Trainable V-MPO Lagrange multipliers as unconstrained scalars; η = softplus(vmpo_eta) + 1e-8."""
    return {"vmpo_eta": jnp.asarray(_inverse_softplus(eta), jnp.float32),
            "vmpo_alpha": jnp.asarray(_inverse_softplus(alpha), jnp.float32)}


def _top_fraction_mask(advantages: Array, mask: Array, fraction: float) -> Array:
    """The ceil(fraction·n) largest advantages among the n valid tokens (ties: earlier flat index first)."""
    flat = jnp.where(mask > 0, advantages, -jnp.inf).reshape(-1)
    valid = (mask > 0).reshape(-1)
    k = jnp.ceil(fraction * jnp.sum(valid)).astype(jnp.int32)
    order = jnp.argsort(-flat, stable=True)
    rank = jnp.zeros_like(order).at[order].set(jnp.arange(flat.size, dtype=order.dtype))
    return (valid & (rank < k)).reshape(mask.shape)


def value_loss(values: Array, rewards: Array, weights: Array, discount: float = 1.0) -> Array:
    """MSE of the value net against the per-token Monte-Carlo return, over non-padding tokens.

    Behaviour value estimation (REST.md "BVMPO"): trained on Grow data, V(s_t) ≈ E[G_t] under the policy that
    generated it. Weighted mean Σ w (V − G)² / Σ w.
    """
    returns = monte_carlo_returns(rewards, weights, discount)
    return _mean_over_tokens(jnp.square(_wide(values) - returns), _wide(weights))


@register_loss("value")
@gin.configurable(denylist=["batch", "outputs", "step"])
def value_net_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
                   discount: float = 1.0) -> tuple[Array, Metrics]:
    """Registry form of `value_loss`, for pre-training the value network on a Grow store."""
    del step
    _, weights = _targets_and_weights(batch, "value")
    values = _need(outputs, "values", "value", "outputs", "[B, T] value-network predictions")
    loss = value_loss(values, _reward(batch, "value"), weights, discount)
    return loss, {"loss": loss, "value_mse": loss, "num_tokens": jnp.sum(weights)}


def _advantages(batch: Mapping[str, Array], outputs: Mapping[str, Array], weights: Array, loss: str,
                discount: float) -> tuple[Array, Array]:
    values = _wide(jnp.asarray(_need(outputs, "values", loss, "outputs", "[B, T] value-network predictions")))
    if values.shape != weights.shape:
        raise ValueError(f"{loss}: outputs['values'] shape {values.shape} != weights shape {weights.shape}")
    returns = monte_carlo_returns(_reward(batch, loss), weights, discount)
    return jax.lax.stop_gradient(returns - values), values


@register_loss("bvmpo")
@gin.configurable(denylist=["batch", "outputs", "step"])
def bvmpo_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
               eps_eta: float = 0.01, eps_alpha: float = 0.01, top_fraction: float = 0.5,
               discount: float = 1.0, trust_region_key: str = "old_logits", bc_logits_key: str = "bc_logits",
               value_loss_coef: float = 1.0, min_multiplier: float = 1e-8) -> tuple[Array, Metrics]:
    """Behaviour V-MPO (V-MPO: Song et al. 2019, arXiv 1909.12238; ReST's 'BVMPO').

    Per valid token t: A_t = G_t − stop_grad(V(s_t)), G_t the Monte-Carlo return (`monte_carlo_returns`).
    Keep 𝒦 = the top `top_fraction` of advantages over the batch's valid tokens (ceil; ties by position).
      L_π = −Σ_{t∈𝒦} ψ_t log π_θ(a_t|s_t),  ψ_t = exp(A_t/η̄) / Σ_{𝒦} exp(A/η̄)   (η̄ = stop_grad η)
      L_η = η ε_η + η log( (1/|𝒦|) Σ_{𝒦} exp(A/η) )
      L_α = α (ε_α − stop_grad(KL̄)) + stop_grad(α) KL̄,  KL̄ = token mean of KL(π_old ‖ π_θ)
      L_BC = λ(step) · token mean of KL(π_BC ‖ π_θ),  λ from `bc_kl_weight` (1 → 1e-5 over the Improve step)
      L_V = value_loss_coef · `value_loss` (trains the value net; its gradient reaches only `values`)
    η = softplus(outputs['vmpo_eta']) + min_multiplier, α likewise from outputs['vmpo_alpha']. π_old is
    outputs[trust_region_key] (a lagged copy of the policy, refreshed every `improve_step.anchor_period`
    updates as V-MPO refreshes its target network; or set the key to 'bc_logits').
    The value target is the Monte-Carlo return instead of V-trace: offline on one behaviour policy's data,
    V-trace with ratios clipped at 1 and λ = 1 reduces to it for the behaviour policy's own values.
    """
    targets, weights = _targets_and_weights(batch, "bvmpo")
    logits = _need(outputs, "logits", "bvmpo", "outputs", "[B, T, V] policy logits")
    _check_shapes(logits, targets, weights)
    log_pi = token_log_probs(logits, targets)
    adv, values = _advantages(batch, outputs, weights, "bvmpo", discount)
    mask = (weights > 0).astype(adv.dtype)
    kept = _top_fraction_mask(adv, mask, top_fraction)
    num_kept = jnp.sum(kept)

    eta = jax.nn.softplus(_wide(jnp.asarray(_need(outputs, "vmpo_eta", "bvmpo", "outputs",
                                                  "unconstrained temperature; see init_vmpo_params")))) \
        + min_multiplier
    alpha = jax.nn.softplus(_wide(jnp.asarray(_need(outputs, "vmpo_alpha", "bvmpo", "outputs",
                                                    "unconstrained KL multiplier; see init_vmpo_params")))) \
        + min_multiplier

    # With nothing kept (an all-padding batch) fill with 0, not -inf, so logsumexp and its gradient stay finite.
    fill = jnp.where(num_kept > 0, -jnp.inf, 0.0)

    def log_mean_exp(scaled: Array) -> Array:
        lse = jax.nn.logsumexp(jnp.where(kept, scaled, fill))
        return jnp.where(num_kept > 0, lse - jnp.log(jnp.maximum(num_kept, 1)), 0.0)

    scaled_sg = adv / jax.lax.stop_gradient(eta)
    psi = jnp.where(kept, jax.nn.softmax(jnp.where(kept, scaled_sg, fill), axis=None), 0.0)
    policy = -jnp.sum(psi * log_pi)
    temperature = eta * eps_eta + eta * log_mean_exp(adv / eta)

    old = jax.lax.stop_gradient(_need(outputs, trust_region_key, "bvmpo", "outputs",
                                      "[B, T, V] trust-region anchor policy logits"))
    kl_old = _mean_over_tokens(kl_divergence(old, logits), weights)
    trust = alpha * (eps_alpha - jax.lax.stop_gradient(kl_old)) + jax.lax.stop_gradient(alpha) * kl_old

    bc = jax.lax.stop_gradient(_need(outputs, bc_logits_key, "bvmpo", "outputs", "[B, T, V] BC policy logits"))
    kl_bc = _mean_over_tokens(kl_divergence(bc, logits), weights)
    lam = bc_kl_weight(step, batch.get(NUM_STEPS))
    v_loss = value_loss(values, _reward(batch, "bvmpo"), weights, discount)

    loss = policy + temperature + trust + lam * kl_bc + value_loss_coef * v_loss
    return loss, {"loss": loss, "policy_loss": policy, "temperature_loss": temperature, "eta": eta,
                  "alpha": alpha, "kl_old": kl_old, "kl_bc": kl_bc, "bc_kl_weight": lam, "value_mse": v_loss,
                  "kept_fraction": _safe_div(num_kept, jnp.sum(mask)),
                  "advantage": _mean_over_tokens(adv, weights), "num_tokens": jnp.sum(weights)}


@register_loss("oac")
@gin.configurable(denylist=["batch", "outputs", "step"])
def oac_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
             discount: float = 1.0, value_loss_coef: float = 1.0) -> tuple[Array, Metrics]:
    """Offline actor-critic (ReST's 'OAC'): policy gradient with A_t = G_t − V_behaviour(s_t), no V-trace.

    loss = −Σ w_t stop_grad(A_t) log π_θ(a_t|s_t) / Σ w_t + value_loss_coef · `value_loss`, V the behaviour
    value network (pre-trained with the `value` loss on the Grow data; its gradient comes only from L_V).
    """
    del step
    targets, weights = _targets_and_weights(batch, "oac")
    logits = _need(outputs, "logits", "oac", "outputs", "[B, T, V] policy logits")
    _check_shapes(logits, targets, weights)
    adv, values = _advantages(batch, outputs, weights, "oac", discount)
    policy = -_mean_over_tokens(adv * token_log_probs(logits, targets), weights)
    v_loss = value_loss(values, _reward(batch, "oac"), weights, discount)
    loss = policy + value_loss_coef * v_loss
    return loss, {"loss": loss, "policy_loss": policy, "value_mse": v_loss,
                  "advantage": _mean_over_tokens(adv, weights), "num_tokens": jnp.sum(weights)}


# ---------------------------------------------------------------------------------- preference losses

BEHAVIOUR_LOG_PROBS = "behaviour_log_probs"


def _pair_log_ratios(batch: Mapping[str, Array], outputs: Mapping[str, Array], loss: str) -> tuple[Array, Array]:
    """h_k = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)] per pair, and the pairs' mask.

    Rows 2k and 2k + 1 are pair k: the chosen (preferred) candidate y_w and the rejected y_l of one source
    (`rest_jax.improve_data.stream_batches` with a `Pairing`; interleaved, so any even block of rows, e.g. one
    process's share, holds whole pairs); π_ref is the policy that grew the data, whose per-token
    log-probabilities the Grow store holds (`batch['behaviour_log_probs']` [B, T], untempered). Sums run over
    the tokens with weight, so a trimmed candidate counts the same tokens under both policies.
    """
    targets, weights = _targets_and_weights(batch, loss)
    logits = _need(outputs, "logits", loss, "outputs", "[B, T, V] policy logits")
    _check_shapes(logits, targets, weights)
    ref = _wide(jnp.asarray(_need(batch, BEHAVIOUR_LOG_PROBS, loss, "batch",
                                  "[B, T] per-token log-probs of the policy that grew the data")))
    if targets.shape[0] % 2:
        raise ValueError(f"loss {loss!r} takes pairs (chosen, rejected rows interleaved); got {targets.shape[0]} rows.")
    mask = (weights > 0).astype(ref.dtype)
    ratio = jnp.sum((token_log_probs(logits, targets) - ref) * mask, -1).reshape(-1, 2)
    present = jnp.all(jnp.sum(mask, -1).reshape(-1, 2) > 0, -1)
    return ratio[:, 0] - ratio[:, 1], present.astype(ref.dtype)


def _pair_metrics(h: Array, present: Array, loss: Array, weights: Array) -> Metrics:
    n = jnp.sum(present)
    return {"loss": loss, "log_ratio_margin": _safe_div(jnp.sum(h * present), n),
            "pair_accuracy": _safe_div(jnp.sum((h > 0) * present), n), "num_pairs": n,
            "num_tokens": jnp.sum(weights)}


@register_loss("dpo")
@gin.configurable(denylist=["batch", "outputs", "step"])
def dpo_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
             beta: float = 0.1, label_smoothing: float = 0.0) -> tuple[Array, Metrics]:
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7) on pairs of Grow samples of one source.

    loss = −mean_k [(1 − ε) log σ(β h_k) + ε log σ(−β h_k)], h_k the log-ratio margin of `_pair_log_ratios`
    (reference: the policy that grew the data); ε = `label_smoothing` is conservative DPO's assumed rate of
    flipped preferences (0: plain DPO).
    """
    del step
    if beta <= 0 or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: beta must be > 0 and label_smoothing in [0, 0.5); got {beta}, {label_smoothing}")
    h, present = _pair_log_ratios(batch, outputs, "dpo")
    per_pair = -((1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h)
                 + label_smoothing * jax.nn.log_sigmoid(-beta * h))
    loss = _safe_div(jnp.sum(per_pair * present), jnp.sum(present))
    return loss, _pair_metrics(h, present, loss, batch[WEIGHTS])


@register_loss("ipo")
@gin.configurable(denylist=["batch", "outputs", "step"])
def ipo_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
             tau: float = 0.1) -> tuple[Array, Metrics]:
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): mean_k (h_k − 1/(2τ))², h_k as for DPO.

    The squared loss pulls the margin to 1/(2τ) instead of pushing it to infinity, so it does not overfit
    deterministic preferences (a Grow source's best sample beats its worst by construction).
    """
    del step
    if tau <= 0:
        raise ValueError(f"ipo_loss.tau must be > 0, got {tau}")
    h, present = _pair_log_ratios(batch, outputs, "ipo")
    loss = _safe_div(jnp.sum(jnp.square(h - 1.0 / (2.0 * tau)) * present), jnp.sum(present))
    return loss, _pair_metrics(h, present, loss, batch[WEIGHTS])


def make_value_loss_fn(value_model: Any, loss: Any = None) -> Any:
    """`(params, batch, rng) -> (loss, aux)` for `trainer.make_train_step`: training a `model.heads.ValueNetwork`.

    Behaviour value estimation (ReST Sec. 5, BVMPO/OAC): regress V(s_t) on the Monte-Carlo return of the
    sequence reward over Grow data. `batch` holds T5X's features plus `reward` [B] (the Grow store's field);
    `loss` is a loss of this module taking `outputs['values']`, by default the registered 'value' loss.
    """
    loss = loss if loss is not None else get_loss("value")

    def loss_fn(params: Any, batch: Mapping[str, Array], rng: Array | None):
        values = value_model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                   enable_dropout=rng is not None, rngs=None if rng is None else {"dropout": rng})
        value, metrics = loss(batch, {"values": values})
        metrics = dict(metrics)
        metrics.pop("loss", None)
        return value, metrics

    return loss_fn


# ------------------------------------------------------------------------------------------------ online RL
# The online baselines ReST is measured against (ReST Sec. 5: online PPO): PPO with a value network and GAE,
# and the group-relative variants without one (GRPO, RLOO). `rest_jax.online` computes the advantages once
# per batch of fresh samples and then takes several updates of `policy_gradient_loss` on them.

ADVANTAGES = "advantages"
RETURNS = "returns"
OLD_VALUES = "old_values"
REFERENCE_LOG_PROBS = "reference_log_probs"
KL_COEF = "kl_coef"
GROUP_ESTIMATORS = ("grpo", "rloo")


def terminal_rewards(rewards: Array, weights: Array) -> Array:
    """[B, T]: the sequence reward R(x, y) at each row's last non-padding token, 0 elsewhere."""
    mask = (weights > 0).astype(_wide(rewards).dtype)
    return mask * (_tokens_after(mask) == 0) * _wide(rewards)[:, None]


def generalized_advantages(rewards: Array, values: Array, weights: Array, discount: float = 1.0,
                           lam: float = 0.95) -> tuple[Array, Array]:
    """GAE (Schulman et al. 2016, arXiv 1506.02438, Eq. 16) over each row's tokens: (advantages, returns).

    δ_t = r_t + γ V(s_{t+1}) − V(s_t), Â_t = Σ_l (γλ)^l δ_{t+l}, the value after the last token being 0 (the
    translation is over); returns = Â + V are the value network's targets. λ = 1 gives the Monte-Carlo
    return minus V. `rewards`, `values`, `weights` are [B, T]; padding positions get 0.
    """
    mask = (weights > 0).astype(_wide(values).dtype)
    v = _wide(values) * mask
    next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))
    delta = (_wide(rewards) + discount * next_v - v) * mask

    def back(carry: Array, x: tuple[Array, Array]) -> tuple[Array, Array]:
        d, m = x
        a = (d + discount * lam * carry) * m
        return a, a

    _, adv = jax.lax.scan(back, jnp.zeros_like(v[:, 0]), (delta.T, mask.T), reverse=True)
    adv = adv.T
    return adv, (adv + v) * mask


def group_advantages(rewards: Array, group_size: int, estimator: str = "grpo", eps: float = 1e-4) -> Array:
    """Per-sequence advantages with the other samples of the same source as the baseline, [B].

    Rows come in groups of `group_size` consecutive samples of one source (as `Policy.generate` orders them).
    'grpo' (Shao et al. 2024, arXiv 2402.03300, Sec. 4.1.2): (r − mean_group) / (std_group + eps), std with
    Bessel's correction as TRL computes it; 'rloo' (Ahmadian et al. 2024, arXiv 2402.14740): r minus the mean
    of the group's other samples.
    """
    if estimator not in GROUP_ESTIMATORS:
        raise ValueError(f"group_advantages: estimator must be one of {GROUP_ESTIMATORS}, got {estimator!r}")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"group_advantages needs groups of >= 2 samples dividing the batch; got group_size="
                         f"{group_size} for {rewards.shape[0]} rows.")
    r = _wide(rewards).reshape(-1, group_size)
    mean = jnp.mean(r, -1, keepdims=True)
    if estimator == "rloo":
        adv = (r - mean) * group_size / (group_size - 1)  # = r_i − mean_{j≠i} r_j
    else:
        adv = (r - mean) / (jnp.std(r, -1, keepdims=True, ddof=1) + eps)
    return adv.reshape(-1)


def whiten(x: Array, weights: Array, eps: float = 1e-8) -> Array:
    """(x − mean) / std over the positions with weight (PPO's advantage normalisation); 0 elsewhere."""
    mask = (weights > 0).astype(_wide(x).dtype)
    mean = _mean_over_tokens(x, mask)
    var = _mean_over_tokens(jnp.square(x - mean), mask)
    return (x - mean) * jax.lax.rsqrt(var + eps) * mask


def k3_kl(log_probs: Array, reference_log_probs: Array) -> Array:
    """Per-token unbiased, non-negative estimate of KL(π ‖ π_ref) from π's own samples (Schulman's k3):
    exp(log π_ref − log π) − (log π_ref − log π) − 1."""
    d = _wide(reference_log_probs) - _wide(log_probs)
    return jnp.exp(d) - d - 1.0


@gin.configurable(denylist=["batch", "outputs", "step"])
def policy_gradient_loss(batch: Mapping[str, Array], outputs: Mapping[str, Array], step: Array | int = 0,
                         clip_epsilon: float = 0.2, value_coef: float = 0.5, value_clip: float | None = 0.2
                         ) -> tuple[Array, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv 1707.06347, Eq. 7) per token, plus what applies.

    loss = mean_t −min(ρ_t Â_t, clip(ρ_t, 1 ± ε) Â_t)            ρ_t = π(a_t|s_t) / π_old(a_t|s_t)
         + β · mean_t k3(π, π_BC)         when the batch has `reference_log_probs` (GRPO's KL in the loss)
         + c_V · mean_t ½ max((V − G)², (V_clip − G)²)   when `outputs` has `values` (PPO's value network),
    means over all the batch's tokens with weight (token-level, as DAPO and Dr. GRPO recommend).

    Batch: `decoder_target_tokens`, `decoder_loss_weights`, `behaviour_log_probs` [B, T] (π_old at sampling),
    `advantages` [B, T]; optional `reference_log_probs` [B, T] with `kl_coef` [] (β), `returns` [B, T] with
    `old_values` [B, T] (G and the values at sampling; V_clip = V_old + clip(V − V_old, ±value_clip)).
    """
    del step
    name = "policy_gradient"
    targets, weights = _targets_and_weights(batch, name)
    logits = _need(outputs, "logits", name, "outputs", "[B, T, V] policy logits")
    _check_shapes(logits, targets, weights)
    old = _wide(jnp.asarray(_need(batch, BEHAVIOUR_LOG_PROBS, name, "batch", "[B, T] log-probs at sampling")))
    adv = _wide(jnp.asarray(_need(batch, ADVANTAGES, name, "batch", "[B, T] advantages")))
    log_probs = token_log_probs(logits, targets)
    ratio = jnp.exp(log_probs - old)
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_epsilon, 1.0 + clip_epsilon) * adv)
    policy = -_mean_over_tokens(surrogate, weights)
    loss = policy
    metrics: Metrics = {
        "policy_loss": policy,
        "clip_fraction": _mean_over_tokens((jnp.abs(ratio - 1.0) > clip_epsilon).astype(ratio.dtype), weights),
        "approx_kl_to_old": _mean_over_tokens(old - log_probs, weights),
        "num_tokens": jnp.sum(weights)}
    if REFERENCE_LOG_PROBS in batch:
        kl = _mean_over_tokens(k3_kl(log_probs, batch[REFERENCE_LOG_PROBS]), weights)
        loss = loss + _wide(jnp.asarray(_need(batch, KL_COEF, name, "batch", "[] KL coefficient β"))) * kl
        metrics["kl_to_reference"] = kl
    if "values" in outputs:
        values = _wide(outputs["values"])
        returns = _wide(jnp.asarray(_need(batch, RETURNS, name, "batch", "[B, T] value targets")))
        err = jnp.square(values - returns)
        if value_clip is not None:
            old_values = _wide(jnp.asarray(_need(batch, OLD_VALUES, name, "batch", "[B, T] values at sampling")))
            clipped = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
            err = jnp.maximum(err, jnp.square(clipped - returns))
        v_loss = 0.5 * _mean_over_tokens(err, weights)
        loss = loss + value_coef * v_loss
        metrics["value_loss"] = v_loss
    metrics["loss"] = loss
    return loss, metrics
