"""The ReST loop (Gulcehre et al. 2023, Alg. 1): BC, then G × (Grow, I × Improve), with a report.

Run directory layout (each stage finished when its `stage.json` exists; a rerun skips finished stages, and
the command line refuses one with other settings: `rest_jax.rerun`):

    <model_dir>/vocab/                     SentencePiece model trained on the task (unless given)
    <model_dir>/bc/                        BC policy ("BC G=0 I=0"): checkpoints/, TensorBoard, stage.json
    <model_dir>/grow_1/store/              Grow store D_1 (TFRecord shards + metadata.json)
    <model_dir>/grow_1/improve_0/          "ReST G=1 I=0" (threshold 0: the whole D_1)
    <model_dir>/grow_1/improve_2/          "ReST G=1 I=2" (τ_2), warm-started from improve_1
    <model_dir>/grow_1/improve_1/          with `control`: "Control G=1 I=1", the same Improve step on the original
                                           data D instead of a Grow store (no store is made)
    <model_dir>/report.json, report.md     the paper's table on the held-out split
    <model_dir>/plots/*.png                reward distribution per Grow, validation reward per Improve step,
                                           reward of best-of-N against N
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Sequence

import gin
import numpy as np
from etils import epath

# Every module with gin configurables a ReST config may bind must be imported before gin parses it.
from rest_jax import checkpoints  # noqa: F401  pylint: disable=unused-import
from rest_jax import evaluate
from rest_jax import gin_utils
from rest_jax import grow as grow_lib
from rest_jax import improve as improve_lib
from rest_jax import improve_data
from rest_jax import partitioning
from rest_jax import policy as policy_lib
from rest_jax import report
from rest_jax import reward_model as reward_model_lib
from rest_jax import rewards as rewards_lib
from rest_jax import significance
from rest_jax import train as train_lib
from rest_jax.data import demo_corpus  # noqa: F401  pylint: disable=unused-import
from rest_jax.data import grow_store as store_lib
from rest_jax.data import task_vocab
from rest_jax.data import tasks
from rest_jax.data import vocab as vocab_lib
from rest_jax.io import atomic
from rest_jax.io import console


def finished_work(model_dir: str) -> list[str]:
    """What a rerun in `model_dir` would skip or resume, as paths relative to it (the layout above): the
    trained vocabulary, each finished stage, BC's checkpoints while BC is unfinished, best_of_n.json."""
    root = epath.Path(model_dir)
    found = []
    if (root / "vocab" / vocab_lib.DEFAULT_MODEL_NAME).exists():
        found.append("vocab")
    if (root / "bc" / report.STAGE_FILE).exists():
        found.append("bc")
    else:
        found += [f"bc/{path}" for path in train_lib.finished_work(os.fspath(root / "bc"))]

    def index(path: epath.Path) -> int:
        suffix = path.name.rsplit("_", 1)[-1]
        return int(suffix) if suffix.isdigit() else -1

    for grow_dir in sorted(root.glob("grow_*"), key=index):
        if (grow_dir / report.STAGE_FILE).exists():
            found.append(grow_dir.name)
        found += [f"{grow_dir.name}/{d.name}" for d in sorted(grow_dir.glob("improve_*"), key=index)
                  if (d / report.STAGE_FILE).exists()]
    if (root / "best_of_n.json").exists():
        found.append("best_of_n.json")
    return found


def extension_knobs(model_dir: str) -> tuple[str, ...]:
    """Knobs a rerun in `model_dir` may change although it holds finished work (`rest_jax.rerun`): G always,
    since each stage depends only on those before it; I only until a second Grow has begun (even unfinished: its
    shards are kept), because Grow g >= 2 samples from the policy that G=g-1's last Improve step left."""
    later = [d for d in epath.Path(model_dir).glob("grow_*") if d.name != "grow_1"]
    return ("run_rest.num_grow_steps",) if later else ("run_rest.num_grow_steps", "run_rest.num_improve_steps")


