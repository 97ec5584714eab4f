"""Reward interface, registry by name, and the batched scorer Grow uses.

ReST (Gulcehre et al. 2023, arXiv 2308.08998, Sec. 2) scores every Grow pair (x, y) with a reward model
R(x, y) normalised to [0, 1]; Improve filters on those scores. A reward here is any object with

    name: str
    needs_reference: bool
    score(sources, candidates, references) -> np.ndarray float32 [M], every value in [0, 1]

registered under a name with `@register("name")` and built with `get("name", **kwargs)`.

Extension point for model-based rewards: a module `rest_jax/rewards/<name>.py` that calls `register("<name>")`
at import. Names listed in `_LAZY_MODULES` (`metricx`, `learned`) are imported on first `get`, so heavy model
code is loaded only when such a reward is asked for and this package needs no edit when the module lands.
"""

from __future__ import annotations

import abc
import difflib
import importlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import gin
import numpy as np

# Names whose implementation lives in a module of this package that is imported on first use.
_LAZY_MODULES: dict[str, str] = {
    "metricx": "rest_jax.rewards.metricx",
    "learned": "rest_jax.rewards.learned",
}

_REGISTRY: dict[str, Callable[..., Any]] = {}


class RewardError(ValueError):
    """A reward returned an unusable score (NaN, inf, outside [0, 1], wrong shape)."""


