"""The ReST loop as several JAX processes gives what one process gives (issue 12, item 3).

Runs the tiny demo loop (`rest_jax.inspection.TINY_RUN_OVERRIDES`: BC, one Grow, Improve I=0 and I=1, the
report) with `rest_jax launch` as P processes × K devices and as one process with P×K devices, the
reference, and compares the report table to the printed digit, the kept fractions, and the Grow store.
"""

import collections
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from rest_jax import checkpoints
from rest_jax import inspection as run_inspect
from rest_jax.data import grow_store as store_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _rest(run_dir: pathlib.Path, demo_dir: pathlib.Path, processes: int, devices: int,
          extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = ["rest", "--gin_file=experiments/demo.gin", f"--gin.MODEL_DIR={str(run_dir)!r}",
               f"--gin.demo_source.data_dir={str(demo_dir)!r}", *run_inspect.TINY_RUN_OVERRIDES, *extra]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    if processes > 1:
        argv = [sys.executable, "-m", "rest_jax.main", "launch", f"--num_processes={processes}",
                f"--devices_per_process={devices}", "--grace_s=10", "--", *command]
    else:
        argv = [sys.executable, "-m", "rest_jax.main", *command]
    proc = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc


def _printed(report: dict) -> list[tuple]:
    """The report table as printed: reward, BLEU and chrF to one decimal, kept fraction to three."""
    rows = [(r["name"], f"{100 * r['reward']:.1f}", f"{r['bleu']:.1f}", f"{r['chrf']:.1f}",
             None if r["kept_fraction"] is None else f"{r['kept_fraction']:.3f}") for r in report["rows"]]
    rows += [(b["policy"], b["n"], f"{100 * b['reward']:.1f}", f"{b['bleu']:.1f}") for b in report["best_of_n"]]
    return rows


def _store(run_dir: pathlib.Path) -> dict[tuple[int, int], str]:
    data = store_lib.GrowStore(run_dir / "grow_1" / "store").as_numpy(["source_id", "sample_id", "candidate_text"])
    keys = [(int(s), int(i)) for s, i in zip(data["source_id"], data["sample_id"])]
    counts = collections.Counter(keys)
    assert max(counts.values()) == 1, "a (source, sample) pair is in the store twice"
    return dict(zip(keys, data["candidate_text"]))


def _grow_scalars(run_dir: pathlib.Path) -> dict[str, float]:
    """Grow's TensorBoard scalars (written by process 0), read with TensorFlow's own event reader."""
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    (events,) = (run_dir / "grow_1" / "grow").glob("events.out.tfevents.*")
    return {v.tag: v.simple_value for e in tf.compat.v1.train.summary_iterator(str(events))
            for v in e.summary.value if v.WhichOneof("value") == "simple_value"}


def _compare(tmp_path: pathlib.Path, processes: int, devices: int, extra: tuple[str, ...] = ()) -> None:
    demo = tmp_path / "demo"
    one = tmp_path / "one"
    many = tmp_path / "many"
    _rest(one, demo, 1, processes * devices, extra)
    proc = _rest(many, demo, processes, devices, extra)
    want = json.loads((one / "report.json").read_text())
    got = json.loads((many / "report.json").read_text())
    assert _printed(got) == _printed(want)
    # Beyond the printed digits: Improve's validation curves and last training loss (the tiny run's policy is
    # weak, so the table alone would hide a different training run).
    for w, g in zip(want["stages"], got["stages"]):
        assert [(s, round(r, 4)) for s, r in w.get("curve", [])] == [(s, round(r, 4)) for s, r in g.get("curve", [])]
        if w.get("last_train_loss") is not None:
            assert g["last_train_loss"] == pytest.approx(w["last_train_loss"], rel=1e-4)
    # Only process 0 prints the table.
    assert proc.stdout.count("# ReST on demo_synthetic") == 1, proc.stdout[-3000:]
    # Checkpoints written by P processes together restore in this one process to the parameters the
    # one-process run trained (BC) and selected (the last Improve step).
    for stage in ("bc", "grow_1/improve_1"):
        w = checkpoints.load_params(one / stage / "checkpoints")
        g = checkpoints.load_params(many / stage / "checkpoints")
        assert jax.tree.structure(w) == jax.tree.structure(g)
        for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(g)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)
    want_store, got_store = _store(one), _store(many)
    # Every Grow source (run_rest.max_grow_sources=48 in the tiny run) exactly once, with all its samples.
    assert {s for s, _ in got_store} == set(range(48))
    assert got_store.keys() == want_store.keys()
    same = np.mean([got_store[k] == want_store[k] for k in want_store])
    assert same >= 0.95, f"only {same:.1%} of the Grow samples are the same text"
    # Process 0's Grow scalars describe every process's samples (diversity gathered, rewards from the store).
    w, g = _grow_scalars(one), _grow_scalars(many)
    for tag in ("distinct_1", "distinct_2", "length_ratio", "reward/mean"):
        assert g[tag] == pytest.approx(w[tag], abs=1e-3), (tag, w, g)


