"""Fault injection (issue 6): killed runs resume to the uninterrupted result; bad input gets clear errors.

What the other test files already cover is not repeated here; docs/faults.md lists every fault tried, what
the user sees, what is kept, and the test that covers it.

Kills are real SIGKILLs of `python -m rest_jax.main ...` subprocesses. To hit a precise moment (a checkpoint
directory appearing, a stage.json just written) the subprocess runs with a `sitecustomize` module on its
PYTHONPATH whose watcher thread SIGKILLs its own process as soon as a glob pattern matches; the command
itself is unchanged.
"""

import errno
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import tensorflow as tf

from rest_jax import checkpoints, report, rest, train, trainer
from rest_jax import policy as policy_lib
from rest_jax.data import demo_corpus, grow_store, text_files, vocab
from rest_jax.io import atomic
from rest_jax.model import t5

REPO = pathlib.Path(__file__).resolve().parents[1]

# Small enough for a shared 2-core machine; dropout on, so resuming must also redo the dropout masks.
MODEL = {"num_encoder_layers": 1, "num_decoder_layers": 1, "emb_dim": 32, "mlp_dim": 64, "num_heads": 2,
         "head_dim": 16}
VOCAB_SIZE = 96

_KILL_ENV = "REST_JAX_TEST_KILL_WHEN"
_SITECUSTOMIZE = textwrap.dedent(f"""
    # Test hook (tests/test_faults.py): SIGKILL this process once the glob pattern in ${_KILL_ENV} matches.
    import glob, os, signal, threading, time
    _pattern = os.environ.pop("{_KILL_ENV}", None)  # popped: child processes must not inherit it
    if _pattern:
        def _watch():
            while not glob.glob(_pattern):
                time.sleep(0.002)
            os.kill(os.getpid(), signal.SIGKILL)
        threading.Thread(target=_watch, daemon=True).start()
""")


# ----------------------------------------------------------------------------------------------------------
# Shared inputs: a small generated corpus and two vocabularies trained on it.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults_demo")
    corpus = root / "corpus"
    demo_corpus.write_corpus(str(corpus), train_size=600, validation_size=24, test_size=24)
    lines = [*text_files.read_lines(str(corpus / "train.src")), *text_files.read_lines(str(corpus / "train.tgt"))]
    other = vocab.train_vocabulary(lines, str(root / "other_vocab"), vocab_size=80)
    hook = root / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return {"corpus": corpus, "vocab": vocab.train_vocabulary(lines, str(root / "vocab"), vocab_size=VOCAB_SIZE),
            "other_vocab": other, "hook": hook}


@pytest.fixture
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def _bind_model(**overrides):
    fields = {**MODEL, "vocab_size": VOCAB_SIZE, **overrides}
    with gin.unlock_config():
        gin.parse_config([f"T5Config.{k} = {v!r}" for k, v in fields.items()])


def _env(demo, kill_when=None):
    env = dict(os.environ)
    # One CPU device: the 8 simulated ones of conftest would only slow the subprocess down.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONPATH"] = os.pathsep.join([str(demo["hook"]), str(REPO), env.get("PYTHONPATH", "")])
    env.pop(_KILL_ENV, None)
    if kill_when is not None:
        env[_KILL_ENV] = str(kill_when)
    return env


def _launch(args, demo, log, kill_when=None, timeout=900):
    """Runs `python -m rest_jax.main ARGS`; returns (returncode, log text)."""
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "rest_jax.main", *args], cwd=REPO, env=_env(demo, kill_when),
                              stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, pathlib.Path(log).read_text()


def _model_flags(**overrides):
    return [f"--gin.T5Config.{k}={v}" for k, v in dict(MODEL, **overrides).items()]


def _data_flags(demo):
    return [f"--gin.demo_source.data_dir='{demo['corpus']}'", "--gin.demo_source.generate_if_missing=False",
            f"--gin.VOCAB_SIZE={VOCAB_SIZE}", "--gin.create_mesh.mesh_shape=(1, 1)"]


