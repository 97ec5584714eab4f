"""The whole ReST loop on the generated demo pair, and a kill-and-resume of it (ReST Alg. 1; issue 6).

The killed run is SIGKILLed in the middle of Grow (after its first shard is committed) and rerun with the
same command; its Grow store, Improve results and report must equal those of an uninterrupted run.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from rest_jax import inspect
from rest_jax.data import grow_store

REPO = pathlib.Path(__file__).resolve().parents[1]

# The small demo setting shared with the notebook: BC 40 steps, Grow 48 sources x N=2, I=0 and I=1.
SMALL = list(inspect.TINY_RUN_OVERRIDES)


def _command(model_dir, demo_dir):
    return [sys.executable, "-m", "rest_jax.main", "rest", "--gin_file=experiments/demo.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.demo_source.data_dir='{demo_dir}'", *SMALL]


def _env():
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "")
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run(model_dir, demo_dir):
    proc = subprocess.run(_command(model_dir, demo_dir), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _store_columns(model_dir):
    data = grow_store.GrowStore(os.path.join(model_dir, "grow_1", "store")).as_numpy(
        ["source_id", "sample_id", "reward", "candidate_text", "behaviour_logprob_sum"])
    order = np.lexsort((data["sample_id"], data["source_id"]))
    return {k: v[order] for k, v in data.items()}


def test_rest_loop_end_to_end_and_kill_resume(tmp_path):
    demo = tmp_path / "demo"
    plain = tmp_path / "plain"
    proc = _run(plain, demo)
    report = json.loads((plain / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["BC G=0 I=0", "ReST G=1 I=0", "ReST G=1 I=1"]
    for row in report["rows"]:
        assert 0.0 <= row["reward"] <= 1.0 and 0.0 <= row["chrf"] <= 100.0
    assert "| BC G=0 I=0 |" in proc.stdout and (plain / "report.md").exists()
    for plot in ("grow_rewards.png", "validation_reward.png", "best_of_n.png"):
        assert (plain / "plots" / plot).stat().st_size > 1000
    # The Grow store holds every (source, sample) once, references included, with rewards in [0, 1].
    cols = _store_columns(plain)
    assert len(cols["reward"]) == 48 * 3
    assert set(cols["sample_id"]) == {-1, 0, 1}
    assert ((cols["reward"] >= 0) & (cols["reward"] <= 1)).all()
    # An Improve step keeps the best checkpoint on validation reward: never below its starting policy.
    improve = json.loads((plain / "grow_1" / "improve_0" / "stage.json").read_text())
    assert improve["validation_reward"] == max(v for _, v in improve["curve"])

    # Kill in the middle of Grow, rerun the same command.
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(killed, demo), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    store = killed / "grow_1" / "store"
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if store.exists() and any(p.name.endswith(".tfrecord") for p in store.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before Grow committed a shard; cannot test the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (store / "metadata.json").exists()
    _run(killed, demo)
    resumed = json.loads((killed / "report.json").read_text())
    assert resumed["rows"] == report["rows"]
    a, b = _store_columns(plain), _store_columns(killed)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
