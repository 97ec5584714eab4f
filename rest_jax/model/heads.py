"""Value and regression heads on the T5 trunk, plus a sharded batch scorer for regression models.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 5, BVMPO and OAC) trains "separate policy and value
networks": the value network is a full encoder-decoder of the policy's shape whose decoder state at each target
position goes through a scalar head, V(s_t) = head(h_t), trained on Grow data to predict the Monte-Carlo return
of the sequence reward (`rest_jax.losses.value_loss`). `ValueNetwork` is that network; `LMValueNetwork` is the
same on a decoder-only policy's trunk (the policy's prompts, a head on the completion's states).

`RegressionModel` is a T5 encoder (masked mean pooling) or encoder-decoder (the decoder's first step, as
MetricX's `MT5ForRegression` does) with a scalar regression head; it is the model of the `learned` and `metricx`
rewards (`rest_jax.rewards.learned`, `rest_jax.rewards.metricx`).

Parameter trees: both modules subclass `Transformer`, so their trunk parameters have T5X's names and logical
axes exactly (`token_embedder/...`, `encoder/...`, `decoder/...`; `decoder/logits_dense` is never created), plus

    value_head/kernel       [embed, 1]  logical axes ('embed', None)
    value_head/bias         [1]         logical axes (None,)            (when head_bias)
    regression_head/kernel  [embed, 1]  ('embed', None)
    regression_head/bias    [1]         (None,)                         (when head_bias)

`transplant_trunk` copies a policy's (or any T5's) trunk into such a tree, e.g. to start the value network from
the BC policy. `RegressionScorer` runs a `RegressionModel` jitted and sharded on a mesh, over batches padded to
a few bucket shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np

from rest_jax import partitioning
from rest_jax import tree as tree_lib
from rest_jax.model.decoder_only import DecoderOnlyConfig
from rest_jax.model.t5 import T5Config, Transformer
from rest_jax.model.translation_lm import TranslationLM

Array = jax.Array
PyTree = Any

OUTPUTS = ("sigmoid", "linear")
POOLINGS = ("mean", "first_decoder_step")


def _check_choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{what}={value!r}; expected one of {tuple(choices)}.")


class ScalarHead(nn.Module):
    """x [..., embed] -> [...]: one linear unit (logical axes ('embed', None)), optionally a sigmoid.

    The kernel is initialised like T5X's dense layers (fan-in scaled), not to zero: a zero kernel would stop
    every gradient from reaching the trunk at the first step.
    """

    use_bias: bool = True
    output: str = "sigmoid"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        _check_choice("output", self.output, OUTPUTS)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        kernel = self.param("kernel", nn.with_logical_partitioning(init, ("embed", None)),
                            (x.shape[-1], 1), jnp.float32)
        # The head is tiny: computing it in float32 keeps bfloat16 trunks from quantising the value.
        y = jnp.dot(x.astype(jnp.float32), kernel)[..., 0]
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (1,),
                              jnp.float32)
            y = y + bias[0]
        return jax.nn.sigmoid(y) if self.output == "sigmoid" else y


class _Trunk(Transformer):
    """`Transformer` plus the decoder's final hidden states (before the output projection)."""

    def decode_hidden(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
                      enable_dropout: bool = False) -> Array:
        """Teacher-forced decoder states [b, t, emb_dim]: position t has seen decoder inputs 0..t."""
        y = self.token_embedder(decoder_input_tokens.astype(jnp.int32))
        return self.decoder.decode(y, encoded, encoder_input_tokens > 0, not enable_dropout)


class ValueNetwork(_Trunk):
    """Per-token state value V(s_t) of a translation prefix (ReST Sec. 5: BVMPO/OAC value network).

    `__call__(encoder_input_tokens, decoder_input_tokens)` -> float32 [b, t]. With T5X's features
    (`decoder_input_tokens` = targets shifted right, starting with 0), position t holds V(x, y_<t): the value of
    the state in which the policy emits target token y_t, which is the value the Improve losses pair with
    log pi(y_t | x, y_<t). Padding positions get a value too; mask them with `decoder_loss_weights`.

    Attributes:
      config: The T5 shape (usually the policy's).
      output: 'sigmoid' keeps V in [0, 1], the range of ReST's rewards and hence of undiscounted returns;
        'linear' leaves it unbounded (e.g. for discounted or shaped returns).
      head_bias: Give the head a bias.
    """

    output: str = "sigmoid"
    head_bias: bool = True

    def setup(self):
        super().setup()
        _check_choice("ValueNetwork.output", self.output, OUTPUTS)
        self.value_head = ScalarHead(self.head_bias, self.output)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 enable_dropout: bool = False) -> Array:
        encoded = self.encode(encoder_input_tokens, enable_dropout)
        hidden = self.decode_hidden(encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout)
        return self.value_head(hidden)


