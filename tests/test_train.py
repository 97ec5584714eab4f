"""Train step and loop: loss falls, jitted sharded step equals a plain reference update, kill-and-resume is
bitwise exact, NaN handling, and the gin entry on real Multi30k data."""

import functools
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rest_jax import checkpoints, losses, optim, partitioning, train, trainer
from rest_jax.model import t5

# Dropout on: the per-step dropout keys are part of what resuming must reproduce.
TINY = t5.T5Config(vocab_size=64, emb_dim=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1,
                   head_dim=16, mlp_dim=64, dropout_rate=0.1)


def copy_batch(step, batch_size=16, length=10, num_symbols=12, seed=0):
    """A deterministic toy batch (a function of the step): copy `num_symbols` symbols, EOS-terminated."""
    rng = np.random.default_rng([seed, step])
    src = rng.integers(3, 3 + num_symbols, size=(batch_size, length)).astype(np.int32)
    for row, n in enumerate(rng.integers(3, length + 1, size=batch_size)):
        src[row, n - 1] = 1
        src[row, n:] = 0
    dec_in = np.concatenate([np.zeros((batch_size, 1), np.int32), src[:, :-1]], axis=1)
    return {"encoder_input_tokens": src, "decoder_input_tokens": dec_in, "decoder_target_tokens": src.copy(),
            "decoder_loss_weights": (src > 0).astype(np.float32)}


def copy_batches(start=0, **kwargs):
    step = start
    while True:
        yield copy_batch(step, **kwargs)
        step += 1


@functools.lru_cache(maxsize=None)
def _compiled(config, mesh_shape, optimizer_kind, label_smoothing, z_loss):
    """Model, optimizer, pristine initial state and the jitted step, compiled once per configuration
    (compilation, not training, is what costs time on the shared 2-core machine)."""
    if optimizer_kind == "adamw_const":
        opt = optim.create_optimizer("adamw", schedule=optim.learning_rate_schedule("constant", 1e-2, 0))
    else:  # "adamw_linear_clip"
        opt = optim.create_optimizer("adamw", schedule=optim.learning_rate_schedule("linear", 1e-2, 2, 10),
                                     max_grad_norm=0.5)
    devices = jax.devices()[: int(np.prod(mesh_shape))]
    mesh = partitioning.create_mesh(mesh_shape, devices=devices)
    rules = partitioning.standard_logical_axis_rules()
    model = t5.Transformer(config)
    state, shardings = trainer.init_train_state(model, opt, jax.random.key(0), mesh, rules)
    step = trainer.make_train_step(opt, losses.make_loss_fn(model, label_smoothing=label_smoothing, z_loss=z_loss),
                                 mesh=mesh, rules=rules, state_shardings=shardings, dropout_seed=0)
    shard = lambda b: partitioning.shard_batch(b, mesh, rules)  # noqa: E731
    return model, opt, state, shardings, step, shard


def _setup(config=TINY, mesh_shape=(1, 1), optimizer_kind="adamw_const", label_smoothing=0.0, z_loss=1e-4):
    """(model, optimizer, fresh state, shardings, step, shard_fn); the state is a copy (steps donate it)."""
    model, opt, state, shardings, step, shard = _compiled(config, mesh_shape, optimizer_kind, label_smoothing,
                                                          z_loss)
    return model, opt, jax.tree.map(jnp.copy, state), shardings, step, shard


def test_loss_falls_on_copy_task():
    *_, state, _, step, shard = _setup()
    losses = []
    for i, batch in zip(range(40), copy_batches()):
        state, metrics = step(state, shard(batch))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[0] > 0.9 * math.log(64)  # about uniform over 64 tokens at first
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def _np_loss(logits, targets, weights, label_smoothing, z_loss):
    """Float64 NumPy T5X cross entropy per target token (label smoothing with normalising constant, z-loss)."""
    logits = np.asarray(logits, np.float64)
    vocab = logits.shape[-1]
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    log_p = logits - log_z[..., None]
    conf, low = 1 - label_smoothing, label_smoothing / (vocab - 1)
    q = np.full(logits.shape, low)
    np.put_along_axis(q, targets[..., None], conf, axis=-1)
    const = -(conf * np.log(conf) + (vocab - 1) * low * np.log(low))
    per_token = -(q * log_p).sum(-1) - const + z_loss * log_z ** 2
    return float((per_token * weights).sum() / weights.sum())


