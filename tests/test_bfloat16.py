"""bfloat16 activations (`T5Config.dtype`, gin macro ACTIVATION_DTYPE) against float32 references.

T5X's numerics: parameters and optimizer state stay float32, matmuls and activations run in bfloat16,
attention logits/softmax, the output logits and the loss in float32. The references are Hugging Face T5/mT5 in
float32 (the HF-parity models of test_convert_hf.py) for the forward pass and greedy decoding, and our own
float32 model, itself equal to HF's within 1e-4, for the loss and its gradient.

Documented tolerances (README "bfloat16 activations"), measured on these random-weight models: logits differ
from float32 by at most 8% of the logits' standard deviation (measured 3-5%) and on average by at most 1%
(measured 0.2-0.7%); a greedy decode parts from float32's only where float32's top two logits are within that
tolerance (measured gaps <= 1% of the std); the gradient's cosine similarity to float32's is at least 0.99 for
every parameter.
"""

import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_convert_hf as hf_parity
from rest_jax import convert, decoding, losses, optim, partitioning, trainer
from rest_jax.model.t5 import T5Config, Transformer

pytest.importorskip("torch")


@pytest.fixture(scope="module", params=["t5_v1_1", "t5_1_0_relu_tied", "mt5_3enc_1dec"])
def hf_pair(request):
    model = hf_parity._build_hf(request.param)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config, params = convert.load_hf_checkpoint(folder)
    return model, config, params


def test_bfloat16_logits_are_near_hf_float32(hf_pair):
    model, config, params = hf_pair
    enc, dec = hf_parity._inputs()
    _, reference = hf_parity._hf_outputs(model, enc, dec)
    logits = Transformer(config.replace(dtype="bfloat16")).apply({"params": params}, jnp.asarray(enc),
                                                                  jnp.asarray(dec))
    assert logits.dtype == jnp.float32  # the loss and the sampler read float32 logits, as in T5X
    err = np.abs(np.asarray(logits) - reference)
    scale = reference.std()
    assert err.max() <= 0.08 * scale, (err.max(), scale)
    assert err.mean() <= 0.01 * scale, (err.mean(), scale)
    # ...yet bfloat16 did run: float32 would be within 1e-4 (test_convert_hf.py).
    assert err.max() > 1e-3
    assert (np.asarray(logits).argmax(-1) == reference.argmax(-1)).mean() >= 0.97


def test_bfloat16_greedy_decodes_leave_float32_only_at_near_ties(hf_pair):
    model, config, params = hf_pair
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    enc = rng.integers(2, hf_parity.VOCAB, size=(12, 20)).astype(np.int32)
    enc[:, -1] = 1
    length = 16
    ours = np.asarray(decoding.sample(params, config.replace(dtype="bfloat16"), jnp.asarray(enc),
                                      jax.random.key(0), num_samples=1, max_decode_len=length, temperature=0.0,
                                      ignore_eos=True).tokens[:, 0])
    with torch.no_grad():
        ids = torch.tensor(enc, dtype=torch.long)
        mask = torch.ones_like(ids)
        theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                                max_new_tokens=length, min_new_tokens=length, decoder_start_token_id=0,
                                eos_token_id=None, pad_token_id=0).numpy()[:, 1:]
        # HF float32's logits along our bfloat16 decode: where the two first part, was it a near-tie?
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor(
            np.asarray(decoding.shift_right(ours)), dtype=torch.long)).logits.numpy()
    same_rows = 0
    for row, (a, b) in enumerate(zip(ours, theirs)):
        parted = np.nonzero(a != b)[0]
        if not len(parted):
            same_rows += 1
            continue
        p = parted[0]
        gap = logits[row, p].max() - logits[row, p, a[p]]
        # Within the logit tolerance of the float32 argmax: a tie that bfloat16 may break either way.
        assert gap <= 0.08 * logits[row, p].std(), (row, p, gap)
    # Random weights make near-ties common (measured: 7 of 12 rows identical over 16 tokens).
    assert same_rows >= len(ours) // 3, same_rows


def _tiny(dtype: str) -> T5Config:
    return T5Config(vocab_size=128, emb_dim=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=2,
                    head_dim=16, mlp_dim=128, dtype=dtype)


def _batch(seed: int = 0, rows: int = 8, length: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, 128, (rows, length)).astype(np.int32)
    targets = rng.integers(3, 128, (rows, length)).astype(np.int32)
    targets[:, -3:] = 0
    return {"encoder_input_tokens": enc, "decoder_input_tokens": np.asarray(decoding.shift_right(targets)),
            "decoder_target_tokens": targets, "decoder_loss_weights": (targets > 0).astype(np.float32)}