def run_vocabulary(model_dir: str, task: str, vocab_path: str | None, vocab_size: int) -> str:
    """The run's vocabulary: `vocab_path`, else one trained on `task` in `<model_dir>/vocab` (once); bound as
    `get_task.vocabulary` so that the task's pipeline tokenises with it."""
    if vocab_path is None:
        # Process 0 trains it; the others wait, then find it (one file, however many processes share MODEL_DIR).
        if partitioning.is_chief():
            task_vocab.ensure_vocabulary(task, os.path.join(model_dir, "vocab"), vocab_size=vocab_size)
        partitioning.sync_processes("rest_jax: vocabulary trained")
        vocab_path = task_vocab.ensure_vocabulary(task, os.path.join(model_dir, "vocab"), vocab_size=vocab_size)
    with gin.unlock_config():
        gin.bind_parameter("get_task.vocabulary", vocab_path)
    return vocab_path


def _policy_from(checkpoint_dir: str, vocab_path: str) -> policy_lib.Policy:
    return policy_lib.load_policy(checkpoint=checkpoint_dir, vocabulary=vocab_path)


SCORE_KEYS = ("reward", "bleu", "chrf", "ter", "bleu_signature", "chrf_signature", "ter_signature")


def stage_scores(policy: policy_lib.Policy, reward: Any, split_data: dict[str, tuple[list[str], list[str]]],
                 stage_dir: str, lengths: dict[str, int], sample_split: str, sample_n: int, temperature: float,
                 seed: int) -> dict[str, Any]:
    """Reward, BLEU, chrF and TER of greedy translations on each split (saved in the stage dir as
    `<split>.greedy.txt`), and on `sample_split` the mean reward of `sample_n` samples (0: none)."""
    out = {}
    for split, (srcs, refs) in split_data.items():
        res = evaluate.evaluate_policy(policy, srcs, refs, reward=reward, method="greedy",
                                       output_prefix=os.path.join(stage_dir, f"{split}.greedy"),
                                       max_input_length=lengths["inputs"], max_decode_length=lengths["targets"])
        out[split] = {k: res[k] for k in SCORE_KEYS}
        out[split]["translations"] = os.path.join(stage_dir, f"{split}.greedy.txt")
        if split == sample_split and sample_n:
            out[split]["sample_reward"] = evaluate.sample_reward(
                policy, srcs, refs, reward, num_samples=sample_n, seed=seed, temperature=temperature,
                max_input_length=lengths["inputs"], max_decode_length=lengths["targets"])
    return out


def kept_start_scores(start_scores: Mapping[str, Any], stage_dir: str) -> dict[str, Any]:
    """The scores of an Improve step that kept its start policy (no evaluation beat it: Sec. 3's selection on
    validation reward), which are its start's: greedy decoding and the seeded samples of the same parameters give
    the same text. The start's translation files are copied into `stage_dir` as scoring would have written them."""
    out = {}
    for split, found in start_scores.items():
        found = dict(found)
        if "translations" in found:
            written = epath.Path(found["translations"])
            found["translations"] = os.path.join(stage_dir, written.name)
            if partitioning.is_chief():
                for path in (written, written.with_suffix(".json")):
                    atomic.write_bytes(os.path.join(stage_dir, path.name), path.read_bytes())
        out[split] = found
    partitioning.sync_processes("rest_jax: kept scores copied")
    return out


def compare_to_bc(rows: list[dict[str, Any]], split: str, data: tuple[list[str], list[str]], reward: Any,
                  seed: int) -> None:
    """Adds to each row but BC `vs_bc` (paired bootstrap on `split`) and `held_out_drops` (see significance)."""
    srcs, refs = data
    needs_ref = reward.needs_reference

    def translations(row: dict[str, Any]) -> tuple[list[str], np.ndarray]:
        path = row["scores"][split].get("translations") or os.path.join(
            os.path.dirname(row["checkpoint"]), f"{split}.greedy.txt")
        hyps = epath.Path(path).read_text().split("\n")[:len(refs)]
        return hyps, rewards_lib.score_pairs(reward, srcs, hyps, refs if needs_ref else None)

    base_hyps, base_rewards = translations(rows[0])
    for row in rows[1:]:
        hyps, row_rewards = translations(row)
        diffs = significance.compare(base_hyps, hyps, refs, base_rewards, row_rewards, seed=seed)
        row["vs_bc"] = {k: d.as_dict() for k, d in diffs.items()}
        row["held_out_drops"] = significance.held_out_drops(diffs, reward.name)


