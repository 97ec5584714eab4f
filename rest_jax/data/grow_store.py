"""Grow store: the offline dataset written by a Grow step and read by Improve.

ReST (Gulcehre et al. 2023, arXiv 2308.08998), Sec. 3 "Grow": from the current policy draw N samples per
training source, add the original references (D_g = samples ∪ D), score every pair with the reward model and
keep the scores with the data. The result is an offline dataset that every Improve step of that Grow (Sec. 3
"Improve") and later experiments reuse, so it lives on disk, not in memory.

Layout of a store directory::

    layout.json                          what the store will hold (written first; checked on resume)
    shard-00000-of-00042.tfrecord        tf.train.Example records, one shard = a contiguous chunk of sources
    shard-00000-of-00042.tfrecord.tmp    a shard being written; never read (the rename is the commit)
    ...
    metadata.json                        written last, once every shard is complete: counts, reward
                                         statistics, config, checkpoint, vocabulary and model fingerprints

Work unit = shard. The ordered list of source ids is cut into chunks of ``sources_per_shard`` sources; shard
``i`` holds every record (N samples plus the reference) of the sources of chunk ``i``. On a pod host
``host_id`` writes the shards with ``i % num_hosts == host_id``. A shard is written to ``<name>.tmp`` and
renamed when complete, so after a kill the finished shards are kept and only the others are redone; each
shard is checked before its commit to hold every (source_id, sample_id) of its chunk exactly once.

Record fields (feature names in the tf.train.Example):

    source_id             int64   stable id of the source in its split (given by the Grow step)
    sample_id             int64   0..N-1 for samples; ``REFERENCE_SAMPLE_ID`` (-1) for the reference
    is_reference          int64   1 for the reference record, else 0 (must agree with sample_id)
    grow_index            int64   g of "ReST G=g"
    source_text           bytes   UTF-8
    candidate_text        bytes   UTF-8 (the sample, or the reference itself for the reference record)
    reference_text        bytes   UTF-8
    source_tokens         int64[] encoder input ids, stored as given (the Grow step's convention: with EOS)
    candidate_tokens      int64[] decoder target ids, stored as given
    reward                float   R(x, y), normalised to [0, 1] by the reward (not enforced; finite required)
    behaviour_logprobs    float[] log pi_behaviour(y_t | y_<t, x) per candidate token; empty when not
                                  computed, else as long as candidate_tokens
    behaviour_logprob_sum float   their sum; NaN when they were not computed

Floats are stored as float32 (tf.train.FloatList), so a float64 reward comes back as ``np.float32(reward)``.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from rest_jax.data.vocab import vocab_fingerprint
from rest_jax.io import atomic

REFERENCE_SAMPLE_ID = -1
METADATA_FILE = "metadata.json"
LAYOUT_FILE = "layout.json"
FORMAT_NAME = "rest_jax.grow_store"
FORMAT_VERSION = 1
TMP_SUFFIX = ".tmp"
REWARD_QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99)
# Not architecture: a store sampled with dropout 0.1 or in bfloat16 serves the same model.
DEFAULT_IGNORED_MODEL_FIELDS = ("dropout_rate", "dtype")

_SHARD_RE = re.compile(r"^shard-(\d{5})-of-(\d{5})\.tfrecord$")
_CORRUPT_ADVICE = "shard is corrupt; delete it and rerun Grow to regenerate it"
_RESUME_ADVICE = "Grow incomplete, rerun the Grow command to resume"

# Feature name -> kind. The order is the order of fields in a serialised record.
FIELDS: dict[str, str] = {
    "source_id": "int",
    "sample_id": "int",
    "is_reference": "int",
    "grow_index": "int",
    "reward": "float",
    "behaviour_logprob_sum": "float",
    "source_text": "bytes",
    "candidate_text": "bytes",
    "reference_text": "bytes",
    "source_tokens": "int_list",
    "candidate_tokens": "int_list",
    "behaviour_logprobs": "float_list",
}
_REQUIRED = ("source_id", "sample_id", "source_text", "candidate_text", "reference_text", "source_tokens",
             "candidate_tokens", "reward")
_FIELD_SET = frozenset(FIELDS)
_REQUIRED_SET = frozenset(_REQUIRED)
TEXT_FIELDS = tuple(k for k, v in FIELDS.items() if v == "bytes")


class GrowStoreError(Exception):
    """Base class of Grow store errors; messages name the store or file."""


class GrowIncompleteError(GrowStoreError):
    """The store has no metadata.json yet or misses shards: the Grow step did not finish."""


class GrowStoreCorruptError(GrowStoreError):
    """A shard is truncated, fails its CRC, or disagrees with metadata.json."""


class GrowStoreMismatchError(GrowStoreError):
    """The store was made with a different layout, vocabulary or model config."""


class GrowRecordError(GrowStoreError, ValueError):
    """A record handed to the writer is malformed (missing field, NaN reward, wrong source...)."""


class GrowStoreDiskFullError(GrowStoreError, OSError):
    """The disk filled up while a shard was written; the partial shard is removed, finished ones are kept."""


# errno values (and TF's texts for them) that mean the disk, quota or file-size limit is full.
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large")


def _is_out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in _SPACE_ERRNOS:
        return True
    return any(text in str(exc) for text in _SPACE_TEXTS)


# ----------------------------------------------------------------------------------------------------------
# Fingerprints.


def model_config_dict(model_config: Any) -> dict[str, Any]:
    """A JSON-able dict of a model config (a dataclass such as T5Config, or a mapping)."""
    if dataclasses.is_dataclass(model_config) and not isinstance(model_config, type):
        model_config = {f.name: getattr(model_config, f.name) for f in dataclasses.fields(model_config)}
    if not isinstance(model_config, Mapping):
        raise TypeError(f"model_config must be a dataclass or a mapping, got {type(model_config).__name__}")
    return atomic.jsonable(model_config)


def model_config_fingerprint(model_config: Any,
                             ignored_fields: Sequence[str] = DEFAULT_IGNORED_MODEL_FIELDS) -> str:
    """sha256 of the canonical JSON of the config's fields, less ``ignored_fields``."""
    fields = {k: v for k, v in model_config_dict(model_config).items() if k not in ignored_fields}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Small file helpers (tf.io.gfile, so a store can live on GCS next to a TPU pod).


