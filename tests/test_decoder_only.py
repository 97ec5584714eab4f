"""Decoder-only LM (issue 17): parity with Hugging Face Llama and Gemma in PyTorch, incremental decoding, sharding.

The references are HF transformers' own models, built here with random weights at small sizes (every
parameter perturbed, so that a name mapped to the wrong tensor cannot pass), saved with `save_pretrained` and
read back through `rest_jax.convert_lm` as a user's checkpoint would be.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rest_jax import convert
from rest_jax import convert_lm
from rest_jax import losses
from rest_jax import partitioning
from rest_jax import tree as tree_lib
from rest_jax.model import decoder_only

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
             head_dim=16, max_position_embeddings=64)
KINDS = {
    # grouped-query attention (2 kv heads for 4 query heads), untied, a Llama-3 rotary base
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_theta=500000.0)),
    # Llama 3.1/3.2's long-context rotary (the low frequencies rescaled: the 40-token test rows see it)
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    # multi-query attention, tied embeddings
    "llama_mqa_tied": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    # Gemma 1: (1 + scale) norms, sqrt(d) embeddings, GeGLU, tied, head_dim * heads != hidden_size
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=24)),
}


def _hf_model(kind, tmp_path):
    config_cls, model_cls, extra = KINDS[kind]
    config = getattr(transformers, config_cls)(**{**SMALL, **extra}, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # norms start at 1 (or 0): perturb every tensor so each one's mapping is tested
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path / kind
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _tokens(batch=3, length=12, seed=0):
    return np.random.default_rng(seed).integers(1, SMALL["vocab_size"], size=(batch, length))


def _left_padded(tokens, pads=(0, 3, 7)):
    mask = np.ones(tokens.shape, bool)
    for row, p in enumerate(pads):
        mask[row, :p] = False
    return np.where(mask, tokens, 0), mask


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_logits_match_hugging_face(kind, tmp_path):
    hf, folder = _hf_model(kind, tmp_path)
    config, params = convert_lm.load_hf_checkpoint(folder)
    assert config.num_kv_heads == hf.config.num_key_value_heads and config.logits_via_embedding == bool(
        hf.config.tie_word_embeddings)
    model = decoder_only.DecoderOnly(config)
    tokens = _tokens(length=40)
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(tokens)))
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    # Left padding: HF with the attention mask and positions counted over real tokens, compared where real.
    padded, mask = _left_padded(tokens)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        want = hf(torch.tensor(padded), attention_mask=torch.tensor(mask.astype(np.int64)),
                  position_ids=torch.tensor(positions)).logits.numpy()
    got = np.asarray(model.apply({"params": params}, jnp.asarray(padded), jnp.asarray(mask)))
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama3_rope", "gemma"])
def test_export_loads_in_hugging_face_as_the_same_network(kind, tmp_path):
    # rest_jax -> HF: parameters that no HF file ever held (the converted ones, perturbed again) are exported;
    # transformers' AutoModelForCausalLM, built from the exported folder alone, gives rest_jax's logits. The two
    # kinds cover both config writers (Llama: GQA, untied, Llama 3 rotary; Gemma: tied, its norms, GeGLU).
    _, folder = _hf_model(kind, tmp_path)
    config, params = convert_lm.load_hf_checkpoint(folder)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    params = jax.tree_util.tree_unflatten(treedef, [x + 0.02 * jax.random.normal(k, x.shape)
                                                    for x, k in zip(leaves, keys)])
    out = convert_lm.save_hf_folder(config, params, tmp_path / "exported")
    hf_config = json.loads((out / "config.json").read_text())
    assert convert_lm.config_from_hf(hf_config) == config
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(hf).__name__ == KINDS[kind][1]
    tokens = _tokens(length=40, seed=2)
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(decoder_only.DecoderOnly(config).apply({"params": params}, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_shape_configs_export_to_hf_configs_that_read_back():
    # Every shipped shape has a HF config.json that reads back to it (no weights: the shapes are billions).
    import gin  # pylint: disable=import-outside-toplevel

    from rest_jax import gin_utils  # pylint: disable=import-outside-toplevel

    for shape in sorted(PUBLISHED):
        try:
            gin_utils.parse([f"models/decoder_only/{shape}.gin"], [])
            config = decoder_only.DecoderOnlyConfig()
        finally:
            gin.clear_config()
        assert convert_lm.config_from_hf(convert_lm.hf_config_dict(config)) == config, shape
    with pytest.raises(ValueError, match="mixes them"):
        convert_lm.hf_config_dict(decoder_only.DecoderOnlyConfig(scale_embeddings=True))


def test_converter_names_what_does_not_fit(tmp_path):
    _, folder = _hf_model("llama_gqa", tmp_path)
    hf = json.loads((folder / "config.json").read_text())
    config = convert_lm.config_from_hf(hf)
    state, _ = convert.read_hf_weights(folder)
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"][:, :8]
    with pytest.raises(ValueError) as err:
        convert_lm.params_from_hf(state, config, "ckpt")
    text = str(err.value)
    assert "missing tensor model.layers.1.mlp.up_proj.weight" in text
    assert "model.layers.0.self_attn.q_proj.weight has shape (8, 64)" in text
    for bad, word in ((dict(hf, model_type="qwen2"), "qwen2"), (dict(hf, attention_bias=True), "attention_bias"),
                      (dict(hf, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "yarn")):
        with pytest.raises(ValueError, match=word):
            convert_lm.config_from_hf(bad)


@pytest.mark.parametrize("kind", ["llama_gqa", "gemma"])
def test_cached_decoding_equals_the_full_forward(kind, tmp_path):
    # Feeding a left-padded batch one slot at a time through the cache gives the full pass's logits.
    _, folder = _hf_model(kind, tmp_path)
    config, params = convert_lm.load_hf_checkpoint(folder)
    model = decoder_only.DecoderOnly(config)
    padded, mask = _left_padded(_tokens(seed=1))
    full = np.asarray(model.apply({"params": params}, jnp.asarray(padded), jnp.asarray(mask)))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    cache = model.apply({"params": params}, 3, padded.shape[1], method=model.init_cache)
    step = jax.jit(lambda c, tok, pos, i: model.apply({"params": params}, tok, pos, i, c, jnp.asarray(mask),
                                                      method=model.decode_step))
    for i in range(padded.shape[1]):
        logits, cache = step(cache, jnp.asarray(padded[:, i]), jnp.asarray(positions[:, i]), jnp.int32(i))
        rows = mask[:, i]
        np.testing.assert_allclose(np.asarray(logits)[rows], full[rows, i], atol=2e-5, rtol=2e-5)
    assert cache["k"].shape == (config.num_layers, 3, config.num_kv_heads, padded.shape[1], config.head_dim)


def test_bfloat16_logits_near_float32(tmp_path):
    _, folder = _hf_model("llama_gqa", tmp_path)
    config, params = convert_lm.load_hf_checkpoint(folder)
    tokens = jnp.asarray(_tokens())
    f32 = np.asarray(decoder_only.DecoderOnly(config).apply({"params": params}, tokens))
    bf16 = np.asarray(decoder_only.DecoderOnly(config.replace(dtype="bfloat16")).apply({"params": params}, tokens))
    assert bf16.dtype == np.float32
    err = np.abs(bf16 - f32)
    assert 1e-4 < err.max() and err.max() < 0.08 * f32.std()  # bfloat16 really ran, and stayed close


@pytest.mark.parametrize("mesh_shape", [(2, 4), (8, 1)])
def test_sharded_forward_loss_and_grads_match_one_device(mesh_shape):
    config = decoder_only.DecoderOnlyConfig(vocab_size=128, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                            num_layers=2, mlp_dim=64)
    model = decoder_only.DecoderOnly(config)
    boxed = decoder_only.init_params(model, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(1, 128, size=(8, 10))
    tokens[::3, :4] = 0  # some left padding
    batch = {"tokens": tokens.astype(np.int32), "weights": (tokens > 0).astype(np.float32)}

    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch["tokens"])
        lp = losses.token_log_probs(logits[:, :-1], batch["tokens"][:, 1:]) * batch["weights"][:, 1:]
        return -jnp.sum(lp) / jnp.sum(batch["weights"][:, 1:]), logits

    params = nn.unbox(boxed)
    (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, batch)

    mesh = partitioning.create_mesh(mesh_shape)
    rules = partitioning.standard_logical_axis_rules()
    state, shardings = partitioning.Partitioner.create(mesh, rules).place(boxed)
    sharded_batch = partitioning.shard_batch(batch, mesh, rules)
    with partitioning.mesh_context(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), out_shardings=((None, None), shardings))
        (loss, logits), grads = step(nn.unbox(state), sharded_batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    flat, flat_ref = tree_lib.flatten(grads), tree_lib.flatten(ref_grads)
    assert flat.keys() == flat_ref.keys()
    for name, g in flat.items():
        scale = np.abs(np.asarray(flat_ref[name])).max()
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_ref[name]), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=name)
    kernel = tree_lib.flatten(nn.unbox(state))["decoder/layers_0/mlp/wi_0/kernel"]
    assert kernel.sharding.shard_shape(kernel.shape) == (32, 64 // mesh_shape[1])  # ('embed', 'mlp') split on model


# Parameter counts from each model's card / published safetensors index (independent of this code).
PUBLISHED = {"llama3_8b": 8_030_261_248, "llama3_1_8b": 8_030_261_248, "llama3_2_1b": 1_235_814_400,
             "llama3_2_3b": 3_212_749_824, "gemma_2b": 2_506_172_416, "gemma_7b": 8_537_680_896,
             "mistral_7b": 7_248_023_552}


@pytest.mark.parametrize("shape", sorted(PUBLISHED))
def test_shape_configs_have_the_published_parameter_counts(shape):
    import gin  # pylint: disable=import-outside-toplevel

    from rest_jax import gin_utils  # pylint: disable=import-outside-toplevel

    try:
        gin_utils.parse([f"models/decoder_only/{shape}.gin"], [])
        model = decoder_only.build_decoder_only()
    finally:
        gin.clear_config()
    shapes = jax.eval_shape(lambda: nn.unbox(decoder_only.init_params(model, jax.random.key(0), length=2)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == PUBLISHED[shape]


def _tiny_lm(seed=0):
    config = decoder_only.DecoderOnlyConfig(vocab_size=48, emb_dim=32, num_heads=4, num_kv_heads=2, head_dim=8,
                                            num_layers=2, mlp_dim=64)
    model = decoder_only.DecoderOnly(config)
    return model, nn.unbox(decoder_only.init_params(model, jax.random.key(seed)))


def _full_forward(model, params, width=16):
    """Jitted logits of one unpadded sequence (right-padded to `width`: causal, so earlier logits are unchanged)."""
    fn = jax.jit(lambda seq, mask: model.apply({"params": params}, seq, mask))

    def logits(seq):
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(seq)] = seq
        return np.asarray(fn(padded, np.arange(width)[None] < len(seq)))[0, :len(seq)]

    return logits


def _prompts():
    """Three prompts of lengths 6, 2 and 4 (ids >= 2), left-padded to 6."""
    real = [[5, 9, 2, 33, 7, 12], [40, 3], [8, 8, 21, 30]]
    tokens = np.zeros((3, 6), np.int32)
    mask = np.zeros((3, 6), bool)
    for row, p in enumerate(real):
        tokens[row, 6 - len(p):], mask[row, 6 - len(p):] = p, True
    return real, tokens, mask


def test_greedy_completions_equal_argmax_over_full_forwards():
    # Brute force: each prompt alone (no padding), the whole prefix re-run for every new token.
    from rest_jax import decoding  # pylint: disable=import-outside-toplevel

    model, params = _tiny_lm()
    real, tokens, mask = _prompts()
    stop = 1
    out = decoding.sample_lm(params, model, tokens, mask, jax.random.key(0), max_decode_len=8, temperature=0.0,
                             stop_ids=(stop,))
    forward = _full_forward(model, params)
    for row, prompt in enumerate(real):
        seq, want = list(prompt), []
        for _ in range(8):
            logits = forward(seq)[-1]
            want.append(int(np.argmax(logits)))
            seq.append(want[-1])
            if want[-1] == stop:
                break
        got = np.asarray(out.tokens[row, 0])
        assert list(got[:len(want)]) == want and not got[len(want):].any()
        assert int(out.lengths[row, 0]) == len(want)


def test_sampled_completions_carry_teacher_forced_log_probs_and_stop():
    from rest_jax import decoding  # pylint: disable=import-outside-toplevel

    model, params = _tiny_lm(seed=1)
    real, tokens, mask = _prompts()
    stops = (1, 4, 11, 17)  # common enough that rows stop at different lengths
    out = decoding.sample_lm(params, model, tokens, mask, jax.random.key(3), num_samples=4, max_decode_len=10,
                             temperature=1.0, stop_ids=stops)
    toks, lengths, lps = (np.asarray(x) for x in (out.tokens, out.lengths, out.token_log_probs))
    assert toks.shape == (3, 4, 10) and len(set(lengths.ravel())) > 1
    forward = _full_forward(model, params)
    for row, prompt in enumerate(real):
        for j in range(4):
            n = lengths[row, j]
            completion = list(toks[row, j, :n])
            assert not toks[row, j, n:].any() and not any(t in stops for t in completion[:-1])
            assert completion[-1] in stops or n == 10
            logits = forward(prompt + completion)  # (a sampled 0 is a token here, not padding)
            want = np.asarray(losses.token_log_probs(logits[None, len(prompt) - 1:-1], jnp.asarray([completion])))[0]
            np.testing.assert_allclose(lps[row, j, :n], want, atol=2e-5)
            assert not lps[row, j, n:].any()
