"""Improve-step filters over a scored Grow dataset (ReST, Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2).

The paper's filter is F(x, y; τ_i) = 1[R(x, y) > τ_i] (strict) with thresholds rising over Improve steps,
τ_1 above the mean reward of the Grow data. REST.md "Variants" adds per-source thresholds (a source's own
p-th percentile, or τ(x) = γ·max + (1−γ)·mean of its rewards with γ rising) and top-k per source, because a
global τ can leave hard sources with no data. Cheap validity filters (empty output, length against the
reference, copy of the source, and optionally duplicate pairs) run first, on samples only: a reference is
never dropped by them.

Everything works on NumPy arrays over the M Grow examples: `rewards` float [M], `source_ids` int [M] and,
for the validity filters, `sources`/`candidates` texts [M]. Per-source statistics are vectorised (sort by
source, then reduce), so tens of millions of examples filter in seconds.

Schedules are indexed by Improve step i = 0, 1, 2, ...; step 0 is the report row "ReST G=g I=0" (the whole
Grow dataset), which is why the paper's list starts with τ = 0.0 = keep all. A `None` entry in any schedule
also means "no reward filter at this step".
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import gin
import numpy as np

DEFAULT_THRESHOLDS = (0.0, 0.7, 0.8, 0.9, 0.95, 0.99)  # Gulcehre et al. 2023, experiments.
DEFAULT_PERCENTILES = (0.0, 50.0, 70.0, 80.0, 90.0, 95.0)  # Choice; REST.md: reward saturates past p = 90.
DEFAULT_GAMMAS = (None, 0.0, 0.25, 0.5, 0.75, 1.0)  # Choice; γ = 0 keeps above-mean, γ = 1 the best.
DEFAULT_TOP_KS = (None, 16, 8, 4, 2, 1)  # Choice; N is 25-100 in the paper.


# --------------------------------------------------------------------------------------------- schedules


def _schedule_value(schedule: Sequence[Any], step: int, knob: str) -> Any:
    if step < 0:
        raise ValueError(f"Improve step must be >= 0, got {step}")
    if step >= len(schedule):
        raise ValueError(f"Improve step {step} has no entry in {knob} {tuple(schedule)} "
                         f"(steps 0..{len(schedule) - 1}); extend the schedule in your gin config")
    return schedule[step]


def _check_rising(schedule: Sequence[Any], knob: str, lo: float, hi: float) -> None:
    values = [v for v in schedule if v is not None]
    for v in values:
        if not lo <= v <= hi:
            raise ValueError(f"{knob} {tuple(schedule)}: value {v} outside [{lo}, {hi}]")
    if any(b < a for a, b in zip(values, values[1:])):
        raise ValueError(f"{knob} {tuple(schedule)} must not decrease: the paper raises the bar per Improve step")


@gin.configurable
def threshold_for_step(step: int, schedule: Sequence[float] = DEFAULT_THRESHOLDS) -> float:
    """τ_i of the paper's global filter for Improve step `step` (0 = keep all)."""
    _check_rising(schedule, "threshold_for_step.schedule", 0.0, 1.0)
    return _schedule_value(schedule, step, "threshold_for_step.schedule")


@gin.configurable
def percentile_for_step(step: int, schedule: Sequence[float | None] = DEFAULT_PERCENTILES) -> float | None:
    """Per-source percentile p (0-100) for Improve step `step`."""
    _check_rising(schedule, "percentile_for_step.schedule", 0.0, 100.0)
    return _schedule_value(schedule, step, "percentile_for_step.schedule")


@gin.configurable
def gamma_for_step(step: int, schedule: Sequence[float | None] = DEFAULT_GAMMAS) -> float | None:
    """Per-source interpolation γ in [0, 1] for Improve step `step`."""
    _check_rising(schedule, "gamma_for_step.schedule", 0.0, 1.0)
    return _schedule_value(schedule, step, "gamma_for_step.schedule")


