"""Improve with the RL losses of ReST Sec. 5 (OAC, BVMPO): value pre-training, loss inputs, the step, the CLI.

References: the value MSE and the per-sequence fit are recomputed in float64 NumPy from an independent
`ValueNetwork.apply` against the hand-known Monte-Carlo returns (undiscounted: the sequence reward at every
target token); the frozen networks' outputs are compared with independent forward passes of the frozen
parameters; λ(step) with its closed form 10^(-5·step/decay_steps); gradients of frozen inputs must be zero.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import checkpoints, evaluate, improve, improve_data, losses, optim, partitioning, rewards, trainer
from rest_jax import policy as policy_lib
from rest_jax.model import heads
from rest_jax.model.t5 import T5Config, Transformer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = T5Config(vocab_size=32, emb_dim=16, num_heads=2, head_dim=8, mlp_dim=32, num_encoder_layers=1,
                  num_decoder_layers=1)
LENGTHS = {"inputs": 8, "targets": 8}


class _CharVocab:
    """Letters a..z as ids 3..28 (ids the tiny policy may also emit above 28 decode to nothing)."""

    def encode(self, text):
        return [ord(c) - ord("a") + 3 for c in text if "a" <= c <= "z"]

    def decode(self, ids):
        return "".join(chr(int(i) - 3 + ord("a")) for i in ids if 3 <= int(i) < 29)


def _columns(rows):
    out = {}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if isinstance(vals[0], np.ndarray):
            arr = np.empty(len(vals), object)
            arr[:] = vals
            out[k] = arr
        else:
            out[k] = np.array(vals, dtype=object if isinstance(vals[0], str) else None)
    return out


def _grow_data(rewards_by_row, seed=0):
    """Grow columns as `GrowStore.as_numpy` returns them, one row per reward."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, r in enumerate(rewards_by_row):
        length = int(rng.integers(2, 6))
        rows.append(dict(
            source_id=i // 2, sample_id=i % 2, is_reference=False, reward=float(r), source_text=f"src {i}",
            candidate_text=f"cand {i}", reference_text=f"ref {i // 2}", source_tokens=np.array(list(rng.integers(3, 29, size=4)) + [1], np.int64),
            candidate_tokens=np.array(list(rng.integers(3, 29, size=length)) + [1], np.int64),
            behaviour_logprobs=-rng.uniform(size=length + 1).astype(np.float32)))
    return _columns(rows)


@pytest.fixture(scope="module")
def mesh():
    # One device: the tiny model compiles several times faster than on conftest's 8 simulated ones.
    return partitioning.create_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def policy_params():
    return nn.unbox(heads.init_params(Transformer(CONFIG), jax.random.key(0)))


def _value_start(policy_params, seed=1):
    value_model = heads.ValueNetwork(CONFIG)
    fresh = nn.unbox(heads.init_params(value_model, jax.random.key(seed)))
    return value_model, heads.transplant_trunk(policy_params, fresh)


def _reference_fit(value_model, params, data):
    """float64: token MSE to the returns and each row's mean value, from an independent forward pass."""
    batch = improve_data.make_batch({c: list(data[c]) for c in improve_data.TRAIN_COLUMNS}, LENGTHS)
    values = np.asarray(value_model.apply({"params": jax.device_get(params)}, batch["encoder_input_tokens"],
                                          batch["decoder_input_tokens"]), np.float64)
    w = batch["decoder_loss_weights"].astype(np.float64)
    returns = data["reward"].astype(np.float64)[:, None] * np.ones_like(values)  # undiscounted MC return
    mse = float(np.sum(w * (values - returns) ** 2) / np.sum(w))
    return mse, np.sum(w * values, 1) / np.sum(w, 1)


def test_value_pretraining_fits_the_sequence_rewards(mesh, policy_params):
    data = _grow_data([0.9, 0.2])
    value_model, start = _value_start(policy_params)
    opt = optim.create_optimizer("adamw", schedule=optim.learning_rate_schedule("constant", 3e-3, warmup_steps=0))
    grow = improve_data.GrowData.from_columns(data)
    params, summary = improve.pretrain_value_network(value_model, start, grow, 40, LENGTHS, 8, seed=0, mesh=mesh,
                                                     optimizer=opt, log_period=10)
    initial_ref, _ = _reference_fit(value_model, start, data)
    final_ref, per_row = _reference_fit(value_model, params, data)
    assert summary["initial_mse"] == pytest.approx(initial_ref, rel=1e-4)
    assert summary["final_mse"] == pytest.approx(final_ref, rel=1e-4)
    assert initial_ref > 0.05 and final_ref < 0.1 * initial_ref, (initial_ref, final_ref)
    np.testing.assert_allclose(per_row, [0.9, 0.2], atol=0.1)


