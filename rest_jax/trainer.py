"""The train state, one sharded train step, and a small loop with hooks, shared by BC, Improve and reward models.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) first trains the policy by behaviour cloning (token-level
NLL on the parallel data) and then, in every Improve step, fine-tunes it on filtered Grow data with the same
machinery and a different loss. Every trainer here is `train_loop` over `make_train_step`, with its own hooks:

    state, shardings = init_train_state(model, optimizer, rng, mesh)
    step = make_train_step(optimizer, loss_fn, mesh=mesh, state_shardings=shardings)
    state, summary = train_loop(state, batches, step, num_steps, hooks=[
        LogMetrics(writer, period=50), Evaluate(eval_fn, period=1000), Checkpoint(manager)])

The loop owns what every trainer needs (the data, the progress bar, throughput, the non-finite-update policy) and
raises typed errors (`NonFiniteLossError`, `OutOfMemoryError`) that name the step; callers add their own knob
names and restart point (`error_advice`). Hooks do the rest, in the order given, after every update and at the
end: `LogMetrics` (averages, MFU, TensorBoard), `Evaluate` (periodic evaluation, early stopping, best step),
`Checkpoint` (periodic and final saves), `Every` (any periodic action, e.g. refreshing BVMPO's anchor).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax
import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from rest_jax import checkpoints as ckpt_lib
from rest_jax import metrics as metrics_lib
from rest_jax import optim
from rest_jax import partitioning

PyTree = Any
Batch = Mapping[str, Any]
LossFn = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
EvalFn = Callable[["TrainState", int], Mapping[str, float]]

TOKEN_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                  "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids")


class _Advisable:
    """An error whose message a caller can extend with its own knobs (`with_advice`); `step` is where it happened."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        # Read through attributes: gin re-raises errors from configurables as a proxy of another class.
        self.message, self.step, self.kind = message, step, type(self)

    def with_advice(self, advice: str):
        return self.kind(f"{self.message} {advice}", self.step)


class NonFiniteLossError(_Advisable, FloatingPointError):
    """The loss or gradient became NaN/inf; the message names the step (callers add the last good checkpoint)."""


class OutOfMemoryError(_Advisable, MemoryError):
    """A train step did not fit in device memory; callers add the gin knobs to lower (`error_advice`)."""


@contextlib.contextmanager
def error_advice(*, memory_knobs: tuple[str, str], last_checkpoint: Callable[[], str]):
    """Re-raises the loop's typed errors with a caller's knobs: (batch size, sequence lengths) and restart point."""
    try:
        yield
    except OutOfMemoryError as e:
        raise e.with_advice(f"Lower the batch size (gin: {memory_knobs[0]}) or the sequence lengths "
                            f"({memory_knobs[1]}), or shard the model over more devices "
                            "(create_mesh.mesh_shape, e.g. (-1, 2)).") from e
    except NonFiniteLossError as e:
        raise e.with_advice(f"Last good checkpoint: {last_checkpoint()}. Check the data at that step and the "
                            "learning rate, or set gin train_loop.skip_nonfinite_updates=True to skip such "
                            "updates.") from e


def describe_last_checkpoint(manager: ckpt_lib.CheckpointManager) -> str:
    """The newest intact checkpoint of `manager` (and any newer damaged ones), for an error message."""
    steps = manager.all_steps()
    if not steps:
        return f"none yet in {manager.directory}"
    # A step whose files changed since its save is not good, whatever its number.
    good, damaged = None, []
    for step in reversed(steps):
        try:
            problems = manager.find_damage(step)
        except Exception as e:  # noqa: BLE001 - the training error is the one to report
            problems = [f"unreadable ({e})"]
        if not problems:
            good = step
            break
        damaged.append(f"{manager.step_dir(step)} ({problems[0]})")
    text = f"{manager.step_dir(good)} (step {good})" if good is not None else f"none intact in {manager.directory}"
    if damaged:
        text += f"; damaged, delete before rerunning: {', '.join(damaged)}"
    return text


