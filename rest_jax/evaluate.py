"""Translation, corpus metrics, rewards and best-of-N for any checkpoint on any split.

Corpus BLEU and chrF come from sacreBLEU with their signatures recorded; rewards come from the reward
registry (`rest_jax.rewards`). Best-of-N reranking follows ReST Sec. 5 ("ReST with N < 10 matched BC with
N = 200"): sample N candidates, keep the one the reward model likes most.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Sequence

import gin
import numpy as np
import sacrebleu
from etils import epath

from rest_jax import metrics as metrics_lib
from rest_jax import partitioning
from rest_jax import policy as policy_lib
from rest_jax import report
from rest_jax import rewards as rewards_lib
from rest_jax import significance
from rest_jax.data import tasks
from rest_jax.io import atomic
from rest_jax.io import console



# sacreBLEU's corpus metrics at their defaults; TER is the one where lower is better.
_CORPUS_METRICS = {"bleu": sacrebleu.metrics.BLEU, "chrf": sacrebleu.metrics.CHRF, "ter": sacrebleu.metrics.TER}


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU, chrF and TER (sacreBLEU defaults) with their signatures."""
    out = {}
    for name, metric_class in _CORPUS_METRICS.items():
        metric = metric_class()
        out[name] = metric.corpus_score(list(hypotheses), [list(references)]).score
        out[f"{name}_signature"] = str(metric.get_signature())
    return out


@gin.configurable
@dataclasses.dataclass(frozen=True)
class HeldoutGuard:
    """Checkpoint selection that a reward hack cannot win: the reward-hacking monitor applied while choosing.

    Improve steps and online runs keep the policy with the best validation reward. A policy that games the reward
    (ReST Sec. 6: "reward hacking"; e.g. longer translations that sentence chrF pays for) wins that selection, and
    the report flags it only afterwards. With a guard, a policy counts as better only if its corpus `metric`
    against the validation references, a metric other than the reward, is at most `max_drop` points worse than
    the starting policy's (gin: `improve_step.heldout_guard = @HeldoutGuard()`, the same for `online`).

    Attributes:
      metric: sacreBLEU's 'bleu', 'chrf' or 'ter' (for TER "worse" means higher).
      max_drop: Points of `metric` a selected policy may lose against the start (0: none).
    """

    metric: str = "bleu"
    max_drop: float = 1.0

    def __post_init__(self):
        if self.metric not in _CORPUS_METRICS:
            raise ValueError(f"HeldoutGuard.metric={self.metric!r}; expected one of {tuple(_CORPUS_METRICS)}.")
        if not math.isfinite(self.max_drop) or self.max_drop < 0:
            raise ValueError(f"HeldoutGuard.max_drop={self.max_drop}; expected a finite number of points >= 0.")

    def measure(self, hypotheses: Sequence[str], references: Sequence[str]) -> float:
        """The corpus metric of the translations."""
        return _CORPUS_METRICS[self.metric]().corpus_score(list(hypotheses), [list(references)]).score

    def loss(self, value: float, start: float) -> float:
        """How many points of the metric `value` is worse than `start` (negative: better)."""
        return value - start if self.metric == "ter" else start - value

    def allows(self, value: float, start: float) -> bool:
        return self.loss(value, start) <= self.max_drop


def mean_reward(reward: Any, sources: Sequence[str], hypotheses: Sequence[str],
                references: Sequence[str] | None) -> float:
    scores = rewards_lib.score_pairs(reward, sources, hypotheses, references if reward.needs_reference else None)
    return float(np.mean(scores))


def compare_translations(baseline: Sequence[str], system: Sequence[str], sources: Sequence[str],
                         references: Sequence[str], reward: Any, metrics: Sequence[str] = significance.CORPUS_METRICS,
                         seed: int = 0) -> dict[str, significance.Difference]:
    """`system` − `baseline`, two systems' translations of the same sentences: the paired bootstrap over the
    sentences of each corpus metric and of the mean reward (what a report's "vs BC" columns hold)."""
    def rewards_of(hypotheses: Sequence[str]) -> np.ndarray:
        return rewards_lib.score_pairs(reward, sources, hypotheses, references if reward.needs_reference else None)

    return significance.compare(baseline, system, references, rewards_of(baseline), rewards_of(system),
                                metrics=metrics, seed=seed)


