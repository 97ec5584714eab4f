"""Orbax checkpoints: mesh-changing restore, keep-N, atomicity, mismatch and disk-full errors, load_params."""

import errno
import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rest_jax import checkpoints, optim, partitioning, trainer
from rest_jax.model import t5

TINY = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                   head_dim=16, mlp_dim=64)


def _mesh(shape):
    return partitioning.create_mesh(shape)


@functools.lru_cache(maxsize=None)
def _state(config=TINY, mesh_shape=(8, 1), optimizer="adamw", abstract=False):
    """A train state (or its abstract twin); cached, since compiling the init dominates the test time."""
    model = t5.Transformer(config)
    opt = optim.create_optimizer(optimizer, schedule=optim.learning_rate_schedule("constant", 1e-3, 0))
    return trainer.init_train_state(model, opt, jax.random.key(0), _mesh(mesh_shape), abstract_only=abstract)


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def test_restore_onto_different_mesh_keeps_values_and_takes_target_sharding(tmp_path):
    state, _ = _state(mesh_shape=(8, 1))
    # Make the optimizer state non-trivial so a wrong mapping would show.
    state = state.replace(opt_state=jax.tree.map(lambda x: x + 0.5 if x.dtype == jnp.float32 else x + 3,
                                                 state.opt_state), step=jnp.array(7, jnp.int32))
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    assert manager.save(7, state, metadata={"data_step": 7})
    expected = _host(state)

    target, shardings = _state(mesh_shape=(2, 4), abstract=True)
    restored, meta = manager.restore(target, shardings=shardings)
    assert meta["data_step"] == 7 and meta["step"] == 7
    got = _host(restored)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    kernel = restored.params["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert kernel.sharding.mesh.shape == {"data": 2, "model": 4}
    assert kernel.sharding.spec == P(None, "model")
    assert {s.data.shape for s in kernel.addressable_shards} == {(32, 16)}  # really split 4 ways along "model"
    assert restored.opt_state[0].mu["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"].sharding.spec == P(None, "model")
    manager.close()


def test_keep_n_period_latest_and_given_step(tmp_path):
    tree = {"w": jnp.arange(6.0)}
    manager = checkpoints.CheckpointManager(tmp_path, keep=2, period=2)
    saved = [s for s in range(1, 8) if manager.save(s, {"w": tree["w"] + s})]
    assert saved == [2, 4, 6]
    assert manager.save(7, {"w": tree["w"] + 7}, force=True)
    assert manager.all_steps() == [6, 7]
    latest, meta = manager.restore({"w": jnp.zeros(6)})
    np.testing.assert_array_equal(latest["w"], np.arange(6.0) + 7)
    older, meta = manager.restore({"w": jnp.zeros(6)}, step=6)
    np.testing.assert_array_equal(older["w"], np.arange(6.0) + 6)
    assert meta["step"] == 6
    with pytest.raises(checkpoints.CheckpointNotFoundError, match=r"step 2 .*complete steps: \[6, 7\]"):
        manager.restore({"w": jnp.zeros(6)}, step=2)
    manager.close()


def test_partial_checkpoints_are_never_restored(tmp_path):
    manager = checkpoints.CheckpointManager(tmp_path, period=1, cleanup_tmp=False)
    manager.save(3, {"w": jnp.ones(4)})
    manager.close()
    # A save killed mid-write leaves Orbax's temporary directory; a half-copied step lacks the marker.
    tmp = tmp_path / "9.orbax-checkpoint-tmp-1234"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
    half = tmp_path / "8"
    (half / "state").mkdir(parents=True)
    (half / "state" / "_METADATA").write_text("{")
    manager = checkpoints.CheckpointManager(tmp_path, period=1, cleanup_tmp=False)
    assert manager.latest_step() == 3
    restored, meta = manager.restore({"w": jnp.zeros(4)})
    np.testing.assert_array_equal(restored["w"], np.ones(4))
    assert meta["step"] == 3
    with pytest.raises(checkpoints.CheckpointNotFoundError, match="incomplete"):
        checkpoints.load_params(half)
    manager.close()
    # With cleanup on (the default), the temporary directory of the killed save is removed.
    checkpoints.CheckpointManager(tmp_path).close()
    assert not tmp.exists()


def test_mismatched_checkpoint_names_the_parameters(tmp_path):
    state, _ = _state(TINY)
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    manager.save(1, state, metadata={"model_config": {"mlp_dim": 64}})
    target, shardings = _state(TINY.replace(mlp_dim=128), abstract=True)
    with pytest.raises(checkpoints.CheckpointMismatchError) as info:
        manager.restore(target, shardings=shardings)
    msg = str(info.value)
    assert "params/encoder/layers_0/mlp/wi_0/kernel: model expects shape (32, 128), checkpoint has (32, 64)" in msg
    assert "params/decoder/layers_0/mlp/wo/kernel: model expects shape (128, 32), checkpoint has (64, 32)" in msg
    assert str(tmp_path / "1") in msg and "mlp_dim" in msg
    # A model with an extra layer: the missing parameters are named too.
    target, shardings = _state(TINY.replace(num_encoder_layers=2), abstract=True)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"params/encoder/layers_1/attention/key/kernel: "
                                                                  r"missing from the checkpoint"):
        manager.restore(target, shardings=shardings)
    manager.close()


