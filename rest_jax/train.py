"""Behaviour cloning (ReST Sec. 2): the token-level NLL loss and the `rest_jax train` gin entry.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) first trains the policy by behaviour cloning (token-level
NLL on the parallel data). `train()` builds the mesh, model, data, optimizer and checkpoints from gin, restores
the latest checkpoint if there is one (and restarts the data at that step, so a killed run ends with exactly the
parameters of an uninterrupted one), and runs `rest_jax.trainer.train_loop` with its hooks (metrics, validation
loss and callbacks, checkpoints).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import gin
import jax
from jax.sharding import Mesh

from rest_jax import checkpoints as ckpt_lib
from rest_jax import losses
from rest_jax import metrics as metrics_lib
from rest_jax import optim
from rest_jax import partitioning
from rest_jax import policy as policy_lib
from rest_jax import trainer
from rest_jax.io import console
# Imported for their gin configurables too: `rest_jax train` parses gin after importing this module.
from rest_jax.data import pipeline
from rest_jax.data import tasks
from rest_jax.data import vocab as vocab_lib
from rest_jax.model import t5

PyTree = Any
Batch = trainer.Batch
LossFn = trainer.LossFn


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
          log_period: int = 50) -> trainer.TrainState:
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
      loss_fn: Default `losses.make_loss_fn(model)` (gin: label smoothing, z-loss).
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
    seqio_task = tasks.as_task(task)
    model = policy_lib.build_network(_target_vocabulary(seqio_task))
    optimizer = optimizer if optimizer is not None else optim.create_optimizer()
    _check_vocabulary(seqio_task, model.config)
    if pack and not isinstance(model.config, t5.T5Config):
        raise ValueError("train.pack: packed rows are for the encoder-decoder; a decoder-only policy trains on "
                         "unpacked rows (set train.pack = False).")
    vocabulary = _vocabulary_record(seqio_task)
    lengths = {"inputs": int(feature_lengths["inputs"]), "targets": int(feature_lengths["targets"])}

    init_key = jax.random.key(seed)
    abstract, shardings = trainer.init_train_state(model, optimizer, init_key, mesh, rules, abstract_only=True)
    manager = ckpt_lib.CheckpointManager(os.path.join(model_dir, "checkpoints"), keep=keep_checkpoints,
                                         period=checkpoint_period, keep_knob="train.keep_checkpoints")
    if manager.latest_step() is not None:
        state, restored_meta = manager.restore(abstract, shardings=shardings)
        _check_same_vocabulary(restored_meta.get("vocabulary"), vocabulary,
                               str(manager.step_dir(manager.latest_step())))
        policy_lib.check_prompt(model, restored_meta, str(manager.step_dir(manager.latest_step())))
        console.logger.info("Resuming from %s (step %d).", manager.step_dir(manager.latest_step()), int(state.step))
        if restored_meta.get("task") not in (None, task):
            logging.warning("The checkpoint was trained on task %r, this run uses %r.", restored_meta["task"], task)
    else:
        state, _ = trainer.init_train_state(model, optimizer, init_key, mesh, rules)
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
    shard_fn = lambda b: partitioning.shard_batch(trainer.token_features(b), mesh, rules)  # noqa: E731
    loss_fn = loss_fn if loss_fn is not None else losses.make_loss_fn(model)
    train_step = trainer.make_train_step(optimizer, loss_fn, mesh=mesh, rules=rules, state_shardings=shardings,
                                         dropout_seed=seed)

    eval_fn = None
    if eval_split is not None or eval_callbacks:
        loss_eval = None
        if eval_split is not None:
            loss_eval = trainer.make_eval_loss_fn(
                loss_fn, lambda: pipeline.get_eval_batches(task, eval_split, batch_size=eval_batch_size or batch_size,
                                                           feature_lengths=lengths, shard_index=shard_index,
                                                           num_shards=num_shards),
                mesh=mesh, rules=rules, shard_fn=lambda b: partitioning.shard_batch(b, mesh, rules))

        def eval_fn(st: trainer.TrainState, step: int) -> dict[str, float]:
            results: dict[str, float] = dict(loss_eval(st, step)) if loss_eval is not None else {}
            for cb in eval_callbacks:
                results.update(cb(model=model, params=st.params, step=step, mesh=mesh, model_dir=model_dir))
            return results

    config = model.config
    flops = metrics_lib.estimate_flops_per_example(config, lengths["inputs"], lengths["targets"]) * batch_size
    meta = {"task": task, "train_split": train_split, "seed": seed, "batch_size": batch_size,
            "feature_lengths": lengths, "vocabulary": vocabulary, **policy_lib.checkpoint_metadata(model)}
    advice = trainer.error_advice(memory_knobs=("train.batch_size", "train.feature_lengths"),
                                  last_checkpoint=lambda: trainer.describe_last_checkpoint(manager))
    with metrics_lib.MetricWriter(model_dir, "train") as writer, metrics_lib.MetricWriter(model_dir, "eval") as ev, \
            advice:
        hooks = [trainer.LogMetrics(writer, log_period, flops_per_step=flops, dtype=config.dtype),
                 *([trainer.Evaluate(eval_fn, eval_period, ev)] if eval_fn is not None else []),
                 trainer.Checkpoint(manager, meta)]
        state, summary = trainer.train_loop(state, batches, train_step, num_steps, hooks=hooks, shard_fn=shard_fn)
    manager.close()
    final = int(jax.device_get(state.step))
    logging.info("Training finished at step %d: %s", final,
                 {k: v for k, v in summary.items() if not isinstance(v, dict)})
    if summary["steps_run"]:
        figures = (f"step {final}, loss {summary.get('loss', float('nan')):.4g}, "
                   + metrics_lib.throughput(summary["tokens_per_sec"], flops / summary["step_time_sec"],
                                            config.dtype))
    else:
        figures = f"already at step {final}"
    if "loss" in summary["eval"]:
        figures += f", validation loss {summary['eval']['loss']:.4g}"
    console.stage_done("train", time.perf_counter() - started, f"{figures}; checkpoints in {manager.directory}")
    return state


def finished_work(model_dir: str) -> list[str]:
    """What a rerun of `train` in `model_dir` would resume from: its committed checkpoints (relative paths)."""
    return [f"checkpoints/{step}" for step in ckpt_lib.committed_steps(os.path.join(model_dir, "checkpoints"))]
