"""T5 v1.1 / mT5 encoder-decoder in Flax Linen, with T5X's parameter names and logical axes.

The parameter tree is exactly T5X's (`t5x/examples/t5/network.py`): a checkpoint trained here loads in T5X
and vice versa (see `rest_jax.convert`). Two things differ from T5X, both for speed and neither visible in
the parameters:

* Incremental decoding uses an explicit cache (`decode_step`) instead of Flax's mutable `cache` collection,
  so `rest_jax.decoding` is a pure jitted function of explicit state.
* The cross-attention keys/values of each source are computed once (`cross_attention_kv`) and shared by all
  N samples of that source and all decoding steps; T5X recomputes them for every sample at every step.
"""

from __future__ import annotations

import dataclasses
import math
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
class T5Config:
    """Shape and numerics of a T5 encoder-decoder; field names follow T5X's `T5Config`.

    Attributes:
      vocab_size: Size of the (shared) token vocabulary; T5's is 32128, mT5's 250112.
      dtype: Activation dtype ('float32' or 'bfloat16'); parameters are always float32.
      emb_dim: Model width d_model.
      num_heads: Attention heads.
      num_encoder_layers: Encoder blocks.
      num_decoder_layers: Decoder blocks.
      head_dim: Width of one attention head (d_kv).
      mlp_dim: Feed-forward width d_ff.
      mlp_activations: ('gelu', 'linear') is T5 v1.1's gated GELU; ('relu',) is T5 1.0.
      dropout_rate: Dropout after embeddings, attention, feed-forward and on attention weights.
      logits_via_embedding: Tie the output projection to the token embedding (T5 1.0) or not (T5 v1.1).
      float32_attention_logits: Compute attention logits and softmax in float32 under bfloat16.
      relative_attention_num_buckets: Relative position buckets.
      relative_attention_max_distance: Distance beyond which all positions share a bucket.
      layer_norm_epsilon: RMSNorm epsilon.
    """

    vocab_size: int = 32128
    dtype: str = "float32"
    emb_dim: int = 512
    num_heads: int = 6
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    head_dim: int = 64
    mlp_dim: int = 1024
    mlp_activations: Sequence[str] = ("gelu", "linear")
    dropout_rate: float = 0.0
    logits_via_embedding: bool = False
    float32_attention_logits: bool = True
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"T5Config.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}.")

    @property
    def activation_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def replace(self, **changes: Any) -> "T5Config":
        return dataclasses.replace(self, **changes)


