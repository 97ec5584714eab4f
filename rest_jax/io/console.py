"""What a command prints: quiet by default, everything with `--verbose`.

By default a run shows a progress bar per stage, one summary line when a stage ends (`stage_done`), the
lines a user needs (where the config went, what a resumed run starts from) and warnings.  Off unless
`--verbose` (or REST_JAX_VERBOSE=1): library INFO logs (Orbax, absl, JAX, TensorFlow), rest_jax's own
detail lines (per-step scalars, checkpoint saves, sharding notices, filter statistics) and the C++
start-up lines of TensorFlow and XLA (oneDNN, cuda, cuInit).  TensorBoard event files are the same
either way.

The Python side uses logging levels only: root at WARNING keeps libraries to warnings, the `rest_jax`
logger at WARNING hides the detail lines, and `rest_jax.console` (this module's `logger`) stays at INFO.
The C++ side logs through absl before anything calls `absl::InitializeLog()`, which writes every severity
to file descriptor 2 and honours neither TF_CPP_MIN_LOG_LEVEL nor a runtime flag; `quiet_native_stderr`
therefore points descriptor 2 elsewhere while those libraries start, and replays what it caught when the
start-up fails.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import Iterator

VERBOSE_ENV = "REST_JAX_VERBOSE"
QUIET_FORMAT = "%(asctime)s %(levelname)s %(message)s"
QUIET_DATE_FORMAT = "%H:%M:%S"

# Run-directory markers, named here rather than imported: modules with gin configurables (checkpoints,
# report) cannot be imported after the command line has locked the config.
STAGE_FILE = "stage.json"  # rest_jax.report.STAGE_FILE: a finished ReST stage
COMMIT_MARKER = "commit_success.txt"  # Orbax's, as rest_jax.checkpoints: a complete checkpoint step

# User-facing lines (stage summaries, progress without a terminal, resume notices): shown by default.
logger = logging.getLogger("rest_jax.console")


def verbose_from_env() -> bool:
    """True when REST_JAX_VERBOSE asks for everything (1, true, yes)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def verbosity(verbose: bool) -> Iterator[None]:
    """Sets the logging levels (and, when quiet, a shorter line format) for a run; restores the old ones on
    exit, so a program or test that calls `rest_jax.main.main` in-process keeps its own logging set-up."""
    loggers = [logging.getLogger(), logging.getLogger("rest_jax"), logger]
    saved = [lg.level for lg in loggers]
    levels = [logging.INFO, logging.NOTSET, logging.NOTSET] if verbose else [logging.WARNING, logging.WARNING,
                                                                             logging.INFO]
    # Only the console handlers that logging.basicConfig installs (test harness handlers keep theirs).
    handlers = [] if verbose else [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]
    formatters = [h.formatter for h in handlers]
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)
    for h in handlers:
        h.setFormatter(logging.Formatter(QUIET_FORMAT, QUIET_DATE_FORMAT))
    try:
        yield
    finally:
        for lg, level in zip(loggers, saved):
            lg.setLevel(level)
        for h, formatter in zip(handlers, formatters):
            h.setFormatter(formatter)


@contextlib.contextmanager
def quiet_native_stderr(enabled: bool = True) -> Iterator[None]:
    """Sends what is written to file descriptor 2 inside the block to a temporary file.

    For library start-up (imports, backend initialisation), whose C++ log lines cannot be turned off
    otherwise.  If the block raises an error, the caught text is written to stderr before the exception
    goes on, so a failed start-up still shows its cause.
    """
    if not enabled:
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no real descriptor 2 (e.g. an embedding host)
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        failed = False
        try:
            yield
        except Exception:  # not Ctrl-C: an interrupted start-up has nothing to explain
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                caught.seek(0)
                sys.stderr.write(caught.read().decode("utf-8", "replace"))
                sys.stderr.flush()


def format_seconds(seconds: float) -> str:
    """'0.4s', '42s', '3m05s', '2h01m' (a stage's wall time)."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def stage_done(stage: str, seconds: float, figures: str) -> None:
    """The one line a stage prints when it ends: `<stage> done in <time>: <figures>`."""
    logger.info("%s done in %s: %s", stage, format_seconds(seconds), figures)


def _relative(path: str, root: str) -> str:
    rel = os.path.relpath(path, root) if "://" not in root else path[len(root):].lstrip("/")
    return rel.replace(os.sep, "/")


def kept_after_interrupt(model_dir: str) -> str | None:
    """What an interrupted run left in `model_dir` for a rerun (finished stages, newest complete checkpoint),
    or None when nothing.

    Read from the files alone (stage.json markers, committed checkpoint steps), so it is right whichever
    command or stage was running; a save cut short is an Orbax tmp directory, never a step.
    """
    from etils import epath  # pylint: disable=import-outside-toplevel

    root = epath.Path(model_dir)
    try:
        stages = sorted((p for depth in ("*", "*/*") for p in root.glob(f"{depth}/{STAGE_FILE}")),
                        key=lambda p: p.stat().mtime)
        steps = [p for depth in ("", "*/", "*/*/") for p in root.glob(f"{depth}checkpoints/*")
                 if p.name.isdigit() and (p / COMMIT_MARKER).exists()]
        # mtime has whole seconds on some file systems: the step number breaks ties within a directory.
        newest = max(steps, key=lambda p: (p.stat().mtime, int(p.name)), default=None)
    except OSError as e:  # e.g. the directory is gone or unreadable
        return f"unknown ({model_dir}: {e})"
    parts = []
    if stages:
        parts.append("finished stages " + ", ".join(_relative(os.fspath(p.parent), os.fspath(root)) for p in stages))
    if newest is not None:
        parts.append(f"checkpoint {newest}")
    return "; ".join(parts) or None


def interrupted_line(command: str, model_dir: str | None) -> str:
    """The one line printed on Ctrl-C: what was kept and how to go on."""
    kept = kept_after_interrupt(model_dir) if model_dir else None
    if kept is not None:
        return f"rest_jax {command}: interrupted. Kept: {kept}. Rerun the same command to resume (what is kept " \
               "is not redone)."
    nothing = f"nothing finished yet in {model_dir}" if model_dir else "nothing was saved"
    return f"rest_jax {command}: interrupted; {nothing}. Rerun the same command to start again."


def start_tensorflow() -> None:
    """Initialises TensorFlow's device platforms now, when it is imported: call inside
    `quiet_native_stderr`, since TF logs failed probes (cuInit without a GPU) at its first data op."""
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        tf.config.list_physical_devices()
