"""Losses against independent float64 NumPy references: values, and gradients by central differences.

The references below are written from the formulas (loops over tokens), not from rest_jax.losses. Stop-
gradient quantities are evaluated on frozen copies of the inputs, so differentiating the reference by finite
differences gives exactly the gradient the JAX loss should have.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import losses

B, T, V = 2, 4, 5
WEIGHTS = np.array([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------- NumPy references


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_logsumexp(x):
    m = x.max()
    return m + math.log(np.exp(x - m).sum())


def np_softplus(x):
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def np_cross_entropy(logits, targets, weights, ls=0.0, zl=0.0):
    vocab = logits.shape[-1]
    total = total_z = 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            log_z = np_logsumexp(logits[b, t])
            log_p = logits[b, t] - log_z
            q = np.full(vocab, ls / (vocab - 1))
            q[targets[b, t]] = 1 - ls
            entropy = -sum(qi * math.log(qi) for qi in q if qi > 0)
            z = zl * log_z ** 2
            total += weights[b, t] * (-(q * log_p).sum() + z - entropy)
            total_z += weights[b, t] * z
    return total, total_z, weights.sum()


def np_returns(rewards, weights, discount):
    g = np.zeros_like(weights)
    for b in range(weights.shape[0]):
        valid = [t for t in range(weights.shape[1]) if weights[b, t] > 0]
        for t in valid:
            g[b, t] = discount ** sum(1 for u in valid if u > t) * rewards[b]
    return g


def np_token_log_prob(logits, targets, b, t):
    return np_log_softmax(logits[b, t])[targets[b, t]]


def np_kl(p_logits, q_logits):
    lp, lq = np_log_softmax(p_logits), np_log_softmax(q_logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_rwbc(logits, targets, weights, rewards, weighting, beta):
    present = weights.sum(1) > 0
    if weighting == "raw":
        c = rewards.copy()
    elif weighting == "normalized":
        c = rewards / rewards[present].mean()
    else:
        e = np.exp(rewards / beta)
        c = e / e[present].mean()
    num = sum(c[b] * weights[b, t] * -np_token_log_prob(logits, targets, b, t)
              for b in range(B) for t in range(T))
    return num / weights.sum()


def np_gold(logits, frozen_logits, targets, weights, mle_logits, reward_type, horizon, discount, u, floor,
            baseline):
    mle = np.array([[np_token_log_prob(mle_logits, targets, b, t) for t in range(T)] for b in range(B)])
    num = 0.0
    for b in range(B):
        for t in range(T):
            if weights[b, t] == 0:
                continue
            iw = min(max(math.exp(np_token_log_prob(frozen_logits, targets, b, t)), u), 1.0)
            q = 0.0
            for j in range(horizon + 1):
                if t + j < T and weights[b, t + j] > 0:
                    r = math.exp(mle[b, t + j]) if reward_type == "prob" else mle[b, t + j] - baseline
                    q += discount ** j * max(r, floor)
            num += weights[b, t] * iw * q * np_token_log_prob(logits, targets, b, t)
    return -num / weights.sum()


def np_value_loss(values, rewards, weights, discount):
    g = np_returns(rewards, weights, discount)
    return (weights * (values - g) ** 2).sum() / weights.sum()


def np_oac(logits, values, frozen_values, targets, weights, rewards, discount, coef):
    adv = np_returns(rewards, weights, discount) - frozen_values
    pg = sum(weights[b, t] * adv[b, t] * np_token_log_prob(logits, targets, b, t)
             for b in range(B) for t in range(T))
    return -pg / weights.sum() + coef * np_value_loss(values, rewards, weights, discount)


def np_bvmpo(logits, values, eta_p, alpha_p, frozen, targets, weights, rewards, old_logits, bc_logits, step,
             eps_eta, eps_alpha, fraction, discount, coef, decay_steps):
    """frozen: dict with the stop-gradient inputs (logits, values, eta_p, alpha_p) at the expansion point."""
    adv = np_returns(rewards, weights, discount) - frozen["values"]
    valid = [(b, t) for b in range(B) for t in range(T) if weights[b, t] > 0]
    ranked = sorted(valid, key=lambda bt: (-adv[bt], bt[0] * T + bt[1]))
    kept = ranked[:math.ceil(fraction * len(valid))]
    eta = np_softplus(eta_p) + 1e-8
    eta_sg = np_softplus(frozen["eta_p"]) + 1e-8
    alpha = np_softplus(alpha_p) + 1e-8
    alpha_sg = np_softplus(frozen["alpha_p"]) + 1e-8
    a_kept = np.array([adv[bt] for bt in kept])
    psi = np.exp(a_kept / eta_sg - np_logsumexp(a_kept / eta_sg))
    policy = -sum(p * np_token_log_prob(logits, targets, *bt) for p, bt in zip(psi, kept))
    temperature = eta * eps_eta + eta * (np_logsumexp(a_kept / eta) - math.log(len(kept)))

    def token_mean(x):
        return (weights * x).sum() / weights.sum()

    kl_old = token_mean(np_kl(old_logits, logits))
    kl_old_sg = token_mean(np_kl(old_logits, frozen["logits"]))
    trust = alpha * (eps_alpha - kl_old_sg) + alpha_sg * kl_old
    lam = 1.0 * (1e-5 / 1.0) ** min(step / decay_steps, 1.0)
    kl_bc = token_mean(np_kl(bc_logits, logits))
    return policy + temperature + trust + lam * kl_bc + coef * np_value_loss(values, rewards, weights, discount)


def central_difference(f, x, eps=1e-6):
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += eps
        xm[idx] -= eps
        grad[idx] = (f(xp) - f(xm)) / (2 * eps)
    return grad


def assert_value_and_gradient(f, ref, x):
    """The JAX loss `f` and its gradient (jitted) against the NumPy reference and its central differences."""
    value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(x))
    assert float(value) == pytest.approx(ref(x), rel=1e-10)
    np.testing.assert_allclose(np.asarray(grad), central_difference(ref, x), rtol=1e-6, atol=1e-8)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def data():
    rng = np.random.default_rng(1234)
    return {
        "logits": rng.normal(size=(B, T, V)) * 2,
        "targets": rng.integers(0, V, size=(B, T)),
        "rewards": rng.uniform(0.1, 1.0, size=B),
        "values": rng.uniform(0.0, 1.0, size=(B, T)),
        "old_logits": rng.normal(size=(B, T, V)),
        "bc_logits": rng.normal(size=(B, T, V)),
    }


def batch_of(d, **extra):
    batch = {losses.TARGETS: jnp.asarray(d["targets"]), losses.WEIGHTS: jnp.asarray(WEIGHTS),
             losses.REWARD: jnp.asarray(d["rewards"])}
    batch.update({k: jnp.asarray(v) for k, v in extra.items()})
    return batch


# ---------------------------------------------------------------------------------------- cross entropy


def test_cross_entropy_hand_computed():
    logits = jnp.asarray([[[0.0, math.log(3.0)], [5.0, -1.0]]])  # Token 0: p = (0.25, 0.75).
    targets = jnp.asarray([[1, 0]])
    weights = jnp.asarray([[1.0, 0.0]])  # Token 1 is padding.
    total, total_z, num = losses.cross_entropy_loss(logits, targets, weights)
    assert float(total) == pytest.approx(-math.log(0.75), rel=1e-6)
    assert float(total_z) == 0.0 and float(num) == 1.0

    total, total_z, _ = losses.cross_entropy_loss(logits, targets, weights, z_loss=1e-2)
    z = 1e-2 * math.log(4.0) ** 2
    assert float(total_z) == pytest.approx(z, rel=1e-6)
    assert float(total) == pytest.approx(-math.log(0.75) + z, rel=1e-6)

    total, _, _ = losses.cross_entropy_loss(logits, targets, weights, label_smoothing=0.1)
    # Smoothed target q = (0.1, 0.9); subtract its entropy (T5X's normalising constant).
    want = -(0.1 * math.log(0.25) + 0.9 * math.log(0.75)) + (0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert float(total) == pytest.approx(want, rel=1e-6)


def test_cross_entropy_of_perfect_smoothed_prediction_is_zero():
    ls, vocab = 0.2, 4
    q = np.full(vocab, ls / (vocab - 1))
    q[2] = 1 - ls
    logits = jnp.asarray(np.log(q)[None, None].repeat(3, 1))
    total, _, num = losses.cross_entropy_loss(logits, jnp.full((1, 3), 2), jnp.ones((1, 3)), label_smoothing=ls)
    assert abs(float(total)) < 1e-5 and float(num) == 3


@pytest.mark.parametrize("ls,zl", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.15, 1e-2)])
def test_cross_entropy_value_and_gradient_vs_numpy(data, ls, zl):
    with jax.enable_x64(True):
        f = jax.jit(lambda x: losses.cross_entropy_loss(x, jnp.asarray(data["targets"]), jnp.asarray(WEIGHTS),
                                                        ls, zl))
        got = f(jnp.asarray(data["logits"]))
        want = np_cross_entropy(data["logits"], data["targets"], WEIGHTS, ls, zl)
        np.testing.assert_allclose([float(g) for g in got], want, rtol=1e-10)
        grad = jax.jit(jax.grad(lambda x: f(x)[0]))(jnp.asarray(data["logits"]))
        fd = central_difference(lambda x: np_cross_entropy(x, data["targets"], WEIGHTS, ls, zl)[0],
                                data["logits"])
        np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-6, atol=1e-8)


def test_cross_entropy_z_loss_output_gradient_vs_numpy(data):
    # The cross entropy has a hand-written backward pass; its z-loss output has a cotangent path of its own.
    with jax.enable_x64(True):
        f = lambda x: losses.cross_entropy_loss(x, jnp.asarray(data["targets"]), jnp.asarray(WEIGHTS), 0.1, 1e-2)  # noqa: E731
        grad = jax.jit(jax.grad(lambda x: f(x)[0] + 3.0 * f(x)[1]))(jnp.asarray(data["logits"]))
        fd = central_difference(
            lambda x: (lambda r: r[0] + 3.0 * r[1])(np_cross_entropy(x, data["targets"], WEIGHTS, 0.1, 1e-2)),
            data["logits"])
        np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-6, atol=1e-8)


def test_bc_loss_is_per_token_cross_entropy_and_drops_zero_weight_examples(data):
    with jax.enable_x64(True):
        example_weights = np.array([1.0, 0.0])
        loss, metrics = losses.get_loss("bc")(batch_of(data, example_weights=example_weights),
                                              {"logits": jnp.asarray(data["logits"])})
        w = WEIGHTS * example_weights[:, None]
        total, _, num = np_cross_entropy(data["logits"], data["targets"], w)
        assert float(loss) == pytest.approx(total / num, rel=1e-10)
        assert float(metrics["num_tokens"]) == 4.0


# ------------------------------------------------------------------------------------------------- returns


def test_monte_carlo_returns_hand_computed():
    weights = jnp.asarray([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    rewards = jnp.asarray([1.0, 0.5])
    np.testing.assert_allclose(losses.monte_carlo_returns(rewards, weights),
                               [[1.0, 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(losses.monte_carlo_returns(rewards, weights, 0.9),
                               [[0.81, 0.9, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]], rtol=1e-6)


def test_value_loss_value_and_gradient_vs_numpy(data):
    with jax.enable_x64(True):
        for discount in (1.0, 0.8):
            f = jax.jit(jax.value_and_grad(
                lambda v: losses.value_loss(v, jnp.asarray(data["rewards"]), jnp.asarray(WEIGHTS), discount)))  # noqa
            value, grad = f(jnp.asarray(data["values"]))
            assert float(value) == pytest.approx(np_value_loss(data["values"], data["rewards"], WEIGHTS, discount),
                                                 rel=1e-10)
            fd = central_difference(lambda v: np_value_loss(v, data["rewards"], WEIGHTS, discount), data["values"])
            np.testing.assert_allclose(np.asarray(grad), fd, atol=1e-8)


# ------------------------------------------------------------------------------------------- Improve losses


@pytest.mark.parametrize("weighting,beta", [("raw", 1.0), ("normalized", 1.0), ("exp", 0.3)])
def test_rwbc_value_and_gradient_vs_numpy(data, weighting, beta):
    with jax.enable_x64(True):
        batch = batch_of(data)
        f = lambda x: losses.rwbc_loss(batch, {"logits": x}, weighting=weighting, beta=beta)[0]  # noqa: E731
        ref = lambda x: np_rwbc(x, data["targets"], WEIGHTS, data["rewards"], weighting, beta)  # noqa: E731
        assert_value_and_gradient(f, ref, data["logits"])


@pytest.mark.parametrize("reward_type,horizon,discount,use_old", [
    ("prob", 5, 1.0, False), ("log_prob", 2, 0.9, False), ("prob", 1, 1.0, True)])
def test_gold_value_and_gradient_vs_numpy(data, reward_type, horizon, discount, use_old):
    u, floor, baseline = 0.2, 0.1, -3.0
    with jax.enable_x64(True):
        batch = batch_of(data)

        def f(x):
            # p_MLE is the frozen BC policy's (bc_logits), never the policy being trained.
            outputs = {"logits": x, "old_logits": jnp.asarray(data["old_logits"]),
                       "bc_logits": jnp.asarray(data["bc_logits"])}
            return losses.gold_loss(batch, outputs, reward_type=reward_type, horizon=horizon, discount=discount,
                                    importance_floor=u, reward_floor=floor, log_prob_baseline=baseline,
                                    importance_logits_key="old_logits" if use_old else None)[0]

        frozen = data["old_logits"] if use_old else data["logits"]

        def ref(x):
            return np_gold(x, frozen, data["targets"], WEIGHTS, data["bc_logits"], reward_type, horizon, discount,
                           u, floor, baseline)

        assert_value_and_gradient(f, ref, data["logits"])


def test_gold_importance_weight_is_clipped_and_stop_gradient():
    # One token, V = 2: with π(a) = 0.75 > u the loss is −0.75·Q·log 0.75 and its logit gradient is
    # −0.75·Q·(onehot − p), i.e. the weight is treated as a constant.
    logits = jnp.asarray([[[0.0, math.log(3.0)]]])
    batch = {losses.TARGETS: jnp.asarray([[1]]), losses.WEIGHTS: jnp.ones((1, 1))}
    bc = jnp.zeros((1, 1, 2))  # p_MLE(a) = 0.5
    f = jax.jit(jax.value_and_grad(lambda x: losses.gold_loss(batch, {"logits": x, "bc_logits": bc},
                                                              importance_floor=0.2, reward_floor=0.1)[0]))
    loss, grad = f(logits)
    assert float(loss) == pytest.approx(-0.75 * 0.5 * math.log(0.75), rel=1e-5)
    np.testing.assert_allclose(grad[0, 0], -0.75 * 0.5 * (np.array([0, 1]) - [0.25, 0.75]), rtol=1e-5)
    # π(a) = 0.1 < u = 0.2: the weight is u.
    loss, _ = f(jnp.asarray([[[math.log(9.0), 0.0]]]))
    assert float(loss) == pytest.approx(-0.2 * 0.5 * math.log(0.1), rel=1e-5)


def test_oac_value_and_gradients_vs_numpy(data):
    coef, discount = 0.5, 0.95
    with jax.enable_x64(True):
        batch = batch_of(data)

        def f(x, v):
            return losses.oac_loss(batch, {"logits": x, "values": v}, discount=discount, value_loss_coef=coef)[0]

        def ref(x, v, frozen_v):
            return np_oac(x, v, frozen_v, data["targets"], WEIGHTS, data["rewards"], discount, coef)

        x, v = data["logits"], data["values"]
        value, (gx, gv) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(v))
        assert float(value) == pytest.approx(ref(x, v, v), rel=1e-10)
        np.testing.assert_allclose(np.asarray(gx), central_difference(lambda y: ref(y, v, v), x), atol=1e-8)
        np.testing.assert_allclose(np.asarray(gv), central_difference(lambda y: ref(x, y, v), v), atol=1e-8)


@pytest.mark.parametrize("step,fraction", [(0, 0.5), (2500, 0.5), (50_000, 0.3)])
def test_bvmpo_value_and_gradients_vs_numpy(data, step, fraction):
    kw = dict(eps_eta=0.05, eps_alpha=0.02, top_fraction=fraction, discount=0.9, value_loss_coef=0.7)
    decay = 10_000
    with jax.enable_x64(True):
        batch = batch_of(data)
        x0, v0, e0, a0 = data["logits"], data["values"], 0.3, -0.4
        frozen = {"logits": x0, "values": v0, "eta_p": e0, "alpha_p": a0}

        def f(x, v, e, a):
            outputs = {"logits": x, "values": v, "vmpo_eta": e, "vmpo_alpha": a,
                       "old_logits": jnp.asarray(data["old_logits"]), "bc_logits": jnp.asarray(data["bc_logits"])}
            return losses.bvmpo_loss(batch, outputs, jnp.asarray(step), **kw)[0]

        def ref(x=x0, v=v0, e=e0, a=a0):
            return np_bvmpo(x, v, e, a, frozen, data["targets"], WEIGHTS, data["rewards"], data["old_logits"],
                            data["bc_logits"], step, kw["eps_eta"], kw["eps_alpha"], fraction, kw["discount"],
                            kw["value_loss_coef"], decay)

        args = (jnp.asarray(x0), jnp.asarray(v0), jnp.asarray(e0), jnp.asarray(a0))
        value, (gx, gv, ge, ga) = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3)))(*args)
        assert float(value) == pytest.approx(ref(), rel=1e-9)
        np.testing.assert_allclose(np.asarray(gx), central_difference(lambda y: ref(x=y), x0), atol=1e-8)
        np.testing.assert_allclose(np.asarray(gv), central_difference(lambda y: ref(v=y), v0), atol=1e-8)
        assert float(ge) == pytest.approx(central_difference(lambda y: ref(e=float(y)), e0), rel=1e-6)
        assert float(ga) == pytest.approx(central_difference(lambda y: ref(a=float(y)), a0), rel=1e-6)


def test_bvmpo_keeps_top_half_and_anneals_bc_kl(data):
    outputs = {"logits": jnp.asarray(data["logits"], jnp.float32), "values": jnp.asarray(data["values"]),
               "old_logits": jnp.asarray(data["old_logits"]), "bc_logits": jnp.asarray(data["bc_logits"]),
               **losses.init_vmpo_params(eta=2.0, alpha=0.5)}
    _, metrics = jax.jit(lambda b, o: losses.bvmpo_loss(b, o, 0))(batch_of(data), outputs)
    assert float(metrics["kept_fraction"]) == 0.5  # 3 of 6 valid tokens.
    assert float(metrics["eta"]) == pytest.approx(2.0, rel=1e-5)
    assert float(metrics["alpha"]) == pytest.approx(0.5, rel=1e-5)
    assert float(metrics["bc_kl_weight"]) == pytest.approx(1.0)
    assert float(losses.bc_kl_weight(5_000)) == pytest.approx(10 ** -2.5, rel=1e-5)
    assert float(losses.bc_kl_weight(10_000)) == pytest.approx(1e-5, rel=1e-5)
    assert float(losses.bc_kl_weight(10 ** 6)) == pytest.approx(1e-5, rel=1e-5)


def test_bvmpo_anneals_bc_kl_over_the_improve_step(data):
    # An Improve step of 400 updates puts its length in the batch: λ is 10^-2.5 halfway through it and 1e-5
    # at its end, not still ~0.56 (the old fixed 10,000-step schedule).
    outputs = {"logits": jnp.asarray(data["logits"], jnp.float32), "values": jnp.asarray(data["values"]),
               "old_logits": jnp.asarray(data["old_logits"]), "bc_logits": jnp.asarray(data["bc_logits"]),
               **losses.init_vmpo_params()}
    batch = batch_of(data, **{losses.NUM_STEPS: jnp.asarray(400)})
    for step, lam in ((0, 1.0), (200, 10 ** -2.5), (400, 1e-5)):
        _, metrics = jax.jit(lambda b, o, s: losses.bvmpo_loss(b, o, s))(batch, outputs, jnp.asarray(step))
        assert float(metrics["bc_kl_weight"]) == pytest.approx(lam, rel=1e-5)
    # An explicit bc_kl_weight.decay_steps wins over the run's length.
    assert float(losses.bc_kl_weight(50, 400, decay_steps=100)) == pytest.approx(10 ** -2.5, rel=1e-5)


def test_bvmpo_all_padding_batch_is_finite(data):
    batch = batch_of(data)
    batch[losses.WEIGHTS] = jnp.zeros((B, T))
    outputs = {"logits": jnp.asarray(data["logits"]), "values": jnp.asarray(data["values"]),
               "old_logits": jnp.asarray(data["old_logits"]), "bc_logits": jnp.asarray(data["bc_logits"]),
               **losses.init_vmpo_params()}
    grads = jax.jit(jax.grad(lambda o: losses.bvmpo_loss(batch, o)[0]))(outputs)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_errors_and_jit(data):
    assert set(losses.loss_names()) >= {"bc", "rwbc", "gold", "bvmpo", "oac", "value", "dpo", "ipo"}
    with pytest.raises(KeyError, match=r"'gld'.*Did you mean \['gold'\]"):
        losses.get_loss("gld")
    batch = batch_of(data)
    with pytest.raises(KeyError, match=r"'gold' needs outputs\['bc_logits'\].*frozen MLE \(BC\) policy"):
        losses.gold_loss(batch, {"logits": jnp.asarray(data["logits"])})
    outputs = {"logits": jnp.asarray(data["logits"], jnp.float32), "values": jnp.asarray(data["values"]),
               "old_logits": jnp.asarray(data["old_logits"]), "bc_logits": jnp.asarray(data["bc_logits"]),
               **losses.init_vmpo_params()}
    for name in ("bc", "rwbc", "gold", "bvmpo", "oac", "value"):
        fn = losses.get_loss(name)
        loss, metrics = jax.jit(lambda b, o, s: fn(b, o, s))(batch, outputs, jnp.asarray(3))  # noqa: B023
        assert np.isfinite(float(loss)), name
        assert float(metrics["loss"]) == pytest.approx(float(loss)), name


def test_loss_knobs_are_gin_configurable():
    import gin

    with gin.unlock_config():
        gin.parse_config("bc_kl_weight.decay_steps = 100")
    try:
        assert float(losses.bc_kl_weight(100)) == pytest.approx(1e-5, rel=1e-5)
    finally:
        gin.clear_config()


# ------------------------------------------------------------------------------------------ DPO and IPO


PAIR_WEIGHTS = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.fixture
def pairs():
    rng = np.random.default_rng(77)
    return {"logits": rng.normal(size=(4, T, V)) * 2, "targets": rng.integers(0, V, size=(4, T)),
            "behaviour": -rng.uniform(0.1, 3.0, size=(4, T))}


def np_pair_margins(logits, targets, weights, behaviour):
    """h_k = Σ_t [log π − log π_ref](chosen 2k) − Σ_t [log π − log π_ref](rejected 2k+1), token by token."""
    ratios = []
    for b in range(logits.shape[0]):
        ratios.append(sum(np_log_softmax(logits[b, t])[targets[b, t]] - behaviour[b, t]
                          for t in range(logits.shape[1]) if weights[b, t] > 0))
    return [ratios[2 * k] - ratios[2 * k + 1] for k in range(len(ratios) // 2)]


def np_log_sigmoid(x):
    return -np_softplus(-x)


def np_dpo(logits, targets, weights, behaviour, beta, eps):
    h = np_pair_margins(logits, targets, weights, behaviour)
    return float(np.mean([-((1 - eps) * np_log_sigmoid(beta * x) + eps * np_log_sigmoid(-beta * x)) for x in h]))


def np_ipo(logits, targets, weights, behaviour, tau):
    h = np_pair_margins(logits, targets, weights, behaviour)
    return float(np.mean([(x - 1 / (2 * tau)) ** 2 for x in h]))


def _pair_batch(p):
    return {losses.TARGETS: jnp.asarray(p["targets"]), losses.WEIGHTS: jnp.asarray(PAIR_WEIGHTS),
            losses.BEHAVIOUR_LOG_PROBS: jnp.asarray(p["behaviour"])}


@pytest.mark.parametrize("name,knobs", [("dpo", {"beta": 0.1}), ("dpo", {"beta": 0.5}),
                                        ("dpo", {"beta": 0.3, "label_smoothing": 0.2}), ("ipo", {"tau": 0.1}),
                                        ("ipo", {"tau": 1.0})])
def test_preference_losses_value_and_gradient_vs_numpy(pairs, name, knobs):
    def ref(x):
        if name == "ipo":
            return np_ipo(x, pairs["targets"], PAIR_WEIGHTS, pairs["behaviour"], knobs["tau"])
        return np_dpo(x, pairs["targets"], PAIR_WEIGHTS, pairs["behaviour"], knobs["beta"],
                      knobs.get("label_smoothing", 0.0))

    with jax.enable_x64(True):
        batch = _pair_batch(pairs)
        assert_value_and_gradient(lambda x: losses.get_loss(name)(batch, {"logits": x}, **knobs)[0], ref,
                                  pairs["logits"])


def test_dpo_hand_computed_and_metrics():
    """One pair, uniform policy over 2 tokens (log π = log 1/2 per token), chosen 1 token, rejected 2 tokens."""
    logits = jnp.zeros((2, 2, 2))
    batch = {losses.TARGETS: jnp.asarray([[1, 0], [0, 1]]), losses.WEIGHTS: jnp.asarray([[1.0, 0.0], [1.0, 1.0]]),
             losses.BEHAVIOUR_LOG_PROBS: jnp.asarray([[-2.0, 0.0], [-0.5, -0.5]])}
    h = (math.log(0.5) + 2.0) - (2 * math.log(0.5) + 1.0)  # = 1 + log 2
    loss, metrics = losses.dpo_loss(batch, {"logits": logits}, beta=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-0.5 * h)), rel=1e-6)
    assert float(metrics["log_ratio_margin"]) == pytest.approx(h, rel=1e-6)
    assert float(metrics["pair_accuracy"]) == 1.0 and float(metrics["num_pairs"]) == 1.0
    loss, _ = losses.ipo_loss(batch, {"logits": logits}, tau=0.25)
    assert float(loss) == pytest.approx((h - 2.0) ** 2, rel=1e-6)
    with pytest.raises(ValueError, match="pairs"):
        losses.dpo_loss({k: v[:1] for k, v in batch.items()}, {"logits": logits[:1]})
    with pytest.raises(KeyError, match="behaviour_log_probs"):
        losses.dpo_loss({k: v for k, v in batch.items() if k != losses.BEHAVIOUR_LOG_PROBS}, {"logits": logits})


# ---------------------------------------------------------------------------------------------- online RL


def np_gae(rewards, values, weights, discount, lam):
    """GAE by its definition Â_t = Σ_l (γλ)^l δ_{t+l} over each row's valid tokens, V after the last = 0."""
    adv = np.zeros_like(values)
    for b in range(values.shape[0]):
        valid = [t for t in range(values.shape[1]) if weights[b, t] > 0]
        deltas = {}
        for i, t in enumerate(valid):
            next_v = values[b, valid[i + 1]] if i + 1 < len(valid) else 0.0
            deltas[t] = rewards[b, t] + discount * next_v - values[b, t]
        for i, t in enumerate(valid):
            adv[b, t] = sum((discount * lam) ** j * deltas[u] for j, u in enumerate(valid[i:]))
    returns = np.where(weights > 0, adv + values, 0.0)
    return adv, returns