@gin.configurable
def top_k_for_step(step: int, schedule: Sequence[int | None] = DEFAULT_TOP_KS) -> int | None:
    """Candidates kept per source at Improve step `step` (falling k = rising bar)."""
    values = [v for v in schedule if v is not None]
    if any(v < 1 for v in values) or any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"top_k_for_step.schedule {tuple(schedule)} must hold ints >= 1 that do not increase")
    return _schedule_value(schedule, step, "top_k_for_step.schedule")


def check_first_threshold(tau_1: float, mean_reward: float) -> bool:
    """Warns (logging.warning) unless τ_1 is above the mean Grow reward, as the paper requires (Sec. 2).

    `mean_reward` is the mean over the whole Grow dataset (all hosts' shards). Returns True when it holds.
    """
    if not tau_1 > mean_reward:
        logging.warning("ReST filter: first Improve threshold tau_1=%.4g is not above the mean Grow reward "
                        "%.4g; the paper requires tau_1 > mean so the first Improve step filters out "
                        "below-average samples. Raise threshold_for_step.schedule[1].", tau_1, mean_reward)
        return False
    return True


# ----------------------------------------------------------------------------------------- reward filters


def _check_arrays(rewards: np.ndarray, source_ids: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    rewards = np.asarray(rewards)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be 1-D [M], got shape {rewards.shape}")
    if not np.all(np.isfinite(rewards)):
        i = int(np.flatnonzero(~np.isfinite(rewards))[0])
        raise ValueError(f"rewards[{i}] = {rewards[i]} is not finite; rewards must be scored before filtering")
    if source_ids is None:
        return rewards, np.zeros(len(rewards), np.int64)
    source_ids = np.asarray(source_ids)
    if source_ids.shape != rewards.shape:
        raise ValueError(f"source_ids shape {source_ids.shape} != rewards shape {rewards.shape}")
    if not np.issubdtype(source_ids.dtype, np.integer):
        raise ValueError(f"source_ids must be integers, got dtype {source_ids.dtype}")
    return rewards, source_ids


def _eligible(eligible: np.ndarray | None, m: int) -> np.ndarray:
    if eligible is None:
        return np.ones(m, bool)
    eligible = np.asarray(eligible, bool)
    if eligible.shape != (m,):
        raise ValueError(f"eligible mask shape {eligible.shape} != ({m},)")
    return eligible


def global_threshold_mask(rewards: np.ndarray, tau: float) -> np.ndarray:
    """The paper's F(x, y; τ) = 1[R(x, y) > τ], strict; τ <= 0 keeps everything (the paper's 'τ = 0.0')."""
    rewards, _ = _check_arrays(rewards)
    if tau <= 0.0:
        return np.ones(len(rewards), bool)
    return rewards > tau


def _sorted_groups(rewards: np.ndarray, source_ids: np.ndarray, eligible: np.ndarray, descending: bool):
    """Eligible indices sorted by (source, reward[, index]); group starts, sizes and group of each entry."""
    idx = np.flatnonzero(eligible)
    r, s = rewards[idx], source_ids[idx]
    order = np.lexsort((idx, -r if descending else r, s))  # Ties keep the earlier example first.
    idx, r, s = idx[order], r[order], s[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]]) if len(s) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(s)])
    group = np.repeat(np.arange(len(starts)), sizes)
    return idx, r.astype(np.float64), starts, sizes, group


def percentile_mask(rewards: np.ndarray, source_ids: np.ndarray, percentile: float,
                    eligible: np.ndarray | None = None) -> np.ndarray:
    """Keeps a source's candidates with reward >= its own p-th percentile (linear, as np.percentile).

    Statistics use only `eligible` entries (those that passed validity). '>=' rather than '>' so that p = 0
    keeps all, p = 100 keeps the best, and a source whose candidates all tie keeps them.
    """
    rewards, source_ids = _check_arrays(rewards, source_ids)
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    idx, r, starts, sizes, group = _sorted_groups(rewards, source_ids, _eligible(eligible, len(rewards)), False)
    pos = percentile / 100.0 * (sizes - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, sizes - 1)
    frac = pos - lo
    a, b = r[starts + lo], r[starts + hi]
    cut = a + (b - a) * frac
    cut = np.minimum(cut, r[starts + sizes - 1])  # Rounding must never put the cut above the best.
    mask = np.zeros(len(rewards), bool)
    mask[idx] = r >= cut[group]
    return mask


