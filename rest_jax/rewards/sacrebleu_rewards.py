"""Sentence-level, reference-based rewards from sacreBLEU: chrF, BLEU, TER, each mapped to [0, 1].

ReST (Gulcehre et al. 2023, arXiv 2308.08998) uses a learned metric; these are the standard
reference-based alternatives REST.md names, scored one sentence at a time with sacreBLEU's metric objects
(`sentence_score`), which is exactly what `sacrebleu.sentence_chrf/bleu/ter` compute.

Scoring is pure Python (~10k chrF pairs/s on one core). For Grow-sized inputs set `num_workers` > 1: batches
are split over a spawned process pool (spawn, not fork, because JAX's threads make fork unsafe); give
`score_pairs` a large `batch_size` (e.g. 65536) so each call has enough work to split.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
from collections.abc import Sequence

import gin
import numpy as np
from sacrebleu.metrics import BLEU, CHRF, TER

from rest_jax.rewards.base import Reward, register

# Below this many pairs per call the pool's start-up and pickling cost more than they save.
_MIN_PARALLEL = 2048


class _SacreBleuReward(Reward):
    """Shared plumbing: a sacreBLEU metric object, unit mapping, optional process pool."""

    needs_reference = True

    def __init__(self, num_workers: int = 0):
        if num_workers < 0:
            raise ValueError(f"reward {self.name!r}: num_workers must be >= 0, got {num_workers}")
        self.num_workers = num_workers
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def _metric(self):
        raise NotImplementedError

    def _to_unit(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def raw_scores(self, candidates: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """The metric on its own 0-100 scale, one value per pair, in this process."""
        metric = self._metric()
        return np.array([metric.sentence_score(c, [r]).score for c, r in zip(candidates, references)],
                        dtype=np.float64)

    def _score(self, sources: list[str], candidates: list[str], references: list[str] | None) -> np.ndarray:
        del sources  # Reference-based: the source does not enter these metrics.
        assert references is not None  # Checked by Reward.score.
        if self.num_workers <= 1 or len(candidates) < _MIN_PARALLEL:
            raw = self.raw_scores(candidates, references)
        else:
            raw = self._raw_scores_parallel(candidates, references)
        return self._to_unit(raw).astype(np.float32)

    def _raw_scores_parallel(self, candidates: list[str], references: list[str]) -> np.ndarray:
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, mp_context=multiprocessing.get_context("spawn"))
            atexit.register(self.close)
        step = -(-len(candidates) // self.num_workers)
        futures = [self._pool.submit(_raw_chunk, self, candidates[i:i + step], references[i:i + step])
                   for i in range(0, len(candidates), step)]
        return np.concatenate([f.result() for f in futures])

    def close(self) -> None:
        """Shuts the process pool down (also done at interpreter exit)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None  # A pool cannot cross processes; workers score in-process.
        return state


def _raw_chunk(reward: _SacreBleuReward, candidates: list[str], references: list[str]) -> np.ndarray:
    return reward.raw_scores(candidates, references)


@register("chrf")
@gin.configurable
class ChrfReward(_SacreBleuReward):
    """Sentence chrF (Popović 2015) / 100, clipped to [0, 1] (the clip only removes float rounding).

    word_order=2 gives chrF++. Empty candidate -> 0; candidate equal to the reference -> 1.
    """

    name = "chrf"

    def __init__(self, char_order: int = 6, word_order: int = 0, beta: int = 2, lowercase: bool = False,
                 num_workers: int = 0):
        super().__init__(num_workers)
        self.kwargs = dict(char_order=char_order, word_order=word_order, beta=beta, lowercase=lowercase)

    def _metric(self):
        return CHRF(**self.kwargs)

    def _to_unit(self, raw: np.ndarray) -> np.ndarray:
        return np.clip(raw / 100.0, 0.0, 1.0)


@register("bleu")
@gin.configurable
class BleuReward(_SacreBleuReward):
    """Sentence BLEU / 100, clipped to [0, 1] (the clip only removes float rounding, e.g. 100.00000000000004).

    Uses sacreBLEU's sentence-level recommendation, as in `sacrebleu.sentence_bleu`: effective order (n-gram
    orders longer than the candidate are skipped) and 'exp' smoothing, so short sentences do not score 0 for
    lack of a 4-gram. `tokenize` None means sacreBLEU's default ('13a'); use 'zh'/'ja-mecab'/'intl' as needed.
    """

    name = "bleu"

    def __init__(self, smooth_method: str = "exp", smooth_value: float | None = None,
                 tokenize: str | None = None, lowercase: bool = False, effective_order: bool = True,
                 num_workers: int = 0):
        super().__init__(num_workers)
        self.kwargs = dict(smooth_method=smooth_method, smooth_value=smooth_value, tokenize=tokenize,
                           lowercase=lowercase, effective_order=effective_order)

    def _metric(self):
        return BLEU(**self.kwargs)

    def _to_unit(self, raw: np.ndarray) -> np.ndarray:
        return np.clip(raw / 100.0, 0.0, 1.0)


@register("ter")
@gin.configurable
class TerReward(_SacreBleuReward):
    """max(0, 1 - TER / 100): TER (edits per reference word, x100) is lower-is-better and unbounded above.

    TER 0 (identical) -> 1; TER >= 100 (at least as many edits as reference words, e.g. an empty candidate
    for a non-empty reference) -> 0. The map is linear in between so reward differences stay edit counts.
    """

    name = "ter"

    def __init__(self, normalized: bool = False, no_punct: bool = False, asian_support: bool = False,
                 case_sensitive: bool = False, num_workers: int = 0):
        super().__init__(num_workers)
        self.kwargs = dict(normalized=normalized, no_punct=no_punct, asian_support=asian_support,
                           case_sensitive=case_sensitive)

    def _metric(self):
        return TER(**self.kwargs)

    def _to_unit(self, raw: np.ndarray) -> np.ndarray:
        return np.clip(1.0 - raw / 100.0, 0.0, 1.0)