def _rl_batch(data, step):
    batch = improve_data.make_batch({c: list(data[c]) for c in improve_data.TRAIN_COLUMNS}, LENGTHS)
    return {**{k: jnp.asarray(v) for k, v in batch.items()}, improve.STEP_KEY: jnp.asarray(step, jnp.int32)}


def test_loss_inputs_have_the_shapes_and_values_the_losses_expect(policy_params):
    data = _grow_data([0.9, 0.2, 0.5, 0.7])
    model = Transformer(CONFIG)
    value_model, value_params = _value_start(policy_params)
    bc_params = nn.unbox(heads.init_params(model, jax.random.key(5)))
    anchor_params = jax.tree.map(lambda x: x * 1.01, policy_params)
    batch = _rl_batch(data, 5000)
    b, t = batch["decoder_target_tokens"].shape
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]

    def spy(batch_, outputs, step=0):
        """The real BVMPO loss; what it was given comes back through the aux metrics as out/<key>."""
        value, metrics = losses.get_loss("bvmpo")(batch_, outputs, step=step)
        return value, {**metrics, **{f"out/{k}": v for k, v in outputs.items()}, "out/step": step}

    needs = improve.loss_needs("bvmpo")
    assert needs.value and needs.bc and needs.anchor and needs.vmpo and needs.value_training == "joint"
    loss_fn = improve.make_improve_loss_fn(model, spy, value_model, needs=needs, value_training="joint")
    params = {"policy": policy_params, "value": value_params, "vmpo": losses.init_vmpo_params(1.0, 1.0)}
    frozen = {"bc": bc_params, "anchor": anchor_params}

    @jax.jit
    def run(p, fr):
        objective = lambda p_, fr_: loss_fn(p_, {**batch, improve.FROZEN_KEY: fr_}, None)  # noqa: E731
        (loss, metrics), grads = jax.value_and_grad(objective, argnums=(0, 1), has_aux=True)(p, fr)
        return loss, metrics, grads

    loss, metrics, grads = run(params, frozen)
    outputs = {k[len("out/"):]: v for k, v in metrics.items() if k.startswith("out/")}
    assert np.isfinite(float(loss))
    assert outputs["logits"].shape == (b, t, CONFIG.vocab_size)
    for key in ("bc_logits", "old_logits"):
        assert outputs[key].shape == (b, t, CONFIG.vocab_size)
    assert outputs["values"].shape == (b, t) and np.shape(outputs["vmpo_eta"]) == () == np.shape(outputs["vmpo_alpha"])
    np.testing.assert_allclose(outputs["values"], value_model.apply({"params": value_params}, enc, dec), atol=1e-6)
    np.testing.assert_allclose(outputs["bc_logits"], model.apply({"params": bc_params}, enc, dec), atol=1e-5)
    np.testing.assert_allclose(outputs["old_logits"], model.apply({"params": anchor_params}, enc, dec), atol=1e-5)
    assert not np.allclose(outputs["bc_logits"], outputs["old_logits"], atol=1e-3)
    # λ(5000) of λ·KL(π_BC ‖ π): geometric 1 -> 1e-5 over 10k steps, i.e. 10^-2.5 halfway.
    assert int(outputs["step"]) == 5000
    assert float(metrics["bc_kl_weight"]) == pytest.approx(10 ** -2.5, rel=1e-5)
    norm = lambda tree: float(optax_norm(tree))  # noqa: E731
    assert norm(grads[0]["value"]) > 0 and norm(grads[0]["policy"]) > 0  # joint: value trained by L_V
    assert abs(float(grads[0]["vmpo"]["vmpo_eta"])) > 0
    assert norm(grads[1]) == 0.0  # the BC policy and the anchor are frozen


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_oac_value_network_is_frozen_and_anchor_reuses_bc(policy_params):
    data = _grow_data([0.9, 0.2, 0.5, 0.7])
    model = Transformer(CONFIG)
    value_model, value_params = _value_start(policy_params)
    batch = _rl_batch(data, 0)
    needs = improve.loss_needs("oac")
    assert needs.value and not (needs.bc or needs.anchor or needs.vmpo) and needs.value_training == "frozen"
    loss_fn = improve.make_improve_loss_fn(model, losses.get_loss("oac"), value_model, needs=needs)
    enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    values = np.asarray(value_model.apply({"params": value_params}, enc, dec), np.float64)
    log_pi = np.asarray(jax.nn.log_softmax(model.apply({"params": policy_params}, enc, dec)), np.float64)
    tgt = np.asarray(batch["decoder_target_tokens"])
    w = np.asarray(batch["decoder_loss_weights"], np.float64)
    lp = np.take_along_axis(log_pi, tgt[..., None], -1)[..., 0]
    returns = data["reward"].astype(np.float64)[:, None] * w
    # Hand OAC: −Σ w (G − V) log π / Σ w + Σ w (V − G)² / Σ w, V the frozen behaviour value.
    expected = -np.sum(w * (returns - values) * lp) / w.sum() + np.sum(w * (values - returns) ** 2) / w.sum()

    def objective(p, frozen_value):
        return loss_fn(p, {**batch, improve.FROZEN_KEY: {"value": frozen_value}}, None)[0]

    loss, (g_policy, g_value) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))(
        {"policy": policy_params}, value_params)
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(optax_norm(g_policy)) > 0 and float(optax_norm(g_value)) == 0.0

    # BVMPO at G=1, I=0: the BC policy is the policy being improved, so old_logits are the BC logits.
    seen = {}
    spy = lambda b_, o, step=0: (seen.update(o), losses.get_loss("bvmpo")(b_, o, step=step))[1]  # noqa: E731
    fn = improve.make_improve_loss_fn(model, spy, value_model, needs=improve.loss_needs("bvmpo"),
                                      value_training="frozen", anchor_is_bc=True)
    jax.eval_shape(fn, {"policy": policy_params, "vmpo": losses.init_vmpo_params()},
                   {**batch, improve.FROZEN_KEY: {"bc": policy_params, "value": value_params}}, None)
    assert seen["old_logits"] is seen["bc_logits"]  # one forward pass of the BC policy, not two
    with pytest.raises(ValueError, match="value_training"):
        improve.make_improve_loss_fn(model, spy, value_model, needs=needs, value_training="sometimes")