def test_sharded_jitted_step_equals_plain_reference_update():
    ls, zl = 0.1, 1e-3
    model, opt, state, _, step, shard = _setup(TINY.replace(dropout_rate=0.0), (2, 4), "adamw_linear_clip", ls, zl)
    params = jax.tree.map(np.asarray, state.params)
    opt_state = opt.init(jax.tree.map(jnp.asarray, params))

    def ref_loss(p, batch):  # plain jax, written independently of rest_jax.losses
        logits = model.apply({"params": p}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
        vocab = logits.shape[-1]
        log_z = jax.nn.logsumexp(logits, -1)
        log_p = logits - log_z[..., None]
        q = jax.nn.one_hot(batch["decoder_target_tokens"], vocab) * (1 - ls - ls / (vocab - 1)) + ls / (vocab - 1)
        const = -((1 - ls) * np.log(1 - ls) + ls * np.log(ls / (vocab - 1)))
        tok = -(q * log_p).sum(-1) - const + zl * log_z ** 2
        w = batch["decoder_loss_weights"]
        return (tok * w).sum() / w.sum(), logits

    for i in range(2):
        batch = copy_batch(i)
        with jax.disable_jit():
            (loss, logits), grads = jax.value_and_grad(ref_loss, has_aux=True)(params, batch)
            clip = min(1.0, 0.5 / float(optax.global_norm(grads)))
            updates, opt_state = opt.tx.update(grads, opt_state, params)  # includes the clip
            new_params = optax.apply_updates(params, updates)
        np_loss = _np_loss(logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"], ls, zl)
        state, metrics = step(state, shard(batch))
        np.testing.assert_allclose(float(metrics["loss"]), np_loss, rtol=1e-5)
        hits = (np.argmax(np.asarray(logits), -1) == batch["decoder_target_tokens"]) * batch["decoder_loss_weights"]
        np.testing.assert_allclose(float(metrics["accuracy"]), hits.sum() / batch["decoder_loss_weights"].sum(),
                                   rtol=1e-6)
        np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-4)
        np.testing.assert_allclose(float(metrics["learning_rate"]), 1e-2 * min(1.0, i / 2), rtol=1e-6)
        assert clip < 1.0 or i > 0  # the clip is active at least on the first step
        params = jax.tree.map(np.asarray, new_params)
        got = jax.tree.map(np.asarray, state.params)
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(got)):
            np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-6, err_msg=f"step {i} {jax.tree_util.keystr(path)}")
    assert int(state.step) == 2


def test_kill_and_resume_is_bitwise_identical(tmp_path):
    def run(directory, stop_at, num_steps, resume):
        model, opt, state, shardings, step, shard = _setup()
        manager = checkpoints.CheckpointManager(directory, period=4)
        if resume:
            state, meta = manager.restore(jax.tree.map(lambda x: x, state), shardings=shardings)
            assert meta["data_step"] == int(state.step) == 4
        start = int(state.step)
        state, _ = trainer.train_loop(state, copy_batches(start), step, stop_at, shard_fn=shard, show_progress=False,
                                      hooks=[trainer.Checkpoint(manager, final=(stop_at == num_steps))])
        manager.close()
        return jax.tree.map(np.asarray, state.params), state

    uninterrupted, _ = run(tmp_path / "a", 10, 10, resume=False)
    crashed, crashed_state = run(tmp_path / "b", 6, 10, resume=False)  # dies at 6: steps 5-6 are lost
    assert checkpoints.CheckpointManager(tmp_path / "b").all_steps() == [4]
    resumed, state = run(tmp_path / "b", 10, 10, resume=True)
    assert int(state.step) == 10
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(uninterrupted)[0], jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # Not trivially equal: the state at the crash differs from the final one.
    assert not np.array_equal(crashed["encoder"]["layers_0"]["mlp"]["wo"]["kernel"],
                              resumed["encoder"]["layers_0"]["mlp"]["wo"]["kernel"])


def _nan_at(step_with_nan):
    def gen():
        for i, batch in enumerate(copy_batches()):
            if i == step_with_nan:
                batch = dict(batch, decoder_loss_weights=batch["decoder_loss_weights"] * np.nan)
            yield batch
    return gen()


def _loop_with_checkpoints(state, batches, step, num_steps, manager, shard):
    """The loop as `train.train` runs it: checkpoints, and the typed errors completed with the caller's advice."""
    with trainer.error_advice(memory_knobs=("train.batch_size", "train.feature_lengths"),
                              last_checkpoint=lambda: trainer.describe_last_checkpoint(manager)):
        return trainer.train_loop(state, batches, step, num_steps, shard_fn=shard, show_progress=False,
                                  hooks=[trainer.Checkpoint(manager)])