class RegressionModel(_Trunk):
    """A scalar score of an input sequence: T5 trunk + regression head (for learned rewards and MetricX).

    `__call__(encoder_input_tokens, decoder_input_tokens=None)` -> float32 [b]. The second argument is ignored
    (the signature matches `Transformer`'s so that `rest_jax.trainer.init_train_state` can initialise it).

    Attributes:
      config: The T5 shape.
      pooling: 'mean': masked mean of the encoder outputs over real (non-zero) tokens, encoder only (no decoder
        parameters); 'first_decoder_step': the decoder's state after one step fed the start token 0, attending
        to the whole encoder output, as MetricX's `MT5ForRegression` (google-research/metricx) computes it.
      output: 'sigmoid' for scores in [0, 1]; 'linear' for an unbounded score (MetricX clips it afterwards).
      head_bias: Give the head a bias (MetricX's head, one row of the vocabulary projection, has none).
    """

    pooling: str = "mean"
    output: str = "sigmoid"
    head_bias: bool = True

    def setup(self):
        super().setup()
        _check_choice("RegressionModel.pooling", self.pooling, POOLINGS)
        _check_choice("RegressionModel.output", self.output, OUTPUTS)
        self.regression_head = ScalarHead(self.head_bias, self.output)

    def pooled(self, encoder_input_tokens: Array, enable_dropout: bool = False) -> Array:
        """The vector the head reads, [b, emb_dim]."""
        encoded = self.encode(encoder_input_tokens, enable_dropout)
        if self.pooling == "mean":
            mask = (encoder_input_tokens > 0).astype(jnp.float32)[..., None]
            total = jnp.sum(encoded.astype(jnp.float32) * mask, axis=1)
            return total / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        start = jnp.zeros((encoder_input_tokens.shape[0], 1), jnp.int32)
        return self.decode_hidden(encoded, encoder_input_tokens, start, enable_dropout)[:, 0]

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array | None = None,
                 enable_dropout: bool = False) -> Array:
        del decoder_input_tokens
        return self.regression_head(self.pooled(encoder_input_tokens, enable_dropout))


class LMValueNetwork(TranslationLM):
    """`ValueNetwork` on a decoder-only trunk: V(s_t) [b, t] of the same prompts as a `TranslationLM` policy.

    Column t reads the state that predicts target t (`TranslationLM.completion_states`), i.e. V(x, y_<t) as
    `ValueNetwork` gives it, so the Improve and online losses take either family's values unchanged. Parameters:
    the policy's (T5X decoder-only names; `decoder/logits_dense` is never created) plus `value_head/...`.
    """

    output: str = "sigmoid"
    head_bias: bool = True

    def setup(self):
        super().setup()
        _check_choice("LMValueNetwork.output", self.output, OUTPUTS)
        self.value_head = ScalarHead(self.head_bias, self.output)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 enable_dropout: bool = False) -> Array:
        return self.value_head(self.completion_states(encoder_input_tokens, decoder_input_tokens, enable_dropout))


