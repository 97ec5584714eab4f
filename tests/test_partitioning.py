"""Sharding on 8 simulated CPU devices: meshes, T5X axis rules, sharded state and batches.

The reference for every sharded result is the same computation on one device without a mesh; the
expected parameter layouts are written out by hand from T5X's rules.
"""

import functools

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from rest_jax import partitioning
from rest_jax.model import t5

MESHES = [(8, 1), (4, 2), (2, 4), (1, 8)]

TINY = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                   num_encoder_layers=2, num_decoder_layers=2)
BATCH, SRC_LEN, TGT_LEN = 8, 12, 10

# T5X's standard_logical_axis_rules() with its defaults (1-D activations and parameters).
T5X_RULES_1D = (
    ("batch", "data"), ("vocab", "model"), ("embed", None), ("mlp", "model"), ("heads", "model"),
    ("kv", None), ("joined_kv", "model"), ("relpos_buckets", None), ("abspos_buckets", None),
    ("length", None), ("layers", None), ("stack", None), ("mlp_activations", None),
)


def _expected_mesh_spec(path: str, model_ways: int) -> tuple:
    """Hand-derived mesh layout of each T5X parameter under the 1-D rules."""
    leaf = path.split("/")
    if leaf[-1] == "scale":                                   # ('embed',)
        return (None,)
    if leaf[-1] == "embedding":                               # ('vocab', 'embed')
        return ("model", None)
    if leaf[-1] == "rel_embedding":                           # ('heads', 'relpos_buckets')
        # 4 heads cannot be split 8 ways: replicated rather than failing.
        return ("model" if TINY.num_heads % model_ways == 0 else None, None)
    if leaf[-2] in ("query", "key", "value"):                 # ('embed', 'joined_kv')
        return (None, "model")
    if leaf[-2] == "out":                                     # ('joined_kv', 'embed')
        return ("model", None)
    if leaf[-2].startswith("wi"):                             # ('embed', 'mlp')
        return (None, "model")
    if leaf[-2] == "wo":                                      # ('mlp', 'embed')
        return ("model", None)
    if leaf[-2] == "logits_dense":                            # ('embed', 'vocab')
        return (None, "model")
    raise AssertionError(f"unexpected parameter {path}")


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k, simple=True, separator="/"): v
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def _token_loss(params, batch, model):
    """Mean token cross-entropy over `decoder_loss_weights` (teacher forcing)."""
    logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
    weights = batch["decoder_loss_weights"]
    return jnp.sum(ce * weights) / jnp.sum(weights), logits


def _make_batch() -> dict:
    rng = np.random.default_rng(0)
    enc = rng.integers(3, TINY.vocab_size, (BATCH, SRC_LEN)).astype(np.int32)
    tgt = rng.integers(3, TINY.vocab_size, (BATCH, TGT_LEN)).astype(np.int32)
    src_lens = rng.integers(4, SRC_LEN + 1, BATCH)
    tgt_lens = rng.integers(3, TGT_LEN + 1, BATCH)
    for i in range(BATCH):
        enc[i, src_lens[i]:] = 0
        tgt[i, tgt_lens[i] - 1] = 1  # EOS
        tgt[i, tgt_lens[i]:] = 0
    dec_in = np.concatenate([np.zeros((BATCH, 1), np.int32), tgt[:, :-1]], axis=1)
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec_in, "decoder_target_tokens": tgt,
            "decoder_loss_weights": (tgt > 0).astype(np.float32)}


@pytest.fixture(scope="module")
def setup():
    """Model, boxed host parameters, a batch and the single-device reference results."""
    model = t5.Transformer(TINY)
    boxed = t5.init_params(model, jax.random.key(0), batch_size=2)
    params = jax.device_get(nn.unbox(boxed))
    batch = _make_batch()
    grad_fn = jax.value_and_grad(functools.partial(_token_loss, model=model), has_aux=True)
    (loss, logits), grads = jax.jit(grad_fn)(params, batch)
    reference = jax.device_get({"loss": loss, "logits": logits, "grads": grads})
    return {"model": model, "boxed": boxed, "params": params, "batch": batch, "grad_fn": grad_fn,
            "reference": reference}


