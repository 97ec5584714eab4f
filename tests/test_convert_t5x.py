"""Import of T5X checkpoints (legacy msgpack + TensorStore, and Orbax) into rest_jax parameters.

The checkpoints are written here by a minimal writer that follows T5X's on-disk format (t5x/checkpoints.py):
  * legacy: `checkpoint_<step>/checkpoint` is a flax msgpack of {'version': 3, 'optimizer': {'target': ...,
    'state': {'step', 'param_states'}}}; small arrays are stored inline, big ones as a TensorStore zarr spec
    {'driver': 'zarr', 'dtype', 'kvstore': {'driver': 'file'|'gfile', 'path': '<name with . for />/'},
    'metadata': {'chunks', 'compressor', 'shape'}} whose path is relative to the step directory;
  * Orbax: `checkpoint_<step>/state/` written by `PyTreeCheckpointHandler(use_ocdbt=True)` holding the
    same state dict.
"""

import functools
import json

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts
from flax import serialization

from rest_jax import convert
from rest_jax import tree as tree_lib
from rest_jax.model.t5 import T5Config, Transformer

CONFIG = T5Config(vocab_size=53, emb_dim=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=3,
                  head_dim=8, mlp_dim=24, mlp_activations=("gelu", "linear"), logits_via_embedding=False)


def _init(config: T5Config, seed: int) -> dict:
    """Random parameters of every name and shape the model has (all distinct, so a mix-up is visible)."""
    rng = np.random.RandomState(seed)
    shapes = convert.expected_param_shapes(config)
    return tree_lib.unflatten(
        {name: rng.normal(0.0, 0.5, shape).astype(np.float32) for name, shape in shapes.items()})


def _optimizer_state(params: dict) -> dict:
    """Adafactor-like factored second moments, as T5X's default optimizer stores them."""
    def factored(x):
        if x.ndim == 2:
            return {"m": np.zeros((1,), np.float32), "v": np.zeros((1,), np.float32),
                    "v_row": np.full(x.shape[:1], 0.5, np.float32), "v_col": np.full(x.shape[1:], 0.25, np.float32)}
        return {"m": np.zeros((1,), np.float32), "v": np.full(x.shape, 0.125, np.float32),
                "v_row": np.zeros((1,), np.float32), "v_col": np.zeros((1,), np.float32)}
    return jax.tree_util.tree_map(factored, params)


def _write_zarr(directory, rel: str, value: np.ndarray, dtype: str) -> dict:
    """Writes `value` as a zarr array at directory/rel; returns the spec T5X stores in the msgpack."""
    chunks = [max(1, d // 2) for d in value.shape]
    metadata = {"chunks": chunks, "compressor": {"id": "gzip", "level": 1}, "shape": list(value.shape)}
    store = ts.open({"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": str(directory / rel)},
                     "metadata": metadata}, create=True, delete_existing=True).result()
    store.write(value.astype(store.dtype.numpy_dtype)).result()
    return {"driver": "zarr", "dtype": dtype, "kvstore": {"driver": "file", "path": rel + "/"},
            "metadata": metadata}


def write_legacy_checkpoint(model_dir, state: dict, step: int, bf16=(), gfile=()) -> None:
    """T5X's legacy layout: arrays of rank >= 2 go to TensorStore, the rest inline in the msgpack."""
    step_dir = model_dir / f"checkpoint_{step}"
    step_dir.mkdir(parents=True)

    def to_msgpack(tree, prefix):
        out = {}
        for key, value in tree.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, dict):
                out[key] = to_msgpack(value, name)
            elif np.ndim(value) >= 2:
                spec = _write_zarr(step_dir, name.replace("/", "."), np.asarray(value),
                                   "bfloat16" if name in bf16 else "float32")
                if name in gfile:  # what T5X wrote through gfile on some installations
                    spec["kvstore"]["driver"] = "gfile"
                out[key] = spec
            else:
                out[key] = np.asarray(value).astype(jnp.bfloat16) if name in bf16 else value
        return out

    contents = {"version": 3, "optimizer": to_msgpack(state, "")}
    (step_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))


