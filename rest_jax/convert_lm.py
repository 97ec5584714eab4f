"""Hugging Face decoder-only LM checkpoints (Llama, Mistral, Gemma families) <-> rest_jax (issue 17).

Reading: `load_hf_checkpoint` / `load_hf_folder`; writing: `save_hf_folder` (a folder `transformers`'
`AutoModelForCausalLM` and `AutoTokenizer` load), both reached through `rest_jax convert`.

A Hugging Face folder (`config.json` + `model.safetensors`, sharded `*.index.json`, or `pytorch_model.bin`)
becomes a `DecoderOnlyConfig` and the parameter tree of `rest_jax.model.decoder_only.DecoderOnly` (T5X's
decoder-only names). The networks are the same: `torch.nn.Linear` weights are stored [out, in] and transposed
here; the rotary layout is HF's (rotate-half), which the model uses, so no query/key permutation is needed.

Supported: `model_type` 'llama' and 'mistral' (no attention/MLP biases, default rotary, no sliding window
shorter than the sequence) and 'gemma' (Gemma 1: (1 + scale) RMSNorm, embeddings × sqrt(d), tied output,
GeGLU). Gemma 2/3 (logit soft-capping, sandwich norms, local attention) and Qwen2 (q/k/v biases) are refused
by name rather than converted into a different network.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from rest_jax import convert
from rest_jax import tree as tree_lib
from rest_jax.data import vocab as vocab_lib
from rest_jax.data.special_tokens import EOS_ID, PAD_ID
from rest_jax.model.decoder_only import DecoderOnlyConfig

Params = dict[str, Any]
SUPPORTED = ("llama", "mistral", "gemma")


def _rotary(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """`rope_theta` and `rope_llama3_scaling` from `rope_parameters` (transformers >= 5) or `rope_theta` /
    `rope_scaling` (older files); the default rotary and Llama 3.1's 'llama3' rescaling are implemented."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    out = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))), "rope_llama3_scaling": None}
    if kind == "llama3":
        out["rope_llama3_scaling"] = (float(rope["factor"]), float(rope["low_freq_factor"]),
                                      float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif kind != "default":
        raise ValueError(f"{source}: rotary scaling {kind!r} is not implemented (the default and 'llama3' are).")
    return out


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> DecoderOnlyConfig:
    """The `DecoderOnlyConfig` of a HF Llama / Mistral / Gemma `config.json`; other architectures raise."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"{source}: model_type {kind!r} is not a supported decoder-only LM (supported: "
                         f"{', '.join(SUPPORTED)}; Gemma 2/3 and Qwen2 differ in ways this model does not implement).")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise ValueError(f"{source}: {flag}=true; rest_jax's decoder-only model has no biases.")
    if kind == "mistral" and hf.get("sliding_window") and hf["sliding_window"] < hf.get("max_position_embeddings", 0):
        raise ValueError(f"{source}: sliding_window={hf['sliding_window']} (local attention) is not implemented.")
    act_name = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
    if act_name not in convert.HF_TO_ACT:
        raise ValueError(f"{source}: activation {act_name!r} is not implemented (known: {sorted(convert.HF_TO_ACT)}).")
    heads = int(hf["num_attention_heads"])
    gemma = kind == "gemma"
    return DecoderOnlyConfig(
        vocab_size=int(hf["vocab_size"]), emb_dim=int(hf["hidden_size"]), num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        num_layers=int(hf["num_hidden_layers"]), mlp_dim=int(hf["intermediate_size"]),
        mlp_activations=(convert.HF_TO_ACT[act_name], "linear"),
        logits_via_embedding=bool(hf.get("tie_word_embeddings", gemma)), **_rotary(hf, source),
        layer_norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), norm_scale_offset=1.0 if gemma else 0.0,
        scale_embeddings=gemma)


def _names(config: DecoderOnlyConfig) -> list[tuple[str, str, bool]]:
    """(rest_jax name, HF name, transpose) of every parameter."""
    out = [("token_embedder/embedding", "model.embed_tokens.weight", False),
           ("decoder/decoder_norm/scale", "model.norm.weight", False)]
    for i in range(config.num_layers):
        ours, theirs = f"decoder/layers_{i}", f"model.layers.{i}"
        out += [(f"{ours}/pre_self_attention_layer_norm/scale", f"{theirs}.input_layernorm.weight", False),
                (f"{ours}/pre_mlp_layer_norm/scale", f"{theirs}.post_attention_layernorm.weight", False)]
        out += [(f"{ours}/self_attention/{a}/kernel", f"{theirs}.self_attn.{b}_proj.weight", True)
                for a, b in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))]
        out += [(f"{ours}/mlp/{a}/kernel", f"{theirs}.mlp.{b}_proj.weight", True)
                for a, b in (("wi_0", "gate"), ("wi_1", "up"), ("wo", "down"))]
    if not config.logits_via_embedding:
        out.append(("decoder/logits_dense/kernel", "lm_head.weight", True))
    return out


def params_from_hf(state: Mapping[str, Any], config: DecoderOnlyConfig, source: str = "checkpoint") -> Params:
    """rest_jax parameters (nested dict of float32 jax arrays) from a HF state dict; raises naming every tensor
    that is missing or of the wrong shape, and every unused one."""
    expected = convert.expected_param_shapes(config)
    flat, problems, used = {}, [], set()
    for ours, theirs, transpose in _names(config):
        if theirs not in state:
            problems.append(f"missing tensor {theirs} (for {ours}, shape {expected[ours]})")
            continue
        value = np.asarray(state[theirs], np.float32)
        value = value.T if transpose else value
        used.add(theirs)
        if value.shape != expected[ours]:
            problems.append(f"tensor {theirs} has shape {value.shape}, {ours} expects {expected[ours]}")
        flat[ours] = value
    # Tied models may still carry lm_head.weight (a copy of the embedding); rotary caches are not parameters.
    ignorable = {"lm_head.weight"} if config.logits_via_embedding else set()
    problems += [f"unused tensor {k}" for k in state
                 if k not in used and k not in ignorable and not k.endswith("rotary_emb.inv_freq")]
    if problems:
        raise ValueError(f"{source} does not fit DecoderOnlyConfig({config}):\n  " + "\n  ".join(problems))
    return jax.tree_util.tree_map(jnp.asarray, tree_lib.unflatten(flat))


def renumber_vocabulary(params: Params, hf_ids: np.ndarray) -> Params:
    """`params` for token ids renumbered by `hf_ids` (rest id -> tokenizer id, `vocab.HuggingFaceVocabulary`):
    row r of the embedding (and column r of an untied output projection) becomes the tokenizer's row hf_ids[r]."""
    flat = dict(tree_lib.flatten(params))
    rows = flat["token_embedder/embedding"].shape[0]
    if len(hf_ids) > rows:
        raise ValueError(f"The tokenizer has {len(hf_ids)} ids but the model's vocabulary {rows}.")
    # Ids past the tokenizer's (padding rows of the embedding table) keep their place.
    order = np.concatenate([np.asarray(hf_ids), np.arange(len(hf_ids), rows)])
    flat["token_embedder/embedding"] = jnp.asarray(flat["token_embedder/embedding"])[order]
    if "decoder/logits_dense/kernel" in flat:
        flat["decoder/logits_dense/kernel"] = jnp.asarray(flat["decoder/logits_dense/kernel"])[:, order]
    return tree_lib.unflatten(flat)


def load_hf_checkpoint(path: str | os.PathLike, vocab: Any = None) -> tuple[DecoderOnlyConfig, Params]:
    """Loads a HF Llama / Mistral / Gemma folder (config.json + weights) as (DecoderOnlyConfig, params).

    With `vocab` (the folder's tokenizer as a `vocab.HuggingFaceVocabulary`), the token rows are renumbered to
    its ids (pad 0, EOS 1), so the model runs in rest_jax's ReST loop on that vocabulary.
    """
    folder = epath.Path(path)
    hf, config_path = convert.read_hf_config(folder)
    config = config_from_hf(hf, config_path)
    state, source = convert.read_hf_weights(folder)
    params = params_from_hf(state, config, source)
    hf_ids = getattr(vocab, "hf_ids", None)
    return config, params if hf_ids is None else renumber_vocabulary(params, hf_ids)


def load_hf_folder(path: str | os.PathLike) -> tuple[DecoderOnlyConfig, Params]:
    """`load_hf_checkpoint` with the folder's own tokenizer (tokenizer.json), when it has one: the `convert`
    subcommand's reader of decoder-only folders. The run then uses that folder as its vocabulary
    (`run_rest.vocab_path`)."""
    folder = os.fspath(path)
    vocab = vocab_lib.HuggingFaceVocabulary(folder) if vocab_lib.is_hf_tokenizer(folder) else None
    if vocab is None:
        logging.warning("%s has no tokenizer.json: token ids are kept as the checkpoint has them, which only a "
                        "vocabulary with pad 0 and EOS 1 (Gemma's) can use.", folder)
    return load_hf_checkpoint(path, vocab)


# rest_jax activation -> HF `hidden_act` (the inverse of `convert.HF_TO_ACT` on the names HF writes).
_ACT_TO_HF = {"silu": "silu", "gelu": "gelu_pytorch_tanh", "gelu_exact": "gelu", "relu": "relu"}


def hf_config_dict(config: DecoderOnlyConfig, token_ids: Mapping[str, int | None] | None = None) -> dict[str, Any]:
    """The HF `config.json` of a `LlamaForCausalLM` (or, for Gemma's numerics, `GemmaForCausalLM`) equal to
    `DecoderOnly(config)`; `config_from_hf` reads it back to `config`. Raises for configs HF has no class for.

    Args:
      config: The model.
      token_ids: {'pad_token_id', 'bos_token_id', 'eos_token_id'} in the exported ids (default: rest_jax's pad
        0 and EOS 1, no BOS).
    """
    acts = tuple(config.mlp_activations)
    if len(acts) != 2 or acts[1] != "linear" or acts[0] not in _ACT_TO_HF:
        raise ValueError(f"mlp_activations={acts}: HF's gated MLP needs (act, 'linear'), act in {sorted(_ACT_TO_HF)}.")
    if config.query_scale is not None:
        raise ValueError(f"query_scale={config.query_scale}: HF Llama and Gemma scale queries by head_dim**-0.5 only.")
    gemma = config.scale_embeddings or config.norm_scale_offset != 0.0
    if gemma and (config.norm_scale_offset != 1.0 or not config.scale_embeddings or not config.logits_via_embedding
                  or config.rope_llama3_scaling is not None):
        raise ValueError("A Gemma export needs Gemma's numerics together (norm_scale_offset=1, scale_embeddings, "
                         f"tied output, plain rotary); this config mixes them: {config}.")
    out: dict[str, Any] = {
        "architectures": ["GemmaForCausalLM" if gemma else "LlamaForCausalLM"],
        "model_type": "gemma" if gemma else "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.emb_dim, "intermediate_size": config.mlp_dim,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "num_hidden_layers": config.num_layers,
        "rms_norm_eps": config.layer_norm_epsilon, "tie_word_embeddings": bool(config.logits_via_embedding),
        "hidden_activation" if gemma else "hidden_act": _ACT_TO_HF[acts[0]],
        "attention_bias": False, "mlp_bias": False, "max_position_embeddings": 8192, "torch_dtype": "float32",
        "rope_theta": config.rope_theta,
        **(token_ids if token_ids is not None else {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}),
    }
    if config.rope_llama3_scaling is not None:
        factor, low, high, original = config.rope_llama3_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                               "high_freq_factor": high, "original_max_position_embeddings": original}
        out["max_position_embeddings"] = max(out["max_position_embeddings"], int(original * factor))
    return out