def evaluate_policy(policy: policy_lib.Policy, sources: Sequence[str], references: Sequence[str], *, reward: Any = None,
                    method: str = "greedy", output_prefix: str | os.PathLike | None = None,
                    **generate_kwargs: Any) -> dict[str, Any]:
    """BLEU, chrF and mean reward of `policy`'s translations; writes `<prefix>.txt` and `<prefix>.json`."""
    started = time.perf_counter()
    name = "eval" if output_prefix is None else f"eval {os.fspath(output_prefix)}"
    generate_kwargs.setdefault("progress_desc", name)
    max_input_length = generate_kwargs.get("max_input_length", 128)
    source_tokens, trimmed = policy_lib.tokenize(policy.vocab, sources, max_input_length)
    if trimmed:
        logging.info("%d of %d sources trimmed to %d tokens.", trimmed, len(sources), max_input_length)
    gen_started = time.perf_counter()
    gens = policy.generate(sources, method=method, split_across_processes=True, source_tokens=source_tokens,
                           **generate_kwargs)
    seconds = time.perf_counter() - gen_started
    hyps = gens.first()
    # Useful decoding work: every row of a beam search runs as a sample would (lengths of the kept hypothesis).
    rows = {"beam": generate_kwargs.get("beam_size", 4), "sample": generate_kwargs.get("num_samples", 1)}.get(method, 1)
    out_tokens = sum(len(c[0]) for c in gens.tokens)
    flops = metrics_lib.estimate_decode_flops(policy.config, len(sources), rows,
                                              float(np.mean([len(t) for t in source_tokens] or [0])),
                                              out_tokens / max(len(sources), 1))
    speed = metrics_lib.throughput(out_tokens / seconds, flops / seconds, policy.config.dtype)
    result = corpus_scores(hyps, references)
    result["method"] = method
    result["num_sentences"] = len(hyps)
    if reward is not None:
        result["reward"] = mean_reward(reward, sources, hyps, references)
        result["reward_name"] = reward.name
    if output_prefix is not None:
        prefix = epath.Path(output_prefix)
        atomic.write_text(prefix.parent / (prefix.name + ".txt"), "".join(h + "\n" for h in hyps))
        atomic.write_json(prefix.parent / (prefix.name + ".json"), result)
    reward_text = f", reward {result['reward']:.4f}" if "reward" in result else ""
    console.stage_done(name, time.perf_counter() - started,
                       f"BLEU {result['bleu']:.2f}, chrF {result['chrf']:.2f}{reward_text} ({len(hyps)} sentences, "
                       f"{method}; decoding {seconds:.1f}s at {speed})")
    return result


def sample_reward(policy: policy_lib.Policy, sources: Sequence[str], references: Sequence[str], reward: Any, *,
                  num_samples: int = 4, seed: int = 0, temperature: float = 0.8, **generate_kwargs: Any) -> float:
    """Mean reward over `num_samples` samples per source at `temperature`: the measure of ReST's Table 1
    (the policy's expected reward), beside the greedy translation's."""
    generate_kwargs.setdefault("progress_desc", f"{num_samples} samples")
    gens = policy.generate(sources, method="sample", num_samples=num_samples, seed=seed, temperature=temperature,
                           split_across_processes=True, **generate_kwargs)
    flat_src = [s for s in sources for _ in range(num_samples)]
    flat_ref = [r for r in references for _ in range(num_samples)] if reward.needs_reference else None
    return float(np.mean(rewards_lib.score_pairs(reward, flat_src, [h for c in gens.texts for h in c], flat_ref)))


def best_of_n(policy: policy_lib.Policy, sources: Sequence[str], references: Sequence[str], reward: Any, *,
              ns: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), seed: int = 0, temperature: float = 0.8,
              **generate_kwargs: Any) -> list[dict[str, float]]:
    """Reward (and BLEU) of the reward-best of the first N samples, for each N in `ns` (ReST Sec. 5).

    One set of max(ns) samples is drawn; the first N of them form the N-candidate pool, so the curve is
    monotone in expectation and costs one sampling pass.
    """
    started = time.perf_counter()
    n_max = max(ns)
    generate_kwargs.setdefault("progress_desc", f"best-of-{n_max}")
    gens = policy.generate(sources, method="sample", num_samples=n_max, seed=seed, temperature=temperature,
                           split_across_processes=True, **generate_kwargs)
    flat_src = [s for s in sources for _ in range(n_max)]
    flat_ref = [r for r in references for _ in range(n_max)] if reward.needs_reference else None
    flat_hyp = [h for cands in gens.texts for h in cands]
    scores = rewards_lib.score_pairs(reward, flat_src, flat_hyp, flat_ref).reshape(len(sources), n_max)
    table = []
    for n in sorted(ns):
        best = np.argmax(scores[:, :n], axis=1)
        chosen = [gens.texts[i][j] for i, j in enumerate(best)]
        row = {"n": n, "reward": float(np.mean(scores[np.arange(len(sources)), best]))}
        row.update({k: v for k, v in corpus_scores(chosen, references).items() if k in ("bleu", "chrf")})
        table.append(row)
    console.stage_done(f"best-of-{n_max}", time.perf_counter() - started,
                       ", ".join(f"N={r['n']} reward {r['reward']:.4f}" for r in table) + f" ({len(sources)} sources)")
    return table