def write_orbax_checkpoint(model_dir, state: dict, step: int) -> None:
    """T5X's Orbax layout: a CheckpointManager with a 'state' PyTree item under checkpoint_<step>/."""
    manager = ocp.CheckpointManager(
        model_dir, item_handlers={"state": ocp.PyTreeCheckpointHandler(use_ocdbt=True)},
        options=ocp.CheckpointManagerOptions(step_prefix="checkpoint"))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)))
    manager.wait_until_finished()
    manager.close()


def _state(params: dict, step: int) -> dict:
    return {"target": params, "state": {"step": np.int32(step), "param_states": _optimizer_state(params)}}


def _assert_params_equal(got: dict, expected: dict) -> None:
    got_flat = tree_lib.flatten(got)
    expected_flat = tree_lib.flatten(expected)
    assert sorted(got_flat) == sorted(expected_flat)
    for name, value in expected_flat.items():
        assert got_flat[name].dtype == jnp.float32, name
        np.testing.assert_array_equal(np.asarray(got_flat[name]), np.asarray(value, np.float32), err_msg=name)


@functools.lru_cache(maxsize=None)
def _jitted_apply(config: T5Config):
    return jax.jit(Transformer(config).apply)


def _logits(config: T5Config, params: dict) -> np.ndarray:
    enc = jnp.asarray([[5, 9, 3, 1, 0, 0], [7, 2, 8, 4, 6, 1]], jnp.int32)
    dec = jnp.asarray([[0, 4, 4, 2], [0, 1, 9, 3]], jnp.int32)
    return np.asarray(_jitted_apply(config)({"params": params}, enc, dec))


