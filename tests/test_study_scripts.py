"""Which runs the study and cost-comparison scripts start, read off a recording fake `python` (no training).

The scripts themselves are run end to end, at tiny size, by the slow documented-command tests; these check
the row/method selection that those cannot afford to cover case by case.
"""

import os
import pathlib
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$RUN_LOG"
"""


def _runs(tmp_path: pathlib.Path, script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    """Runs `script` with a fake `python` first on PATH; returns each call's (subcommand, MODEL_DIR)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "python").write_text(FAKE_PYTHON)
    (fake_bin / "python").chmod(0o755)
    log = tmp_path / "runs.log"
    log.unlink(missing_ok=True)
    knobs = ("ROWS", "BC", "STUDY_DIR", "METHODS", "BC_DIR", "COST_DIR", "EXPERIMENT", "DPO_LR", "ONLINE_LR")
    base = {k: v for k, v in os.environ.items() if k not in knobs}  # a user's exported knob must not leak in
    subprocess.run(["bash", f"scripts/{script}", *args], cwd=REPO, check=True,
                   env=dict(base, PATH=f"{fake_bin}{os.pathsep}{base['PATH']}", RUN_LOG=str(log), **env))
    calls = []
    for line in log.read_text().splitlines() if log.exists() else []:
        argv = line.split()
        model_dir = next(a for a in argv if a.startswith("--gin.MODEL_DIR="))
        calls.append([argv[2], model_dir.split("=", 1)[1].strip("'")])
    return calls


def test_study_runs_the_default_rows_after_the_bc(tmp_path):
    calls = _runs(tmp_path, "multi30k_study.sh", {"STUDY_DIR": "d"}, "0")
    assert calls == [["rest", "d/s0/bc"], ["rest", "d/s0/rest"], ["rest", "d/s0/control"]]


def test_study_with_empty_rows_trains_the_bc_alone(tmp_path):
    # ROWS= once fell back to the default rows, starting hours of runs nobody asked for.
    assert _runs(tmp_path, "multi30k_study.sh", {"STUDY_DIR": "d", "ROWS": ""}, "0", "1") == [
        ["rest", "d/s0/bc"], ["rest", "d/s1/bc"]]


def test_cost_comparison_with_empty_methods_trains_the_bc_alone(tmp_path):
    assert _runs(tmp_path, "cost_comparison.sh", {"COST_DIR": "c", "METHODS": ""}, "0") == [["rest", "c/s0/bc"]]


def test_cost_comparison_from_a_shared_bc_trains_no_bc(tmp_path):
    calls = _runs(tmp_path, "cost_comparison.sh", {"COST_DIR": "c", "BC_DIR": "b", "METHODS": "dpo grpo"}, "0")
    assert calls == [["rest", "c/s0/dpo"], ["online", "c/s0/grpo"]]


def test_cost_comparison_rejects_an_unknown_method(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as error:
        _runs(tmp_path, "cost_comparison.sh", {"METHODS": "rest dpoo"}, "0")
    assert error.value.returncode == 2