def np_policy_gradient(logits, targets, weights, old, adv, eps, ref=None, kl_coef=0.0, values=None,
                       returns=None, old_values=None, value_coef=0.0, value_clip=None):
    n = weights.sum()
    policy = kl = v_loss = 0.0
    for b in range(weights.shape[0]):
        for t in range(weights.shape[1]):
            if weights[b, t] == 0:
                continue
            lp = np_token_log_prob(logits, targets, b, t)
            ratio = math.exp(lp - old[b, t])
            clipped = min(max(ratio, 1 - eps), 1 + eps)
            policy -= weights[b, t] * min(ratio * adv[b, t], clipped * adv[b, t])
            if ref is not None:
                d = ref[b, t] - lp
                kl += weights[b, t] * (math.exp(d) - d - 1)
            if values is not None:
                err = (values[b, t] - returns[b, t]) ** 2
                if value_clip is not None:
                    vc = old_values[b, t] + min(max(values[b, t] - old_values[b, t], -value_clip), value_clip)
                    err = max(err, (vc - returns[b, t]) ** 2)
                v_loss += weights[b, t] * 0.5 * err
    return policy / n + kl_coef * kl / n + value_coef * v_loss / n


def test_gae_vs_definition_and_monte_carlo_at_lambda_one(data):
    rng = np.random.default_rng(7)
    token_rewards = rng.normal(size=(B, T)) * WEIGHTS
    with jax.enable_x64(True):
        for discount, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
            adv, ret = losses.generalized_advantages(jnp.asarray(token_rewards), jnp.asarray(data["values"]),
                                                     jnp.asarray(WEIGHTS), discount, lam)
            ref_adv, ref_ret = np_gae(token_rewards, data["values"], WEIGHTS, discount, lam)
            np.testing.assert_allclose(np.asarray(adv), ref_adv * WEIGHTS, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-12, atol=1e-12)
        # λ = γ = 1 with the terminal reward: the return of every token is R (the Monte-Carlo return).
        terminal = losses.terminal_rewards(jnp.asarray(data["rewards"]), jnp.asarray(WEIGHTS))
        _, ret = losses.generalized_advantages(terminal, jnp.asarray(data["values"]), jnp.asarray(WEIGHTS), 1.0, 1.0)
        np.testing.assert_allclose(np.asarray(ret), np_returns(data["rewards"], WEIGHTS, 1.0), atol=1e-12)
    assert np.asarray(terminal)[1].tolist() == [0.0, data["rewards"][1], 0.0, 0.0]


