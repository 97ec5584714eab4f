"""Deterministic, resumable batches of T5X features for training and evaluation.

Behaviour cloning and every Improve step of ReST (Gulcehre et al. 2023, arXiv
2308.08998, Sec. 2 and Algorithm 1) are ordinary supervised training on a
dataset; a killed run must resume with the same data order. `get_batches` is a
pure function of (task, split, seed, shard): the iterator built with
`start_step=k` yields exactly what an uninterrupted iterator yields from its
k-th batch on, so the training loop needs no saved iterator state.

Features follow the T5X names (int32 [batch, length], 0-padded):
encoder_input_tokens, decoder_input_tokens, decoder_target_tokens and
decoder_loss_weights (float32), plus encoder/decoder_segment_ids and
encoder/decoder_positions when packing.
"""

from __future__ import annotations

import math
from typing import Iterator, Mapping, Optional, Union

import numpy as np
import seqio
import tensorflow as tf

from rest_jax.data import tasks
from rest_jax.data import tf_tracing

Batch = dict[str, np.ndarray]
_TEXT_FEATURES = ("inputs_pretokenized", "targets_pretokenized")


def _shard(shard_index: Optional[int], num_shards: Optional[int]) -> seqio.ShardInfo:
    if shard_index is None or num_shards is None:
        import jax  # Only needed for the multi-host default.

        shard_index = jax.process_index() if shard_index is None else shard_index
        num_shards = jax.process_count() if num_shards is None else num_shards
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} is not in [0, {num_shards}).")
    return seqio.ShardInfo(index=shard_index, num_shards=num_shards)


def _host_batch_size(batch_size: int, shard: seqio.ShardInfo) -> int:
    if batch_size % shard.num_shards:
        raise ValueError(
            f"Global batch size {batch_size} is not divisible by the {shard.num_shards} "
            "data shards (hosts)."
        )
    return batch_size // shard.num_shards


def _check_lengths(feature_lengths: Mapping[str, int] | None) -> dict[str, int]:
    if feature_lengths is None or set(feature_lengths) != {"inputs", "targets"}:
        raise ValueError(
            f"feature_lengths needs exactly 'inputs' and 'targets'; got {feature_lengths}."
        )
    return {k: int(v) for k, v in feature_lengths.items()}


def _to_numpy(batch: Mapping[str, np.ndarray]) -> Batch:
    out = dict(batch)
    out["decoder_loss_weights"] = out["decoder_loss_weights"].astype(np.float32)
    return out


@tf_tracing.without_autograph
def get_batches(
    task: Union[str, seqio.Task],
    split: str = "train",
    batch_size: int = 64,
    feature_lengths: Mapping[str, int] | None = None,
    shuffle: bool = True,
    seed: int = 0,
    start_step: int = 0,
    repeat: bool = True,
    pack: bool = False,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
) -> Iterator[Batch]:
    """Training batches: dicts of numpy arrays with the T5X feature names.

    Args:
      task: a seqio.Task or a task name (built with `tasks.get_task`).
      split: split to read.
      batch_size: global batch size; each of `num_shards` hosts gets
        `batch_size // num_shards` rows: host i the i-th block of rows of every
        global batch. Every host reads the same global stream (same seed, same
        order) and keeps its rows, so the global batches, and the training run,
        are the same for any number of hosts, and resuming skips the same
        global batches everywhere. The price is that each host tokenizes the
        whole stream, which is small beside the model's work for translation data.
      feature_lengths: {"inputs": L_in, "targets": L_tgt}; longer sequences are
        trimmed so that they still end in EOS (`tasks.count_overlong` counts them).
      shuffle: shuffle the examples, a new permutation each epoch.
      seed: shuffle seed; the same seed gives the same order.
      start_step: number of batches to skip, to resume a killed run on the
        same data order. The skipped batches are still read and tokenized (no
        feature conversion or numpy copies), so resuming late in a long run
        takes a while.
      repeat: cycle over the split forever; otherwise one pass, dropping the
        last partial batch so that every batch has the same shape.
      pack: pack several examples per row (adds segment ids and positions).
      shard_index, num_shards: this host's block of rows; default
        jax.process_index() / jax.process_count() (pass
        `partitioning.data_shard_info` when a mesh axis spans hosts).

    Returns:
      An iterator of batches.
    """
    lengths = _check_lengths(feature_lengths)
    task = tasks.as_task(task)
    shard = _shard(shard_index, num_shards)
    host_batch = _host_batch_size(batch_size, shard)
    ds = task.get_dataset(
        sequence_length=lengths,
        split=split,
        shuffle=shuffle,
        seed=seed,
        shard_info=None,  # the global stream on every host; rows are split per batch below
        num_epochs=None if repeat else 1,
        # seqio would cache a small split after the shuffle, freezing one order.
        try_in_mem_cache=False,
    )
    # Only the token features: the packer warns about (and drops) the others anyway.
    ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]})
    with tf_tracing.autograph(pack):  # seqio's packer loops over a tensor in Python
        ds = seqio.EncDecFeatureConverter(pack=pack)(ds, lengths)
    ds = ds.batch(batch_size, drop_remainder=True)
    if start_step:
        ds = ds.skip(start_step)
    if shard.num_shards > 1:
        first = shard.index * host_batch
        ds = ds.map(lambda b: {k: v[first:first + host_batch] for k, v in b.items()})
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options).prefetch(2)
    return map(_to_numpy, ds.as_numpy_iterator())