def test_load_params_only(tmp_path):
    state, shardings = _state(TINY, optimizer="adafactor")
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    manager.save(5, state)
    manager.close()
    expected = _host(state.params)
    for path in (tmp_path, tmp_path / "5"):
        params = checkpoints.load_params(path)
        jax.tree.map(np.testing.assert_array_equal, expected, _host(params))
    # Onto given shardings (e.g. for sampling on another mesh), checked against the model.
    target, target_shardings = _state(TINY, mesh_shape=(1, 8), optimizer="adamw", abstract=True)
    params = checkpoints.load_params(tmp_path, target=target.params, shardings=target_shardings.params)
    jax.tree.map(np.testing.assert_array_equal, expected, _host(params))
    assert params["token_embedder"]["embedding"].sharding.spec == P("model", None)
    bad, _ = _state(TINY.replace(vocab_size=128), abstract=True)
    with pytest.raises(checkpoints.CheckpointMismatchError, match=r"params/token_embedder/embedding: model "
                                                                  r"expects shape \(128, 32\), checkpoint has \(64, 32\)"):
        checkpoints.load_params(tmp_path, target=bad.params)


def test_out_of_space_is_recognised():
    assert checkpoints._is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    wrapped = ValueError("OUT_OF_RANGE: Failed writing: \"/x/d/ab\": No space left on device [os_error_code='28']")
    assert checkpoints._is_out_of_space(wrapped)
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert checkpoints._is_out_of_space(outer)
    assert not checkpoints._is_out_of_space(ValueError("Requested shape (8, 6) is not compatible"))


_DISK_FULL_SCRIPT = textwrap.dedent("""
    import resource, signal, sys
    import jax, jax.numpy as jnp, numpy as np
    from rest_jax import checkpoints
    directory = sys.argv[1]
    manager = checkpoints.CheckpointManager(directory, period=1, keep_knob="train.keep_checkpoints")
    big = {"w": jax.random.normal(jax.random.key(0), (256, 256))}
    manager.save(1, big)
    # Every write past 64 KB now fails inside tensorstore, as on a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        manager.save(2, {"w": big["w"] + 1})
    except checkpoints.CheckpointDiskFullError as e:
        print("DISKFULL:", e)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    restored, _ = manager.restore({"w": jnp.zeros((256, 256))})
    print("RESTORED_EQUAL:", bool(np.array_equal(restored["w"], big["w"])), manager.all_steps())
""")


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-c", _DISK_FULL_SCRIPT, str(tmp_path / "ckpt")], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "XLA_FLAGS": ""})
    out = result.stdout
    assert "DISKFULL:" in out, result.stderr[-3000:]
    assert "Out of disk space while saving checkpoint step 2" in out
    assert "previous checkpoints are intact: steps [1]" in out
    # The knob that sets `keep` for the running loop (CheckpointManager.keep is overridden by every caller).
    assert "keep fewer checkpoints (gin: train.keep_checkpoints, now 3)" in out
    assert "CheckpointManager.keep" not in out
    assert "RESTORED_EQUAL: True [1]" in out
    assert not list((tmp_path / "ckpt").glob("2.orbax-checkpoint-tmp*"))


# -- integrity: checksums recorded at save, checked at every restore -------------------------------


def _two_steps(directory, **kwargs):
    manager = checkpoints.CheckpointManager(directory, period=1, **kwargs)
    for step in (1, 2):
        manager.save(step, {"params": {"w": jnp.arange(4096.0).reshape(64, 64) + step, "b": jnp.ones(3)}},
                     metadata={"data_step": step})
    manager.close()
    return {"params": {"w": jnp.zeros((64, 64)), "b": jnp.zeros(3)}}


def _largest_data_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _assert_damage_reported(msg, directory, fault):
    """The message names the step, the fault, and both ways forward (delete it / load step 1)."""
    assert f"Checkpoint {directory / '2'} is damaged" in msg
    assert fault in msg, msg
    assert f"rm -r {directory / '2'}" in msg and "rerun the same command" in msg
    assert f"give {directory / '1'} as the checkpoint" in msg and "--gin.evaluate.step=1" in msg


