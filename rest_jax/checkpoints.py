"""Orbax checkpoints of the train state: keep-N, every K steps, atomic, restorable onto any mesh.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) chains many trainings: the BC policy, then an
Improve fine-tune per threshold, each starting from the previous policy; every stage boundary is a
checkpoint. A step directory holds two items:

    <directory>/<step>/state/      the train state as a nested dict (flax `to_state_dict`), e.g.
                                   state/params/encoder/layers_0/attention/query/kernel (T5X's names)
    <directory>/<step>/metadata/   JSON: data-iterator position, model config, anything the caller adds
    <directory>/<step>/checksums.json  size and sha256 of every file of both items

Orbax writes each step to `<step>.orbax-checkpoint-tmp*` and renames it after writing
`commit_success.txt`, so a killed save never looks complete; steps without that marker are skipped.
Orbax does not check the bytes it reads back (a flipped bit in an array file restores as a wrong
value), so each save writes `checksums.json` into the step just before Orbax commits it, and every
restore checks it first: a damaged step raises `CheckpointCorruptError` naming the files and the way
forward instead of being used. Steps saved before checksums were recorded still load, unverified.

Typical use::

    manager = CheckpointManager(model_dir)                       # gin: keep, period
    manager.save(step, state, metadata={'data_step': step})       # no-op unless step % period == 0
    state, metadata = manager.restore(abstract_state)             # latest complete step, target shardings
    params = load_params(model_dir)                               # inference: params only
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Iterator, Mapping

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import serialization

from rest_jax import tree as tree_lib
from rest_jax.model import lora as lora_lib

PyTree = Any

_STATE = "state"
_METADATA = "metadata"
LORA_KEY = "lora"  # metadata of a checkpoint of low-rank adapters (`lora_metadata`)
_COMMIT_MARKER = "commit_success.txt"
_TMP_MARKER = ".orbax-checkpoint-tmp"
# errno values that mean "the disk (or quota, or file-size limit) is full"; tensorstore reports them
# inside a ValueError as "[os_error_code='28']".
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_MAX_LISTED = 20
_CHECKSUMS = "checksums.json"
# Metadata key of steps saved with checksums: such a step without its checksum file is damaged, not old.
_CHECKSUMS_KEY = "checksums"
_HASH_CHUNK = 1 << 22
# tensorstore reports an unreadable or short file with these status codes (inside a ValueError).
_READ_FAILURE = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|NOT_FOUND): .*")
_unverified_logged: set[str] = set()


class CheckpointMismatchError(ValueError):
    """The checkpoint's arrays do not fit the configured model/optimizer."""


class CheckpointDiskFullError(OSError):
    """A save ran out of disk space; earlier checkpoints are intact."""


class CheckpointNotFoundError(FileNotFoundError):
    """No complete checkpoint where one was asked for."""


class CheckpointCorruptError(ValueError):
    """A committed step whose files changed after the save (disk fault, partial copy) or cannot be read."""


def _absolute(path: str | os.PathLike) -> epath.Path:
    """Orbax refuses relative paths; a run directory given relative to the working directory is fine."""
    text = os.fspath(path)
    return epath.Path(text if "://" in text else os.path.abspath(text))


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tree_lib.path_str(path): tuple(getattr(leaf, "shape", np.shape(leaf))) for path, leaf in leaves}


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
        raise CheckpointCorruptError(
            damaged_message(step_dir, [f"checkpoint metadata {path} is unreadable: {e}"])) from e


# -- integrity ------------------------------------------------------------------------------------


