"""Improve (ReST Sec. 3, Alg. 1): fine-tune the policy on the Grow data above a rising reward threshold.

Each Improve step i filters the Grow store with F(x, y; τ_i) (or a per-source variant, `rest_jax.filters`),
warm-starts from the previous policy with the learning rate decayed by `lr_decay ** i`, trains with the
chosen loss (`rest_jax.losses`, BC by default), measures the validation reward every `eval_period` steps,
keeps the parameters with the best validation reward and stops when it has not improved for `patience`
evaluations.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np

from rest_jax import checkpoints as ckpt_lib
from rest_jax import evaluate
from rest_jax import filters as filters_lib
from rest_jax import losses
from rest_jax import metrics as metrics_lib
from rest_jax import optim
from rest_jax import partitioning
from rest_jax import train as train_lib
from rest_jax.data import grow_store as store_lib

Batch = dict[str, np.ndarray]

_COLUMNS = ("source_id", "sample_id", "is_reference", "reward", "source_text", "candidate_text",
            "source_tokens", "candidate_tokens", "behaviour_logprobs")


def load_grow_data(store_dirs: Sequence[str]) -> dict[str, np.ndarray]:
    """Columns of one or more Grow stores, concatenated (D_g; ReST-EM may pool several Grows)."""
    parts = [store_lib.GrowStore(d).as_numpy(list(_COLUMNS)) for d in store_dirs]
    return {k: np.concatenate([p[k] for p in parts]) for k in _COLUMNS}


def filter_grow_data(data: Mapping[str, np.ndarray], improve_index: int, *, include_references: bool = True,
                     **filter_kwargs: Any) -> tuple[dict[str, np.ndarray], filters_lib.FilterResult]:
    """Rows of `data` kept by the Improve step's filter (ReST Sec. 3, F(x, y; τ_i) = 1[R(x, y) > τ_i])."""
    keep_rows = np.ones(len(data["reward"]), bool) if include_references else ~data["is_reference"].astype(bool)
    rows = {k: v[keep_rows] for k, v in data.items()}
    result = filters_lib.apply_filters(rows["reward"], rows["source_id"], improve_index,
                                       sources=list(rows["source_text"]), candidates=list(rows["candidate_text"]),
                                       **filter_kwargs)
    kept = {k: v[result.mask] for k, v in rows.items()}
    return kept, result


def _pad(seqs: Sequence[np.ndarray], length: int, dtype: Any) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype)
    for i, s in enumerate(seqs):
        s = np.asarray(s)[:length]
        out[i, :len(s)] = s
    return out


def make_batch(data: Mapping[str, np.ndarray], rows: np.ndarray, feature_lengths: Mapping[str, int]) -> Batch:
    """A T5X-style batch of Grow rows, with the reward and behaviour log-probs the RL losses need."""
    li, lt = int(feature_lengths["inputs"]), int(feature_lengths["targets"])
    src = [data["source_tokens"][r] for r in rows]
    tgt = [data["candidate_tokens"][r] for r in rows]
    # Trimmed rows keep their last token as EOS, as the seqio pipeline does.
    src = [s if len(s) <= li else np.concatenate([s[:li - 1], [evaluate.EOS_ID]]) for s in src]
    tgt = [t if len(t) <= lt else np.concatenate([t[:lt - 1], [evaluate.EOS_ID]]) for t in tgt]
    targets = _pad(tgt, lt, np.int32)
    decoder_inputs = np.concatenate([np.zeros((len(rows), 1), np.int32), targets[:, :-1]], axis=1)
    return {
        "encoder_input_tokens": _pad(src, li, np.int32),
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.float32),
        "reward": data["reward"][rows].astype(np.float32),
        # GOLD's per-token rewards use the behaviour (= MLE policy at this Grow) log-probs.
        "mle_logprobs": _pad([data["behaviour_logprobs"][r] for r in rows], lt, np.float32),
    }


