"""Improve (ReST Sec. 3, Alg. 1): fine-tune the policy on the Grow data above a rising reward threshold.

Each Improve step i filters the Grow store with F(x, y; τ_i) (or a per-source variant, `rest_jax.filters`),
shard by shard as it streams it (`rest_jax.improve_data`: each process reads only its share, never the
whole store), warm-starts from the previous policy with the learning rate decayed by `lr_decay ** k` (k: the
Improve steps the policy has already been through, counted across Grow steps), trains
with the chosen loss (`rest_jax.losses`, BC by default), measures the validation reward every `eval_period` steps,
keeps the parameters with the best validation reward and stops when it has not improved for `patience`
evaluations.

The RL losses the paper compares (ReST Sec. 5; REST.md "Losses the paper compares") need more than the policy:

    loss    value network V(s_t)                          frozen BC policy   trust-region anchor   (η, α)
    gold    -                                             bc_logits (p_MLE)  -                     -
    oac     pre-trained (BVE), then frozen: V_behaviour    -                  -                     -
    bvmpo   pre-trained (BVE), then trained jointly       bc_logits          old_logits            trained

*Anchor.* BVMPO's trust region KL(π_old ‖ π) holds π_old fixed for `anchor_period` updates and then
moves it to the current policy, as V-MPO updates its target network (every 100 learner steps in Song et al.
2019); a fixed anchor would pin the whole Improve step to its starting policy.

*Value network.* A separate `heads.ValueNetwork` of the policy's shape, its trunk copied from the policy that
starts the Improve step (`heads.transplant_trunk`), pre-trained for `value_pretrain_steps` with the shared train
step on the Grow data (behaviour value estimation: per-token Monte-Carlo return of the sequence reward, the
`value` loss). OAC's advantage is "return − V_behaviour(s_t)": V stays the behaviour policy's value, so it is
frozen during Improve (training it on the *filtered* data would make it the value of the filtered set, not of
the behaviour policy). BVMPO is V-MPO, whose value function is trained alongside the policy (V-trace; on one
behaviour policy's data that is the Monte-Carlo regression of `losses.bvmpo_loss`'s value term), so it is
trained jointly with weight `bvmpo_loss.value_loss_coef`. `improve_step.value_training` overrides either.

*Parameters.* Trainable parameters are the policy's T5X tree for BC-like losses and
`{'policy': ..., 'value': ..., 'vmpo': {'vmpo_eta', 'vmpo_alpha'}}` (the parts a loss trains) for the RL ones.
Frozen networks (the BC policy, the anchor, a frozen value net) are placed on the mesh once and reach the
jitted step through the batch (`FROZEN_KEY`), so they take no optimizer state and are never updated. The
saved best checkpoint holds only the policy's parameters, so evaluation and Grow load it unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from rest_jax import checkpoints as ckpt_lib
from rest_jax import evaluate
from rest_jax import gin_utils
from rest_jax import improve_data
from rest_jax import losses
from rest_jax import metrics as metrics_lib
from rest_jax import optim
from rest_jax import partitioning
from rest_jax import policy as policy_lib
from rest_jax import rewards as rewards_lib
from rest_jax import trainer
from rest_jax.data import grow_store as store_lib
from rest_jax.data import tasks
from rest_jax.io import atomic
from rest_jax.io import console
from rest_jax.model import heads
from rest_jax.model import lora as lora_lib
from rest_jax.model import t5

Batch = dict[str, np.ndarray]
PyTree = Any

# Batch entries added by the Improve step: the update count and the step's length (BVMPO's λ annealing reads
# both) and the frozen networks' parameters (already on the mesh; the losses never look at this key).
STEP_KEY = "step"
NUM_STEPS_KEY = losses.NUM_STEPS
FROZEN_KEY = "frozen_params"
VALUE_TRAINING = ("frozen", "joint")
PACKABLE_LOSSES = ("bc", "rwbc")  # per-token sums; the others use whole sequences or frozen networks' rows
MEMORY_KNOBS = ("improve_step.batch_size", "improve_step.feature_lengths")  # named by out-of-memory errors
OPTIMIZER_SCOPE = "improve"  # gin scope of the Improve optimizer and schedule (`improve/learning_rate_schedule.*`)

def numbered(batches: Iterator[Batch], num_steps: int, start_step: int = 0) -> Iterator[Batch]:
    """`batches` with the update count `STEP_KEY` (batch k is consumed by update k) and the run's length."""
    for k, batch in enumerate(batches, start_step):
        yield {**batch, STEP_KEY: np.asarray(k, np.int32), NUM_STEPS_KEY: np.asarray(num_steps, np.int32)}


# ----------------------------------------------------------------------------------------------------
# What each loss needs besides the policy logits.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossNeeds:
    """Inputs an Improve loss reads besides `outputs['logits']` (see `rest_jax.losses`' module docstring).

    Attributes:
      value: `outputs['values']` [B, T] from the value network.
      bc: `outputs['bc_logits']` [B, T, V] from the frozen BC policy.
      anchor: `outputs['old_logits']` [B, T, V] from the trust-region anchor (policy at the start of the step).
      vmpo: `outputs['vmpo_eta']`, `outputs['vmpo_alpha']`: trainable V-MPO multipliers.
      pairs: Batches of preference pairs with the behaviour log-probs (`improve_data.Pairing`).
      value_training: 'frozen' or 'joint', the default way of treating the value net during Improve.
    """

    value: bool = False
    bc: bool = False
    anchor: bool = False
    vmpo: bool = False
    pairs: bool = False
    value_training: str = "frozen"