class _EvalConverter(seqio.EncDecFeatureConverter):
    """EncDecFeatureConverter that also passes raw text and source_id through.

    seqio's pass-through trims and pads every feature along axis 0, so the
    scalars travel as length-1 vectors and are squeezed again after batching.
    """

    def __init__(self):
        spec = seqio.FeatureConverter.FeatureSpec
        super().__init__(
            pack=False,
            passthrough_features={
                "inputs_pretokenized": spec(dtype=tf.string),
                "targets_pretokenized": spec(dtype=tf.string),
                "source_id": spec(dtype=tf.int64),
            },
        )


def _expand(ex: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    out = dict(ex)
    for k in (*_TEXT_FEATURES, "source_id"):
        out[k] = tf.reshape(ex[k], [1])
    return out


def _empty_batch(lengths: Mapping[str, int]) -> Batch:
    lin, ltg = lengths["inputs"], lengths["targets"]
    return {
        "encoder_input_tokens": np.zeros((0, lin), np.int32),
        "decoder_target_tokens": np.zeros((0, ltg), np.int32),
        "decoder_input_tokens": np.zeros((0, ltg), np.int32),
        "decoder_loss_weights": np.zeros((0, ltg), np.float32),
        "inputs_pretokenized": np.zeros((0,), object),
        "targets_pretokenized": np.zeros((0,), object),
        "source_id": np.zeros((0,), np.int64),
    }


def _pad_batch(batch: Batch, rows: int) -> Batch:
    """Pads a partial batch to `rows` rows; `mask` is False on the padding."""
    n = len(batch["source_id"])
    out = {}
    for k, v in batch.items():
        fill = "" if k in _TEXT_FEATURES else (-1 if k == "source_id" else 0)
        pad = np.full((rows - n, *v.shape[1:]), fill, dtype=v.dtype)
        out[k] = np.concatenate([v, pad])
    out["mask"] = np.arange(rows) < n
    return out


@tf_tracing.without_autograph
def get_eval_batches(
    task: Union[str, seqio.Task],
    split: str = "validation",
    batch_size: int = 64,
    feature_lengths: Mapping[str, int] | None = None,
    shard_index: Optional[int] = None,
    num_shards: Optional[int] = None,
) -> Iterator[Batch]:
    """Evaluation batches in split order: one pass, no shuffle, nothing dropped.

    Each batch holds the T5X features plus `inputs_pretokenized` and
    `targets_pretokenized` (numpy arrays of str), `source_id` (int64, -1 on
    padding) and `mask` (bool, False on padding rows). The last batch is padded
    to the full size, and every host yields the same number of batches (extra
    ones all padding) so SPMD programs stay in step.
    """
    lengths = _check_lengths(feature_lengths)
    task = tasks.as_task(task)
    shard = _shard(shard_index, num_shards)
    host_batch = _host_batch_size(batch_size, shard)
    ds = task.get_dataset(
        sequence_length=lengths, split=split, shuffle=False, shard_info=shard, num_epochs=1
    )
    ds = ds.map(_expand)
    pass_lengths = {**lengths, "inputs_pretokenized": 1, "targets_pretokenized": 1, "source_id": 1}
    ds = _EvalConverter()(ds, pass_lengths).batch(host_batch)
    try:
        total = task.num_input_examples(split)
    except Exception:  # pylint: disable=broad-except
        total = None
    num_batches = None
    if total is not None:
        num_batches = math.ceil(math.ceil(total / shard.num_shards) / host_batch)

    def generate() -> Iterator[Batch]:
        produced = 0
        for raw in ds.as_numpy_iterator():
            batch = {k: (v[:, 0] if k in (*_TEXT_FEATURES, "source_id") else v) for k, v in raw.items()}
            for k in _TEXT_FEATURES:
                batch[k] = np.array([s.decode("utf-8") for s in batch[k]], dtype=object)
            produced += 1
            yield _pad_batch(_to_numpy(batch), host_batch)
        for _ in range((num_batches or 0) - produced):
            yield _pad_batch(_empty_batch(lengths), host_batch)

    return generate()