# ----------------------------------------------------------------------------------------------------
# State and step.
# ----------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data position (= `step`).

    Attributes:
      step: Updates taken so far (int32 scalar); also the index of the next batch in the data order.
      params: Model parameters (plain arrays, T5X names).
      opt_state: Optimizer state.
      skipped_updates: Updates skipped because the loss or gradients were not finite.
    """

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    skipped_updates: jax.Array

    @classmethod
    def create(cls, params: PyTree, optimizer: optim.Optimizer | optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                   skipped_updates=jnp.zeros((), jnp.int32))


def init_train_state(model: nn.Module, optimizer: optim.Optimizer, rng: jax.Array, mesh: Mesh | None = None,
                     rules: Any = None, input_length: int = 8, target_length: int = 8,
                     abstract_only: bool = False) -> tuple[TrainState, PyTree]:
    """A freshly initialised train state, created directly in its shards (never whole on one device).

    Args:
      model: A `rest_jax.model.t5.Transformer` (or any module with T5X's call signature).
      optimizer: From `rest_jax.optim.create_optimizer`.
      rng: Parameter-initialisation key.
      mesh, rules: Device mesh and logical axis rules (defaults: gin-configured ones).
      input_length, target_length: Example shapes for `model.init` (parameters do not depend on them).
      abstract_only: Return `jax.ShapeDtypeStruct`s with shardings instead of arrays (restore target).

    Returns:
      (state, shardings), the shardings a pytree matching the state.
    """
    def boxed_init(key: jax.Array) -> TrainState:
        enc = jnp.ones((1, input_length), jnp.int32)
        dec = jnp.ones((1, target_length), jnp.int32)
        return TrainState.create(model.init(key, enc, dec)["params"], optimizer)

    return partitioning.Partitioner.create(mesh, rules).init(boxed_init, rng, abstract_only=abstract_only)


def state_from_params(params: PyTree, optimizer: optim.Optimizer | optax.GradientTransformation, like: PyTree,
                      partitioner: partitioning.Partitioner) -> tuple[TrainState, PyTree]:
    """A train state around `params` already on the mesh (e.g. a policy to fine-tune), with (state, shardings).

    The optimizer state is sharded by the parameters' logical axes (`like`: the boxed abstract parameters).
    The state is built by a jit, so its buffers are new: donating them in the train step leaves `params`
    (and any frozen network sharing their buffers) intact.
    """
    return partitioner.init(lambda p: TrainState.create(p, optimizer), params, like=(like,))


def make_train_step(optimizer: optim.Optimizer | optax.GradientTransformation, loss_fn: LossFn, *,
                    mesh: Mesh | None = None, rules: Any = None, state_shardings: PyTree | None = None,
                    dropout_seed: int = 0, donate: bool = True) -> partitioning.Partitioned:
    """Builds the sharded train step.

    Each step: dropout key `fold_in(key(dropout_seed), step)` (so a resumed run draws the same masks),
    loss and gradients of `loss_fn`, optimizer update (clipping lives in the optimizer chain). If the
    loss or the gradient norm is not finite, the old parameters and optimizer state are kept, the
    step still advances (its batch is consumed) and `skipped_updates` counts it; `train_loop` then
    stops or carries on (gin `train_loop.skip_nonfinite_updates`).

    Args:
      optimizer: `optim.Optimizer` (its schedule gives the logged learning rate) or any optax one.
      loss_fn: `(params, batch, rng) -> (scalar loss, aux dict)`; aux may hold `num_tokens`.
      mesh, rules: When given, the step is traced and run under them (logical sharding constraints).
      state_shardings: Shardings of the state (from `init_train_state`); pins input and output layout.
      dropout_seed: Seed of the per-step dropout keys.
      donate: Donate the input state buffers (the state is updated in place).

    Returns:
      The jitted step `(state, batch) -> (state, metrics)`, traced and run under the mesh when one is given
      (`.lower()` for cost analysis).
    """
    # A stream of its own: `key(seed)` itself is what `train()` initialises the parameters with.
    base_key = jax.random.fold_in(jax.random.key(dropout_seed), 0x64726F70)
    learning_rate_at = getattr(optimizer, "learning_rate_at", None)

    def step_fn(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = jax.random.fold_in(base_key, state.step)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply_update(params, opt_state):
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt_state

        # A conditional rather than a select between old and new state: the donated buffers are then
        # updated in place, where a select makes XLA copy the whole optimizer state every step.
        new_params, new_opt_state = jax.lax.cond(finite, apply_update, lambda p, o: (p, o),
                                                 state.params, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt_state,
                               skipped_updates=state.skipped_updates + (~finite).astype(jnp.int32))
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
        metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm, nonfinite=(~finite).astype(jnp.int32),
                       skipped_updates=new_state.skipped_updates)
        if "num_tokens" not in metrics and "decoder_loss_weights" in batch:
            metrics["num_tokens"] = jnp.sum(batch["decoder_loss_weights"]).astype(jnp.float32)
        if learning_rate_at is not None:
            metrics["learning_rate"] = learning_rate_at(state.opt_state)
        return new_state, metrics

    donate_argnums = (0,) if donate else ()
    if mesh is None:
        if state_shardings is not None:
            raise ValueError("make_train_step: state_shardings need the mesh they refer to.")
        return partitioning.Partitioned(jax.jit(step_fn, donate_argnums=donate_argnums), None)
    part = partitioning.Partitioner.create(mesh, rules)
    if state_shardings is None:
        return part.partition(step_fn, donate_argnums=donate_argnums)
    return part.partition(step_fn, in_shardings=(state_shardings, None),
                          out_shardings=(state_shardings, part.replicated), donate_argnums=donate_argnums)


# ----------------------------------------------------------------------------------------------------
# The loop and its hooks.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loop:
    """What hooks see: the current state, where the loop stands, and its summary (which hooks may add to).

    A hook sets `stop` to end the loop after the current step (early stopping).
    """

    stage: str
    state: TrainState
    start: int
    num_steps: int
    step: int
    summary: dict[str, Any]
    step_time: float = 0.0
    examples: int = 0
    timed: bool = False
    stop: bool = False
    bar: Any = None


class Hook:
    """Called by `train_loop` after every update and once at the end, in the order the hooks were given."""

    def after_step(self, loop: Loop, metrics: Mapping[str, float] | None) -> None:
        """`metrics` of the update just taken, or None when it was skipped (non-finite)."""

    def at_end(self, loop: Loop) -> None:
        """After the last step (not after an error)."""

    def close(self) -> None:
        """Always, also after an error."""


class _Window:
    """Averages of step metrics and throughput over some steps (untimed steps count only for metrics)."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}
        self.tokens = self.examples = self.time = 0.0
        self.steps = 0

    def add(self, metrics: Mapping[str, Any], examples: int, dt: float, timed: bool) -> None:
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(float(v))
        if timed:
            self.steps += 1
            self.tokens += float(metrics.get("num_tokens", 0.0))
            self.examples += examples
            self.time += dt

    def scalars(self) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self.values.items()}
        if self.time > 0:
            out.update(tokens_per_sec=self.tokens / self.time, examples_per_sec=self.examples / self.time,
                       step_time_sec=self.time / self.steps)
        return out


