"""Improve's data (ReST Sec. 3): the Grow store(s) read shard by shard, filtered, streamed in bounded memory.

An Improve step trains on F(x, y; τ_i)-filtered rows of D_g, which on the paper's IWSLT setting holds ~16M
scored samples per Grow step: more than a host should hold, and on a pod every host must read only its share.
So nothing here loads a store. The unit of work is a *unit*: shard i of the store (of every pooled store),
which holds every record of its sources, so the per-source filters (percentile, γ, top-k, the cap, the
duplicate check) are exact within it.

*Two passes.* `filter_counts` reads only the filter's columns of each unit (unit u on process u mod P) and
gathers, on every process, the kept rows per unit and the global statistics (kept fraction, mean sample
reward for the τ_1 > mean check). `stream_batches` then trains: a fixed number V of virtual *readers*
(`stream_batches.num_readers`) share the kept rows, each owning whole units (or, with fewer units than
readers, every m-th kept row of a unit), balanced by kept rows; process i of P runs readers
[iV/P, (i+1)V/P). Each reader walks its pieces in a fresh order every epoch and shuffles rows in a buffer of
`shuffle_buffer` rows; global batch k is B/V rows from each reader in reader order. That is the T5X/seqio
multi-host pattern (each host reads its files, repeats, shuffles within a buffer), with readers in place of
hosts so that the batches do not depend on P: a run on 2 processes sees the batches of a run on 1.

Memory per process: V/P units of the filter's and the batch's columns, plus V/P shuffle buffers, whatever the
store's size (the RSS benchmark in benchmarks/README.md measures it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import gin
import jax
import numpy as np

from rest_jax import filters as filters_lib
from rest_jax import partitioning
from rest_jax import policy as policy_lib
from rest_jax.data import grow_store as store_lib
from rest_jax.data.special_tokens import EOS_ID

Batch = dict[str, np.ndarray]
Columns = dict[str, np.ndarray]

FILTER_COLUMNS = ("source_id", "is_reference", "reward", "source_text", "candidate_text", "reference_text")
TRAIN_COLUMNS = ("source_tokens", "candidate_tokens", "reward")
PAIR_COLUMNS = TRAIN_COLUMNS + ("behaviour_logprobs",)  # DPO/IPO's reference is the policy that grew the data
PAIRINGS = ("best_worst", "all")


# ----------------------------------------------------------------------------------------------------
# Sources of units.
# ----------------------------------------------------------------------------------------------------


class GrowData:
    """D_g of an Improve step as units of whole sources; `open` for Grow stores, `from_columns` in memory."""

    def __init__(self, read_unit: Callable[[int, Sequence[str]], Columns], num_units: int, description: str):
        self._read_unit = read_unit
        self.num_units = num_units
        self.description = description

    @classmethod
    def open(cls, store_dirs: str | Sequence[str]) -> GrowData:
        """Grow stores, pooled (ReST-EM may pool several Grows): unit i is shard i of every store.

        Pooled stores must cut the same sources into the same shards, so that a unit holds every record of
        its sources and the per-source filters see all of them.
        """
        dirs = [store_dirs] if isinstance(store_dirs, str) else list(store_dirs)
        if not dirs:
            raise ValueError("Improve needs at least one Grow store.")
        stores = [store_lib.GrowStore(d) for d in dirs]
        first = stores[0].layout
        for store in stores[1:]:
            if (store.layout.source_ids, store.layout.sources_per_shard) != (first.source_ids,
                                                                             first.sources_per_shard):
                raise store_lib.GrowStoreMismatchError(
                    f"Grow stores {dirs[0]} and {store.directory} cut their sources into different shards "
                    f"({first.num_shards} shards of {first.sources_per_shard} sources vs "
                    f"{store.layout.num_shards} of {store.layout.sources_per_shard}, or other sources); "
                    "pooled stores must come from Grow steps over the same sources with the same "
                    "grow_dataset.sources_per_shard.")

        def read(unit: int, columns: Sequence[str]) -> Columns:
            parts = [s.read_shard(unit, columns) for s in stores]
            return parts[0] if len(parts) == 1 else {c: np.concatenate([p[c] for p in parts]) for c in columns}

        return cls(read, first.num_shards, ", ".join(dirs))

    @classmethod
    def from_columns(cls, columns: Mapping[str, np.ndarray], sources_per_unit: int | None = None) -> GrowData:
        """Grow columns held in memory (tests, notebooks), cut into units of `sources_per_unit` sources."""
        columns = {k: np.asarray(v) for k, v in columns.items()}
        ids = columns["source_id"]
        sources = np.unique(ids)
        per = len(sources) if sources_per_unit is None else sources_per_unit
        chunks = [sources[i:i + per] for i in range(0, len(sources), max(per, 1))] or [sources]
        rows = [np.flatnonzero(np.isin(ids, chunk)) for chunk in chunks]

        def read(unit: int, names: Sequence[str]) -> Columns:
            return {c: columns[c][rows[unit]] for c in names}

        return cls(read, len(rows), f"{len(ids)} in-memory Grow rows")

    @classmethod
    def from_pairs(cls, vocab: Any, sources: Sequence[str], references: Sequence[str],
                   feature_lengths: Mapping[str, int], sources_per_unit: int = 1024) -> GrowData:
        """The original parallel data D as Grow rows: one reference row per pair (reward 1), no samples.

        Improve on it is BC continued with Improve's schedule, batches and checkpoint selection: the control
        that tells self-training from fine-tuning at a lower rate (`run_rest.control`).
        """
        if len(sources) != len(references):
            raise ValueError(f"from_pairs: {len(sources)} sources but {len(references)} references")
        src_tok, _ = policy_lib.tokenize(vocab, sources, int(feature_lengths["inputs"]))
        ref_tok, _ = policy_lib.tokenize(vocab, references, int(feature_lengths["targets"]))

        def ragged(lists: Sequence[Sequence[int]]) -> np.ndarray:
            out = np.empty(len(lists), object)
            out[:] = [np.asarray(t, np.int64) for t in lists]
            return out

        m = len(sources)
        return cls.from_columns({
            "source_id": np.arange(m), "is_reference": np.ones(m, bool), "reward": np.ones(m, np.float32),
            "source_text": np.asarray(sources, object), "candidate_text": np.asarray(references, object),
            "reference_text": np.asarray(references, object), "source_tokens": ragged(src_tok),
            "candidate_tokens": ragged(ref_tok)}, sources_per_unit)

    def read(self, unit: int, columns: Sequence[str]) -> Columns:
        return self._read_unit(unit, tuple(columns))


# ----------------------------------------------------------------------------------------------------
# Which rows an Improve step uses.
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Selection:
    """The rows of D_g an Improve step uses: the references or not, then its filter (None: no filter).

    Attributes:
      improve_index: i, which picks τ_i (or p_i, γ_i, k_i) from the filter's gin schedule.
      include_references: Use the references of D too (ReST: yes; ReST-EM: no).
      method: `filters.apply_filters` method; None keeps every row (the behaviour data of value pre-training).
      max_per_source: ReST-EM's cap per source.
      include_samples: Use the policy's samples (False: the references alone, one side of a mixed batch).
    """

    improve_index: int
    include_references: bool = True
    method: str | None = "threshold"
    max_per_source: int | None = None
    include_samples: bool = True

    def usable(self, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        """bool [M]: the rows this step may use before any filter (references and samples as included)."""
        is_ref = np.asarray(cols["is_reference"], bool)
        return (is_ref & self.include_references) | (~is_ref & self.include_samples)

    def apply(self, cols: Mapping[str, np.ndarray]) -> tuple[np.ndarray, filters_lib.FilterCounts]:
        """(row indices kept, counts) of one unit."""
        rows = np.flatnonzero(self.usable(cols))
        if self.method is None:
            return rows, filters_lib.FilterCounts(
                method="none", step=self.improve_index, value=None, num_examples=len(rows), num_kept=len(rows),
                num_sources=len(np.unique(cols["source_id"][rows])), num_sources_without_data=0, dropped={})
        result = filters_lib.apply_filters(cols["reward"][rows], cols["source_id"][rows], self.improve_index,
                                           sources=list(cols["source_text"][rows]),
                                           candidates=list(cols["candidate_text"][rows]),
                                           references=list(cols["reference_text"][rows]),
                                           is_reference=np.asarray(cols["is_reference"][rows], bool),
                                           method=self.method,
                                           max_per_source=self.max_per_source, whole_dataset=False)
        return rows[result.mask], result.counts()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Pairing:
    """How the preference losses (DPO, IPO) pair one source's selected rows: (chosen, rejected) by reward.

    Attributes:
      rule: 'best_worst': the source's highest- against its lowest-reward row (one pair per source, ties to the
        first row); 'all': every two rows whose rewards differ by more than `min_margin` (up to N(N-1)/2 pairs).
      min_margin: A pair's rewards must differ by more than this (0: any strict preference; equal rewards never
        pair).
    """

    rule: str = "best_worst"
    min_margin: float = 0.0

    def __post_init__(self):
        if self.rule not in PAIRINGS:
            raise ValueError(f"Pairing.rule={self.rule!r}; expected one of {PAIRINGS}.")
        if self.min_margin < 0:
            raise ValueError(f"Pairing.min_margin={self.min_margin}; expected >= 0.")

    def pairs(self, source_ids: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """int [K, 2] (chosen, rejected) row indices, sources in order of first appearance."""
        source_ids, rewards = np.asarray(source_ids), np.asarray(rewards, np.float64)
        out = []
        for sid in dict.fromkeys(source_ids.tolist()):
            rows = np.flatnonzero(source_ids == sid)
            r = rewards[rows]
            if self.rule == "best_worst":
                best, worst = rows[np.argmax(r)], rows[np.argmin(r)]
                if rewards[best] - rewards[worst] > self.min_margin:
                    out.append((best, worst))
            else:
                out += [(a, b) for a in rows for b in rows if rewards[a] - rewards[b] > self.min_margin]
        return np.asarray(out, np.int64).reshape(-1, 2)


@dataclasses.dataclass(frozen=True)
class Counts:
    """What the first pass found, the same on every process."""

    kept_per_unit: tuple[int, ...]  # Rows, or pairs when counted with a `Pairing`.
    filter: filters_lib.FilterCounts
    mean_sample_reward: float  # Over the samples (not the references) of the usable rows.

    @property
    def num_kept(self) -> int:
        return sum(self.kept_per_unit)


def filter_counts(data: GrowData, selection: Selection, pairing: Pairing | None = None) -> Counts:
    """First pass: each process filters units u ≡ process (mod P); the counts are gathered to all.

    With a `pairing`, `kept_per_unit` counts the preference pairs of the kept rows instead of the rows.

    Warns (`filters.check_first_threshold`) when τ_1 is not above the mean *sample* reward: the references'
    reward of 1 under reference-based rewards says nothing about the policy's samples.
    """
    index, count = jax.process_index(), jax.process_count()
    mine = {}
    for unit in range(index, data.num_units, count):
        cols = data.read(unit, FILTER_COLUMNS)
        kept, counts = selection.apply(cols)
        samples = cols["reward"][selection.usable(cols) & ~np.asarray(cols["is_reference"], bool)].astype(np.float64)
        items = len(kept) if pairing is None else len(pairing.pairs(cols["source_id"][kept], cols["reward"][kept]))
        mine[unit] = (items, counts, float(samples.sum()), len(samples))
    found: dict[int, Any] = {}
    for part in partitioning.allgather_objects(mine):
        found.update(part)
    per_unit = [found[u] for u in range(data.num_units)]
    merged = filters_lib.FilterCounts.merge([p[1] for p in per_unit])
    num_samples = sum(p[3] for p in per_unit)
    mean = sum(p[2] for p in per_unit) / num_samples if num_samples else float("nan")
    merged.log()
    if selection.method == "threshold" and selection.improve_index == 1 and merged.value is not None \
            and num_samples:
        filters_lib.check_first_threshold(float(merged.value), mean)
    return Counts(tuple(p[0] for p in per_unit), merged, mean)


# ----------------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------------


def _pad(seqs: Sequence[np.ndarray], length: int, dtype: Any) -> np.ndarray:
    out = np.zeros((len(seqs), length), dtype)
    for i, s in enumerate(seqs):
        s = np.asarray(s)[:length]
        out[i, :len(s)] = s
    return out


def _trimmed(seq: np.ndarray, length: int) -> np.ndarray:
    """`seq` cut to `length` tokens; a trimmed row keeps its last token as EOS, as the seqio pipeline does."""
    return seq if len(seq) <= length else np.concatenate([seq[:length - 1], [EOS_ID]])


def make_batch(rows: Mapping[str, Sequence[Any]], feature_lengths: Mapping[str, int]) -> Batch:
    """A T5X-style batch of Grow rows (`TRAIN_COLUMNS`, one entry per row), with what the RL losses need."""
    li, lt = int(feature_lengths["inputs"]), int(feature_lengths["targets"])
    src = [_trimmed(s, li) for s in rows["source_tokens"]]
    tgt = [_trimmed(t, lt) for t in rows["candidate_tokens"]]
    targets = _pad(tgt, lt, np.int32)
    decoder_inputs = np.concatenate([np.zeros((len(tgt), 1), np.int32), targets[:, :-1]], axis=1)
    batch = {
        "encoder_input_tokens": _pad(src, li, np.int32),
        "decoder_input_tokens": decoder_inputs,
        "decoder_target_tokens": targets,
        "decoder_loss_weights": (targets > 0).astype(np.float32),
        "reward": np.asarray(rows["reward"], np.float32),
    }
    if "behaviour_logprobs" in rows:
        for lp, t in zip(rows["behaviour_logprobs"], rows["candidate_tokens"]):
            if len(lp) != len(t):
                raise ValueError(f"a Grow row has {len(lp)} behaviour log-probs for {len(t)} candidate tokens: the "
                                 "preference losses need the log-probs Grow stores with every sample and reference "
                                 "(a store written without them cannot serve DPO/IPO).")
        batch["behaviour_log_probs"] = _pad(rows["behaviour_logprobs"], lt, np.float32)
    return batch


PACK_OPEN_ROWS = 8  # rows a packer fills at once: 1 is seqio's greedy packing; 8 fills Multi30k rows ~20% fuller


def packed_rows(items: Iterator[tuple[Any, ...]], feature_lengths: Mapping[str, int],
                open_rows: int = PACK_OPEN_ROWS) -> Iterator[Batch]:
    """Packed rows of `TRAIN_COLUMNS` items: several (source, candidate) examples per row, as T5X trains.

    The layout of seqio's packing (`trim_and_pack_dataset`, which BC's `train.pack` uses): examples trimmed to
    the lengths, segment ids numbering a row's examples from 1 (0 is padding), decoder inputs restarting at 0 in
    every segment; the model's relative positions need no per-segment positions (t5.Transformer). Placement is
    first fit over `open_rows` rows: an example goes to the first open row where both its source and its target
    fit, else a new row opens, and when more than `open_rows` are open the oldest is emitted (1 open row is
    seqio's greedy packing). Each token carries its example's reward (`token_rewards`, for the reward-weighted
    loss). The open rows are emitted when `items` ends.
    """
    li, lt = int(feature_lengths["inputs"]), int(feature_lengths["targets"])
    src_col, tgt_col, reward_col = (TRAIN_COLUMNS.index(c) for c in ("source_tokens", "candidate_tokens", "reward"))

    def emit(row: list[tuple[np.ndarray, np.ndarray, float]]) -> Batch:
        out = {k: np.zeros(n, np.int32) for k, n in (("encoder_input_tokens", li), ("encoder_segment_ids", li),
                                                     ("decoder_target_tokens", lt), ("decoder_input_tokens", lt),
                                                     ("decoder_segment_ids", lt))}
        out["token_rewards"] = np.zeros(lt, np.float32)
        at = [0, 0]
        for segment, (src, tgt, reward) in enumerate(row, start=1):
            e, d = slice(at[0], at[0] + len(src)), slice(at[1], at[1] + len(tgt))
            out["encoder_input_tokens"][e], out["encoder_segment_ids"][e] = src, segment
            out["decoder_target_tokens"][d], out["decoder_segment_ids"][d] = tgt, segment
            out["decoder_input_tokens"][d] = np.concatenate([[0], tgt[:-1]])
            out["token_rewards"][d] = reward
            at = [e.stop, d.stop]
        out["decoder_loss_weights"] = (out["decoder_target_tokens"] > 0).astype(np.float32)
        return out

    rows: list[tuple[list[tuple[np.ndarray, np.ndarray, float]], list[int]]] = []  # open rows, used lengths
    for item in items:
        src, tgt = _trimmed(np.asarray(item[src_col]), li), _trimmed(np.asarray(item[tgt_col]), lt)
        for row, used in rows:
            if used[0] + len(src) <= li and used[1] + len(tgt) <= lt:
                break
        else:
            if len(rows) == open_rows:
                yield emit(rows.pop(0)[0])
            rows.append(([], [0, 0]))
            row, used = rows[-1]
        row.append((src, tgt, float(item[reward_col])))
        used[0], used[1] = used[0] + len(src), used[1] + len(tgt)
    for row, _ in rows:
        yield emit(row)


def _num_readers(wanted: int, batch_size: int, num_shards: int, num_kept: int) -> int:
    """The most readers ≤ `wanted` (and ≤ kept rows) that split a batch evenly, a multiple of the shards."""
    for v in range(min(wanted, num_kept), 0, -1):
        if batch_size % v == 0 and v % num_shards == 0:
            return v
    raise ValueError(f"Improve: cannot split batches of {batch_size} rows over {num_shards} data shard(s) "
                     f"(hosts) with {num_kept} kept Grow rows; the batch size must be a multiple of the "
                     "shards, and the filter must keep at least one row per shard (lower the threshold).")


def _pieces(kept_per_unit: Sequence[int], num_readers: int) -> list[list[tuple[int, int, int]]]:
    """Each reader's pieces (unit, j, m): every m-th kept row of the unit from the j-th, balanced by rows.

    With at least as many non-empty units as readers, a piece is a whole unit (a reader reads only its own
    shards). Otherwise units are cut into pieces of at most t rows, t the largest size that still gives every
    reader a piece. Largest pieces go first to the reader with the fewest rows (ties: lowest index), so the
    assignment is deterministic.
    """
    total = sum(kept_per_unit)
    if sum(k > 0 for k in kept_per_unit) >= num_readers:
        splits = [min(k, 1) for k in kept_per_unit]
    else:
        t = -(-total // num_readers)
        while t > 1 and sum(-(-k // t) for k in kept_per_unit) < num_readers:
            t -= 1
        splits = [-(-k // t) for k in kept_per_unit]
    pieces = []
    for unit, (k, m) in enumerate(zip(kept_per_unit, splits)):
        pieces += [(-(-(k - j) // m), unit, j, m) for j in range(m)]
    pieces.sort(key=lambda p: (-p[0], p[1], p[2]))
    loads, out = [0] * num_readers, [[] for _ in range(num_readers)]
    for rows, unit, j, mu in pieces:
        r = min(range(num_readers), key=lambda i: (loads[i], i))
        loads[r] += rows
        out[r].append((unit, j, mu))
    return out


def _own(column: np.ndarray) -> np.ndarray:
    """`column` with each row's array copied out of the shard-wide buffer it views."""
    if column.dtype != object:
        return column.copy()
    out = np.empty(len(column), object)
    out[:] = [np.array(v) for v in column]
    return out


def _items(cols: Columns, kept: np.ndarray, pairing: Pairing | None) -> list[tuple[Any, ...]]:
    """A unit's items: kept rows as `TRAIN_COLUMNS` tuples, or pairs as (chosen, rejected) of `PAIR_COLUMNS`."""
    if pairing is None:
        # Copies: a row read from a shard is a view of the whole shard's values, which a row that lingers in
        # the buffer would keep alive.
        own = {c: _own(cols[c][kept]) for c in TRAIN_COLUMNS}
        return list(zip(*(own[c] for c in TRAIN_COLUMNS)))
    pairs = kept[pairing.pairs(cols["source_id"][kept], cols["reward"][kept])]
    own = {c: _own(cols[c][pairs.reshape(-1)]) for c in PAIR_COLUMNS}
    rows = list(zip(*(own[c] for c in PAIR_COLUMNS)))
    return list(zip(rows[0::2], rows[1::2]))


def _reader(data: GrowData, selection: Selection, pieces: Sequence[tuple[int, int, int]], rows_per_epoch: int,
            seed: int, reader: int, shuffle_buffer: int, pairing: Pairing | None = None) -> Iterator[tuple[Any, ...]]:
    """Endless items (`_items`: rows or pairs) of one reader: pieces in a new order each epoch, buffer-shuffled.

    The buffer holds at most one epoch of this reader's items, so a small reader is shuffled per epoch.
    """
    size = max(1, min(shuffle_buffer, rows_per_epoch))
    rng = np.random.default_rng([seed, reader, 0x5B])
    buffer: list[tuple[Any, ...]] = []
    cache: tuple[int, Columns] | None = None
    epoch = 0
    while True:
        for p in np.random.default_rng([seed, reader, epoch]).permutation(len(pieces)):
            unit, j, m = pieces[p]
            if cache is None or cache[0] != unit:
                columns = FILTER_COLUMNS + (TRAIN_COLUMNS if pairing is None else PAIR_COLUMNS)
                cols = data.read(unit, tuple(dict.fromkeys(columns)))
                kept, _ = selection.apply(cols)
                cache = (unit, _items(cols, kept, pairing))
            items = cache[1]
            for r in range(j, len(items), m):
                row = items[r]
                if len(buffer) < size:
                    buffer.append(row)
                    continue
                k = int(rng.integers(size))
                yield buffer[k]
                buffer[k] = row
        epoch += 1


@gin.configurable(denylist=["data", "selection", "counts", "batch_size", "feature_lengths", "seed", "shard",
                            "pairing", "pack"])
def stream_batches(data: GrowData, selection: Selection, counts: Counts, batch_size: int,
                   feature_lengths: Mapping[str, int], seed: int, shard: tuple[int, int] = (0, 1), *,
                   pairing: Pairing | None = None, pack: bool = False, num_readers: int = 8,
                   shuffle_buffer: int = 4096) -> Iterator[Batch]:
    """Endless batches of the selected rows; this process's block of every global batch (see module doc).

    With a `pairing` (DPO, IPO) the items are preference pairs of one source instead of rows: a batch of B rows
    holds B/2 pairs, rows 2k (chosen) and 2k + 1 (rejected) interleaved, with the behaviour log-probs.

    Args:
      data, selection, counts: The Grow data, the rows to use, and the first pass's `filter_counts` (with the
        same `pairing`).
      batch_size: Global rows per batch; this process yields `batch_size // shard[1]` of them.
      feature_lengths: Batch shape (`make_batch`).
      seed: Data order: the same seed gives the same global batches on any number of processes.
      shard: (i, n) from `partitioning.data_shard_info`: this process's block of each batch.
      pairing: Pair the rows (see above); None: rows.
      pack: Batch rows of several examples (`packed_rows`; each reader packs its own items, so the batches still
        do not depend on P), rewards per token; for the per-token losses. Not with `pairing`.
      num_readers: V, virtual readers (a multiple of the processes that divides the batch; fewer when the
        filter keeps fewer rows). Changing it changes the data order, not what an epoch holds.
      shuffle_buffer: Rows each reader shuffles among (memory: V/P buffers per process).
    """
    if counts.num_kept == 0:
        what = "examples" if pairing is None else f"pairs ({pairing.rule}, reward margin > {pairing.min_margin})"
        raise ValueError(f"Improve: the filter kept no Grow {what} of {data.description}; lower the "
                         "threshold (filters schedule).")
    if pack and pairing is not None:
        raise ValueError("Improve: preference pairs (DPO, IPO) cannot be packed; set improve_step.pack = False.")
    index, num_shards = shard
    per_item = 1 if pairing is None else 2
    if batch_size % (num_shards * per_item):
        raise ValueError(f"Improve: batch size {batch_size} is not divisible by the {num_shards} data shards "
                         f"(hosts){'' if pairing is None else ' times 2 rows per pair'}.")
    v = _num_readers(num_readers, batch_size // per_item, num_shards, counts.num_kept)
    assignment = _pieces(counts.kept_per_unit, v)
    per_reader = batch_size // per_item // v
    mine = range(index * v // num_shards, (index + 1) * v // num_shards)
    readers = [_reader(data, selection, assignment[r],
                       sum(-(-(counts.kept_per_unit[u] - j) // m) for u, j, m in assignment[r]), seed, r,
                       shuffle_buffer, pairing) for r in mine]
    if pack:
        rows_of = [packed_rows(reader, feature_lengths) for reader in readers]
        while True:
            packed = [next(rows) for rows in rows_of for _ in range(per_reader)]
            yield {k: np.stack([row[k] for row in packed]) for k in packed[0]}
    columns = TRAIN_COLUMNS if pairing is None else PAIR_COLUMNS
    while True:
        items = [next(reader) for reader in readers for _ in range(per_reader)]
        rows = items if pairing is None else [row for pair in items for row in pair]
        yield make_batch({c: [row[i] for row in rows] for i, c in enumerate(columns)}, feature_lengths)


def mixed_batches(data: GrowData, selection: Selection, reference_fraction: float, batch_size: int,
                  feature_lengths: Mapping[str, int], seed: int, shard: tuple[int, int] = (0, 1), *,
                  pack: bool = False) -> Iterator[Batch]:
    """Batches with a fixed share of references (ReST fine-tunes on D mixed with the samples of D_g).

    round(`reference_fraction` · B) rows of each global batch (a multiple of the data shards) come from the
    references `selection` keeps, the rest from its samples; each side is its own `stream_batches` stream, so
    the batches still do not depend on the number of processes. A side the filter leaves empty is an error.
    With `pack`, the share is of packed rows (`stream_batches`).
    """
    if not 0.0 <= reference_fraction <= 1.0:
        raise ValueError(f"reference_fraction={reference_fraction}; expected a fraction in [0, 1].")
    n = shard[1]
    num_refs = int(round(reference_fraction * batch_size / n)) * n
    sides = ((dataclasses.replace(selection, include_samples=False), num_refs, seed + 1),
             (dataclasses.replace(selection, include_references=False), batch_size - num_refs, seed))
    streams = [stream_batches(data, side, filter_counts(data, side), size, feature_lengths, side_seed, shard,
                              pack=pack) for side, size, side_seed in sides if size]
    while True:
        blocks = [next(stream) for stream in streams]
        yield {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
