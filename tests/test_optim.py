"""Schedules against hand formulas; Adafactor/AdamW updates against float64 NumPy re-implementations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import optim


@pytest.mark.parametrize("warmup", [0, 100])
def test_rsqrt_matches_t5x_formula(warmup):
    sched = optim.learning_rate_schedule("rsqrt", base_learning_rate=1.0, warmup_steps=warmup)
    for step in [0, 1, 50, 99, 100, 101, 1000, 12345]:
        expected = 1.0 / math.sqrt(max(step, warmup, 1))
        np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-6)


def test_rsqrt_linear_warmup():
    sched = optim.learning_rate_schedule("rsqrt", base_learning_rate=2.0, warmup_steps=100,
                                         rsqrt_linear_warmup=True)
    for step in [0, 10, 100, 400]:
        expected = 2.0 * min(1.0, step / 100) / math.sqrt(max(step, 100))
        np.testing.assert_allclose(float(sched(step)), expected, rtol=1e-6)


def test_linear_cosine_constant_with_warmup():
    base, warm, total, final = 1e-3, 10, 110, 0.1
    lin = optim.learning_rate_schedule("linear", base, warm, total, final)
    cos = optim.learning_rate_schedule("cosine", base, warm, total, final)
    const = optim.learning_rate_schedule("constant", base, warm)
    for step in [0, 1, 5, 10, 11, 60, 109, 110, 500]:
        if step < warm:
            exp_lin = exp_cos = exp_const = base * step / warm
        else:
            p = min(1.0, (step - warm) / (total - warm))
            exp_lin = base * (final + (1 - final) * (1 - p))
            exp_cos = base * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))
            exp_const = base
        np.testing.assert_allclose(float(lin(step)), exp_lin, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(float(cos(step)), exp_cos, rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(float(const(step)), exp_const, rtol=1e-5, atol=1e-12)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="expected one of"):
        optim.learning_rate_schedule("exponential")
    with pytest.raises(ValueError, match="total_steps"):
        optim.learning_rate_schedule("cosine", warmup_steps=10, total_steps=None)
    with pytest.raises(ValueError, match="adamw"):
        optim.create_optimizer("sgd")


def _np_adafactor(params, grads_seq, lr_fn, eps1=1e-30, eps2=1e-3, clip=1.0, decay_exp=0.8):
    """T5X Adafactor (no momentum, factored for dims >= 128, parameter-scaled) in float64."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    state = {}
    for i, grads in enumerate(grads_seq):
        decay = 1.0 - (i + 1.0) ** (-decay_exp)
        for k, p in params.items():
            g = grads[k].astype(np.float64)
            g2 = g * g + eps1
            if p.ndim == 2 and min(p.shape) >= 128:
                vr, vc = state.get(k, (np.zeros(p.shape[0]), np.zeros(p.shape[1])))
                vr = decay * vr + (1 - decay) * g2.mean(axis=1)
                vc = decay * vc + (1 - decay) * g2.mean(axis=0)
                state[k] = (vr, vc)
                y = g * (vr / vr.mean())[:, None] ** -0.5 * vc[None, :] ** -0.5
            else:
                v = decay * state.get(k, np.zeros(p.shape)) + (1 - decay) * g2
                state[k] = v
                y = g * v ** -0.5
            y = y / max(1.0, math.sqrt(np.mean(y * y)) / clip)
            scale = max(eps2, math.sqrt(np.mean(p * p)))
            params[k] = p - lr_fn(i) * scale * y
    return params


def test_adafactor_matches_t5x_numpy_reference():
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(128, 160)).astype(np.float32),
              "small": rng.normal(size=(16, 8)).astype(np.float32),
              "scale": np.ones(24, np.float32)}
    grads_seq = [{k: rng.normal(size=v.shape).astype(np.float32) * 0.1 for k, v in params.items()}
                 for _ in range(3)]
    sched = optim.learning_rate_schedule("rsqrt", 1.0, warmup_steps=4)
    opt = optim.create_optimizer("adafactor", schedule=sched, lr_scale=0.5)
    p = jax.tree.map(jnp.asarray, params)
    state = opt.init(p)
    for i, grads in enumerate(grads_seq):
        np.testing.assert_allclose(float(opt.learning_rate_at(state)), 0.5 / math.sqrt(4), rtol=1e-6)
        updates, state = opt.update(jax.tree.map(jnp.asarray, grads), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    expected = _np_adafactor(params, grads_seq, lambda i: 0.5 / math.sqrt(max(i, 4)))
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # The factored moment really is factored (memory), as in T5X.
    leaves = jax.tree.leaves(state)
    assert not any(getattr(x, "shape", None) == (128, 160) for x in leaves)


def test_adamw_with_global_norm_clipping_matches_numpy():
    rng = np.random.default_rng(1)
    params = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,))}
    grads_seq = [{k: rng.normal(size=v.shape) * 3.0 for k, v in params.items()} for _ in range(3)]
    lr, b1, b2, eps, wd, max_norm = 1e-2, 0.9, 0.999, 1e-8, 0.1, 1.0
    opt = optim.create_optimizer(lambda learning_rate: optim.adamw(learning_rate, b1, b2, eps, wd),
                                 schedule=optim.learning_rate_schedule("constant", lr, 0),
                                 max_grad_norm=max_norm)
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = opt.init(p)
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v2 = {k: np.zeros_like(v) for k, v in params.items()}
    for t, grads in enumerate(grads_seq, start=1):
        updates, state = opt.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        norm = math.sqrt(sum(np.sum(g * g) for g in grads.values()))
        assert norm > max_norm
        for k in ref:
            g = grads[k] * max_norm / norm
            m[k] = b1 * m[k] + (1 - b1) * g
            v2[k] = b2 * v2[k] + (1 - b2) * g * g
            step = (m[k] / (1 - b1 ** t)) / (np.sqrt(v2[k] / (1 - b2 ** t)) + eps)
            decay = wd * ref[k] if ref[k].ndim >= 2 else 0.0  # norm scales / vectors are not decayed
            ref[k] = ref[k] - lr * (step + decay)
    for k in ref:
        np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