# ---------------------------------------------------------------------------------------------
# Rules and mesh.
# ---------------------------------------------------------------------------------------------


def test_standard_rules_are_t5x():
    assert partitioning.standard_logical_axis_rules() == T5X_RULES_1D
    two_d_params = dict(reversed(partitioning.standard_logical_axis_rules(parameter_partitioning_dims=2)))
    assert two_d_params["embed"] == "data" and two_d_params["mlp"] == "model"
    both = partitioning.standard_logical_axis_rules(2, 2)
    assert [r for r in both if r[0] == "embed"] == [("embed", "model"), ("embed", "data")]
    extra = partitioning.standard_logical_axis_rules(additional_rules=[("cache_batch", "data")])
    assert extra[-1] == ("cache_batch", "data")
    with pytest.raises(ValueError, match="activation_partitioning_dims=3"):
        partitioning.standard_logical_axis_rules(activation_partitioning_dims=3)


def test_rules_and_mesh_are_gin_configurable():
    # A private scope leaves other tests' gin bindings untouched.
    gin.parse_config([
        # T5X spelling of the knob.
        "test_partitioning/partitioning.standard_logical_axis_rules.parameter_partitioning_dims = 2",
        "test_partitioning/create_mesh.mesh_shape = (2, -1)",
    ])
    with gin.config_scope("test_partitioning"):
        rules = partitioning.standard_logical_axis_rules()
        mesh = partitioning.create_mesh()
    # Under 2-D parameter partitioning the embed dimension of an mlp kernel is split along 'data'.
    assert nn.logical_to_mesh_axes(("embed", "mlp"), rules) == P("data", "model")
    # Activations keep 'data' for the batch, so their embed dimension stays unsplit.
    assert nn.logical_to_mesh_axes(("batch", "length", "embed"), rules) == P("data", None, None)
    assert dict(mesh.shape) == {"data": 2, "model": 4}


def test_create_mesh_shapes_and_errors():
    mesh = partitioning.create_mesh()
    assert dict(mesh.shape) == {"data": 8, "model": 1}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert dict(partitioning.create_mesh(num_partitions=4).shape) == {"data": 2, "model": 4}
    assert dict(partitioning.create_mesh((2, 2, -1), ("replica", "data", "model")).shape) == {
        "replica": 2, "data": 2, "model": 2}
    with pytest.raises(ValueError, match="not divisible by 3"):
        partitioning.create_mesh((3, -1))
    with pytest.raises(ValueError, match="needs 4 devices, but 8"):
        partitioning.create_mesh((2, 2))
    with pytest.raises(ValueError, match="at most one -1"):
        partitioning.create_mesh((-1, -1))
    with pytest.raises(ValueError, match="differ in length"):
        partitioning.create_mesh((8,))


def test_logical_to_sharding_and_mesh_context():
    mesh = partitioning.create_mesh((4, 2))
    shardings = partitioning.logical_to_sharding(
        {"tokens": P("batch", "length"), "logits": P("batch", "length", "vocab"), "step": None}, mesh)
    assert shardings["tokens"].spec == P("data", None)
    assert shardings["logits"].spec == P("data", None, "model")
    assert shardings["step"].spec == P() and shardings["step"].mesh == mesh
    assert partitioning.replicated(mesh).is_fully_replicated
    rules = partitioning.standard_logical_axis_rules()
    with partitioning.mesh_context(mesh, rules):
        assert tuple(nn.get_logical_axis_rules()) == rules
        assert dict(jax.sharding.get_abstract_mesh().shape) == {"data": 4, "model": 2}
    assert not nn.get_logical_axis_rules()
    assert jax.sharding.get_abstract_mesh().empty