def _tree_equal(a, b):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = jax.tree.leaves(b)
    assert len(flat_a) == len(flat_b) > 0
    for (path, x), y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


# ----------------------------------------------------------------------------------------------------------
# Kill and resume: pretraining (`rest_jax train`).


def _train_args(demo, model_dir, **model_overrides):
    return ["train", "--gin_file=models/tiny.gin", "--gin_file=tasks/demo_synthetic.gin",
            f"--gin.MODEL_DIR='{model_dir}'", f"--gin.get_task.vocabulary='{demo['vocab']}'", *_data_flags(demo),
            "--gin.TRAIN_STEPS=12", "--gin.CHECKPOINT_PERIOD=4", "--gin.EVAL_PERIOD=0", "--gin.train.eval_split=None",
            "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 24}",
            "--gin.T5Config.dropout_rate=0.1", "--gin.learning_rate_schedule.name='constant'",
            "--gin.learning_rate_schedule.base_learning_rate=0.01", "--gin.learning_rate_schedule.warmup_steps=0",
            *_model_flags(**model_overrides)]


# Slow (~60 s, keeping CI under its 30 minutes): the fast suite's kill-and-resume test is
# test_rest_loop.py::test_rest_loop_end_to_end_and_kill_resume; a checkpoint damaged mid-save is
# test_damaged_checkpoint_is_never_used_by_train_or_a_policy below.
@pytest.mark.slow
def test_pretraining_killed_mid_checkpoint_save_and_mid_training_resumes_exactly(demo, tmp_path):
    """SIGKILL while checkpoint 8 is being written, then again while steps 9-12 train; the rerun ends with
    exactly the parameters of an uninterrupted run. A rerun with another model config names the parameter."""
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    rc, log = _launch(_train_args(demo, plain), demo, tmp_path / "plain.log")
    assert rc == 0, log[-3000:]

    ckpt = killed / "checkpoints"
    rc, log = _launch(_train_args(demo, killed), demo, tmp_path / "k1.log",
                      kill_when=ckpt / "8.orbax-checkpoint-tmp*")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert list(ckpt.glob("8.orbax-checkpoint-tmp*")), "the kill did not land inside the save of step 8"
    assert checkpoints.CheckpointManager(ckpt, cleanup_tmp=False).all_steps() == [4]

    rc, log = _launch(_train_args(demo, killed), demo, tmp_path / "k2.log",
                      kill_when=ckpt / "8" / "commit_success.txt")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert "Resuming from" in log and f"{ckpt / '4'} (step 4)" in log
    assert "Removing" in log and "8.orbax-checkpoint-tmp" in log  # the half-written save was cleaned up
    assert checkpoints.CheckpointManager(ckpt).all_steps() == [4, 8]
    at_8 = checkpoints.load_params(ckpt, step=8)

    rc, log = _launch(_train_args(demo, killed), demo, tmp_path / "k3.log")
    assert rc == 0, log[-3000:]
    assert f"{ckpt / '8'} (step 8)" in log
    assert not list(ckpt.glob("*orbax-checkpoint-tmp*"))
    final = checkpoints.load_params(ckpt, step=12)
    _tree_equal(checkpoints.load_params(plain / "checkpoints", step=12), final)
    assert not np.array_equal(at_8["decoder"]["logits_dense"]["kernel"], final["decoder"]["logits_dense"]["kernel"])

    # Same directory, another model: refused before anything runs, naming the knob (rest_jax.rerun).
    config = (killed / "config.gin").read_text()
    rc, log = _launch(_train_args(demo, killed, mlp_dim=128), demo, tmp_path / "k4.log")
    assert rc == 2, log[-3000:]
    assert "T5Config.mlp_dim: 64 -> 128" in log and (killed / "config.gin").read_text() == config
    # Checkpoints without their config.gin (e.g. copied): the restore names the checkpoint and the parameter.
    (killed / "config.gin").unlink()
    rc, log = _launch(_train_args(demo, killed, mlp_dim=128), demo, tmp_path / "k5.log")
    assert rc != 0
    assert "CheckpointMismatchError" in log and f"Checkpoint {ckpt / '12'} does not fit" in log
    assert "params/encoder/layers_0/mlp/wi_0/kernel: model expects shape (32, 128), checkpoint has (32, 64)" in log
    assert checkpoints.CheckpointManager(ckpt).all_steps() == [4, 8, 12]  # nothing was touched


