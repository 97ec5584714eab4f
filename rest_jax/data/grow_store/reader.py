"""Reading a Grow store (ReST Sec. 3, Improve reuses D_g): integrity checks, columns, tf.data and seqio tasks."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from rest_jax.data import tf_tracing
from rest_jax.data.vocab import vocab_file, vocab_fingerprint
from rest_jax.data.grow_store.schema import (
    DEFAULT_IGNORED_MODEL_FIELDS, FIELDS, FORMAT_NAME, FORMAT_VERSION, GrowIncompleteError,
    GrowStoreCorruptError, GrowStoreError, GrowStoreMismatchError, METADATA_FILE, ShardLayout, _CORRUPT_ADVICE,
    _RESUME_ADVICE, _check_coverage, _foreign_shards, _join, _read_json, model_config_dict)
from rest_jax.data.grow_store.records import (
    _check_columns, _concat_columns, _iterate_file, _read_columns, _tf_record_fn)


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

    @tf_tracing.without_autograph
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
                given = vocab_file(vocab)
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
    has_file = hasattr(vocabulary, "sentencepiece_model_file") or hasattr(vocabulary, "path")  # not a test stub
    store.check_compatible(vocab=vocabulary if has_file else None, model_config=model_config)
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