def test_bfloat16_loss_and_gradient_are_near_float32():
    batch = _batch()
    params = nn.unbox(Transformer(_tiny("float32")).init(
        jax.random.key(0), batch["encoder_input_tokens"], batch["decoder_input_tokens"])["params"])
    results = {}
    for dtype in ("float32", "bfloat16"):
        loss_fn = losses.make_loss_fn(Transformer(_tiny(dtype)))
        with jax.default_matmul_precision("float32"):
            (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
        results[dtype] = (float(loss), grads)
    (ref_loss, ref_grads), (loss, grads) = results["float32"], results["bfloat16"]
    assert abs(loss - ref_loss) <= 0.01 * ref_loss
    flat_ref, flat = jax.tree.leaves_with_path(ref_grads), jax.tree.leaves(grads)
    for (path, g_ref), g in zip(flat_ref, flat):
        assert g.dtype == jnp.float32, path  # gradients of float32 parameters
        g_ref, g = np.ravel(g_ref), np.ravel(g)
        cosine = g_ref @ g / (np.linalg.norm(g_ref) * np.linalg.norm(g))
        assert cosine >= 0.99, (jax.tree_util.keystr(path), cosine)


def test_bfloat16_training_keeps_float32_state_and_learns_like_float32():
    batch = _batch(1)
    mesh = partitioning.create_mesh((1, 1), devices=jax.devices()[:1])
    rules = partitioning.standard_logical_axis_rules()
    curves = {}
    for dtype in ("float32", "bfloat16"):
        model = Transformer(_tiny(dtype))
        opt = optim.create_optimizer(lambda learning_rate: optim.adamw(learning_rate),
                                     schedule=optim.learning_rate_schedule("constant", 3e-3, 0))
        state, shardings = trainer.init_train_state(model, opt, jax.random.key(0), mesh, rules)
        step = trainer.make_train_step(opt, losses.make_loss_fn(model), mesh=mesh, rules=rules,
                                       state_shardings=shardings)
        device_batch = partitioning.shard_batch(batch, mesh, rules)
        curve = []
        for _ in range(40):
            state, metrics = step(state, device_batch)
            curve.append(float(metrics["loss"]))
        dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))
                  if jnp.issubdtype(x.dtype, jnp.floating)}
        assert dtypes == {jnp.dtype(jnp.float32)}, (dtype, dtypes)
        curves[dtype] = np.asarray(curve)
    # Memorising one batch: both fall far, and bfloat16 tracks float32 step by step.
    assert curves["float32"][-1] < 0.5 * curves["float32"][0]
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], rtol=0.05)


def test_bfloat16_weight_gradients_do_not_read_a_transposed_left_operand():
    # XLA:CPU runs a bfloat16 dot that contracts its left operand's first axis ~5x slower than the other forms
    # (benchmarks/README.md); the projections' custom VJP writes xᵀ out so that no compiled dot takes that form.
    import re  # pylint: disable=import-outside-toplevel

    from rest_jax.model import layers  # pylint: disable=import-outside-toplevel

    x = jnp.ones((64, 32), jnp.bfloat16)
    kernel = jnp.ones((32, 48), jnp.float32)
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(layers.matmul(x, k, jnp.float32)), argnums=(0, 1)))
    hlo = grad.lower(x, kernel).compile().as_text()
    dots = re.findall(r"dot\([^\n]*", hlo)
    assert len(dots) >= 2, hlo
    assert not [d for d in dots if "lhs_contracting_dims={0}" in d], dots
    dx, dk = grad(x, kernel)
    np.testing.assert_allclose(np.asarray(dk), 64.0)  # xᵀ·1: every weight's gradient is the sum over 64 rows
    np.testing.assert_allclose(np.asarray(dx, np.float32), 48.0)


# ---------------------------------------------------------------------------------------------------------
# Decoding caches: bfloat16 activations held as uint16 bits (`layers.cache_dtype`), written in place


def _lm_config(dtype: str):
    from rest_jax.model.decoder_only import DecoderOnlyConfig  # pylint: disable=import-outside-toplevel

    return DecoderOnlyConfig(vocab_size=128, emb_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                             num_layers=2, dtype=dtype)