# ReST Sec. 5: OAC uses the behaviour value V_behaviour; BVMPO learns V with V-MPO (see the module docstring);
# GOLD's per-token reward is the MLE (BC) model's probability, at every Grow step.
_LOSS_NEEDS = {
    "gold": LossNeeds(bc=True),
    "oac": LossNeeds(value=True, value_training="frozen"),
    "bvmpo": LossNeeds(value=True, bc=True, anchor=True, vmpo=True, value_training="joint"),
    "dpo": LossNeeds(pairs=True),
    "ipo": LossNeeds(pairs=True),
}


def loss_needs(loss_name: str) -> LossNeeds:
    """What `loss_name` needs; BC-like losses ('bc', 'rwbc') need only the policy."""
    return _LOSS_NEEDS.get(loss_name, LossNeeds())


def _resolve_value_training(value_training: str | None, needs: LossNeeds, loss_name: str) -> str:
    mode = needs.value_training if value_training is None else value_training
    if mode not in VALUE_TRAINING:
        raise ValueError(f"improve_step.value_training={value_training!r}; expected one of {VALUE_TRAINING} or None "
                         f"(the default of loss {loss_name!r}).")
    return mode


def make_improve_loss_fn(model: Any, loss: Callable[..., Any], value_model: Any = None, *,
                         needs: LossNeeds | None = None, value_training: str = "frozen",
                         anchor_is_bc: bool = False, lora_scale: float | None = None) -> Callable[..., Any]:
    """`(params, batch, rng) -> (loss, aux)` for `trainer.make_train_step`, around an Improve loss.

    With the default `needs` (BC-like losses) `params` is the policy's tree and the loss sees
    `{'logits'}`. Otherwise `params` is `{'policy', ['value'], ['vmpo']}` and the loss also gets what `needs`
    names: `values` from `value_model` (with `params['value']` when `value_training` is 'joint', else with
    the frozen `batch[FROZEN_KEY]['value']` under stop_gradient), `bc_logits` / `old_logits` from the frozen
    policies `batch[FROZEN_KEY]['bc']` / `['anchor']` (no dropout, no gradient; `anchor_is_bc` reuses the BC
    logits when the two are the same network), and the V-MPO multipliers `params['vmpo']`. The update count
    `batch[STEP_KEY]` (0 when absent) is passed as the loss's `step` (BVMPO's λ annealing). With `lora_scale`,
    `params` are low-rank adapters (`rest_jax.model.lora`) of the frozen `batch[FROZEN_KEY]['base']` policy.
    """
    needs = needs if needs is not None else LossNeeds()
    composite = needs.value or needs.vmpo
    if needs.value and value_model is None:
        raise ValueError("make_improve_loss_fn: the loss needs a value network; pass value_model.")
    if value_training not in VALUE_TRAINING:
        raise ValueError(f"value_training={value_training!r}; expected one of {VALUE_TRAINING}.")

    def loss_fn(params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
        frozen = batch.get(FROZEN_KEY, {})

        def need_frozen(name: str) -> PyTree:
            if name not in frozen:
                raise KeyError(f"Improve loss needs the frozen {name!r} parameters in batch[{FROZEN_KEY!r}] "
                               f"(has {sorted(frozen)}).")
            return frozen[name]

        # Packed rows (improve_step.pack) carry segment ids: attention stays inside each example.
        segments = {k: batch[k] for k in ("encoder_segment_ids", "decoder_segment_ids") if k in batch}

        def frozen_apply(net: Any, p: PyTree) -> jax.Array:
            return jax.lax.stop_gradient(net.apply({"params": p}, enc, dec, enable_dropout=False, **segments))

        if lora_scale is not None:
            policy_params = lora_lib.merge(need_frozen("base"), params, lora_scale)
        else:
            policy_params = params["policy"] if composite else params
        logits = model.apply({"params": policy_params}, enc, dec, enable_dropout=rng is not None,
                             rngs=None if rng is None else {"dropout": rng}, **segments)
        outputs = {"logits": logits}
        if needs.value:
            if value_training == "joint":
                # Its own dropout stream: the value net must not reuse the policy's masks.
                outputs["values"] = value_model.apply(
                    {"params": params["value"]}, enc, dec, enable_dropout=rng is not None,
                    rngs=None if rng is None else {"dropout": jax.random.fold_in(rng, 1)})
            else:
                outputs["values"] = frozen_apply(value_model, need_frozen("value"))
        if needs.bc or (needs.anchor and anchor_is_bc):
            outputs["bc_logits"] = frozen_apply(model, need_frozen("bc"))
        if needs.anchor:
            outputs["old_logits"] = outputs["bc_logits"] if anchor_is_bc else frozen_apply(model, need_frozen("anchor"))
        if needs.vmpo:
            outputs.update(params["vmpo"])
        value, metrics = loss(batch, outputs, step=batch.get(STEP_KEY, 0))
        weights = batch["decoder_loss_weights"]
        metrics = dict(metrics)
        metrics.setdefault("num_tokens", jnp.sum(weights))
        metrics["accuracy"] = jnp.sum((jnp.argmax(logits, -1) == batch["decoder_target_tokens"]) * weights) / \
            jnp.maximum(jnp.sum(weights), 1.0)
        metrics.pop("loss", None)
        return value, metrics

    return loss_fn


# ----------------------------------------------------------------------------------------------------
# Placement on the mesh.
# ----------------------------------------------------------------------------------------------------


def _abstract(model: Any, mesh: Any, rules: Any) -> PyTree:
    with partitioning.mesh_context(mesh, rules):
        return heads.abstract_params(model)


def _place(model: Any, params: PyTree, mesh: Any, rules: Any, what: str) -> PyTree:
    """Plain `params` of `model` on the mesh, sharded by its logical axes (checked against the model)."""
    return heads.shard_params(model, params, mesh, rules, what)[0]


def _load_policy_params(model: Any, checkpoint: str, mesh: Any, rules: Any) -> PyTree:
    target = nn.unbox(_abstract(model, mesh, rules))
    return ckpt_lib.load_params(checkpoint, target=target)


# ----------------------------------------------------------------------------------------------------
# Value network: behaviour value estimation on the Grow data.
# ----------------------------------------------------------------------------------------------------


def _value_mse_fn(value_model: Any, mesh: Any, rules: Any) -> Callable[[PyTree, Sequence[Batch]], float]:
    """`(params, batches) -> MSE` over this process's blocks of global batches, with one jitted program."""
    value_loss = losses.get_loss("value")

    @jax.jit
    def sums(p: PyTree, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        values = value_model.apply({"params": p}, batch["encoder_input_tokens"], batch["decoder_input_tokens"])
        mse, metrics = value_loss(batch, {"values": values})
        return mse * metrics["num_tokens"], metrics["num_tokens"]

    def mse(params: PyTree, batches: Sequence[Batch]) -> float:
        total = count = 0.0
        with partitioning.mesh_context(mesh, rules):
            for batch in batches:
                s, n = jax.device_get(sums(params, partitioning.shard_batch(batch, mesh, rules)))
                total, count = total + float(s), count + float(n)
        return total / max(count, 1.0)

    return mse


def _measured_batches(data: improve_data.GrowData, selection: improve_data.Selection,
                      counts: improve_data.Counts, eval_rows: int, batch_size: int,
                      feature_lengths: Mapping[str, int], seed: int, shard: tuple[int, int]) -> list[Batch]:
    """This process's blocks of the fixed rows the value MSE is measured on: the first `eval_rows` (rounded
    to whole batches, at most the kept rows) of their own stream, cut into batches of `batch_size` rows."""
    size = max(1, min(eval_rows, counts.num_kept) // batch_size) * batch_size
    block = next(improve_data.stream_batches(data, selection, counts, size, feature_lengths, seed, shard))
    local = batch_size // shard[1]
    return [{k: v[i:i + local] for k, v in block.items()} for i in range(0, size // shard[1], local)]


@gin.configurable(denylist=["value_model", "params", "data", "num_steps", "feature_lengths", "batch_size", "seed",
                            "mesh", "rules", "out_dir", "selection"])
def pretrain_value_network(value_model: Any, params: PyTree, data: improve_data.GrowData, num_steps: int,
                           feature_lengths: Mapping[str, int], batch_size: int, seed: int = 0, mesh: Any = None,
                           rules: Any = None, out_dir: str | None = None, *, optimizer: optim.Optimizer | None = None,
                           selection: improve_data.Selection | None = None, eval_rows: int = 1024,
                           log_period: int = 50) -> tuple[PyTree, dict[str, Any]]:
    """Behaviour value estimation (ReST Sec. 5, BVMPO/OAC): fit V(s_t) to the per-token MC return on Grow data.

    Trains `value_model` from `params` for `num_steps` with the shared train step and loop
    (`losses.make_value_loss_fn`, the registered `value` loss) on shuffled batches of `data`.

    Args:
      value_model: A `heads.ValueNetwork`.
      params: Its starting parameters (usually the policy's trunk + a fresh head: `heads.transplant_trunk`).
      data: The Grow data (`improve_data.GrowData`), streamed.
      num_steps: Train steps (0: return `params` placed on the mesh, measured only).
      feature_lengths, batch_size: Batch shape (rows: a multiple of the mesh's data-parallel size); the
        Improve step passes its own.
      seed: Data order, dropout, and the rows measured.
      mesh, rules: Device mesh and logical axis rules (defaults: gin).
      out_dir: TensorBoard scalars go to `out_dir/value_pretrain` when given.
      optimizer: Default `optim.create_optimizer()` (gin-configured, not decayed like the Improve policy's).
      selection: The rows of `data` to fit (default: every row, unfiltered: the behaviour policy's data).
      eval_rows: Rows (a fixed random sample, rounded to whole batches) over which the MSE is reported.
      log_period: Steps between logged scalars.

    Returns:
      (trained parameters on the mesh, summary with `steps`, `rows`, `initial_mse`, `final_mse`).
    """
    mesh = mesh if mesh is not None else partitioning.create_mesh()
    rules = rules if rules is not None else partitioning.standard_logical_axis_rules()
    optimizer = optimizer if optimizer is not None else optim.create_optimizer()
    selection = selection if selection is not None else improve_data.Selection(0, method=None)
    counts = improve_data.filter_counts(data, selection)
    n = counts.num_kept
    if n == 0:
        raise ValueError("pretrain_value_network: no Grow rows to train the value network on.")
    shard = partitioning.data_shard_info(mesh, rules)
    placed = _place(value_model, params, mesh, rules, "value-network parameters")
    state, shardings = trainer.state_from_params(placed, optimizer, _abstract(value_model, mesh, rules),
                                                 partitioning.Partitioner.create(mesh, rules))
    measured = _measured_batches(data, selection, counts, eval_rows, batch_size, feature_lengths, seed + 0x76, shard)
    mse_fn = _value_mse_fn(value_model, mesh, rules)
    mse = lambda p: mse_fn(p, measured)  # noqa: E731
    initial = mse(state.params)
    summary: dict[str, Any] = {"steps": int(num_steps), "rows": int(n), "initial_mse": initial}
    if num_steps > 0:
        step_fn = trainer.make_train_step(optimizer, losses.make_value_loss_fn(value_model), mesh=mesh, rules=rules,
                                          state_shardings=shardings, dropout_seed=seed)
        shard_fn = lambda b: partitioning.shard_batch(b, mesh, rules)  # noqa: E731
        batches = improve_data.stream_batches(data, selection, counts, batch_size, feature_lengths, seed, shard)
        writer = metrics_lib.MetricWriter(out_dir, "value_pretrain") if out_dir else None
        try:
            with trainer.error_advice(memory_knobs=MEMORY_KNOBS,
                                      last_checkpoint=lambda: "none (value pre-training saves no checkpoints)"):
                state, loop = trainer.train_loop(state, batches, step_fn, num_steps, shard_fn=shard_fn,
                                                 hooks=[trainer.LogMetrics(writer, log_period)],
                                                 stage="value_pretrain")
        finally:
            if writer is not None:
                writer.close()
        summary["train_value_mse"] = loop.get("value_mse")
    summary["final_mse"] = mse(state.params)
    logging.info("Value pre-training: MSE to the Monte-Carlo returns %.5f -> %.5f after %d steps on %d rows.",
                 initial, summary["final_mse"], num_steps, n)
    return state.params, summary


def _value_network(policy_params: PyTree, value_model: Any, data: improve_data.GrowData,
                   selection: improve_data.Selection, out_dir: str, *, num_steps: int,
                   feature_lengths: Mapping[str, int], batch_size: int, seed: int, mesh: Any,
                   rules: Any) -> tuple[PyTree, dict[str, Any]]:
    """The pre-trained value net of this Improve step: from `out_dir/value` if a run already made it."""
    value_dir = os.path.join(out_dir, "value")
    ckpt_dir, summary_path = os.path.join(value_dir, "checkpoints"), os.path.join(value_dir, "pretrain.json")
    abstract = _abstract(value_model, mesh, rules)
    if epath.Path(summary_path).exists():
        summary = atomic.read_json(summary_path)
        if summary.get("steps") == num_steps:
            logging.info("Improve: reusing the pre-trained value network in %s.", ckpt_dir)
            params = ckpt_lib.load_params(ckpt_dir, target=nn.unbox(abstract))
            return _place(value_model, params, mesh, rules, f"value network {ckpt_dir}"), dict(summary, reused=True)
    # Initialised directly in its shards, then the policy's trunk copied in (ReST Sec. 5: value from the policy).
    enc = dec = jnp.ones((1, 2), jnp.int32)
    fresh, _ = partitioning.Partitioner.create(mesh, rules).init(lambda k: value_model.init(k, enc, dec)["params"],
                                                          jax.random.key(seed))
    start = heads.transplant_trunk(policy_params, fresh)
    params, summary = pretrain_value_network(value_model, start, data, num_steps, feature_lengths, batch_size, seed,
                                             mesh, rules, out_dir, selection=selection)
    manager = ckpt_lib.CheckpointManager(ckpt_dir, keep=1, period=1)
    manager.save(max(num_steps, 1), {"params": params}, force=True, metadata={"value_pretrain": summary})
    manager.close()
    atomic.write_json(summary_path, summary)  # written last: its presence says the checkpoint is whole
    return params, summary


# ----------------------------------------------------------------------------------------------------
# The Improve step.
# ----------------------------------------------------------------------------------------------------


def _check_arguments(value_pretrain_data: str, reference_fraction: float | None, include_references: bool,
                     anchor_period: int | None, patience: int, needs: LossNeeds) -> None:
    if value_pretrain_data not in ("grow", "filtered"):
        raise ValueError(f"improve_step.value_pretrain_data={value_pretrain_data!r}; expected 'grow' or 'filtered'.")
    if reference_fraction is not None and reference_fraction > 0 and not include_references:
        raise ValueError(f"improve_step.reference_fraction={reference_fraction} needs "
                         "improve_step.include_references=True.")
    if anchor_period is not None and anchor_period < 1:
        raise ValueError(f"improve_step.anchor_period={anchor_period}; expected a positive number of updates or None.")
    if patience < 1:
        raise ValueError(f"improve_step.patience={patience}; expected at least 1 evaluation.")
    if needs.pairs and reference_fraction is not None:
        raise ValueError(f"improve_step.reference_fraction={reference_fraction}: a preference loss trains on pairs of "
                         "one source's rows, not on a mix of references and samples; set it to None.")


def _check_lora(lora: lora_lib.LoraConfig, composite: bool, policy: policy_lib.Policy) -> None:
    if composite:
        raise ValueError("improve_step.lora: the losses with a value network or V-MPO multipliers (oac, bvmpo) train "
                         "the whole policy; use LoRA with bc, rwbc, gold, dpo or ipo.")
    if policy.checkpoint is None:
        raise ValueError("improve_step.lora: the start policy must be a checkpoint's (policy.load_policy): the "
                         "adapters are saved with the path of the checkpoint they adapt.")


def _frozen_policies(model: Any, policy_params: PyTree, bc_policy: PyTree | str | None, needs: LossNeeds,
                     moving_anchor: bool, mesh: Any, rules: Any) -> tuple[dict[str, Any], bool]:
    """The fixed policies a loss reads: BVMPO's/GOLD's BC policy and BVMPO's trust-region anchor.

    Returns ({'bc': ..., 'anchor': ...} as the loss needs them, whether the anchor is the BC policy itself).
    """
    frozen: dict[str, Any] = {}
    if not (needs.bc or needs.anchor):
        return frozen, False
    if bc_policy is None:
        frozen["bc"] = policy_params
        if moving_anchor:  # The anchor is the BC policy until it first moves; then it needs its own parameters.
            frozen["anchor"] = policy_params
        return frozen, needs.anchor and not moving_anchor
    bc_params = _load_policy_params(model, bc_policy, mesh, rules) if isinstance(bc_policy, str) else bc_policy
    what = f"the BC policy {bc_policy}" if isinstance(bc_policy, str) else "the BC policy"
    frozen["bc"] = _place(model, bc_params, mesh, rules, what)
    if needs.anchor:
        frozen["anchor"] = policy_params
    return frozen, False


@gin.configurable(denylist=["policy", "data", "out_dir", "improve_index", "validation", "bc_policy",
                            "prior_improves"])
def improve_step(policy: policy_lib.Policy, data: improve_data.GrowData, out_dir: str, improve_index: int,
                 validation: tuple[Sequence[str], Sequence[str]], *, reward: Any, prior_improves: int | None = None,
                 loss_name: str = "bc", filter_method: str = "threshold", include_references: bool = True,
                 max_per_source: int | None = None, lr_decay: float = 0.5, num_steps: int = 1000,
                 batch_size: int = 64, feature_lengths: Mapping[str, int] | None = None, eval_period: int = 100,
                 patience: int = 3, validation_method: str = "greedy", seed: int = 0,
                 mesh: Any = None, bc_policy: PyTree | str | None = None, value_pretrain_steps: int = 500,
                 value_pretrain_data: str = "grow", value_training: str | None = None,
                 vmpo_init_eta: float = 1.0, vmpo_init_alpha: float = 1.0,
                 anchor_period: int | None = 100,
                 reference_fraction: float | None = None, pack: bool = False,
                 lora: lora_lib.LoraConfig | None = None,
                 heldout_guard: evaluate.HeldoutGuard | None = None) -> tuple[Any, dict[str, Any]]:
    """One Improve step on Grow data; returns (best policy params, result).

    Args:
      policy: The previous policy (warm start; ReST Sec. 3 fine-tunes "from the previous policy").
      data: The Grow data (`improve_data.GrowData.open(store_dirs)`), streamed: never loaded whole.
      out_dir: Stage directory; the best checkpoint goes to `out_dir/checkpoints`, TensorBoard to `out_dir`,
        a pre-trained value network (RL losses) to `out_dir/value`.
      improve_index: i; picks τ_i (or p_i, γ_i, k_i) from the filter's gin schedule; i = 0 keeps all.
      validation: (sources, references) on which the validation reward is measured.
      reward: The reward model used for validation (and the one the Grow data was scored with).
      prior_improves: k, the Improve steps `policy` has already been through since BC, counted across Grow
        steps (the learning rate is `lr_decay ** k` times the base); None: `improve_index` (one Grow).
      loss_name: Improve loss ('bc' default; 'rwbc', 'gold', 'oac', 'bvmpo', and the preference losses 'dpo',
        'ipo' on pairs of one source's rows, `improve_data.Pairing`; see `rest_jax.losses`).
      filter_method: 'threshold' (paper), 'percentile', 'gamma', 'top_k' or 'none'.
      include_references: Train on the references of D too (ReST: yes; ReST-EM: no).
      reference_fraction: None: references and samples in the proportion the filter keeps them; f: a fixed
        share f of every batch's rows are references, the rest samples (the paper's mixing of D and D_g;
        `improve_data.mixed_batches`). Needs `include_references`.
      pack: Pack several Grow rows into each batch row (`improve_data.packed_rows`, seqio's packing as BC's
        `train.pack`): `batch_size` rows then hold ~2x the target tokens on short sentences, at about the
        same step time. Losses 'bc' and 'rwbc' (per-token sums; the others use whole sequences); encoder-decoder.
      max_per_source: Keep at most this many samples per source (ReST-EM: 10).
      lr_decay: The learning rate is `lr_decay ** prior_improves` times the base (gin `create_optimizer` and
        `learning_rate_schedule`, under the gin scope 'improve/' when bound there, else BC's); the paper
        lowers it at every Improve step, so it keeps falling from one Grow step to the next.
      num_steps: Most train steps.
      batch_size, feature_lengths: Batch shape.
      eval_period: Steps between validation-reward measurements (K).
      patience: Stop after this many evaluations without a better validation reward.
      validation_method: 'greedy' or 'sample' decoding for the validation reward.
      seed: Data order, dropout and the value head's initialisation.
      mesh: Device mesh (default: gin `create_mesh`).
      bc_policy: The frozen BC policy of BVMPO's λ·KL(π_BC ‖ π) (the start checkpoint of the Grow sequence):
        its parameters or a checkpoint path; None when `policy` is it (G=1, I=0 or ReST-EM), in which case it
        is also the trust-region anchor and evaluated once.
      value_pretrain_steps: Value-network pre-training steps before the step (RL losses; 0: none).
      value_pretrain_data: 'grow': every Grow row this step may use (references per `include_references`),
        unfiltered, i.e. the behaviour policy's data (BVE); 'filtered': only the rows the filter keeps.
      value_training: 'frozen' or 'joint' during Improve; None: the loss's default (OAC frozen V_behaviour,
        BVMPO joint, see the module docstring).
      vmpo_init_eta, vmpo_init_alpha: BVMPO's initial temperature η and KL multiplier α.
      anchor_period: Updates between moves of BVMPO's trust-region anchor to the current policy (V-MPO's
        target-network period, 100); None keeps the policy that started the step for the whole step.
      lora: Train low-rank adapters of the policy instead of all its parameters (gin:
        `improve_step.lora = @LoraConfig()`, `LoraConfig.rank`); the step's checkpoint then holds the adapters
        and the start checkpoint's path, and loads as a whole policy. None: full fine-tuning.
      heldout_guard: A checkpoint counts as better only if its validation translations lose at most
        `max_drop` points of a corpus metric that is not the reward against the starting policy's (gin:
        `improve_step.heldout_guard = @HeldoutGuard()`; `evaluate.HeldoutGuard`); None: the reward alone selects.
    """
    started = time.perf_counter()
    feature_lengths = dict(feature_lengths or {"inputs": 128, "targets": 128})
    selection = improve_data.Selection(improve_index, include_references, filter_method, max_per_source)
    loss = losses.get_loss(loss_name)
    needs = loss_needs(loss_name)
    _check_arguments(value_pretrain_data, reference_fraction, include_references, anchor_period, patience, needs)
    if pack and (loss_name not in PACKABLE_LOSSES or not isinstance(policy.model.config, t5.T5Config)):
        raise ValueError(f"improve_step.pack: packed rows serve the losses {PACKABLE_LOSSES} of an encoder-decoder "
                         f"policy (per-token sums over several examples per row); loss {loss_name!r} of a "
                         f"{type(policy.model.config).__name__} needs one example per row: set pack = False.")
    pairing = improve_data.Pairing() if needs.pairs else None  # gin: Pairing.rule, Pairing.min_margin
    counts = improve_data.filter_counts(data, selection, pairing)
    fres = counts.filter
    logging.info("Improve %d: filter kept %d of %d examples (%.3f); %d sources left without data.%s",
                 improve_index, fres.num_kept, fres.num_examples, fres.kept_fraction,
                 fres.num_sources_without_data, "" if pairing is None else f" {counts.num_kept} preference pairs.")
    value_mode = _resolve_value_training(value_training, needs, loss_name)
    composite = needs.value or needs.vmpo
    mesh = mesh if mesh is not None else partitioning.create_mesh()
    rules = partitioning.standard_logical_axis_rules()
    decay_power = improve_index if prior_improves is None else prior_improves
    lr_scale = lr_decay ** decay_power
    # Scoped like T5X's fine-tuning configs: `improve/learning_rate_schedule.*` overrides the BC schedule for
    # Improve only (e.g. a constant rate near BC's last one); unscoped bindings still apply otherwise.
    with gin.config_scope(OPTIMIZER_SCOPE):
        optimizer = optim.create_optimizer(lr_scale=lr_scale)
    model = policy.model
    policy_params = _place(model, policy.params, mesh, rules, "the Improve start policy")
    trainable: dict[str, Any] = {"policy": policy_params}
    boxed: dict[str, Any] = {"policy": _abstract(model, mesh, rules)}
    moving_anchor = needs.anchor and anchor_period is not None and anchor_period < num_steps
    frozen, anchor_is_bc = _frozen_policies(model, policy_params, bc_policy, needs, moving_anchor, mesh, rules)
    value_model, value_summary = None, None
    if needs.value:
        value_model = heads.build_value_network(model)
        # 'grow': the behaviour policy's data, unfiltered (BVE); 'filtered': the rows this step trains on.
        value_rows = improve_data.Selection(improve_index, include_references, None) \
            if value_pretrain_data == "grow" else selection
        value_params, value_summary = _value_network(
            policy_params, value_model, data, value_rows, out_dir, num_steps=value_pretrain_steps,
            feature_lengths=feature_lengths, batch_size=batch_size, seed=seed, mesh=mesh, rules=rules)
        if value_mode == "joint":
            trainable["value"], boxed["value"] = value_params, _abstract(value_model, mesh, rules)
        else:
            frozen["value"] = value_params
    if needs.vmpo:
        vmpo = losses.init_vmpo_params(vmpo_init_eta, vmpo_init_alpha)
        trainable["vmpo"] = partitioning.Partitioner.create(mesh, rules).place(vmpo)[0]
        boxed["vmpo"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), vmpo)
    if not composite:
        trainable, boxed = trainable["policy"], boxed["policy"]
    policy_of = (lambda p: p["policy"]) if composite else (lambda p: p)  # noqa: E731
    if lora is not None:
        _check_lora(lora, composite, policy)
        adapters = lora_lib.init_adapters(policy_params, lora, jax.random.key(seed))
        frozen["base"] = policy_params
        trainable = partitioning.Partitioner.create(mesh, rules).place(adapters)[0]  # small: replicated
        boxed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), adapters)
        policy_of = lambda p: lora_lib.merge(frozen["base"], p, lora.scale)  # noqa: E731

    state, shardings = trainer.state_from_params(trainable, optimizer, boxed,
                                                 partitioning.Partitioner.create(mesh, rules))
    loss_fn = make_improve_loss_fn(model, loss, value_model, needs=needs, value_training=value_mode,
                                   anchor_is_bc=anchor_is_bc, lora_scale=None if lora is None else lora.scale)
    train_step = trainer.make_train_step(optimizer, loss_fn, mesh=mesh, rules=rules, state_shardings=shardings,
                                         dropout_seed=seed)
    data_shard = partitioning.data_shard_info(mesh, rules)
    if reference_fraction is None:
        stream = improve_data.stream_batches(data, selection, counts, batch_size, feature_lengths, seed, data_shard,
                                             pairing=pairing, pack=pack)
    else:
        stream = improve_data.mixed_batches(data, selection, reference_fraction, batch_size, feature_lengths, seed,
                                            data_shard, pack=pack)
    batches = numbered(stream, num_steps)
    copy_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))  # new buffers: the train step donates its state

    def shard_fn(b: Batch) -> dict[str, Any]:
        out = partitioning.shard_batch(b, mesh, rules)
        if frozen:
            out[FROZEN_KEY] = frozen
        return out

    val_sources, val_refs = validation

    guard_key = None if heldout_guard is None else f"validation_{heldout_guard.metric}"

    def validation_scores(params: Any) -> dict[str, float]:
        hyps = policy.replace(params).generate(
            val_sources, method=validation_method, split_across_processes=True,
            max_input_length=feature_lengths["inputs"], max_decode_length=feature_lengths["targets"]).first()
        out = {"validation_reward": evaluate.mean_reward(reward, val_sources, hyps, val_refs)}
        if heldout_guard is not None:
            out[guard_key] = heldout_guard.measure(hyps, val_refs)
        return out

    best = {"params": jax.device_get(policy.params)}
    if lora is not None:
        best["trained"] = jax.device_get(trainable)  # the adapters (small, replicated)

    def keep_best(st: trainer.TrainState, step: int) -> None:
        del step  # On the host, the same on every process (a model axis may split them across processes).
        part = partitioning.Partitioner.create(mesh, rules)
        best["params"] = part.gather(policy_of(st.params))
        if lora is not None:
            best["trained"] = part.gather(st.params)

    def move_anchor(loop: trainer.Loop) -> None:
        frozen["anchor"] = copy_params(policy_of(loop.state.params))

    # The placed copy: the same layout as the trained parameters, so decoding compiles once.
    start = validation_scores(policy_params)
    initial = start["validation_reward"]
    restart = (f"none in {out_dir} (an Improve stage saves its best policy only when it ends); the stage's "
               "starting policy is intact and rerunning the same command restarts this stage from it")
    with metrics_lib.MetricWriter(out_dir, "improve") as writer, \
            trainer.error_advice(memory_knobs=MEMORY_KNOBS, last_checkpoint=lambda: restart):
        # A filter without a value (none) logs no filter_value: a NaN point makes tensorboardX warn
        # "NaN or Inf found in input tensor" on the user's console.
        value = {} if fres.value is None else {"filter_value": float(fres.value)}
        writer.write_scalars(0, {**start, "kept_fraction": fres.kept_fraction, "num_kept": fres.num_kept, **value})
        admissible = None if heldout_guard is None else (
            lambda res: heldout_guard.allows(res[guard_key], start[guard_key]))
        validate = trainer.Evaluate(lambda st, _: validation_scores(policy_of(st.params)),
                                    eval_period, writer, monitor="validation_reward", patience=patience,
                                    initial=initial, on_best=keep_best, admissible=admissible)
        # MFU counts the policy's training FLOPs; a loss's frozen reference passes (BC, anchor) are extra work.
        flops = metrics_lib.estimate_flops_per_example(
            model.config, feature_lengths["inputs"], feature_lengths["targets"]) * batch_size
        hooks = [trainer.LogMetrics(writer, eval_period, flops_per_step=flops, dtype=model.config.dtype),
                 *([trainer.Every(anchor_period, move_anchor)] if moving_anchor else []), validate]
        state, summary = trainer.train_loop(state, batches, train_step, num_steps, hooks=hooks, shard_fn=shard_fn,
                                            stage=f"improve_{improve_index}")
    step, last_loss = int(jax.device_get(state.step)), summary.get("loss", float("nan"))
    best_params, best_reward, best_step = best["params"], validate.best_value, validate.best_step or 0
    curve = [(0, initial), *validate.curve]
    # Only the policy is saved: evaluation and Grow load it as any T5X-named policy checkpoint (with LoRA, its
    # adapters and the start checkpoint they adapt, which `ckpt_lib.load_params` merges).
    manager = ckpt_lib.CheckpointManager(os.path.join(out_dir, "checkpoints"), keep=1, period=1)
    meta = {"improve_index": improve_index, "validation_reward": best_reward, "loss": loss_name,
            **policy_lib.checkpoint_metadata(model)}
    if lora is not None:
        meta.update(ckpt_lib.lora_metadata(policy.checkpoint, manager.step_dir(max(best_step, 1)), lora.scale,
                                           lora.rank))
    # Placed on the mesh: a multi-process save takes global arrays only (each process writes its part).
    saved, _ = partitioning.Partitioner.create(mesh, rules).place(trainer.TrainState.create(
        best["trained"] if lora is not None else best_params, optimizer))
    manager.save(max(best_step, 1), saved, force=True, metadata=meta)
    manager.close()
    result = {"improve_index": improve_index, "best_step": best_step, "validation_reward": best_reward,
              "curve": curve, "kept_fraction": fres.kept_fraction, "num_kept": fres.num_kept,
              "sources_without_data": fres.num_sources_without_data, "loss": loss_name,
              "last_train_loss": last_loss, "lr_scale": lr_scale,
              "threshold": float(fres.value) if filter_method == "threshold" and fres.value is not None else None,
              "filter": fres.summary(), "checkpoint": os.path.join(out_dir, "checkpoints"),
              "seconds": time.perf_counter() - started}
    if heldout_guard is not None:
        result["heldout_guard"] = {**dataclasses.asdict(heldout_guard), "start": start[guard_key],
                                   "rejected_steps": validate.rejected}
    if needs.value:
        result.update(value_pretrain=value_summary, value_training=value_mode)
    if lora is not None:
        trained = int(sum(np.size(x) for x in jax.tree.leaves(best["trained"])))
        result["lora"] = {"rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets),
                          "base": policy.checkpoint, "trained_parameters": trained}
    guarded = ("" if heldout_guard is None or not validate.rejected else
               f"; {len(validate.rejected)} evaluation(s) with a higher reward lost more than "
               f"{heldout_guard.max_drop:g} {heldout_guard.metric} (not kept)")
    kept_by = (f"threshold {fres.value:.3g}:" if filter_method == "threshold" and fres.value is not None
               else f"filter {filter_method}:")
    speed = metrics_lib.throughput(summary["tokens_per_sec"], flops / summary["step_time_sec"], model.config.dtype)
    console.stage_done(f"Improve {improve_index}", time.perf_counter() - started,
                       f"{kept_by} kept {fres.num_kept}/{fres.num_examples} ({fres.kept_fraction:.1%}), best "
                       f"validation reward {best_reward:.4f} at step {best_step} of {step}{guarded}, {speed}; "
                       f"{result['checkpoint']}")
    return best_params, result