def gamma_mask(rewards: np.ndarray, source_ids: np.ndarray, gamma: float,
               eligible: np.ndarray | None = None) -> np.ndarray:
    """Keeps candidates with reward >= τ(x) = γ·max + (1−γ)·mean over the source's eligible rewards.

    '>=' so that γ = 1 keeps a source's best candidate(s) instead of nothing; computed as
    mean + γ·(max − mean) and capped at max so float rounding never drops the best.
    """
    rewards, source_ids = _check_arrays(rewards, source_ids)
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    idx, r, starts, sizes, group = _sorted_groups(rewards, source_ids, _eligible(eligible, len(rewards)), False)
    if not len(idx):
        return np.zeros(len(rewards), bool)
    best = r[starts + sizes - 1]
    mean = np.add.reduceat(r, starts) / sizes
    cut = np.minimum(mean + gamma * (best - mean), best)
    mask = np.zeros(len(rewards), bool)
    mask[idx] = r >= cut[group]
    return mask


def top_k_mask(rewards: np.ndarray, source_ids: np.ndarray, k: int,
               eligible: np.ndarray | None = None) -> np.ndarray:
    """Keeps each source's k highest-reward eligible candidates (ties: earlier example first)."""
    rewards, source_ids = _check_arrays(rewards, source_ids)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    idx, _, starts, _, group = _sorted_groups(rewards, source_ids, _eligible(eligible, len(rewards)), True)
    rank = np.arange(len(idx)) - starts[group] if len(idx) else np.zeros(0, np.int64)
    mask = np.zeros(len(rewards), bool)
    mask[idx] = rank < k
    return mask


# ---------------------------------------------------------------------------------------- validity filters


@gin.configurable(denylist=["sources", "candidates", "references", "source_ids", "is_reference"])
def validity_mask(
    sources: Sequence[str],
    candidates: Sequence[str],
    references: Sequence[str],
    source_ids: np.ndarray,
    is_reference: np.ndarray | None = None,
    drop_empty: bool = True,
    min_length_ratio: float | None = 0.25,
    max_length_ratio: float | None = 4.0,
    drop_copies: bool = True,
    drop_duplicates: bool = False,
) -> tuple[np.ndarray, dict[str, int]]:
    """Cheap checks that run before any reward filter; returns (mask [M], drops per reason).

    - empty: the candidate is empty or whitespace.
    - length_ratio: len(candidate) / max(len(reference), 1) in characters (stripped) outside
      [min_length_ratio, max_length_ratio]. Against the reference, which is in the candidate's language, so
      one window serves every language pair (a source-relative window in characters is ~0.25 for en→zh and
      ~2.3-4 for zh→en). None disables.
    - copy: the candidate equals the source (stripped), a known degenerate output under a learned reward.
    - duplicate: a repeated (source id, candidate) pair; the first occurrence (a reference before any sample)
      is kept. Off by default: repeats are how BC on samples weights a translation by its probability under
      the policy (the policy-gradient reading of ReST's Improve step), and de-duplicating removes that.
    Rows flagged by `is_reference` (the references of D) pass every check. Each dropped example is counted
    under the first check it fails, in that order.
    """
    m = len(candidates)
    if len(sources) != m or len(references) != m or len(source_ids) != m:
        raise ValueError(f"validity_mask: {len(sources)} sources, {m} candidates, {len(references)} references, "
                         f"{len(source_ids)} source_ids")
    protected = np.zeros(m, bool) if is_reference is None else np.asarray(is_reference, bool)
    if protected.shape != (m,):
        raise ValueError(f"validity_mask: is_reference shape {protected.shape} != ({m},)")
    if min_length_ratio is not None and max_length_ratio is not None and min_length_ratio > max_length_ratio:
        raise ValueError(f"min_length_ratio {min_length_ratio} > max_length_ratio {max_length_ratio}")
    mask = np.ones(m, bool)
    dropped = {"empty": 0, "length_ratio": 0, "copy": 0, "duplicate": 0}
    seen = {(int(source_ids[i]), candidates[i]) for i in np.flatnonzero(protected)} if drop_duplicates else set()
    for i in np.flatnonzero(~protected):
        cand, src = candidates[i].strip(), sources[i].strip()
        reason = None
        if drop_empty and not cand:
            reason = "empty"
        elif min_length_ratio is not None or max_length_ratio is not None:
            ratio = len(cand) / max(len(references[i].strip()), 1)
            if (min_length_ratio is not None and ratio < min_length_ratio) or \
                    (max_length_ratio is not None and ratio > max_length_ratio):
                reason = "length_ratio"
        if reason is None and drop_copies and cand == src:
            reason = "copy"
        if reason is None and drop_duplicates:
            key = (int(source_ids[i]), candidates[i])
            if key in seen:
                reason = "duplicate"
            seen.add(key)
        if reason is not None:
            mask[i] = False
            dropped[reason] += 1
    return mask, dropped