def _grown(g: int, grow_dir: str, store_dir: str, policy_checkpoint: str, vocab_path: str, task: str,
           grow_split: str, max_grow_sources: int | None, lengths: dict[str, int], seed: int, reward: Any,
           stores: list[str], replay_grow_steps: int, grow_rewards: dict[str, np.ndarray]) -> improve_data.GrowData:
    """Grow g (Alg. 1: sample from the latest policy, score), unless finished; its data, with the replayed stores.

    Appends the store to `stores` and its sample rewards to `grow_rewards` (for the plot).
    """
    grown = report.stage_result(grow_dir)
    # A finished Grow whose store was damaged since (e.g. a truncated metadata.json) is redone: the
    # writer keeps intact shards, rewrites the metadata, and names any shard that must be deleted.
    if grown is None or not store_lib.GrowStore.is_complete(store_dir):
        policy = _policy_from(policy_checkpoint, vocab_path)
        sources, references = tasks.read_split(task, grow_split, max_grow_sources)
        meta = grow_lib.grow_dataset(policy, sources, references, store_dir, g, reward=reward,
                                     max_input_length=lengths["inputs"], max_decode_length=lengths["targets"],
                                     seed=seed, checkpoint=policy_checkpoint, vocab_path=vocab_path)
        report.finish_stage(grow_dir, {"name": f"Grow {g}", "store": store_dir, "policy": policy_checkpoint,
                                       "reward_stats": meta.get("reward_stats"), "timing": meta.get("timing")})
    # A store kept from an earlier run must have been sampled with this run's vocabulary and model.
    vocab = vocab_lib.load_vocabulary(vocab_path)
    network = policy_lib.build_network(vocab)
    store_lib.GrowStore(store_dir).check_compatible(vocab=vocab, model_config=network.config)
    # Improve streams the store; only the rewards (4 bytes a record) are read here, for the plot.
    scored = store_lib.GrowStore(store_dir).as_numpy(["reward", "is_reference"])
    grow_rewards[f"Grow {g}"] = scored["reward"][~scored["is_reference"]]
    stores.append(store_dir)
    return improve_data.GrowData.open(stores[-1 - replay_grow_steps:])


def evaluation_splits(task: str, validation_split: str, num_validation: int | None, test_split: str | None,
                      num_test: int | None) -> tuple[dict[str, tuple[list[str], list[str]]], str]:
    """{split: (sources, references)} of the validation split (its first `num_validation`) and the test split
    (None: none), and the split the report is on (test, else validation)."""
    splits = {validation_split: tasks.read_split(task, validation_split, num_validation)}
    if test_split:
        splits[test_split] = tasks.read_split(task, test_split, num_test)
    return splits, test_split or validation_split


def check_bc_run(bc_run: str | None, knob: str) -> None:
    """A run named as the source of the BC policy must have finished its BC stage."""
    if bc_run and not epath.Path(bc_run, "bc", report.STAGE_FILE).exists():
        raise FileNotFoundError(f"{knob}={bc_run!r} has no finished BC stage (bc/{report.STAGE_FILE}); "
                                "run its BC first (configs/experiments/multi30k_study/bc.gin shows how).")


