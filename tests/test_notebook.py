"""notebooks/inspect_checkpoint.ipynb executed end to end on a tiny ReST run, and rest_jax.inspection on that run.

The run is the small demo loop of tests/test_rest_loop.py (`rest_jax.inspection.TINY_RUN_OVERRIDES`), made once
per session in a subprocess (~1-2 minutes on two CPU cores); the notebook then takes ~30 s. The kernel is
ipykernel on this interpreter, through a kernel spec written for the test (first on JUPYTER_PATH), so a fresh
venv with `pip install -e .[test]` needs no `ipykernel install`, and a user's own `python3` kernel spec
pointing at another Python cannot be picked up instead.
"""

import json
import os
import pathlib
import re
import sys

import gin
# Test dependencies (setup.py's test extra); imported plainly so that a missing one fails CI, not skips.
import nbclient
import nbformat
import pytest

from rest_jax import inspection as ri
from rest_jax.data import grow_store

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "inspect_checkpoint.ipynb"
KERNEL_NAME = "rest-jax-test-python"
NUM_GROW_SOURCES, NUM_SAMPLES, NUM_VALIDATION = 48, 2, 16  # as in TINY_RUN_OVERRIDES



@pytest.fixture(autouse=True)
def _clean_gin():
    """load_run_config parses a run's gin config globally; leave no trace for other test files."""
    yield
    gin.clear_config()
    ri._LOADED_RUN = None  # pylint: disable=protected-access

def _kernel_env(run_dir):
    env = dict(os.environ)
    env["REST_JAX_RUN_DIR"] = str(run_dir)
    # The tiny model runs fastest on one CPU device; conftest simulates 8 for the sharding tests.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (rest_jax test)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL_NAME


def test_notebook_executes_end_to_end(tiny_run, kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600, allow_errors=False,
                                     resources={"metadata": {"path": str(REPO)}})
    client.execute(env=_kernel_env(tiny_run))  # raises CellExecutionError on the first failing cell

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    # It used the run it was given (no tiny run of its own), and every section printed its part.
    assert f"Run directory: {tiny_run}" in text and "making a tiny demo run" not in text
    for stage in ("bc", "grow_1", "grow_1/improve_0", "grow_1/improve_1"):
        assert re.search(rf"^{re.escape(stage)}\s+\|", text, re.M), stage
    for name in ("BC G=0 I=0 @ step 20", "BC G=0 I=0 @ step 40", "ReST G=1 I=1 @ step"):
        assert name in text
    # The notebook's BC translations (latest BC checkpoint, loaded by stage name in the kernel) are the ones
    # run_rest saved when it evaluated that checkpoint.
    shown = re.findall(r"^BC G=0 I=0 @ step 40\s*: (.*)$", text, re.M)
    assert shown == ri.saved_outputs(tiny_run, "bc", "validation")[:3]
    assert f"Grow 1: {NUM_GROW_SOURCES * NUM_SAMPLES} samples" in text
    assert "Just above τ (kept):" in text and "Just below τ (dropped):" in text
    assert "mean reward over these 6" in text
    # The two plots (Grow reward histogram, validation curves) are rendered images.
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2


def test_listing_matches_the_run(tiny_run):
    stages = ri.list_stages(tiny_run)
    assert [s.key for s in stages] == ["bc", "grow_1", "grow_1/improve_0", "grow_1/improve_1"]
    assert all(s.finished for s in stages)
    report = json.loads((tiny_run / "report.json").read_text())
    assert [s.name for s in stages if s.kind != "grow"] == [r["name"] for r in report["rows"]]
    rows = ri.list_checkpoints(tiny_run)
    # BC: train.num_steps=40, checkpoint_period=20. Improve saves its best step (at least 1).
    expected = [("bc", 20), ("bc", 40)] + [
        (s.key, max(int(s.result["best_step"]), 1)) for s in stages if s.kind == "improve"]
    assert [(r["stage"], r["step"]) for r in rows] == expected
    for r in rows:
        assert (pathlib.Path(r["path"]) / "commit_success.txt").exists()
    rewards = ri.grow_rewards(tiny_run)["Grow 1"]
    store = grow_store.GrowStore(tiny_run / "grow_1" / "store")
    assert len(rewards) == NUM_GROW_SOURCES * NUM_SAMPLES == store.metadata["counts"]["samples"]
    assert rewards.mean() == pytest.approx(store.reward_stats["samples"]["mean"], abs=1e-6)
    assert ri.improve_thresholds(tiny_run) == {"G=1 I=0": 0.0, "G=1 I=1": 0.7}  # runs/rest.gin schedule


def test_policies_by_stage_reproduce_the_saved_translations(tiny_run):
    """Loading by stage name (gin config from the run dir) gives the policy run_rest evaluated."""
    ri.load_run_config(tiny_run)
    sources, _ = ri.split_data(tiny_run, "validation", NUM_VALIDATION)
    for stage in ("bc", "final"):
        saved = ri.saved_outputs(tiny_run, stage, "validation")
        assert len(saved) == NUM_VALIDATION
        assert ri.translate(ri.load_stage_policy(tiny_run, stage), sources) == saved, stage
    rows = ri.compare_outputs(tiny_run, ["bc", "final"], n=4, translate_missing=False)
    assert [r["source"] for r in rows] == sources[:4]