class Reward(abc.ABC):
    """Base class of rewards: subclasses set `name`, `needs_reference` and implement `_score`.

    `score` checks the inputs (equal lengths; references present when needed) and returns float32 [M].
    Subclasses document how their raw metric maps to [0, 1].
    """

    name: str = ""
    needs_reference: bool = True

    def score(
        self,
        sources: Sequence[str],
        candidates: Sequence[str],
        references: Sequence[str] | None = None,
    ) -> np.ndarray:
        """Scores each (source, candidate[, reference]) in [0, 1]; returns float32 [len(candidates)]."""
        check_inputs(self, sources, candidates, references)
        return np.asarray(self._score(list(sources), list(candidates),
                                      None if references is None else list(references)), dtype=np.float32)

    @abc.abstractmethod
    def _score(self, sources: list[str], candidates: list[str], references: list[str] | None) -> np.ndarray:
        """Scores already-checked inputs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, needs_reference={self.needs_reference})"


def check_inputs(
    reward: Any, sources: Sequence[str], candidates: Sequence[str], references: Sequence[str] | None
) -> None:
    """Raises ValueError naming the reward when lengths differ or a needed reference is missing."""
    name = getattr(reward, "name", type(reward).__name__)
    if len(sources) != len(candidates):
        raise ValueError(f"reward {name!r}: {len(sources)} sources but {len(candidates)} candidates")
    if references is None:
        if getattr(reward, "needs_reference", False):
            raise ValueError(f"reward {name!r} is reference-based: pass `references` (got None)")
    elif len(references) != len(candidates):
        raise ValueError(f"reward {name!r}: {len(references)} references but {len(candidates)} candidates")


def register(name: str, *, override: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a reward factory (class or function returning a reward) under `name`.

    Registering a second, different factory under a taken name is an error unless `override=True`; the
    same factory again (a module reloaded) is allowed.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        old = _REGISTRY.get(name)
        same = old is not None and getattr(old, "__qualname__", None) == getattr(factory, "__qualname__", None) \
            and getattr(old, "__module__", None) == getattr(factory, "__module__", None)
        if old is not None and not same and not override:
            raise ValueError(f"reward {name!r} is already registered by {old!r}; pass override=True to replace")
        _REGISTRY[name] = factory
        return factory

    return decorator


def names() -> list[str]:
    """Registered reward names plus the lazily imported ones, sorted."""
    return sorted(set(_REGISTRY) | set(_LAZY_MODULES))


def get(name: str, **kwargs: Any) -> Any:
    """Builds the reward registered under `name` with `kwargs` (gin bindings fill the rest).

    Raises KeyError listing close matches and all known names for an unknown name.
    """
    if name not in _REGISTRY and name in _LAZY_MODULES:
        module = _LAZY_MODULES[name]
        try:
            # The command line locks gin before the entry point runs; the module's configurables must still
            # register (they get no bindings: the config was parsed before they existed).
            with gin.unlock_config():
                importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # A dependency of the module is missing: that is the real error.
                raise
            raise KeyError(f"reward {name!r} is declared but its module {module} is not installed "
                           f"in this checkout; available: {sorted(_REGISTRY)}") from e
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), names(), n=3, cutoff=0.5)
        hint = f" Did you mean {close}?" if close else ""
        raise KeyError(f"unknown reward {name!r}.{hint} Known rewards: {names()}")
    reward = _REGISTRY[name](**kwargs)
    for attr in ("name", "needs_reference", "score"):
        if not hasattr(reward, attr):
            raise TypeError(f"reward factory registered as {name!r} built {reward!r}, which lacks `{attr}`")
    return reward


def _describe(texts: Sequence[str] | None, i: int, limit: int = 120) -> str:
    if texts is None:
        return "None"
    text = texts[i]
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _check_scores(
    reward: Any, scores: Any, batch_len: int, example_indices: Sequence[int],
    sources: Sequence[str], candidates: Sequence[str], references: Sequence[str] | None,
) -> np.ndarray:
    """Raises RewardError naming the reward and the first offending example; returns float32 [batch_len]."""
    name = getattr(reward, "name", type(reward).__name__)
    scores = np.asarray(scores)
    if scores.shape != (batch_len,):
        raise RewardError(f"reward {name!r} returned shape {scores.shape} for a batch of {batch_len}")
    scores = scores.astype(np.float64)
    bad = ~np.isfinite(scores) | (scores < 0.0) | (scores > 1.0)
    if bad.any():
        j = int(np.flatnonzero(bad)[0])
        i = example_indices[j]
        what = "is not finite" if not math.isfinite(scores[j]) else "is outside [0, 1]"
        raise RewardError(
            f"reward {name!r} returned {scores[j]!r} for example {i}, which {what} "
            f"({int(bad.sum())} bad value(s) in this batch): source={_describe(sources, i)} "
            f"candidate={_describe(candidates, i)} reference={_describe(references, i)}")
    return scores.astype(np.float32)


def score_pairs(
    reward: Any,
    sources: Sequence[str],
    candidates: Sequence[str],
    references: Sequence[str] | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Scores every pair, each distinct (source, candidate, reference) triple once, in batches.

    Grow draws N samples per source, so duplicates are common (short sentences, low temperature); scoring
    each distinct triple once saves reward calls without changing any score. Checks every returned value:
    NaN/inf or a value outside [0, 1] raises RewardError naming the reward and the example (index and
    text); nothing is filtered silently (ReST keeps every scored pair in the Grow data, Sec. 2).

    Args:
      reward: an object with `name`, `needs_reference` and `score` (see module doc).
      sources, candidates: texts [M].
      references: texts [M], or None for reference-free rewards.
      batch_size: distinct triples per `reward.score` call.

    Returns:
      float32 [M] rewards, aligned with the inputs.
    """
    check_inputs(reward, sources, candidates, references)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num = len(candidates)
    first_index: dict[tuple[str, str, str | None], int] = {}
    slot = np.empty(num, dtype=np.int64)  # Example i takes the score of distinct triple slot[i].
    unique: list[int] = []  # Example index of each distinct triple's first occurrence.
    for i in range(num):
        key = (sources[i], candidates[i], None if references is None else references[i])
        j = first_index.get(key)
        if j is None:
            j = first_index[key] = len(unique)
            unique.append(i)
        slot[i] = j
    scores = np.empty(len(unique), dtype=np.float32)
    for start in range(0, len(unique), batch_size):
        idx = unique[start:start + batch_size]
        raw = reward.score([sources[i] for i in idx], [candidates[i] for i in idx],
                           None if references is None else [references[i] for i in idx])
        scores[start:start + len(idx)] = _check_scores(reward, raw, len(idx), idx, sources, candidates,
                                                        references)
    if num:
        logging.debug("reward %s: %d pairs, %d distinct", getattr(reward, "name", reward), num, len(unique))
    return scores[slot] if num else np.zeros(0, np.float32)
