"""One sharded train step and a resumable loop, shared by BC, Improve and reward-model training.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) first trains the policy by behaviour cloning
(token-level NLL on the parallel data) and then, in every Improve step, fine-tunes it on filtered Grow
data with the same machinery and a different loss; both run `train_loop` with a pluggable
`loss_fn(params, batch, rng) -> (loss, aux)`.

    state, shardings = init_train_state(model, optimizer, rng, mesh)
    step = make_train_step(optimizer, make_loss_fn(model), mesh=mesh, state_shardings=shardings)
    state, summary = train_loop(state, batches, step, num_steps, checkpoint_manager=manager, ...)

`train()` is the gin entry of `rest_jax train`: it builds the mesh, model, data, optimizer and
checkpoints from gin, restores the latest checkpoint if there is one (and restarts the data at that
step, so a killed run ends with exactly the parameters of an uninterrupted one), and trains.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from rest_jax import losses
from rest_jax import metrics as metrics_lib
from rest_jax import optim
from rest_jax import partitioning
from rest_jax.io import console
# Imported for their gin configurables too: `rest_jax train` parses gin after importing this module.
from rest_jax.data import pipeline
from rest_jax.data import tasks
from rest_jax.data import vocab as vocab_lib
from rest_jax.io import atomic
from rest_jax.model import t5

PyTree = Any
Batch = Mapping[str, Any]
LossFn = Callable[[PyTree, Batch, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
EvalFn = Callable[["TrainState", int], Mapping[str, float]]

_TOKEN_FEATURES = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                   "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids")


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the message names the step and the last good checkpoint."""


class OutOfMemoryError(MemoryError):
    """A train step did not fit in device memory; the message names the gin knobs to lower."""


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


@gin.configurable(denylist=["model"])
def make_loss_fn(model: nn.Module, label_smoothing: float = 0.0, z_loss: float = 1e-4) -> LossFn:
    """Token-level NLL (behaviour cloning, ReST Sec. 2) normalised per target token.

    Args:
      model: The encoder-decoder.
      label_smoothing: Mass spread over the other tokens (T5X convention: a perfect prediction of the
        smoothed target costs 0).
      z_loss: Coefficient of log(Z)^2, which keeps the softmax normaliser near 1 (T5X default 1e-4).

    Returns:
      `loss_fn(params, batch, rng) -> (loss, aux)`, aux holding z_loss, accuracy and num_tokens.
    """
    def loss_fn(params: PyTree, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                             enable_dropout=rng is not None, rngs=None if rng is None else {"dropout": rng},
                             encoder_segment_ids=batch.get("encoder_segment_ids"),
                             decoder_segment_ids=batch.get("decoder_segment_ids"))
        targets, weights = batch["decoder_target_tokens"], batch["decoder_loss_weights"]
        total, total_z, num_tokens = losses.cross_entropy_loss(logits, targets, weights, label_smoothing, z_loss)
        denom = jnp.maximum(num_tokens, 1.0)
        # "Target logit is the largest" rather than argmax: the same except for exact ties, and XLA CPU
        # lowers argmax over a 32k vocabulary to a slow (value, index) reduction (~5% of a step).
        target_logits = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
        correct = jnp.sum((target_logits >= jnp.max(logits, axis=-1)) * weights)
        return total / denom, {"z_loss": total_z / denom, "accuracy": correct / denom, "num_tokens": num_tokens}

    return loss_fn


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


def _is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def _describe_last_checkpoint(manager: ckpt_lib.CheckpointManager | None, restart_hint: str | None) -> str:
    if manager is None:
        return restart_hint or "none (this loop saves no checkpoints)"
    steps = manager.all_steps()
    if not steps:
        return f"none yet in {manager.directory}"
    # A step whose files changed since its save is not good, whatever its number.
    good, damaged = None, []
    for step in reversed(steps):
        try:
            problems = manager.find_damage(step)
        except Exception as e:  # noqa: BLE001 - the non-finite loss is the error to report
            problems = [f"unreadable ({e})"]
        if not problems:
            good = step
            break
        damaged.append(f"{manager.step_dir(step)} ({problems[0]})")
    text = f"{manager.step_dir(good)} (step {good})" if good is not None else f"none intact in {manager.directory}"
    if damaged:
        text += f"; damaged, delete before rerunning: {', '.join(damaged)}"
    return text