def behaviour_cloning(run_dir: str, task: str, *, lengths: Mapping[str, int], seed: int, vocab_path: str,
                      scores: Callable[[policy_lib.Policy, str], dict[str, Any]]) -> dict[str, Any]:
    """"BC G=0 I=0" (ReST Sec. 2): the stage result of `<run_dir>/bc`, trained and scored unless finished.

    A finished BC's paths (checkpoint, translations) are read under `<run_dir>/bc` as given now
    (`report.stage_result`): a BC shared through `bc_run` may have been trained with a MODEL_DIR relative to
    another working directory, or copied elsewhere (e.g. from gs:// to a workstation)."""
    bc_dir = os.path.join(run_dir, "bc")
    bc = report.stage_result(bc_dir)
    if bc is None:
        console.logger.info("Behaviour cloning in %s", bc_dir)
        started = time.perf_counter()
        train_lib.train(model_dir=bc_dir, task=task, feature_lengths=dict(lengths), seed=seed)
        seconds = time.perf_counter() - started  # of this run (a resumed BC counts only what it ran)
        policy = _policy_from(os.path.join(bc_dir, "checkpoints"), vocab_path)
        bc_scores, eval_seconds = _timed(scores, policy, bc_dir)
        bc = report.finish_stage(bc_dir, {"name": "BC G=0 I=0", "checkpoint": os.path.join(bc_dir, "checkpoints"),
                                          "scores": bc_scores, "seconds": seconds, "eval_seconds": eval_seconds})
    return bc


