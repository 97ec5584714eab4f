"""How sure a result is: paired bootstrap against a baseline on one test set, and intervals over seeds.

Paired bootstrap resampling (Koehn 2004, as sacreBLEU's `--paired-bs`): draw the test sentences with
replacement, score both systems on the same draw, and read the 95% interval and the two-sided p-value of the
difference off the resampled differences. Corpus metrics (BLEU, chrF, TER) are recomputed from sacreBLEU's
per-sentence sufficient statistics, so a resample costs a sum, not a rescoring; the mean reward is its own
statistic. Over seeds, `seed_interval` gives the mean and the half-width of Student's t 95% interval.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np
import sacrebleu

CORPUS_METRICS = ("bleu", "chrf", "ter")
LOWER_IS_BETTER = ("ter",)


@dataclasses.dataclass(frozen=True)
class Difference:
    """`system − baseline` on one metric: the observed difference, its 95% interval and two-sided p-value."""

    metric: str
    baseline: float
    system: float
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def delta(self) -> float:
        return self.system - self.baseline

    @property
    def significant(self) -> bool:
        return self.p_value < 0.05

    @property
    def better(self) -> bool:
        """Significantly better (for TER: lower)."""
        return self.significant and (self.delta < 0 if self.metric in LOWER_IS_BETTER else self.delta > 0)

    @property
    def worse(self) -> bool:
        return self.significant and not self.better

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "delta": self.delta, "significant": self.significant}


def _metric(name: str) -> Any:
    return {"bleu": sacrebleu.metrics.BLEU, "chrf": sacrebleu.metrics.CHRF, "ter": sacrebleu.metrics.TER}[name]()


def sentence_statistics(metric: str, hypotheses: Sequence[str], references: Sequence[str]
                        ) -> tuple[np.ndarray, Callable[[np.ndarray], float]]:
    """([n, k] per-sentence sufficient statistics, score of their column sums) of a sacreBLEU corpus metric."""
    m = _metric(metric)
    table = np.asarray(m._extract_corpus_statistics(list(hypotheses), [list(references)]), np.float64)  # pylint: disable=protected-access
    return table, lambda sums: float(m._compute_score_from_stats(list(sums)).score)  # pylint: disable=protected-access


def paired_bootstrap(baseline: np.ndarray, system: np.ndarray, score: Callable[[np.ndarray], float], metric: str,
                     num_samples: int = 1000, seed: int = 0) -> Difference:
    """Paired bootstrap of `score(system) − score(baseline)` over sentences (rows of the [n, k] statistics).

    The interval is the 2.5th-97.5th percentile of the resampled differences; the p-value is twice the
    smaller share of resampled differences on either side of 0 (at most 1).
    """
    baseline, system = np.asarray(baseline, np.float64), np.asarray(system, np.float64)
    if baseline.shape != system.shape or baseline.ndim != 2 or not len(baseline):
        raise ValueError(f"paired_bootstrap: statistics of shapes {baseline.shape} and {system.shape}; expected "
                         "the same [n, k] with n > 0 (one row per test sentence, in the same order)")
    draws = np.random.default_rng(seed).integers(0, len(baseline), size=(num_samples, len(baseline)))
    counts = np.stack([np.bincount(d, minlength=len(baseline)) for d in draws]).astype(np.float64)
    base_sums, sys_sums = counts @ baseline, counts @ system
    deltas = np.array([score(s) - score(b) for b, s in zip(base_sums, sys_sums)])
    p = min(1.0, 2.0 * min(np.mean(deltas <= 0), np.mean(deltas >= 0)))
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    return Difference(metric, score(baseline.sum(0)), score(system.sum(0)), float(lo), float(hi), float(p))


def compare(baseline: Sequence[str], system: Sequence[str], references: Sequence[str],
            baseline_rewards: np.ndarray | None = None, system_rewards: np.ndarray | None = None,
            metrics: Sequence[str] = CORPUS_METRICS, num_samples: int = 1000, seed: int = 0) -> dict[str, Difference]:
    """`system` against `baseline` (translations of the same sentences) on each corpus metric, and on the mean
    of per-sentence rewards when given (both or neither)."""
    if len(baseline) != len(system) or len(system) != len(references):
        raise ValueError(f"compare: {len(baseline)} baseline and {len(system)} system translations for "
                         f"{len(references)} references")
    out = {}
    for name in metrics:
        base, score = sentence_statistics(name, baseline, references)
        sys_stats, _ = sentence_statistics(name, system, references)
        out[name] = paired_bootstrap(base, sys_stats, score, name, num_samples, seed)
    if (baseline_rewards is None) != (system_rewards is None):
        raise ValueError("compare: give the per-sentence rewards of both systems or of neither")
    if baseline_rewards is not None:
        mean = lambda sums: float(sums[0] / len(references))  # noqa: E731
        out["reward"] = paired_bootstrap(np.asarray(baseline_rewards)[:, None], np.asarray(system_rewards)[:, None],
                                         mean, "reward", num_samples, seed)
    return out


def seed_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of Student's t interval) over seeds; the half-width is NaN for one seed."""
    x = np.asarray(values, np.float64)
    if not len(x):
        raise ValueError("seed_interval: no values")
    if len(x) == 1:
        return float(x[0]), float("nan")
    # Imported here: scipy.stats takes ~1 s to import, and most commands never print an interval over seeds.
    from scipy import stats  # pylint: disable=g-import-not-at-top
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
    return float(x.mean()), float(half)