def test_nan_loss_stops_naming_step_and_last_checkpoint(tmp_path):
    *_, state, _, step, shard = _setup()
    manager = checkpoints.CheckpointManager(tmp_path, period=2)
    with pytest.raises(trainer.NonFiniteLossError) as info:
        _loop_with_checkpoints(state, _nan_at(5), step, 10, manager, shard)
    msg = str(info.value)
    assert "at step 5" in msg
    assert f"{tmp_path / '4'} (step 4)" in msg
    assert "skip_nonfinite_updates" in msg
    assert manager.all_steps() == [2, 4]  # nothing saved after the NaN


def test_nan_loss_does_not_name_a_damaged_checkpoint_as_good(tmp_path):
    """Step 4's files change on disk before the NaN at step 5: step 2 is the last good checkpoint."""
    *_, state, _, step, shard = _setup()
    manager = checkpoints.CheckpointManager(tmp_path, period=2)

    def batches():
        for i, batch in enumerate(_nan_at(5)):
            if i == 5:  # step 4 is saved by now
                data = max((p for p in (tmp_path / "4" / "state").rglob("*") if p.is_file()),
                           key=lambda p: p.stat().st_size)
                raw = bytearray(data.read_bytes())
                raw[len(raw) // 2] ^= 0xFF
                data.write_bytes(bytes(raw))
            yield batch

    with pytest.raises(trainer.NonFiniteLossError) as info:
        _loop_with_checkpoints(state, batches(), step, 10, manager, shard)
    msg = str(info.value)
    assert (f"Last good checkpoint: {tmp_path / '2'} (step 2); damaged, delete before rerunning: {tmp_path / '4'} ("
            in msg)
    assert "checksum mismatch" in msg


def test_nan_update_skipped_and_counted_with_knob():
    *_, state, _, step, shard = _setup()
    for i, batch in zip(range(3), copy_batches()):
        state, _ = step(state, shard(batch))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    bad = copy_batch(3)
    bad["decoder_loss_weights"] = bad["decoder_loss_weights"] * np.nan
    state, metrics = step(state, shard(bad))
    assert int(metrics["nonfinite"]) == 1 and int(state.skipped_updates) == 1 and int(state.step) == 4
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, (state.params, state.opt_state)))
    # Through the loop with the knob: training carries on and counts the skipped update.
    *_, state, _, step, shard = _setup()
    state, summary = trainer.train_loop(state, _nan_at(2), step, 6, shard_fn=shard, skip_nonfinite_updates=True,
                                      show_progress=False)
    assert int(state.step) == 6 and summary["skipped_updates"] == 1 and int(state.skipped_updates) == 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.tree.map(np.asarray, state.params)))


def test_eval_callback_and_metric_writer_are_called():
    *_, state, _, step, shard = _setup()
    calls, written = [], []

    class Writer:
        def write_scalars(self, s, scalars):
            written.append((s, dict(scalars)))

    def eval_fn(st, s):
        calls.append((s, int(st.step)))
        return {"score": float(s)}

    writer = Writer()
    trainer.train_loop(state, copy_batches(), step, 6, shard_fn=shard, show_progress=False,
                       hooks=[trainer.LogMetrics(writer, 3), trainer.Evaluate(eval_fn, 2, writer, prefix="eval/")])
    assert calls == [(2, 2), (4, 4), (6, 6)]
    train_scalars = [w for w in written if "loss" in w[1]]
    assert [s for s, _ in train_scalars] == [3, 6]
    assert {"loss", "accuracy", "learning_rate", "grad_norm", "tokens_per_sec", "step_time_sec"} <= set(
        train_scalars[-1][1])
    assert (6, {"eval/score": 6.0}) in written