@gin.configurable(allowlist=["skip_nonfinite_updates"])  # The callers pass the rest (their own knobs).
def train_loop(state: TrainState, batches: Iterator[Batch], train_step: Callable, num_steps: int, *,
               eval_fn: EvalFn | None = None, eval_period: int = 0,
               checkpoint_manager: ckpt_lib.CheckpointManager | None = None,
               metric_writer: Any = None, eval_metric_writer: Any = None,
               shard_fn: Callable[[Batch], Batch] | None = None, log_period: int = 50,
               skip_nonfinite_updates: bool = False, checkpoint_metadata: Mapping[str, Any] | None = None,
               flops_per_step: float | None = None, final_checkpoint: bool = True, stage: str = "train",
               show_progress: bool = True,
               memory_knobs: tuple[str, str] = ("train.batch_size", "train.feature_lengths"),
               restart_hint: str | None = None) -> tuple[TrainState, dict[str, Any]]:
    """Runs `train_step` from `state.step` to `num_steps` over `batches`.

    `batches` must already start at batch `state.step` of the data order (e.g.
    `pipeline.get_batches(..., start_step=int(state.step))`); checkpoints record that position.

    Args:
      state: Train state (fresh or restored).
      batches: Host batches (numpy dicts).
      train_step: From `make_train_step`.
      num_steps: Final step count (not a number of additional steps).
      eval_fn: `eval_fn(state, step) -> {name: value}`, run every `eval_period` steps and at the end.
      eval_period: Steps between evaluations (0: only at the end, when `eval_fn` is given).
      checkpoint_manager: Saves every `checkpoint_manager.period` steps and at the end.
      metric_writer: `rest_jax.metrics.MetricWriter`-like (`write_scalars(step, dict)`), train scalars.
      eval_metric_writer: Writer for eval scalars (default: `metric_writer` with an 'eval/' prefix).
      shard_fn: Host batch -> device batch (e.g. `partitioning.shard_batch`); identity by default.
      log_period: Steps between scalar writes (averages over the period).
      skip_nonfinite_updates: On a NaN/inf loss or gradient, skip that update and count it instead
        of stopping.
      checkpoint_metadata: Extra JSON saved with every checkpoint (model config, task, ...).
      flops_per_step: Model FLOPs of one step, for an MFU estimate.
      final_checkpoint: Save at the end even off-period.
      stage: Label of the progress bar and logs ('train', 'improve_1_2', 'reward_model').
      show_progress: Show a bar (terminal) or periodic log lines.
      memory_knobs: The gin knobs of this loop's batch size and sequence lengths, named by the
        out-of-memory error (e.g. ('improve_step.batch_size', 'improve_step.feature_lengths')).
      restart_hint: What a rerun restarts from when there is no `checkpoint_manager` (e.g. the starting
        policy of an Improve stage), said in the non-finite-loss error.

    Returns:
      (final state, summary): summary holds the last logged scalars, `eval` (last eval results),
      `skipped_updates`, `steps_run` and `tokens_per_sec`.

    Raises:
      NonFiniteLossError: a NaN/inf loss or gradient when not skipping; names the step (= number of
        updates before it, = index of its batch) and the last good checkpoint.
      OutOfMemoryError: a step did not fit in device memory.
    """
    start = int(jax.device_get(state.step))
    summary: dict[str, Any] = {"eval": {}, "steps_run": 0,
                               "skipped_updates": int(jax.device_get(state.skipped_updates))}
    if start >= num_steps:
        logging.info("%s: already at step %d >= num_steps=%d; nothing to do.", stage, start, num_steps)
        return state, summary
    meta = dict(checkpoint_metadata or {})
    peak = metrics_lib.peak_flops_per_device() if flops_per_step else None
    bar = metrics_lib.progress(num_steps - start, desc=stage, unit="step", disable=None if show_progress else True)
    window, total = _Window(), _Window()

    def save(step: int, force: bool) -> None:
        if checkpoint_manager is not None:
            checkpoint_manager.save(step, state, metadata={**meta, "data_step": step}, force=force)

    def evaluate(step: int) -> None:
        results = {k: float(v) for k, v in eval_fn(state, step).items()}
        summary["eval"] = results
        if eval_metric_writer is not None:
            eval_metric_writer.write_scalars(step, results)
        elif metric_writer is not None:
            metric_writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
        logging.info("%s: eval at step %d: %s", stage, step, results)

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
                state, metrics = train_step(state, batch)
                metrics = jax.device_get(metrics)
            except Exception as e:  # noqa: BLE001 - only OOM is translated
                if _is_oom(e):
                    raise OutOfMemoryError(
                        f"{stage}: step {step} does not fit in device memory ({str(e).splitlines()[0]}). "
                        f"Lower the batch size (gin: {memory_knobs[0]}) or the sequence lengths "
                        f"({memory_knobs[1]}), or shard the model over more devices "
                        "(create_mesh.mesh_shape, e.g. (-1, 2)).") from e
                raise
            dt = time.perf_counter() - t0
            nonfinite = bool(metrics.pop("nonfinite"))
            summary["skipped_updates"] = int(metrics.pop("skipped_updates"))
            if nonfinite:
                where = (f"non-finite loss {float(metrics['loss'])} / grad norm {float(metrics['grad_norm'])} "
                         f"at step {step}")
                if not skip_nonfinite_updates:
                    raise NonFiniteLossError(
                        f"{stage}: {where}; training stopped and the update was not applied. Last good "
                        f"checkpoint: {_describe_last_checkpoint(checkpoint_manager, restart_hint)}. Check the data at "
                        "that step and the learning rate, or set gin train_loop.skip_nonfinite_updates=True "
                        "to skip such updates.")
                logging.warning("%s: %s; update skipped (%d skipped so far).", stage, where,
                                summary["skipped_updates"])
            done = step + 1
            summary["steps_run"] += 1
            bar.update(1)
            if not nonfinite:  # a skipped step's numbers would poison the averages
                rows = np.shape(host_batch["decoder_target_tokens"])[0] if "decoder_target_tokens" in host_batch else 0
                timed = summary["steps_run"] > 1 or num_steps - start == 1  # the first step compiles
                for w in (window, total):
                    w.add(metrics, rows * jax.process_count(), dt, timed)
            if (done % max(log_period, 1) == 0 or done == num_steps) and window.values:
                scalars = window.scalars()
                scalars["skipped_updates"] = float(summary["skipped_updates"])
                if flops_per_step and peak and "step_time_sec" in scalars:
                    value = metrics_lib.mfu(flops_per_step, scalars["step_time_sec"], jax.device_count(), peak)
                    if value is not None:
                        scalars["mfu"] = value
                summary.update({k: v for k, v in scalars.items() if k != "skipped_updates"})
                if metric_writer is not None:
                    metric_writer.write_scalars(done, scalars)
                bar.set_postfix(loss=scalars.get("loss", float("nan")),
                                tok_s=round(scalars.get("tokens_per_sec", 0.0)))
                window = _Window()
            if eval_fn is not None and eval_period and done % eval_period == 0 and done != num_steps:
                evaluate(done)
            if checkpoint_manager is not None and checkpoint_manager.should_save(done):
                save(done, force=False)
        final = int(jax.device_get(state.step))
        if eval_fn is not None:
            evaluate(final)
        if final_checkpoint and final > start:
            save(final, force=True)  # a no-op when the period already saved it
    finally:
        bar.close()
        if metric_writer is not None and hasattr(metric_writer, "flush"):
            metric_writer.flush()
    summary["tokens_per_sec"] = total.scalars().get("tokens_per_sec", float("nan"))
    return state, summary


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