class LogMetrics(Hook):
    """Train metrics averaged over `period` steps: TensorBoard scalars, MFU, the progress bar and the summary.

    Args:
      writer: `metrics.MetricWriter`-like (`write_scalars(step, dict)`), or None (summary and bar only).
      period: Steps between writes (and at the last step).
      flops_per_step: Model FLOPs of one step, for the MFU (`metrics.mfu`); None: no MFU.
      dtype: The model's activation dtype, whose peak the MFU is over (CPU: measured per dtype).
    """

    def __init__(self, writer: Any = None, period: int = 50, flops_per_step: float | None = None,
                 dtype: str = "float32"):
        self.writer, self.period, self.flops = writer, max(int(period), 1), flops_per_step
        self.peak = metrics_lib.peak_flops_per_device(dtype=dtype) if flops_per_step else None
        self.window = _Window()

    def after_step(self, loop: Loop, metrics: Mapping[str, float] | None) -> None:
        if metrics is not None:  # a skipped step's numbers would poison the averages
            self.window.add(metrics, loop.examples, loop.step_time, loop.timed)
        if loop.step % self.period == 0 or loop.step == loop.num_steps:
            self._flush(loop)

    def at_end(self, loop: Loop) -> None:
        self._flush(loop)  # what is left after an early stop or when the data ran out

    def _flush(self, loop: Loop) -> None:
        if not self.window.values:
            return
        scalars = self.window.scalars()
        scalars["skipped_updates"] = float(loop.summary["skipped_updates"])
        if self.peak and "step_time_sec" in scalars:
            value = metrics_lib.mfu(self.flops, scalars["step_time_sec"], jax.device_count(), self.peak)
            if value is not None:
                scalars["mfu"] = value
        loop.summary.update({k: v for k, v in scalars.items() if k != "skipped_updates"})
        if self.writer is not None:
            self.writer.write_scalars(loop.step, scalars)
        if loop.bar is not None:
            loop.bar.set_postfix(loss=scalars.get("loss", float("nan")),
                                 tok_s=round(scalars.get("tokens_per_sec", 0.0)))
        self.window = _Window()

    def close(self) -> None:
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()