def test_evaluate_hook_stops_early_and_keeps_the_best_step():
    """Monitored scores 0.3, 0.5, 0.4, 0.2 (patience 2) after steps 2, 4, 6, 8: best at 4, stop after 8 of 20."""
    *_, state, _, step, shard = _setup()
    scores = iter([0.3, 0.5, 0.4, 0.2, 0.9])
    best_calls, every = [], []
    evaluate = trainer.Evaluate(lambda st, s: {"score": next(scores)}, 2, monitor="score", patience=2, initial=0.1,
                                on_best=lambda st, s: best_calls.append((s, int(st.step))))
    hooks = [trainer.Every(3, lambda loop: every.append(loop.step)), evaluate]
    state, summary = trainer.train_loop(state, copy_batches(), step, 20, shard_fn=shard, hooks=hooks,
                                        show_progress=False)
    assert int(state.step) == 8 and summary["steps_run"] == 8
    assert evaluate.curve == [(2, 0.3), (4, 0.5), (6, 0.4), (8, 0.2)]  # not evaluated again at the end
    assert (evaluate.best_step, evaluate.best_value) == (4, 0.5) and best_calls == [(2, 2), (4, 4)]
    assert every == [3, 6] and summary["eval"] == {"score": 0.2}


def test_evaluate_hook_skips_results_that_are_not_admissible():
    """Scores 0.3, 0.5, 0.4, 0.6 with a guard that refuses 0.5: the best is 0.6 at step 8; 0.5 at 4 is rejected
    and counts against patience (0.4 at 6 then beats the best, 0.3)."""
    *_, state, _, step, shard = _setup()
    results = iter([{"score": 0.3, "ok": 1}, {"score": 0.5, "ok": 0}, {"score": 0.4, "ok": 1},
                    {"score": 0.6, "ok": 1}])
    best_calls = []
    evaluate = trainer.Evaluate(lambda st, s: next(results), 2, monitor="score", patience=2, initial=0.1,
                                on_best=lambda st, s: best_calls.append(s), admissible=lambda r: r["ok"] == 1)
    trainer.train_loop(state, copy_batches(), step, 8, shard_fn=shard, hooks=[evaluate], show_progress=False)
    assert (evaluate.best_step, evaluate.best_value) == (8, 0.6) and best_calls == [2, 6, 8]
    assert evaluate.rejected == [4]


# ----------------------------------------------------------------------------------------------------
# Real data and the gin entry.
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi30k_vocab(multi30k_dir, tmp_path_factory):
    from rest_jax.data import text_files, vocab

    lines = []
    for lang in ("de", "en"):
        lines += list(text_files.read_lines(str(multi30k_dir / f"train.{lang}")))[:3000]
    return vocab.train_vocabulary(lines, str(tmp_path_factory.mktemp("vocab")), vocab_size=256)


def _bind_multi30k(multi30k_dir, vocab_path):
    import gin

    gin.clear_config()
    gin.parse_config([f"multi30k_source.data_dir = '{multi30k_dir}'", f"get_task.vocabulary = '{vocab_path}'"])


def test_loss_falls_on_multi30k(multi30k_dir, multi30k_vocab):
    import gin

    from rest_jax.data import pipeline

    _bind_multi30k(multi30k_dir, multi30k_vocab)
    try:
        *_, state, _, step, shard = _setup(TINY.replace(vocab_size=256))
        batches = pipeline.get_batches("multi30k_de_en", "train", batch_size=32,
                                       feature_lengths={"inputs": 24, "targets": 24}, seed=0, shard_index=0,
                                       num_shards=1)
        state, _ = trainer.train_loop(state, batches, step, 1, shard_fn=shard, show_progress=False)
        losses = []
        for i, batch in zip(range(40), batches):
            state, metrics = step(state, shard(trainer.token_features(batch)))
            losses.append(float(metrics["loss"]))
    finally:
        gin.clear_config()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


_TRAIN_SCRIPT = textwrap.dedent("""
    import sys, gin
    from rest_jax import train
    gin.parse_config_files_and_bindings(["configs/runs/pretrain.gin"], sys.argv[1:])
    state = train.train()
    import numpy as np, jax
    np.savez(gin.query_parameter("%MODEL_DIR") + "/final.npz",
             *[np.asarray(x) for x in jax.tree.leaves(state.params)])
""")