@gin.configurable(denylist=["policy"])
def build_value_network(policy: nn.Module | None = None, config: T5Config | DecoderOnlyConfig | None = None,
                        output: str = "sigmoid", head_bias: bool = True) -> ValueNetwork | LMValueNetwork:
    """The value network of `policy`'s family from gin (`build_value_network.config = @value/T5Config()` for
    its own shape).

    A decoder-only policy (`TranslationLM`) gets an `LMValueNetwork` with the policy's prompt template, so that
    the value of a prefix reads the same prompt as the policy's log-probability of its next token.

    Args:
      policy: The policy network (`t5.Transformer` or `TranslationLM`; None: an encoder-decoder `T5Config()`).
      config: The value network's shape, of the policy's family; default: the policy's.
      output: 'sigmoid' (V in [0, 1]) or 'linear' (unbounded).
      head_bias: Whether the value head has a bias.
    """
    if isinstance(policy, TranslationLM):
        if config is not None and not isinstance(config, DecoderOnlyConfig):
            raise ValueError(f"build_value_network.config is a {type(config).__name__}, but the policy is "
                             "decoder-only: bind a DecoderOnlyConfig (or nothing, for the policy's shape).")
        return LMValueNetwork(config if config is not None else policy.config, prompt_before=policy.prompt_before,
                              prompt_after=policy.prompt_after, eos_id=policy.eos_id, start_id=policy.start_id,
                              output=output, head_bias=head_bias)
    if config is not None and not isinstance(config, T5Config):
        raise ValueError(f"build_value_network.config is a {type(config).__name__}, but the policy is an "
                         "encoder-decoder: bind a T5Config (or nothing, for the policy's shape).")
    policy_config = policy.config if policy is not None else None
    config = config if config is not None else policy_config if policy_config is not None else T5Config()
    return ValueNetwork(config, output=output, head_bias=head_bias)


def init_params(model: nn.Module, rng: Array, batch_size: int = 1, input_length: int = 8,
                target_length: int = 8) -> PyTree:
    """Boxed (logically partitioned) parameters of a `ValueNetwork` or `RegressionModel`."""
    enc = jnp.ones((batch_size, input_length), jnp.int32)
    dec = jnp.ones((batch_size, target_length), jnp.int32)
    return model.init(rng, enc, dec)["params"]


def abstract_params(model: nn.Module) -> PyTree:
    """Boxed `jax.ShapeDtypeStruct` parameters of `model` (no memory), for shardings and checks."""
    return jax.eval_shape(lambda: init_params(model, jax.random.key(0), input_length=2, target_length=2))


def check_param_tree(expected: PyTree, got: Mapping[str, Any], source: str) -> None:
    """Raises ValueError naming every missing, unexpected or misshapen parameter of `got`."""
    want = {k: tuple(np.shape(v)) for k, v in tree_lib.flatten(nn.unbox(expected)).items()}
    have = {k: tuple(np.shape(v)) for k, v in tree_lib.flatten(got).items()}
    problems = [f"missing {k} {want[k]}" for k in sorted(want) if k not in have]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(have) if k not in want]
    problems += [f"{k}: shape {have[k]}, expected {want[k]}" for k in sorted(want) if k in have and have[k] != want[k]]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"{source} does not fit the model:\n  " + "\n  ".join(shown))


def transplant_trunk(source: Mapping[str, Any], target: Mapping[str, Any],
                     skip: Sequence[str] = ("decoder/logits_dense",), with_heads: bool = False) -> dict[str, Any]:
    """`target` (plain parameters) with every trunk parameter that `source` also has replaced by source's.

    Use to start a value network or reward model from the BC policy (ReST Sec. 5 initialises the value
    network from the policy's pre-training). Heads and `skip` prefixes are left as in `target`; a shared
    parameter with a different shape is an error naming it. `source` may hold more (e.g. `logits_dense`).
    `with_heads` copies the heads too (a model of the same kind, e.g. a reward model refreshed from its last
    version).

    Returns:
      A new nested dict; `target` is not modified.
    """
    src, tgt = tree_lib.flatten(source), tree_lib.flatten(target)
    out = dict(tgt)
    copied = 0
    for name, value in tgt.items():
        is_head = name.startswith(("value_head/", "regression_head/"))
        if (is_head and not with_heads) or any(name.startswith(s) for s in skip):
            continue
        if name not in src:
            continue
        if tuple(np.shape(src[name])) != tuple(np.shape(value)):
            raise ValueError(f"transplant_trunk: {name} has shape {np.shape(src[name])} in the source but "
                             f"{np.shape(value)} in the target model.")
        out[name] = src[name]
        copied += 1
    if copied == 0:
        raise ValueError("transplant_trunk: the source shares no parameter with the target "
                         f"(source has e.g. {sorted(src)[:3]}).")
    return tree_lib.unflatten(out)


