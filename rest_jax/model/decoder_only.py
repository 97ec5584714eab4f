"""Decoder-only Transformer LM (Llama / Gemma family) in Flax Linen, in the style and naming of `t5.py`.

ReST (Gulcehre et al. 2023, arXiv 2308.08998) does not depend on the encoder-decoder; translation research now
mostly prompts or fine-tunes decoder-only LMs (issue 17). This is that model: pre-norm RMSNorm, rotary
positions (RoFormer, Su et al. 2021, in Hugging Face's rotate-half layout), a gated MLP (SwiGLU for Llama,
GeGLU for Gemma), grouped-query attention (Ainslie et al. 2023), tied or untied embeddings, float32 or bfloat16
activations. Parameter names and logical axes are those of T5X's decoder-only network
(`token_embedder`, `decoder/layers_i/{pre_self_attention_layer_norm, self_attention, pre_mlp_layer_norm, mlp}`,
`decoder/decoder_norm`, `decoder/logits_dense`), so the partitioner's rules and the checkpoint code serve both
model families; `rest_jax.convert_lm` reads Hugging Face Llama and Gemma checkpoints into it.

Sequences may be left-padded (prompts of different lengths that must end together before sampling): pass
`token_mask`; positions then count real tokens only, as HF does with `position_ids` from the attention mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from rest_jax.model import layers

Array = jax.Array
Cache = Mapping[str, Array]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecoderOnlyConfig:
    """Shape and numerics of a decoder-only LM; names follow `T5Config` where the two share a meaning.

    Attributes:
      vocab_size: Token vocabulary.
      dtype: Activation dtype ('float32' or 'bfloat16'); parameters are always float32.
      emb_dim: Model width (HF hidden_size).
      num_heads: Query heads.
      num_kv_heads: Key/value heads (grouped-query attention; = num_heads: multi-head, 1: multi-query).
      head_dim: Width of one head.
      num_layers: Blocks.
      mlp_dim: Feed-forward width (HF intermediate_size).
      mlp_activations: ('silu', 'linear') is Llama's SwiGLU, ('gelu', 'linear') Gemma's GeGLU (tanh GELU).
      dropout_rate: Dropout after the embeddings, attention and feed-forward blocks.
      logits_via_embedding: Tie the output projection to the token embedding (Gemma; some Llama sizes).
      rope_theta: Base of the rotary frequencies.
      rope_llama3_scaling: Llama 3.1/3.2's long-context rotary (factor, low_freq_factor, high_freq_factor,
        original_max_position_embeddings): frequencies whose wavelength exceeds the original context are
        divided by `factor`, those in between interpolated; None: plain rotary.
      layer_norm_epsilon: RMSNorm epsilon.
      norm_scale_offset: 1.0 for Gemma's RMSNorm, which multiplies by (1 + scale).
      scale_embeddings: Multiply token embeddings by sqrt(emb_dim) (Gemma).
      query_scale: Factor on the queries before the dot product; None: head_dim ** -0.5.
      float32_attention_logits: Attention logits and softmax in float32 under bfloat16.
    """

    vocab_size: int = 32000
    dtype: str = "float32"
    emb_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    num_layers: int = 8
    mlp_dim: int = 1408
    mlp_activations: Sequence[str] = ("silu", "linear")
    dropout_rate: float = 0.0
    logits_via_embedding: bool = False
    rope_theta: float = 10000.0
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    layer_norm_epsilon: float = 1e-6
    norm_scale_offset: float = 0.0
    scale_embeddings: bool = False
    query_scale: float | None = None
    float32_attention_logits: bool = True

    def __post_init__(self):
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        if self.rope_llama3_scaling is not None:
            object.__setattr__(self, "rope_llama3_scaling", tuple(self.rope_llama3_scaling))
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"DecoderOnlyConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderOnlyConfig: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (each key/value head serves a whole group).")
        if self.head_dim % 2:
            raise ValueError(f"DecoderOnlyConfig.head_dim={self.head_dim}: rotary positions need an even width.")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "DecoderOnlyConfig":
        return dataclasses.replace(self, **changes)


def rotary_frequencies(head_dim: int, theta: float,
                       llama3_scaling: tuple[float, float, float, int] | None = None) -> Array:
    """The d/2 rotary angular frequencies θ^(-2i/d), with Llama 3.1's long-context rescaling if given."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if llama3_scaling is None:
        return inv_freq
    factor, low, high, context = llama3_scaling
    wavelength = 2 * jnp.pi / inv_freq
    smooth = (context / wavelength - low) / (high - low)
    scaled = jnp.where(wavelength > context / low, inv_freq / factor, inv_freq)
    medium = (wavelength >= context / high) & (wavelength <= context / low)
    return jnp.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotary(x: Array, positions: Array, inv_freq: Array) -> Array:
    """Rotary position embedding of x [b, t, h, d] at integer positions [b, t], in HF's rotate-half layout
    (the first and second halves of each head are the two coordinates of d/2 rotating pairs), in float32."""
    d = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, t, d/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def positions_from_mask(token_mask: Array) -> Array:
    """Positions [b, t] that count only real tokens (left padding gets position 0, as in HF)."""
    return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with `num_kv_heads` key/value heads shared by groups of query heads."""

    config: DecoderOnlyConfig

    def setup(self):
        c = self.config
        dt = c.activation_dtype
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.query = layers.Dense(c.num_heads * c.head_dim, ("embed", "joined_kv"), init, dt)
        self.key = layers.Dense(c.num_kv_heads * c.head_dim, ("embed", "joined_kv"), init, dt)
        self.value = layers.Dense(c.num_kv_heads * c.head_dim, ("embed", "joined_kv"), init, dt)
        self.out = layers.Dense(c.emb_dim, ("joined_kv", "embed"), init, dt)

    def _heads(self, x: Array, n: int) -> Array:
        x = x.reshape(x.shape[:-1] + (n, self.config.head_dim))
        return nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))

    def project(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """Rotated queries [b, t, H, d] (scaled), rotated keys and values [b, t, K, d] of x [b, t, e]."""
        c = self.config
        scale = c.query_scale if c.query_scale is not None else c.head_dim ** -0.5
        inv_freq = rotary_frequencies(c.head_dim, c.rope_theta, c.rope_llama3_scaling)
        q = rotary(self._heads(self.query(x), c.num_heads), positions, inv_freq)
        k = rotary(self._heads(self.key(x), c.num_kv_heads), positions, inv_freq)
        return (q * scale).astype(q.dtype), k, self._heads(self.value(x), c.num_kv_heads)

    def attend(self, q: Array, k: Array, v: Array, bias: Array, deterministic: bool,
               heads_major: bool = False) -> Array:
        """q [b, q, H, d] over k/v [b, k, K, d] (or [b, K, k, d] when `heads_major`, the cache layout)."""
        c = self.config
        group = c.num_heads // c.num_kv_heads
        if group > 1:  # each key/value head serves `group` consecutive query heads (HF's repeat_kv)
            axis = 1 if heads_major else 2
            k, v = jnp.repeat(k, group, axis=axis), jnp.repeat(v, group, axis=axis)
        rng = None if deterministic or c.dropout_rate == 0.0 else self.make_rng("dropout")
        x = layers.dot_product_attention(q, k, v, bias, rng, c.dropout_rate, c.float32_attention_logits,
                                         heads_major)
        return self.out(x.reshape(x.shape[:-2] + (c.num_heads * c.head_dim,)))


class DecoderOnlyLayer(nn.Module):
    config: DecoderOnlyConfig

    def setup(self):
        c = self.config
        dt = c.activation_dtype
        self.pre_self_attention_layer_norm = layers.LayerNorm(c.layer_norm_epsilon, dt, c.norm_scale_offset)
        self.self_attention = GroupedQueryAttention(c)
        self.pre_mlp_layer_norm = layers.LayerNorm(c.layer_norm_epsilon, dt, c.norm_scale_offset)
        self.mlp = layers.MlpBlock(c.mlp_dim, c.mlp_activations, c.dropout_rate, dt)
        self.dropout = nn.Dropout(c.dropout_rate)

    def _mlp(self, x: Array, deterministic: bool) -> Array:
        return x + self.dropout(self.mlp(self.pre_mlp_layer_norm(x), deterministic), deterministic=deterministic)

    def __call__(self, x: Array, positions: Array, bias: Array, deterministic: bool) -> tuple[Array, Array, Array]:
        """The layer's output and its keys/values [b, t, K, d] (for a prompt's cache)."""
        q, k, v = self.self_attention.project(self.pre_self_attention_layer_norm(x), positions)
        y = self.self_attention.attend(q, k, v, bias, deterministic)
        x = layers.constrain(x + self.dropout(y, deterministic=deterministic))
        return layers.constrain(self._mlp(x, deterministic)), k, v

    def step(self, x: Array, positions: Array, cache: Cache, layer: int, index: Array,
             bias: Array) -> tuple[Array, dict[str, Array]]:
        """One decoding step. x: [b, 1, e]; cache k/v: [layers, b, K, T, d], written at slot `index` in place."""
        q, k, v = self.self_attention.project(self.pre_self_attention_layer_norm(x), positions)
        start = (layer, 0, 0, index, 0)
        cache = {name: layers.write_cache(cache[name], new.transpose(0, 2, 1, 3)[None], start)
                 for name, new in (("k", k), ("v", v))}
        y = self.self_attention.attend(q, layers.read_cache(cache["k"][layer]), layers.read_cache(cache["v"][layer]),
                                       bias, True, heads_major=True)
        return self._mlp(x + y, True), cache


class _Decoder(nn.Module):
    config: DecoderOnlyConfig

    def setup(self):
        c = self.config
        self.layers = [DecoderOnlyLayer(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.decoder_norm = layers.LayerNorm(c.layer_norm_epsilon, c.activation_dtype, c.norm_scale_offset)
        self.dropout = nn.Dropout(c.dropout_rate)
        if not c.logits_via_embedding:
            self.logits_dense = layers.Dense(c.vocab_size, ("embed", "vocab"), dtype=c.activation_dtype,
                                             out_dtype=jnp.float32)

    def __call__(self, x: Array, positions: Array, bias: Array, deterministic: bool) -> tuple[Array, dict[str, Array]]:
        """Normalised outputs and every layer's keys/values {'k', 'v'}: [layers, b, K, t, d] (the cache layout;
        unused outputs cost nothing under jit)."""
        x = layers.constrain(self.dropout(x, deterministic=deterministic))
        ks, vs = [], []
        for layer in self.layers:
            x, k, v = layer(x, positions, bias, deterministic)
            ks.append(k.transpose(0, 2, 1, 3))
            vs.append(v.transpose(0, 2, 1, 3))
        return self.dropout(self.decoder_norm(x), deterministic=deterministic), {"k": jnp.stack(ks), "v": jnp.stack(vs)}

    def step(self, x: Array, positions: Array, cache: Cache, index: Array,
             bias: Array) -> tuple[Array, dict[str, Array]]:
        for i, layer in enumerate(self.layers):
            x, cache = layer.step(x, positions, cache, i, index, bias)
        return self.decoder_norm(x), dict(cache)


class DecoderOnly(nn.Module):
    """Decoder-only LM with T5X's decoder-only parameter tree; token id 0 is padding unless `token_mask` says."""

    config: DecoderOnlyConfig

    def setup(self):
        c = self.config
        self.token_embedder = layers.Embed(c.vocab_size, c.emb_dim, c.activation_dtype)
        self.decoder = _Decoder(c)

    def _embed(self, tokens: Array) -> Array:
        x = self.token_embedder(tokens.astype(jnp.int32))
        if self.config.scale_embeddings:
            x = x * jnp.asarray(self.config.emb_dim ** 0.5, x.dtype)
        return x

    def _logits(self, y: Array) -> Array:
        if self.config.logits_via_embedding:
            logits = self.token_embedder.attend(y)  # no 1/sqrt(d) rescaling, unlike tied T5
        else:
            logits = self.decoder.logits_dense(y)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    def __call__(self, tokens: Array, token_mask: Array | None = None, segment_ids: Array | None = None,
                 positions: Array | None = None, enable_dropout: bool = False) -> Array:
        """Next-token logits [b, t, vocab] (float32) of every prefix of `tokens` [b, t].

        Args:
          tokens: Token ids.
          token_mask: [b, t] True on real tokens (default: tokens > 0); masked keys are never attended to.
          segment_ids: [b, t] packed rows: attention stays inside each segment (pass `positions` too).
          positions: [b, t] rotary positions (default: real tokens counted from 0, per row).
          enable_dropout: Training-mode dropout (needs a 'dropout' rng).
        """
        y, _ = self._forward(tokens, token_mask, segment_ids, positions, not enable_dropout)
        return self._logits(y)

    def _forward(self, tokens: Array, token_mask: Array | None, segment_ids: Array | None,
                 positions: Array | None, deterministic: bool) -> tuple[Array, dict[str, Array]]:
        token_mask = tokens > 0 if token_mask is None else token_mask.astype(bool)
        if positions is None:
            positions = positions_from_mask(token_mask)
        index = jnp.arange(tokens.shape[1])
        dt = self.config.activation_dtype
        bias = jnp.where(index[None, :] <= index[:, None], 0.0, layers.MASK_VALUE)[None, None].astype(dt)
        bias = bias + layers.padding_bias(token_mask, dt)
        if segment_ids is not None:
            bias = bias + layers.segment_bias(segment_ids, segment_ids, dt)
        return self.decoder(self._embed(tokens), positions, bias, deterministic)

    # -- incremental decoding ------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        """Empty cache {'k', 'v'}: [layers, batch, kv_heads, max_length, head_dim] (`t5`'s layout and dtype, K
        heads)."""
        c = self.config
        zeros = jnp.zeros((c.num_layers, batch_size, c.num_kv_heads, max_length, c.head_dim),
                          layers.cache_dtype(c.activation_dtype))
        return {"k": zeros, "v": zeros}

    def prefill(self, tokens: Array, token_mask: Array, max_length: int) -> tuple[Array, dict[str, Array]]:
        """Runs left-padded prompts [b, P] in one pass: the next-token logits [b, vocab] after each prompt and
        a cache of `max_length` slots whose first P hold the prompts' keys/values (decoding goes on at slot P)."""
        y, kv = self._forward(tokens, token_mask, None, None, True)
        pad = ((0, 0), (0, 0), (0, 0), (0, max_length - tokens.shape[1]), (0, 0))
        cache = {name: jnp.pad(layers.to_cache(x.astype(self.config.activation_dtype)), pad) for name, x in kv.items()}
        return self._logits(y[:, -1:])[:, 0], cache

    def decode_step(self, tokens: Array, positions: Array, index: Array, cache: Cache,
                    key_mask: Array) -> tuple[Array, dict[str, Array]]:
        """Logits of the next token for every row, given the token in cache slot `index`.

        Args:
          tokens: [b] the token at slot `index` of each row.
          positions: [b] its rotary position (slot minus the row's left padding).
          index: scalar int32 cache slot being written.
          cache: from `init_cache(b, T)`, slots < index already filled.
          key_mask: [b, T] True on slots holding real tokens (left padding False); slots > index are
            masked here whatever it says.

        Returns:
          (logits [b, vocab] float32, updated cache).
        """
        slots = jnp.arange(cache["k"].shape[3])
        visible = key_mask.astype(bool) & (slots[None, :] <= index)
        bias = layers.padding_bias(visible, self.config.activation_dtype)  # [b, 1, 1, T]
        x = self._embed(tokens[:, None])
        y, cache = self.decoder.step(x, positions[:, None].astype(jnp.int32), cache, index, bias)
        return self._logits(y)[:, 0], cache


def build_decoder_only(config: DecoderOnlyConfig | None = None) -> DecoderOnly:
    """The decoder-only model the gin config describes (`DecoderOnlyConfig.*` bindings, e.g.
    configs/models/decoder_only/*.gin)."""
    return DecoderOnly(config if config is not None else DecoderOnlyConfig())


def init_params(model: DecoderOnly, rng: Array, batch_size: int = 1, length: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of `model`."""
    return model.init(rng, jnp.ones((batch_size, length), jnp.int32))["params"]