def test_group_advantages_hand_computed():
    r = np.array([0.2, 0.4, 0.9, 0.5, 0.5, 0.5])
    with jax.enable_x64(True):
        grpo = np.asarray(losses.group_advantages(jnp.asarray(r), 3, "grpo", eps=0.0))
        rloo = np.asarray(losses.group_advantages(jnp.asarray(r), 3, "rloo"))
    first = r[:3]
    np.testing.assert_allclose(grpo[:3], (first - first.mean()) / first.std(ddof=1), rtol=1e-12)
    assert np.all(np.isnan(grpo[3:])) or np.allclose(grpo[3:], 0.0)  # eps=0 and no spread: 0/0
    np.testing.assert_allclose(rloo[:3], [0.2 - 0.65, 0.4 - 0.55, 0.9 - 0.3], rtol=1e-12)
    np.testing.assert_allclose(rloo[3:], 0.0, atol=1e-15)
    with pytest.raises(ValueError, match="groups of >= 2"):
        losses.group_advantages(jnp.asarray(r), 4)
    with pytest.raises(ValueError, match="estimator"):
        losses.group_advantages(jnp.asarray(r), 3, "ppo")


@pytest.mark.parametrize("shift", [0.0, 0.5, -0.5])
@pytest.mark.parametrize("extras", ["none", "kl", "value"])
def test_policy_gradient_loss_value_and_gradients_vs_numpy(data, shift, extras):
    """Both clipping branches: `shift` moves π_old so that the ratios leave [1 − ε, 1 + ε] on either side,
    with advantages of both signs, so the clipped term is active for some tokens and not for others."""
    rng = np.random.default_rng(3)
    logits, targets = data["logits"], data["targets"]
    own = np_log_softmax(logits)[np.arange(B)[:, None], np.arange(T)[None, :], targets]
    old = own + shift + rng.normal(size=(B, T)) * 0.3
    adv = rng.normal(size=(B, T))
    eps = 0.2
    ref = own + rng.normal(size=(B, T)) * 0.5
    returns, old_values = rng.uniform(size=(B, T)), rng.uniform(size=(B, T))
    ratios = np.exp(own - old)[WEIGHTS > 0]
    if shift:
        assert np.any(np.abs(ratios - 1) > eps) and np.any(np.abs(ratios - 1) <= eps + 0.5)

    with jax.enable_x64(True):
        batch = batch_of(data, behaviour_log_probs=old, advantages=adv)
        kw = {}
        if extras == "kl":
            batch.update(reference_log_probs=jnp.asarray(ref), kl_coef=jnp.asarray(0.3))
            kw = {"ref": ref, "kl_coef": 0.3}
        if extras == "value":
            batch.update(returns=jnp.asarray(returns), old_values=jnp.asarray(old_values))
            kw = {"returns": returns, "old_values": old_values, "value_coef": 0.5, "value_clip": 0.1}
        if extras == "value":
            f = lambda x: losses.policy_gradient_loss(  # noqa: E731
                batch, {"logits": x[:B * T * V].reshape(B, T, V), "values": x[B * T * V:].reshape(B, T)},
                clip_epsilon=eps, value_coef=0.5, value_clip=0.1)[0]
            ref_f = lambda x: np_policy_gradient(  # noqa: E731
                x[:B * T * V].reshape(B, T, V), targets, WEIGHTS, old, adv, eps,
                values=x[B * T * V:].reshape(B, T), **kw)
            x = np.concatenate([logits.reshape(-1), data["values"].reshape(-1)])
        else:
            f = lambda x: losses.policy_gradient_loss(batch, {"logits": x}, clip_epsilon=eps)[0]  # noqa: E731
            ref_f = lambda x: np_policy_gradient(x, targets, WEIGHTS, old, adv, eps, **kw)  # noqa: E731
            x = logits
        assert_value_and_gradient(f, ref_f, x)


