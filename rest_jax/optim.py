"""Optimizers and learning-rate schedules (optax), configured from gin as in T5X.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) trains the behaviour-cloning policy with a
standard supervised recipe and then fine-tunes it in every Improve step "with a lower learning rate
than the step before"; `lr_scale` is that per-step decay (the Improve loop passes decay**i).

Defaults follow T5X: Adafactor with factored second moments, decay rate 0.8, update clipping 1.0,
parameter-scale-relative steps and no momentum (t5x/adafactor.py), under the schedule
`base / sqrt(max(step, warmup_steps))` (T5X's 'constant * rsqrt_decay' with base 1.0).

Typical use::

    optimizer = create_optimizer()            # gin picks adafactor/adamw, schedule, clipping
    opt_state = optimizer.init(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    lr = optimizer.learning_rate_at(opt_state)   # the rate the last update used
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import gin
import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]

SCHEDULES = ("rsqrt", "linear", "cosine", "constant")


@gin.configurable
def learning_rate_schedule(name: str = "rsqrt", base_learning_rate: float = 1.0, warmup_steps: int = 10_000,
                           total_steps: int | None = None, final_ratio: float = 0.0,
                           rsqrt_linear_warmup: bool = False) -> Schedule:
    """Learning rate as a function of the update count (0 for the first update).

    Args:
      name: 'rsqrt': T5X's `base / sqrt(max(step, warmup_steps))`, flat during warm-up (with
        `rsqrt_linear_warmup` also multiplied by `min(1, step / warmup_steps)`, T5X's 'linear_warmup'
        factor); 'linear': linear warm-up from 0 to `base` over `warmup_steps`, then linear decay to
        `base * final_ratio` at `total_steps`; 'cosine': the same warm-up, then cosine decay to
        `base * final_ratio` at `total_steps`; 'constant': the same warm-up, then `base`.
      base_learning_rate: Peak (or, for rsqrt, multiplier) rate. Adafactor with parameter scaling
        wants ~1.0 under rsqrt (T5X pre-training) or ~1e-3 constant (T5X fine-tuning); AdamW ~1e-3.
      warmup_steps: Warm-up length in updates (0: none).
      total_steps: End of the decay for 'linear' and 'cosine' (required for them).
      final_ratio: Rate at `total_steps` as a fraction of `base_learning_rate`.
      rsqrt_linear_warmup: See 'rsqrt'.

    Returns:
      An optax schedule.
    """
    if name not in SCHEDULES:
        raise ValueError(f"learning_rate_schedule.name={name!r}; expected one of {SCHEDULES}.")
    if warmup_steps < 0:
        raise ValueError(f"learning_rate_schedule.warmup_steps={warmup_steps} must be >= 0.")
    if name in ("linear", "cosine"):
        if total_steps is None or total_steps <= warmup_steps:
            raise ValueError(f"learning_rate_schedule(name={name!r}) needs total_steps > warmup_steps "
                             f"(got total_steps={total_steps}, warmup_steps={warmup_steps}).")
    base = float(base_learning_rate)
    warmup = int(warmup_steps)

    def warmup_factor(step: jax.Array) -> jax.Array:
        if warmup == 0:
            return jnp.ones_like(step)
        return jnp.minimum(1.0, step / warmup)

    def schedule(count: Any) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        if name == "rsqrt":
            lr = base / jnp.sqrt(jnp.maximum(step, max(warmup, 1)))
            return lr * warmup_factor(step) if rsqrt_linear_warmup else lr
        if name == "constant":
            return base * warmup_factor(step)
        progress = jnp.clip((step - warmup) / (total_steps - warmup), 0.0, 1.0)
        if name == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + jnp.cos(math.pi * progress))
        decayed = base * (final_ratio + (1.0 - final_ratio) * shape)
        return jnp.where(step < warmup, base * warmup_factor(step), decayed)

    return schedule


@gin.configurable
def adafactor(learning_rate: Schedule, decay_rate: float = 0.8, clipping_threshold: float | None = 1.0,
              multiply_by_parameter_scale: bool = True, momentum: float | None = None,
              factored: bool = True, min_dim_size_to_factor: int = 128, epsilon1: float = 1e-30,
              weight_decay_rate: float | None = None) -> optax.GradientTransformation:
    """Adafactor (Shazeer & Stern 2018) with T5X's defaults (t5x/adafactor.py `Adafactor.__init__`).

    Second-moment decay is `1 - (t + 1)^-decay_rate`; updates are clipped to block RMS
    `clipping_threshold` and, with `multiply_by_parameter_scale`, scaled by max(1e-3, RMS(param)).
    Differences from T5X: factoring uses optax's heuristic (the two largest dimensions) rather than
    T5X's logical factor rules; identical for the 2-D kernels of `rest_jax.model.t5`.
    """
    return optax.adafactor(learning_rate=learning_rate, min_dim_size_to_factor=min_dim_size_to_factor,
                           decay_rate=decay_rate, multiply_by_parameter_scale=multiply_by_parameter_scale,
                           clipping_threshold=clipping_threshold, momentum=momentum,
                           weight_decay_rate=weight_decay_rate, eps=epsilon1, factored=factored)


def _matrices_only(params: Any) -> Any:
    # Weight decay on RMSNorm scales pulls them towards 0, i.e. shrinks whole activations; the usual
    # practice (and HF's Trainer) decays only weight matrices.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


@gin.configurable
def adamw(learning_rate: Schedule, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.01, decay_matrices_only: bool = True) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019); decay is scaled by the learning rate, as in PyTorch."""
    mask = _matrices_only if decay_matrices_only else None
    return optax.adamw(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                       mask=mask)