def _join(directory: str, name: str) -> str:
    return os.path.join(directory, name)


def _fsync_local(path: str) -> None:
    """Flush a local file to disk before its rename commits it (a no-op for gs:// and the like)."""
    if "://" in path:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: str) -> Any:
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise GrowStoreCorruptError(f"{path} is not valid JSON ({e}); {_RESUME_ADVICE}.") from e


def _foreign_shards(directory: str, num_shards: int) -> list[str]:
    """Shard files in ``directory`` whose name says another shard count."""
    names = [os.path.basename(p) for p in tf.io.gfile.glob(_join(directory, "shard-*-of-*.tfrecord"))]
    return sorted(n for n in names if (m := _SHARD_RE.match(n)) and int(m.group(2)) != num_shards)


# ----------------------------------------------------------------------------------------------------------
# Layout: which sources go to which shard.


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """Deterministic assignment of the ordered sources to shards.

    Attributes:
      grow_index: g of the Grow step.
      source_ids: ordered, unique source ids (stable ids in their split).
      num_samples: N, samples per source.
      sources_per_shard: chunk size; shard i holds source_ids[i*s:(i+1)*s].
      include_references: whether each source also has its reference record (sample_id -1).
    """

    grow_index: int
    source_ids: tuple[int, ...]
    num_samples: int
    sources_per_shard: int
    include_references: bool

    def __post_init__(self):
        if not self.source_ids:
            raise ValueError("A Grow store needs at least one source.")
        if len(set(self.source_ids)) != len(self.source_ids):
            raise ValueError("source_ids contains duplicates; each source must be listed once.")
        if self.num_samples < 1 and not self.include_references:
            raise ValueError("num_samples must be >= 1 (or include_references=True).")
        if self.num_samples < 0 or self.sources_per_shard < 1:
            raise ValueError(f"Bad layout: num_samples={self.num_samples}, "
                             f"sources_per_shard={self.sources_per_shard}.")

    @property
    def num_shards(self) -> int:
        return math.ceil(len(self.source_ids) / self.sources_per_shard)

    @property
    def records_per_source(self) -> int:
        return self.num_samples + int(self.include_references)

    def shard_source_ids(self, shard: int) -> tuple[int, ...]:
        """The source ids whose records shard ``shard`` holds."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range [0, {self.num_shards})")
        s = self.sources_per_shard
        return self.source_ids[shard * s:(shard + 1) * s]

    def shard_name(self, shard: int) -> str:
        return f"shard-{shard:05d}-of-{self.num_shards:05d}.tfrecord"

    def to_json(self) -> dict[str, Any]:
        ids = np.asarray(self.source_ids, np.int64)
        if np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
            encoded: Any = {"start": int(ids[0]), "stop": int(ids[0]) + len(ids)}
        else:
            encoded = ids.tolist()
        return {
            "grow_index": self.grow_index,
            "num_sources": len(ids),
            "num_samples": self.num_samples,
            "include_references": self.include_references,
            "reference_sample_id": REFERENCE_SAMPLE_ID,
            "sources_per_shard": self.sources_per_shard,
            "num_shards": self.num_shards,
            "source_ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            "source_ids": encoded,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ShardLayout:
        ids = obj["source_ids"]
        if isinstance(ids, Mapping):
            ids = range(ids["start"], ids["stop"])
        return cls(grow_index=int(obj["grow_index"]), source_ids=tuple(int(i) for i in ids),
                   num_samples=int(obj["num_samples"]), sources_per_shard=int(obj["sources_per_shard"]),
                   include_references=bool(obj["include_references"]))


def _check_coverage(layout: ShardLayout, shard: int, source_ids: np.ndarray, sample_ids: np.ndarray,
                    where: str) -> None:
    """Raises unless shard ``shard`` holds each (source, sample) of its chunk exactly once."""
    expected = np.asarray(layout.shard_source_ids(shard), np.int64)
    order = np.argsort(expected)
    pos = np.searchsorted(expected, source_ids, sorter=order)
    pos = np.minimum(pos, len(expected) - 1)
    foreign = expected[order[pos]] != source_ids
    if foreign.any():
        bad = np.unique(source_ids[foreign])[:5].tolist()
        raise GrowStoreCorruptError(
            f"{where}: source_id(s) {bad} do not belong to shard {shard} (it holds {len(expected)} sources "
            f"starting at source_id {int(expected[0])}).")
    lo = REFERENCE_SAMPLE_ID if layout.include_references else 0
    bad_sample = (sample_ids < lo) | (sample_ids >= layout.num_samples)
    if bad_sample.any():
        raise GrowStoreCorruptError(
            f"{where}: sample_id(s) {np.unique(sample_ids[bad_sample])[:5].tolist()} outside "
            f"[{lo}, {layout.num_samples}).")
    per = layout.records_per_source
    counts = np.bincount(order[pos] * per + (sample_ids - lo), minlength=len(expected) * per)
    if (counts != 1).any():
        def pairs(mask):
            idx = np.flatnonzero(mask)[:5]
            return [(int(expected[i // per]), int(i % per + lo)) for i in idx]
        raise GrowStoreCorruptError(
            f"{where}: every (source_id, sample_id) must appear exactly once; "
            f"missing {int((counts == 0).sum())} e.g. {pairs(counts == 0)}, "
            f"duplicated {int((counts > 1).sum())} e.g. {pairs(counts > 1)}.")


# ----------------------------------------------------------------------------------------------------------
# Serialisation: tf.train.Example protos. At ~40 us a record (measured on this project's 2-core machine)
# this is 0.4% of a Grow step's time per sample (8.9 ms per Multi30k sample, ~10 ms at the IWSLT shape).


def _feature(kind: str, value: Any) -> tf.train.Feature:
    if kind == "int":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    if kind == "float":
        return tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))
    if kind == "bytes":
        return tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[value.encode("utf-8") if isinstance(value, str) else bytes(value)]))
    if kind == "int_list":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=np.asarray(value, np.int64).tolist()))
    return tf.train.Feature(float_list=tf.train.FloatList(value=np.asarray(value, np.float32).tolist()))


def serialize_batch(columns: Mapping[str, Any]) -> list[bytes]:
    """Serialised tf.train.Example records of a complete, validated column batch (see ``FIELDS``)."""
    out = []
    for i in range(len(columns["source_id"])):
        feature = {name: _feature(kind, columns[name][i]) for name, kind in FIELDS.items()}
        out.append(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())
    return out


# ----------------------------------------------------------------------------------------------------------
# Record validation: a record dict, or a column batch, -> a checked column batch.


class _ColumnBuffer:
    """Gathers record dicts and column batches into columns, so they are checked and serialised together."""

    def __init__(self):
        self.cols: dict[str, list] = {k: [] for k in FIELDS}
        self.n = 0

    def add(self, item: Mapping[str, Any]) -> None:
        keys = item.keys()
        if not _FIELD_SET.issuperset(keys):
            raise GrowRecordError(f"Unknown record field(s) {sorted(set(keys) - _FIELD_SET)}; "
                                  f"known: {list(FIELDS)}.")
        if not _REQUIRED_SET.issubset(keys):
            raise GrowRecordError(f"Record misses field(s) {sorted(_REQUIRED_SET - set(keys))}.")
        sid = item["source_id"]
        if np.ndim(sid) == 0:  # One record.
            for k, v in item.items():
                self.cols[k].append(v)
            self.n += 1
            return
        n = len(sid)
        for k, v in item.items():
            if len(v) != n:
                raise GrowRecordError(f"Column batch: '{k}' has {len(v)} entries, source_id has {n}.")
            self.cols[k].extend(v)
        self.n += n

    def take(self, where: str) -> tuple[dict[str, list], int]:
        """The gathered columns (optional fields only when every record gave them), and their count."""
        cols = {k: v for k, v in self.cols.items() if v}
        for k, v in cols.items():
            if len(v) != self.n:
                raise GrowRecordError(f"{where}: '{k}' given for {len(v)} of {self.n} records; an optional "
                                      "field must be given for all records of a batch or none.")
        n = self.n
        self.__init__()
        return cols, n


def _prepare_batch(cols: dict[str, list], n: int, grow_index: int, where: str) -> dict[str, Any]:
    """Fills defaults and checks a column batch; raises GrowRecordError naming the offending record."""
    out: dict[str, Any] = {}
    out["source_id"] = np.asarray(cols["source_id"], np.int64)
    out["sample_id"] = np.asarray(cols["sample_id"], np.int64)

    def fail(mask: np.ndarray, what: str):
        i = int(np.flatnonzero(mask)[0])
        raise GrowRecordError(f"{where}: record (source_id={out['source_id'][i]}, "
                              f"sample_id={out['sample_id'][i]}) {what}.")

    is_ref = out["sample_id"] == REFERENCE_SAMPLE_ID
    if "is_reference" in cols:
        given = np.asarray(cols["is_reference"]).astype(bool)
        if (given != is_ref).any():
            fail(given != is_ref, f"has is_reference inconsistent with sample_id (references use sample_id "
                                  f"{REFERENCE_SAMPLE_ID})")
    out["is_reference"] = is_ref.astype(np.int64)
    if "grow_index" in cols:
        g = np.asarray(cols["grow_index"], np.int64)
        if (g != grow_index).any():
            fail(g != grow_index, f"has grow_index {g[g != grow_index][0]}, the store is Grow {grow_index}")
    out["grow_index"] = np.full(n, grow_index, np.int64)
    reward = np.asarray(cols["reward"], np.float64)
    if not np.isfinite(reward).all():
        fail(~np.isfinite(reward), f"has a non-finite reward {reward[~np.isfinite(reward)][0]}")
    out["reward"] = reward
    for k in TEXT_FIELDS:
        bad = np.array([not isinstance(v, (str, bytes)) for v in cols[k]])
        if bad.any():
            fail(bad, f"has a {k} that is neither str nor bytes")
        out[k] = cols[k]
    for k in ("source_tokens", "candidate_tokens"):
        out[k] = [np.asarray(v, np.int64).reshape(-1) for v in cols[k]]
    cand_len = np.fromiter((len(v) for v in out["candidate_tokens"]), np.int64, n)
    lps = [np.asarray(v, np.float32).reshape(-1) for v in cols.get("behaviour_logprobs", [()] * n)]
    lp_len = np.fromiter((len(v) for v in lps), np.int64, n)
    bad = (lp_len != 0) & (lp_len != cand_len)
    if bad.any():
        fail(bad, "has behaviour_logprobs of a length other than candidate_tokens'")
    out["behaviour_logprobs"] = lps
    sums = np.array([v.sum(dtype=np.float64) if len(v) else np.nan for v in lps])
    if "behaviour_logprob_sum" in cols:
        given = np.asarray(cols["behaviour_logprob_sum"], np.float64)
        # Sums of float32 terms in another order differ in the last bits; a real mismatch is a bug.
        bad = (lp_len > 0) & ~np.isclose(given, sums, rtol=1e-4, atol=1e-3)
        if bad.any():
            fail(bad, f"has behaviour_logprob_sum {given[bad][0]} but its log-probs sum to {sums[bad][0]}")
        sums = np.where(lp_len > 0, given, np.nan)
    out["behaviour_logprob_sum"] = sums
    return out


# ----------------------------------------------------------------------------------------------------------
# Writer.


@gin.configurable(allowlist=["encode_batch_size"])  # The rest is passed by Grow.
class GrowStoreWriter:
    """Writes a Grow store shard by shard, resumably (ReST Sec. 3, Grow).

    Typical use on each host::

        writer = GrowStoreWriter(dir, grow_index=1, source_ids=ids, num_samples=100)
        for shard in writer.pending_shards(host_id, num_hosts):
            writer.write_shard(shard, records_for(writer.shard_source_ids(shard)))
        # host 0, after all hosts are done:
        writer.write_metadata(config=..., checkpoint=..., vocab=..., model_config=...)
    """

    def __init__(self, directory: str | os.PathLike, grow_index: int, source_ids: Sequence[int] | int,
                 num_samples: int, sources_per_shard: int = 1024, include_references: bool = True,
                 encode_batch_size: int = 2048):
        """Creates the store directory and its layout.json, or checks them against an existing one.

        Args:
          directory: the store directory (local or gs://).
          grow_index: g of the Grow step; stamped on every record.
          source_ids: ordered, unique stable ids of the sources to sample, or their count n (ids 0..n-1).
          num_samples: N samples per source (sample_id 0..N-1).
          sources_per_shard: sources per shard (the unit of work and of resumption).
          include_references: store the reference of each source as a record with sample_id -1.
          encode_batch_size: records serialised together (speed only).
        """
        self.directory = os.fspath(directory)
        if isinstance(source_ids, (int, np.integer)):
            source_ids = range(int(source_ids))
        self.layout = ShardLayout(grow_index=int(grow_index), source_ids=tuple(int(i) for i in source_ids),
                                  num_samples=int(num_samples), sources_per_shard=int(sources_per_shard),
                                  include_references=bool(include_references))
        self.encode_batch_size = encode_batch_size
        tf.io.gfile.makedirs(self.directory)
        layout_path = _join(self.directory, LAYOUT_FILE)
        if tf.io.gfile.exists(layout_path):
            try:
                existing = _read_json(layout_path)
            except GrowStoreCorruptError as e:
                # Rerunning alone would hit this again; the shards are re-checked against a fresh layout.
                raise GrowStoreCorruptError(
                    f"{layout_path} is damaged ({e.__cause__}); delete it and rerun Grow: finished shards are "
                    "kept and checked again against the new layout.") from e
            self._check_same_layout(existing, layout_path)
        else:
            atomic.write_json(layout_path, self.layout.to_json(), indent=1, sort_keys=False)
        foreign = _foreign_shards(self.directory, self.num_shards)
        if foreign:
            raise GrowStoreMismatchError(
                f"{self.directory} holds shard files of a different shard count ({foreign[:3]}...), but this "
                f"Grow writes {self.num_shards} shards; remove them or use a fresh directory.")

    def _check_same_layout(self, existing: Mapping[str, Any], path: str) -> None:
        mine = self.layout.to_json()
        diff = [f"{k}: store has {existing.get(k)!r}, now {mine[k]!r}" for k in mine
                if k != "source_ids" and existing.get(k) != mine[k]]
        if diff:
            raise GrowStoreMismatchError(
                f"{path}: this directory holds a Grow store begun with other settings ({'; '.join(diff)}). "
                "Resume with the original settings or write to a fresh directory.")

    @property
    def num_shards(self) -> int:
        return self.layout.num_shards

    def shard_source_ids(self, shard: int) -> tuple[int, ...]:
        """The sources whose records ``write_shard(shard, ...)`` must receive."""
        return self.layout.shard_source_ids(shard)

    def shard_path(self, shard: int) -> str:
        return _join(self.directory, self.layout.shard_name(shard))

    def shard_is_complete(self, shard: int) -> bool:
        """True when the shard's final file exists (its rename was the commit)."""
        return tf.io.gfile.exists(self.shard_path(shard))

    def pending_shards(self, host_id: int = 0, num_hosts: int = 1) -> list[int]:
        """Shards this host still has to write: i % num_hosts == host_id and not complete."""
        if not 0 <= host_id < num_hosts:
            raise ValueError(f"host_id {host_id} not in [0, {num_hosts})")
        return [i for i in range(host_id, self.num_shards, num_hosts) if not self.shard_is_complete(i)]

    def missing_shards(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.shard_is_complete(i)]

    def write_shard(self, shard: int, records: Iterable[Mapping[str, Any]]) -> int:
        """Writes every record of shard ``shard`` and commits it by renaming; returns the record count.

        Args:
          shard: shard index.
          records: record dicts (keys of ``FIELDS``; is_reference, grow_index, behaviour_logprobs and
            behaviour_logprob_sum optional), or column batches: the same keys, each value a sequence with one
            entry per record. Consumed lazily, so sampling can produce them as it goes.

        Raises:
          GrowRecordError / GrowStoreCorruptError: a bad record, or the records do not hold every
            (source_id, sample_id) of the shard exactly once. Nothing is committed then.
        """
        final = self.shard_path(shard)
        tmp = final + TMP_SUFFIX
        where = f"Grow store shard {final}"
        # A rewritten shard may change counts: metadata.json is only valid for the shards it was made from.
        metadata_path = _join(self.directory, METADATA_FILE)
        if tf.io.gfile.exists(metadata_path):
            tf.io.gfile.remove(metadata_path)
        seen_sources, seen_samples = [], []
        count = 0
        committed = False
        writer = tf.io.TFRecordWriter(tmp)
        try:
            buffer = _ColumnBuffer()

            def flush():
                nonlocal count
                if not buffer.n:
                    return
                cols, n = buffer.take(where)
                batch = _prepare_batch(cols, n, self.layout.grow_index, where)
                seen_sources.append(batch["source_id"])
                seen_samples.append(batch["sample_id"])
                for rec in serialize_batch(batch):
                    writer.write(rec)
                count += n

            for item in records:
                buffer.add(item)
                if buffer.n >= self.encode_batch_size:
                    flush()
            flush()
            writer.close()
            _check_coverage(self.layout, shard,
                            np.concatenate(seen_sources) if seen_sources else np.zeros(0, np.int64),
                            np.concatenate(seen_samples) if seen_samples else np.zeros(0, np.int64),
                            where)
            _fsync_local(tmp)
            tf.io.gfile.rename(tmp, final, overwrite=True)
            committed = True
        except Exception as e:  # noqa: BLE001 - only out-of-space is translated
            if _is_out_of_space(e):
                done = [i for i in range(self.num_shards) if i != shard and self.shard_is_complete(i)]
                raise GrowStoreDiskFullError(
                    errno.ENOSPC,
                    f"Out of disk space while writing Grow store shard {final} ({e}). The partial shard is "
                    f"removed; the {len(done)} finished shard(s) of {self.num_shards} in {self.directory} are "
                    "intact. Free space, then rerun the same Grow command to resume.") from e
            raise
        finally:
            if not committed:
                try:
                    writer.close()
                except Exception:  # noqa: BLE001 - already failing; a second error (full disk) must not mask it
                    pass
                if tf.io.gfile.exists(tmp):
                    tf.io.gfile.remove(tmp)
        return count

    def write_metadata(self, config: Any = None, checkpoint: str | None = None,
                       vocab: str | os.PathLike | seqio.Vocabulary | None = None, model_config: Any = None,
                       extra: Mapping[str, Any] | None = None, wait_s: float = 0.0,
                       poll_s: float = 5.0) -> dict[str, Any]:
        """Checks every shard and writes metadata.json atomically; the store is then complete.

        Reads the ids and rewards of all shards (so a corrupt shard or a missing/duplicated source is caught
        here, before the store is declared complete) and records counts and reward statistics. On a pod,
        host 0 calls this after the others finished; ``wait_s`` > 0 polls that long for missing shards.

        Args:
          config: the run's configuration (gin operative config string, or a JSON-able dict).
          checkpoint: path of the policy checkpoint that sampled.
          vocab: vocabulary (path or SentencePieceVocabulary) of the token ids; fingerprinted.
          model_config: model config (dataclass or mapping) of the policy; stored and fingerprinted.
          extra: further JSON-able facts (sampling temperature, reward name, timings...).
          wait_s: seconds to wait for shards other hosts are still writing.
          poll_s: polling interval while waiting.

        Returns:
          The metadata dict written.
        """
        deadline = time.monotonic() + wait_s
        while (missing := self.missing_shards()) and time.monotonic() < deadline:
            time.sleep(poll_s)
        if missing:
            raise GrowIncompleteError(
                f"{self.directory}: {len(missing)} of {self.num_shards} shards missing (e.g. "
                f"{[self.layout.shard_name(i) for i in missing[:3]]}); {_RESUME_ADVICE}.")
        shards, rewards, is_ref = [], [], []
        for i in range(self.num_shards):
            path = self.shard_path(i)
            cols = _read_columns(path, ("source_id", "sample_id", "is_reference", "reward"))
            _check_coverage(self.layout, i, cols["source_id"], cols["sample_id"], f"Grow store shard {path}")
            rewards.append(cols["reward"])
            is_ref.append(cols["is_reference"])
            shards.append({"file": self.layout.shard_name(i), "num_records": len(cols["reward"]),
                           "num_bytes": tf.io.gfile.stat(path).length})
        rewards_all = np.concatenate(rewards)
        ref_all = np.concatenate(is_ref)
        metadata = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "grow_index": self.layout.grow_index,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "layout": self.layout.to_json(),
            "shards": shards,
            "counts": {"sources": len(self.layout.source_ids), "records": int(len(rewards_all)),
                       "samples": int((~ref_all).sum()), "references": int(ref_all.sum())},
            "reward_stats": {"all": reward_stats(rewards_all), "samples": reward_stats(rewards_all[~ref_all]),
                             "references": reward_stats(rewards_all[ref_all])},
            "checkpoint": None if checkpoint is None else os.fspath(checkpoint),
            "config": atomic.jsonable(config),
            "vocab": None if vocab is None else {
                "path": os.fspath(getattr(vocab, "sentencepiece_model_file", vocab)),
                "sha256": vocab_fingerprint(vocab)},
            "model_config": None if model_config is None else {
                "fields": model_config_dict(model_config),
                "ignored_fields": list(DEFAULT_IGNORED_MODEL_FIELDS),
                "sha256": model_config_fingerprint(model_config)},
            "extra": atomic.jsonable(dict(extra or {})),
        }
        atomic.write_json(_join(self.directory, METADATA_FILE), metadata, indent=1, sort_keys=False)
        return metadata