# ----------------------------------------------------------------------------------------------------
# Evaluation helpers and the gin entry.
# ----------------------------------------------------------------------------------------------------


def _numeric(batch: Batch) -> dict[str, np.ndarray]:
    """Only the token features (drops raw text and ids that cannot go to devices)."""
    return {k: batch[k] for k in _TOKEN_FEATURES if k in batch}


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
            batch = _numeric(host_batch)
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


def _target_vocabulary(task: Any) -> Any:
    try:
        return task.output_features["targets"].vocabulary
    except (AttributeError, KeyError):
        return None


def _vocabulary_record(task: Any) -> dict[str, Any] | None:
    """{'path', 'sha256', 'size'} of the task's target SentencePiece vocabulary (None for other vocabularies)."""
    path = getattr(_target_vocabulary(task), "sentencepiece_model_file", None)
    if path is None:
        return None
    return {"path": str(path), "sha256": vocab_lib.vocab_fingerprint(path),
            "size": int(_target_vocabulary(task).vocab_size)}


def _check_vocabulary(task: Any, config: Any) -> None:
    vocabulary = _target_vocabulary(task)
    if vocabulary is not None:
        vocab_lib.check_fits_model(vocabulary, config.vocab_size, "The task's vocabulary",
                                   f"set T5Config.vocab_size (VOCAB_SIZE) to at least {vocabulary.vocab_size}.")


