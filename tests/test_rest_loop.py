"""The whole ReST loop on the generated demo pair, and a kill-and-resume of it (ReST Alg. 1; issue 6).

The killed run is SIGKILLed in the middle of Grow (after its first shard is committed) and rerun with the
same command; its Grow store, Improve results and report must equal those of an uninterrupted run.
"""

import collections
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from rest_jax import evaluate
from rest_jax import inspection
from rest_jax import metrics
from rest_jax import rewards
from rest_jax.data import grow_store

REPO = pathlib.Path(__file__).resolve().parents[1]

# The small demo setting shared with the notebook: BC 40 steps, Grow 48 sources x N=2, I=0 and I=1.
SMALL = list(inspection.TINY_RUN_OVERRIDES)


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


def test_rest_loop_end_to_end_and_kill_resume(tmp_path, tiny_run):
    # The uninterrupted run: conftest's tiny_run is this command (`inspection.make_tiny_run`).
    plain, demo = tiny_run, tiny_run.parent / "demo"
    report = json.loads((plain / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == ["BC G=0 I=0", "ReST G=1 I=0", "ReST G=1 I=1"]
    for row in report["rows"]:
        assert 0.0 <= row["reward"] <= 1.0 and 0.0 <= row["chrf"] <= 100.0
    assert "| BC G=0 I=0 |" in (plain / "report.md").read_text()
    for plot in ("grow_rewards.png", "validation_reward.png", "best_of_n.png"):
        assert (plain / "plots" / plot).stat().st_size > 1000
    # report.json's wall times: each stage's own seconds (+ its scoring) fit between the stage.json of the
    # stage before it and its own (the files' modification times: an independent clock), and fill most of it
    # (what lies between stages, loading the policy and writing the stage file, may take ~2 s on a loaded machine:
    # the fresh-clone suite beside a training job once saw Grow's 0.97 s in a 2.07 s gap).
    times = report["wall_times"]
    assert [w["stage"] for w in times] == ["BC G=0 I=0", "Grow 1", "ReST G=1 I=0", "ReST G=1 I=1"]
    marks = [plain / d / "stage.json" for d in ("bc", "grow_1", "grow_1/improve_0", "grow_1/improve_1")]
    for w, before, after in zip(times[1:], marks, marks[1:]):
        gap = after.stat().st_mtime - before.stat().st_mtime
        spent = w["seconds"] + (w["eval_seconds"] or 0.0)
        assert min(0.5 * gap, gap - 2.0) <= spent <= gap + 0.05, (w, gap)
    assert times[0]["seconds"] > 0 and times[0]["eval_seconds"] > 0 and times[1]["eval_seconds"] is None
    assert "Wall time" in (plain / "report.md").read_text()
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

    # The TensorBoard tags the run wrote, per folder, are the ones `metrics.METRICS` documents.
    written = collections.defaultdict(set)
    for events in plain.rglob("events.out.tfevents.*"):
        for record in tf.data.TFRecordDataset(str(events)):
            written[events.parent.name] |= {v.tag for v in tf.compat.v1.Event.FromString(record.numpy()).summary.value}
    # (`mfu` included: on CPU the peak is measured, so every run writes it.)
    assert dict(written) == {folder: set(tags) for folder, tags in metrics.METRICS.items()}

    # The report compares every row with BC by paired bootstrap; its differences are those of the saved
    # translations, rescored here with sacreBLEU's sentence chrF (the reward).
    import gin  # pylint: disable=import-outside-toplevel
    import sacrebleu  # pylint: disable=import-outside-toplevel

    from rest_jax.data import tasks  # pylint: disable=import-outside-toplevel

    inspection.load_run_config(plain)
    try:
        _, refs = tasks.read_split("demo_synthetic", "test", 16)
    finally:
        gin.clear_config()

    def mean_chrf(path):
        hyps = path.read_text().split("\n")[:len(refs)]
        return np.mean([sacrebleu.sentence_chrf(h, [r]).score / 100 for h, r in zip(hyps, refs)])

    bc_reward = mean_chrf(plain / "bc" / "test.greedy.txt")
    for row, stage in zip(report["rows"][1:], ("improve_0", "improve_1")):
        diff = row["vs_bc"]["reward"]
        assert diff["delta"] == pytest.approx(mean_chrf(plain / "grow_1" / stage / "test.greedy.txt") - bc_reward,
                                              abs=1e-6)
        assert diff["ci_low"] <= diff["delta"] <= diff["ci_high"] and 0 <= diff["p_value"] <= 1
        assert set(row["vs_bc"]) == {"reward", "bleu", "chrf", "ter"}
    assert "sample reward" in (plain / "report.md").read_text() and "**oracle**" in (plain / "report.md").read_text()


def test_a_copied_run_resumes_from_the_copy(tmp_path, tiny_run):
    """A run copied elsewhere (gs:// to a workstation) and resumed there with a MODEL_DIR relative to another
    working directory: its stages' recorded paths (checkpoints, translations) name the original, which must
    not be read; the last Improve step, redone, starts from the copy's previous one."""
    copy = tmp_path / "copied" / "run"
    shutil.copytree(tiny_run, copy)
    shutil.rmtree(copy / "grow_1" / "improve_1")
    (copy / "report.json").unlink()
    command = [a if not a.startswith("--gin.MODEL_DIR=") else "--gin.MODEL_DIR='copied/run'"
               for a in _command(copy, tiny_run.parent / "demo")]
    proc = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = json.loads((copy / "report.json").read_text())
    redone = json.loads((copy / "grow_1" / "improve_1" / "stage.json").read_text())
    assert redone["start"] == os.path.join("copied", "run", "grow_1", "improve_0", "checkpoints")
    for stage in resumed["stages"]:
        paths = [stage["checkpoint"]] + [s["translations"] for s in stage["scores"].values() if "translations" in s]
        assert all(p.startswith(os.path.join("copied", "run") + os.sep) for p in paths), paths
    # The same stages from the same files: the same report as the original run's.
    assert resumed["rows"] == json.loads((tiny_run / "report.json").read_text())["rows"]


def test_a_finished_run_extended_by_an_improve_step_equals_the_longer_run(tmp_path, tiny_run):
    """A finished G=1 I=0 run rerun with I=1 (`rerun.check` lets `run_rest.num_improve_steps` differ until a
    second Grow has begun) runs the one missing Improve step and ends as the uninterrupted I=1 run does, its
    best-of-N sampled again for the new final policy (the cached rows name the policy that sampled them)."""
    short = tmp_path / "short"
    shutil.copytree(tiny_run, short)
    # What a finished I=0 run leaves: no improve_1, its config says I=0, and best-of-N rows of its final policy
    # (I=0), made stale here so that reusing them would show.
    shutil.rmtree(short / "grow_1" / "improve_1")
    (short / "report.json").unlink()
    config = (short / "config.gin").read_text()
    assert "run_rest.num_improve_steps = 1\n" in config
    (short / "config.gin").write_text(config.replace("run_rest.num_improve_steps = 1\n",
                                                     "run_rest.num_improve_steps = 0\n"))
    rows = json.loads((short / "best_of_n.json").read_text())
    assert {r["policy"] for r in rows} == {"BC", "ReST (final)"}
    stale = [dict(r, checkpoint=os.path.join("grow_1", "improve_0", "checkpoints"), reward=-1.0)
             if r["policy"] != "BC" else r for r in rows]
    (short / "best_of_n.json").write_text(json.dumps(stale))

    _run(short, tiny_run.parent / "demo")
    extended, plain = (json.loads((d / "report.json").read_text()) for d in (short, tiny_run))
    assert extended["rows"] == plain["rows"]
    assert extended["best_of_n"] == plain["best_of_n"] and min(r["reward"] for r in extended["best_of_n"]) >= 0
    assert "run_rest.num_improve_steps = 0" in (short / "config.1.gin").read_text()


def test_control_continues_bc_on_the_original_data(tmp_path, tiny_run):
    """`run_rest.control`: the Improve steps of ReST on D instead of a Grow store, from a shared BC (bc_run:
    a copy of the tiny ReST run's, as when a run is copied from gs:// to a workstation or was made with a
    MODEL_DIR relative to another directory: its stage.json paths name the original, which must not be read)."""
    demo, control = tiny_run.parent / "demo", tmp_path / "control"
    bc_run = tmp_path / "copied" / "run"
    shutil.copytree(tiny_run / "bc", bc_run / "bc")
    shutil.copytree(tiny_run / "vocab", bc_run / "vocab")
    argv = _command(control, demo) + ["--gin.run_rest.control=True", f"--gin.run_rest.bc_run='{bc_run}'",
                                      "--gin.run_rest.best_of_n_ns=()"]
    proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((control / "report.json").read_text())
    bc = json.loads((tiny_run / "report.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["BC G=0 I=0", "Control G=1 I=0", "Control G=1 I=1"]
    assert report["rows"][0] == bc["rows"][0]  # the shared BC, not a new one
    assert not (control / "bc").exists() and not (control / "grow_1" / "store").exists()
    first = json.loads((control / "grow_1" / "improve_0" / "stage.json").read_text())
    # It starts from BC and trains on every training pair of the demo task (20,000), none filtered away.
    assert first["start"] == os.path.join(str(bc_run), "bc", "checkpoints")
    assert first["num_kept"] == first["filter"]["num_examples"] == 20_000
    second = json.loads((control / "grow_1" / "improve_1" / "stage.json").read_text())
    assert second["start"] == first["checkpoint"] and second["lr_scale"] < first["lr_scale"] == 1.0
    missing = subprocess.run(_command(tmp_path / "other", demo) + [f"--gin.run_rest.bc_run='{tmp_path / 'none'}'"],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert missing.returncode != 0 and "has no finished BC stage" in missing.stderr




@pytest.mark.parametrize("index", [0, 1])
def test_a_step_that_keeps_its_start_policy_has_its_scores(tiny_run, index):
    """An Improve step whose validation reward never rose keeps its start policy (best step 0) and is not scored
    again: its scores and translations are its start's. Checked against translating and scoring its checkpoint
    afresh. In the tiny run no evaluation beats BC: I=0 keeps BC's policy, I=1 I=0's."""
    report = json.loads((tiny_run / "report.json").read_text())
    split, reward_name = report["split"], report["reward"]
    kept = tiny_run / "grow_1" / f"improve_{index}"
    stage = json.loads((kept / "stage.json").read_text())
    assert stage["best_step"] == 0, "the tiny run's Improve steps must keep their start for this test"
    start = tiny_run / ("bc" if index == 0 else "grow_1/improve_0") / "checkpoints"
    assert stage["start"] == str(start)
    assert stage["eval_seconds"] < 1.0  # scoring takes seconds; the start's results were copied
    scores = stage["scores"][split]
    assert scores["translations"] == str(kept / f"{split}.greedy.txt")
    saved = (kept / f"{split}.greedy.txt").read_text().splitlines()

    # The reference: the step's checkpoint translated and scored here (other tests may have changed gin since).
    inspection.load_run_config(tiny_run)
    policy = inspection.load_stage_policy(tiny_run, f"grow_1/improve_{index}")
    sources, references = inspection.split_data(tiny_run, split, len(saved))
    hyps = inspection.translate(policy, sources)
    assert saved == hyps
    fresh = evaluate.corpus_scores(hyps, references)
    fresh["reward"] = evaluate.mean_reward(rewards.get(reward_name), sources, hyps, references)
    for key in ("reward", "bleu", "chrf", "ter"):
        assert scores[key] == pytest.approx(fresh[key], abs=1e-9), key
    assert json.loads((kept / f"{split}.greedy.json").read_text())["reward"] == pytest.approx(fresh["reward"])