def reward_stats(rewards: np.ndarray) -> dict[str, Any]:
    """count, mean, std, min, max and quantiles (REWARD_QUANTILES) of a reward array (float64 maths)."""
    r = np.asarray(rewards, np.float64)
    if not len(r):
        return {"count": 0}
    return {"count": int(len(r)), "mean": float(r.mean()), "std": float(r.std()), "min": float(r.min()),
            "max": float(r.max()),
            "quantiles": {str(q): float(v) for q, v in zip(REWARD_QUANTILES, np.quantile(r, REWARD_QUANTILES))}}


# ----------------------------------------------------------------------------------------------------------
# Reading.


def _feature_spec(columns: Iterable[str]) -> dict[str, Any]:
    spec = {}
    for name in columns:
        kind = FIELDS[name]
        if kind == "int":
            spec[name] = tf.io.FixedLenFeature([], tf.int64)
        elif kind == "float":
            spec[name] = tf.io.FixedLenFeature([], tf.float32)
        elif kind == "bytes":
            spec[name] = tf.io.FixedLenFeature([], tf.string)
        else:
            spec[name] = tf.io.RaggedFeature(tf.int64 if kind == "int_list" else tf.float32,
                                             row_splits_dtype=tf.int64)
    return spec


def _check_columns(columns: Iterable[str] | None) -> tuple[str, ...]:
    columns = tuple(FIELDS) if columns is None else tuple(columns)
    unknown = [c for c in columns if c not in FIELDS]
    if unknown:
        raise KeyError(f"Unknown Grow store column(s) {unknown}; known: {list(FIELDS)}")
    return columns