_OPTIMIZERS = {"adafactor": adafactor, "adamw": adamw}


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optax transformation plus the (scaled) schedule it follows, so the loop can log the rate."""

    tx: optax.GradientTransformation
    schedule: Schedule

    def init(self, params: Any) -> Any:
        return self.tx.init(params)

    def update(self, grads: Any, opt_state: Any, params: Any = None) -> tuple[Any, Any]:
        return self.tx.update(grads, opt_state, params)

    def learning_rate_at(self, opt_state: Any) -> jax.Array:
        """The rate the next update will use: the schedule at the optimizer's own update count."""
        is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
        counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=is_sched) if is_sched(s)]
        if not counts:
            raise ValueError("Optimizer state holds no schedule count (optax.ScaleByScheduleState).")
        return self.schedule(counts[0])


@gin.configurable(denylist=["lr_scale"])
def create_optimizer(optimizer: str | Callable[..., optax.GradientTransformation] = "adafactor",
                     schedule: Schedule | None = None, lr_scale: float = 1.0,
                     max_grad_norm: float | None = None) -> Optimizer:
    """The training optimizer: optional global-norm clipping, then `optimizer` under `schedule`.

    Args:
      optimizer: 'adafactor', 'adamw', or a factory taking `learning_rate=` (gin: `@adamw`).
      schedule: Learning-rate schedule; `learning_rate_schedule()` (gin-configured) by default.
      lr_scale: Multiplies the whole schedule. ReST decays it per Improve step (Sec. 2: each Improve
        step fine-tunes "with a lower learning rate").
      max_grad_norm: Clip gradients to this global norm before the optimizer (None: no clipping;
        Adafactor already clips its updates by block RMS).

    Returns:
      An `Optimizer`.
    """
    if isinstance(optimizer, str):
        if optimizer not in _OPTIMIZERS:
            raise ValueError(f"create_optimizer.optimizer={optimizer!r}; expected one of {sorted(_OPTIMIZERS)} "
                             "or a callable taking learning_rate=.")
        optimizer = _OPTIMIZERS[optimizer]
    if lr_scale <= 0:
        raise ValueError(f"lr_scale={lr_scale} must be positive.")
    base_schedule = schedule if schedule is not None else learning_rate_schedule()
    scaled = base_schedule if lr_scale == 1.0 else (lambda count: lr_scale * base_schedule(count))
    tx = optimizer(learning_rate=scaled)
    if max_grad_norm is not None:
        if max_grad_norm <= 0:
            raise ValueError(f"create_optimizer.max_grad_norm={max_grad_norm} must be positive or None.")
        tx = optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)
    return Optimizer(tx=tx, schedule=scaled)
