"""Orbax checkpoints of the train state: keep-N, every K steps, atomic, restorable onto any mesh.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) chains many trainings: the BC policy, then an
Improve fine-tune per threshold, each starting from the previous policy; every stage boundary is a
checkpoint. A step directory holds two items:

    <directory>/<step>/state/      the train state as a nested dict (flax `to_state_dict`), e.g.
                                   state/params/encoder/layers_0/attention/query/kernel (T5X's names)
    <directory>/<step>/metadata/   JSON: data-iterator position, model config, anything the caller adds

Orbax writes each step to `<step>.orbax-checkpoint-tmp*` and renames it after writing
`commit_success.txt`, so a killed save never looks complete; steps without that marker are skipped.

Typical use::

    manager = CheckpointManager(model_dir)                       # gin: keep, period
    manager.save(step, state, metadata={'data_step': step})       # no-op unless step % period == 0
    state, metadata = manager.restore(abstract_state)             # latest complete step, target shardings
    params = load_params(model_dir)                               # inference: params only
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from typing import Any, Mapping

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
_COMMIT_MARKER = "commit_success.txt"
_TMP_MARKER = ".orbax-checkpoint-tmp"
# errno values that mean "the disk (or quota, or file-size limit) is full"; tensorstore reports them
# inside a ValueError as "[os_error_code='28']".
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_MAX_LISTED = 20


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the configured model/optimizer."""


class CheckpointDiskFullError(OSError):
    """A save ran out of disk space; earlier checkpoints are intact."""


class CheckpointNotFoundError(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


def _absolute(path: str | os.PathLike) -> epath.Path:
    """Orbax refuses relative paths; a run directory given relative to the working directory is fine."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_str(path): tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in leaves}


def _is_out_of_space(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
            return True
        codes = re.findall(r"os_error_code='?(\d+)", str(exc))
        if any(int(c) in _SPACE_ERRNOS for c in codes) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def describe_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Human-readable differences between two {path: shape} maps (expected = the configured model)."""
    lines = []
    for key in sorted(expected.keys() | found.keys()):
        if key not in found:
            lines.append(f"  {key}: missing from the checkpoint (model expects shape {expected[key]})")
        elif key not in expected:
            lines.append(f"  {key}: in the checkpoint (shape {found[key]}) but not in the configured model")
        elif tuple(expected[key]) != tuple(found[key]):
            lines.append(f"  {key}: model expects shape {tuple(expected[key])}, checkpoint has {tuple(found[key])}")
    return lines


def _step_dir(directory: epath.Path, step: int) -> epath.Path:
    return directory / str(step)


def _is_complete(step_dir: epath.Path) -> bool:
    return (step_dir / _COMMIT_MARKER).exists() and (step_dir / _STATE).exists()


def committed_steps(directory: str | os.PathLike) -> list[int]:
    """Steps with a committed checkpoint in `directory`, oldest first.

    Only reads the directory (no Orbax manager, no clean-up of interrupted saves), for callers that must not
    change anything, e.g. the command line checking what a run directory holds before it runs.
    """
    directory = _absolute(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_complete(p))


def _read_json(step_dir: epath.Path) -> dict[str, Any]:
    path = step_dir / _METADATA / _METADATA
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"Checkpoint metadata {path} is unreadable: {e}") from e


def _stored_tree(state_dir: epath.Path) -> PyTree:
    metadata = ocp.PyTreeCheckpointHandler().metadata(state_dir)
    return getattr(metadata, "tree", metadata)


def _abstract(leaf: Any, sharding: Any = None) -> jax.ShapeDtypeStruct:
    sharding = sharding if sharding is not None else getattr(leaf, "sharding", None)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, sharding=sharding)


def _restore_state(step_dir: epath.Path, target_dict: PyTree, partial: bool,
                   config_hint: Any = None) -> PyTree:
    """Restores the `state` item onto the shapes/shardings of `target_dict` after checking it fits."""
    state_dir = step_dir / _STATE
    stored = _stored_tree(state_dir)
    found = _flat_shapes(stored)
    expected = _flat_shapes(target_dict)
    if partial:
        found = {k: v for k, v in found.items() if any(k == e or k.startswith(e + "/") for e in _prefixes(target_dict))}
    problems = describe_mismatch(expected, found)
    if problems:
        shown = problems[:_MAX_LISTED]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        hint = f"\nThe checkpoint was written for model config: {config_hint}" if config_hint else ""
        raise CheckpointMismatchError(
            f"Checkpoint {step_dir} does not fit the configured model ({len(problems)} mismatched "
            f"array(s)):\n" + "\n".join(shown) + more + hint +
            "\nCheck the model gin file (T5Config.*) and optimizer against the run that wrote it; to start a "
            "new optimizer from its parameters use rest_jax.checkpoints.load_params.")
    restore_args = ocp.checkpoint_utils.construct_restore_args(target_dict)
    return ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=target_dict, restore_args=restore_args,
                                               partial_restore=partial))