def shard_params(model: nn.Module, params: Mapping[str, Any], mesh: jax.sharding.Mesh,
                 rules: Any = None, source: str = "parameters") -> tuple[PyTree, PyTree]:
    """Places plain `params` of `model` on `mesh` by the model's logical axes; returns (params, shardings).

    Checks the tree against the model first, naming mismatched parameters.
    """
    part = partitioning.Partitioner.create(mesh, rules)
    with part.context():
        boxed = abstract_params(model)
    check_param_tree(boxed, params, source)
    return part.place(dict(params), like=boxed)


def _bucket(n: int, minimum: int, maximum: int) -> int:
    """Smallest minimum * 2^k >= n, capped at maximum (few distinct shapes -> few compilations)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return min(size, maximum)


class RegressionScorer:
    """Scores token batches with a `RegressionModel`, jitted with explicit shardings on a mesh.

    Rows are sorted by length, cut into batches of at most `batch_size`, and padded to power-of-two bucket
    shapes (rows: a multiple of the mesh's data-parallel size; length: at least `min_length`, at most the
    longest input), so a Grow run compiles a handful of programs. Parameters are sharded by their logical axes
    (`rest_jax.partitioning`), batches along 'batch'.

    Multi-host: every process must call with the same number of rows (the global batch is the concatenation of
    the hosts' rows); shapes are then fixed to (batch_size, max_length) so that all hosts run the same program.
    """

    def __init__(self, model: RegressionModel, params: Mapping[str, Any], mesh: jax.sharding.Mesh | None = None,
                 rules: Any = None, batch_size: int = 64, min_length: int = 16, max_length: int | None = None,
                 source: str = "parameters"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.mesh = mesh if mesh is not None else partitioning.create_mesh()
        self.rules = rules if rules is not None else partitioning.standard_logical_axis_rules()
        self.params, self.param_shardings = shard_params(model, params, self.mesh, self.rules, source)
        index, shards = partitioning.data_shard_info(self.mesh, self.rules)
        self._host_index, self._num_hosts = index, shards
        batch_axes = nn.logical_to_mesh_axes(("batch",), self.rules)[0]
        batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
        # Rows per host must tile the data-parallel devices of this host.
        self._row_multiple = max(1, math.prod(self.mesh.shape[a] for a in batch_axes) // shards)
        self.batch_size = -(-batch_size // self._row_multiple) * self._row_multiple
        self.min_length = min_length
        self.max_length = max_length
        replicated = partitioning.replicated(self.mesh)

        def apply(p: PyTree, tokens: Array) -> Array:
            return model.apply({"params": p}, tokens)

        self._apply = jax.jit(apply, in_shardings=(self.param_shardings, None), out_shardings=replicated)

    def __call__(self, tokens: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Scores [n] float32 of n token sequences (lists, or an [n, L] 0-padded array)."""
        rows = [np.asarray(t, np.int32) for t in tokens]
        rows = [r[: np.flatnonzero(r).max() + 1] if r.size and np.any(r) else r[:0] for r in rows]
        n = len(rows)
        out = np.zeros(n, np.float32)
        if n == 0:
            return out
        lengths = np.array([len(r) for r in rows])
        order = np.argsort(-lengths, kind="stable")
        fixed = self._num_hosts > 1
        longest = int(lengths.max())
        cap = self.max_length if self.max_length is not None else max(longest, self.min_length)
        if longest > cap:
            raise ValueError(f"an input has {longest} tokens, more than max_length={cap}; truncate it first.")
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            length = cap if fixed else _bucket(int(lengths[idx].max()), self.min_length, cap)
            num_rows = self.batch_size if fixed else _bucket(len(idx), self._row_multiple, self.batch_size)
            batch = np.zeros((num_rows, max(length, 1)), np.int32)
            for j, i in enumerate(idx):
                batch[j, :lengths[i]] = rows[i]
            with partitioning.mesh_context(self.mesh, self.rules):
                device_batch = partitioning.shard_batch(batch, self.mesh, self.rules)
                scores = np.asarray(jax.device_get(self._apply(self.params, device_batch)), np.float32)
            mine = scores[self._host_index * num_rows:(self._host_index + 1) * num_rows]
            out[idx] = mine[:len(idx)]
        return out