@pytest.fixture
def adamw():
    """AdamW for the Improve step (gin): it compiles in about half Adafactor's time on a shared CPU."""
    gin.clear_config()
    gin.bind_parameter("create_optimizer.optimizer", "adamw")
    yield
    gin.clear_config()


@pytest.mark.parametrize("loss_name", ["oac", "bvmpo"])
def test_improve_step_with_rl_loss_saves_a_plain_policy(tmp_path, mesh, policy_params, adamw, loss_name):
    rng = np.random.default_rng(3)
    data = _grow_data(rng.uniform(size=16), seed=3)
    data["is_reference"][::4] = True
    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    bc = None  # OAC needs no BC policy
    if loss_name == "bvmpo":  # a BC policy other than the start policy, loaded from its checkpoint path
        manager = checkpoints.CheckpointManager(str(tmp_path / "bc"), keep=1, period=1)
        manager.save(1, {"params": nn.unbox(heads.init_params(policy.model, jax.random.key(9)))}, force=True)
        manager.close()
        bc = str(tmp_path / "bc")
    params, result = improve.improve_step(
        policy, improve_data.GrowData.from_columns(data), str(tmp_path), 0, (["abc", "de"], ["abc", "de"]),
        reward=rewards.get("chrf"),
        loss_name=loss_name, num_steps=2, eval_period=2, batch_size=8, feature_lengths=LENGTHS, mesh=mesh,
        bc_policy=bc, value_pretrain_steps=0, filter_method="none")
    assert result["loss"] == loss_name and math.isfinite(result["last_train_loss"])
    assert result["value_training"] == {"oac": "frozen", "bvmpo": "joint"}[loss_name]
    # No pre-training steps here (tested above, and by the CLI test): one compile less on a shared CPU.
    assert result["value_pretrain"]["steps"] == 0
    assert math.isfinite(result["value_pretrain"]["final_mse"])
    assert [s for s, _ in result["curve"]] == [0, 2]
    # The checkpoint is the policy alone, with T5X names: it loads into the plain policy tree.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), policy_params)
    loaded = checkpoints.load_params(result["checkpoint"], target=target)
    assert set(loaded) == set(policy_params) == {"token_embedder", "encoder", "decoder"}
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "value" / "pretrain.json").exists()


