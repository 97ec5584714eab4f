"""Checkpoint conversion: Hugging Face T5/mT5 <-> rest_jax <-> T5X.

rest_jax's parameter tree is T5X's (`t5x/examples/t5/network.py`), so a T5X `target` tree is used as is and
only the on-disk container differs. Hugging Face stores the same network (Raffel et al. 2020, Sec. 2.1;
T5 v1.1 / mT5 gated-GELU) under other names and with `torch.nn.Linear` weights transposed ([out, in]).

Formats:
  * 'hf': a folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`, or a sharded
    `*.index.json`), as published for T5, T5 v1.1, mT5 and MetricX.
  * 't5x': a T5X model dir, `checkpoint_<step>` dir or msgpack file, in the legacy layout (a `checkpoint`
    msgpack of {'version', 'optimizer': {'target', 'state'}} whose big arrays are TensorStore zarr specs
    pointing at sibling directories) or the Orbax layout (`checkpoint_<step>/state/`, a
    `PyTreeCheckpointHandler` item holding {'target', 'state'}).
    Written (`save_t5x`) in the legacy layout with the arrays inline in the msgpack, which
    `t5x.checkpoints.load_t5x_checkpoint` reads (parameters only, no optimizer state); the T5Config goes
    beside it in `rest_jax_export.json` (T5X keeps shapes in gin).
  * 'rest_jax': a `rest_jax.checkpoints` directory, `<dir>/<step>/state/` holding {'params': ...} with
    the T5Config in `<step>/metadata`; `checkpoints.load_params` and `policy.load_policy` read it.

Every loader returns `(T5Config, params)` with params a plain nested dict of float32 jax arrays with the
structure of `nn.unbox(Transformer(config).init(...)['params'])`, checked against the model so that a
mismatch is reported by parameter name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors
import safetensors.numpy
import tensorstore as ts
from etils import epath
from flax import serialization

# Imported here, not lazily: it registers gin configurables, which must happen before gin locks its config.
from rest_jax import checkpoints
from rest_jax import tree as tree_lib
from rest_jax.gin_utils import GinConfigError
from rest_jax.model.decoder_only import DecoderOnly, DecoderOnlyConfig
from rest_jax.model.t5 import T5Config, Transformer

Params = dict[str, Any]


class OutputPathError(GinConfigError):
    """`output_path` holds something other than a previous export of the same kind; nothing was written.

    A GinConfigError: the command line shows it as one line (exit status 2), like any other bad knob.
    """

# ---------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------


ModelConfig = T5Config | DecoderOnlyConfig


def expected_param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """'/'-joined parameter name -> shape of `Transformer(config)` (or `DecoderOnly(config)`), computed
    abstractly (no memory)."""
    tokens = jnp.ones((1, 2), jnp.int32)
    if isinstance(config, DecoderOnlyConfig):
        init = lambda: DecoderOnly(config).init(jax.random.PRNGKey(0), tokens)  # noqa: E731
    else:
        init = lambda: Transformer(config).init(jax.random.PRNGKey(0), tokens, tokens)  # noqa: E731
    shapes = jax.eval_shape(lambda: nn.unbox(init()["params"]))
    return {name: tuple(x.shape) for name, x in tree_lib.flatten(shapes).items()}


def check_params(config: ModelConfig, params: Mapping[str, Any], source: str = "checkpoint",
                 encoder_only: bool = False, aliases: Mapping[str, str] | None = None) -> None:
    """Raises ValueError naming every parameter that is missing, unexpected or of the wrong shape.

    Args:
      config: the model the parameters must fit.
      params: nested dict of arrays.
      source: what the parameters came from (file or folder), for the message.
      encoder_only: only `token_embedder` and `encoder` are expected (HF `T5EncoderModel`, MetricX-style
        encoders).
      aliases: rest_jax name -> name in the source format, added to the message.
    """
    expected = expected_param_shapes(config)
    if encoder_only:
        expected = {k: v for k, v in expected.items() if not k.startswith("decoder/")}
    got = {name: tuple(np.shape(x)) for name, x in tree_lib.flatten(params).items()}
    aliases = aliases or {}

    def label(name: str) -> str:
        return f"{name} (from {aliases[name]})" if name in aliases else name

    problems = [f"missing parameter {label(n)} of shape {expected[n]}" for n in expected if n not in got]
    problems += [f"unexpected parameter {label(n)} of shape {got[n]}" for n in got if n not in expected]
    problems += [f"parameter {label(n)} has shape {got[n]}, the model expects {expected[n]}"
                 for n in expected if n in got and got[n] != expected[n]]
    if problems and isinstance(config, DecoderOnlyConfig):
        raise ValueError(f"{source} does not fit DecoderOnlyConfig({config}):\n  " + "\n  ".join(problems))
    if problems:
        summary = (f"vocab_size={config.vocab_size}, emb_dim={config.emb_dim}, num_heads={config.num_heads}, "
                   f"head_dim={config.head_dim}, mlp_dim={config.mlp_dim}, "
                   f"mlp_activations={config.mlp_activations}, num_encoder_layers={config.num_encoder_layers}, "
                   f"num_decoder_layers={config.num_decoder_layers}, "
                   f"relative_attention_num_buckets={config.relative_attention_num_buckets}, "
                   f"logits_via_embedding={config.logits_via_embedding}")
        raise ValueError(f"{source} does not fit the model ({summary}):\n  " + "\n  ".join(problems))


def _to_jax(tree: Mapping[str, Any]) -> Params:
    return jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x, dtype=np.float32)), dict(tree))


# Files a Hugging Face export consists of, and the mark in model.safetensors' header that says this tool
# wrote them: only such a folder is replaced; a model from elsewhere with the same two files is not.
_HF_EXPORT_FILES = frozenset({"config.json", "model.safetensors"})
# A decoder-only export also carries its tokenizer's files (copied from the tokenizer folder).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                      "chat_template.jinja")
_EXPORT_MARK = "rest_jax_export"
_KIND_LABELS = {"hf": "Hugging Face", "rest_jax": "rest_jax checkpoint", "t5x": "T5X"}
_T5X_MARK_FILE = "rest_jax_export.json"


def _is_previous_export(path: epath.Path, kind: str, names: set[str]) -> bool:
    """Whether the non-empty folder `path` (entries `names`) holds nothing but a `kind` export of ours."""
    if kind == "hf":
        if not _HF_EXPORT_FILES <= names or names - _HF_EXPORT_FILES - set(HF_TOKENIZER_FILES):
            return False
        try:
            with safetensors.safe_open(os.fspath(path / "model.safetensors"), framework="numpy") as f:
                return (f.metadata() or {}).get(_EXPORT_MARK) == "hf"
        except Exception:  # noqa: BLE001 - an unreadable file is not recognisably ours
            return False
    if kind == "t5x":  # checkpoint_<step> folders and the mark file that says `save_t5x` wrote them
        try:
            marked = json.loads((path / _T5X_MARK_FILE).read_text()).get(_EXPORT_MARK) == "t5x"
        except (OSError, ValueError):
            return False
        return marked and all(n == _T5X_MARK_FILE or _STEP_DIR.match(n) for n in names)
    # rest_jax: step directories only, each written by `save_rest_jax` (its metadata names the source).
    for name in names:
        meta = path / name / "metadata" / "metadata"
        try:
            if not name.isdigit() or "converted_from" not in json.loads(meta.read_text()):
                return False
        except (OSError, ValueError):
            return False
    return True


def check_output_path(path: str | os.PathLike, kind: str) -> bool:
    """Whether writing a `kind` ('hf', 'rest_jax' or 't5x') export to `path` replaces a previous one.

    A missing or empty folder is written into; a folder holding nothing but an earlier export of the
    same kind by this module is replaced (True).

    Raises:
      OutputPathError: anything else (a user's files, a run directory, another kind of model, a file),
        naming the path and what it holds; nothing is written or deleted.
    """
    path = epath.Path(path)
    if not path.exists():
        return False
    if not path.is_dir():
        raise OutputPathError(f"convert.output_path={path} is a file, not a folder; nothing was written. Choose a "
                              "new or empty folder.")
    names = {p.name for p in path.iterdir()}
    if not names:
        return False
    if _is_previous_export(path, kind, names):
        return True
    shown = sorted(names)[:5]
    listing = ", ".join(shown) + (f", ... ({len(names)} entries)" if len(names) > len(shown) else "")
    if kind == "hf" and _HF_EXPORT_FILES <= names:
        listing += "; its model.safetensors was not written by rest_jax convert"
    raise OutputPathError(
        f"convert.output_path={path} is not empty and is not a previous {_KIND_LABELS[kind]} export of "
        f"rest_jax convert (it holds {listing}); nothing was written. Choose a new or empty folder, or "
        "delete this one first if nothing in it is needed.")


@contextlib.contextmanager
def _atomic_dir(path: epath.Path, kind: str) -> Iterator[epath.Path]:
    """A temporary sibling folder to write into, moved to `path` on success (nothing half-written on crash).

    `path` must pass `check_output_path` (checked now and again just before the move), so the only thing
    ever replaced is a previous export of the same kind. On an error the temporary folder is removed.
    """
    replacing = check_output_path(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = epath.Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=os.fspath(path.parent)))
    try:
        yield tmp
        check_output_path(path, kind)  # anything added there meanwhile is not ours to delete
    except BaseException:
        shutil.rmtree(os.fspath(tmp), ignore_errors=True)
        raise
    old = None
    if path.exists():
        # Move the previous output aside first, so that some complete version exists at every moment.
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        os.rename(os.fspath(path), os.fspath(old))
    os.rename(os.fspath(tmp), os.fspath(path))
    if old is not None:
        shutil.rmtree(os.fspath(old))
    if replacing:
        logging.info("convert: replaced the previous %s export in %s.", _KIND_LABELS[kind], path)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face <-> rest_jax
# ---------------------------------------------------------------------------------------------------------

# HF activation name (ACT2FN) -> rest_jax activation name (rest_jax.model.layers.activation).
HF_TO_ACT = {
    "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu_fast": "gelu",  # tanh approximation
    "gelu": "gelu_exact", "gelu_python": "gelu_exact",  # erf
    "relu": "relu", "silu": "silu", "swish": "silu",
}
# rest_jax activation -> HF `feed_forward_proj` suffix; HF maps 'gated-gelu' itself to tanh 'gelu_new'.
ACT_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu_python", "relu": "relu", "silu": "silu"}

_HF_IGNORED = (
    # HF creates it but never uses it (only self-attention has relative position biases).
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)


def _hf_activations(hf: Mapping[str, Any], source: str) -> tuple[str, ...]:
    proj = hf.get("feed_forward_proj", "relu")
    parts = proj.split("-")
    gated = parts[0] == "gated"
    if (len(parts) > 1 and not gated) or len(parts) > 2:
        raise ValueError(f"{source}: unsupported feed_forward_proj {proj!r}.")
    # As HF does: 'gated-gelu' means the tanh approximation, a bare 'gelu' the exact erf form.
    hf_act = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if hf_act not in HF_TO_ACT:
        raise ValueError(f"{source}: feed_forward_proj {proj!r} uses activation {hf_act!r}, which rest_jax "
                         f"does not implement (known: {sorted(HF_TO_ACT)}).")
    act = HF_TO_ACT[hf_act]
    return (act, "linear") if gated else (act,)


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> tuple[T5Config, bool]:
    """T5Config from a HF T5/mT5 `config.json` dict, and whether HF rescales decoder outputs.

    `logits_via_embedding` is provisional: whether the output projection is really tied is decided by the
    weights (`params_from_hf`).
    """
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise ValueError(f"{source}: model_type {model_type!r} is not a T5/mT5 model.")
    required = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers")
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"{source}: missing field(s) {missing}.")
    tie = hf.get("tie_word_embeddings", True) is not False
    if "scale_decoder_outputs" in hf:  # written by transformers >= 5
        scale = bool(hf["scale_decoder_outputs"])
    elif model_type == "mt5":
        # transformers 5 never rescales mT5's decoder output; published mT5/MetricX are untied anyway.
        scale = False
    else:
        # T5 1.0 (tied) rescales by d_model**-0.5; v1.1 sets tie_word_embeddings=false and does not.
        scale = tie
    config = T5Config(
        vocab_size=int(hf["vocab_size"]),
        emb_dim=int(hf["d_model"]),
        num_heads=int(hf["num_heads"]),
        num_encoder_layers=int(hf["num_layers"]),
        num_decoder_layers=int(hf.get("num_decoder_layers") or hf["num_layers"]),
        head_dim=int(hf["d_kv"]),
        mlp_dim=int(hf["d_ff"]),
        mlp_activations=_hf_activations(hf, source),
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        logits_via_embedding=scale,
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
    )
    return config, scale


def hf_config_dict(config: T5Config) -> dict[str, Any]:
    """The HF `config.json` of a `T5ForConditionalGeneration` equal to `Transformer(config)`."""
    acts = tuple(config.mlp_activations)
    if len(acts) == 2 and acts[1] == "linear" and acts[0] in ACT_TO_HF:
        proj = "gated-gelu" if acts[0] == "gelu" else f"gated-{ACT_TO_HF[acts[0]]}"
    elif len(acts) == 1 and acts[0] in ACT_TO_HF:
        proj = ACT_TO_HF[acts[0]]
    else:
        raise ValueError(f"mlp_activations={acts} has no Hugging Face T5 equivalent "
                         f"(supported: (act,) or (act, 'linear') with act in {sorted(ACT_TO_HF)}).")
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.emb_dim,
        "d_kv": config.head_dim,
        "d_ff": config.mlp_dim,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "feed_forward_proj": proj,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "dropout_rate": config.dropout_rate,
        # Tied T5 (1.0) rescales the decoder output by d_model**-0.5 before the shared embedding, as T5X
        # does; transformers >= 5 reads the explicit flag, older versions derive it from the tie.
        "tie_word_embeddings": bool(config.logits_via_embedding),
        "scale_decoder_outputs": bool(config.logits_via_embedding),
        "is_encoder_decoder": True,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "initializer_factor": 1.0,
        "use_cache": True,
    }


def _hf_names(config: T5Config, encoder_only: bool = False) -> Iterator[tuple[str, str, bool]]:
    """(HF name, rest_jax name, transpose) of every parameter except the embedding and output layer."""
    mlp = ["wi"] if len(config.mlp_activations) == 1 else [f"wi_{i}" for i in range(len(config.mlp_activations))]
    attn = {"q": "query", "k": "key", "v": "value", "o": "out"}

    def layer(hf_prefix: str, ours: str, hf_module: str, our_module: str) -> Iterator[tuple[str, str, bool]]:
        for hf_name, our_name in attn.items():
            yield f"{hf_prefix}.{hf_module}.{hf_name}.weight", f"{ours}/{our_module}/{our_name}/kernel", True

    for stack, n_layers in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        if stack == "decoder" and encoder_only:
            continue
        yield (f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
               f"{stack}/relpos_bias/rel_embedding", True)
        for i in range(n_layers):
            hf, ours = f"{stack}.block.{i}", f"{stack}/layers_{i}"
            if stack == "encoder":
                yield f"{hf}.layer.0.layer_norm.weight", f"{ours}/pre_attention_layer_norm/scale", False
                yield from layer(f"{hf}.layer.0", ours, "SelfAttention", "attention")
                ff = 1
            else:
                yield f"{hf}.layer.0.layer_norm.weight", f"{ours}/pre_self_attention_layer_norm/scale", False
                yield from layer(f"{hf}.layer.0", ours, "SelfAttention", "self_attention")
                yield f"{hf}.layer.1.layer_norm.weight", f"{ours}/pre_cross_attention_layer_norm/scale", False
                yield from layer(f"{hf}.layer.1", ours, "EncDecAttention", "encoder_decoder_attention")
                ff = 2
            yield f"{hf}.layer.{ff}.layer_norm.weight", f"{ours}/pre_mlp_layer_norm/scale", False
            for name in mlp + ["wo"]:
                yield f"{hf}.layer.{ff}.DenseReluDense.{name}.weight", f"{ours}/mlp/{name}/kernel", True
        norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
        yield f"{stack}.final_layer_norm.weight", f"{stack}/{norm}/scale", False


def params_from_hf(state: Mapping[str, Any], config: T5Config, scale_decoder_outputs: bool,
                   source: str = "checkpoint") -> tuple[T5Config, Params]:
    """Maps a HF T5/mT5 state dict (numpy-convertible arrays) to rest_jax parameters.

    The output projection is matched to what HF computes, for every combination HF allows:
      * lm_head tied to `shared`, outputs rescaled (T5 1.0): `logits_via_embedding=True`, as T5X.
      * lm_head separate, not rescaled (T5 v1.1, mT5): `logits_dense` = lm_head^T.
      * lm_head separate but rescaled: the d_model**-0.5 factor is folded into `logits_dense`.
      * lm_head tied but not rescaled (transformers >= 5 always ties unless the file has its own lm_head):
        `logits_dense` = shared^T.
    A state dict without decoder weights (HF `T5EncoderModel`) gives only `token_embedder` and `encoder`.

    Returns:
      The config with `logits_via_embedding` (and, for encoders, `num_decoder_layers`) settled, and the
      parameters as a nested dict of float32 jax arrays.
    """
    state = {(k[len("transformer."):] if k.startswith("transformer.") else k): v for k, v in state.items()}
    encoder_only = not any(k.startswith("decoder.") for k in state)
    f32 = {k: np.asarray(v, dtype=np.float32) for k, v in state.items()}
    if "shared.weight" not in f32:
        if "encoder.embed_tokens.weight" not in f32:
            raise ValueError(f"{source}: no token embedding ('shared.weight').")
        f32["shared.weight"] = f32["encoder.embed_tokens.weight"]
    shared = f32.pop("shared.weight")
    for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
        if name in f32 and not np.array_equal(f32.pop(name), shared):
            raise ValueError(f"{source}: {name} differs from shared.weight; rest_jax (like T5X) has a single "
                             "token embedding for encoder and decoder.")
    flat: dict[str, np.ndarray] = {"token_embedder/embedding": shared}
    aliases = {"token_embedder/embedding": "shared.weight"}
    missing = []
    for hf_name, ours, transpose in _hf_names(config, encoder_only):
        if hf_name not in f32:
            missing.append(hf_name)
            continue
        value = f32.pop(hf_name)
        flat[ours] = value.T if transpose and value.ndim == 2 else value
        aliases[ours] = hf_name
    if missing:
        raise ValueError(f"{source}: missing HF parameter(s) for the configured shape "
                         f"(num_layers={config.num_encoder_layers}, num_decoder_layers="
                         f"{config.num_decoder_layers}, mlp_activations={config.mlp_activations}): {missing}")
    if encoder_only:
        f32.pop("lm_head.weight", None)
        config = config.replace(logits_via_embedding=True)
    else:
        lm_head = f32.pop("lm_head.weight", None)
        tied = lm_head is None or np.array_equal(lm_head, shared)
        if tied and scale_decoder_outputs:
            config = config.replace(logits_via_embedding=True)
        else:
            kernel = (shared if lm_head is None else lm_head).T
            if scale_decoder_outputs:
                kernel = kernel * np.float32(config.emb_dim ** -0.5)
            flat["decoder/logits_dense/kernel"] = kernel
            aliases["decoder/logits_dense/kernel"] = "lm_head.weight"
            config = config.replace(logits_via_embedding=False)
    for name in _HF_IGNORED:
        f32.pop(name, None)
    if f32:
        raise ValueError(f"{source}: unexpected HF parameter(s) {sorted(f32)}; rest_jax converts "
                         "T5/mT5 encoder-decoders and encoders only (no classification heads).")
    params = tree_lib.unflatten(flat)
    check_params(config, params, source, encoder_only=encoder_only, aliases=aliases)
    return config, _to_jax(params)


def params_to_hf(config: T5Config, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """rest_jax parameters -> HF `T5ForConditionalGeneration` state dict (float32 numpy)."""
    check_params(config, params, "rest_jax parameters")
    flat = {k: np.asarray(v, dtype=np.float32) for k, v in tree_lib.flatten(params).items()}
    state = {"shared.weight": flat["token_embedder/embedding"]}
    for hf_name, ours, transpose in _hf_names(config):
        state[hf_name] = flat[ours].T if transpose and flat[ours].ndim == 2 else flat[ours]
    if not config.logits_via_embedding:
        state["lm_head.weight"] = flat["decoder/logits_dense/kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def read_hf_config(folder: epath.Path) -> tuple[dict[str, Any], str]:
    """A HF model folder's config.json as a dict, and its path (for messages)."""
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder).")
    try:
        return json.loads(config_path.read_text()), os.fspath(config_path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: invalid JSON: {e}") from e


def read_hf_weights(folder: epath.Path) -> tuple[dict[str, Any], str]:
    """All tensors of a HF checkpoint folder (safetensors preferred), and the file(s) they came from."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            break
    else:
        files = [name for name in ("model.safetensors", "pytorch_model.bin") if (folder / name).exists()][:1]
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors, pytorch_model.bin or *.index.json found.")
    state: dict[str, Any] = {}
    for name in files:
        path = folder / name
        if name.endswith(".safetensors"):
            # The flax framework reads bfloat16, which safetensors' numpy framework cannot.
            with safetensors.safe_open(os.fspath(path), framework="flax") as f:
                for key in f.keys():
                    state[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
        else:
            try:
                import torch  # pylint: disable=g-import-not-at-top
            except ImportError as e:
                raise ImportError(f"{path}: reading pytorch_model.bin needs torch; convert it to safetensors "
                                  "or install torch.") from e
            loaded = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
            state.update({k: v.float().numpy() for k, v in loaded.items()})
    return state, os.fspath(folder / files[0]) if len(files) == 1 else os.fspath(folder)


def load_hf_checkpoint(path: str | os.PathLike) -> tuple[T5Config, Params]:
    """Loads a HF T5 / T5 v1.1 / mT5 / MetricX folder (config.json + weights) as rest_jax parameters.

    Returns:
      (T5Config, params): params is a nested dict of float32 jax arrays with the structure of
      `nn.unbox(Transformer(config).init(...)['params'])` (only `token_embedder` and `encoder` for a
      HF encoder-only checkpoint).
    """
    folder = epath.Path(path)
    hf, config_path = read_hf_config(folder)
    config, scale = config_from_hf(hf, config_path)
    state, source = read_hf_weights(folder)
    return params_from_hf(state, config, scale, source)


def save_hf_checkpoint(config: T5Config, params: Mapping[str, Any], path: str | os.PathLike) -> epath.Path:
    """Writes config.json + model.safetensors loadable by `T5ForConditionalGeneration.from_pretrained`.

    `path` must be new, empty or a previous Hugging Face export of this function, which is replaced
    atomically; anything else raises OutputPathError (see `check_output_path`).
    """
    return write_hf_folder(path, hf_config_dict(config), params_to_hf(config, params))


def write_hf_folder(path: str | os.PathLike, hf_config: Mapping[str, Any], state: Mapping[str, np.ndarray],
                    copy_files: tuple[epath.Path, ...] = ()) -> epath.Path:
    """Writes config.json + model.safetensors (+ `copy_files`, e.g. a tokenizer's) as a Hugging Face folder.

    Marked as this module's export, written to a temporary sibling and moved into place (`_atomic_dir`):
    `path` must be new, empty or a previous Hugging Face export of `convert`.
    """
    out = epath.Path(path)
    with _atomic_dir(out, "hf") as tmp:
        (tmp / "config.json").write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True) + "\n")
        safetensors.numpy.save_file(dict(state), os.fspath(tmp / "model.safetensors"),
                                    metadata={"format": "pt", _EXPORT_MARK: "hf"})
        for file in copy_files:
            shutil.copyfile(os.fspath(file), os.fspath(tmp / file.name))
    return out


# ---------------------------------------------------------------------------------------------------------
# T5X <-> rest_jax
# ---------------------------------------------------------------------------------------------------------

_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")
_PLACEHOLDER = "PLACEHOLDER://"


def _find_t5x_checkpoint(path: epath.Path, step: int | None) -> tuple[str, epath.Path]:
    """('legacy', msgpack file) or ('orbax', state item dir) for a model dir, step dir or file."""
    if path.is_file():
        return "legacy", path
    if not path.is_dir():
        raise FileNotFoundError(f"T5X checkpoint not found: {path}")
    if (path / "state").is_dir():
        return "orbax", path / "state"
    if (path / "checkpoint").is_file():
        return "legacy", path / "checkpoint"
    if (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists():
        return "orbax", path
    steps = {int(m.group(1)): p for p in path.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()}
    if not steps:
        raise FileNotFoundError(f"{path}: no T5X checkpoint (expected checkpoint_<step>/checkpoint, "
                                "checkpoint_<step>/state/ or a msgpack file).")
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise FileNotFoundError(f"{path}: no checkpoint_{step}; available steps: {sorted(steps)}.")
    return _find_t5x_checkpoint(steps[step], None)


def _is_ts_spec(value: Any) -> bool:
    return isinstance(value, Mapping) and "driver" in value and ("kvstore" in value or "path" in value)


def _read_tensorstore(spec: Mapping[str, Any], ckpt_dir: epath.Path, name: str) -> np.ndarray:
    """Reads one zarr array a legacy T5X msgpack refers to, its path relative to the checkpoint dir."""
    spec = json.loads(json.dumps(spec))  # deep copy of plain JSON
    full_metadata = dict(spec.get("metadata", {}))
    # Chunking and compression are read from the array's own .zarray, as T5X does.
    for key in ("chunks", "compressor"):
        spec.get("metadata", {}).pop(key, None)
    kvstore = spec.get("kvstore")
    if isinstance(kvstore, Mapping) and "path" in kvstore:
        rel = kvstore["path"]
    elif "path" in spec:  # tensorstore < 0.1.14 specs
        rel = spec.pop("path")
    else:
        raise ValueError(f"{ckpt_dir}: TensorStore spec of {name} has no path: {spec}")
    full = os.path.join(os.fspath(ckpt_dir), rel)
    if full.startswith("gs://"):
        bucket, _, blob = full[len("gs://"):].partition("/")
        spec["kvstore"] = {"driver": "gcs", "bucket": bucket, "path": blob}
    else:
        # Written with the gfile or gcs drivers and read from a local copy.
        spec["kvstore"] = {"driver": "file", "path": full}
    try:
        array = ts.open(spec, open=True, read=True).result().read().result()
    except Exception as e:  # tensorstore raises ValueError / RuntimeError subclasses
        # Copies made without dot-files lose .zarray; the msgpack spec has the full metadata. Only when chunk
        # files exist: tensorstore would otherwise return the fill value for a missing array.
        folder = epath.Path(full)
        if not ({"chunks", "shape"} <= set(full_metadata) and folder.is_dir() and any(folder.iterdir())):
            raise ValueError(f"{ckpt_dir}: cannot read {name} from {full}: {e}") from e
        spec["metadata"] = full_metadata
        array = ts.open(spec, open=True, read=True, assume_metadata=True).result().read().result()
    array = np.asarray(array)
    if array.dtype == np.uint16:  # version-2 checkpoints stored bfloat16 as raw uint16
        array = array.view(jnp.bfloat16)
    return array


def _resolve_legacy(tree: Any, ckpt_dir: epath.Path, name: str = "") -> Any:
    if _is_ts_spec(tree):
        return _read_tensorstore(tree, ckpt_dir, name)
    if isinstance(tree, str) and tree.startswith(_PLACEHOLDER):
        # Early Orbax-in-T5X layout: a msgpack of placeholders and one zarr dir per array.
        rel = tree[len(_PLACEHOLDER):]
        return _read_tensorstore({"driver": "zarr", "kvstore": {"driver": "file", "path": rel}}, ckpt_dir, name)
    if isinstance(tree, Mapping):
        return {k: _resolve_legacy(v, ckpt_dir, f"{name}/{k}" if name else k) for k, v in tree.items()}
    return tree


def _read_legacy(path: epath.Path) -> dict[str, Any]:
    try:
        contents = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # msgpack raises several unrelated exception types
        raise ValueError(f"{path}: not a T5X msgpack checkpoint ({e}).") from e
    if not isinstance(contents, Mapping):
        raise ValueError(f"{path}: not a T5X msgpack checkpoint (top level is {type(contents).__name__}).")
    if "optimizer" in contents:  # version >= 1: {'version', 'optimizer': state dict}
        state = contents["optimizer"]
    elif "_optimizer" in contents:
        state = contents["_optimizer"]
    else:  # version 0: the state dict itself
        state = contents
    return _resolve_legacy(state, path.parent)


def _read_orbax(path: epath.Path, target_only: bool) -> dict[str, Any]:
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        tree = checkpointer.metadata(os.fspath(path)).item_metadata.tree
    except Exception as e:  # orbax raises various errors for a folder that is not its own
        raise ValueError(f"{path}: not an Orbax PyTree checkpoint ({e}).") from e
    if target_only:
        if "target" not in tree:
            raise ValueError(f"{path}: Orbax checkpoint has no 'target' (top-level keys: {sorted(tree)}).")
        tree = {"target": tree["target"]}
    # Restore as host numpy arrays, whatever mesh the checkpoint was written from.
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    # The metadata tree serves as the restore structure, so nothing is allocated twice.
    args = ocp.args.PyTreeRestore(item=tree, restore_args=restore_args, partial_restore=target_only)
    return checkpointer.restore(os.fspath(path), args=args)


def read_t5x_state(path: str | os.PathLike, step: int | None = None, target_only: bool = False
                   ) -> dict[str, Any]:
    """The T5X train-state dict ({'target': params, 'state': {'step', 'param_states', ...}}) as numpy.

    Args:
      path: a T5X model dir (the latest or `step`-th `checkpoint_<step>` is used), a `checkpoint_<step>`
        dir, its Orbax `state/` item dir, or a legacy msgpack `checkpoint` file. `gs://` works for legacy
        checkpoints and through Orbax.
      step: which step of a model dir; None for the latest.
      target_only: read only the parameters (cheaper for Orbax checkpoints with optimizer state).
    """
    layout, location = _find_t5x_checkpoint(epath.Path(path), step)
    state = _read_legacy(location) if layout == "legacy" else _read_orbax(location, target_only)
    if "target" not in state:
        raise ValueError(f"{location}: T5X checkpoint has no 'target' parameters (keys: {sorted(state)}).")
    return {"target": state["target"]} if target_only else state


def save_t5x(config: T5Config, params: Mapping[str, Any], path: str | os.PathLike, step: int = 0) -> epath.Path:
    """Writes a T5X model dir: `<path>/checkpoint_<step>/checkpoint`, T5X's legacy msgpack state dict.

    {'version': 3, 'optimizer': {'target': params, 'state': {'step': step}}}, the arrays float32 and inline
    (T5X restores inline arrays as they are, TensorStore specs lazily). T5X's `checkpoints.load_t5x_checkpoint`
    reads it; there is no optimizer state (no empty `param_states`, which T5X's flattening would keep as an
    empty node), so a T5X training run starting from it needs `RestoreCheckpointConfig(fallback_to_scratch=True)`.
    `path` must be new, empty or a previous T5X export of this function (`check_output_path`).
    """
    target = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), nn.unbox(dict(params)))
    state = {"version": 3, "optimizer": {"target": target,
                                         "state": {"step": np.asarray(step, np.int64)}}}
    out = epath.Path(path)
    with _atomic_dir(out, "t5x") as tmp:
        (tmp / f"checkpoint_{step}").mkdir()
        (tmp / f"checkpoint_{step}" / "checkpoint").write_bytes(serialization.msgpack_serialize(state))
        (tmp / _T5X_MARK_FILE).write_text(json.dumps(
            {_EXPORT_MARK: "t5x", "step": step, "model_config": config_metadata(config)["model_config"]}, indent=2,
            sort_keys=True) + "\n")
    return out


def config_from_params(params: Mapping[str, Any], **overrides: Any) -> T5Config:
    """A T5Config inferred from parameter shapes; `overrides` (and gin bindings of T5Config) fill the rest.

    Shapes do not tell `relative_attention_max_distance`, `layer_norm_epsilon`, `dtype` or `dropout_rate`
    (T5X keeps them in gin), nor which gated activation is used (T5 v1.1's GELU is assumed); pass them as
    `overrides` or bind `T5Config.*` in gin.
    """
    flat = {k: tuple(np.shape(v)) for k, v in tree_lib.flatten(params).items()}

    def shape(name: str) -> tuple[int, ...]:
        if name not in flat:
            raise ValueError(f"cannot infer the model shape: parameter {name} not found "
                             f"(found e.g. {sorted(flat)[:5]}).")
        return flat[name]

    vocab, emb = shape("token_embedder/embedding")
    heads, buckets = shape("encoder/relpos_bias/rel_embedding")

    def count(stack: str) -> int:
        return len({m.group(1) for k in flat if (m := re.match(rf"{stack}/layers_(\d+)/", k))})

    mlp = "encoder/layers_0/mlp/"
    if f"{mlp}wi/kernel" in flat:
        mlp_dim, acts = shape(f"{mlp}wi/kernel")[1], ("relu",)
    else:
        n_wi = len([k for k in flat if re.match(rf"{mlp}wi_\d+/kernel$", k)])
        mlp_dim, acts = shape(f"{mlp}wi_0/kernel")[1], ("gelu",) + ("linear",) * (n_wi - 1)
    inferred = dict(
        vocab_size=vocab, emb_dim=emb, num_heads=heads, relative_attention_num_buckets=buckets,
        head_dim=shape("encoder/layers_0/attention/query/kernel")[1] // heads, mlp_dim=mlp_dim,
        mlp_activations=acts, num_encoder_layers=count("encoder"), num_decoder_layers=count("decoder"),
        logits_via_embedding="decoder/logits_dense/kernel" not in flat)
    inferred.update(overrides)
    return T5Config(**inferred)


def load_t5x_checkpoint(path: str | os.PathLike, step: int | None = None,
                        config: T5Config | None = None) -> tuple[T5Config, Params]:
    """Imports the parameters (`target`) of a T5X checkpoint, legacy msgpack+TensorStore or Orbax.

    Args:
      path: see `read_t5x_state`.
      step: see `read_t5x_state`.
      config: the model the parameters must fit; None: the T5Config `save_t5x` wrote beside an export of
        ours, else inferred from the shapes (`config_from_params`).

    Returns:
      (T5Config, params) with params as float32 jax arrays (bfloat16 checkpoints are upcast).
    """
    target = read_t5x_state(path, step, target_only=True)["target"]
    target = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), target)
    mark = epath.Path(path) / _T5X_MARK_FILE
    if config is None and mark.exists():
        config = T5Config(**json.loads(mark.read_text())["model_config"])
    config = config if config is not None else config_from_params(target)
    check_params(config, target, f"T5X checkpoint {os.fspath(path)}")
    return config, _to_jax(target)


# ---------------------------------------------------------------------------------------------------------
# rest_jax checkpoints (rest_jax.checkpoints layout)
# ---------------------------------------------------------------------------------------------------------


ARCHITECTURES = {"encoder_decoder": T5Config, "decoder_only": DecoderOnlyConfig}


def config_metadata(config: ModelConfig) -> dict[str, Any]:
    """{'model_config': the config's fields, 'architecture': its family} for a checkpoint's metadata, so that
    `load_rest_jax` (e.g. `convert` to Hugging Face) rebuilds the model without gin."""
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"model_config": fields,
            "architecture": next(a for a, cls in ARCHITECTURES.items() if isinstance(config, cls))}


def config_from_metadata(metadata: Mapping[str, Any], source: str) -> ModelConfig | None:
    """The model config `config_metadata` recorded; None when the metadata has none. Checkpoints written before
    the family was recorded name none: the family is the one whose config has these fields."""
    fields = metadata.get("model_config")
    if not fields:
        return None
    architecture = metadata.get("architecture")
    if architecture is None:  # written before the family was recorded: the family whose fields these are
        architecture = next((a for a, c in ARCHITECTURES.items()
                             if set(fields) <= {f.name for f in dataclasses.fields(c)}), "encoder_decoder")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"{source}: unknown architecture {architecture!r} (known: {sorted(ARCHITECTURES)}).")
    cls = ARCHITECTURES[architecture]
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown} in model_config.")
    return cls(**fields)


def save_rest_jax(config: Any, params: Mapping[str, Any], path: str | os.PathLike, step: int = 0,
                  source: str | None = None) -> epath.Path:
    """Writes a rest_jax checkpoint: `<path>/<step>/state/` = {'params': ...} and its metadata.

    The layout is `rest_jax.checkpoints`', so `checkpoints.load_params(path)` (and `policy.load_policy`,
    Grow and Improve through it) read the converted model; `metadata['model_config']` records the T5Config.
    `path` must be new, empty or a previous rest_jax export of this function, which is replaced; anything
    else (e.g. a run's checkpoints) raises OutputPathError. Locally the export is written to a temporary
    sibling and renamed into place; elsewhere (gs://) Orbax's own per-step rename keeps it whole.
    """
    check_params(config, params, "rest_jax parameters")
    out = epath.Path(path)
    host = jax.tree_util.tree_map(np.asarray, dict(params))
    meta = {**config_metadata(config), "converted_from": source}

    def write(folder: epath.Path) -> None:
        manager = checkpoints.CheckpointManager(folder, keep=None)
        try:
            manager.save(step, {"params": host}, metadata=meta, force=True)
        finally:
            manager.close()

    if "://" not in os.fspath(out):
        with _atomic_dir(out, "rest_jax") as tmp:
            write(tmp)
        return out
    if check_output_path(out, "rest_jax"):
        logging.info("convert: replacing the previous rest_jax checkpoint export in %s.", out)
        for child in out.iterdir():
            child.rmtree()
    write(out)
    return out


def load_rest_jax(path: str | os.PathLike, step: int | None = None) -> tuple[ModelConfig, Params]:
    """Reads the parameters and model config of a rest_jax checkpoint dir (latest step) or step dir.

    The config (either family) comes from the checkpoint's metadata (`config_metadata`, written by training,
    Improve and `save_rest_jax`); without it, from the parameter shapes (`config_from_params`, T5 only).
    """
    folder = epath.Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"rest_jax checkpoint {folder} does not exist.")
    params = checkpoints.load_params(folder, step=step)
    params = jax.tree_util.tree_map(lambda x: np.asarray(x, dtype=np.float32), params)
    step_dir = folder if (folder / "state").exists() else folder / str(
        step if step is not None else checkpoints.CheckpointManager(folder, cleanup_tmp=False).latest_step())
    meta_path = step_dir / "metadata" / "metadata"
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    config = config_from_metadata(metadata, os.fspath(meta_path)) or config_from_params(params)
    check_params(config, params, f"rest_jax checkpoint {step_dir}")
    return config, _to_jax(params)


# ---------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------

# Readers of other Hugging Face families by config.json's model_type (rest_jax.convert_lm registers the
# decoder-only ones, which it reads with this module's helpers); T5 / mT5 otherwise.
HF_FAMILY_LOADERS: dict[str, Callable[[str | os.PathLike], tuple[Any, Params]]] = {}
# Writers of a Hugging Face folder by config class, for the families other than T5 (also convert_lm's):
# saver(config, params, path, vocab_path) -> the folder.
HF_FAMILY_SAVERS: dict[type, Callable[..., epath.Path]] = {}


def _load_hf_any(path: str | os.PathLike) -> tuple[Any, Params]:
    hf, _ = read_hf_config(epath.Path(path))
    return HF_FAMILY_LOADERS.get(hf.get("model_type"), load_hf_checkpoint)(path)


_LOADERS: dict[str, Callable[..., tuple[T5Config, Params]]] = {
    "hf": lambda path, step, config: _load_hf_any(path),
    "t5x": load_t5x_checkpoint,
    "rest_jax": lambda path, step, config: load_rest_jax(path, step),
}
_SAVERS: dict[str, Callable[..., epath.Path]] = {
    "hf": save_hf_checkpoint,
    "t5x": lambda config, params, path: save_t5x(config, params, path),
    "rest_jax": save_rest_jax,
}


@gin.configurable
def convert(source_format: str = "hf", source_path: str | None = None, target_format: str = "rest_jax",
            output_path: str | None = None, step: int | None = None,
            config: T5Config | None = None, vocab_path: str | None = None) -> epath.Path:
    """Converts a checkpoint between formats; the CLI's `convert` subcommand (all knobs from gin).

    Args:
      source_format: 'hf', 't5x' or 'rest_jax'. A Hugging Face Llama / Mistral / Gemma folder reads as a
        decoder-only model (`rest_jax.convert_lm`; its tokenizer's ids renumbered, see there); a decoder-only
        model converts to 'rest_jax' or 'hf'.
      source_path: the HF folder, T5X model/step dir or file, or rest_jax folder to read.
      target_format: 'rest_jax', 'hf' or 't5x'.
      output_path: the folder to write (a checkpoint dir with step 0 for 'rest_jax'): new, empty, or holding
        only a previous export of the same kind by `convert`, which is replaced atomically. Anything else
        (a user's files, a run directory) is refused with OutputPathError before the source is read.
      step: for T5X and rest_jax sources, the step to read (default: latest).
      config: for T5X sources, the model config (`convert.config = @T5Config()`); default: inferred from
        the parameter shapes plus `T5Config.*` gin bindings.
      vocab_path: exporting a decoder-only model to 'hf': the Hugging Face tokenizer folder its token ids were
        renumbered for (the folder it was converted from, or the run's `vocab_path`): the export restores
        the tokenizer's ids and copies its files. Default: the ids are kept and no tokenizer is written.

    Returns:
      The output folder.
    """
    if source_format not in _LOADERS:
        raise ValueError(f"convert.source_format={source_format!r}; choose one of {sorted(_LOADERS)}.")
    if target_format not in _SAVERS:
        raise ValueError(f"convert.target_format={target_format!r}; choose one of {sorted(_SAVERS)}.")
    if not source_path:
        raise ValueError("convert.source_path is required (e.g. --gin.convert.source_path=\"'/path'\").")
    if not output_path:
        raise ValueError("convert.output_path is required (e.g. --gin.convert.output_path=\"'/path'\").")
    # Checked before the (possibly long) read of the source; the saver checks again before it writes.
    replacing = check_output_path(output_path, target_format)
    model_config, params = _LOADERS[source_format](source_path, step, config)
    family_saver = HF_FAMILY_SAVERS.get(type(model_config)) if target_format == "hf" else None
    if vocab_path is not None and family_saver is None:
        raise ValueError("convert.vocab_path restores a Hugging Face tokenizer's ids in a decoder-only model "
                         f"exported to 'hf'; this is a {type(model_config).__name__} exported to {target_format!r}.")
    if target_format == "rest_jax":
        out = save_rest_jax(model_config, params, output_path, source=f"{source_format}:{source_path}")
    elif family_saver is not None:
        out = family_saver(model_config, params, output_path, vocab_path)
    elif isinstance(model_config, T5Config):
        out = _SAVERS[target_format](model_config, params, output_path)
    else:
        raise ValueError(f"convert.target_format={target_format!r}: a {type(model_config).__name__} model "
                         "converts to 'rest_jax' or 'hf' only.")
    n_params = sum(math.prod(np.shape(x)) for x in jax.tree_util.tree_leaves(params))
    replaced = "; replaced the previous export there" if replacing else ""
    print(f"convert: {source_format} {source_path} -> {target_format} {out} ({n_params:,} parameters{replaced})")
    return out