def _digest(path: epath.Path) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read in chunks (epath: also gs://)."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _item_files(step_dir: epath.Path) -> list[str]:
    """Files of the step's items, relative to `step_dir` ('state/_METADATA', ...), sorted."""
    files = []
    for item in (_STATE, _METADATA):
        root = step_dir / item
        if root.exists():
            files += [(folder / name).relative_to(step_dir).as_posix()
                      for folder, _, names in root.walk() for name in names]
    return sorted(files)


def write_checksums(step_dir: str | os.PathLike) -> epath.Path:
    """Records size and sha256 of every item file of a fully written step in `<step_dir>/checksums.json`.

    Written under a temporary name and renamed, so a reader never sees half a file.
    """
    step_dir = _absolute(step_dir)
    files = {}
    for rel in _item_files(step_dir):
        size, sha = _digest(step_dir / rel)
        files[rel] = {"size": size, "sha256": sha}
    path = step_dir / _CHECKSUMS
    tmp = step_dir / f".{_CHECKSUMS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
    tmp.rename(path)
    return path


def find_damage(step_dir: str | os.PathLike) -> list[str]:
    """What is wrong with a committed step's files ([] when intact, or when saved before checksums).

    Each entry names a file relative to `step_dir` and the fault: missing, truncated, size changed or
    checksum mismatch.
    """
    step_dir = _absolute(step_dir)
    path = step_dir / _CHECKSUMS
    if not path.exists():
        if _read_json(step_dir).get(_CHECKSUMS_KEY):
            return [f"{_CHECKSUMS} is missing (it is committed with the step, so the step was copied "
                    "incompletely or the file deleted), so its files cannot be checked"]
        if os.fspath(step_dir) not in _unverified_logged:
            _unverified_logged.add(os.fspath(step_dir))
            logging.info("Checkpoint %s has no %s (saved before rest_jax recorded checksums); loading it "
                         "unverified.", step_dir, _CHECKSUMS)
        return []
    try:
        recorded = {rel: (int(v["size"]), str(v["sha256"]))
                    for rel, v in json.loads(path.read_text())["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{_CHECKSUMS} is unreadable ({type(e).__name__}: {e})"]
    problems = []
    for rel, (want_size, want_sha) in sorted(recorded.items()):
        file = step_dir / rel
        if not file.exists():
            problems.append(f"{rel}: missing")
            continue
        size, sha = _digest(file)
        if size < want_size:
            problems.append(f"{rel}: truncated ({size} of {want_size} bytes)")
        elif size != want_size:
            problems.append(f"{rel}: {size} bytes, {want_size} when saved")
        elif sha != want_sha:
            problems.append(f"{rel}: checksum mismatch (contents changed since the save)")
    return problems


def _checksummed_commit(base: type[Any]) -> type[Any]:
    """Orbax's step commit (`base`: rename of the temporary dir, or commit file on GCS), checksums first.

    Orbax calls `finalize` on the primary process once every host's files and the items' own
    finalisation are written; checksums.json is written into the still temporary step directory then,
    so it is committed together with the step (a kill leaves both or neither). Item directories use the
    same class inside the step and are left alone.
    """

    class ChecksummedCommit(base):
        async def finalize(self, *args: Any, **kwargs: Any) -> None:
            if self.get_final().name.isdigit():
                await asyncio.to_thread(write_checksums, self.get())
            await super().finalize(*args, **kwargs)

    ChecksummedCommit.__name__ = ChecksummedCommit.__qualname__ = f"Checksummed{base.__name__}"
    return ChecksummedCommit


_CHECKSUMMED_COMMIT = {base: _checksummed_commit(base) for base in (
    ocp.path.atomicity.AtomicRenameTemporaryPath, ocp.path.atomicity.CommitFileTemporaryPath)}


def _complete_steps(directory: epath.Path) -> list[int]:
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_complete(p))


def damaged_message(step_dir: epath.Path, problems: list[str]) -> str:
    """The error for a damaged step: its path, what is wrong, and how to go on from the command line."""
    shown = problems[:_MAX_LISTED]
    more = f"; ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    step = int(step_dir.name) if step_dir.name.isdigit() else None
    earlier = [s for s in _complete_steps(step_dir.parent) if step is not None and s < step]
    text = (f"Checkpoint {step_dir} is damaged and was not used: " + "; ".join(shown) + more + ". "
            "If it was copied from elsewhere, copy it again. ")
    if earlier:
        prev = step_dir.parent / str(earlier[-1])
        text += (f"Otherwise go on from the previous complete step {earlier[-1]}: delete the damaged step "
                 f"(rm -r {step_dir}) and rerun the same command (training resumes from the newest step "
                 f"left), or load step {earlier[-1]} directly (give {prev} as the checkpoint; rest_jax "
                 f"eval/infer: --gin.evaluate.step={earlier[-1]} / --gin.infer.step={earlier[-1]}).")
    else:
        text += (f"There is no earlier complete step in {step_dir.parent}: restore this one from a backup, or "
                 f"delete it (rm -r {step_dir}) and rerun the same command to start that training again.")
    return text


def verify_step(step_dir: str | os.PathLike) -> None:
    """Raises CheckpointCorruptError when the step's files differ from its recorded checksums."""
    step_dir = _absolute(step_dir)
    problems = find_damage(step_dir)
    if problems:
        raise CheckpointCorruptError(damaged_message(step_dir, problems))


def _read_failure(exc: BaseException) -> str | None:
    """The reason, when `exc` (or its cause) says that a checkpoint file could not be read or parsed."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, json.JSONDecodeError):
            return f"an Orbax metadata file is not valid JSON ({exc})"
        if isinstance(exc, FileNotFoundError):
            return f"a file is missing ({exc})"
        match = _READ_FAILURE.search(str(exc))
        if match:
            return match.group(0)
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _reading(step_dir: epath.Path) -> Iterator[None]:
    """Turns Orbax/tensorstore read failures of `step_dir` into CheckpointCorruptError (with a way forward)."""
    try:
        yield
    except (CheckpointCorruptError, CheckpointMismatchError, CheckpointNotFoundError):
        raise
    except Exception as e:  # noqa: BLE001 - only read failures are translated
        reason = _read_failure(e)
        if reason is None:
            raise
        raise CheckpointCorruptError(damaged_message(step_dir, [reason])) from e


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
    with _reading(step_dir):
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
    with _reading(step_dir):
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


@gin.configurable(allowlist=["async_save", "keep_period"])  # The rest is passed by every caller.
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
      keep_knob: The gin knob that sets `keep` for the loop using this manager (e.g.
        'train.keep_checkpoints'), named by the disk-full error; None when `keep` has no knob.
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, period: int = 1000,
                 keep_period: int | None = None, async_save: bool = False, cleanup_tmp: bool = True,
                 keep_knob: str | None = None):
        if period < 1:
            raise ValueError(f"The checkpoint period ({period}) must be >= 1.")
        if keep is not None and keep < 1:
            raise ValueError(f"{keep_knob or 'keep'}={keep} must be >= 1 or None (keep all).")
        self.directory = _absolute(directory)
        self.period = int(period)
        self.keep = keep
        self.keep_knob = keep_knob
        if cleanup_tmp and jax.process_index() == 0 and self.directory.exists():
            # Orbax's own clean-up misses some names (e.g. '<step>.orbax-checkpoint-tmp-<time>').
            for tmp in self.directory.glob(f"*{_TMP_MARKER}*"):
                logging.warning("Removing %s, left by an interrupted save.", tmp)
                shutil.rmtree(os.fspath(tmp), ignore_errors=True)
        # `temporary_path_class` (deprecated in Orbax for `atomicity_options`, which takes no custom class)
        # is the one hook between the last file written and the commit.
        commit = _CHECKSUMMED_COMMIT[ocp.path.atomicity_defaults.get_default_temporary_path_class(self.directory)]
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1, max_to_keep=keep, keep_period=keep_period,
            enable_async_checkpointing=async_save, cleanup_tmp_directories=cleanup_tmp, create=True,
            temporary_path_class=commit)
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
        meta = {"step": step, **dict(metadata or {}), _CHECKSUMS_KEY: _CHECKSUMS}
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
            f"The partial step was removed; {kept}. {self._free_space_advice()}")

    def _free_space_advice(self) -> str:
        if self.keep_knob is not None and self.keep != 1:
            return (f"Free space, or keep fewer checkpoints (gin: {self.keep_knob}, now {self.keep}), then "
                    "rerun the same command to resume.")
        return "Free space, then rerun the same command to resume."

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
        """The JSON metadata of `step` (latest complete by default), after checking the step's checksums."""
        step_dir = self.step_dir(self._resolve_step(step))
        verify_step(step_dir)
        return _read_json(step_dir)

    def find_damage(self, step: int) -> list[str]:
        """What is wrong with the files of complete step `step` ([] when intact); see `find_damage`."""
        self.wait_until_finished()
        return find_damage(self.step_dir(step))

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
          CheckpointCorruptError: the step's files changed since the save or cannot be read.
        """
        step_dir = self.step_dir(self._resolve_step(step))
        verify_step(step_dir)
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


def read_metadata(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata a step was saved with (`CheckpointManager.save`'s `metadata`)."""
    return _read_json(_absolute(step_dir))


def step_directory(path: str | os.PathLike, step: int | None = None) -> str:
    """The step directory `load_params(path, step=step)` reads (the latest complete step by default)."""
    return os.fspath(_find_step_dir(_absolute(path), step))


def lora_metadata(base_step_dir: str | os.PathLike, step_dir: str | os.PathLike, scale: float,
                  rank: int) -> dict[str, Any]:
    """Metadata that makes a checkpoint of low-rank adapters (`rest_jax.model.lora`) load as a whole policy:
    the adapted checkpoint's step directory (relative to `step_dir` when both are local, so a run directory
    can move) and the adapters' scale."""
    base = os.fspath(base_step_dir)
    if "://" not in base and "://" not in os.fspath(step_dir):
        base = os.path.relpath(os.path.abspath(base), os.path.abspath(os.fspath(step_dir)))
    return {LORA_KEY: {"base": base, "scale": float(scale), "rank": int(rank)}}


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
      The parameter pytree (nested dicts with T5X names). A checkpoint of low-rank adapters (metadata
      `lora_metadata`) returns the parameters of the checkpoint it adapts with the adapters merged in.

    Raises:
      CheckpointCorruptError: the step's files changed since the save or cannot be read.
    """
    step_dir = _find_step_dir(_absolute(path), step)
    verify_step(step_dir)
    meta = _read_json(step_dir)
    if LORA_KEY in meta:
        lora = meta[LORA_KEY]
        base = lora["base"] if "://" in lora["base"] else os.path.normpath(os.path.join(step_dir, lora["base"]))
        params = load_params(base, target=target, shardings=shardings)
        return _merge_adapters(params, _stored_params(step_dir, None, None), lora["scale"], shardings)
    return _stored_params(step_dir, target, shardings)


def _merge_adapters(params: PyTree, adapters: PyTree, scale: float, shardings: PyTree | None) -> PyTree:
    """`lora.merge` of host adapters into `params`; with `shardings`, inside one jit whose outputs have them.

    Sharded `params` may span several processes (a pod), where eager arithmetic between them and host arrays
    is not defined: the adapters (the same on every process) go in replicated and the merge runs as one
    program on the parameters' mesh.
    """
    if shardings is None:
        return lora_lib.merge(params, adapters, scale)
    mesh = getattr(jax.tree.leaves(shardings)[0], "mesh", None)
    if mesh is None:  # e.g. single-device shardings: one process holds everything
        return jax.device_put(lora_lib.merge(params, adapters, scale), shardings)
    adapters = jax.device_put(adapters, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    return jax.jit(lambda p, a: lora_lib.merge(p, a, scale), out_shardings=shardings)(params, adapters)


def stored_params(path: str | os.PathLike, step: int | None = None) -> PyTree:
    """The parameters exactly as a step stored them, as host arrays: an adapter checkpoint's adapters, unmerged
    (`load_params` merges them into the checkpoint they adapt)."""
    step_dir = _find_step_dir(_absolute(path), step)
    verify_step(step_dir)
    return _stored_params(step_dir, None, None)


def _stored_params(step_dir: epath.Path, target: PyTree | None, shardings: PyTree | None) -> PyTree:
    if target is None:
        with _reading(step_dir):
            stored = _stored_tree(step_dir / _STATE)
        if "params" not in stored:
            raise CheckpointMismatchError(f"Checkpoint {step_dir} has no 'params' (items: {sorted(stored)}).")
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored["params"])
    abstract = abstract_state(target, shardings)
    meta = _read_json(step_dir)
    restored = _restore_state(step_dir, {"params": serialization.to_state_dict(abstract)}, partial=True,
                              config_hint=meta.get("model_config"))
    return serialization.from_state_dict(target, restored["params"])
