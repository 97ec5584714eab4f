"""The Grow store's schema: record fields, files, shard layout, fingerprints and errors (ReST Sec. 3).

See `rest_jax.data.grow_store` for the layout of a store and the meaning of every field.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

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