def batch_stream(data: Mapping[str, np.ndarray], batch_size: int, feature_lengths: Mapping[str, int],
                 seed: int, start_step: int = 0) -> Iterator[Batch]:
    """Endless shuffled batches over the kept rows; a fresh permutation per epoch, fixed by `seed`.

    Batch k is a pure function of (seed, k), so `start_step` resumes on the same data order.
    """
    n = len(data["reward"])
    if n == 0:
        raise ValueError("Improve: the filter kept no Grow examples; lower the threshold (filters schedule).")

    def indices(k: int) -> np.ndarray:
        positions = np.arange(k * batch_size, (k + 1) * batch_size)
        epochs, offsets = positions // n, positions % n
        out = np.empty(batch_size, np.int64)
        for e in np.unique(epochs):
            perm = np.random.default_rng([seed, int(e)]).permutation(n)
            out[epochs == e] = perm[offsets[epochs == e]]
        return out

    k = start_step
    while True:
        yield make_batch(data, indices(k), feature_lengths)
        k += 1


def make_improve_loss_fn(model: Any, loss: Callable[..., Any]) -> Callable[..., Any]:
    """`(params, batch, rng) -> (loss, aux)` for `train.make_train_step`, around an Improve loss."""

    def loss_fn(params: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        logits = model.apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                             enable_dropout=rng is not None, rngs=None if rng is None else {"dropout": rng})
        value, metrics = loss(batch, {"logits": logits})
        weights = batch["decoder_loss_weights"]
        metrics = dict(metrics)
        metrics.setdefault("num_tokens", jnp.sum(weights))
        metrics["accuracy"] = jnp.sum((jnp.argmax(logits, -1) == batch["decoder_target_tokens"]) * weights) / \
            jnp.maximum(jnp.sum(weights), 1.0)
        metrics.pop("loss", None)
        return value, metrics

    return loss_fn


