"""Grow store: the offline dataset written by a Grow step and read by Improve.

Modules: `schema` (fields, layout, errors), `records` (tf.train.Example in TFRecord files), `writer`
(`GrowStoreWriter`), `reader` (`GrowStore`, seqio tasks); their public names are re-exported here.

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

from rest_jax.data.grow_store.schema import (
    REFERENCE_SAMPLE_ID, METADATA_FILE, LAYOUT_FILE, FORMAT_NAME, FORMAT_VERSION, TMP_SUFFIX, REWARD_QUANTILES,
    DEFAULT_IGNORED_MODEL_FIELDS, FIELDS, TEXT_FIELDS, GrowStoreError, GrowIncompleteError, GrowStoreCorruptError,
    GrowStoreMismatchError, GrowRecordError, GrowStoreDiskFullError, model_config_dict, model_config_fingerprint,
    ShardLayout)
from rest_jax.data.grow_store.records import (
    serialize_batch)
from rest_jax.data.grow_store.writer import (
    GrowStoreWriter, reward_stats)
from rest_jax.data.grow_store.reader import (
    GrowStore, default_task_name, register_seqio_task)

__all__ = [
    "REFERENCE_SAMPLE_ID", "METADATA_FILE", "LAYOUT_FILE", "FORMAT_NAME", "FORMAT_VERSION", "TMP_SUFFIX",
    "REWARD_QUANTILES", "DEFAULT_IGNORED_MODEL_FIELDS", "FIELDS", "TEXT_FIELDS", "GrowStoreError",
    "GrowIncompleteError", "GrowStoreCorruptError", "GrowStoreMismatchError", "GrowRecordError",
    "GrowStoreDiskFullError", "model_config_dict", "model_config_fingerprint", "ShardLayout", "serialize_batch",
    "GrowStoreWriter", "reward_stats", "GrowStore", "default_task_name", "register_seqio_task",
]