class Evaluate(Hook):
    """Runs `fn(state, step) -> {name: value}` every `period` steps and at the end; optional early stopping.

    Args:
      fn: The evaluation.
      period: Steps between evaluations (0: only at the end).
      writer: Where the results go (`write_scalars`), e.g. the run's `eval` writer; `prefix` goes before each name.
      monitor: A result to track (higher is better): `best_value`/`best_step` follow it, `on_best(state, step)`
        runs when it improves, and `patience` evaluations without improvement stop the loop.
      initial: The monitored value before the first step (e.g. the starting policy's), at `loop.start`.
      admissible: `admissible(results)` False: these results cannot be the best, however high the monitored
        value (e.g. `evaluate.HeldoutGuard`); their steps go to `rejected`.
    """

    def __init__(self, fn: EvalFn, period: int = 0, writer: Any = None, prefix: str = "", *, monitor: str | None = None,
                 patience: int | None = None, initial: float | None = None,
                 on_best: Callable[[TrainState, int], None] | None = None,
                 admissible: Callable[[Mapping[str, float]], bool] | None = None):
        self.fn, self.period, self.writer, self.prefix = fn, int(period), writer, prefix
        self.monitor, self.patience, self.on_best, self.admissible = monitor, patience, on_best, admissible
        self.best_value, self.best_step = (-np.inf if initial is None else initial), None
        self.since_best, self.curve, self.last_step, self.rejected = 0, [], None, []

    def _run(self, loop: Loop) -> None:
        results = {k: float(v) for k, v in self.fn(loop.state, loop.step).items()}
        self.last_step = loop.step
        loop.summary["eval"] = results
        if self.writer is not None:
            self.writer.write_scalars(loop.step, {self.prefix + k: v for k, v in results.items()})
        logging.info("%s: eval at step %d: %s", loop.stage, loop.step, results)
        if self.monitor is None:
            return
        value = results[self.monitor]
        self.curve.append((loop.step, value))
        better = value > self.best_value
        if better and self.admissible is not None and not self.admissible(results):
            better = False
            self.rejected.append(loop.step)
            logging.info("%s: step %d's %s %.4g beats the best but is not admissible.", loop.stage, loop.step,
                         self.monitor, value)
        if better:
            self.best_value, self.best_step, self.since_best = value, loop.step, 0
            if self.on_best is not None:
                self.on_best(loop.state, loop.step)
        else:
            self.since_best += 1
            if self.patience is not None and self.since_best >= self.patience:
                loop.stop = True

    def after_step(self, loop: Loop, metrics: Mapping[str, float] | None) -> None:
        if self.period and loop.step % self.period == 0 and loop.step != loop.num_steps:
            self._run(loop)

    def at_end(self, loop: Loop) -> None:
        if self.last_step != loop.step:
            self._run(loop)