def test_oac_on_a_decoder_only_policy_fits_and_freezes_its_value_network(tmp_path, mesh, adamw):
    # Issue 17: the value-network losses on a decoder-only policy. The value net is the LM trunk + a head
    # (`heads.LMValueNetwork`); its pre-training MSE is recomputed from an independent apply of the saved value
    # checkpoint, and the Improve checkpoint is the plain LM tree.
    from rest_jax.model import decoder_only, translation_lm  # pylint: disable=import-outside-toplevel

    config = decoder_only.DecoderOnlyConfig(vocab_size=32, emb_dim=16, num_heads=2, num_kv_heads=1, head_dim=8,
                                            num_layers=1, mlp_dim=32)
    model = translation_lm.TranslationLM(config, prompt_after=(29,))
    params = nn.unbox(policy_lib.init_params(model, jax.random.key(0)))
    data = _grow_data([0.9, 0.2, 0.8, 0.1, 0.9, 0.2, 0.7, 0.3], seed=4)
    gin.bind_parameter("create_optimizer.schedule",
                       optim.learning_rate_schedule("constant", 3e-3, warmup_steps=0))
    out, result = improve.improve_step(
        policy_lib.Policy(model, params, _CharVocab()), improve_data.GrowData.from_columns(data), str(tmp_path),
        0, (["abc", "de"], ["abc", "de"]), reward=rewards.get("chrf"), loss_name="oac", num_steps=2,
        eval_period=2, batch_size=8, feature_lengths=LENGTHS, mesh=mesh, value_pretrain_steps=30,
        filter_method="none")
    assert math.isfinite(result["last_train_loss"]) and result["value_training"] == "frozen"
    value_model = heads.build_value_network(model)
    assert isinstance(value_model, heads.LMValueNetwork)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(heads.abstract_params(value_model)))
    value_params = checkpoints.load_params(str(tmp_path / "value" / "checkpoints"), target=target)
    fit, _ = _reference_fit(value_model, value_params, data)
    summary = result["value_pretrain"]
    assert summary["final_mse"] == pytest.approx(fit, rel=1e-4)
    assert summary["final_mse"] < 0.5 * summary["initial_mse"], summary
    loaded = checkpoints.load_params(result["checkpoint"],
                                     target=jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params))
    assert set(loaded) == set(params) and "value_head" not in loaded