def _check_same_vocabulary(recorded: Mapping[str, Any] | None, current: Mapping[str, Any] | None,
                           checkpoint: str) -> None:
    """Token ids mean nothing under another vocabulary, even one of the same size: refuse to resume."""
    if not recorded or not current or recorded.get("sha256") == current["sha256"]:
        return
    raise ValueError(f"{checkpoint} was trained with the vocabulary {recorded.get('path')} (sha256 "
                     f"{str(recorded.get('sha256'))[:12]}...), but this run's task uses {current['path']} (sha256 "
                     f"{current['sha256'][:12]}...). Point get_task.vocabulary at the checkpoint's vocabulary, or "
                     "use a new MODEL_DIR to train from scratch.")


@gin.configurable
def train(model_dir: str = gin.REQUIRED, task: str = gin.REQUIRED, train_split: str = "train",
          eval_split: str | None = "validation", feature_lengths: Mapping[str, int] = gin.REQUIRED,
          batch_size: int = 64, eval_batch_size: int | None = None, num_steps: int = 10_000,
          eval_period: int = 1000, checkpoint_period: int = 1000, keep_checkpoints: int | None = 3,
          seed: int = 0, optimizer: optim.Optimizer | None = None, mesh: Mesh | None = None,
          loss_fn: LossFn | None = None, eval_callbacks: Sequence[Callable[..., Mapping[str, float]]] = (),
          shuffle: bool = True, pack: bool = False, init_checkpoint: str | None = None,
          log_period: int = 50) -> TrainState:
    """Supervised (behaviour cloning) training from gin: the `rest_jax train` subcommand.

    Resumes from the latest complete checkpoint in `model_dir/checkpoints` when there is one, with
    the data restarted at that step. TensorBoard scalars go to `model_dir/train` and `model_dir/eval`.

    Args:
      model_dir: Run directory (checkpoints, TensorBoard events, config).
      task: A `rest_jax.data.tasks` task name (its vocabulary from gin `get_task.vocabulary`).
      train_split, eval_split: Splits to train on and to compute the validation loss on (None: none).
      feature_lengths: {'inputs': L, 'targets': L}; longer examples are trimmed (EOS kept).
      batch_size: Global batch size (examples per step, all hosts).
      eval_batch_size: Validation batch size (default `batch_size`).
      num_steps: Total train steps (a resumed run stops at the same count).
      eval_period: Steps between evaluations (0: only at the end).
      checkpoint_period: Steps between checkpoints (also saved at the end).
      keep_checkpoints: Newest checkpoints kept (None: all).
      seed: Seeds parameter init, data order and dropout.
      optimizer: Default `optim.create_optimizer()` (gin-configured).
      mesh: Default `partitioning.create_mesh()` (gin-configured).
      loss_fn: Default `make_loss_fn(model)` (gin: label smoothing, z-loss).
      eval_callbacks: Extra evaluations run with the validation loss, each called as
        `cb(model=..., params=..., step=..., mesh=..., model_dir=...) -> {name: value}`, e.g. BLEU/chrF
        from `rest_jax.evaluate` configured in gin.
      shuffle: Shuffle the training data (a new permutation per epoch, from `seed`).
      pack: Pack several examples per row (seqio's packing, as T5X trains): 1.4x the target tokens per step
        on Multi30k (rows of 32, SentencePiece 8k) at the same cost. `batch_size` counts rows.
      init_checkpoint: Fine-tuning: start from the parameters of this checkpoint (a directory of steps
        or one step) with a fresh optimizer and step 0, unless `model_dir` already has a checkpoint of
        its own to resume from.
      log_period: Steps between logged train metrics.

    Returns:
      The final train state.
    """
    started = time.perf_counter()
    partitioning.initialize_multihost()
    part = partitioning.Partitioner.create(mesh)
    mesh, rules = part.mesh, part.rules
    model = t5.build_model()
    optimizer = optimizer if optimizer is not None else optim.create_optimizer()
    seqio_task = tasks.as_task(task)
    _check_vocabulary(seqio_task, model.config)
    vocabulary = _vocabulary_record(seqio_task)
    lengths = {"inputs": int(feature_lengths["inputs"]), "targets": int(feature_lengths["targets"])}

    init_key = jax.random.key(seed)
    abstract, shardings = init_train_state(model, optimizer, init_key, mesh, rules, abstract_only=True)
    manager = ckpt_lib.CheckpointManager(os.path.join(model_dir, "checkpoints"), keep=keep_checkpoints,
                                         period=checkpoint_period, keep_knob="train.keep_checkpoints")
    if manager.latest_step() is not None:
        state, restored_meta = manager.restore(abstract, shardings=shardings)
        _check_same_vocabulary(restored_meta.get("vocabulary"), vocabulary,
                               str(manager.step_dir(manager.latest_step())))
        console.logger.info("Resuming from %s (step %d).", manager.step_dir(manager.latest_step()), int(state.step))
        if restored_meta.get("task") not in (None, task):
            logging.warning("The checkpoint was trained on task %r, this run uses %r.", restored_meta["task"], task)
    else:
        state, _ = init_train_state(model, optimizer, init_key, mesh, rules)
        if init_checkpoint:
            # Adafactor/AdamW moments start at zero whatever the parameters, so only params change.
            params = ckpt_lib.load_params(init_checkpoint, target=abstract.params, shardings=shardings.params)
            state = state.replace(params=params)
            console.logger.info("Initialised parameters from %s.", init_checkpoint)
    start = int(jax.device_get(state.step))

    shard_index, num_shards = partitioning.data_shard_info(mesh, rules)
    batches = pipeline.get_batches(task, train_split, batch_size=batch_size, feature_lengths=lengths,
                                   shuffle=shuffle, seed=seed, start_step=start, repeat=True, pack=pack,
                                   shard_index=shard_index, num_shards=num_shards)
    shard_fn = lambda b: partitioning.shard_batch(_numeric(b), mesh, rules)  # noqa: E731
    loss_fn = loss_fn if loss_fn is not None else make_loss_fn(model)
    train_step = make_train_step(optimizer, loss_fn, mesh=mesh, rules=rules, state_shardings=shardings,
                                 dropout_seed=seed)

    eval_fn = None
    if eval_split is not None or eval_callbacks:
        loss_eval = None
        if eval_split is not None:
            loss_eval = make_eval_loss_fn(
                loss_fn, lambda: pipeline.get_eval_batches(task, eval_split, batch_size=eval_batch_size or batch_size,
                                                           feature_lengths=lengths, shard_index=shard_index,
                                                           num_shards=num_shards),
                mesh=mesh, rules=rules, shard_fn=lambda b: partitioning.shard_batch(b, mesh, rules))

        def eval_fn(st: TrainState, step: int) -> dict[str, float]:
            results: dict[str, float] = dict(loss_eval(st, step)) if loss_eval is not None else {}
            for cb in eval_callbacks:
                results.update(cb(model=model, params=st.params, step=step, mesh=mesh, model_dir=model_dir))
            return results

    config = model.config
    flops = metrics_lib.estimate_flops_per_example(config, lengths["inputs"], lengths["targets"]) * batch_size
    meta = {"task": task, "train_split": train_split, "seed": seed, "batch_size": batch_size,
            "feature_lengths": lengths, "model_config": atomic.jsonable(dataclasses.asdict(config)),
            "vocabulary": vocabulary}
    with metrics_lib.MetricWriter(model_dir, "train") as writer, metrics_lib.MetricWriter(model_dir, "eval") as ev:
        state, summary = train_loop(state, batches, train_step, num_steps, eval_fn=eval_fn, eval_period=eval_period,
                                    log_period=log_period,
                                    checkpoint_manager=manager, metric_writer=writer, eval_metric_writer=ev,
                                    shard_fn=shard_fn, checkpoint_metadata=meta, flops_per_step=flops)
    manager.close()
    final = int(jax.device_get(state.step))
    logging.info("Training finished at step %d: %s", final, {k: v for k, v in summary.items() if not isinstance(v, dict)})
    if summary["steps_run"]:
        figures = (f"step {final}, loss {summary.get('loss', float('nan')):.4g}, "
                   f"{summary.get('tokens_per_sec', float('nan')):,.0f} tokens/s")
    else:
        figures = f"already at step {final}"
    if "loss" in summary["eval"]:
        figures += f", validation loss {summary['eval']['loss']:.4g}"
    console.stage_done("train", time.perf_counter() - started, f"{figures}; checkpoints in {manager.directory}")
    return state


def finished_work(model_dir: str) -> list[str]:
    """What a rerun of `train` in `model_dir` would resume from: its committed checkpoints (relative paths)."""
    return [f"checkpoints/{step}" for step in ckpt_lib.committed_steps(os.path.join(model_dir, "checkpoints"))]