@gin.configurable
def evaluate(checkpoint: str = gin.REQUIRED, vocabulary: str = gin.REQUIRED, output_dir: str = gin.REQUIRED,
             task: str = gin.REQUIRED, split: str = "validation", method: str = "greedy",
             reward_name: str | None = "chrf", limit: int | None = None, best_of_n_ns: Sequence[int] = (),
             step: int | None = None, batch_size: int = 64, max_input_length: int = 128,
             max_decode_length: int = 128, beam_size: int = 4, alpha: float = 0.6) -> dict[str, Any]:
    """The `rest_jax eval` subcommand: scores of a checkpoint on a split.

    Writes `<output_dir>/<split>.<method>.txt` (one translation per line) and `.json` (BLEU, chrF,
    signatures, mean reward), plus a best-of-N table and plot when `best_of_n_ns` is set.

    Args:
      checkpoint, vocabulary, step: The policy (`load_policy`; step None: the latest).
      output_dir: Where the translations and scores go.
      task, split, limit: The data: a task's split, its first `limit` sentences (None: all).
      method: 'greedy' or 'beam'.
      reward_name: Registered reward to average over the translations (None: BLEU and chrF only).
      best_of_n_ns: N values of a best-of-N table (ReST Sec. 5); empty: none.
      batch_size, max_input_length, max_decode_length: Sources per decoding batch; token limits.
      beam_size, alpha: Beam width and GNMT length penalty (method 'beam').
    """
    policy = policy_lib.load_policy(checkpoint, vocabulary, step)
    sources, references = tasks.read_split(task, split, limit)
    reward = rewards_lib.get(reward_name) if reward_name else None
    out = epath.Path(output_dir)
    decode = dict(batch_size=batch_size, max_input_length=max_input_length, max_decode_length=max_decode_length)
    result = evaluate_policy(policy, sources, references, reward=reward, method=method,
                             output_prefix=out / f"{split}.{method}", beam_size=beam_size, alpha=alpha, **decode)
    logging.info("%s %s: BLEU %.2f chrF %.2f (%s | %s)", split, method, result["bleu"], result["chrf"],
                 result["bleu_signature"], result["chrf_signature"])
    chief = partitioning.is_chief()  # every process has all the translations; process 0 reports
    if chief:
        print(json.dumps({k: v for k, v in result.items()}, indent=2))
    if best_of_n_ns and reward is not None:
        table = best_of_n(policy, sources, references, reward, ns=best_of_n_ns, **decode)
        for row in table:
            row["policy"] = "checkpoint"
        if chief:
            atomic.write_json(out / f"{split}.best_of_n.json", table)
            report.plot_best_of_n(table, out / f"{split}.best_of_n.png")
        result["best_of_n"] = table
    return result


@gin.configurable
def infer(checkpoint: str = gin.REQUIRED, vocabulary: str = gin.REQUIRED, input_file: str = gin.REQUIRED,
          output_file: str = gin.REQUIRED, method: str = "greedy", step: int | None = None, batch_size: int = 64,
          max_input_length: int = 128, max_decode_length: int = 128, beam_size: int = 4,
          alpha: float = 0.6) -> None:
    """The `rest_jax infer` subcommand: translates each line of `input_file` into `output_file`.

    Args:
      checkpoint, vocabulary, step: The policy (`load_policy`; step None: the latest).
      input_file, output_file: One source sentence per line in; one translation per line out.
      method: 'greedy' or 'beam'.
      batch_size, max_input_length, max_decode_length: Sources per decoding batch; token limits.
      beam_size, alpha: Beam width and GNMT length penalty (method 'beam').
    """
    from rest_jax.data import text_files  # pylint: disable=import-outside-toplevel

    policy = policy_lib.load_policy(checkpoint, vocabulary, step)
    sources = list(text_files.read_lines(input_file))
    hyps = policy.generate(sources, method=method, progress_desc="translate", split_across_processes=True,
                           batch_size=batch_size, max_input_length=max_input_length,
                           max_decode_length=max_decode_length, beam_size=beam_size, alpha=alpha).first()
    atomic.write_text(output_file, "".join(h + "\n" for h in hyps))


@gin.configurable
def score(sources_file: str = gin.REQUIRED, hypotheses_file: str = gin.REQUIRED,
          references_file: str | None = None, reward_name: str = "chrf", output_file: str | None = None) -> None:
    """The `rest_jax score` subcommand: per-sentence rewards of a hypothesis file (one per line)."""
    from rest_jax.data import text_files  # pylint: disable=import-outside-toplevel

    srcs = list(text_files.read_lines(sources_file))
    hyps = list(text_files.read_lines(hypotheses_file, allow_empty=True))
    refs = list(text_files.read_lines(references_file)) if references_file else None
    if len(hyps) != len(srcs) or (refs is not None and len(refs) != len(srcs)):
        raise ValueError(f"Line counts differ: {sources_file} has {len(srcs)}, {hypotheses_file} {len(hyps)}"
                         + (f", {references_file} {len(refs)}" if refs is not None else "") + ".")
    reward = rewards_lib.get(reward_name)
    scores = rewards_lib.score_pairs(reward, srcs, hyps, refs)
    text = "".join(f"{s:.6f}\n" for s in scores)
    if output_file:
        atomic.write_text(output_file, text)
    print(f"mean {reward_name} reward: {float(np.mean(scores)):.4f} over {len(scores)} sentences")