@gin.configurable(denylist=["policy", "data", "out_dir", "improve_index", "validation"])
def improve_step(policy: evaluate.Policy, data: Mapping[str, np.ndarray], out_dir: str, improve_index: int,
                 validation: tuple[Sequence[str], Sequence[str]], *, reward: Any,
                 loss_name: str = "bc", filter_method: str = "threshold", include_references: bool = True,
                 max_per_source: int | None = None, lr_decay: float = 0.5, num_steps: int = 1000,
                 batch_size: int = 64, feature_lengths: Mapping[str, int] | None = None, eval_period: int = 100,
                 patience: int = 3, validation_method: str = "greedy", seed: int = 0,
                 mesh: Any = None) -> tuple[Any, dict[str, Any]]:
    """One Improve step on Grow data; returns (best params, result).

    Args:
      policy: The previous policy (warm start; ReST Sec. 3 fine-tunes "from the previous policy").
      data: Grow store columns (`load_grow_data`).
      out_dir: Stage directory; the best checkpoint goes to `out_dir/checkpoints`, TensorBoard to `out_dir`.
      improve_index: i; picks τ_i (or p_i, γ_i, k_i) from the filter's gin schedule; i = 0 keeps all.
      validation: (sources, references) on which the validation reward is measured.
      reward: The reward model used for validation (and the one the Grow data was scored with).
      loss_name: Improve loss ('bc' default; 'rwbc', 'gold', ...; see `rest_jax.losses`).
      filter_method: 'threshold' (paper), 'percentile', 'gamma', 'top_k' or 'none'.
      include_references: Train on the references of D too (ReST: yes; ReST-EM: no).
      max_per_source: Keep at most this many samples per source (ReST-EM: 10).
      lr_decay: The learning rate is `lr_decay ** improve_index` times the base (gin `create_optimizer`);
        the paper lowers it at every Improve step.
      num_steps: Most train steps.
      batch_size, feature_lengths: Batch shape.
      eval_period: Steps between validation-reward measurements (K).
      patience: Stop after this many evaluations without a better validation reward.
      validation_method: 'greedy' or 'sample' decoding for the validation reward.
      seed: Data order and dropout.
      mesh: Device mesh (default: gin `create_mesh`).
    """
    feature_lengths = dict(feature_lengths or {"inputs": 128, "targets": 128})
    kept, fres = filter_grow_data(data, improve_index, include_references=include_references,
                                  method=filter_method, max_per_source=max_per_source)
    logging.info("Improve %d: filter kept %d of %d examples (%.3f); %d sources left without data.",
                 improve_index, fres.num_kept, fres.num_examples, fres.kept_fraction,
                 fres.num_sources_without_data)
    mesh = mesh if mesh is not None else partitioning.create_mesh()
    rules = partitioning.standard_logical_axis_rules()
    optimizer = optim.create_optimizer(lr_scale=lr_decay ** improve_index)
    model = policy.model
    state = train_lib.TrainState.create(policy.params, optimizer)
    state, shardings = partitioning.shard_train_state(state, mesh, rules)
    train_step = train_lib.make_train_step(optimizer, make_improve_loss_fn(model, losses.get_loss(loss_name)),
                                           mesh=mesh, rules=rules, state_shardings=shardings, dropout_seed=seed)
    batches = batch_stream(kept, batch_size, feature_lengths, seed)
    shard_fn = lambda b: partitioning.shard_batch(b, mesh, rules)  # noqa: E731
    val_sources, val_refs = validation

    def validation_reward(params: Any) -> float:
        val_policy = evaluate.Policy(model, params, policy.vocab)
        hyps = evaluate.generate(val_policy, val_sources, method=validation_method,
                                 max_input_length=feature_lengths["inputs"],
                                 max_decode_length=feature_lengths["targets"]).first()
        return evaluate.mean_reward(reward, val_sources, hyps, val_refs)

    best_params = jax.device_get(policy.params)
    best_reward = validation_reward(policy.params)
    best_step, curve, since_best = 0, [(0, best_reward)], 0
    step = 0
    with metrics_lib.MetricWriter(out_dir, "improve") as writer:
        writer.write_scalars(0, {"validation_reward": best_reward, "kept_fraction": fres.kept_fraction,
                                 "num_kept": fres.num_kept,
                                 "filter_value": float("nan") if fres.value is None else float(fres.value)})
        while step < num_steps and since_best < patience:
            target = min(step + eval_period, num_steps)
            state, summary = train_lib.train_loop(state, batches, train_step, target, shard_fn=shard_fn,
                                                  metric_writer=writer, final_checkpoint=False,
                                                  stage=f"improve_{improve_index}", log_period=eval_period)
            step = int(jax.device_get(state.step))
            value = validation_reward(state.params)
            curve.append((step, value))
            writer.write_scalars(step, {"validation_reward": value})
            logging.info("Improve %d: step %d validation reward %.4f (best %.4f at %d), loss %.4f", improve_index,
                         step, value, best_reward, best_step, summary.get("loss", float("nan")))
            if value > best_reward:
                best_reward, best_step, since_best = value, step, 0
                best_params = jax.device_get(state.params)
            else:
                since_best += 1
    manager = ckpt_lib.CheckpointManager(os.path.join(out_dir, "checkpoints"), keep=1, period=1)
    manager.save(max(best_step, 1), train_lib.TrainState.create(best_params, optimizer), force=True,
                 metadata={"improve_index": improve_index, "validation_reward": best_reward})
    manager.close()
    result = {"improve_index": improve_index, "best_step": best_step, "validation_reward": best_reward,
              "curve": curve, "kept_fraction": fres.kept_fraction, "num_kept": fres.num_kept,
              "sources_without_data": fres.num_sources_without_data, "loss": loss_name,
              "threshold": float(fres.value) if filter_method == "threshold" and fres.value is not None else None,
              "filter": fres.summary(), "checkpoint": os.path.join(out_dir, "checkpoints")}
    return best_params, result