# ---------------------------------------------------------------------------------------------
# Real model: parameter layouts, sharded forward / loss / gradients.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_parameters_split_along_model(setup, mesh_shape):
    mesh = partitioning.create_mesh(mesh_shape)
    model_ways = mesh.shape["model"]
    state, shardings = partitioning.Partitioner.create(mesh).place(setup["boxed"])
    flat_state, flat_shardings = _flat(nn.unbox(state)), _flat(shardings)
    assert flat_state.keys() == flat_shardings.keys()
    assert "decoder/layers_1/mlp/wi_0/kernel" in flat_state  # gated GELU (T5 v1.1)
    for path, arr in flat_state.items():
        expected = _expected_mesh_spec(path, model_ways)
        assert arr.sharding.spec == P(*expected), path
        assert flat_shardings[path].spec == P(*expected), path
        shard_shape = arr.sharding.shard_shape(arr.shape)
        want = tuple(n // model_ways if axis == "model" else n for n, axis in zip(arr.shape, expected))
        assert shard_shape == want, path
        # Each device holds only its shard, with the right values.
        for shard in arr.addressable_shards:
            assert shard.data.shape == want
            np.testing.assert_array_equal(np.asarray(shard.data), _flat(setup["params"])[path][shard.index])
    kernel = flat_state["encoder/layers_0/attention/query/kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (TINY.emb_dim, TINY.num_heads * TINY.head_dim // model_ways)
    scale = flat_state["encoder/encoder_norm/scale"]
    assert scale.sharding.is_fully_replicated


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_forward_loss_and_grads_match_single_device(setup, mesh_shape):
    mesh = partitioning.create_mesh(mesh_shape)
    rules = partitioning.standard_logical_axis_rules()
    state, shardings = partitioning.Partitioner.create(mesh, rules).place(setup["boxed"])
    params = nn.unbox(state)
    batch = partitioning.shard_batch(setup["batch"], mesh, rules)
    with partitioning.mesh_context(mesh, rules):
        step = jax.jit(setup["grad_fn"], out_shardings=((partitioning.replicated(mesh), None), shardings))
        compiled = step.lower(params, batch).compile()
        (loss, logits), grads = compiled(params, batch)
    ref = setup["reference"]
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(ref["loss"]), rtol=1e-5)
    flat_grads, flat_ref = _flat(grads), _flat(ref["grads"])
    assert flat_grads.keys() == flat_ref.keys()
    for path, g in flat_grads.items():
        scale = np.abs(flat_ref[path]).max()
        np.testing.assert_allclose(np.asarray(g), flat_ref[path], rtol=1e-5, atol=1e-5 * scale, err_msg=path)
        assert g.sharding.is_equivalent_to(_flat(shardings)[path], g.ndim), path
    # The model's ('batch', 'length', 'vocab') constraint reaches the logits.
    assert logits.sharding.is_equivalent_to(
        jax.sharding.NamedSharding(mesh, P("data", None, "model")), logits.ndim)
    if mesh.shape["model"] > 1:
        # Model parallelism really happened: partial results are combined across devices.
        assert "all-reduce" in compiled.as_text() or "reduce-scatter" in compiled.as_text()


def test_partitioner_init_creates_state_in_shards(setup):
    """Params and optimizer state come out of one jitted init already sharded, equal to a host init."""
    mesh = partitioning.create_mesh((2, 4))
    model, tx = setup["model"], optax.adam(1e-3)

    def init_fn(rng):
        params = t5.init_params(model, rng, batch_size=2)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    state, shardings = partitioning.Partitioner.create(mesh).init(init_fn, jax.random.key(0))
    params = _flat(nn.unbox(state["params"]))
    host = _flat(setup["params"])
    assert params.keys() == host.keys()
    for path, arr in params.items():
        np.testing.assert_allclose(np.asarray(arr), host[path], rtol=1e-6, atol=1e-7, err_msg=path)
        assert arr.sharding.spec == P(*_expected_mesh_spec(path, 4)), path
    mu = nn.unbox(state["opt_state"][0].mu)["decoder"]["layers_0"]["mlp"]["wo"]["kernel"]
    assert mu.sharding.shard_shape(mu.shape) == (TINY.mlp_dim // 4, TINY.emb_dim)
    assert state["step"].sharding.is_fully_replicated
    assert jax.tree.structure(shardings) == jax.tree.structure(nn.unbox(state))


def test_param_shardings_replicate_misfits():
    """Shapes that do not fit their names (factored optimizer moments) or the mesh are replicated."""
    mesh = partitioning.create_mesh((1, 8))
    tree = {
        "factored": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16,), jnp.float32), ("embed", "mlp")),
        "heads": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((4, 32), jnp.float32), ("heads", "relpos_buckets")),
        "mlp": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((16, 64), jnp.float32), ("embed", "mlp")),
        "count": jax.ShapeDtypeStruct((), jnp.int32),
    }
    shardings = partitioning.get_param_shardings(tree, mesh)
    assert shardings["factored"].spec == P()
    assert shardings["heads"].spec == P(None, None)
    assert shardings["mlp"].spec == P(None, "model")
    assert shardings["count"].spec == P()


