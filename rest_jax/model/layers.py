"""Building blocks shared by the encoder-decoder (`t5.py`) and the decoder-only model (`decoder_only.py`).

T5X's layer conventions: bias-free projections with 2-D kernels and logical axes, RMSNorm in float32, gated
MLPs named `wi_0`/`wi_1`/`wo`, float32 parameters whatever the activation dtype, and, in bfloat16, every dot
accumulated in float32 (as TPUs do).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# Large negative bias used for masked attention positions (as in T5X); finite so that a fully masked row
# gives a uniform softmax rather than NaNs.
MASK_VALUE = -1e10


def activation(name: str) -> Callable[[Array], Array]:
    """An MLP activation by T5X's name ('gelu' is the tanh approximation, as T5X and HF's gelu_new)."""
    if name == "linear":
        return lambda x: x
    if name == "gelu":
        # T5X and HF's gelu_new both use the tanh approximation.
        return lambda x: nn.gelu(x, approximate=True)
    if name == "gelu_exact":
        return lambda x: nn.gelu(x, approximate=False)
    try:
        return getattr(nn, name)
    except AttributeError:
        raise ValueError(f"Unknown mlp activation {name!r}.") from None


def param(module: nn.Module, name: str, init: Callable, shape: Sequence[int], axes: Sequence[str]) -> Array:
    """A float32 parameter of `module` with logical axes `axes` (boxed, for the partitioner)."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


_CONTRACT_NN = (((1,), (0,)), ((), ()))  # x^T @ g with x^T written out: the weight gradient
_CONTRACT_COLS = (((1,), (1,)), ((), ()))  # g @ kernel^T: the input gradient


@jax.custom_vjp


def _low_precision_dot(x: Array, kernel: Array) -> Array:
    """x [m, k] (bfloat16) @ kernel [k, n] (float32 parameter, rounded to x's dtype), float32 result.

    Autodiff would run the two backward dots on float32 operands (the cotangent of a float32 result is
    float32), at float32 speed; here every dot reads bfloat16 and accumulates in float32, as on a TPU.
    """
    return jnp.dot(x, kernel.astype(x.dtype), preferred_element_type=jnp.float32)


def _low_precision_dot_fwd(x: Array, kernel: Array) -> tuple[Array, tuple[Array, Array]]:
    return _low_precision_dot(x, kernel), (x, kernel)


def _row_major_transpose(x: Array) -> Array:
    """x.T [k, m] written out in memory. A plain `x.T` is folded into the consuming dot as a transposed
    operand, and XLA:CPU runs a bfloat16 dot whose left operand is transposed (contracting its first axis)
    at ~290 GFLOP/s against ~1,100-1,900 for the untransposed forms (benchmarks/README.md); through a
    3-D transpose the copy is kept and the dot runs untransposed."""
    m, k = x.shape
    return jnp.transpose(x.reshape(m, k, 1), (1, 0, 2)).reshape(k, m)


def _low_precision_dot_bwd(res: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    x, kernel = res
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, kernel.astype(x.dtype), _CONTRACT_COLS, preferred_element_type=jnp.float32)
    dk = jax.lax.dot_general(_row_major_transpose(x), g, _CONTRACT_NN, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)  # the weight gradient stays float32


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def matmul(x: Array, kernel: Array, out_dtype: Any = None) -> Array:
    """`x [..., k] @ kernel [k, n]` as one 2-D matmul in x's dtype, returned in `out_dtype` (default x's).

    Flattening the leading axes first makes the weight gradient a dot over a single contracting axis;
    contracting over (batch, length) instead makes XLA:CPU write the output gradient transposed through
    a slow strided copy before the dot (measured: 2x on the logits projection's backward pass). In bfloat16,
    every dot (forward and backward) accumulates in float32, as TPUs do; XLA:CPU runs a bfloat16 dot with a
    float32 result 3-6x faster than float32, one with a bfloat16 result slower (`benchmarks/README.md`).
    """
    x2d = x.reshape(-1, x.shape[-1])
    if x.dtype == jnp.float32:
        out = jnp.dot(x2d, kernel.astype(jnp.float32))
    else:
        out = _low_precision_dot(x2d, kernel)
    return out.astype(out_dtype or x.dtype).reshape(x.shape[:-1] + (kernel.shape[-1],))


class LayerNorm(nn.Module):
    """T5's RMSNorm: no mean subtraction, no bias, computed in float32.

    `scale_offset` 1.0 is Gemma's variant: the output is multiplied by (1 + scale), the scale starting at 0.
    """

    epsilon: float = 1e-6
    dtype: Any = jnp.float32
    scale_offset: float = 0.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.scale_offset else nn.initializers.ones
        scale = param(self, "scale", init, (x.shape[-1],), ("embed",))
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.epsilon)
        return (y * (scale + self.scale_offset)).astype(self.dtype)


