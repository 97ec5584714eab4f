"""Writing a Grow store (ReST Sec. 3, Grow): shard by shard, each committed by a rename, resumable after a kill."""

from __future__ import annotations

import datetime
import errno
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import gin
import numpy as np
import seqio
import tensorflow as tf

from rest_jax.data.vocab import vocab_file, vocab_fingerprint
from rest_jax.io import atomic
from rest_jax.data.grow_store.schema import (
    DEFAULT_IGNORED_MODEL_FIELDS, FIELDS, FORMAT_NAME, FORMAT_VERSION, GrowIncompleteError, GrowRecordError,
    GrowStoreCorruptError, GrowStoreDiskFullError, GrowStoreMismatchError, LAYOUT_FILE, METADATA_FILE,
    REFERENCE_SAMPLE_ID, REWARD_QUANTILES, ShardLayout, TEXT_FIELDS, TMP_SUFFIX, _FIELD_SET, _REQUIRED_SET,
    _RESUME_ADVICE, _check_coverage, _foreign_shards, _fsync_local, _is_out_of_space, _join, _read_json,
    model_config_dict, model_config_fingerprint)
from rest_jax.data.grow_store.records import _read_columns, serialize_batch


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
                "path": vocab_file(vocab),
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