def held_out_drops(differences: Mapping[str, Difference], reward_name: str) -> list[str]:
    """The corpus metrics other than the reward that got significantly worse: the paper's reward-hacking
    monitor (a policy that games the reward loses on metrics it was not trained on)."""
    return [m for m, d in differences.items() if m in CORPUS_METRICS and m != reward_name and d.worse]


def _cell(values: Sequence[float], scale: float, signed: bool = False) -> str:
    mean, half = seed_interval(values)
    sign = "+" if signed else ""
    return f"{mean * scale:{sign}.1f}" + ("" if np.isnan(half) else f" ± {half * scale:.1f}")


def seed_table(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    """Rows of several seeds' reports as one markdown table: mean ± 95% t-interval over seeds.

    Args:
      runs: {row label: the report rows (`report.json` "rows", BC first) of each seed, in seed order}; every
        seed's rows are compared with that seed's own BC row (paired over seeds).
    Returns:
      (markdown, one dict per table row with the per-seed values).
    """
    lines = ["| run | seeds | reward (greedy) | Δ reward vs BC | sample reward | Δ sample reward | BLEU | Δ BLEU | "
             "chrF | TER | seeds better / worse than BC (p < 0.05) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    table = []
    for label, seeds in runs.items():
        names = [r["name"] for r in seeds[0]]
        for name in names:
            per_seed = [(next(r for r in rows if r["name"] == name), rows[0]) for rows in seeds
                        if any(r["name"] == name for r in rows)]
            if name.startswith("BC") and table and table[0]["name"].startswith("BC"):
                continue  # one BC row: every run of a seed shares it
            get = lambda key, pairs=per_seed: [r.get(key) for r, _ in pairs]  # noqa: E731
            delta = lambda key, pairs=per_seed: [r[key] - b[key] for r, b in pairs  # noqa: E731
                                                 if r.get(key) is not None and b.get(key) is not None]
            is_bc = name.startswith("BC")
            entry = {"name": name if is_bc else f"{label}: {name}", "seeds": len(per_seed),
                     **{k: get(k) for k in ("reward", "sample_reward", "bleu", "chrf", "ter")}}
            sig = [(r.get("vs_bc") or {}).get("reward") for r, _ in per_seed]
            better = sum(1 for d in sig if d and d["significant"] and d["delta"] > 0)
            worse = sum(1 for d in sig if d and d["significant"] and d["delta"] < 0)
            cells = [entry["name"], str(len(per_seed)), _cell(entry["reward"], 100),
                     "-" if is_bc else _cell(delta("reward"), 100, True),
                     _cell(entry["sample_reward"], 100) if None not in entry["sample_reward"] else "-",
                     "-" if is_bc or None in entry["sample_reward"] else _cell(delta("sample_reward"), 100, True),
                     _cell(entry["bleu"], 1), "-" if is_bc else _cell(delta("bleu"), 1, True),
                     _cell(entry["chrf"], 1), _cell(entry["ter"], 1) if None not in entry["ter"] else "-",
                     "-" if is_bc else f"{better} / {worse}"]
            lines.append("| " + " | ".join(cells) + " |")
            table.append(entry)
    return "\n".join(lines) + "\n", table


def stage_differences(runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]], label: str, baseline: str
                      ) -> str:
    """`label`'s rows minus `baseline`'s at the same stage (the "G=g I=i" of their names), paired by seed, as
    markdown: e.g. ReST against its schedule-matched control."""
    def stages(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
        return {r["name"].split(" ", 1)[1]: r for r in rows if not r["name"].startswith("BC")}

    lines = [f"| {label} − {baseline} at | seeds | Δ reward (greedy) | Δ sample reward | Δ BLEU | Δ chrF |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    pairs = [(stages(a), stages(b)) for a, b in zip(runs[label], runs[baseline])]
    for stage in pairs[0][0] if pairs else []:
        both = [(a[stage], b[stage]) for a, b in pairs if stage in a and stage in b]
        cells = [stage, str(len(both))]
        for key, scale in (("reward", 100), ("sample_reward", 100), ("bleu", 1), ("chrf", 1)):
            diffs = [x[key] - y[key] for x, y in both if x.get(key) is not None and y.get(key) is not None]
            cells.append(_cell(diffs, scale, True) if diffs else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