# ------------------------------------------------------------------------------------------- composition


@dataclasses.dataclass(frozen=True)
class FilterCounts:
    """The numbers the run report shows for a filter, over one part of the data or (merged) over all of it."""

    method: str
    step: int
    value: Any  # τ, p, γ or k used at this step; None = no reward filter.
    num_examples: int
    num_kept: int
    num_sources: int  # Distinct source ids in the input.
    num_sources_without_data: int  # Input sources with nothing kept.
    dropped: dict[str, int]  # Drops per reason: validity reasons, then "reward", then "max_per_source".

    @property
    def kept_fraction(self) -> float:
        return self.num_kept / self.num_examples if self.num_examples else 0.0

    @classmethod
    def merge(cls, parts: Sequence[FilterCounts]) -> FilterCounts:
        """Counts of the union of parts that share no source (e.g. the shards of a Grow store)."""
        if not parts:
            raise ValueError("FilterCounts.merge needs at least one part")
        dropped: dict[str, int] = {}
        for p in parts:
            for k, v in p.dropped.items():
                dropped[k] = dropped.get(k, 0) + v
        first = parts[0]
        return cls(method=first.method, step=first.step, value=first.value,
                   num_examples=sum(p.num_examples for p in parts), num_kept=sum(p.num_kept for p in parts),
                   num_sources=sum(p.num_sources for p in parts),
                   num_sources_without_data=sum(p.num_sources_without_data for p in parts), dropped=dropped)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for report.json."""
        return {"method": self.method, "step": self.step, "value": self.value,
                "num_examples": self.num_examples, "num_kept": self.num_kept,
                "kept_fraction": self.kept_fraction, "num_sources": self.num_sources,
                "num_sources_without_data": self.num_sources_without_data, "dropped": dict(self.dropped)}

    def log(self) -> None:
        logging.info("ReST filter %s step %d (value %s): kept %d/%d (%.1f%%), %d/%d sources left with no data, "
                     "dropped %s", self.method, self.step, self.value, self.num_kept, self.num_examples,
                     100 * self.kept_fraction, self.num_sources_without_data, self.num_sources, self.dropped)


@dataclasses.dataclass(frozen=True)
class FilterResult:
    """What a filter kept: the mask and the numbers the run report shows."""

    mask: np.ndarray  # bool [M]
    method: str
    step: int
    value: Any  # τ, p, γ or k used at this step; None = no reward filter.
    num_sources: int  # Distinct source ids in the input.
    sources_without_data: np.ndarray  # Ids of input sources with nothing kept, sorted.
    dropped: dict[str, int]  # Drops per reason: validity reasons, then "reward", then "max_per_source".

    @property
    def num_examples(self) -> int:
        return int(self.mask.size)

    @property
    def num_kept(self) -> int:
        return int(self.mask.sum())

    @property
    def kept_fraction(self) -> float:
        return self.num_kept / self.num_examples if self.num_examples else 0.0

    @property
    def num_sources_without_data(self) -> int:
        return int(self.sources_without_data.size)

    def counts(self) -> FilterCounts:
        return FilterCounts(method=self.method, step=self.step, value=self.value, num_examples=self.num_examples,
                            num_kept=self.num_kept, num_sources=self.num_sources,
                            num_sources_without_data=self.num_sources_without_data, dropped=dict(self.dropped))

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers for report.json."""
        return self.counts().summary()