def _timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and the seconds it took."""
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def wall_times(model_dir: str, rows: Sequence[Mapping[str, Any]], num_grow_steps: int) -> list[dict[str, Any]]:
    """report.json's `wall_times`: seconds of each stage's own work (train / sample+score+write) and of scoring
    its policy on the report's splits, in run order. A stage resumed by a rerun counts only the rerun's part;
    a BC shared through `bc_run` shows the time of the run that trained it."""
    def entry(name: str, seconds: Any, eval_seconds: Any = None) -> dict[str, Any]:
        return {"stage": name, "seconds": seconds, "eval_seconds": eval_seconds}

    out = [entry(rows[0]["name"], rows[0].get("seconds"), rows[0].get("eval_seconds"))]
    improves = {r["name"].split(" ", 1)[1]: r for r in rows[1:]}  # "G=1 I=2" -> row
    for g in range(1, num_grow_steps + 1):
        grown = report.stage_result(os.path.join(model_dir, f"grow_{g}")) or {}
        if grown:
            out.append(entry(grown["name"], (grown.get("timing") or {}).get("total")))
        out.extend(entry(r["name"], r.get("seconds"), r.get("eval_seconds"))
                   for key, r in improves.items() if key.startswith(f"G={g} "))
    return out


def scored_here(bc: dict[str, Any], model_dir: str, split: str, sample_eval_n: int, vocab_path: str,
                scores: Callable[[policy_lib.Policy, str], dict[str, Any]]) -> dict[str, Any]:
    """The BC row with this run's measures on `split`: a BC shared through `bc_run` may have been scored on
    other splits or measures; it is then scored again once (cached in `<model_dir>/bc_scores.json`)."""
    wanted = set(SCORE_KEYS) | ({"sample_reward"} if sample_eval_n else set())
    if wanted <= set(bc["scores"].get(split, {})):
        return bc
    bc_scores = os.path.join(model_dir, "bc_scores.json")
    if not epath.Path(bc_scores).exists():
        found = scores(_policy_from(bc["checkpoint"], vocab_path), os.path.join(model_dir, "bc"))
        if partitioning.is_chief():
            atomic.write_json(bc_scores, found)
        partitioning.sync_processes("rest_jax: BC rescored")
    return dict(bc, scores=atomic.read_json(bc_scores))


_FROM_LENGTHS = "set run_rest.feature_lengths instead"
_FROM_SEED = "set run_rest.seed instead (each stage derives its own seed from it)"


def _refreshed_reward(g: int, model_dir: str, reward: Any, stores: Sequence[str], seed: int) -> dict[str, Any]:
    """The reward-model stage after Grow g (`run_rest.refresh_reward_model`), unless finished: its stage result."""
    out_dir = os.path.join(model_dir, f"reward_{g}")
    done = report.stage_result(out_dir)
    if done is None:
        result = reward_model_lib.refresh_reward_model(reward.model_dir, list(stores), out_dir, seed=seed)
        done = report.finish_stage(out_dir, {"name": f"Reward model after Grow {g}", "dir": out_dir,
                                             "from": reward.model_dir, "stores": list(stores),
                                             "heldout_initial": result["heldout_initial"],
                                             "heldout": result["heldout"]})
    return done


def _best_of_n(model_dir: str, policies: Mapping[str, str], vocab_path: str,
               split: tuple[list[str], list[str]], reward: Any, ns: Sequence[int], seed: int,
               lengths: Mapping[str, int]) -> list[dict[str, Any]]:
    """Best-of-N rows of each named policy checkpoint (a final policy that is still BC's is skipped), cached in
    `best_of_n.json` with the checkpoint each row sampled, so that a rerun does not sample again unless the
    policy changed (a run extended by more Grow or Improve steps has another final policy)."""
    path = os.path.join(model_dir, "best_of_n.json")
    cached = atomic.read_json(path) if os.path.exists(path) else []
    rows, (srcs, refs) = [], split
    for name, ckpt in policies.items():
        if name != "BC" and ckpt == policies["BC"]:
            continue
        # Recorded relative to the run, so that a moved or copied run still finds its rows.
        where = os.path.relpath(ckpt, model_dir)
        # Rows from before the checkpoint was recorded: BC's are still BC's; the final policy's are sampled again.
        recorded = where if name == "BC" else None
        kept = [r for r in cached if r["policy"] == name and r.get("checkpoint", recorded) == where]
        if kept:
            rows += kept
            continue
        for row in evaluate.best_of_n(_policy_from(ckpt, vocab_path), srcs, refs, reward, ns=ns, seed=seed,
                                      max_input_length=lengths["inputs"], max_decode_length=lengths["targets"]):
            rows.append(dict(row, policy=name, checkpoint=where))
    if partitioning.is_chief() and rows != cached:
        atomic.write_json(path, rows)
    return rows


def _markdown(out: Mapping[str, Any], seed: int, reward: Any, sample_eval_n: int,
              sample_eval_temperature: float) -> list[str]:
    """report.md: the table, what is significant, and the best-of-N rows (labelled oracle when they are)."""
    md = [f"# ReST on {out['task']} ({out['reward']} reward, {out['split']} split, seed {seed})\n",
          report.markdown_table(out["rows"], out["split"]), "\n",
          report.significance_notes(out["rows"], out["reward"])]
    if sample_eval_n:
        md.append(f"\nSample reward: mean over {sample_eval_n} samples per source at temperature "
                  f"{sample_eval_temperature} (ReST Table 1); the other columns decode greedily.\n")
    if out.get("wall_times"):
        md.append("\nWall time (this run's own work; + scoring on the report's splits): " + ", ".join(
            f"{w['stage']} {console.format_seconds(w['seconds'])}"
            + (f" + {console.format_seconds(w['eval_seconds'])}" if w.get("eval_seconds") is not None else "")
            for w in out["wall_times"] if w.get("seconds") is not None) + ".\n")
    if "best_of_n" in out:
        oracle = (" The reward reads the reference, so this reranker is an **oracle** (it cannot be used at test "
                  "time); it bounds what a reference-free reranker could reach." if reward.needs_reference else "")
        md.append(f"\nBest-of-N (reward of the reward-best of N samples, temperature 0.8).{oracle}\n")
        md.append("| policy | N | reward | BLEU |\n| --- | ---: | ---: | ---: |\n")
        md.extend(f"| {r['policy']} | {r['n']} | {100 * r['reward']:.1f} | {r['bleu']:.1f} |\n"
                  for r in out["best_of_n"])
    return md


# What the BC stage and the vocabulary of a run (`behaviour_cloning`, `run_vocabulary`) set themselves.
BC_KNOBS = {
    "train.model_dir": "BC runs in <model_dir>/bc", "train.task": "set the run's task instead",
    "train.feature_lengths": "set the run's feature_lengths instead", "train.seed": "set the run's seed instead",
    "train_task_vocabulary.task_name": "the vocabulary is trained on the run's task",
    "train_task_vocabulary.output_dir": "the vocabulary goes to <model_dir>/vocab",
    "train_vocabulary.vocab_size": "set the run's vocab_size instead",
}


@gin.configurable
@gin_utils.sets_knobs({
    **BC_KNOBS,
    "train.model_dir": "BC runs in <run_rest.model_dir>/bc", "train.task": "set run_rest.task instead",
    "train.feature_lengths": _FROM_LENGTHS, "train.seed": _FROM_SEED,
    "grow_dataset.reward": "set run_rest.reward_name instead", "grow_dataset.max_input_length": _FROM_LENGTHS,
    "grow_dataset.max_decode_length": _FROM_LENGTHS, "grow_dataset.seed": _FROM_SEED,
    "grow_dataset.checkpoint": "Grow samples the latest policy", "grow_dataset.vocab_path": "set run_rest.vocab_path",
    "improve_step.reward": "set run_rest.reward_name instead", "improve_step.feature_lengths": _FROM_LENGTHS,
    "improve_step.seed": _FROM_SEED,
    "train_task_vocabulary.task_name": "the vocabulary is trained on run_rest.task",
    "train_vocabulary.vocab_size": "set run_rest.vocab_size instead",
})
def run_rest(model_dir: str = gin.REQUIRED, task: str = gin.REQUIRED, *, vocab_path: str | None = None,
             vocab_size: int = 32000, reward_name: str = "chrf", num_grow_steps: int = 1,
             num_improve_steps: int = 3, include_unfiltered_step: bool = True, grow_split: str = "train",
             max_grow_sources: int | None = None, validation_split: str = "validation",
             num_validation_sources: int | None = 500, test_split: str | None = "test",
             num_test_sources: int | None = None, feature_lengths: dict[str, int] | None = None,
             restart_from_base: bool = False, best_of_n_ns: Sequence[int] = (1, 2, 4, 8, 16),
             eval_max_length: int = 128, seed: int = 0, bc_run: str | None = None, control: bool = False,
             replay_grow_steps: int = 0, sample_eval_n: int = 4, sample_eval_temperature: float = 0.8,
             refresh_reward_model: bool = False) -> dict[str, Any]:
    """ReST: BC → Grow → Improve ×I → Grow ...; prints and writes the paper's table (the `rest` command).

    Args:
      model_dir: Run directory (local or gs://).
      task: Task name (`rest_jax.data.tasks`).
      vocab_path: An existing SentencePiece model; default: train one on the task (`vocab_size`).
      vocab_size: Size of the trained vocabulary (32k in the paper).
      reward_name: Registered reward R(x, y) (`rest_jax.rewards`): 'chrf', 'bleu', 'ter', 'metricx', ...
      num_grow_steps: G.
      num_improve_steps: I, Improve steps with rising thresholds τ_1 < ... < τ_I after each Grow.
      include_unfiltered_step: Also run "I=0" (NLL on the whole D_g, threshold 0) first, as in the paper.
      grow_split: Split whose sources are sampled in Grow.
      max_grow_sources: Use only the first this many sources for Grow (None: all).
      validation_split, num_validation_sources: Split (and its first K sources) for the validation
        reward that picks the best Improve checkpoint.
      test_split, num_test_sources: Held-out split for the report table (None: report validation).
      feature_lengths: {'inputs', 'targets'} token limits for BC, Grow and Improve.
      restart_from_base: ReST-EM (Singh et al. 2023): every Improve starts from the BC policy. (Whether
        Improve trains on the references, and ReST-EM's cap per source: `improve_step.include_references`,
        `improve_step.max_per_source`.)
      best_of_n_ns: N values of the best-of-N curve for the BC and final policies (() to skip).
      eval_max_length: Source and output token limit when scoring the report's splits (training may trim
        harder: `feature_lengths`), so long held-out sentences are translated whole.
      seed: Seeds BC, Grow sampling and Improve data order.
      bc_run: A run directory whose vocabulary and finished BC stage this run starts from instead of training
        its own (several runs of a study then share one BC policy per seed and are paired against it).
      control: The compute- and schedule-matched control of issue 13: no Grow; every Improve step, with the
        same schedule, learning rates, steps and checkpoint selection, trains on the original pairs D of
        `grow_split` (all of them) instead of a Grow store: BC continued at Improve's lower rate. ReST's gain
        over this row is what self-training adds beyond fine-tuning at a lower rate.
      replay_grow_steps: Improve at Grow g also trains on the stores of the previous this-many Grow steps
        (pooled; their references count once per store).
      sample_eval_n, sample_eval_temperature: Each policy's mean reward over this many samples per test
        source at this temperature (ReST's Table 1 measure; keep it at the Grow temperature), beside greedy.
        0: greedy only.
      refresh_reward_model: Before every Grow after the first, retrain the learned reward model on the Grow
        stores so far (`reward_model.refresh_reward_model`; ReST Sec. 6 names this as future work) and score that
        Grow with it; its held-out agreement with the teacher, before and after, goes into the report. Needs
        reward_name='learned'. Validation, checkpoint selection and the report keep the original reward, so
        that every row is measured alike. Off by default.

    Returns:
      The report (also in `<model_dir>/report.json`).
    """
    lengths = dict(feature_lengths or {"inputs": 128, "targets": 128})
    eval_lengths = {k: max(v, eval_max_length) for k, v in lengths.items()}
    if replay_grow_steps < 0:
        raise ValueError(f"run_rest.replay_grow_steps={replay_grow_steps}; expected >= 0.")
    if refresh_reward_model and reward_name != "learned":
        raise ValueError(f"run_rest.refresh_reward_model=True needs a learned reward model (reward_name='learned' "
                         f"with LearnedReward.model_dir); the reward is {reward_name!r}.")
    check_bc_run(bc_run, "run_rest.bc_run")
    vocab_path = run_vocabulary(bc_run or model_dir, task, vocab_path, vocab_size)
    reward = rewards_lib.get(reward_name)
    eval_splits, report_split = evaluation_splits(task, validation_split, num_validation_sources, test_split,
                                                  num_test_sources)
    val = eval_splits[validation_split]

    def scores(policy: policy_lib.Policy, splits: dict[str, tuple[list[str], list[str]]], out_dir: str) -> dict:
        return stage_scores(policy, reward, splits, out_dir, eval_lengths, report_split, sample_eval_n,
                            sample_eval_temperature, seed)

    bc = behaviour_cloning(bc_run or model_dir, task, lengths=lengths, seed=seed, vocab_path=vocab_path,
                           scores=lambda policy, out_dir: scores(policy, eval_splits, out_dir))
    rows = [bc]
    base_checkpoint = bc["checkpoint"]
    latest_checkpoint = base_checkpoint
    curves: dict[str, list] = {}
    grow_rewards: dict[str, np.ndarray] = {}
    thresholds: dict[str, float] = {}

    improve_indices = list(range(0 if include_unfiltered_step else 1, num_improve_steps + 1))
    improves_done = 0  # Improve steps behind the latest policy: the learning rate falls with each (ReST Sec. 3)
    original = None
    if control:
        srcs, refs = tasks.read_split(task, grow_split, None)
        original = improve_data.GrowData.from_pairs(_policy_from(base_checkpoint, vocab_path).vocab, srcs, refs,
                                                    lengths)
    stores: list[str] = []
    # The rows this run scored, by checkpoint (a BC shared through `bc_run` was scored by its own run's settings).
    scored = {} if bc_run else {base_checkpoint: bc}
    grow_reward, refreshes = reward, []
    for g in range(1, num_grow_steps + 1):
        grow_dir = os.path.join(model_dir, f"grow_{g}")
        store_dir = os.path.join(grow_dir, "store")
        if refresh_reward_model and g > 1:
            refreshes.append(_refreshed_reward(g - 1, model_dir, grow_reward, stores, seed + g))
            grow_reward = rewards_lib.get("learned", model_dir=refreshes[-1]["dir"])
        if control:
            data = original
        else:
            data = _grown(g, grow_dir, store_dir, latest_checkpoint, vocab_path, task, grow_split,
                          max_grow_sources, lengths, seed, grow_reward, stores, replay_grow_steps, grow_rewards)
        for i in improve_indices:
            stage_dir = os.path.join(grow_dir, f"improve_{i}")
            done = report.stage_result(stage_dir)
            if done is None:
                start = base_checkpoint if restart_from_base else latest_checkpoint
                policy = _policy_from(start, vocab_path)
                params, result = improve_lib.improve_step(
                    policy, data, stage_dir, i, val, reward=reward, feature_lengths=lengths, seed=seed + 1000 * g + i,
                    prior_improves=0 if restart_from_base else improves_done,
                    bc_policy=None if start == base_checkpoint else base_checkpoint)  # BVMPO/GOLD's frozen π_BC
                if result["best_step"] == 0 and start in scored:  # kept its start: scoring it again is waste
                    found, eval_seconds = _timed(kept_start_scores, scored[start]["scores"], stage_dir)
                else:
                    found, eval_seconds = _timed(scores, policy.replace(params), eval_splits, stage_dir)
                result.update(name=f"{'Control' if control else 'ReST'} G={g} I={i}", start=start,
                              scores=found, eval_seconds=eval_seconds)
                done = report.finish_stage(stage_dir, result)
            rows.append(done)
            scored[done["checkpoint"]] = done
            curves[done["name"]] = [tuple(p) for p in done.get("curve", [])]
            if done.get("threshold") is not None:
                thresholds[f"G={g} I={i}"] = done["threshold"]
            latest_checkpoint = done["checkpoint"]
            improves_done += 1

    rows[0] = scored_here(bc, model_dir, report_split, sample_eval_n, vocab_path,
                          lambda policy, out_dir: scores(policy, eval_splits, out_dir))
    compare_to_bc(rows, report_split, eval_splits[report_split], reward, seed)
    table_rows = []
    for r in rows:
        s = r["scores"][report_split]
        table_rows.append({"name": r["name"], "reward": s["reward"], "bleu": s["bleu"], "chrf": s["chrf"],
                           "ter": s.get("ter"), "sample_reward": s.get("sample_reward"),
                           "vs_bc": r.get("vs_bc"), "held_out_drops": r.get("held_out_drops"),
                           "kept_fraction": r.get("kept_fraction"), "threshold": r.get("threshold")})
    out = {"task": task, "reward": reward_name, "split": report_split, "rows": table_rows, "stages": rows,
           "wall_times": wall_times(model_dir, rows, num_grow_steps)}
    if refreshes:
        out["reward_refreshes"] = refreshes

    # Every process computes the same report (each evaluates the same sentences); process 0 writes and prints it.
    chief = partitioning.is_chief()
    plots = os.path.join(model_dir, "plots")
    if grow_rewards and chief:
        report.plot_reward_distributions(grow_rewards, thresholds, os.path.join(plots, "grow_rewards.png"))
    if curves and chief:
        report.plot_validation_curves(curves, os.path.join(plots, "validation_reward.png"))
    if best_of_n_ns:
        out["best_of_n"] = _best_of_n(model_dir, {"BC": base_checkpoint, "ReST (final)": latest_checkpoint},
                                      vocab_path, eval_splits[report_split], reward, best_of_n_ns, seed, eval_lengths)
        if chief:
            report.plot_best_of_n(out["best_of_n"], os.path.join(plots, "best_of_n.png"))
    md = _markdown(out, seed, reward, sample_eval_n, sample_eval_temperature)
    if chief:
        atomic.write_json(os.path.join(model_dir, "report.json"), out)
        atomic.write_text(os.path.join(model_dir, "report.md"), "".join(md))
        print("".join(md))
    return out