def relative_position_bucket(relative_position: Array, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """Maps key-minus-query offsets to buckets, as in T5 (Raffel et al. 2020, Sec. 2.1)."""
    ret = jnp.zeros_like(relative_position)
    n = -relative_position
    if bidirectional:
        num_buckets //= 2
        ret = ret + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # Clamp before the log so that n = 0 never reaches it (the value is discarded there anyway).
    n_large = jnp.maximum(n, max_exact).astype(jnp.float32)
    val_if_large = max_exact + (
        jnp.log(n_large / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
    return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
    """Learned per-head scalar bias for each relative-position bucket, shared by all layers of a stack."""

    num_buckets: int
    max_distance: int
    num_heads: int
    dtype: Any = jnp.float32

    def setup(self):
        self.rel_embedding = layers.param(
            self, "rel_embedding", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
            (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))

    def __call__(self, query_positions: Array, key_positions: Array, bidirectional: bool) -> Array:
        """Returns biases [1, heads, q, k] for 1-D position vectors."""
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(rel, bidirectional, self.num_buckets, self.max_distance)
        values = jnp.take(self.rel_embedding, buckets, axis=1)  # [heads, q, k]
        return values[None].astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """T5X's multi-head attention with 2-D ('embed', 'joined_kv') projection kernels."""

    num_heads: int
    head_dim: int
    out_features: int
    dropout_rate: float = 0.0
    float32_logits: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        inner = self.num_heads * self.head_dim
        kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        depth_scaling = math.sqrt(self.head_dim)

        def query_init(*args):
            return kernel_init(*args) / depth_scaling

        self.query = layers.Dense(inner, ("embed", "joined_kv"), query_init, self.dtype)
        self.key = layers.Dense(inner, ("embed", "joined_kv"), kernel_init, self.dtype)
        self.value = layers.Dense(inner, ("embed", "joined_kv"), kernel_init, self.dtype)
        self.out = layers.Dense(self.out_features, ("joined_kv", "embed"), kernel_init, self.dtype)

    def _split(self, x: Array) -> Array:
        x = x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
        if x.ndim == 4:
            x = nn.with_logical_constraint(x, ("batch", "length", "heads", "kv"))
        return x

    def project_kv(self, inputs_kv: Array) -> tuple[Array, Array]:
        """Keys and values [b, k, heads, head_dim] of `inputs_kv` (cacheable)."""
        return self._split(self.key(inputs_kv)), self._split(self.value(inputs_kv))

    def attend(self, inputs_q: Array, key: Array, value: Array, bias: Array, deterministic: bool,
               heads_major: bool = False) -> Array:
        """Attends `inputs_q` [b, q, e] (or [b, n, q, e] sharing keys across n) to given keys/values."""
        query = self._split(self.query(inputs_q))
        rng = None if deterministic or self.dropout_rate == 0.0 else self.make_rng("dropout")
        x = layers.dot_product_attention(query, key, value, bias, rng, self.dropout_rate, self.float32_logits,
                                   heads_major)
        return self.out(x.reshape(x.shape[:-2] + (self.num_heads * self.head_dim,)))

    def __call__(self, inputs_q: Array, inputs_kv: Array, bias: Array, deterministic: bool = True) -> Array:
        key, value = self.project_kv(inputs_kv)
        return self.attend(inputs_q, key, value, bias, deterministic)


class EncoderLayer(nn.Module):
    config: T5Config

    def setup(self):
        c = self.config
        dt = c.activation_dtype
        self.pre_attention_layer_norm = layers.LayerNorm(c.layer_norm_epsilon, dt)
        self.attention = MultiHeadAttention(c.num_heads, c.head_dim, c.emb_dim, c.dropout_rate,
                                            c.float32_attention_logits, dt)
        self.pre_mlp_layer_norm = layers.LayerNorm(c.layer_norm_epsilon, dt)
        self.mlp = layers.MlpBlock(c.mlp_dim, c.mlp_activations, c.dropout_rate, dt)
        self.dropout = nn.Dropout(c.dropout_rate)

    def __call__(self, x: Array, bias: Array, deterministic: bool) -> Array:
        y = self.pre_attention_layer_norm(x)
        y = self.attention(y, y, bias, deterministic)
        x = layers.constrain(x + self.dropout(y, deterministic=deterministic))
        y = self.mlp(self.pre_mlp_layer_norm(x), deterministic)
        return layers.constrain(x + self.dropout(y, deterministic=deterministic))


class DecoderLayer(nn.Module):
    config: T5Config

    def setup(self):
        c = self.config
        dt = c.activation_dtype

        def attention():
            return MultiHeadAttention(c.num_heads, c.head_dim, c.emb_dim, c.dropout_rate,
                                      c.float32_attention_logits, dt)

        self.pre_self_attention_layer_norm = layers.LayerNorm(c.layer_norm_epsilon, dt)
        self.self_attention = attention()
        self.pre_cross_attention_layer_norm = layers.LayerNorm(c.layer_norm_epsilon, dt)
        self.encoder_decoder_attention = attention()
        self.pre_mlp_layer_norm = layers.LayerNorm(c.layer_norm_epsilon, dt)
        self.mlp = layers.MlpBlock(c.mlp_dim, c.mlp_activations, c.dropout_rate, dt)
        self.dropout = nn.Dropout(c.dropout_rate)

    def _cross_and_mlp(self, x: Array, cross_k: Array, cross_v: Array, cross_bias: Array,
                       deterministic: bool) -> Array:
        y = self.pre_cross_attention_layer_norm(x)
        y = self.encoder_decoder_attention.attend(y, cross_k, cross_v, cross_bias, deterministic)
        x = x + self.dropout(y, deterministic=deterministic)
        y = self.mlp(self.pre_mlp_layer_norm(x), deterministic)
        return x + self.dropout(y, deterministic=deterministic)

    def __call__(self, x: Array, encoded: Array, self_bias: Array, cross_bias: Array,
                 deterministic: bool) -> Array:
        y = self.pre_self_attention_layer_norm(x)
        y = self.self_attention(y, y, self_bias, deterministic)
        x = layers.constrain(x + self.dropout(y, deterministic=deterministic))
        cross_k, cross_v = self.encoder_decoder_attention.project_kv(encoded)
        return layers.constrain(self._cross_and_mlp(x, cross_k, cross_v, cross_bias, deterministic))

    def cross_kv(self, encoded: Array) -> tuple[Array, Array]:
        return self.encoder_decoder_attention.project_kv(encoded)

    def step(self, x: Array, cache: Cache, layer: int, index: Array, self_bias: Array, cross_k: Array,
             cross_v: Array, cross_bias: Array) -> tuple[Array, dict[str, Array]]:
        """One decoding step. x: [b, n, 1, e]; cache k/v: [layers, b*n, h, T, d]; cross_k/v: [b, s, h, d].

        The new key/value is written into the whole-stack cache in place (one dynamic_update_slice); reading
        the layer's keys/values back is a slice, which XLA:CPU copies (one array per layer instead measured
        +6% float32, -3% bfloat16 Grow: benchmarks/README.md).
        """
        b, n = x.shape[:2]
        y = self.pre_self_attention_layer_norm(x).reshape((b * n, 1, x.shape[-1]))
        k, v = self.self_attention.project_kv(y)  # [b*n, 1, h, d]
        start = (layer, 0, 0, index, 0)
        cache = {"k": layers.write_cache(cache["k"], k.transpose(0, 2, 1, 3)[None], start),
                 "v": layers.write_cache(cache["v"], v.transpose(0, 2, 1, 3)[None], start)}
        y = self.self_attention.attend(y, layers.read_cache(cache["k"][layer]), layers.read_cache(cache["v"][layer]),
                                       self_bias, deterministic=True, heads_major=True)
        x = x + y.reshape(x.shape)
        return self._cross_and_mlp(x, cross_k, cross_v, cross_bias, True), cache


class Transformer(nn.Module):
    """T5 encoder-decoder (Raffel et al. 2020) with T5X's parameter tree.

    Token id 0 is padding (and the decoder start token); padded encoder positions are masked out.
    """

    config: T5Config

    def setup(self):
        c = self.config
        dt = c.activation_dtype
        self.token_embedder = layers.Embed(c.vocab_size, c.emb_dim, dt)
        self.encoder = _Stack(c, is_decoder=False, name="encoder")
        self.decoder = _Stack(c, is_decoder=True, name="decoder")

    # -- full-sequence passes ------------------------------------------------------------------------------

    def encode(self, encoder_input_tokens: Array, enable_dropout: bool = False,
               encoder_segment_ids: Array | None = None) -> Array:
        """Encoder output [b, s, emb_dim] (activation dtype).

        `encoder_segment_ids` [b, s] (packed rows, T5X's feature): tokens attend only within their segment.
        """
        x = self.token_embedder(encoder_input_tokens.astype(jnp.int32))
        return self.encoder.encode(x, encoder_input_tokens > 0, not enable_dropout, encoder_segment_ids)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               enable_dropout: bool = False, encoder_segment_ids: Array | None = None,
               decoder_segment_ids: Array | None = None) -> Array:
        """Teacher-forced decoder logits [b, t, vocab] in float32 (segment ids as in `__call__`)."""
        if (encoder_segment_ids is None) != (decoder_segment_ids is None):
            raise ValueError("Packed batches need both encoder_segment_ids and decoder_segment_ids.")
        y = self.token_embedder(decoder_input_tokens.astype(jnp.int32))
        y = self.decoder.decode(y, encoded, encoder_input_tokens > 0, not enable_dropout,
                                encoder_segment_ids, decoder_segment_ids)
        return self._logits(y)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 enable_dropout: bool = False, encoder_segment_ids: Array | None = None,
                 decoder_segment_ids: Array | None = None) -> Array:
        """Teacher-forced logits [b, t, vocab].

        With packing (several examples per row, as seqio's packing feature converter makes them) pass both
        segment ids: attention then stays inside each example. Relative positions need no per-segment
        positions: a segment is contiguous, so key - query offsets within it are those of the unpacked example.
        """
        encoded = self.encode(encoder_input_tokens, enable_dropout, encoder_segment_ids)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout,
                           encoder_segment_ids, decoder_segment_ids)

    def _logits(self, y: Array) -> Array:
        if self.config.logits_via_embedding:
            # T5X and HF rescale tied logits by 1/sqrt(d_model).
            logits = self.token_embedder.attend(y) / jnp.sqrt(y.shape[-1]).astype(jnp.float32)
        else:
            logits = self.decoder.logits_dense(y)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))

    # -- incremental decoding ------------------------------------------------------------------------------

    def cross_attention_kv(self, encoded: Array) -> dict[str, Array]:
        """Cross-attention keys and values of every decoder layer, computed once per source.

        Returns {'k', 'v'}: [layers, b, s, heads, head_dim].
        """
        return self.decoder.cross_kv(encoded)

    def init_cache(self, batch_size: int, max_length: int) -> dict[str, Array]:
        """Empty self-attention cache {'k', 'v'}: [layers, batch, heads, max_length, head_dim], in
        `layers.cache_dtype` (bfloat16 activations as their uint16 bits)."""
        c = self.config
        shape = (c.num_decoder_layers, batch_size, c.num_heads, max_length, c.head_dim)
        zeros = jnp.zeros(shape, layers.cache_dtype(c.activation_dtype))
        return {"k": zeros, "v": zeros}

    def decode_step(self, tokens: Array, index: Array, cache: Cache, cross_kv: Cache,
                    encoder_mask: Array) -> tuple[Array, dict[str, Array]]:
        """Logits of the next token for every row, given the token at position `index`.

        Args:
          tokens: [b * n] int tokens at position `index` (rows grouped by source: row r is source r // n).
          index: scalar int32 position being fed.
          cache: self-attention cache from `init_cache(b * n, T)`.
          cross_kv: from `cross_attention_kv` on the b encoded sources.
          encoder_mask: [b, s] bool, True on real source tokens.

        Returns:
          (logits [b * n, vocab] float32, updated cache).
        """
        b = encoder_mask.shape[0]
        n = tokens.shape[0] // b
        x = self.token_embedder(tokens.astype(jnp.int32)).reshape((b, n, 1, -1))
        y, cache = self.decoder.step(x, index, cache, cross_kv, encoder_mask)
        return self._logits(y.reshape((b * n, 1, -1)))[:, 0], cache