@pytest.mark.slow
def test_improve_subcommand_end_to_end(tmp_path):
    """`python -m rest_jax.main improve` from a policy checkpoint and a Grow store (real SentencePiece vocab)."""
    from rest_jax.data import grow_store, vocab  # pylint: disable=import-outside-toplevel

    words = ["a dog runs", "the cat sleeps", "a bird sings", "the man walks", "a child plays", "the sun shines"]
    vocab_path = vocab.train_vocabulary(words * 20, str(tmp_path / "vocab"), vocab_size=30)
    spm = vocab.load_vocabulary(vocab_path)
    model = Transformer(CONFIG)
    params = nn.unbox(heads.init_params(model, jax.random.key(0)))
    manager = checkpoints.CheckpointManager(str(tmp_path / "bc" / "checkpoints"), keep=1, period=1)
    manager.save(1, trainer.TrainState.create(params, optim.create_optimizer("adamw")), force=True)
    manager.close()
    writer = grow_store.GrowStoreWriter(str(tmp_path / "store"), grow_index=1, source_ids=4, num_samples=2,
                                        sources_per_shard=4)
    records = []
    for s in range(4):
        source = words[s][::-1]  # not a copy of any candidate (the validity filter drops copies)
        for j in (-1, 0, 1):
            cand = words[s] if j < 0 else words[(s + 1 + j) % len(words)]
            ids = list(spm.encode(cand)) + [1]
            records.append({"source_id": s, "sample_id": j, "is_reference": j < 0, "source_text": source,
                            "candidate_text": cand, "reference_text": words[s],
                            "source_tokens": list(spm.encode(source)) + [1], "candidate_tokens": ids,
                            "reward": 1.0 if j < 0 else 0.25 + 0.5 * (j == 0), "behaviour_logprobs": [-1.0] * len(ids)})
    writer.write_shard(0, records)
    writer.write_metadata()
    (tmp_path / "val.tsv").write_text("".join(f"{w}\t{w}\n" for w in words[:2]))
    fields = {"vocab_size": 32, "emb_dim": 16, "num_heads": 2, "head_dim": 8, "mlp_dim": 32,
              "num_encoder_layers": 1, "num_decoder_layers": 1}
    out = tmp_path / "improve"
    args = [sys.executable, "-m", "rest_jax.main", "improve", "--gin_file=models/tiny.gin",
            *[f"--gin.T5Config.{k}={v}" for k, v in fields.items()],
            f"--gin.MODEL_DIR='{out}'", f"--gin.GROW_STORE='{tmp_path / 'store'}'",
            "--gin.TASK='parallel_text'", "--gin.IMPROVE_INDEX=0",
            f"--gin.parallel_text_source.files={{'validation': '{tmp_path / 'val.tsv'}'}}",
            f"--gin.CHECKPOINT='{tmp_path / 'bc' / 'checkpoints'}'", f"--gin.VOCABULARY='{vocab_path}'",
            "--gin.improve_step.feature_lengths={'inputs': 8, 'targets': 8}",
            "--gin.improve_step.loss_name='oac'", "--gin.improve_step.num_steps=2",
            "--gin.improve_step.eval_period=2", "--gin.improve_step.batch_size=8",
            "--gin.improve_step.value_pretrain_steps=2"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # One CPU device: conftest's 8 simulated ones would only slow the subprocess down.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["loss"] == "oac" and printed["num_kept"] == 8 + 4  # 4 references too
    assert json.loads((out / "improve.json").read_text())["best_step"] == printed["best_step"]
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params)
    assert set(checkpoints.load_params(printed["checkpoint"], target=target)) == set(params)


def test_nonfinite_loss_in_improve_names_the_restart_point(tmp_path, mesh, policy_params, adamw):
    """A learning rate far too large overflows the parameters: the error says a rerun restarts the stage."""
    gin.bind_parameter("learning_rate_schedule.name", "constant")
    gin.bind_parameter("learning_rate_schedule.base_learning_rate", 1e30)
    data = _grow_data(np.linspace(0.1, 0.9, 8), seed=4)
    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    with pytest.raises(trainer.NonFiniteLossError) as info:
        improve.improve_step(policy, improve_data.GrowData.from_columns(data), str(tmp_path), 1, (["abc"], ["abc"]),
                             reward=rewards.get("chrf"),
                             num_steps=4, eval_period=4, batch_size=4, feature_lengths=LENGTHS, mesh=mesh,
                             filter_method="none")
    msg = str(info.value)
    assert "improve_1: non-finite loss" in msg
    assert "restarts this stage from it" in msg and str(tmp_path) in msg


def test_improve_learning_rate_scope_overrides_bc_schedule(tmp_path, mesh, policy_params, adamw, monkeypatch):
    """`improve/learning_rate_schedule.*` sets Improve's rate; the BC binding stays for BC; lr_decay^i applies."""
    gin.bind_parameter("learning_rate_schedule.name", "constant")
    gin.bind_parameter("learning_rate_schedule.base_learning_rate", 0.01)
    gin.bind_parameter("learning_rate_schedule.warmup_steps", 0)
    gin.bind_parameter("improve/learning_rate_schedule.base_learning_rate", 0.002)
    seen = []
    real = optim.create_optimizer

    def spy(**kwargs):
        opt = real(**kwargs)
        seen.append(float(opt.schedule(0)))
        return opt

    monkeypatch.setattr(improve.optim, "create_optimizer", spy)
    data = _grow_data(np.linspace(0.1, 0.9, 8), seed=5)
    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    improve.improve_step(policy, improve_data.GrowData.from_columns(data), str(tmp_path), 2, (["abc"], ["abc"]),
                         reward=rewards.get("chrf"),
                         num_steps=1, eval_period=1, batch_size=8, feature_lengths=LENGTHS, mesh=mesh,
                         filter_method="none", lr_decay=0.5)
    assert seen == [pytest.approx(0.002 * 0.5 ** 2)]
    assert float(optim.learning_rate_schedule()(0)) == pytest.approx(0.01)  # outside the scope: BC's


