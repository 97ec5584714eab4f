"""Every benchmark script still runs (slow suite): the small commands benchmarks/README.md documents, as typed,
and tiny-size runs of the scripts it documents only at full size.

A benchmark is run by hand, so nothing else notices when a library change breaks it: the decoder-only
benchmark failed with a KeyError for a day after the policy layer changed. Figures are not checked (speed lives
in the benchmarks' own output); each run must exit 0 and print its result table.
"""

import json
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


# An accelerator image (the device tool's: jax, flax, optax, orbax, torch, no TensorFlow) lacks these; the
# model, the sampler and the train step must import without them (the vocabularies and data need them).
NOT_ON_ACCELERATOR_IMAGE = ("tensorflow", "seqio", "tensorflow_datasets")
_BLOCKER = f"""import sys
class _NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_ACCELERATOR_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the accelerator image)", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
"""


def _without_tensorflow(tmp_path: pathlib.Path) -> dict:
    """An environment whose Python processes (and their subprocesses) cannot import NOT_ON_ACCELERATOR_IMAGE."""
    site = tmp_path / "no_tensorflow"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCKER)
    return dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO}", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")


def test_model_sampler_and_train_step_import_without_tensorflow(tmp_path):
    env = _without_tensorflow(tmp_path)
    modules = ["rest_jax.model.t5", "rest_jax.model.decoder_only", "rest_jax.decoding", "rest_jax.losses",
               "rest_jax.optim", "rest_jax.partitioning", "rest_jax.trainer", "rest_jax.metrics"]
    code = "import importlib\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The blocker works: the vocabularies (seqio) do not import.
    proc = subprocess.run([sys.executable, "-c", "import rest_jax.data.vocab"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "not on the accelerator image" in proc.stderr


def test_dtype_benchmark_table_gives_mfu_over_the_spec_sheet_on_an_accelerator():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import dtype_benchmark  # pylint: disable=import-outside-toplevel
    finally:
        sys.path.pop(0)
    rows = [{"stage": "Grow", "impl": "rest_jax", "dtype": dtype, "tokens_per_s": tokens, "gflops_per_s": gflops,
             "of_peak": 0.5, "peak_rss_mb": 2000.0, "device_peak_mb": 512.0}
            for dtype, tokens, gflops in (("float32", 1000.0, 98.9), ("bfloat16", 2000.0, 197.8))]
    lines = dtype_benchmark.table(rows, spec_peak=989.0).splitlines()
    assert "MFU (bf16 spec) | device peak MB" in lines[0] and lines[1].count("|") == lines[0].count("|")
    # 98.9 / 989 = 10%, 197.8 / 989 = 20%; bfloat16 at twice float32's tokens/s.
    assert lines[2].endswith("| 10.0% | 512 | 1.00x | - |") and lines[3].endswith("| 20.0% | 512 | 2.00x | - |")
    assert "MFU" not in dtype_benchmark.table(rows, spec_peak=None)  # a CPU has no spec sheet


@pytest.mark.slow
def test_accelerator_check_runs_without_tensorflow(tmp_path):
    """benchmarks/accelerator_check.sh, the prepared command for a lent GPU, at a tiny size on this CPU (JAX's
    default device here) with TensorFlow and seqio hidden as on the accelerator image."""
    env = dict(_without_tensorflow(tmp_path), PYTHON=sys.executable, OUT=str(tmp_path))
    proc = subprocess.run(["bash", "benchmarks/accelerator_check.sh", "--shape", "tiny", "--repeats", "1",
                           "--steps", "2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "accelerator_check.json").read_text())
    assert [(r["stage"], r["dtype"]) for r in result["rows"]] == [
        ("Grow", "float32"), ("Grow", "bfloat16"), ("Improve", "float32"), ("Improve", "bfloat16")]
    assert all(r["tokens_per_s"] > 0 for r in result["rows"]) and "|---" in proc.stdout


def _run_ok(args: list[str]) -> None:
    """Runs a benchmark script from the repository root; it must exit 0 and print a table."""
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "|---" in proc.stdout or "| ---" in proc.stdout, proc.stdout[-2000:]