def test_bfloat16_sampling_log_probs_equal_the_bfloat16_full_forward():
    """Sampled tokens' log-probs, computed through the decode cache, against the bfloat16 full pass over the
    same tokens (no cache): equal up to bfloat16 rounding order. A cache holding wrong values (bits misread,
    a slot written to the wrong place) moves them by far more (checked: reading zeros from it, by up to 2.2)."""
    from rest_jax.model.decoder_only import DecoderOnly  # pylint: disable=import-outside-toplevel

    rng = np.random.default_rng(4)
    # Encoder-decoder.
    config = _tiny("bfloat16")
    params = nn.unbox(jax.jit(Transformer(config).init)(jax.random.key(3), jnp.ones((1, 8), jnp.int32),
                                                        jnp.ones((1, 8), jnp.int32))["params"])
    sources = jnp.asarray(rng.integers(3, 128, (4, 10)).astype(np.int32))
    out = decoding.sample(params, config, sources, jax.random.key(5), num_samples=3, max_decode_len=12,
                          temperature=1.0, ignore_eos=True)
    batch = decoding.samples_to_batch(sources, out)
    logits = np.asarray(jax.jit(Transformer(config).apply)({"params": params}, batch["encoder_input_tokens"],
                                                           batch["decoder_input_tokens"]), np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = np.take_along_axis(log_probs, np.asarray(batch["decoder_target_tokens"])[..., None], -1)[..., 0]
    got = np.asarray(out.token_log_probs).reshape(expected.shape)
    np.testing.assert_allclose(got, expected, atol=0.03)
    # Decoder-only: prompt prefill, then the cache.
    lm_config = _lm_config("bfloat16")
    lm = DecoderOnly(lm_config)
    lm_params = nn.unbox(jax.jit(lm.init)(jax.random.key(6), jnp.ones((1, 8), jnp.int32))["params"])
    prompts = rng.integers(3, 128, (3, 7)).astype(np.int32)
    prompts[0, :2] = 0  # left padding
    mask = prompts > 0
    out = decoding.sample_lm(lm_params, lm_config, jnp.asarray(prompts), jnp.asarray(mask), jax.random.key(7),
                             num_samples=2, max_decode_len=9, temperature=1.0, stop_ids=(1,))
    # The full pass over each left-padded prompt and its completion (padding after the completion's end).
    completions = np.asarray(out.tokens).reshape(6, 9)
    emitted = np.arange(9) < np.asarray(out.lengths).reshape(6, 1)
    tokens = np.concatenate([np.repeat(prompts, 2, axis=0), completions], axis=1)
    token_mask = np.concatenate([np.repeat(mask, 2, axis=0), emitted], axis=1)
    full = np.asarray(jax.jit(lm.apply)({"params": lm_params}, jnp.asarray(tokens), jnp.asarray(token_mask)),
                      np.float64)
    full = full[:, 6:-1]  # the logits after the prompt's last column predict the first completion token
    full = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - full.max(-1, keepdims=True)
    expected = np.take_along_axis(full, completions[..., None], -1)[..., 0] * emitted
    got = np.asarray(out.token_log_probs).reshape(6, 9)
    assert emitted.sum() > 30  # most samples run for several tokens
    np.testing.assert_allclose(got, expected, atol=0.03)


@pytest.mark.parametrize("family", ["encoder_decoder", "decoder_only"])
def test_bfloat16_decoding_never_holds_the_cache_in_float32(family):
    """XLA:CPU has no bfloat16 dynamic-update-slice: a bfloat16 cache was converted whole to float32 and back
    around every write, twice per layer and step (on the IWSLT shape, Grow in bfloat16 ran 1.08x float32's
    tokens/s with it, 2.0x without; benchmarks/README.md). The compiled sampling loop must not hold an array
    of the whole cache's shape in float32."""
    if family == "encoder_decoder":
        config = _tiny("bfloat16")
        params = jax.eval_shape(Transformer(config).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32),
                                jnp.ones((1, 8), jnp.int32))["params"]
        rows, length = 2 * 3, 11
        shape = (config.num_decoder_layers, rows, config.num_heads, length, config.head_dim)
        compiled = decoding._sample_jit.lower(  # pylint: disable=protected-access
            nn.unbox(params), jnp.ones((2, 9), jnp.int32), jax.random.key(0), jnp.float32(1.0), jnp.float32(1.0),
            config=config, num_samples=3, max_decode_len=length, top_k=0, use_top_p=False, top_p_candidates=64,
            greedy=False, eos_id=1, ignore_eos=False).compile()
    else:
        from rest_jax.model.decoder_only import DecoderOnly  # pylint: disable=import-outside-toplevel

        config = _lm_config("bfloat16")
        params = jax.eval_shape(DecoderOnly(config).init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))["params"]
        rows, prompt, length = 2 * 3, 7, 11
        shape = (config.num_layers, rows, config.num_kv_heads, prompt + length, config.head_dim)
        compiled = decoding._sample_lm_jit.lower(  # pylint: disable=protected-access
            nn.unbox(params), jnp.ones((2, prompt), jnp.int32), jnp.ones((2, prompt), bool), jax.random.key(0),
            jnp.float32(1.0), jnp.float32(1.0), config=config, num_samples=3, max_decode_len=length, top_k=0,
            use_top_p=False, top_p_candidates=64, greedy=False, stop_ids=(1,)).compile()
    hlo = compiled.as_text()
    whole = "[" + ",".join(map(str, shape)) + "]"
    assert f"u16{whole}" in hlo or f"bf16{whole}" in hlo, "the cache is no longer the shape this test looks for"
    assert f"f32{whole}" not in hlo, "the whole decoding cache is converted to float32 in the sampling loop"