def test_flipped_bytes_in_a_data_file_are_refused_naming_the_file(tmp_path):
    target = _two_steps(tmp_path)
    assert json.loads((tmp_path / "2" / "checksums.json").read_text())["files"]
    data = _largest_data_file(tmp_path / "2")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte: Orbax alone restores it as a wrong value
    data.write_bytes(bytes(raw))
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    rel = data.relative_to(tmp_path / "2").as_posix()
    for load in (lambda: manager.restore(target), lambda: manager.metadata(),
                 lambda: checkpoints.load_params(tmp_path), lambda: checkpoints.load_params(tmp_path / "2")):
        with pytest.raises(checkpoints.CheckpointCorruptError) as info:
            load()
        _assert_damage_reported(str(info.value), tmp_path, f"{rel}: checksum mismatch")
    assert manager.find_damage(2) == [f"{rel}: checksum mismatch (contents changed since the save)"]
    # The way forward works: the previous step restores, and so does the latest once the damaged one is gone.
    restored, meta = manager.restore(target, step=1)
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4096.0).reshape(64, 64) + 1)
    assert manager.find_damage(1) == [] and meta["data_step"] == 1
    manager.close()
    shutil.rmtree(tmp_path / "2")
    restored, _ = checkpoints.CheckpointManager(tmp_path, period=1).restore(target)
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4096.0).reshape(64, 64) + 1)


@pytest.mark.parametrize("damage", ["truncated_data", "truncated_orbax_metadata", "missing_data",
                                    "missing_checksums", "bad_checksums"])
def test_truncated_or_missing_files_are_refused_naming_the_file(tmp_path, damage):
    target = _two_steps(tmp_path)
    step_dir = tmp_path / "2"
    data = _largest_data_file(step_dir)
    rel = data.relative_to(step_dir).as_posix()
    if damage == "truncated_data":
        size = data.stat().st_size
        data.write_bytes(data.read_bytes()[:size // 2])
        fault = f"{rel}: truncated ({size // 2} of {size} bytes)"
    elif damage == "truncated_orbax_metadata":
        text = (step_dir / "state" / "_METADATA").read_text()
        (step_dir / "state" / "_METADATA").write_text(text[:50])
        fault = f"state/_METADATA: truncated (50 of {len(text)} bytes)"
    elif damage == "missing_data":
        data.unlink()
        fault = f"{rel}: missing"
    elif damage == "missing_checksums":  # e.g. lost in a copy: the step's metadata says it had one
        (step_dir / "checksums.json").unlink()
        fault = "checksums.json is missing"
    else:
        (step_dir / "checksums.json").write_text('{"files": ')
        fault = "checksums.json is unreadable"
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    for load in (lambda: manager.restore(target), lambda: checkpoints.load_params(tmp_path)):
        with pytest.raises(checkpoints.CheckpointCorruptError) as info:
            load()
        _assert_damage_reported(str(info.value), tmp_path, fault)
    manager.close()


def _as_saved_before_checksums(step_dir):
    """What a step saved by an earlier rest_jax looks like: no checksums.json, no `checksums` metadata key."""
    (step_dir / "checksums.json").unlink()
    meta_file = step_dir / "metadata" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["checksums"]
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [None, "truncated_data", "bad_orbax_metadata", "bad_metadata"])
def test_steps_saved_before_checksums_load_and_damage_is_still_named(tmp_path, caplog, damage):
    target = _two_steps(tmp_path)
    for step in (1, 2):
        _as_saved_before_checksums(tmp_path / str(step))
    step_dir = tmp_path / "2"
    manager = checkpoints.CheckpointManager(tmp_path, period=1)
    if damage is None:
        with caplog.at_level(logging.INFO):
            restored, meta = manager.restore(target)
        np.testing.assert_array_equal(restored["params"]["w"], np.arange(4096.0).reshape(64, 64) + 2)
        assert meta["data_step"] == 2
        assert f"Checkpoint {step_dir} has no checksums.json" in caplog.text
        assert manager.find_damage(2) == []
        return
    if damage == "truncated_data":
        data = _largest_data_file(step_dir)
        data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
        fault = "OUT_OF_RANGE: Error reading"  # tensorstore's words, under the step's path
    elif damage == "bad_orbax_metadata":
        (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {"')
        fault = "an Orbax metadata file is not valid JSON"
    else:
        meta_file = step_dir / "metadata" / "metadata"
        meta_file.write_text(meta_file.read_text()[:5])
        fault = f"checkpoint metadata {meta_file} is unreadable"
    for load in (lambda: manager.restore(target), lambda: checkpoints.load_params(tmp_path)):
        with pytest.raises(checkpoints.CheckpointCorruptError) as info:
            load()
        _assert_damage_reported(str(info.value), tmp_path, fault)
    manager.close()


def test_async_saves_record_checksums_once_finished(tmp_path):
    manager = checkpoints.CheckpointManager(tmp_path, period=1, async_save=True)
    for step in (1, 2):
        manager.save(step, {"w": jnp.full((8,), float(step))})
    manager.close()
    for step in (1, 2):
        assert (tmp_path / str(step) / "checksums.json").exists()
        assert checkpoints.find_damage(tmp_path / str(step)) == []
