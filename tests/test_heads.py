"""Value network and regression model (rest_jax.model.heads).

References: the value/regression head on top of the trunk must equal the same linear unit applied to what the
independently tested `Transformer` computes (its logits with a crafted output projection, its encoder output),
recomputed in float64 NumPy; the sigmoid's bias gradient is checked against its closed form.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import losses, optim, partitioning, trainer
from rest_jax import tree as tree_lib
from rest_jax.model import heads
from rest_jax.model.t5 import T5Config, Transformer

CONFIG = T5Config(vocab_size=40, emb_dim=32, num_heads=4, head_dim=8, mlp_dim=48, num_encoder_layers=2,
                  num_decoder_layers=2)
ENC = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0], [11, 12, 13, 14, 15, 1]], np.int32)
DEC = np.array([[0, 5, 6, 7, 1], [0, 9, 1, 0, 0], [0, 11, 12, 13, 14]], np.int32)


def _flat(tree):
    return tree_lib.flatten(nn.unbox(tree))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def value_params():
    return nn.unbox(heads.init_params(heads.ValueNetwork(CONFIG), jax.random.key(1)))


def _policy_params_with_column(trunk, kernel_column):
    """Transformer parameters equal to the trunk, whose vocab id 0 logit is hidden @ kernel_column."""
    policy = _flat(heads.init_params(Transformer(CONFIG), jax.random.key(7)))
    for name, value in _flat(trunk).items():
        if name in policy:
            policy[name] = value
    dense = np.zeros((CONFIG.emb_dim, CONFIG.vocab_size), np.float32)
    dense[:, 0] = np.asarray(kernel_column)
    policy["decoder/logits_dense/kernel"] = jnp.asarray(dense)
    return tree_lib.unflatten(policy)


def test_value_network_parameter_names_and_axes():
    boxed = heads.init_params(heads.ValueNetwork(CONFIG), jax.random.key(0))
    policy = heads.init_params(Transformer(CONFIG), jax.random.key(0))
    names, policy_names = set(_flat(boxed)), set(_flat(policy))
    assert names == (policy_names - {"decoder/logits_dense/kernel"}) | {"value_head/kernel", "value_head/bias"}
    shapes = {k: v.shape for k, v in _flat(boxed).items()}
    assert shapes["value_head/kernel"] == (CONFIG.emb_dim, 1) and shapes["value_head/bias"] == (1,)
    specs = tree_lib.flatten(nn.get_partition_spec(boxed))
    policy_specs = tree_lib.flatten(nn.get_partition_spec(policy))
    assert tuple(specs["value_head/kernel"]) == ("embed", None)
    assert tuple(specs["value_head/bias"]) == (None,)
    for name in names & policy_names:
        assert specs[name] == policy_specs[name], name
    no_bias = heads.init_params(heads.ValueNetwork(CONFIG, head_bias=False), jax.random.key(0))
    assert "value_head/bias" not in _flat(no_bias)


def test_value_equals_linear_unit_on_decoder_states(value_params):
    values = np.asarray(heads.ValueNetwork(CONFIG).apply({"params": value_params}, ENC, DEC))
    assert values.shape == DEC.shape and values.dtype == np.float32
    kernel = np.asarray(value_params["value_head"]["kernel"])[:, 0]
    bias = float(np.asarray(value_params["value_head"]["bias"])[0])
    policy = _policy_params_with_column(value_params, kernel)
    logits = np.asarray(Transformer(CONFIG).apply({"params": policy}, ENC, DEC), np.float64)
    expected = _sigmoid(logits[..., 0] + bias)
    np.testing.assert_allclose(values, expected, atol=1e-5, rtol=1e-5)


def test_value_range_sigmoid_and_linear(value_params):
    big = jax.tree.map(lambda x: x, value_params)
    big["value_head"] = {"kernel": value_params["value_head"]["kernel"] * 200.0,
                         "bias": value_params["value_head"]["bias"]}
    sig = np.asarray(heads.ValueNetwork(CONFIG).apply({"params": big}, ENC, DEC))
    assert np.all((sig >= 0.0) & (sig <= 1.0))
    lin = np.asarray(heads.ValueNetwork(CONFIG, output="linear").apply({"params": big}, ENC, DEC))
    assert np.abs(lin).max() > 1.5  # unbounded: the same weights leave [0, 1]
    np.testing.assert_allclose(sig, _sigmoid(lin.astype(np.float64)), atol=1e-5)
    with pytest.raises(ValueError, match="output"):
        heads.ValueNetwork(CONFIG, output="tanh").apply({"params": value_params}, ENC, DEC)


def test_value_is_causal_in_the_target(value_params):
    apply = jax.jit(heads.ValueNetwork(CONFIG).apply)
    base = np.asarray(apply({"params": value_params}, ENC, DEC))
    changed = DEC.copy()
    changed[0, 2] = 20
    after = np.asarray(apply({"params": value_params}, ENC, changed))
    np.testing.assert_allclose(after[0, :2], base[0, :2], atol=1e-6)  # V(s_t) for t < 2 cannot see it
    assert np.abs(after[0, 2:] - base[0, 2:]).max() > 1e-4
    np.testing.assert_allclose(after[1:], base[1:], atol=1e-6)


def test_gradients_flow_through_head_and_trunk(value_params):
    net = heads.ValueNetwork(CONFIG)
    weights = (DEC > 0).astype(np.float32)
    weights[:, 0] = 1.0
    rewards = np.array([0.9, 0.1, 0.5], np.float32)

    def loss_fn(p):
        return losses.value_loss(net.apply({"params": p}, ENC, DEC), rewards, weights)

    grads = _flat(jax.grad(loss_fn)(value_params))
    for name in ("value_head/kernel", "value_head/bias", "token_embedder/embedding",
                 "encoder/layers_0/attention/query/kernel", "decoder/layers_1/mlp/wo/kernel",
                 "decoder/layers_0/encoder_decoder_attention/value/kernel"):
        g = np.asarray(grads[name])
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, name

    # d/db mean(V) = mean(V (1 - V)) for a sigmoid head: a closed form, not the code's own output.
    def mean_value(p):
        return jnp.mean(net.apply({"params": p}, ENC, DEC))

    v = np.asarray(net.apply({"params": value_params}, ENC, DEC), np.float64)
    g_bias = float(jax.grad(mean_value)(value_params)["value_head"]["bias"][0])
    assert g_bias == pytest.approx(float(np.mean(v * (1 - v))), rel=1e-4)


def test_regression_mean_pooling_matches_masked_mean_of_encoder():
    model = heads.RegressionModel(CONFIG, pooling="mean")
    params = nn.unbox(heads.init_params(model, jax.random.key(3)))
    assert not any(k.startswith("decoder/") for k in _flat(params))
    scores = np.asarray(model.apply({"params": params}, ENC))
    trunk = Transformer(CONFIG)
    policy = _policy_params_with_column(params, np.zeros(CONFIG.emb_dim))
    encoded = np.asarray(trunk.apply({"params": policy}, ENC, method=trunk.encode), np.float64)
    mask = (ENC > 0).astype(np.float64)[..., None]
    pooled = (encoded * mask).sum(1) / mask.sum(1)
    kernel = np.asarray(params["regression_head"]["kernel"], np.float64)[:, 0]
    expected = _sigmoid(pooled @ kernel + float(params["regression_head"]["bias"][0]))
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    padded = np.concatenate([ENC, np.zeros((3, 5), np.int32)], axis=1)
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, padded)), scores, atol=1e-5)


def test_regression_first_decoder_step_matches_transformer_logit():
    model = heads.RegressionModel(CONFIG, pooling="first_decoder_step", output="linear", head_bias=False)
    params = nn.unbox(heads.init_params(model, jax.random.key(4)))
    assert set(_flat(params)["regression_head/kernel"].shape) == {CONFIG.emb_dim, 1}
    assert "regression_head/bias" not in _flat(params)
    scores = np.asarray(model.apply({"params": params}, ENC))
    policy = _policy_params_with_column(params, np.asarray(params["regression_head"]["kernel"])[:, 0])
    logits = np.asarray(Transformer(CONFIG).apply({"params": policy}, ENC, np.zeros((3, 1), np.int32)))
    np.testing.assert_allclose(scores, logits[:, 0, 0], atol=1e-5)


def test_transplant_trunk_from_policy(value_params):
    policy = nn.unbox(heads.init_params(Transformer(CONFIG), jax.random.key(9)))
    out = heads.transplant_trunk(policy, value_params)
    flat_out, flat_policy, flat_value = _flat(out), _flat(policy), _flat(value_params)
    assert set(flat_out) == set(flat_value)
    for name, value in flat_out.items():
        ref = flat_value[name] if name.startswith("value_head/") else flat_policy[name]
        np.testing.assert_array_equal(np.asarray(value), np.asarray(ref))
    wide = nn.unbox(heads.init_params(Transformer(CONFIG.replace(emb_dim=16, num_heads=2)), jax.random.key(0)))
    with pytest.raises(ValueError, match="has shape .16,. in the source"):
        heads.transplant_trunk(wide, value_params)


def test_scorer_on_mesh_matches_unsharded_apply():
    model = heads.RegressionModel(CONFIG, pooling="first_decoder_step")
    params = nn.unbox(heads.init_params(model, jax.random.key(5)))
    rng = np.random.RandomState(0)
    rows = [rng.randint(3, CONFIG.vocab_size, size=n).tolist() for n in (3, 17, 1, 9, 30, 5, 2, 12, 7, 4, 21)]
    mesh = partitioning.create_mesh((4, 2))
    scorer = heads.RegressionScorer(model, params, mesh, batch_size=4, min_length=8)
    kernel_sharding = scorer.param_shardings["encoder"]["layers_0"]["mlp"]["wi_0"]["kernel"]
    assert "model" in tuple(kernel_sharding.spec)  # parameters really are split along 'model'
    got = scorer(rows)
    padded = np.zeros((len(rows), 32), np.int32)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    ref = np.asarray(model.apply({"params": params}, padded))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert scorer([]).shape == (0,)
    broken = dict(params)
    del broken["regression_head"]
    with pytest.raises(ValueError, match="missing regression_head/kernel"):
        heads.RegressionScorer(model, broken, mesh)


def test_value_pretraining_with_the_shared_train_step_fits_returns():
    net = heads.ValueNetwork(CONFIG)
    mesh = partitioning.create_mesh((4, 2))
    opt = optim.create_optimizer("adamw", schedule=optim.learning_rate_schedule("constant", 3e-3, warmup_steps=0))
    state, shardings = trainer.init_train_state(net, opt, jax.random.key(0), mesh)
    step = trainer.make_train_step(opt, losses.make_value_loss_fn(net), mesh=mesh, state_shardings=shardings)
    enc = np.concatenate([ENC, ENC[:1]])
    dec = np.concatenate([DEC, DEC[:1]])
    weights = (dec > 0).astype(np.float32)
    weights[:, 0] = 1.0
    batch = {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": dec,
             "decoder_loss_weights": weights, "reward": np.array([0.9, 0.1, 0.5, 0.9], np.float32)}
    batch = partitioning.shard_batch(batch, mesh)
    mses = []
    for _ in range(25):
        state, metrics = step(state, batch)
        mses.append(float(metrics["value_mse"]))
    # Undiscounted return = the sequence reward at every token (float64 reference of the final fit).
    values = np.asarray(net.apply({"params": jax.device_get(state.params)}, enc, dec), np.float64)
    target = np.array([0.9, 0.1, 0.5, 0.9])[:, None] * np.ones_like(values)
    mse = float(np.sum(weights * (values - target) ** 2) / weights.sum())
    assert mses[0] > 0.05 and mse < 0.25 * mses[0], (mses[0], mse)
