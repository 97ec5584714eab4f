"""Online RL beside ReST: PPO and GRPO/RLOO on the same policy, sampler and sharded train step (issue 15).

ReST's central claim (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 1 and 5) is a comparison with online RL:
ReST reaches a higher reward for less compute because one Grow step's samples serve several Improve steps,
where online RL samples afresh for every update. This module is that baseline, so that the claim can be
tested on one model, one sampler (`Policy.generate`) and one train step (`trainer.make_train_step`).

Iteration k (k = 0, 1, ...):
  1. the next `sources_per_iteration` sources of `grow_split`, in an order shuffled anew every pass over
     the split and fixed by the seed (the data position is k);
  2. `num_samples` translations of each from the current policy at `temperature` (key folded from the seed
     and k), and their rewards R(x, y): one reward-model call per sample, counted;
  3. π_old of PPO's ratio is the sampler's own per-token log-probs (the untempered policy that sampled);
     by teacher forcing, in one jitted program, the BC policy's (π_BC of the KL) and, for PPO, the value
     network's values; then advantages:
       ppo        GAE (λ = `gae_lambda`, λ = 1: Monte-Carlo returns) over per-token rewards
                  r_t = R·[t last] − β (log π_old − log π_BC)_t, the KL penalty in the reward (Ziegler et al.
                  2019, arXiv 1909.08593), whitened over the batch; the value network (`heads.ValueNetwork`,
                  or `heads.LMValueNetwork` for a decoder-only policy, whose trunk starts as the policy's) is
                  trained jointly, after an optional warm-up on BC rollouts (`warm_up_value`,
                  `online.value_warmup_iterations`);
       grpo/rloo  the source's other samples as the baseline (`losses.group_advantages`), the same for every
                  token, no value network; β·KL(π ‖ π_BC) in the loss (k3 estimate, Shao et al. 2024);
  4. `epochs_per_iteration` passes over the rows in shuffled minibatches of `minibatch_size`, each one update
     of `losses.policy_gradient_loss` (clipped ratio) with the shared train step; no dropout, so that the
     ratio is 1 at the first update.
With `kl_target`, β follows Ziegler et al.'s proportional controller towards that KL (a constraint rather
than a fixed penalty). Every `eval_period` iterations the greedy validation reward is measured and the best
policy so far kept in `<model_dir>/online/policy` (loadable by `eval` and `grow`, like an Improve step's); with
`heldout_guard`, only among the policies whose validation BLEU (or chrF, TER) stays near BC's.

Resumable: every `checkpoint_period` iterations the whole state (policy, value network, optimizer, β, the
best validation reward, the cost so far) goes to `<model_dir>/online/checkpoints`, and rerunning the same
command continues from it with the uninterrupted run's result (the sources, sampling keys and minibatch
orders all follow from the seed and k). The report (`report.json`, `report.md`) scores BC and the best online
policy on the test split as `rest` does, and records the cost: reward-model calls and wall-clock seconds.

    python -m rest_jax.main online --gin_file=experiments/demo.gin --gin_file=runs/grpo.gin \\
      --gin.MODEL_DIR="'runs/demo_grpo'" --gin.online.bc_run="'runs/demo'"
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Mapping

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
from rest_jax import report
from rest_jax import rest as rest_lib
from rest_jax import rewards as rewards_lib
from rest_jax import trainer
from rest_jax.data import tasks
from rest_jax.io import atomic
from rest_jax.io import console
from rest_jax.model import heads

PyTree = Any
Batch = dict[str, np.ndarray]

ALGORITHMS = ("ppo", "grpo", "rloo")
OPTIMIZER_SCOPE = "online"  # gin scope of the online optimizer and schedule (`online/learning_rate_schedule.*`)
MEMORY_KNOBS = ("online.minibatch_size", "online.feature_lengths")  # named by out-of-memory errors
STAGE_DIR = "online"
# An iteration's parts, timed apart: the device samples; the host scores and assembles the batch (what keeps an
# accelerator idle); the device computes advantages and takes the updates.
ITERATION_PARTS = ("sample", "score", "advantages", "updates")  # Grow times "sample", "score" alike


@dataclasses.dataclass
class Progress:
    """What a resumed run needs besides the train state (saved as the checkpoint's metadata).

    Attributes:
      iteration: Iterations finished (the next one's index).
      kl_coef: β now (it moves when `kl_target` is set).
      best_reward, best_iteration: The best validation reward so far and after how many iterations (0: BC's).
      reward_calls: Reward-model calls for training samples so far (the cost axis of the comparison; the
        value warm-up's included).
      eval_reward_calls: Reward-model calls for validation.
      wall_seconds: Time spent in iterations and validations so far, over every resumption.
      timing: Of that, seconds spent sampling (on the device, and detokenizing), scoring (the reward calls and
        the batch's assembly on the host), computing advantages, updating and validating (and warming the value
        network up, PPO).
      curve: (iteration, reward_calls, wall_seconds, validation reward) at every validation.
      guard_start: The BC policy's validation score on the held-out guard's metric (None: no guard).
      guard_rejected: Iterations whose higher validation reward the guard did not let be the best.
    """

    iteration: int = 0
    kl_coef: float = 0.0
    best_reward: float = -np.inf
    best_iteration: int = 0
    reward_calls: int = 0
    eval_reward_calls: int = 0
    wall_seconds: float = 0.0
    timing: dict = dataclasses.field(
        default_factory=lambda: dict.fromkeys((*ITERATION_PARTS, "validation", "value_warmup"), 0.0))
    curve: list = dataclasses.field(default_factory=list)
    guard_start: float | None = None
    guard_rejected: list = dataclasses.field(default_factory=list)


def source_order(iteration: int, num_sources: int, per_iteration: int, seed: int) -> np.ndarray:
    """Indices of iteration k's sources: positions k·S ... (k+1)·S − 1 of passes over the split, each pass a
    permutation fixed by (seed, pass), so that a resumed run reads what the uninterrupted one would."""
    positions = np.arange(iteration * per_iteration, (iteration + 1) * per_iteration)
    passes = positions // num_sources
    out = np.empty(per_iteration, np.int64)
    for p in np.unique(passes):
        perm = np.random.default_rng([seed, int(p)]).permutation(num_sources)
        out[passes == p] = perm[positions[passes == p] % num_sources]
    return out


def _check(algorithm: str, sources_per_iteration: int, num_samples: int, minibatch_size: int,
           data_shards: int, kl_target: float | None) -> None:
    if algorithm not in ALGORITHMS:
        raise ValueError(f"online.algorithm={algorithm!r}; expected one of {ALGORITHMS}.")
    rows = sources_per_iteration * num_samples
    if algorithm != "ppo" and num_samples < 2:
        raise ValueError(f"online.algorithm={algorithm!r} takes the other samples of a source as the baseline: "
                         f"online.num_samples must be >= 2, got {num_samples}.")
    if minibatch_size < 1 or rows % minibatch_size or minibatch_size % data_shards:
        raise ValueError(f"online.minibatch_size={minibatch_size} must divide the rows of an iteration "
                         f"(sources_per_iteration x num_samples = {rows}) and be a multiple of the mesh's "
                         f"data-parallel size ({data_shards}).")
    if kl_target is not None and kl_target <= 0:
        raise ValueError(f"online.kl_target={kl_target}; expected a positive KL or None (a fixed kl_coef).")


def make_loss_fn(model: Any, value_model: Any = None) -> trainer.LossFn:
    """`(params, batch, rng) -> (loss, aux)` of `losses.policy_gradient_loss` (gin: clip, value weight).

    `params` is `{'policy': ..., ['value': ...]}`. No dropout: π_old was computed without it, and the
    clipped ratio must compare one deterministic network with itself.
    """
    def loss_fn(params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        del rng
        enc, dec = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
        outputs = {"logits": model.apply({"params": params["policy"]}, enc, dec)}
        if value_model is not None:
            outputs["values"] = value_model.apply({"params": params["value"]}, enc, dec)
        value, metrics = losses.policy_gradient_loss(batch, outputs)
        metrics = dict(metrics)
        metrics.pop("loss", None)
        return value, metrics

    return loss_fn


def make_advantage_fn(model: Any, value_model: Any, algorithm: str, group_size: int, discount: float,
                      gae_lambda: float, estimator_eps: float = 1e-4) -> Any:
    """The jitted `(params, bc_params, batch, kl_coef) -> training columns` of one iteration's samples.

    The batch carries π_old as `behaviour_log_probs` (the sampler's per-token log-probs). Returns `advantages`
    [B, T] and, by algorithm, `reference_log_probs` (the KL in the loss) or `returns` and `old_values` (PPO),
    plus `kl` (mean per-token log π_old − log π_BC).
    """
    def fn(params: PyTree, bc_params: PyTree, batch: Mapping[str, jax.Array], kl_coef: jax.Array):
        enc, dec, targets = batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"]
        weights = batch["decoder_loss_weights"]
        # π_old: the sampler's own log-probs (untempered, of the parameters that sampled), not a second forward.
        old = batch["behaviour_log_probs"] * weights
        ref = losses.token_log_probs(model.apply({"params": bc_params}, enc, dec), targets) * weights
        out = {"kl": jnp.sum(old - ref) / jnp.maximum(jnp.sum(weights), 1.0)}
        if algorithm == "ppo":
            values = value_model.apply({"params": params["value"]}, enc, dec) * weights
            rewards = losses.terminal_rewards(batch["reward"], weights) - kl_coef * (old - ref)
            adv, returns = losses.generalized_advantages(rewards, values, weights, discount, gae_lambda)
            out.update(advantages=losses.whiten(adv, weights), returns=returns, old_values=values)
        else:
            adv = losses.group_advantages(batch["reward"], group_size, algorithm, estimator_eps)
            out.update(advantages=adv[:, None] * weights, reference_log_probs=ref)
        return out

    return jax.jit(fn)


def _rollout_batch(policy: policy_lib.Policy, sources: list[str], references: list[str], reward: Any, *,
                   num_samples: int, temperature: float, lengths: Mapping[str, int], seed: int,
                   batch_size: int, truncated_reward: float | None) -> tuple[Batch, np.ndarray, float, float]:
    """Samples of every source (rows grouped by source) as a T5X batch with their rewards; also the scored
    rewards, the fraction of samples cut at the length limit (whose reward is `truncated_reward`) and the
    seconds spent on the host after sampling (reward calls and the batch's assembly)."""
    src_tok, _ = policy_lib.tokenize(policy.vocab, sources, lengths["inputs"])
    gens = policy.generate(sources, method="sample", num_samples=num_samples, temperature=temperature,
                           seed=seed, batch_size=batch_size, max_input_length=lengths["inputs"],
                           max_decode_length=lengths["targets"], source_tokens=src_tok,
                           split_across_processes=True)
    t0 = time.perf_counter()
    cands = [c for cs in gens.texts for c in cs]
    flat_src = [s for s in sources for _ in range(num_samples)]
    flat_ref = [r for r in references for _ in range(num_samples)]
    scores = rewards_lib.score_pairs(reward, flat_src, cands, flat_ref if reward.needs_reference else None)
    tokens = [t for ts in gens.tokens for t in ts]
    cut = np.asarray([not policy_lib.finished(policy.model, t) for t in tokens])
    trained = np.where(cut, truncated_reward, scores) if truncated_reward is not None else scores
    rows = {"source_tokens": [np.asarray(s) for s in src_tok for _ in range(num_samples)],
            "candidate_tokens": tokens, "reward": trained,
            "behaviour_logprobs": [lp for lps in gens.token_log_probs for lp in lps]}
    batch = improve_data.make_batch(rows, lengths)
    return batch, np.asarray(scores, np.float64), float(np.mean(cut)), time.perf_counter() - t0


def _minibatches(batch: Batch, epochs: int, size: int, local: slice, rng: np.random.Generator) -> list[Batch]:
    """`epochs` passes over the rows of `batch` in shuffled minibatches of `size` rows, each cut to this
    process's `local` block (scalars, e.g. the KL weight, kept whole)."""
    rows = len(batch["decoder_target_tokens"])
    out = []
    for _ in range(epochs):
        perm = rng.permutation(rows)
        for start in range(0, rows, size):
            pick = perm[start:start + size][local]
            out.append({k: (v if np.ndim(v) == 0 else v[pick]) for k, v in batch.items() if k != "reward"})
    return out


def _kl_controller(kl_coef: float, kl: float, target: float, rows: int, horizon: int) -> float:
    """Ziegler et al. (2019) Sec. 2.2: β ← β (1 + clip(KL/target − 1, ±0.2) · rows/horizon)."""
    return float(kl_coef * (1.0 + np.clip(kl / target - 1.0, -0.2, 0.2) * rows / horizon))


@gin.configurable
@gin_utils.sets_knobs(rest_lib.BC_KNOBS)
def online(model_dir: str = gin.REQUIRED, task: str = gin.REQUIRED, *, algorithm: str = "grpo",
           vocab_path: str | None = None, vocab_size: int = 32000, reward_name: str = "chrf",
           bc_run: str | None = None, grow_split: str = "train", max_sources: int | None = None,
           num_iterations: int = 100, sources_per_iteration: int = 32, num_samples: int = 4,
           temperature: float = 1.0, truncated_reward: float | None = 0.0, epochs_per_iteration: int = 1,
           minibatch_size: int = 64,
           kl_coef: float = 0.05, kl_target: float | None = None, kl_horizon: int = 10000,
           discount: float = 1.0, gae_lambda: float = 0.95, eval_period: int = 10, checkpoint_period: int = 10,
           validation_split: str = "validation", num_validation_sources: int | None = 200,
           test_split: str | None = "test", num_test_sources: int | None = None,
           feature_lengths: dict[str, int] | None = None, eval_max_length: int = 128, sample_eval_n: int = 4,
           sample_eval_temperature: float = 0.8, seed: int = 0, value_warmup_iterations: int = 0,
           heldout_guard: evaluate.HeldoutGuard | None = None) -> dict[str, Any]:
    """Online RL from the BC policy (the `online` command): PPO, GRPO or RLOO; writes the report.

    Args:
      model_dir: Run directory: `vocab/`, `bc/` (unless `bc_run`), `online/`, `report.json`, `report.md`.
      task: Task name (`rest_jax.data.tasks`).
      algorithm: 'ppo' (value network, GAE, KL in the reward), 'grpo' or 'rloo' (group baselines, KL in
        the loss); see the module docstring.
      vocab_path, vocab_size: An existing SentencePiece model, or the size of the one trained on the task.
      reward_name: Registered reward R(x, y) (`rest_jax.rewards`).
      bc_run: A run directory whose vocabulary and finished BC stage to start from (e.g. a `rest` run of the
        same config and seed, so that both are paired against one BC policy); None: train BC here.
      grow_split, max_sources: The split whose sources are sampled (its first `max_sources`; None: all).
      num_iterations: Iterations (sample, score, update).
      sources_per_iteration, num_samples: Sources per iteration and samples of each (GRPO's group size).
      temperature: Sampling temperature; at 1 (the default) the samples are the policy's own, otherwise
        they come from the tempered policy and the ratio's π_old is the untempered one (slightly off-policy).
      truncated_reward: The reward a sample gets for training when it has no EOS within
        `feature_lengths['targets']` tokens (None: its score as cut). Without it the policy learns to run
        past the limit, where a cut translation can outscore a finished one, and then rambles at test time.
      epochs_per_iteration, minibatch_size: Passes over an iteration's rows and rows per update.
      kl_coef: β, the weight of the KL to the BC policy (its start when `kl_target` is set).
      kl_target, kl_horizon: Adapt β towards this per-token KL, at the controller's horizon (rows).
      discount, gae_lambda: GAE's γ and λ (PPO).
      eval_period: Iterations between validation rewards (greedy), which pick the reported policy.
      checkpoint_period: Iterations between saves of the whole state (resumption).
      validation_split, num_validation_sources: Split (and its first K sources) of the validation reward.
      test_split, num_test_sources: Held-out split of the report (None: the validation split).
      feature_lengths: {'inputs', 'targets'} token limits (BC, sampling, training).
      eval_max_length, sample_eval_n, sample_eval_temperature: As `run_rest`'s, for the report's scores.
      seed: Seeds BC (when trained here), the source order, sampling and the value head.
      value_warmup_iterations: PPO: rounds of BC rollouts that train the value network alone before the first
        policy update (`warm_up_value`; their reward calls count in the cost); 0: none.
      heldout_guard: The policy kept is the best on validation reward among those losing at most `max_drop`
        points of a corpus metric that is not the reward against BC's (`evaluate.HeldoutGuard`, as
        `improve_step.heldout_guard`); None: the reward alone selects.

    Returns:
      The report (also in `<model_dir>/report.json`).
    """
    lengths = dict(feature_lengths or {"inputs": 128, "targets": 128})
    eval_lengths = {k: max(v, eval_max_length) for k, v in lengths.items()}
    rest_lib.check_bc_run(bc_run, "online.bc_run")
    mesh = partitioning.create_mesh()
    rules = partitioning.standard_logical_axis_rules()
    part = partitioning.Partitioner.create(mesh, rules)
    shard_index, num_shards = partitioning.data_shard_info(mesh, rules)
    _check(algorithm, sources_per_iteration, num_samples, minibatch_size, num_shards, kl_target)
    if value_warmup_iterations < 0 or value_warmup_iterations and algorithm != "ppo":
        raise ValueError(f"online.value_warmup_iterations={value_warmup_iterations}: warms up PPO's value network "
                         f"(>= 0, and 0 unless online.algorithm = 'ppo'; it is {algorithm!r}).")
    vocab_path = rest_lib.run_vocabulary(bc_run or model_dir, task, vocab_path, vocab_size)
    reward = rewards_lib.get(reward_name)
    eval_splits, report_split = rest_lib.evaluation_splits(task, validation_split, num_validation_sources, test_split,
                                                           num_test_sources)

    def scores(policy: policy_lib.Policy, out_dir: str) -> dict[str, Any]:
        return rest_lib.stage_scores(policy, reward, eval_splits, out_dir, eval_lengths, report_split,
                                     sample_eval_n, sample_eval_temperature, seed)

    bc = rest_lib.behaviour_cloning(bc_run or model_dir, task, lengths=lengths, seed=seed, vocab_path=vocab_path,
                                    scores=scores)
    stage_dir = os.path.join(model_dir, STAGE_DIR)
    done = report.stage_result(stage_dir)
    if done is None:
        bc_policy = policy_lib.load_policy(bc["checkpoint"], vocab_path)
        sources, references = tasks.read_split(task, grow_split, max_sources)
        result = run_iterations(bc_policy, sources, references, eval_splits[validation_split], reward, stage_dir,
                        algorithm=algorithm,
                        num_iterations=num_iterations, sources_per_iteration=sources_per_iteration,
                        num_samples=num_samples, temperature=temperature, truncated_reward=truncated_reward,
                        epochs_per_iteration=epochs_per_iteration, minibatch_size=minibatch_size, kl_coef=kl_coef,
                        kl_target=kl_target, kl_horizon=kl_horizon, discount=discount, gae_lambda=gae_lambda,
                        eval_period=eval_period, checkpoint_period=checkpoint_period, lengths=lengths, seed=seed,
                        part=part, shard=(shard_index, num_shards), value_warmup_iterations=value_warmup_iterations,
                        heldout_guard=heldout_guard)
        best = policy_lib.load_policy(result["checkpoint"], vocab_path)
        result["scores"] = scores(best, stage_dir)
        done = report.finish_stage(stage_dir, result)
    rows = [rest_lib.scored_here(bc, model_dir, report_split, sample_eval_n, vocab_path, scores), done]
    rest_lib.compare_to_bc(rows, report_split, eval_splits[report_split], reward, seed)
    table_rows = [{"name": r["name"], **{k: r["scores"][report_split].get(k) for k in
                                         ("reward", "bleu", "chrf", "ter", "sample_reward")},
                   "vs_bc": r.get("vs_bc"), "held_out_drops": r.get("held_out_drops")} for r in rows]
    out = {"task": task, "reward": reward_name, "split": report_split, "algorithm": algorithm, "rows": table_rows,
           "stages": rows, "cost": done["cost"]}
    md = [f"# {algorithm.upper()} on {task} ({reward_name} reward, {report_split} split, seed {seed})\n",
          report.markdown_table(table_rows, report_split), "\n", report.significance_notes(table_rows, reward_name),
          f"\nCost: {done['cost']['reward_calls']} reward-model calls for training samples "
          f"({done['cost']['eval_reward_calls']} more for validation), {done['cost']['updates']} updates, "
          f"{done['cost']['wall_seconds']:.0f} s on this machine.\n"]
    if sample_eval_n:
        md.append(f"\nSample reward: mean over {sample_eval_n} samples per source at temperature "
                  f"{sample_eval_temperature} (ReST Table 1); the other columns decode greedily.\n")
    if partitioning.is_chief():
        atomic.write_json(os.path.join(model_dir, "report.json"), out)
        atomic.write_text(os.path.join(model_dir, "report.md"), "".join(md))
        print("".join(md))
    return out


def make_value_warmup_loss_fn(value_model: Any) -> trainer.LossFn:
    """`(params, batch, rng) -> (loss, aux)`: the token-mean squared error of `params['value']`'s V(s_t) to
    `batch['returns']` (the warm-up's regression; no dropout, as in the PPO updates)."""
    def loss_fn(params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array | None):
        del rng
        values = value_model.apply({"params": params["value"]}, batch["encoder_input_tokens"],
                                   batch["decoder_input_tokens"])
        weights = batch["decoder_loss_weights"]
        mse = jnp.sum(weights * jnp.square(values - batch[losses.RETURNS])) / jnp.maximum(jnp.sum(weights), 1.0)
        return mse, {"value_mse": mse, "num_tokens": jnp.sum(weights)}

    return loss_fn


def warm_up_value(bc_policy: policy_lib.Policy, value_model: Any, value_params: PyTree, boxed_value: PyTree,
                  optimizer: optim.Optimizer, sources: list[str], references: list[str], reward: Any, *,
                  iterations: int, sources_per_iteration: int, num_samples: int, temperature: float,
                  truncated_reward: float | None, epochs: int, minibatch_size: int, discount: float,
                  lengths: Mapping[str, int], seed: int, part: partitioning.Partitioner,
                  shard: tuple[int, int]) -> tuple[PyTree, dict[str, Any]]:
    """PPO's value (critic) warm-up: fits the value network to the BC policy's returns before any policy update.

    The head starts fresh on the policy's trunk, so PPO's first advantages would be mostly the head's noise;
    like verl's `critic_warmup`, the first `iterations` rounds of rollouts (iteration j samples iteration j's
    sources from the BC policy, with its own sampling keys) train the value network alone, `epochs` passes of
    `minibatch_size` rows each, on the Monte-Carlo returns G_t = discount^(tokens after t)·R (`losses.
    monte_carlo_returns`; at the BC policy the KL penalty of PPO's reward is zero). Each sample is one
    reward-model call, counted in the run's cost.

    Returns:
      (the value parameters, {'iterations', 'reward_calls', 'updates', 'value_mse': the mean token MSE of each
      iteration's updates}).
    """
    rows = sources_per_iteration * num_samples
    local = slice(shard[0] * minibatch_size // shard[1], (shard[0] + 1) * minibatch_size // shard[1])
    state, shardings = trainer.state_from_params({"value": value_params}, optimizer, {"value": boxed_value}, part)
    step_fn = trainer.make_train_step(optimizer, make_value_warmup_loss_fn(value_model), mesh=part.mesh,
                                      rules=part.rules, state_shardings=shardings, dropout_seed=seed)
    mse = []
    for j in range(iterations):
        idx = source_order(j, len(sources), sources_per_iteration, seed)
        sample_seed = int(np.random.SeedSequence([seed, 0x766C75, j]).generate_state(1)[0] % 2**31)
        batch, _, _, _ = _rollout_batch(
            bc_policy, [sources[i] for i in idx], [references[i] for i in idx], reward, num_samples=num_samples,
            temperature=temperature, lengths=lengths, seed=sample_seed,
            batch_size=max(1, min(64, sources_per_iteration)), truncated_reward=truncated_reward)
        batch[losses.RETURNS] = np.asarray(losses.monte_carlo_returns(batch["reward"], batch["decoder_loss_weights"],
                                                                      discount), np.float32)
        minibatches = _minibatches(batch, epochs, minibatch_size, local, np.random.default_rng([seed, 0x7677, j]))
        state, summary = trainer.train_loop(
            state, iter(minibatches), step_fn, int(jax.device_get(state.step)) + len(minibatches),
            shard_fn=part.shard_batch, stage=f"value_warmup_{j}", show_progress=False,
            hooks=[trainer.LogMetrics(None, period=len(minibatches))])
        mse.append(float(summary["value_mse"]))
        logging.info("PPO value warm-up %d/%d: value MSE %.5f", j + 1, iterations, mse[-1])
    return state.params["value"], {"iterations": iterations, "reward_calls": iterations * rows,
                                   "updates": int(jax.device_get(state.step)), "value_mse": mse}


def run_iterations(bc_policy: policy_lib.Policy, sources: list[str], references: list[str],
                   validation: tuple[list[str], list[str]], reward: Any, stage_dir: str, *, algorithm: str,
                   num_iterations: int, sources_per_iteration: int, num_samples: int, temperature: float,
                   truncated_reward: float | None, epochs_per_iteration: int, minibatch_size: int, kl_coef: float,
                   kl_target: float | None, kl_horizon: int, discount: float, gae_lambda: float,
                   eval_period: int, checkpoint_period: int, lengths: Mapping[str, int], seed: int,
                   part: partitioning.Partitioner, shard: tuple[int, int],
                   value_warmup_iterations: int = 0,
                   heldout_guard: evaluate.HeldoutGuard | None = None) -> dict[str, Any]:
    """The iterations of `online` from `bc_policy` (resumed from `stage_dir/checkpoints`); returns the stage
    result: the best policy's checkpoint, the validation curve and the cost (`cost.timing`: seconds per part).
    A fresh PPO run first warms its value network up (`warm_up_value`) when `value_warmup_iterations` > 0;
    with `heldout_guard`, a validation counts as the best only if the guard allows it against BC's."""
    model, mesh, rules = bc_policy.model, part.mesh, part.rules
    with gin.config_scope(OPTIMIZER_SCOPE):
        optimizer = optim.create_optimizer()
    with part.context():
        boxed = {"policy": heads.abstract_params(model)}
    bc_params = heads.shard_params(model, bc_policy.params, mesh, rules, "the BC policy")[0]
    trainable = {"policy": bc_params}
    value_model = None
    if algorithm == "ppo":
        value_model = heads.build_value_network(model)
        enc = dec = jnp.ones((1, 2), jnp.int32)
        fresh, _ = part.init(lambda k: value_model.init(k, enc, dec)["params"], jax.random.key(seed))
        # The value network starts from the policy's trunk (ReST Sec. 5), its head fresh.
        trainable["value"] = heads.shard_params(value_model, heads.transplant_trunk(bc_params, fresh), mesh, rules,
                                                "the value network")[0]
        with part.context():
            boxed["value"] = heads.abstract_params(value_model)
    manager = ckpt_lib.CheckpointManager(os.path.join(stage_dir, "checkpoints"), keep=2, period=checkpoint_period,
                                         keep_knob=None)
    best_dir = os.path.join(stage_dir, "policy")
    prog = Progress(kl_coef=float(kl_coef))
    warmup = None
    if value_warmup_iterations and manager.latest_step() is None:
        # Before the first checkpoint, so a killed warm-up is redone (deterministically) by the rerun.
        t0 = time.perf_counter()
        trainable["value"], warmup = warm_up_value(
            bc_policy, value_model, trainable["value"], boxed["value"], optimizer, sources, references, reward,
            iterations=value_warmup_iterations, sources_per_iteration=sources_per_iteration,
            num_samples=num_samples, temperature=temperature, truncated_reward=truncated_reward,
            epochs=epochs_per_iteration, minibatch_size=minibatch_size, discount=discount, lengths=lengths,
            seed=seed, part=part, shard=shard)
        prog.reward_calls = warmup["reward_calls"]
        prog.wall_seconds = prog.timing["value_warmup"] = time.perf_counter() - t0
    state, shardings = trainer.state_from_params(trainable, optimizer, boxed, part)
    if manager.latest_step() is not None:
        state, meta = manager.restore(state, shardings=shardings)
        prog = Progress(**meta["progress"])
        console.logger.info("online: resumed from %s at iteration %d.", manager.step_dir(manager.latest_step()),
                            prog.iteration)
    step_fn = trainer.make_train_step(optimizer, make_loss_fn(model, value_model), mesh=mesh, rules=rules,
                                      state_shardings=shardings, dropout_seed=seed)
    advantage_fn = make_advantage_fn(model, value_model, algorithm, num_samples, discount, gae_lambda)
    val_sources, val_refs = validation
    rows = sources_per_iteration * num_samples
    local = slice(shard[0] * minibatch_size // shard[1], (shard[0] + 1) * minibatch_size // shard[1])

    def policy_now(st: trainer.TrainState) -> policy_lib.Policy:
        return bc_policy.replace(st.params["policy"])

    def validation_reward(st: trainer.TrainState) -> tuple[float, bool]:
        """The validation reward, and whether the guard (if any) lets this policy be the best."""
        hyps = policy_now(st).generate(val_sources, method="greedy", split_across_processes=True,
                                       max_input_length=lengths["inputs"],
                                       max_decode_length=lengths["targets"]).first()
        prog.eval_reward_calls += len(hyps)
        value = evaluate.mean_reward(reward, val_sources, hyps, val_refs)
        if heldout_guard is None:
            return value, True
        score = heldout_guard.measure(hyps, val_refs)
        if prog.guard_start is None:  # the first validation is BC's
            prog.guard_start = score
        return value, heldout_guard.allows(score, prog.guard_start)

    def save_best(st: trainer.TrainState) -> None:
        best = ckpt_lib.CheckpointManager(os.path.join(best_dir, "checkpoints"), keep=1, period=1)
        best.save(prog.iteration, {"params": st.params["policy"]}, force=True,
                  metadata={"iteration": prog.iteration, "validation_reward": prog.best_reward,
                            "algorithm": algorithm})
        best.close()

    def validate(st: trainer.TrainState) -> float:
        t0 = time.perf_counter()
        value, admissible = validation_reward(st)
        prog.timing["validation"] += time.perf_counter() - t0
        prog.curve.append((prog.iteration, prog.reward_calls, prog.wall_seconds, value))
        if value > prog.best_reward and not admissible:
            prog.guard_rejected.append(prog.iteration)
        elif value > prog.best_reward:
            prog.best_reward, prog.best_iteration = value, prog.iteration
            save_best(st)
        return value

    if prog.iteration == 0 and not prog.curve:  # the BC policy's validation reward: the bar to beat
        t0 = time.perf_counter()
        validate(state)
        prog.wall_seconds += time.perf_counter() - t0
    bar = metrics_lib.progress(num_iterations - prog.iteration, desc=algorithm, unit="iter")
    start_iteration, first_timing, first_updates = prog.iteration, None, 0
    with metrics_lib.MetricWriter(os.path.dirname(stage_dir.rstrip("/")), STAGE_DIR) as writer, \
            trainer.error_advice(memory_knobs=MEMORY_KNOBS,
                                 last_checkpoint=lambda: trainer.describe_last_checkpoint(manager)):
        try:
            while prog.iteration < num_iterations:
                k = prog.iteration
                t0 = time.perf_counter()
                idx = source_order(k, len(sources), sources_per_iteration, seed)
                sample_seed = int(np.random.SeedSequence([seed, 0x6F6E6C, k]).generate_state(1)[0] % 2**31)
                batch, sample_rewards, cut, score_seconds = _rollout_batch(
                    policy_now(state), [sources[i] for i in idx], [references[i] for i in idx], reward,
                    num_samples=num_samples, temperature=temperature, lengths=lengths, seed=sample_seed,
                    batch_size=max(1, min(64, sources_per_iteration)), truncated_reward=truncated_reward)
                t1 = time.perf_counter()
                with part.context():
                    columns = part.gather(advantage_fn(state.params, bc_params, part.shard_batch(
                        {k_: v[shard[0] * rows // shard[1]:(shard[0] + 1) * rows // shard[1]]
                         for k_, v in batch.items()}), jnp.asarray(prog.kl_coef, jnp.float32)))
                kl = float(columns.pop("kl"))
                t2 = time.perf_counter()
                batch.update({k_: np.asarray(v) for k_, v in columns.items()})
                if algorithm != "ppo":
                    batch[losses.KL_COEF] = np.asarray(prog.kl_coef, np.float32)
                minibatches = _minibatches(batch, epochs_per_iteration, minibatch_size, local,
                                           np.random.default_rng([seed, 0x6D62, k]))
                state, summary = trainer.train_loop(
                    state, iter(minibatches), step_fn, int(jax.device_get(state.step)) + len(minibatches),
                    shard_fn=part.shard_batch, stage=f"{algorithm}_{k}", show_progress=False,
                    hooks=[trainer.LogMetrics(None, period=len(minibatches))])  # averages into `summary`
                for part_name, seconds in zip(ITERATION_PARTS, (t1 - t0 - score_seconds, score_seconds, t2 - t1,
                                                                time.perf_counter() - t2)):
                    prog.timing[part_name] = prog.timing.get(part_name, 0.0) + seconds  # .get: older runs
                if first_timing is None:  # the first iteration this process runs compiles its programs
                    first_timing, first_updates = dict(prog.timing), int(jax.device_get(state.step))
                if kl_target is not None:
                    prog.kl_coef = _kl_controller(prog.kl_coef, kl, kl_target, rows, kl_horizon)
                prog.iteration, prog.reward_calls = k + 1, prog.reward_calls + rows
                scalars = {"reward/mean": float(np.mean(sample_rewards)), "truncated": cut, "kl_to_bc": kl,
                           "kl_coef": prog.kl_coef,
                           "reward_calls": prog.reward_calls,
                           **{f"train/{n}": v for n, v in summary.items() if isinstance(v, float)}}
                if eval_period and prog.iteration % eval_period == 0 or prog.iteration == num_iterations:
                    scalars["validation_reward"] = validate(state)
                prog.wall_seconds += time.perf_counter() - t0
                scalars["wall_seconds"] = prog.wall_seconds
                writer.write_scalars(prog.iteration, scalars)
                logging.info("%s iteration %d: %s", algorithm, prog.iteration,
                             {n: round(float(v), 4) for n, v in scalars.items()})
                bar.update(1)
                bar.set_postfix(reward=round(scalars["reward/mean"], 4), kl=round(kl, 4))
                if manager.should_save(prog.iteration) or prog.iteration == num_iterations:
                    manager.save(prog.iteration, state, metadata={"progress": dataclasses.asdict(prog)},
                                 force=True)
        finally:
            bar.close()
            manager.close()
    updates = int(jax.device_get(state.step))
    result = {"name": f"{algorithm.upper()} ({num_iterations} it.)", "algorithm": algorithm,
              "checkpoint": os.path.join(best_dir, "checkpoints"), "best_iteration": prog.best_iteration,
              "validation_reward": prog.best_reward, "curve": prog.curve, "kl_coef": prog.kl_coef,
              "value_warmup": warmup,
              **({} if heldout_guard is None else {"heldout_guard": {
                  **dataclasses.asdict(heldout_guard), "start": prog.guard_start,
                  "rejected_iterations": prog.guard_rejected}}),
              "cost": {"reward_calls": prog.reward_calls, "eval_reward_calls": prog.eval_reward_calls,
                       "samples": prog.reward_calls, "updates": updates, "wall_seconds": prog.wall_seconds,
                       "timing": prog.timing}}
    if first_timing is not None and prog.iteration - start_iteration > 1:
        # Per iteration after compilation (benchmarks/online_benchmark.py): this process's iterations but its first.
        steady = prog.iteration - start_iteration - 1
        result["cost"]["steady_iteration"] = {
            "seconds": {n: (prog.timing[n] - first_timing.get(n, 0.0)) / steady for n in ITERATION_PARTS},
            "updates": (updates - first_updates) / steady, "iterations": steady}
    console.stage_done(f"Online {algorithm}", prog.wall_seconds,
                       f"{num_iterations} iterations, {prog.reward_calls} reward calls, best validation reward "
                       f"{prog.best_reward:.4f} at iteration {prog.best_iteration}"
                       + (f" ({len(prog.guard_rejected)} higher rewards lost more than {heldout_guard.max_drop:g} "
                          f"{heldout_guard.metric}: not kept)" if prog.guard_rejected else "")
                       + f"; {result['checkpoint']}")
    return result


def finished_work(model_dir: str) -> list[str]:
    """What a rerun in `model_dir` would skip or resume (for `rest_jax.rerun`), relative to it."""
    root = epath.Path(model_dir)
    found = [w for w in rest_lib.finished_work(model_dir) if w == "vocab" or w.startswith("bc")]
    if (root / STAGE_DIR / report.STAGE_FILE).exists():
        found.append(STAGE_DIR)
    else:
        found += [f"{STAGE_DIR}/checkpoints/{s}" for s in ckpt_lib.committed_steps(root / STAGE_DIR / "checkpoints")]
    return found