def test_policy_gradient_loss_clipped_tokens_have_no_policy_gradient(data):
    """A token whose ratio is above 1 + ε with a positive advantage (or below 1 − ε with a negative one)
    contributes nothing to the gradient: PPO's pessimistic bound."""
    logits, targets = jnp.asarray(data["logits"]), data["targets"]
    own = np.asarray(losses.token_log_probs(logits, jnp.asarray(targets)))
    old = own - 1.0  # ratio e ≈ 2.7 > 1.2 everywhere
    w = np.zeros((B, T))
    w[0, 0] = 1.0
    batch = {losses.TARGETS: jnp.asarray(targets), losses.WEIGHTS: jnp.asarray(w),
             "behaviour_log_probs": jnp.asarray(old), "advantages": jnp.ones((B, T))}
    loss_fn = lambda x: losses.policy_gradient_loss(batch, {"logits": x})[0]  # noqa: E731
    value, grad = jax.value_and_grad(loss_fn)(logits)
    assert float(value) == pytest.approx(-1.2, rel=1e-6)
    assert float(jnp.max(jnp.abs(grad))) == 0.0
    batch["advantages"] = -jnp.ones((B, T))  # negative advantage: the unclipped (larger penalty) term is used
    value, grad = jax.value_and_grad(loss_fn)(logits)
    assert float(value) == pytest.approx(math.e, rel=1e-5)
    assert float(jnp.max(jnp.abs(grad))) > 0.0


def test_whiten_and_k3_kl():
    x = np.array([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    with jax.enable_x64(True):
        white = np.asarray(losses.whiten(jnp.asarray(x), jnp.asarray(WEIGHTS), eps=0.0))
        k3 = np.asarray(losses.k3_kl(jnp.asarray([-1.0, -2.0]), jnp.asarray([-1.5, -2.0])))
    valid = x[WEIGHTS > 0]
    np.testing.assert_allclose(white[WEIGHTS > 0], (valid - valid.mean()) / valid.std(), rtol=1e-12)
    assert np.all(white[WEIGHTS == 0] == 0)
    np.testing.assert_allclose(k3, [math.exp(-0.5) + 0.5 - 1, 0.0], atol=1e-15)