def params_to_hf(config: DecoderOnlyConfig, params: Mapping[str, Any],
                 hf_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The HF state dict (float32 numpy) of rest_jax parameters; with `hf_ids` (rest id -> tokenizer id) the
    token rows return to the tokenizer's order (the inverse of `renumber_vocabulary`)."""
    convert.check_params(config, params, "rest_jax parameters")
    flat = {k: np.asarray(v, np.float32) for k, v in tree_lib.flatten(params).items()}
    if hf_ids is not None:
        rows = flat["token_embedder/embedding"].shape[0]
        order = np.concatenate([np.asarray(hf_ids), np.arange(len(hf_ids), rows)])
        embedding = np.empty_like(flat["token_embedder/embedding"])
        embedding[order] = flat["token_embedder/embedding"]
        flat["token_embedder/embedding"] = embedding
        if "decoder/logits_dense/kernel" in flat:
            kernel = np.empty_like(flat["decoder/logits_dense/kernel"])
            kernel[:, order] = flat["decoder/logits_dense/kernel"]
            flat["decoder/logits_dense/kernel"] = kernel
    return {theirs: np.ascontiguousarray(flat[ours].T if transpose else flat[ours])
            for ours, theirs, transpose in _names(config)}


def save_hf_folder(config: DecoderOnlyConfig, params: Mapping[str, Any], path: str | os.PathLike,
                   vocab_path: str | None = None) -> epath.Path:
    """Writes a Hugging Face folder (config.json, model.safetensors and, with `vocab_path`, the tokenizer's
    files) that `AutoModelForCausalLM.from_pretrained` loads as the same network.

    Args:
      config, params: The model.
      path: New, empty, or a previous Hugging Face export of `rest_jax convert` (replaced atomically).
      vocab_path: The Hugging Face tokenizer folder the model's ids were renumbered for (`HuggingFaceVocabulary`):
        its ids are restored, its pad/BOS/EOS written into config.json and its files copied. None: the ids
        are kept (e.g. a SentencePiece vocabulary, already pad 0 / EOS 1).
    """
    hf_ids, token_ids, files = None, None, ()
    if vocab_path is not None:
        if not vocab_lib.is_hf_tokenizer(vocab_path):
            raise ValueError(f"convert.vocab_path={vocab_path} has no tokenizer.json (a Hugging Face tokenizer "
                             "folder is expected).")
        vocab = vocab_lib.HuggingFaceVocabulary(vocab_path)
        hf_ids = np.asarray(vocab.hf_ids)
        token_ids = {"pad_token_id": int(hf_ids[0]), "eos_token_id": int(hf_ids[EOS_ID]),
                     "bos_token_id": int(hf_ids[vocab.prompt_start_id])
                     if vocab.prompt_start_id != PAD_ID else None}
        folder = epath.Path(vocab_path)
        files = tuple(folder / name for name in convert.HF_TOKENIZER_FILES if (folder / name).exists())
    return convert.write_hf_folder(path, hf_config_dict(config, token_ids), params_to_hf(config, params, hf_ids),
                                   files)


for _family in SUPPORTED:
    convert.HF_FAMILY_LOADERS[_family] = load_hf_folder
convert.HF_FAMILY_SAVERS[DecoderOnlyConfig] = save_hf_folder