class Dense(nn.Module):
    """A bias-free projection whose kernel is stored 2-D, as T5X's DenseGeneral stores it."""

    features: int
    kernel_axes: Sequence[str]
    kernel_init: Callable = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    dtype: Any = jnp.float32
    out_dtype: Any = None  # default: dtype; the output logits are float32 straight from the accumulator

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), self.kernel_axes)
        return matmul(x.astype(self.dtype), kernel, self.out_dtype)


class Embed(nn.Module):
    """Token embedding shared by encoder, decoder and (when tied) the output projection."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32

    def setup(self):
        self.embedding = param(
            self, "embedding", nn.initializers.normal(stddev=1.0), (self.num_embeddings, self.features),
            ("vocab", "embed"))

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, query: Array) -> Array:
        """Tied output logits, in float32."""
        return matmul(query.astype(self.dtype), self.embedding.T, jnp.float32)


def dot_product_attention(query: Array, key: Array, value: Array, bias: Array, dropout_rng: Array | None,
                           dropout_rate: float, float32_logits: bool, heads_major: bool = False) -> Array:
    """Attention of query [b, q, h, d] (or [b, n, q, h, d] for shared keys) over key/value [b, k, h, d].

    `heads_major` keys/values are [b, h, k, d] (the decoding cache layout, which XLA:CPU reads without a
    transpose per step). No 1/sqrt(d) scaling: T5 folds it into the query initialisation.
    """
    shared = query.ndim == 5
    if float32_logits:
        query, key = query.astype(jnp.float32), key.astype(jnp.float32)
    # float32 accumulation (see `matmul`); the logits stay float32 for the softmax.
    f32 = jnp.float32
    if heads_major:
        logits = jnp.einsum("bqhd,bhkd->bhqk", query, key, preferred_element_type=f32)
    elif shared:
        logits = jnp.einsum("bnqhd,bkhd->bnhqk", query, key, preferred_element_type=f32)
    else:
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=f32)
    logits = logits + bias.astype(logits.dtype)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = weights * keep.astype(weights.dtype) / (1.0 - dropout_rate)
    if heads_major:
        out = jnp.einsum("bhqk,bhkd->bqhd", weights, value, preferred_element_type=f32)
    elif shared:
        out = jnp.einsum("bnhqk,bkhd->bnqhd", weights, value, preferred_element_type=f32)
    else:
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, value, preferred_element_type=f32)
    return out.astype(value.dtype)


class MlpBlock(nn.Module):
    """Feed-forward block; several activations multiply (gated GELU when ('gelu', 'linear'))."""

    mlp_dim: int
    activations: Sequence[str]
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        hidden = None
        for i, name in enumerate(self.activations):
            dense_name = "wi" if len(self.activations) == 1 else f"wi_{i}"
            h = activation(name)(Dense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name=dense_name)(x))
            hidden = h if hidden is None else hidden * h
        # Decoding steps pass [b, n, 1, e]: only the batch and mlp axes are sharded there.
        hidden = nn.with_logical_constraint(hidden, ("batch",) + ("length",) * (hidden.ndim - 2) + ("mlp",))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
        return Dense(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(hidden)


def constrain(x: Array) -> Array:
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


# Decoding caches under bfloat16 activations hold the bfloat16 bits as uint16: XLA:CPU has no bfloat16
# dynamic-update-slice and converts the whole cache to float32 and back around each write (every decode step
# then copied every layer's cache twice: about half of a bfloat16 Grow step on the IWSLT shape), and a bitcast
# inside the loop still made it copy. A uint16 cache carried through the loop is written in place.
def cache_dtype(dtype: Any) -> Any:
    """The dtype a decoding cache of `dtype` activations is stored in."""
    return jnp.uint16 if jnp.dtype(dtype) == jnp.bfloat16 else dtype


def to_cache(x: Array) -> Array:
    """Activations as a cache stores them."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype == jnp.bfloat16 else x


def read_cache(cache: Array) -> Array:
    """The activations a cache (or a slice of one) holds."""
    return jax.lax.bitcast_convert_type(cache, jnp.bfloat16) if cache.dtype == jnp.uint16 else cache


def write_cache(cache: Array, update: Array, start: Sequence[Any]) -> Array:
    """`cache` with the activations `update` (cast to the cache's activation dtype) written at `start`, in place."""
    activation = jnp.bfloat16 if cache.dtype == jnp.uint16 else cache.dtype
    return jax.lax.dynamic_update_slice(cache, to_cache(update.astype(activation)), start)


def padding_bias(key_mask: Array, dtype: Any) -> Array:
    """[b, k] bool -> additive bias [b, 1, 1, k]."""
    return jnp.where(key_mask, 0.0, MASK_VALUE).astype(dtype)[:, None, None, :]


def segment_bias(query_segments: Array, key_segments: Array, dtype: Any) -> Array:
    """[b, q], [b, k] segment ids -> additive bias [b, 1, q, k] masking attention across packed examples."""
    same = query_segments[:, :, None] == key_segments[:, None, :]
    return jnp.where(same, 0.0, MASK_VALUE).astype(dtype)[:, None]