class Checkpoint(Hook):
    """Saves every `manager.period` steps and, when `final`, at the end; each save records the data position."""

    def __init__(self, manager: ckpt_lib.CheckpointManager, metadata: Mapping[str, Any] | None = None,
                 final: bool = True):
        self.manager, self.metadata, self.final = manager, dict(metadata or {}), final

    def _save(self, loop: Loop, force: bool) -> None:
        self.manager.save(loop.step, loop.state, metadata={**self.metadata, "data_step": loop.step}, force=force)

    def after_step(self, loop: Loop, metrics: Mapping[str, float] | None) -> None:
        if self.manager.should_save(loop.step):
            self._save(loop, force=False)

    def at_end(self, loop: Loop) -> None:
        if self.final and loop.step > loop.start:
            self._save(loop, force=True)  # a no-op when the period already saved it


class Every(Hook):
    """Calls `fn(loop)` after every `period`-th step (e.g. refreshing a trust-region anchor)."""

    def __init__(self, period: int, fn: Callable[[Loop], None]):
        self.period, self.fn = int(period), fn

    def after_step(self, loop: Loop, metrics: Mapping[str, float] | None) -> None:
        if self.period and loop.step % self.period == 0:
            self.fn(loop)


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


@gin.configurable(allowlist=["skip_nonfinite_updates"])  # The callers pass the rest (their own knobs).
def train_loop(state: TrainState, batches: Iterator[Batch], train_step: Callable, num_steps: int, *,
               hooks: tuple[Hook, ...] | list[Hook] = (), shard_fn: Callable[[Batch], Batch] | None = None,
               stage: str = "train", show_progress: bool = True,
               skip_nonfinite_updates: bool = False) -> tuple[TrainState, dict[str, Any]]:
    """Runs `train_step` from `state.step` to `num_steps` over `batches`, calling `hooks` after every update.

    `batches` must already start at batch `state.step` of the data order (e.g.
    `pipeline.get_batches(..., start_step=int(state.step))`); checkpoints record that position.

    Args:
      state: Train state (fresh or restored).
      batches: Host batches (numpy dicts).
      train_step: From `make_train_step`.
      num_steps: Final step count (not a number of additional steps).
      hooks: `LogMetrics`, `Evaluate`, `Checkpoint`, `Every` or any `Hook`, called in this order.
      shard_fn: Host batch -> device batch (e.g. `partitioning.shard_batch`); identity by default.
      stage: Label of the progress bar, logs and errors ('train', 'improve_1_2', 'reward_model').
      show_progress: Show a bar (terminal) or periodic log lines.
      skip_nonfinite_updates: On a NaN/inf loss or gradient, skip that update and count it instead of stopping.

    Returns:
      (final state, summary): summary holds `steps_run`, `skipped_updates`, `tokens_per_sec` and
      `step_time_sec` over the run (the compiling step excluded), `eval` (the last evaluation's results) and
      whatever the hooks add (`LogMetrics`: the last averages).

    Raises:
      NonFiniteLossError: a NaN/inf loss or gradient when not skipping; names the step (= number of updates
        before it, = index of its batch).
      OutOfMemoryError: a step did not fit in device memory.
    """
    start = int(jax.device_get(state.step))
    summary: dict[str, Any] = {"eval": {}, "steps_run": 0,
                               "skipped_updates": int(jax.device_get(state.skipped_updates))}
    if start >= num_steps:
        logging.info("%s: already at step %d >= num_steps=%d; nothing to do.", stage, start, num_steps)
        return state, summary
    bar = metrics_lib.progress(num_steps - start, desc=stage, unit="step", disable=None if show_progress else True)
    loop = Loop(stage=stage, state=state, start=start, num_steps=num_steps, step=start, summary=summary, bar=bar)
    total = _Window()
    try:
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            try:
                host_batch = next(batches)
            except StopIteration:
                logging.warning("%s: data ran out at step %d (< num_steps=%d).", stage, step, num_steps)
                break
            batch = shard_fn(host_batch) if shard_fn is not None else host_batch
            try:
                loop.state, metrics = train_step(loop.state, batch)
                metrics = jax.device_get(metrics)
            except Exception as e:  # noqa: BLE001 - only OOM is translated
                if _is_oom(e):
                    raise OutOfMemoryError(f"{stage}: step {step} does not fit in device memory "
                                           f"({str(e).splitlines()[0]}).", step) from e
                raise
            nonfinite = bool(metrics.pop("nonfinite"))
            summary["skipped_updates"] = int(metrics.pop("skipped_updates"))
            if nonfinite:
                where = (f"non-finite loss {float(metrics['loss'])} / grad norm {float(metrics['grad_norm'])} "
                         f"at step {step}")
                if not skip_nonfinite_updates:
                    raise NonFiniteLossError(f"{stage}: {where}; training stopped and the update was not applied.",
                                             step)
                logging.warning("%s: %s; update skipped (%d skipped so far).", stage, where,
                                summary["skipped_updates"])
            summary["steps_run"] += 1
            loop.step, loop.step_time = step + 1, time.perf_counter() - t0
            loop.examples = np.shape(host_batch["decoder_target_tokens"])[0] * jax.process_count() if (
                "decoder_target_tokens" in host_batch) else 0
            loop.timed = summary["steps_run"] > 1 or num_steps - start == 1  # the first step compiles
            if not nonfinite:
                total.add(metrics, loop.examples, loop.step_time, loop.timed)
            bar.update(1)
            for hook in hooks:
                hook.after_step(loop, None if nonfinite else metrics)
            if loop.stop:
                break
        for hook in hooks:
            hook.at_end(loop)
    finally:
        bar.close()
        for hook in hooks:
            hook.close()
    run = total.scalars()
    summary["tokens_per_sec"] = run.get("tokens_per_sec", float("nan"))
    summary["step_time_sec"] = run.get("step_time_sec", float("nan"))
    return loop.state, summary