def _prefixes(tree: Mapping[str, Any]) -> list[str]:
    return list(tree.keys()) if isinstance(tree, Mapping) else []


def abstract_state(state: PyTree, shardings: PyTree | None = None) -> PyTree:
    """`jax.ShapeDtypeStruct`s for `state` (arrays or structs) placed on `shardings` when given."""
    if shardings is None:
        return jax.tree.map(_abstract, state)
    return jax.tree.map(_abstract, state, shardings)


@gin.configurable
class CheckpointManager:
    """Orbax `CheckpointManager` for the train state plus a JSON metadata item.

    Args:
      directory: Where step directories go (the run's model_dir/checkpoints).
      keep: Newest complete checkpoints to keep (None: all).
      period: Save every this many steps (`save(..., force=True)` saves regardless).
      keep_period: Also keep every step divisible by this forever (None: off).
      async_save: Write in a background thread (Orbax async); errors then surface at the next save
        or `wait_until_finished`.
      cleanup_tmp: Delete temporary directories of interrupted saves when opening the directory.
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, period: int = 1000,
                 keep_period: int | None = None, async_save: bool = False, cleanup_tmp: bool = True):
        if period < 1:
            raise ValueError(f"CheckpointManager.period={period} must be >= 1.")
        if keep is not None and keep < 1:
            raise ValueError(f"CheckpointManager.keep={keep} must be >= 1 or None (keep all).")
        self.directory = _absolute(directory)
        self.period = int(period)
        if cleanup_tmp and jax.process_index() == 0 and self.directory.exists():
            # Orbax's own clean-up misses some names (e.g. '<step>.orbax-checkpoint-tmp-<time>').
            for tmp in self.directory.glob(f"*{_TMP_MARKER}*"):
                logging.warning("Removing %s, left by an interrupted save.", tmp)
                shutil.rmtree(os.fspath(tmp), ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep, keep_period=keep_period,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=cleanup_tmp, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={_STATE: ocp.PyTreeCheckpointHandler(), _METADATA: ocp.JsonCheckpointHandler()})

    # -- listing ----------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps with a complete (committed) checkpoint, oldest first."""
        steps = []
        for step in sorted(self._manager.all_steps()):
            if _is_complete(_step_dir(self.directory, step)):
                steps.append(step)
            else:
                logging.warning("Checkpoint %s is incomplete (no %s); ignoring it.",
                                _step_dir(self.directory, step), _COMMIT_MARKER)
        return steps

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> epath.Path:
        return _step_dir(self.directory, step)

    # -- saving -----------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        return step % self.period == 0

    def save(self, step: int, state: PyTree, metadata: Mapping[str, Any] | None = None,
             force: bool = False) -> bool:
        """Saves `state` (any pytree; flax structs become dicts) at `step` when due or `force`.

        Returns:
          True when a checkpoint was written (or started, when async).

        Raises:
          CheckpointDiskFullError: out of disk space; the partial directory is removed and the
            message lists the checkpoints that are still intact.
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            logging.info("Checkpoint step %d already exists; not saving it again.", step)
            return False
        meta = {"step": step, **dict(metadata or {})}
        items = ocp.args.Composite(**{_STATE: ocp.args.PyTreeSave(serialization.to_state_dict(state)),
                                      _METADATA: ocp.args.JsonSave(meta)})
        try:
            saved = self._manager.save(step, args=items, force=True)
            if not self._manager._options.enable_async_checkpointing:  # noqa: SLF001 (no public getter)
                self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - only out-of-space is translated
            if _is_out_of_space(e):
                raise self._disk_full(step, e) from e
            raise
        if saved:
            logging.info("Saved checkpoint %s.", self.step_dir(step))
        return bool(saved)

    def _disk_full(self, step: int | None, exc: BaseException) -> CheckpointDiskFullError:
        pattern = f"{'*' if step is None else step}{_TMP_MARKER}*"
        for tmp in self.directory.glob(pattern):
            shutil.rmtree(os.fspath(tmp), ignore_errors=True)  # give the space back
        intact = self.all_steps()
        kept = (f"previous checkpoints are intact: steps {intact} in {self.directory}" if intact
                else f"no earlier checkpoint exists in {self.directory}")
        return CheckpointDiskFullError(
            errno.ENOSPC,
            f"Out of disk space while saving checkpoint {'' if step is None else f'step {step} '}to "
            f"{self.directory} ({exc}). "
            f"The partial step was removed; {kept}. Free space, or keep fewer checkpoints "
            "(gin: CheckpointManager.keep), then rerun the same command to resume.")

    def wait_until_finished(self) -> None:
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            if _is_out_of_space(e):
                raise self._disk_full(None, e) from e
            raise

    def close(self) -> None:
        self.wait_until_finished()
        self._manager.close()

    # -- restoring --------------------------------------------------------------------------------

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise CheckpointNotFoundError(f"No complete checkpoint in {self.directory}.")
            return steps[-1]
        if step not in steps:
            raise CheckpointNotFoundError(
                f"No complete checkpoint for step {step} in {self.directory}; complete steps: {steps}.")
        return int(step)

    def metadata(self, step: int | None = None) -> dict[str, Any]:
        """The JSON metadata of `step` (latest complete by default)."""
        return _read_json(self.step_dir(self._resolve_step(step)))

    def restore(self, target: PyTree, step: int | None = None,
                shardings: PyTree | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restores a state shaped like `target` from `step` (latest complete step by default).

        Args:
          target: A state pytree (e.g. a `TrainState` of arrays or of `jax.ShapeDtypeStruct`s, as from
            `jax.eval_shape`); its structure and shapes are what the checkpoint must match.
          step: Step to restore; None for the latest complete one.
          shardings: Shardings matching `target` (e.g. from `rest_jax.partitioning`) to restore onto a
            mesh other than the one that saved; otherwise each leaf's own `.sharding`, else device 0.

        Returns:
          (state with `target`'s structure, metadata dict).

        Raises:
          CheckpointMismatchError: naming each array whose path or shape differs.
          CheckpointNotFoundError: no (complete) checkpoint for `step`.
        """
        step_dir = self.step_dir(self._resolve_step(step))
        meta = _read_json(step_dir)
        abstract = abstract_state(target, shardings)
        restored = _restore_state(step_dir, serialization.to_state_dict(abstract), partial=False,
                                  config_hint=meta.get("model_config"))
        logging.info("Restored checkpoint %s.", step_dir)
        return serialization.from_state_dict(target, restored), meta