class _Stack(nn.Module):
    """Encoder or decoder stack, named as T5X names them ('layers_i', 'relpos_bias', '*_norm')."""

    config: T5Config
    is_decoder: bool

    def setup(self):
        c = self.config
        dt = c.activation_dtype
        self.relpos_bias = RelativePositionBiases(c.relative_attention_num_buckets,
                                                  c.relative_attention_max_distance, c.num_heads, dt)
        self.dropout = nn.Dropout(c.dropout_rate)
        if self.is_decoder:
            self.layers = [DecoderLayer(c, name=f"layers_{i}") for i in range(c.num_decoder_layers)]
            self.decoder_norm = layers.LayerNorm(c.layer_norm_epsilon, dt)
            if not c.logits_via_embedding:
                self.logits_dense = layers.Dense(c.vocab_size, ("embed", "vocab"), dtype=dt, out_dtype=jnp.float32)
        else:
            self.layers = [EncoderLayer(c, name=f"layers_{i}") for i in range(c.num_encoder_layers)]
            self.encoder_norm = layers.LayerNorm(c.layer_norm_epsilon, dt)

    def encode(self, x: Array, mask: Array, deterministic: bool, segment_ids: Array | None = None) -> Array:
        positions = jnp.arange(x.shape[1])
        bias = self.relpos_bias(positions, positions, bidirectional=True) + layers.padding_bias(mask, x.dtype)
        if segment_ids is not None:
            bias = bias + layers.segment_bias(segment_ids, segment_ids, x.dtype)
        x = layers.constrain(self.dropout(x, deterministic=deterministic))
        for layer in self.layers:
            x = layer(x, bias, deterministic)
        return self.dropout(self.encoder_norm(x), deterministic=deterministic)

    def decode(self, y: Array, encoded: Array, encoder_mask: Array, deterministic: bool,
               encoder_segment_ids: Array | None = None, decoder_segment_ids: Array | None = None) -> Array:
        t = y.shape[1]
        positions = jnp.arange(t)
        causal = jnp.where(positions[None, :] <= positions[:, None], 0.0, layers.MASK_VALUE)[None, None]
        self_bias = self.relpos_bias(positions, positions, bidirectional=False) + causal.astype(y.dtype)
        cross_bias = layers.padding_bias(encoder_mask, y.dtype)
        if decoder_segment_ids is not None:
            self_bias = self_bias + layers.segment_bias(decoder_segment_ids, decoder_segment_ids, y.dtype)
            cross_bias = cross_bias + layers.segment_bias(decoder_segment_ids, encoder_segment_ids, y.dtype)
        y = layers.constrain(self.dropout(y, deterministic=deterministic))
        for layer in self.layers:
            y = layer(y, encoded, self_bias, cross_bias, deterministic)
        return self.dropout(self.decoder_norm(y), deterministic=deterministic)

    def cross_kv(self, encoded: Array) -> dict[str, Array]:
        ks, vs = zip(*(layer.cross_kv(encoded) for layer in self.layers))
        return {"k": jnp.stack(ks), "v": jnp.stack(vs)}

    def step(self, x: Array, index: Array, cache: Cache, cross_kv: Cache,
             encoder_mask: Array) -> tuple[Array, dict[str, Array]]:
        max_length = cache["k"].shape[3]
        key_positions = jnp.arange(max_length)
        query_position = jnp.reshape(index, (1,)).astype(jnp.int32)
        future = jnp.where(key_positions[None, :] <= query_position[:, None], 0.0, layers.MASK_VALUE)[None, None]
        self_bias = self.relpos_bias(query_position, key_positions, bidirectional=False) + future.astype(x.dtype)
        # Shared cross attention: query [b, n, 1, h, d] against keys [b, s, h, d].
        cross_bias = layers.padding_bias(encoder_mask, x.dtype)[:, None]
        for i, layer in enumerate(self.layers):
            x, cache = layer.step(x, cache, i, index, self_bias, cross_kv["k"][i], cross_kv["v"][i], cross_bias)
        return self.decoder_norm(x), dict(cache)


@gin.configurable
def build_model(config: T5Config | None = None) -> Transformer:
    """The model the gin config describes (`T5Config.*` bindings)."""
    return Transformer(config if config is not None else T5Config())


def init_params(model: Transformer, rng: Array, batch_size: int = 1, input_length: int = 8,
                target_length: int = 8) -> Any:
    """Boxed (logically partitioned) parameters of `model`."""
    enc = jnp.ones((batch_size, input_length), jnp.int32)
    dec = jnp.ones((batch_size, target_length), jnp.int32)
    return model.init(rng, enc, dec)["params"]