# ----------------------------------------------------------------------------------------------------
# Teacher-forced evaluation.
# ----------------------------------------------------------------------------------------------------


def token_features(batch: Batch) -> dict[str, np.ndarray]:
    """Only the token features (drops raw text and ids that cannot go to devices)."""
    return {k: batch[k] for k in TOKEN_FEATURES if k in batch}


def make_eval_loss_fn(loss_fn: LossFn, batches_fn: Callable[[], Iterator[Batch]], *, mesh: Mesh | None = None,
                      rules: Any = None, shard_fn: Callable[[Batch], Batch] | None = None) -> EvalFn:
    """Teacher-forced validation loss and accuracy, averaged over all target tokens of a split.

    Rows that `get_eval_batches` added as padding (`mask` False) get zero weight.
    """

    def per_batch(params: PyTree, batch: Batch) -> dict[str, jax.Array]:
        loss, aux = loss_fn(params, batch, None)
        n = aux.get("num_tokens", jnp.sum(batch["decoder_loss_weights"]))
        out = {"loss_sum": loss * n, "num_tokens": n}
        if "accuracy" in aux:
            out["correct"] = aux["accuracy"] * n
        return out

    jitted = jax.jit(per_batch)

    def eval_fn(state: TrainState, step: int) -> dict[str, float]:
        del step
        sums: dict[str, float] = {}
        for host_batch in batches_fn():
            batch = token_features(host_batch)
            if "mask" in host_batch:
                batch["decoder_loss_weights"] = batch["decoder_loss_weights"] * np.asarray(
                    host_batch["mask"], np.float32)[:, None]
            batch = shard_fn(batch) if shard_fn is not None else batch
            if mesh is not None:
                with partitioning.mesh_context(mesh, rules):
                    out = jax.device_get(jitted(state.params, batch))
            else:
                out = jax.device_get(jitted(state.params, batch))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        n = max(sums.get("num_tokens", 0.0), 1.0)
        result = {"loss": sums.get("loss_sum", float("nan")) / n, "num_tokens": sums.get("num_tokens", 0.0)}
        if "correct" in sums:
            result["accuracy"] = sums["correct"] / n
        return result

    return eval_fn