def test_improve_logs_the_filter_value_only_when_the_filter_has_one(policy_params, mesh, tmp_path):
    # A NaN filter_value (filter 'none', DPO's) made tensorboardX print "NaN or Inf found in input tensor".
    import tensorflow as tf  # pylint: disable=import-outside-toplevel  (TensorFlow's own event reader)

    data = _grow_data(np.linspace(0.1, 0.9, 8), seed=5)
    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    logged = {}
    for method in ("none", "threshold"):
        out = tmp_path / method
        _, result = improve.improve_step(
            policy, improve_data.GrowData.from_columns(data), str(out), 1, (["abc"], ["abc"]),
            reward=rewards.get("chrf"), num_steps=1, eval_period=1, batch_size=8, feature_lengths=LENGTHS, mesh=mesh,
            filter_method=method)
        events = [e for f in out.glob("improve/events.out.tfevents.*")
                  for e in tf.compat.v1.train.summary_iterator(str(f))]
        logged[method] = {v.tag: v.simple_value for e in events for v in e.summary.value
                          if v.WhichOneof("value") == "simple_value"}
        assert not [tag for tag, value in logged[method].items() if not math.isfinite(value)], logged[method]
        assert logged[method]["kept_fraction"] == pytest.approx(result["filter"]["kept_fraction"])
        if method == "threshold":
            assert logged[method]["filter_value"] == pytest.approx(result["filter"]["value"])
    assert "filter_value" not in logged["none"]