def _find_step_dir(path: epath.Path, step: int | None) -> epath.Path:
    """A step directory from either a step directory or a directory of steps."""
    if (path / _STATE).exists():
        if not _is_complete(path):
            raise CheckpointNotFoundError(f"Checkpoint {path} is incomplete (no {_COMMIT_MARKER}).")
        return path
    if not path.exists():
        raise CheckpointNotFoundError(f"Checkpoint path {path} does not exist.")
    steps = sorted(int(p.name) for p in path.iterdir()
                   if p.name.isdigit() and _is_complete(p))
    if not steps:
        raise CheckpointNotFoundError(f"No complete checkpoint in {path}.")
    if step is None:
        return path / str(steps[-1])
    if step not in steps:
        raise CheckpointNotFoundError(f"No complete checkpoint for step {step} in {path}; complete steps: {steps}.")
    return path / str(step)


def load_params(path: str | os.PathLike, target: PyTree | None = None, step: int | None = None,
                shardings: PyTree | None = None) -> PyTree:
    """Only the parameters of a checkpoint (no optimizer state is read), e.g. for sampling or Improve.

    Args:
      path: A checkpoint directory (latest complete step, or `step`) or one step's directory.
      target: Parameters (arrays or `jax.ShapeDtypeStruct`s) the checkpoint must fit; None restores
        the stored shapes as host-local arrays on device 0.
      step: Step to load when `path` holds several.
      shardings: Shardings matching `target`.

    Returns:
      The parameter pytree (nested dicts with T5X names).
    """
    step_dir = _find_step_dir(_absolute(path), step)
    if target is None:
        stored = _stored_tree(step_dir / _STATE)
        if "params" not in stored:
            raise CheckpointMismatchError(f"Checkpoint {step_dir} has no 'params' (items: {sorted(stored)}).")
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored["params"])
    abstract = abstract_state(target, shardings)
    meta = _read_json(step_dir)
    restored = _restore_state(step_dir, {"params": serialization.to_state_dict(abstract)}, partial=True,
                              config_hint=meta.get("model_config"))
    return serialization.from_state_dict(target, restored["params"])