@gin.configurable
@gin_utils.sets_knobs({"improve_step.reward": "set improve.reward_name instead",
                       "improve_step.seed": "set improve.seed instead"})
def improve(model_dir: str = gin.REQUIRED, grow_store: str | Sequence[str] = gin.REQUIRED,
            task: str = gin.REQUIRED, checkpoint: str = gin.REQUIRED, vocabulary: str = gin.REQUIRED,
            improve_index: int = 1, validation_split: str = "validation",
            num_validation_sources: int | None = 500, reward_name: str = "chrf", bc_checkpoint: str | None = None,
            seed: int = 0,
            prior_improves: int | None = None) -> dict[str, Any]:
    """The `rest_jax improve` subcommand: one Improve step from a checkpoint.

    Filters the Grow store(s), fine-tunes with `improve_step` (gin: loss, filter, steps, ...), writes the best
    policy to `<model_dir>/checkpoints` and the result to `<model_dir>/improve.json`, and prints it as JSON.

    Args:
      model_dir: Output directory of this Improve step.
      grow_store: A Grow store directory, or several (pooled).
      task: Task whose `validation_split` gives the validation reward.
      checkpoint, vocabulary: The policy to start from (its latest step) and its vocabulary.
      improve_index: i: which threshold τ_i of the filter schedule (0 keeps all).
      validation_split, num_validation_sources: Validation split and its first K sources (None: all).
      reward_name: Registered reward for validation (should be the one the store was scored with).
      bc_checkpoint: The BC policy for BVMPO's KL term (start of the Grow sequence); None: the loaded policy.
      seed: Data order and dropout.
      prior_improves: Improve steps the loaded policy has been through since BC (the learning rate is
        `improve_step.lr_decay` to that power); None: `improve_index`.

    Returns:
      The result dict.
    """
    policy = policy_lib.load_policy(checkpoint, vocabulary)
    stores = [grow_store] if isinstance(grow_store, str) else list(grow_store)
    for store in stores:
        store_lib.GrowStore(store).check_compatible(vocab=policy.vocab, model_config=policy.config)
    data = improve_data.GrowData.open(stores)
    validation = tasks.read_split(task, validation_split, num_validation_sources)
    _, result = improve_step(policy, data, model_dir, improve_index, validation, reward=rewards_lib.get(reward_name),
                             seed=seed, bc_policy=bc_checkpoint, prior_improves=prior_improves)
    result.update(start=checkpoint, grow_store=stores, task=task,
                  validation_split=validation_split, reward=reward_name)
    atomic.write_json(os.path.join(model_dir, "improve.json"), result)
    print(json.dumps(result, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))
    return result