def test_gold_takes_p_mle_from_the_frozen_bc_policy(policy_params):
    # GOLD's per-token reward is the BC (MLE) model's probability at every Grow step: from Grow 2 on the store's
    # behaviour log-probs are a ReST policy's (and at the sampling temperature), so they must not be used.
    data = _grow_data([0.9, 0.2, 0.5, 0.7])
    model = Transformer(CONFIG)
    bc_params = nn.unbox(heads.init_params(model, jax.random.key(5)))
    batch = _rl_batch(data, 0)
    assert "mle_logprobs" not in batch
    seen = {}
    spy = lambda b_, o, step=0: (seen.update(o), losses.get_loss("gold")(b_, o, step=step))[1]  # noqa: E731
    needs = improve.loss_needs("gold")
    assert needs.bc and not (needs.value or needs.vmpo or needs.anchor)
    fn = improve.make_improve_loss_fn(model, spy, needs=needs)
    loss, _ = fn(policy_params, {**batch, improve.FROZEN_KEY: {"bc": bc_params}}, None)
    expected = model.apply({"params": bc_params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
    np.testing.assert_allclose(seen["bc_logits"], expected, atol=1e-5)
    # The same loss computed by hand from the BC logits (GOLD-p, u = 0.2, floor 0.1, horizon 5).
    w = np.asarray(batch["decoder_loss_weights"], np.float64)
    tgt = np.asarray(batch["decoder_target_tokens"])
    logp = lambda x: np.take_along_axis(np.asarray(jax.nn.log_softmax(np.asarray(x, np.float64))), tgt[..., None], -1)[..., 0]  # noqa: E731,E501
    pi = logp(model.apply({"params": policy_params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"]))
    r = np.maximum(np.exp(logp(expected)), 0.1) * (w > 0)
    q = sum(np.pad(r[:, j:], ((0, 0), (0, j))) for j in range(6))
    iw = np.clip(np.exp(pi), 0.2, 1.0)
    assert float(loss) == pytest.approx(float(-np.sum(w * iw * q * pi) / w.sum()), rel=1e-4)


@pytest.mark.parametrize("anchor_period", [2, None])
def test_bvmpo_anchor_moves_every_period_and_lambda_spans_the_step(tmp_path, mesh, policy_params, adamw,
                                                                   monkeypatch, anchor_period):
    # Without dropout the policy equals a just-moved anchor, so KL(π_old ‖ π) is exactly 0 at updates 0, 2, 4
    # when the anchor moves every 2 updates, and positive in between; a fixed anchor drifts away from update 1.
    import dataclasses  # pylint: disable=import-outside-toplevel

    model = Transformer(dataclasses.replace(CONFIG, dropout_rate=0.0))
    policy = policy_lib.Policy(model, policy_params, _CharVocab())
    seen = []
    bvmpo = losses.get_loss("bvmpo")

    def spy(batch, outputs, step=0):
        value, metrics = bvmpo(batch, outputs, step=step)
        jax.debug.callback(lambda s, k, lam: seen.append((int(s), float(k), float(lam))), step, metrics["kl_old"],
                           metrics["bc_kl_weight"])
        return value, metrics

    get_loss = losses.get_loss
    monkeypatch.setattr(losses, "get_loss", lambda name: spy if name == "bvmpo" else get_loss(name))
    data = _grow_data(np.random.default_rng(4).uniform(size=16), seed=4)
    improve.improve_step(policy, improve_data.GrowData.from_columns(data), str(tmp_path), 1, (["abc"], ["abc"]),
                         reward=rewards.get("chrf"), loss_name="bvmpo", num_steps=6, eval_period=6, patience=1,
                         batch_size=8, feature_lengths=LENGTHS, mesh=mesh, value_pretrain_steps=0,
                         filter_method="none", anchor_period=anchor_period)
    kl = {s: k for s, k, _ in seen}
    assert sorted(kl) == list(range(6))
    moved = {0, 2, 4} if anchor_period == 2 else {0}
    for s in range(6):
        assert (kl[s] < 1e-9) == (s in moved), (s, kl)
    # λ anneals 1 -> 1e-5 over this step's 6 updates: 10^(-5 s / 6).
    for s, _, lam in seen:
        assert lam == pytest.approx(10 ** (-5 * s / 6), rel=1e-4)


def test_reference_fraction_needs_the_references(tmp_path, mesh, policy_params):
    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    data = improve_data.GrowData.from_columns(_grow_data([0.9, 0.2, 0.5, 0.7]))
    with pytest.raises(ValueError, match="reference_fraction=0.5 needs improve_step.include_references=True"):
        improve.improve_step(policy, data, str(tmp_path), 0, (["abc"], ["abc"]), reward=rewards.get("chrf"),
                             include_references=False, reference_fraction=0.5, mesh=mesh, filter_method="none")
    with pytest.raises(ValueError, match=r"improve_step.pack: packed rows serve the losses \('bc', 'rwbc'\)"):
        improve.improve_step(policy, data, str(tmp_path), 0, (["abc"], ["abc"]), reward=rewards.get("chrf"),
                             loss_name="gold", pack=True, mesh=mesh, filter_method="none")
    with pytest.raises(ValueError, match="anchor_period=0"):
        improve.improve_step(policy, data, str(tmp_path), 0, (["abc"], ["abc"]), reward=rewards.get("chrf"),
                             loss_name="bvmpo", anchor_period=0, mesh=mesh, filter_method="none")


def test_packed_improve_step_trains_on_rows_of_several_examples(tmp_path, mesh, policy_params):
    """improve_step.pack: the train step gets packed rows (segment ids, more target tokens than rows of one),
    and the step trains (the per-token loss on packed rows is checked against unpacked in test_packing.py)."""
    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    data = improve_data.GrowData.from_columns(_grow_data(np.linspace(0.1, 0.9, 16)))
    seen, real = [], improve.trainer.train_loop

    def spy(state, batches, *args, **kwargs):
        def record(stream):
            for batch in stream:
                seen.append(batch)
                yield batch
        return real(state, record(batches), *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(improve.trainer, "train_loop", spy)
        _, result = improve.improve_step(policy, data, str(tmp_path), 0, (["abc"], ["abc"]), reward=rewards.get("chrf"),
                                         pack=True, num_steps=2, eval_period=2, batch_size=2,
                                         feature_lengths={"inputs": 16, "targets": 16}, mesh=mesh,
                                         filter_method="none")
    assert len(seen) == 2 and np.isfinite(result["last_train_loss"])
    for batch in seen:  # sources of 5 tokens: three to a row of 16
        assert batch["encoder_segment_ids"].max(axis=1).tolist() == [3, 3]
        assert batch["decoder_loss_weights"].sum() > 2 * 7  # more than two rows of the longest example


@pytest.mark.parametrize("loss_name", ["dpo", "ipo"])
def test_preference_improve_step_raises_the_chosen_over_rejected_log_ratio(tmp_path, mesh, policy_params, adamw,
                                                                           loss_name):
    """DPO/IPO from a Grow store's pairs, reference = the growing policy (its stored log-probs, here exact).

    At the start the policy is its own reference, so every margin h is 0 (DPO's loss log 2, IPO's 1/(4τ²)); the
    training pairs' mean margin, computed afterwards by an independent forward pass (`Policy.score`), must rise.
    """
    gin.bind_parameter("learning_rate_schedule.name", "constant")
    gin.bind_parameter("learning_rate_schedule.base_learning_rate", 0.01)
    gin.bind_parameter("learning_rate_schedule.warmup_steps", 0)
    data = _grow_data(np.random.default_rng(8).uniform(size=16), seed=8)  # 8 sources of 2 samples: 8 pairs
    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    data["behaviour_logprobs"][:] = policy.score(list(data["source_tokens"]), list(data["candidate_tokens"]))

    def mean_margin(params):
        lp = [float(x.sum()) for x in policy.replace(params).score(list(data["source_tokens"]),
                                                                   list(data["candidate_tokens"]))]
        ratio = np.asarray(lp) - np.asarray([float(x.sum()) for x in data["behaviour_logprobs"]])
        chosen = np.where(data["reward"][0::2] > data["reward"][1::2], 0, 1) + np.arange(0, 16, 2)
        return float(np.mean(ratio[chosen] - ratio[chosen ^ 1]))

    assert abs(mean_margin(policy_params)) < 1e-5
    # The last of 24 updates is evaluated alone: patience 1 with the start's reward kept as the best would
    # otherwise return the start policy; the margin is read from the trained parameters of the final state.
    trained = {}
    real = improve.trainer.train_loop

    def spy(state, *args, **kwargs):
        state, summary = real(state, *args, **kwargs)
        trained["params"] = jax.device_get(state.params)
        return state, summary

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(improve.trainer, "train_loop", spy)
        _, result = improve.improve_step(
            policy, improve_data.GrowData.from_columns(data), str(tmp_path), 0, (["abc"], ["abc"]),
            reward=rewards.get("chrf"), loss_name=loss_name, num_steps=24, eval_period=24, batch_size=8,
            feature_lengths=LENGTHS, mesh=mesh, filter_method="none", include_references=False)
    assert result["num_kept"] == 16 and result["loss"] == loss_name
    assert mean_margin(trained["params"]) > 1.0, mean_margin(trained["params"])


def test_heldout_guard_keeps_the_best_reward_among_steps_that_keep_the_metric(tmp_path, mesh, policy_params, adamw,
                                                                              rising_reward):
    """improve_step.heldout_guard: validation rewards rise at every evaluation (steps 2, 4, 6, 8), the guard's
    BLEU readings are 50 at the start, then 40, 49.5, 30, 45: with max_drop 1 only step 4 may be kept (by hand),
    where the reward alone keeps step 8."""
    readings = iter([50.0, 40.0, 49.5, 30.0, 45.0])

    class ScriptedGuard(evaluate.HeldoutGuard):
        def measure(self, hypotheses, references):
            return next(readings)

    policy = policy_lib.Policy(Transformer(CONFIG), policy_params, _CharVocab())
    data = improve_data.GrowData.from_columns(_grow_data(np.linspace(0.1, 0.9, 16)))
    args = dict(num_steps=8, eval_period=2, patience=10, batch_size=4, feature_lengths=LENGTHS, mesh=mesh,
                filter_method="none")
    _, plain = improve.improve_step(policy, data, str(tmp_path / "plain"), 0, (["abc"], ["abc"]),
                                    reward=rising_reward(), **args)
    assert plain["best_step"] == 8 and "heldout_guard" not in plain
    _, guarded = improve.improve_step(policy, data, str(tmp_path / "guarded"), 0, (["abc"], ["abc"]),
                                      reward=rising_reward(), heldout_guard=ScriptedGuard("bleu", 1.0), **args)
    assert guarded["best_step"] == 4 and guarded["validation_reward"] == pytest.approx(0.003)  # the 3rd call
    assert guarded["heldout_guard"] == {"metric": "bleu", "max_drop": 1.0, "start": 50.0, "rejected_steps": [2, 6, 8]}
    assert [s for s, _ in guarded["curve"]] == [0, 2, 4, 6, 8]
    assert os.path.isdir(os.path.join(guarded["checkpoint"], "4"))