# ---------------------------------------------------------------------------------------------
# Batches and multi-host start-up.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mesh_shape", [(4, 2), (1, 8)])
def test_shard_batch_puts_rows_on_data(mesh_shape):
    mesh = partitioning.create_mesh(mesh_shape)
    host = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "weight": np.float32(2.0)}
    assert partitioning.data_shard_info(mesh) == (0, 1)
    batch = partitioning.shard_batch(host, mesh)
    tokens = batch["tokens"]
    assert tokens.shape == (8, 5) and tokens.sharding.spec == P("data", None)
    rows = 8 // mesh.shape["data"]
    for shard in tokens.addressable_shards:
        data_index = int(np.argwhere(mesh.devices == shard.device)[0][0])
        expected_rows = slice(data_index * rows, (data_index + 1) * rows)
        np.testing.assert_array_equal(np.asarray(shard.data), host["tokens"][expected_rows])
    assert batch["weight"].sharding.is_fully_replicated and float(batch["weight"]) == 2.0


def test_shard_batch_rejects_indivisible_batch():
    mesh = partitioning.create_mesh((4, 2))
    with pytest.raises(ValueError, match="'tokens'.*6.*4-way"):
        partitioning.shard_batch({"tokens": np.zeros((6, 3), np.int32)}, mesh)


def test_initialize_multihost(monkeypatch):
    for name in partitioning._MULTIPROCESS_ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    looked_up = []  # a process other than 0 first checks that the coordinator answers
    monkeypatch.setattr(partitioning, "_wait_for_coordinator", lambda *args: looked_up.append(args))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # keep this process's collectives as they are
    assert partitioning.initialize_multihost() is False  # one CPU process: a no-op
    assert partitioning.initialize_multihost(mode="never") is False
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert partitioning.initialize_multihost() is False  # one task / one host
    assert calls == []
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "host-a,host-b")
    assert partitioning.initialize_multihost() is True
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert partitioning.initialize_multihost(num_processes=4) is True
    assert partitioning.initialize_multihost(mode="always", coordinator_address="h:1234", process_id=1)
    assert len(calls) == 3 and calls[1]["num_processes"] == 4
    assert calls[2]["coordinator_address"] == "h:1234" and calls[2]["process_id"] == 1
    assert [a[0] for a in looked_up] == ["h:1234"]
    assert calls[2]["initialization_timeout"] == 120 and calls[2]["heartbeat_timeout_seconds"] == 60
    # `rest_jax launch` tells each process where the coordinator is and who it is.
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv(partitioning.COORDINATOR_ENV, "127.0.0.1:5")
    monkeypatch.setenv(partitioning.NUM_PROCESSES_ENV, "2")
    monkeypatch.setenv(partitioning.PROCESS_ID_ENV, "0")
    assert partitioning.initialize_multihost(heartbeat_timeout_s=7) is True
    assert {k: calls[3][k] for k in ("coordinator_address", "num_processes", "process_id",
                                     "heartbeat_timeout_seconds")} == {
        "coordinator_address": "127.0.0.1:5", "num_processes": 2, "process_id": 0, "heartbeat_timeout_seconds": 7}
    with pytest.raises(ValueError, match="'auto', 'always' or 'never'"):
        partitioning.initialize_multihost(mode="sometimes")
