"""A rerun in a MODEL_DIR that already holds work must use the settings that made that work.

`rest` skips its finished stages and `train` resumes from its checkpoints, so a rerun with other settings
would leave that work as it was while `config.gin`, rewritten before the run, claimed the new values made
it.  The rule, checked by the command line before it saves `config.gin` (also with --dry_run):

  When MODEL_DIR holds finished work (`rest`: the trained vocabulary, a finished stage, BC checkpoints;
  `online`: those of BC and a checkpoint or the finished online stage; `train`: a committed checkpoint) and has a `config.gin`, the new config must give every binding the value
  that `config.gin` gives it (macros compared through the bindings that use them; MODEL_DIR itself is
  not compared, so a moved run directory still resumes; two strings that name the same existing local
  file or directory, e.g. `run_rest.bc_run` given once absolute and once relative, are the same value,
  a relative one read from the working directory of this run).  Only knobs that cannot change finished work may
  differ: how processes start (`initialize_multihost.*`) and how progress is logged
  (`progress.log_every_secs`); for `train` also how far and how often it checkpoints and evaluates
  (`train.num_steps`, `.checkpoint_period`, `.keep_checkpoints`, `.eval_period`), since a resumed run
  continues the same trajectory (data order, dropout and learning rate depend only on the step); for `rest`
  also how many Grow steps (`run_rest.num_grow_steps`) and, while no Grow after the first has begun, how many
  Improve steps per Grow (`run_rest.num_improve_steps`): a stage depends only on the stages before it, so a
  finished run extended by more steps equals the longer run (`rest.extension_knobs`; Grow g >= 2 samples from
  the policy G=g-1's last Improve step left, so I is fixed once it has begun).

Otherwise the command exits with status 2, lists the differing bindings and leaves `config.gin` alone.
When only allowed knobs differ, the earlier config is kept as `config.<k>.gin` (`gin_utils.save_config`).
A MODEL_DIR with work but no `config.gin` (made by calling the functions directly) is not checked.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import os
import tokenize
from typing import Callable, Sequence

from etils import epath

from rest_jax import gin_utils
from rest_jax.gin_utils import GinConfigError


@dataclasses.dataclass(frozen=True)
class Resumable:
    """A subcommand that reuses the work already in its MODEL_DIR."""

    # "module:function", function(model_dir) -> the finished work found there, as paths relative to it.
    finished_work: str
    # Bindings (fnmatch patterns over `configurable.param`) that cannot change that work.
    safe_knobs: tuple[str, ...] = ()
    # "module:function", function(model_dir) -> more such patterns, given what `model_dir` holds now.
    safe_knobs_in: str | None = None


# Knobs that say how a run is started or logged, never what it computes.
SAFE_KNOBS = ("initialize_multihost.*", "progress.log_every_secs")

RESUMABLE: dict[str, Resumable] = {
    "rest": Resumable("rest_jax.rest:finished_work", safe_knobs_in="rest_jax.rest:extension_knobs"),
    "online": Resumable("rest_jax.online:finished_work"),
    "train": Resumable("rest_jax.train:finished_work",
                       ("train.num_steps", "train.checkpoint_period", "train.keep_checkpoints", "train.eval_period")),
}

_MAX_LISTED = 12


def _load(spec: str) -> Callable[..., Sequence[str]]:
    module, function = spec.split(":", 1)
    return getattr(importlib.import_module(module), function)


def _summary(items: Sequence[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _same_value(old: object, new: object) -> bool:
    """Whether a binding's old and new values are the same: equal, or two spellings of one existing local
    path (`runs/x/s0/bc` from /work and `/work/runs/x/s0/bc`), since a path setting such as
    `run_rest.bc_run` names work, not text."""
    if old == new:
        return True
    if not (isinstance(old, str) and isinstance(new, str)) or "://" in old + new or not (old and new):
        return False
    try:
        return os.path.samefile(old, new)
    except OSError:  # either does not exist here
        return False


def check(command: str, model_dir: str, config_text: str, config_filename: str = "config.gin") -> None:
    """Refuses a rerun of `command` whose config differs from the one that made the work in `model_dir`.

    Args:
      command: the subcommand; only those in `RESUMABLE` are checked.
      model_dir: the run directory (local or gs://).
      config_text: the gin config about to run (`gin.config_str()`).
      config_filename: the saved config of the earlier run(s) in `model_dir`.
    Raises:
      GinConfigError: the differing bindings, the finished work, and what to do.
    """
    resumable = RESUMABLE.get(command)
    path = epath.Path(os.fspath(model_dir)) / config_filename
    if resumable is None or not path.exists():
        return
    work = list(_load(resumable.finished_work)(os.fspath(model_dir)))
    if not work:
        return  # nothing made yet: the new settings apply to everything
    try:
        old = path.read_text()
        differences = gin_utils.diff_configs(old, config_text, opaque_macros=["MODEL_DIR"], same=_same_value)
    except (OSError, SyntaxError, ValueError, tokenize.TokenError) as e:
        raise GinConfigError(f"{path} cannot be read as gin ({type(e).__name__}: {e}), so the work in "
                             f"{model_dir} ({_summary(work)}) cannot be checked against this run's settings. "
                             "Restore it, or use a new MODEL_DIR.") from e
    safe = (*SAFE_KNOBS, *resumable.safe_knobs)
    if resumable.safe_knobs_in:
        safe += tuple(_load(resumable.safe_knobs_in)(os.fspath(model_dir)))
    unsafe = [d for d in differences if not any(fnmatch.fnmatchcase(d[0], pattern) for pattern in safe)]
    if not unsafe:
        return
    lines = [f"{model_dir} holds work made with other settings ({config_filename}): {_summary(work)}. "
             f"A rerun {'skips' if command == 'rest' else 'resumes'} that work, so these settings would not "
             "apply to it:"]
    lines += [f"  {name}: {old_value} -> {new_value}" for name, old_value, new_value in unsafe[:_MAX_LISTED]]
    if len(unsafe) > _MAX_LISTED:
        lines.append(f"  ... and {len(unsafe) - _MAX_LISTED} more")
    lines.append(f"Use a new MODEL_DIR, or delete that work to redo it with these settings, or rerun with the "
                 f"settings in {path}.")
    raise GinConfigError("\n".join(lines))
