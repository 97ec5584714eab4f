"""Every benchmark script still runs (slow suite): the small commands benchmarks/README.md documents, as typed,
and tiny-size runs of the scripts it documents only at full size.

A benchmark is run by hand, so nothing else notices when a library change breaks it: the decoder-only
benchmark failed with a KeyError for a day after the policy layer changed. Figures are not checked (speed lives
in the benchmarks' own output); each run must exit 0 and print its result table.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "benchmarks" / "README.md"

# Scripts the README shows only at full size (~5-10 min each), run here at a tiny size.
TINY = {
    "decode_benchmark.py": "--shapes tiny --sources 4 --num_samples 2 --source_len 8 --new_tokens 8 --repeats 1 "
                           "--sweep 1,2",
    "train_benchmark.py": "--shapes tiny --batch 8 --src 8 --tgt 8 --steps 2 --threads 2",
    "multiprocess_benchmark.py": "--shape tiny --layouts 1x2,2x1 --sources 4 --samples 2 --length 8 --batch 4 "
                                 "--steps 2",
}
# Scripts covered elsewhere: their own test below, or another test file.
NOT_HERE = {
    "improve_memory_benchmark.py": "tests/test_improve_memory.py runs its measurement",
    "improve_stage_benchmark.py": "test_improve_stage_benchmark_runs_on_a_finished_run (needs a run's Grow store)",
}


SIZE_FLAGS = ("--shape", "--shapes", "--steps", "--iterations", "--sources", "--batch")


def _documented_small_commands() -> list[str]:
    """README lines `python benchmarks/X.py <options>` in code blocks (not the `command:` lines of results) that
    reduce the work with a size option."""
    lines = [line.split("#", 1)[0].strip() for line in README.read_text().splitlines()]
    return [line for line in lines if re.match(r"python benchmarks/\w+\.py ", line)
            and any(flag in shlex.split(line) for flag in SIZE_FLAGS)]


def _commands() -> list[str]:
    commands = _documented_small_commands()
    commands += [f"python benchmarks/{script} {options}" for script, options in TINY.items()]
    return commands


def test_every_benchmark_script_is_run_here():
    scripts = {p.name for p in (REPO / "benchmarks").glob("*_benchmark.py")}
    run = {shlex.split(c)[1].split("/")[-1] for c in _commands()}
    assert scripts - run - set(NOT_HERE) == set()
    assert set(NOT_HERE) <= scripts


@pytest.mark.slow  # minutes each: the slow suite keeps the benchmarks runnable
@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(shlex.split(c)[1:]))
def test_benchmark_command_runs(command):
    _run_ok(shlex.split(command)[1:])


@pytest.mark.slow
def test_improve_stage_benchmark_runs_on_a_finished_run(tmp_path):
    from rest_jax import inspection  # pylint: disable=import-outside-toplevel

    run_dir = inspection.make_tiny_run(tmp_path / "run")
    _run_ok(["benchmarks/improve_stage_benchmark.py", run_dir, "--steps", "4"])


def _run_ok(args: list[str]) -> None:
    """Runs a benchmark script from the repository root; it must exit 0 and print a table."""
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "|---" in proc.stdout or "| ---" in proc.stdout, proc.stdout[-2000:]