# ----------------------------------------------------------------------------------------------------------
# Kill and resume: the whole ReST loop, between stages and inside an Improve stage.


def _rest_args(demo, model_dir):
    return ["rest", "--gin_file=experiments/demo.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.run_rest.vocab_path='{demo['vocab']}'", *_data_flags(demo),
            "--gin.INPUT_LENGTH=24", "--gin.TARGET_LENGTH=24", "--gin.BATCH_SIZE=8",
            "--gin.train.num_steps=12", "--gin.train.checkpoint_period=4",
            "--gin.learning_rate_schedule.warmup_steps=0", "--gin.learning_rate_schedule.base_learning_rate=0.01",
            "--gin.run_rest.max_grow_sources=16", "--gin.run_rest.num_validation_sources=8",
            "--gin.run_rest.num_test_sources=8", "--gin.run_rest.best_of_n_ns=()",
            "--gin.run_rest.num_improve_steps=1", "--gin.grow_dataset.num_samples=2",
            "--gin.grow_dataset.sources_per_shard=8", "--gin.grow_dataset.batch_size=8",
            "--gin.improve_step.num_steps=4", "--gin.improve_step.eval_period=2", "--gin.run_rest.eval_max_length=24",
            *_model_flags()]


def _improve_results(model_dir):
    out = {}
    for i in (0, 1):
        stage = json.loads((model_dir / "grow_1" / f"improve_{i}" / "stage.json").read_text())
        out[i] = {k: stage[k] for k in ("best_step", "validation_reward", "curve", "num_kept", "kept_fraction")}
        # Scores without the paths of the translation files (like `checkpoint`, they name the run directory).
        out[i]["scores"] = {split: {k: v for k, v in s.items() if k != "translations"}
                            for split, s in stage["scores"].items()}
    return out


@pytest.mark.slow
def test_rest_loop_killed_between_stages_and_inside_improve_gives_the_same_report(demo, tmp_path):
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    rc, log = _launch(_rest_args(demo, plain), demo, tmp_path / "plain.log")
    assert rc == 0, log[-3000:]
    reference = json.loads((plain / "report.json").read_text())

    # 1. Right after BC's stage.json is written (between stages).
    rc, log = _launch(_rest_args(demo, killed), demo, tmp_path / "k1.log", kill_when=killed / "bc" / "stage.json")
    assert rc == -signal.SIGKILL, log[-3000:]
    bc_marker = killed / "bc" / "stage.json"
    bc_state = (bc_marker.read_bytes(), bc_marker.stat().st_mtime_ns)
    assert not (killed / "grow_1" / "stage.json").exists()

    # 2. Inside Improve I=0: while it saves its best checkpoint.
    improve_ckpt = killed / "grow_1" / "improve_0" / "checkpoints"
    rc, log = _launch(_rest_args(demo, killed), demo, tmp_path / "k2.log",
                      kill_when=improve_ckpt / "*orbax-checkpoint-tmp*")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert "ReST: behaviour cloning" not in log  # the finished stage was not redone
    assert (bc_marker.read_bytes(), bc_marker.stat().st_mtime_ns) == bc_state
    assert (killed / "grow_1" / "stage.json").exists()
    assert not (killed / "grow_1" / "improve_0" / "stage.json").exists()

    rc, log = _launch(_rest_args(demo, killed), demo, tmp_path / "k3.log")
    assert rc == 0, log[-3000:]
    assert "Grow 1: 0 of" not in log  # Grow was finished: not even reopened for writing
    resumed = json.loads((killed / "report.json").read_text())
    assert resumed["rows"] == reference["rows"]
    assert _improve_results(killed) == _improve_results(plain)
    _tree_equal(checkpoints.load_params(plain / "grow_1" / "improve_1" / "checkpoints"),
                checkpoints.load_params(killed / "grow_1" / "improve_1" / "checkpoints"))

    # 3. A finished run whose Grow metadata was truncated since: the rerun rewrites it from the intact shards.
    meta = killed / "grow_1" / "store" / grow_store.METADATA_FILE
    meta.write_bytes(meta.read_bytes()[:100])
    rc, log = _launch(_rest_args(demo, killed), demo, tmp_path / "k4.log")
    assert rc == 0, log[-3000:]
    assert "Grow 1: 0 of 2 shards to write" in log
    assert grow_store.GrowStore.is_complete(killed / "grow_1" / "store")
    assert json.loads((killed / "report.json").read_text())["rows"] == reference["rows"]