def _by_name() -> dict[str, tuple[Callable[..., Any], Callable[..., np.ndarray]]]:
    return {
        "threshold": (threshold_for_step, lambda r, s, v, e: global_threshold_mask(r, v) & e),
        "percentile": (percentile_for_step, percentile_mask),
        "gamma": (gamma_for_step, gamma_mask),
        "top_k": (top_k_for_step, top_k_mask),
        "none": (lambda step: None, None),
    }


FILTER_METHODS = ("threshold", "percentile", "gamma", "top_k", "none")


@gin.configurable(denylist=["rewards", "source_ids", "step", "sources", "candidates", "references", "is_reference",
                            "whole_dataset", "method", "max_per_source"])
def apply_filters(
    rewards: np.ndarray,
    source_ids: np.ndarray,
    step: int,
    sources: Sequence[str] | None = None,
    candidates: Sequence[str] | None = None,
    references: Sequence[str] | None = None,
    is_reference: np.ndarray | None = None,
    method: str = "threshold",
    value: Any = None,
    validity: bool = True,
    max_per_source: int | None = None,
    whole_dataset: bool = True,
) -> FilterResult:
    """Validity filters, then the reward filter `method` at Improve step `step`, then an optional cap.

    Args:
      rewards: float [M] Grow rewards in [0, 1].
      source_ids: int [M] source of each example.
      step: Improve step (0 = keep all, the "I=0" row); picks the value from the method's gin schedule.
      sources, candidates, references: texts [M] (each row's source, candidate, and the reference of its
        source); required when `validity` is on.
      is_reference: bool [M], the references of D among the rows: exempt from the validity filters.
      method: "threshold" (paper), "percentile", "gamma", "top_k" or "none".
      value: overrides the schedule's τ / p / γ / k for this call.
      validity: run `validity_mask` (its knobs are gin-configurable) first.
      max_per_source: keep at most this many (highest-reward) examples per source after the filter, as in
        ReST-EM (Singh et al. 2023, at most 10 per source). None = no cap.
      whole_dataset: False when the arrays are one part of the data (a Grow shard, whose sources no other
        part holds): the τ_1-vs-mean check and the log line are then left to the caller, who sees all parts.
    """
    rewards, source_ids = _check_arrays(rewards, source_ids)
    methods = _by_name()
    if method not in methods:
        raise ValueError(f"unknown filter method {method!r}; choose one of {FILTER_METHODS}")
    schedule_fn, mask_fn = methods[method]
    if value is None:
        value = schedule_fn(step)
    dropped: dict[str, int] = {}
    if validity:
        if sources is None or candidates is None or references is None:
            raise ValueError("apply_filters: validity filters need `sources`, `candidates` and `references` "
                             "texts; pass them or set apply_filters.validity = False")
        mask, dropped = validity_mask(sources, candidates, references, source_ids, is_reference)
    else:
        mask = np.ones(len(rewards), bool)
    if whole_dataset and method == "threshold" and step == 1:
        check_first_threshold(value, float(np.mean(rewards)) if len(rewards) else float("nan"))
    if value is not None and mask_fn is not None:
        before = int(mask.sum())
        mask = mask_fn(rewards, source_ids, value, mask) & mask
        dropped["reward"] = before - int(mask.sum())
    if max_per_source is not None:
        before = int(mask.sum())
        mask = top_k_mask(rewards, source_ids, max_per_source, mask)
        dropped["max_per_source"] = before - int(mask.sum())
    all_sources = np.unique(source_ids)
    without = np.setdiff1d(all_sources, np.unique(source_ids[mask]))
    result = FilterResult(mask=mask, method=method, step=step, value=value, num_sources=int(all_sources.size),
                          sources_without_data=without, dropped=dropped)
    if whole_dataset:
        result.counts().log()
    return result