@pytest.mark.slow
def test_gin_train_killed_and_rerun_matches_uninterrupted(multi30k_dir, multi30k_vocab, tmp_path):
    """`train()` from gin, SIGKILLed after its first checkpoint and rerun, ends bitwise equal."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def bindings(model_dir):
        return [f"MODEL_DIR = '{model_dir}'", "TASK = 'multi30k_de_en'", "TRAIN_STEPS = 12", "BATCH_SIZE = 16",
                "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 16}", "train.checkpoint_period = 4", "train.eval_period = 0",
                "train.eval_split = None", f"multi30k_source.data_dir = '{multi30k_dir}'",
                f"get_task.vocabulary = '{multi30k_vocab}'", "create_mesh.mesh_shape = (1, 1)",
                "T5Config.vocab_size = 256", "T5Config.emb_dim = 32",
                "T5Config.num_heads = 2", "T5Config.head_dim = 16", "T5Config.mlp_dim = 64",
                "T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1", "T5Config.dropout_rate = 0.1",
                "learning_rate_schedule.name = 'constant'", "learning_rate_schedule.base_learning_rate = 0.01",
                "learning_rate_schedule.warmup_steps = 0"]

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": repo}

    def launch(model_dir):
        return subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, *bindings(model_dir)], cwd=repo, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    a, b = tmp_path / "a", tmp_path / "b"
    proc = launch(b)
    deadline = time.time() + 300
    while not (b / "checkpoints" / "4" / "commit_success.txt").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = checkpoints.CheckpointManager(b / "checkpoints").all_steps()
    assert steps and max(steps) < 12, steps
    for model_dir in (b, a):
        out, _ = launch(model_dir).communicate(timeout=600)
        assert (model_dir / "final.npz").exists(), out[-3000:]
    ref, got = np.load(a / "final.npz"), np.load(b / "final.npz")
    assert len(ref.files) > 10
    for key in ref.files:
        np.testing.assert_array_equal(ref[key], got[key], err_msg=key)


def test_gin_train_entry_trains_evaluates_and_checkpoints(multi30k_dir, multi30k_vocab, tmp_path):
    import gin

    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings(
            [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/runs/pretrain.gin")],
            [f"MODEL_DIR = '{tmp_path}'", "TASK = 'multi30k_de_en'", "TRAIN_STEPS = 3", "BATCH_SIZE = 16",
             "TASK_FEATURE_LENGTHS = {'inputs': 16, 'targets': 16}", "train.eval_batch_size = 256",
             f"multi30k_source.data_dir = '{multi30k_dir}'", f"get_task.vocabulary = '{multi30k_vocab}'",
             "create_mesh.mesh_shape = (4, 2)", "T5Config.vocab_size = 256", "T5Config.emb_dim = 32",
             "T5Config.num_heads = 2", "T5Config.head_dim = 16", "T5Config.mlp_dim = 64",
             "T5Config.num_encoder_layers = 1", "T5Config.num_decoder_layers = 1"], finalize_config=False)
        calls = []

        def bleu_like(model, params, step, mesh, model_dir):
            calls.append(step)
            return {"bleu": 1.5}

        gin.bind_parameter("train.eval_callbacks", [bleu_like])
        state = train.train()
        # Fine-tuning start: parameters from that checkpoint, fresh optimizer at step 0 (0 steps to run).
        gin.bind_parameter("train.init_checkpoint", str(tmp_path / "checkpoints"))
        gin.bind_parameter("train.model_dir", str(tmp_path / "finetune"))
        gin.bind_parameter("train.num_steps", 0)
        init = train.train()
    finally:
        gin.clear_config()
    assert int(state.step) == 3 and calls == [3]
    assert int(init.step) == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(init.params))
    manager = checkpoints.CheckpointManager(tmp_path / "checkpoints")
    assert manager.all_steps() == [3]
    meta = manager.metadata()
    assert meta["data_step"] == 3 and meta["task"] == "multi30k_de_en" and meta["model_config"]["vocab_size"] == 256
    assert list((tmp_path / "train").glob("events.out.tfevents.*")) and list((tmp_path / "eval").glob("events.*"))


def test_out_of_memory_names_the_knobs():
    def oom_step(state, batch):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes.")

    state = trainer.TrainState(step=jnp.zeros((), jnp.int32), params={}, opt_state=(),
                             skipped_updates=jnp.zeros((), jnp.int32))
    with pytest.raises(trainer.OutOfMemoryError, match=r"step 0 does not fit.*train\.batch_size.*feature_lengths"):
        with trainer.error_advice(memory_knobs=("train.batch_size", "train.feature_lengths"),
                                  last_checkpoint=lambda: "none"):
            trainer.train_loop(state, copy_batches(), oom_step, 2, show_progress=False)
    with pytest.raises(RuntimeError, match="other"):  # anything else propagates unchanged
        trainer.train_loop(state, copy_batches(), lambda s, b: (_ for _ in ()).throw(RuntimeError("other")), 2,
                         show_progress=False)