def _round_bf16(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(jnp.bfloat16).astype(np.float32)


def test_legacy_msgpack_tensorstore(tmp_path):
    params = _init(CONFIG, 0)
    bf16 = {"target/encoder/layers_1/mlp/wo/kernel", "target/decoder/decoder_norm/scale"}
    for name in bf16:  # bfloat16-representable so the upcast import equals what was written
        node = params
        *parents, leaf = name.split("/")[1:]
        for p in parents:
            node = node[p]
        node[leaf] = _round_bf16(node[leaf])
    write_legacy_checkpoint(tmp_path, _state(params, 1000), 1000, bf16=bf16,
                            gfile={"target/decoder/logits_dense/kernel"})
    # The layout really is the documented one: specs in the msgpack, zarr arrays beside it.
    raw = serialization.msgpack_restore((tmp_path / "checkpoint_1000" / "checkpoint").read_bytes())
    spec = raw["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["query"]["kernel"]
    assert spec["kvstore"]["path"] == "target.encoder.layers_0.attention.query.kernel/"
    assert (tmp_path / "checkpoint_1000" / "target.encoder.layers_0.attention.query.kernel" / ".zarray").exists()

    # Copies made without dot-files lose .zarray; the spec in the msgpack still describes the array.
    (tmp_path / "checkpoint_1000" / "target.decoder.layers_2.mlp.wi_1.kernel" / ".zarray").unlink()

    config, imported = convert.load_t5x_checkpoint(tmp_path)
    assert config == CONFIG
    _assert_params_equal(imported, params)
    # Same model and parameters: the model runs on the import and gives the written parameters' logits.
    logits = _logits(config, imported)
    assert np.isfinite(logits).all()
    np.testing.assert_array_equal(logits, _logits(CONFIG, jax.tree_util.tree_map(jnp.asarray, params)))

    state = convert.read_t5x_state(tmp_path / "checkpoint_1000")
    assert int(state["state"]["step"]) == 1000
    np.testing.assert_array_equal(
        state["state"]["param_states"]["encoder"]["layers_0"]["attention"]["key"]["kernel"]["v_row"],
        np.full((16,), 0.5, np.float32))
    # Pointing at the msgpack file itself works too.
    _, again = convert.load_t5x_checkpoint(tmp_path / "checkpoint_1000" / "checkpoint")
    _assert_params_equal(again, params)


def test_orbax_layout(tmp_path):
    params = _init(CONFIG, 1)
    write_orbax_checkpoint(tmp_path, _state(params, 7), 7)
    assert (tmp_path / "checkpoint_7" / "state").is_dir()
    config, imported = convert.load_t5x_checkpoint(tmp_path)
    assert config == CONFIG
    _assert_params_equal(imported, params)
    np.testing.assert_array_equal(_logits(config, imported),
                                  _logits(CONFIG, jax.tree_util.tree_map(jnp.asarray, params)))
    state = convert.read_t5x_state(tmp_path / "checkpoint_7")
    assert int(state["state"]["step"]) == 7
    np.testing.assert_array_equal(state["state"]["param_states"]["decoder"]["decoder_norm"]["scale"]["v"],
                                  np.full((16,), 0.125, np.float32))


def test_step_selection_and_tied_relu_inference(tmp_path):
    tied = CONFIG.replace(mlp_activations=("relu",), logits_via_embedding=True, num_decoder_layers=1)
    old, new = _init(tied, 2), _init(tied, 3)
    write_legacy_checkpoint(tmp_path, _state(old, 3), 3)
    write_legacy_checkpoint(tmp_path, _state(new, 12), 12)
    config, latest = convert.load_t5x_checkpoint(tmp_path)
    assert config == tied
    _assert_params_equal(latest, new)
    _, earlier = convert.load_t5x_checkpoint(tmp_path, step=3)
    _assert_params_equal(earlier, old)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint_5; available steps: \[3, 12\]"):
        convert.load_t5x_checkpoint(tmp_path, step=5)


def test_early_orbax_placeholder_layout(tmp_path):
    """The msgpack-of-placeholders layout of T5X's first Orbax checkpoints (t5x/testdata/tiny_orbax)."""
    params = _init(CONFIG, 4)
    step_dir = tmp_path / "checkpoint_2"
    step_dir.mkdir()
    flat = tree_lib.flatten({"target": params})
    tree = {}
    for name, value in flat.items():
        rel = "_optimizer." + name.replace("/", ".")
        _write_zarr(step_dir, rel, np.asarray(value), "float32")
        tree[name] = "PLACEHOLDER://" + rel
    contents = {"_optimizer": tree_lib.unflatten(tree), "flax_mutables": None}
    (step_dir / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    _, imported = convert.load_t5x_checkpoint(tmp_path)
    _assert_params_equal(imported, params)


def test_errors_name_the_parameter(tmp_path):
    params = _init(CONFIG, 5)
    write_legacy_checkpoint(tmp_path / "a", _state(params, 1), 1)
    with pytest.raises(ValueError, match=r"encoder/layers_0/mlp/wi_0/kernel has shape \(16, 24\), "
                                         r"the model expects \(16, 32\)"):
        convert.load_t5x_checkpoint(tmp_path / "a", config=CONFIG.replace(mlp_dim=32))
    with pytest.raises(ValueError, match=r"missing parameter decoder/layers_3/"):
        convert.load_t5x_checkpoint(tmp_path / "a", config=CONFIG.replace(num_decoder_layers=4))

    broken = dict(params, encoder=dict(params["encoder"]))
    write_legacy_checkpoint(tmp_path / "b", _state(broken, 1), 1)
    import shutil
    shutil.rmtree(tmp_path / "b" / "checkpoint_1" / "target.encoder.relpos_bias.rel_embedding")
    with pytest.raises(ValueError, match=r"cannot read target/encoder/relpos_bias/rel_embedding"):
        convert.load_t5x_checkpoint(tmp_path / "b")

    with pytest.raises(FileNotFoundError, match="no T5X checkpoint"):
        (tmp_path / "empty").mkdir()
        convert.load_t5x_checkpoint(tmp_path / "empty")
    (tmp_path / "junk").write_bytes(b"\xc1 not msgpack")
    with pytest.raises(ValueError, match="not a T5X msgpack checkpoint"):
        convert.load_t5x_checkpoint(tmp_path / "junk")


def test_gin_convert_t5x_to_rest_jax(tmp_path, capsys):
    params = _init(CONFIG, 6)
    write_orbax_checkpoint(tmp_path / "t5x", _state(params, 4), 4)
    gin.clear_config()
    try:
        gin.parse_config([
            "convert.source_format = 't5x'",
            f"convert.source_path = '{tmp_path / 't5x'}'",
            "convert.target_format = 'rest_jax'",
            f"convert.output_path = '{tmp_path / 'out'}'",
            "T5Config.relative_attention_max_distance = 64",  # not in the shapes: taken from gin
        ])
        convert.convert()
    finally:
        gin.clear_config()
    config, imported = convert.load_rest_jax(tmp_path / "out")
    assert config == CONFIG.replace(relative_attention_max_distance=64)
    _assert_params_equal(imported, params)
    # The team's checkpoint reader (used by training, Grow and evaluation) reads the converted model.
    from rest_jax import checkpoints
    _assert_params_equal(jax.tree_util.tree_map(jnp.asarray, checkpoints.load_params(tmp_path / "out")), params)
    meta = json.loads((tmp_path / "out" / "0" / "metadata" / "metadata").read_text())
    assert meta["model_config"]["relative_attention_max_distance"] == 64
    assert meta["converted_from"] == f"t5x:{tmp_path / 't5x'}"
    # Converting again into the same folder replaces that earlier export (and nothing but an export).
    write_orbax_checkpoint(tmp_path / "t5x", _state(_init(CONFIG, 7), 8), 8)
    convert.convert(source_format="t5x", source_path=str(tmp_path / "t5x"), output_path=str(tmp_path / "out"),
                    config=CONFIG)
    assert "replaced the previous export there" in capsys.readouterr().out
    _assert_params_equal(convert.load_rest_jax(tmp_path / "out")[1], _init(CONFIG, 7))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0"]


def test_export_to_t5x_is_the_legacy_state_dict_and_reads_back_exactly(tmp_path):
    # rest_jax -> T5X (issue 14): a model trained here loads in T5X from disk. T5X is not installable here, so
    # the file is checked against T5X's state-dict layout by hand (the module docstring), then read back.
    config = T5Config(vocab_size=53, emb_dim=16, num_heads=2, num_encoder_layers=2, num_decoder_layers=1,
                      head_dim=8, mlp_dim=24, mlp_activations=("relu",), logits_via_embedding=True,
                      dropout_rate=0.05)
    params = _init(config, 3)
    out = tmp_path / "t5x_export"
    convert.save_t5x(config, params, out, step=7)
    contents = serialization.msgpack_restore((out / "checkpoint_7" / "checkpoint").read_bytes())
    assert contents["version"] == 3 and set(contents["optimizer"]) == {"target", "state"}
    assert int(contents["optimizer"]["state"]["step"]) == 7
    written = tree_lib.flatten(contents["optimizer"]["target"])
    assert written.keys() == tree_lib.flatten(params).keys()
    assert all(np.array_equal(written[k], v) for k, v in tree_lib.flatten(params).items())
    read_config, read = convert.load_t5x_checkpoint(out)
    assert read_config == config  # dropout and activations from the file beside it, not guessed from shapes
    assert all(np.array_equal(np.asarray(tree_lib.flatten(read)[k]), v) for k, v in tree_lib.flatten(params).items())
    # A second export replaces the first; a folder that is not one of ours is refused and kept.
    convert.save_t5x(config, _init(config, 4), out, step=9)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint_9", "rest_jax_export.json"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(convert.OutputPathError, match="not a previous T5X export"):
        convert.save_t5x(config, params, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