def _iterate_file(path: str, columns: Sequence[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Column batches of one shard; DataLossError becomes GrowStoreCorruptError naming the file."""
    spec = _feature_spec(columns)

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        return {k: (v.values, v.row_splits) if isinstance(v, tf.RaggedTensor) else v for k, v in parsed.items()}

    ds = tf.data.TFRecordDataset(path).batch(batch_size).map(parse)
    it = iter(ds.as_numpy_iterator())
    while True:
        try:
            raw = next(it)
        except StopIteration:
            return
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
            raise GrowStoreCorruptError(f"{path}: {e.message.strip()} -- {_CORRUPT_ADVICE}.") from e
        yield {k: _to_numpy_column(k, v) for k, v in raw.items()}


def _to_numpy_column(name: str, value: Any) -> np.ndarray:
    kind = FIELDS[name]
    if kind == "int":
        return value.astype(bool) if name == "is_reference" else value.astype(np.int64)
    if kind == "float":
        return value.astype(np.float32)
    if kind == "bytes":
        out = np.empty(len(value), object)
        out[:] = [b.decode("utf-8") for b in value]
        return out
    values, splits = value
    values = values.astype(np.int32 if kind == "int_list" else np.float32)
    out = np.empty(len(splits) - 1, object)
    out[:] = np.split(values, splits[1:-1])
    return out


def _concat_columns(batches: list[dict[str, np.ndarray]], columns: Sequence[str]) -> dict[str, np.ndarray]:
    if not batches:
        return {c: np.zeros(0, object) for c in columns}
    return {c: np.concatenate([b[c] for b in batches]) for c in columns}


def _read_columns(path: str, columns: Sequence[str], batch_size: int = 8192) -> dict[str, np.ndarray]:
    return _concat_columns(list(_iterate_file(path, columns, batch_size)), columns)


def _tf_record_fn(columns: Sequence[str], seqio_names: bool) -> Callable[[tf.Tensor], tf.data.Dataset]:
    """filename -> dataset of records (dense 1-D lists), with optional SeqIO feature names."""
    spec = _feature_spec(columns)
    rename = {"source_tokens": "inputs", "candidate_tokens": "targets", "source_text": "inputs_pretokenized",
              "candidate_text": "targets_pretokenized",
              "reference_text": "reference_pretokenized"} if seqio_names else {}

    def convert(name: str, v: tf.Tensor) -> tf.Tensor:
        if name in ("source_tokens", "candidate_tokens"):
            return tf.cast(v, tf.int32)
        if name == "is_reference":
            return tf.cast(v, tf.bool)
        return v

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        return {rename.get(k, k): convert(k, v) for k, v in parsed.items()}

    def read(filename: tf.Tensor) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(filename).batch(256).map(parse).unbatch()

    return read


class GrowStore:
    """A complete Grow store, opened for reading (ReST Sec. 3: Improve steps reuse D_g).

    Opening checks metadata.json, that every shard it lists exists with the recorded size, and that no
    shard of another shard count lies in the directory. Reading checks CRCs (tf.data) and that every
    (source_id, sample_id) of the layout appears exactly once.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        metadata_path = _join(self.directory, METADATA_FILE)
        if not tf.io.gfile.exists(metadata_path):
            if not tf.io.gfile.isdir(self.directory):
                raise FileNotFoundError(f"No Grow store at {self.directory}: the directory does not exist.")
            raise GrowIncompleteError(f"{self.directory} has no {METADATA_FILE}: {_RESUME_ADVICE}.")
        self.metadata: dict[str, Any] = _read_json(metadata_path)
        if self.metadata.get("format") != FORMAT_NAME:
            raise GrowStoreMismatchError(f"{metadata_path} is not a Grow store metadata file.")
        if self.metadata.get("version") != FORMAT_VERSION:
            raise GrowStoreMismatchError(f"{metadata_path}: Grow store format version "
                                         f"{self.metadata.get('version')}, this code reads {FORMAT_VERSION}.")
        self.layout = ShardLayout.from_json(self.metadata["layout"])
        shards = self.metadata["shards"]
        if len(shards) != self.layout.num_shards:
            raise GrowStoreCorruptError(f"{metadata_path} lists {len(shards)} shards, its layout says "
                                        f"{self.layout.num_shards}.")
        foreign = _foreign_shards(self.directory, self.layout.num_shards)
        if foreign:
            raise GrowStoreMismatchError(
                f"{_join(self.directory, foreign[0])} belongs to a store of another shard count; "
                f"{self.directory} has {self.layout.num_shards} shards. Remove the foreign shard(s) {foreign[:3]}.")
        for i, info in enumerate(shards):
            path = _join(self.directory, info["file"])
            if info["file"] != self.layout.shard_name(i):
                raise GrowStoreCorruptError(f"{metadata_path}: shard {i} is named {info['file']}, expected "
                                            f"{self.layout.shard_name(i)}.")
            if not tf.io.gfile.exists(path):
                raise GrowIncompleteError(f"{path} is missing from the Grow store {self.directory}; "
                                          f"{_RESUME_ADVICE}.")
            size = tf.io.gfile.stat(path).length
            if size != info["num_bytes"]:
                raise GrowStoreCorruptError(f"{path}: {size} bytes, but {METADATA_FILE} recorded "
                                            f"{info['num_bytes']} (truncated or replaced) -- {_CORRUPT_ADVICE}.")

    @staticmethod
    def is_complete(directory: str | os.PathLike) -> bool:
        """True when ``directory`` holds a complete store (opens without error)."""
        try:
            GrowStore(directory)
        except (GrowStoreError, FileNotFoundError):
            return False
        return True

    @property
    def grow_index(self) -> int:
        return self.layout.grow_index

    @property
    def num_records(self) -> int:
        return int(self.metadata["counts"]["records"])

    @property
    def reward_stats(self) -> dict[str, Any]:
        return self.metadata["reward_stats"]

    @property
    def shard_paths(self) -> list[str]:
        return [_join(self.directory, s["file"]) for s in self.metadata["shards"]]

    def iterate(self, columns: Iterable[str] | None = None,
                batch_size: int = 8192) -> Iterator[dict[str, np.ndarray]]:
        """Column batches (dict name -> numpy array), shard by shard in shard order, records in write order.

        Columns: ints int64 (is_reference bool), floats float32, texts object arrays of str, token lists
        object arrays of int32 arrays, behaviour_logprobs object arrays of float32 arrays. Shard coverage
        (each (source_id, sample_id) exactly once) is checked at the end of each shard.
        """
        columns = _check_columns(columns)
        read = tuple(dict.fromkeys(columns + ("source_id", "sample_id")))
        for i, path in enumerate(self.shard_paths):
            ids, samples = [], []
            for batch in _iterate_file(path, read, batch_size):
                ids.append(batch["source_id"])
                samples.append(batch["sample_id"])
                yield {c: batch[c] for c in columns}
            _check_coverage(self.layout, i, np.concatenate(ids) if ids else np.zeros(0, np.int64),
                            np.concatenate(samples) if samples else np.zeros(0, np.int64),
                            f"Grow store shard {path}")

    def read_shard(self, shard: int, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The records of shard ``shard`` (every record of its sources) as columns, coverage checked."""
        columns = _check_columns(columns)
        read = tuple(dict.fromkeys(columns + ("source_id", "sample_id")))
        path = self.shard_paths[shard]
        cols = _read_columns(path, read)
        _check_coverage(self.layout, shard, cols["source_id"], cols["sample_id"], f"Grow store shard {path}")
        return {c: cols[c] for c in columns}

    def as_numpy(self, columns: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """All records as columns (see ``iterate``); pass ``columns`` to read only what a filter needs."""
        columns = _check_columns(columns)
        return _concat_columns(list(self.iterate(columns)), columns)

    def verify(self) -> None:
        """Reads every shard (CRC) and checks that no source is duplicated or missing."""
        for _ in self.iterate(("source_id",)):
            pass

    def as_tf_dataset(self, columns: Iterable[str] | None = None, shuffle_files: bool = False,
                      seed: int | None = None) -> tf.data.Dataset:
        """One element per record, lists as dense 1-D tensors (tokens int32). Unshuffled: shard order.

        A corrupt shard surfaces here as TF's DataLossError at iteration time; ``verify()`` names the file.
        """
        columns = _check_columns(columns)
        files = tf.data.Dataset.from_tensor_slices(self.shard_paths)
        if shuffle_files:
            files = files.shuffle(len(self.shard_paths), seed=seed)
        return files.interleave(_tf_record_fn(columns, seqio_names=False), cycle_length=1)

    def check_compatible(self, vocab: str | os.PathLike | seqio.Vocabulary | None = None,
                         model_config: Any = None,
                         ignored_fields: Sequence[str] = DEFAULT_IGNORED_MODEL_FIELDS) -> None:
        """Raises GrowStoreMismatchError when the store was made with another vocabulary or model config."""
        problems = []
        if vocab is not None:
            recorded = self.metadata.get("vocab")
            if recorded is None:
                logging.warning("Grow store %s records no vocabulary; cannot check it.", self.directory)
            elif (fp := vocab_fingerprint(vocab)) != recorded["sha256"]:
                given = os.fspath(getattr(vocab, "sentencepiece_model_file", vocab))
                problems.append(f"vocabulary differs: store made with {recorded['path']} "
                                f"(sha256 {recorded['sha256'][:12]}...), given {given} (sha256 {fp[:12]}...)")
        if model_config is not None:
            recorded = self.metadata.get("model_config")
            if recorded is None:
                logging.warning("Grow store %s records no model config; cannot check it.", self.directory)
            else:
                mine, theirs = model_config_dict(model_config), recorded["fields"]
                diff = [f"{k}: store {theirs.get(k)!r}, given {mine.get(k)!r}"
                        for k in sorted(set(mine) | set(theirs))
                        if k not in ignored_fields and mine.get(k) != theirs.get(k)]
                if diff:
                    problems.append("model config differs (" + "; ".join(diff) + ")")
        if problems:
            raise GrowStoreMismatchError(f"Grow store {self.directory} is incompatible: " + "; ".join(problems)
                                         + ".")

    def register_seqio_task(self, vocabulary: seqio.Vocabulary, name: str | None = None,
                            model_config: Any = None, preprocessors: Sequence[Callable[..., Any]] = (),
                            split: str = "train", overwrite: bool = True) -> seqio.Task:
        """See the module-level ``register_seqio_task``."""
        return register_seqio_task(self, vocabulary, name=name, model_config=model_config,
                                   preprocessors=preprocessors, split=split, overwrite=overwrite)


def default_task_name(store: GrowStore) -> str:
    tail = re.sub(r"[^0-9A-Za-z_]+", "_", os.path.basename(os.path.normpath(store.directory)))
    digest = hashlib.sha1(os.path.abspath(store.directory).encode()).hexdigest()[:8]
    return f"grow_store_g{store.grow_index}_{tail}_{digest}"


def register_seqio_task(store: GrowStore | str | os.PathLike, vocabulary: seqio.Vocabulary,
                        name: str | None = None, model_config: Any = None,
                        preprocessors: Sequence[Callable[..., Any]] = (), split: str = "train",
                        overwrite: bool = True) -> seqio.Task:
    """Registers a Grow store as a SeqIO task so Improve reads it like any other task.

    Features: ``inputs`` / ``targets`` (int32 source / candidate token ids, stored with their EOS so no EOS is
    appended), ``inputs_pretokenized`` / ``targets_pretokenized`` / ``reference_pretokenized`` (text), and
    passed through: ``reward``, ``behaviour_logprobs``, ``behaviour_logprob_sum``, ``is_reference`` (bool),
    ``source_id``, ``sample_id``, ``grow_index``. One split (``split``) with every record; seqio shards it by
    file across hosts.

    Args:
      store: a GrowStore or its directory.
      vocabulary: the policy's vocabulary; checked against the store's fingerprint.
      name: task name (default: derived from the directory and Grow index).
      model_config: when given, checked against the store's model config.
      preprocessors: run after reading (e.g. a reward filter from rest_jax.filters).
      split: the split name the records appear under.
      overwrite: replace a task of the same name already registered.

    Returns:
      The registered seqio.Task.
    """
    if not isinstance(store, GrowStore):
        store = GrowStore(store)
    store.check_compatible(vocab=vocabulary if hasattr(vocabulary, "sentencepiece_model_file") else None,
                           model_config=model_config)
    name = name or default_task_name(store)
    if overwrite and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    source = seqio.FileDataSource(
        read_file_fn=_tf_record_fn(tuple(FIELDS), seqio_names=True),
        split_to_filepattern={split: store.shard_paths},
        num_input_examples={split: store.num_records})
    features = {"inputs": seqio.Feature(vocabulary, add_eos=False),
                "targets": seqio.Feature(vocabulary, add_eos=False)}
    return seqio.TaskRegistry.add(name, source=source, output_features=features,
                                  preprocessors=list(preprocessors))