# ----------------------------------------------------------------------------------------------------------
# Atomic outputs: partial files are never read as complete.


def test_stage_markers_and_reports_are_atomic(tmp_path, monkeypatch):
    stage = tmp_path / "grow_1"
    stage.mkdir()
    # A kill between writing the temporary and renaming it: the stage is not finished.
    (stage / ".stage.json.tmp-4242").write_text(json.dumps({"name": "Grow 1"}))
    assert report.stage_result(stage) is None
    report.finish_stage(stage, {"name": "Grow 1", "store": "s"})
    assert report.stage_result(stage) == {"name": "Grow 1", "store": "s", "stage_dir": str(stage)}
    # A stage redone after a kill (outputs written, marker not yet) rewrites its files in place.
    atomic.write_text(stage / "validation.greedy.txt", "a\n")
    atomic.write_text(stage / "validation.greedy.txt", "b\n")
    report.finish_stage(stage, {"name": "Grow 1", "store": "t"})
    assert (stage / "validation.greedy.txt").read_text() == "b\n"
    assert report.stage_result(stage) == {"name": "Grow 1", "store": "t", "stage_dir": str(stage)}

    # A truncated marker (copied partly; our own writes cannot leave one) is an error naming the file.
    (stage / "stage.json").write_text('{"name": "Gro')
    with pytest.raises(ValueError) as info:
        report.stage_result(stage)
    assert str(stage / "stage.json") in str(info.value) and "truncated" in str(info.value)

    # Disk full while rewriting report.json: the previous report is intact and no temporary is left.
    path = tmp_path / "report.json"
    atomic.write_json(path, {"rows": [1, 2]})
    real_gfile = tf.io.gfile.GFile

    class FullDisk(real_gfile):  # the first half reaches the file, then the disk is full
        def write(self, data):
            super().write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tf.io.gfile, "GFile", FullDisk)
    with pytest.raises(OSError) as info:
        atomic.write_json(path, {"rows": [1, 2, 3]})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert atomic.read_json(path) == {"rows": [1, 2]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grow_1", "report.json"]


def test_truncated_checkpoint_metadata_is_named_not_trusted(tmp_path):
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    for step in (1, 2):
        manager.save(step, {"w": jnp.full(3, float(step))}, metadata={"data_step": step})
    manager.close()
    meta = tmp_path / "2" / "metadata" / "metadata"
    meta.write_text(meta.read_text()[:5])
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    with pytest.raises(checkpoints.CheckpointCorruptError) as info:
        manager.restore({"w": jnp.zeros(3)})  # the data position would be unknown: no silent restore
    msg = str(info.value)
    assert f"Checkpoint {tmp_path / '2'} is damaged" in msg and "metadata/metadata: truncated (5 of" in msg
    assert f"rm -r {tmp_path / '2'}" in msg and "previous complete step 1" in msg  # and how to go on
    restored, info = manager.restore({"w": jnp.zeros(3)}, step=1)
    assert info["data_step"] == 1 and np.array_equal(restored["w"], np.ones(3))
    manager.close()


def _train_demo(demo, model_dir, steps):
    """`rest_jax train` in-process on the demo task: a checkpoint every step."""
    gin.clear_config()
    with gin.unlock_config():
        gin.parse_config([f"demo_source.data_dir = '{demo['corpus']}'", "demo_source.generate_if_missing = False",
                          f"get_task.vocabulary = '{demo['vocab']}'"])
    _bind_model()
    return train.train(model_dir=str(model_dir), task="demo_synthetic", eval_split=None, batch_size=8,
                       num_steps=steps, checkpoint_period=1, feature_lengths={"inputs": 8, "targets": 8})


def _train_two_steps_and_flip_a_byte_of_step_2(demo, tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    _train_demo(demo, tmp_path / "run", 2)
    data = max((p for p in (ckpt / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    return ckpt


def test_damaged_checkpoint_is_never_used_by_train_or_a_policy(demo, tmp_path, clean_gin):
    """One flipped byte in the newest checkpoint (bit rot, a bad copy): before checksums, resuming trained on
    garbage and `infer` translated with it. Now resuming `train` and `load_policy` (eval/infer/grow/the loop)
    refuse it with the way forward."""
    ckpt = _train_two_steps_and_flip_a_byte_of_step_2(demo, tmp_path)
    with pytest.raises(checkpoints.CheckpointCorruptError) as info:
        _train_demo(demo, tmp_path / "run", 3)
    msg = str(info.value)
    assert f"Checkpoint {ckpt / '2'} is damaged" in msg and "checksum mismatch" in msg
    assert f"rm -r {ckpt / '2'}" in msg and "previous complete step 1" in msg
    assert checkpoints.CheckpointManager(ckpt).all_steps() == [1, 2]  # nothing was written
    with pytest.raises(checkpoints.CheckpointCorruptError, match="--gin.evaluate.step=1"):
        policy_lib.load_policy(checkpoint=str(ckpt), vocabulary=demo["vocab"])
    policy_lib.load_policy(checkpoint=str(ckpt), vocabulary=demo["vocab"], step=1)  # way forward 1: the step knob


@pytest.mark.slow
def test_damaged_checkpoint_deleted_resumes_from_the_previous_and_disk_full_names_the_train_knob(
        demo, tmp_path, clean_gin, monkeypatch, caplog):
    ckpt = _train_two_steps_and_flip_a_byte_of_step_2(demo, tmp_path)
    shutil.rmtree(ckpt / "2")  # way forward 2: delete it and rerun the same command
    with caplog.at_level(logging.INFO):
        _train_demo(demo, tmp_path / "run", 3)
    assert f"Resuming from {ckpt / '1'} (step 1)" in caplog.text
    assert checkpoints.CheckpointManager(ckpt).all_steps() == [1, 2, 3]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(checkpoints.CheckpointDiskFullError) as info:
        _train_demo(demo, tmp_path / "run", 4)
    assert "keep fewer checkpoints (gin: train.keep_checkpoints, now 3)" in str(info.value)


def _records(ids, num_samples=2, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for s in ids:
        for j in [*range(num_samples), grow_store.REFERENCE_SAMPLE_ID]:
            n = int(rng.integers(2, 6))
            out.append({"source_id": s, "sample_id": j, "source_text": f"src {s}", "candidate_text": f"c {s} {j}",
                        "reference_text": f"ref {s}", "source_tokens": np.array([5, 6, 1]),
                        "candidate_tokens": np.array([*rng.integers(3, 50, n - 1), 1]),
                        "reward": float(rng.uniform())})
    return out


def _write_store(directory, num_sources=6, per_shard=3, **metadata):
    writer = grow_store.GrowStoreWriter(directory, 1, num_sources, 2, sources_per_shard=per_shard)
    for i in writer.pending_shards():
        writer.write_shard(i, _records(writer.shard_source_ids(i), seed=i))
    writer.write_metadata(**metadata)
    return writer


def test_grow_store_metadata_and_layout_partial_files(tmp_path):
    writer = _write_store(tmp_path / "s")
    store_dir = tmp_path / "s"
    expected = grow_store.GrowStore(store_dir).as_numpy(["source_id", "sample_id", "reward"])
    # Temporaries of killed writes lying next to a complete store change nothing.
    (store_dir / (grow_store.METADATA_FILE + ".tmp-dead")).write_text("{")
    (store_dir / (writer.layout.shard_name(0) + grow_store.TMP_SUFFIX)).write_bytes(b"\x00partial")
    got = grow_store.GrowStore(store_dir).as_numpy(["source_id", "sample_id", "reward"])
    for k in expected:
        np.testing.assert_array_equal(expected[k], got[k])

    # Killed after writing metadata's temporary but before the rename: not complete.
    meta = store_dir / grow_store.METADATA_FILE
    text = meta.read_text()
    meta.rename(store_dir / (grow_store.METADATA_FILE + ".tmp-0123"))
    assert not grow_store.GrowStore.is_complete(store_dir)
    with pytest.raises(grow_store.GrowIncompleteError, match="rerun the Grow command"):
        grow_store.GrowStore(store_dir)

    # Truncated metadata.json: named, never taken as complete; rerunning Grow rewrites it from the shards.
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(grow_store.GrowStoreCorruptError) as info:
        grow_store.GrowStore(store_dir)
    assert str(meta) in str(info.value)
    writer = grow_store.GrowStoreWriter(store_dir, 1, 6, 2, sources_per_shard=3)
    assert writer.pending_shards() == []
    writer.write_metadata()
    assert grow_store.GrowStore(store_dir).num_records == 18

    # Truncated layout.json: named, with advice that works (a plain rerun would fail the same way).
    layout = store_dir / grow_store.LAYOUT_FILE
    layout.write_text(layout.read_text()[:20])
    with pytest.raises(grow_store.GrowStoreCorruptError) as info:
        grow_store.GrowStoreWriter(store_dir, 1, 6, 2, sources_per_shard=3)
    assert str(layout) in str(info.value) and "delete it" in str(info.value)
    layout.unlink()
    writer = grow_store.GrowStoreWriter(store_dir, 1, 6, 2, sources_per_shard=3)
    assert writer.pending_shards() == []
    writer.write_metadata()
    assert grow_store.GrowStore(store_dir).num_records == 18


# ----------------------------------------------------------------------------------------------------------
# Resources: disk full, device memory.


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    tf.errors.ResourceExhaustedError(None, None, "/x/shard.tmp; No space left on device"),
], ids=["oserror", "tf_error"])
def test_disk_full_while_writing_a_shard_keeps_finished_shards(tmp_path, monkeypatch, error):
    writer = grow_store.GrowStoreWriter(tmp_path / "s", 1, 6, 2, sources_per_shard=3)
    writer.write_shard(0, _records(writer.shard_source_ids(0), seed=0))
    finished = pathlib.Path(writer.shard_path(0)).read_bytes()
    real_writer = tf.io.TFRecordWriter

    class FullDisk:
        """A TFRecordWriter whose third record hits a full disk."""

        def __init__(self, path):
            self._inner, self._n = real_writer(path), 0

        def write(self, record):
            self._n += 1
            if self._n == 3:
                raise error
            self._inner.write(record)

        def close(self):
            self._inner.close()

    monkeypatch.setattr(grow_store.writer.tf.io, "TFRecordWriter", FullDisk)
    with pytest.raises(grow_store.GrowStoreDiskFullError) as info:
        writer.write_shard(1, _records(writer.shard_source_ids(1), seed=1))
    msg = str(info.value)
    assert writer.shard_path(1) in msg and "Out of disk space" in msg
    assert "1 finished shard(s) of 2" in msg and "rerun the same Grow command" in msg
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is error
    monkeypatch.undo()
    assert pathlib.Path(writer.shard_path(0)).read_bytes() == finished
    assert sorted(os.listdir(tmp_path / "s")) == [grow_store.LAYOUT_FILE, writer.layout.shard_name(0)]

    # Space freed, same command again: the store equals one written without the fault.
    writer = grow_store.GrowStoreWriter(tmp_path / "s", 1, 6, 2, sources_per_shard=3)
    assert writer.pending_shards() == [1]
    writer.write_shard(1, _records(writer.shard_source_ids(1), seed=1))
    writer.write_metadata()
    clean = _write_store(tmp_path / "clean")
    for i in range(2):
        assert pathlib.Path(writer.shard_path(i)).read_bytes() == pathlib.Path(clean.shard_path(i)).read_bytes()


@pytest.mark.parametrize("scope", ["train", "improve_step"])
def test_out_of_device_memory_names_the_step_and_the_batch_knob(tmp_path, scope):
    """A real XLA RESOURCE_EXHAUSTED (an activation far too large for memory) inside the train step.

    Improve's loop passes improve_step's knobs: the message names that stage's knobs."""
    optimizer = optax.sgd(0.1)

    def loss_fn(params, batch, rng):
        rows = batch["x"].shape[0]
        huge = jnp.broadcast_to(params["w"] * jnp.sum(batch["x"]), (rows << 40,))  # 2^40 floats per row
        return jnp.mean(jnp.cumsum(huge)), {}

    state = trainer.TrainState.create({"w": jnp.ones(())}, optimizer)
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    manager.save(0, {"params": state.params})  # the last good checkpoint must survive the failure
    batches = iter([{"x": np.ones((4, 3), np.float32)}] * 3)
    with pytest.raises(trainer.OutOfMemoryError) as info:
        with trainer.error_advice(memory_knobs=(f"{scope}.batch_size", f"{scope}.feature_lengths"),
                                  last_checkpoint=lambda: trainer.describe_last_checkpoint(manager)):
            trainer.train_loop(state, batches, trainer.make_train_step(optimizer, loss_fn), 3, show_progress=False,
                               hooks=[trainer.Checkpoint(manager)])
    msg = str(info.value)
    assert "step 0 does not fit in device memory" in msg and "RESOURCE_EXHAUSTED" in msg
    assert f"{scope}.batch_size" in msg and f"{scope}.feature_lengths" in msg
    other = "train" if scope != "train" else "improve_step"
    assert f"{other}.batch_size" not in msg
    assert manager.all_steps() == [0]
    manager.close()


# ----------------------------------------------------------------------------------------------------------
# Foreign inputs: Grow store, checkpoint and vocabulary that do not belong to the run.


def _fake_finished_stages(model_dir, store_metadata):
    """BC and Grow markers as a finished run leaves them, with a Grow store made elsewhere."""
    report.finish_stage(model_dir / "bc", {"name": "BC G=0 I=0", "checkpoint": str(model_dir / "bc" / "ckpt"),
                                           "scores": {}})
    store = model_dir / "grow_1" / "store"
    _write_store(store, **store_metadata)
    report.finish_stage(model_dir / "grow_1", {"name": "Grow 1", "store": str(store)})
    return store


@pytest.mark.parametrize("foreign", ["vocabulary", "model"])
def test_grow_store_from_another_vocabulary_or_model_is_refused_by_the_loop(demo, tmp_path, clean_gin, foreign):
    with gin.unlock_config():
        gin.parse_config([f"demo_source.data_dir = '{demo['corpus']}'", "demo_source.generate_if_missing = False"])
    _bind_model()
    config = t5.T5Config(**MODEL, vocab_size=VOCAB_SIZE)
    if foreign == "vocabulary":
        store = _fake_finished_stages(tmp_path, {"vocab": demo["other_vocab"], "model_config": config})
        expected = ["vocabulary differs", demo["other_vocab"], demo["vocab"]]
    else:
        store = _fake_finished_stages(tmp_path, {"vocab": demo["vocab"], "model_config": config.replace(emb_dim=64)})
        expected = ["model config differs (emb_dim: store 64, given 32)"]
    with pytest.raises(grow_store.GrowStoreMismatchError) as info:
        rest.run_rest(model_dir=str(tmp_path), task="demo_synthetic", vocab_path=demo["vocab"],
                      num_validation_sources=4, num_test_sources=4, best_of_n_ns=())
    msg = str(info.value)
    assert f"Grow store {store} is incompatible" in msg
    for text in expected:
        assert text in msg
    assert not (tmp_path / "grow_1" / "improve_0").exists()  # nothing trained on it


def test_checkpoint_of_another_model_is_named_when_loading_a_policy(demo, tmp_path, clean_gin):
    """What `rest_jax grow/eval/infer` and the loop see when the gin model is not the checkpoint's."""
    model = t5.Transformer(t5.T5Config(**MODEL, vocab_size=VOCAB_SIZE))
    params = nn.unbox(t5.init_params(model, jax.random.key(0)))
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    manager.save(7, {"params": params})
    manager.close()
    _bind_model(num_heads=4)
    with pytest.raises(checkpoints.CheckpointMismatchError) as info:
        policy_lib.load_policy(checkpoint=str(tmp_path), vocabulary=demo["vocab"])
    msg = str(info.value)
    assert f"Checkpoint {tmp_path / '7'} does not fit" in msg
    assert "params/encoder/layers_0/attention/query/kernel: model expects shape (32, 64), checkpoint has (32, 32)" in msg


def test_vocabulary_files_that_do_not_match(demo, tmp_path, clean_gin):
    # Not a SentencePiece model at all (truncated copy): the file is named.
    broken = tmp_path / "broken.model"
    broken.write_bytes(pathlib.Path(demo["vocab"]).read_bytes()[:300])
    with pytest.raises(ValueError) as info:
        vocab.load_vocabulary(str(broken))
    assert str(broken) in str(info.value) and "not a SentencePiece model" in str(info.value)
    # More pieces than the model has embeddings: stopped before training, naming the knob.
    with gin.unlock_config():
        gin.parse_config([f"demo_source.data_dir = '{demo['corpus']}'", "demo_source.generate_if_missing = False",
                          f"get_task.vocabulary = '{demo['vocab']}'"])
    _bind_model(vocab_size=64)
    with pytest.raises(ValueError, match=rf"vocabulary {re.escape(demo['vocab'])} has {VOCAB_SIZE} ids but the "
                                         rf"model has vocab_size=64.*T5Config.vocab_size"):
        train.train(model_dir=str(tmp_path / "run"), task="demo_synthetic", feature_lengths={"inputs": 8,
                                                                                             "targets": 8})
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_resuming_with_another_vocabulary_of_the_same_size_is_refused(demo, tmp_path, clean_gin):
    """Same size, other pieces: the ids would silently mean other words. The checkpoint's fingerprint stops it."""
    lines = list(text_files.read_lines(str(demo["corpus"] / "train.tgt")))  # target side only: other pieces
    same_size = vocab.train_vocabulary(lines, str(tmp_path / "same_size"), vocab_size=VOCAB_SIZE)
    assert vocab.vocab_fingerprint(same_size) != vocab.vocab_fingerprint(demo["vocab"])

    def run(vocabulary, steps):
        gin.clear_config()
        with gin.unlock_config():
            gin.parse_config([f"demo_source.data_dir = '{demo['corpus']}'", "demo_source.generate_if_missing = False",
                              f"get_task.vocabulary = '{vocabulary}'"])
        _bind_model()
        return train.train(model_dir=str(tmp_path / "run"), task="demo_synthetic", eval_split=None, batch_size=8,
                           num_steps=steps, checkpoint_period=1, feature_lengths={"inputs": 8, "targets": 8})

    run(demo["vocab"], 1)
    with pytest.raises(ValueError) as info:
        run(same_size, 2)
    msg = str(info.value)
    assert demo["vocab"] in msg and same_size in msg and "get_task.vocabulary" in msg
    run(demo["vocab"], 2)  # the right vocabulary resumes
    assert (tmp_path / "run" / "checkpoints" / "2").exists()