@pytest.mark.slow
def test_two_processes_give_the_one_process_report(tmp_path):
    """The fast suite checks 2 x 4 against 1 x 1 through the README's launch command
    (test_documented_commands.py, check_launch); this compares more, at 2 x 2 against 1 x 4."""
    _compare(tmp_path, 2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("processes,devices", [(2, 4), (4, 2)])
def test_more_processes_give_the_one_process_report(tmp_path, processes, devices):
    _compare(tmp_path, processes, devices)


@pytest.mark.slow
def test_lora_improve_steps_as_two_processes_give_the_one_process_report(tmp_path):
    """Improve with LoRA adapters (issue 17): I=1 starts from I=0's adapter checkpoint, which every process loads
    merged into the sharded base parameters (`checkpoints.load_params` of an adapter chain across processes)."""
    _compare(tmp_path, 2, 2, ("--gin.improve_step.lora=@LoraConfig()",))
    meta = checkpoints.read_metadata(checkpoints.step_directory(tmp_path / "many" / "grow_1" / "improve_1" /
                                                                "checkpoints"))
    assert checkpoints.LORA_KEY in meta, sorted(meta)  # the I=1 checkpoint holds adapters, not a whole policy


@pytest.mark.slow
def test_one_device_gives_the_report_of_many(tmp_path):
    """The 1-process x 1-device run prints the table of the 1 x 4 run (the fast test ties 1 x 4 to 2 x 2)."""
    demo = tmp_path / "demo"
    _rest(tmp_path / "one", demo, 1, 1)
    _rest(tmp_path / "four", demo, 1, 4)
    want, got = (json.loads((tmp_path / r / "report.json").read_text()) for r in ("four", "one"))
    assert _printed(got) == _printed(want)


def _launch_argv(run_dir: pathlib.Path, demo_dir: pathlib.Path, grace_s: float) -> list[str]:
    return [sys.executable, "-m", "rest_jax.main", "launch", "--num_processes=2", "--devices_per_process=2",
            f"--grace_s={grace_s:g}", "--", "rest", "--gin_file=experiments/demo.gin",
            f"--gin.MODEL_DIR={str(run_dir)!r}", f"--gin.demo_source.data_dir={str(demo_dir)!r}",
            *run_inspect.TINY_RUN_OVERRIDES, "--gin.initialize_multihost.heartbeat_timeout_s=20"]


def _process_with_id(launcher: subprocess.Popen, process_id: int):
    import psutil  # pylint: disable=import-outside-toplevel

    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("REST_JAX_PROCESS_ID") == str(process_id):
            return child
    return None


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["grow", "improve"])
def test_killed_process_stops_the_job_and_the_rerun_gives_the_same_report(tmp_path, stage):
    """SIGKILL of process 1 mid-Grow / mid-Improve: process 0 exits on its own (jax.distributed's heartbeat,
    not the launcher's grace period) within 60 s, and rerunning the same launch gives the uninterrupted
    report."""
    demo, one, many = tmp_path / "demo", tmp_path / "one", tmp_path / "many"
    _rest(one, demo, 1, 4)
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    argv = _launch_argv(many, demo, grace_s=600)
    launcher = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    marker = (many / "grow_1" / "store") if stage == "grow" else (many / "grow_1" / "improve_0")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and launcher.poll() is None:
        if marker.exists() and (stage != "grow" or any(marker.glob("shard-*.tfrecord"))):
            break
        time.sleep(0.1)
    assert launcher.poll() is None, "the run ended before the kill"
    victim = _process_with_id(launcher, 1)
    killed_at = time.monotonic()
    victim.kill()
    out, _ = launcher.communicate(timeout=300)
    assert launcher.returncode != 0, out[-3000:]
    assert time.monotonic() - killed_at < 60, out[-3000:]
    assert "[launch] process 1 was killed by SIGKILL" in out
    assert "stopping the processes still running" not in out  # process 0 stopped by itself
    assert not (many / "report.json").exists()
    rerun = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-5000:]
    want = json.loads((one / "report.json").read_text())
    got = json.loads((many / "report.json").read_text())
    assert _printed(got) == _printed(want)
    assert _store(many).keys() == _store(one).keys()


@pytest.mark.slow
def test_bc_checkpointed_by_one_process_resumes_as_two(tmp_path):
    """A run killed mid-BC in one process (1 x 4 devices), rerun as 2 processes x 2 devices: BC resumes from
    the one-process checkpoint with the same data order, and the report is the uninterrupted run's."""
    demo, one, moved = tmp_path / "demo", tmp_path / "one", tmp_path / "moved"
    _rest(one, demo, 1, 4)
    command = [sys.executable, "-m", "rest_jax.main", "rest", "--gin_file=experiments/demo.gin",
               f"--gin.MODEL_DIR={str(moved)!r}", f"--gin.demo_source.data_dir={str(demo)!r}",
               *run_inspect.TINY_RUN_OVERRIDES]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = moved / "bc" / "checkpoints" / "20" / "commit_success.txt"
    deadline = time.monotonic() + 900
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.kill()
    first.wait()
    assert checkpoint.exists() and not (moved / "bc" / "stage.json").exists()
    proc = _rest(moved, demo, 2, 2)
    assert "Resuming from" in proc.stdout and "(step 20)" in proc.stdout, proc.stdout[-3000:]
    want = json.loads((one / "report.json").read_text())
    got = json.loads((moved / "report.json").read_text())
    assert _printed(got) == _printed(want)
