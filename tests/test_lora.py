"""Low-rank adapters for Improve (issue 17): the merge and its gradients by hand, adapter checkpoints that load
as whole policies (chained, and after the run directory moves), and a ReST run whose Improve checkpoints hold
adapters only."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import checkpoints
from rest_jax import improve
from rest_jax import inspection
from rest_jax import losses
from rest_jax import optim
from rest_jax import policy as policy_lib
from rest_jax import trainer
from rest_jax import tree as tree_lib
from rest_jax.model import decoder_only
from rest_jax.model import lora as lora_lib
from rest_jax.model import translation_lm

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm():
    config = decoder_only.DecoderOnlyConfig(vocab_size=40, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                            num_layers=2, mlp_dim=64)
    model = translation_lm.TranslationLM(config, prompt_before=(5, 6), prompt_after=(7,))
    return model, nn.unbox(policy_lib.init_params(model, jax.random.key(0)))


def _random_adapters(params, config, seed):
    """Adapters with B random too (init_adapters' B = 0 would hide half of the merge)."""
    adapters = lora_lib.init_adapters(params, config, jax.random.key(seed))
    flat = tree_lib.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    return tree_lib.unflatten({k: v if k.endswith("lora_a") else jax.random.normal(kk, v.shape) * 0.1
                               for kk, (k, v) in zip(keys, flat.items())})


def test_adapters_start_at_zero_and_merge_by_hand(lm):
    _, params = lm
    config = lora_lib.LoraConfig(rank=3, alpha=6.0)
    names = lora_lib.adapted_modules(params, config.targets)
    # Every attention projection of both layers, nothing else.
    assert names == sorted(f"decoder/layers_{i}/self_attention/{m}" for i in range(2)
                           for m in ("key", "out", "query", "value"))
    start = lora_lib.init_adapters(params, config, jax.random.key(1))
    unchanged = lora_lib.merge(params, start, config.scale)
    for k, v in tree_lib.flatten(params).items():
        np.testing.assert_array_equal(tree_lib.flatten(unchanged)[k], v)
    adapters = _random_adapters(params, config, 2)
    merged, flat, ad = (tree_lib.flatten(t) for t in (lora_lib.merge(params, adapters, config.scale), params,
                                                      adapters))
    for k, v in flat.items():
        module = k[:-len("/kernel")]
        if module in names:
            want = np.asarray(v, np.float64) + 2.0 * np.asarray(ad[f"{module}/lora_a"], np.float64) @ np.asarray(
                ad[f"{module}/lora_b"], np.float64)
            np.testing.assert_allclose(merged[k], want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(merged[k], v)
    with pytest.raises(ValueError, match="names no 2-D dense kernel"):
        lora_lib.adapted_modules(params, ("attention_typo",))


def test_adapter_gradients_are_the_kernel_gradient_projected(lm):
    # dL/dA = s * G B^T and dL/dB = s * A^T G, with G = dL/dW of the merged kernel: the chain rule by hand.
    model, params = lm
    config = lora_lib.LoraConfig(rank=2, alpha=3.0, targets=("query", "value"))
    adapters = _random_adapters(params, config, 3)
    batch = {"encoder_input_tokens": jnp.asarray([[8, 9, 1, 0], [10, 1, 0, 0]]),
             "decoder_input_tokens": jnp.asarray([[0, 11, 12, 1], [0, 13, 1, 0]]),
             "decoder_target_tokens": jnp.asarray([[11, 12, 1, 0], [13, 1, 0, 0]]),
             "decoder_loss_weights": jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)}
    loss = losses.get_loss("bc")
    loss_fn = improve.make_improve_loss_fn(model, loss, lora_scale=config.scale)
    grads = jax.grad(lambda a: loss_fn(a, {**batch, improve.FROZEN_KEY: {"base": params}}, None)[0])(adapters)
    merged = lora_lib.merge(params, adapters, config.scale)
    full = improve.make_improve_loss_fn(model, loss)
    kernel_grads = tree_lib.flatten(jax.grad(lambda p: full(p, batch, None)[0])(merged))
    ad, g = tree_lib.flatten(adapters), tree_lib.flatten(grads)
    for module in lora_lib.adapted_modules(params, config.targets):
        gw = np.asarray(kernel_grads[f"{module}/kernel"], np.float64)
        a, b = (np.asarray(ad[f"{module}/lora_{x}"], np.float64) for x in "ab")
        np.testing.assert_allclose(g[f"{module}/lora_a"], config.scale * gw @ b.T, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(g[f"{module}/lora_b"], config.scale * a.T @ gw, rtol=1e-4, atol=1e-7)


def _save(directory, params, metadata=None):
    manager = checkpoints.CheckpointManager(directory, period=1)
    manager.save(1, trainer.TrainState.create(params, optim.create_optimizer("adamw")), force=True,
                 metadata=metadata)
    manager.close()
    return os.path.join(directory, "1")


def test_adapter_checkpoints_load_as_whole_policies_chained_and_moved(lm, tmp_path):
    _, params = lm
    config = lora_lib.LoraConfig(rank=2, alpha=2.0)
    first, second = _random_adapters(params, config, 4), _random_adapters(params, config, 5)
    run = tmp_path / "run"
    base = _save(str(run / "bc"), params)
    one = _save(str(run / "i0"), first, checkpoints.lora_metadata(base, str(run / "i0" / "1"), 1.0, 2))
    two = _save(str(run / "i1"), second, checkpoints.lora_metadata(one, str(run / "i1" / "1"), 1.0, 2))
    want = lora_lib.merge(lora_lib.merge(params, first, 1.0), second, 1.0)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    got = checkpoints.load_params(str(run / "i1"), target=abstract)
    for k, v in tree_lib.flatten(want).items():
        np.testing.assert_allclose(tree_lib.flatten(got)[k], v, rtol=1e-6, atol=1e-7)
    # Only the adapters are stored in the adapter checkpoint.
    stored = tree_lib.flatten(checkpoints.stored_params(two))
    assert stored and all(k.endswith(("lora_a", "lora_b")) for k in stored)
    moved = tmp_path / "moved"
    shutil.move(str(run), str(moved))
    again = checkpoints.load_params(str(moved / "i1"), target=abstract)
    for k, v in tree_lib.flatten(got).items():
        np.testing.assert_array_equal(tree_lib.flatten(again)[k], v)
    # Sharded over a 2 x 4 mesh by the logical axes (as Grow and Improve load it): merged inside one program
    # whose outputs carry the parameters' shardings.
    from rest_jax import partitioning  # pylint: disable=import-outside-toplevel

    part = partitioning.Partitioner.create(partitioning.create_mesh((2, 4)))
    with part.context():
        boxed = jax.eval_shape(lambda: policy_lib.init_params(lm[0], jax.random.key(0)))
    shardings = part.shardings(boxed)
    sharded = checkpoints.load_params(str(moved / "i1"), target=abstract, shardings=shardings)
    want_shardings = tree_lib.flatten(shardings)
    assert len({str(s.spec) for s in want_shardings.values()}) > 1  # some parameters are split, some not
    for k, v in tree_lib.flatten(sharded).items():
        assert v.sharding == want_shardings[k], k
        np.testing.assert_allclose(np.asarray(v), tree_lib.flatten(got)[k], rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_rest_with_lora_saves_adapters_that_load_as_the_policy(tmp_path):
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "rest_jax.main", "rest", "--gin_file=experiments/demo_decoder_only.gin",
            f"--gin.MODEL_DIR='{run}'", f"--gin.demo_source.data_dir='{tmp_path / 'demo'}'",
            *inspection.TINY_RUN_OVERRIDES, "--gin.improve_step.lora=@LoraConfig()", "--gin.LoraConfig.rank=4"]
    env = {**os.environ, "XLA_FLAGS": ""}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Improve 1 adapts Improve 0's checkpoint, which adapts BC's.
    first = json.loads((run / "grow_1" / "improve_0" / "stage.json").read_text())
    second = json.loads((run / "grow_1" / "improve_1" / "stage.json").read_text())
    assert second["lora"]["base"] == checkpoints.step_directory(first["checkpoint"])
    assert first["lora"]["base"] == checkpoints.step_directory(str(run / "bc" / "checkpoints"))
    bc_dir = checkpoints.step_directory(str(run / "bc" / "checkpoints"))
    bc = checkpoints.load_params(bc_dir)
    expected = bc
    for i in (0, 1):
        step_dir = checkpoints.step_directory(str(run / "grow_1" / f"improve_{i}" / "checkpoints"))
        stored = checkpoints.stored_params(step_dir)
        flat = tree_lib.flatten(stored)
        assert all(k.endswith(("lora_a", "lora_b")) for k in flat)
        assert sum(np.size(v) for v in flat.values()) < 0.2 * sum(np.size(v) for v in jax.tree.leaves(bc))
        expected = lora_lib.merge(expected, stored, 16.0 / 4)
    got = tree_lib.flatten(checkpoints.load_params(str(run / "grow_1" / "improve_1" / "checkpoints")))
    changed = set()
    for k, v in tree_lib.flatten(expected).items():
        np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=1e-7)
        if not np.array_equal(got[k], tree_lib.flatten(bc)[k]):
            changed.add(k.split("/")[-2])
    # Only attention projections may differ from BC (none if no Improve step beat its start on validation).
    assert changed <= {"query", "key", "value", "out"}
