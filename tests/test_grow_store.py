"""Tests of the Grow store (ReST Sec. 3, Grow): round trip, atomic commit, resume, corruption, fingerprints."""

import dataclasses
import os

import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from rest_jax.data import grow_store as gs
from rest_jax.data.grow_store import records as gs_records
from rest_jax.data.grow_store import writer as gs_writer

N = 3  # samples per source
SOURCES = (7, 3, 11, 42, 5)  # not sorted, not contiguous: exercises the id mapping
PER_SHARD = 2  # -> 3 shards: (7, 3), (11, 42), (5,)


def make_records(source_ids, seed=0, with_logprobs=True):
    """Random records for sources: N samples and the reference each, unicode and empty texts included."""
    rng = np.random.default_rng(seed)
    words = ["ein", "Hund", "läuft", "über", "die", "Wiese", "😀", "a", "dog", "runs"]
    out = []
    for s in source_ids:
        src = " ".join(rng.choice(words, rng.integers(1, 6)))
        ref = " ".join(rng.choice(words, rng.integers(1, 6)))
        src_tok = rng.integers(0, 2**31 - 1, rng.integers(1, 8))
        for j in [gs.REFERENCE_SAMPLE_ID] + list(range(N)):
            length = int(rng.integers(0, 6))
            rec = {
                "source_id": s,
                "sample_id": j,
                "source_text": src,
                "candidate_text": ref if j < 0 else " ".join(rng.choice(words, length)),
                "reference_text": ref,
                "source_tokens": src_tok,
                "candidate_tokens": rng.integers(0, 32100, length),
                # float64 with bits below float32 precision: the store must return np.float32(reward).
                "reward": float(rng.random()) * (1 + 1e-12),
            }
            if with_logprobs:
                rec["behaviour_logprobs"] = -rng.random(length).astype(np.float32) * 5
            out.append(rec)
    rng.shuffle(out)  # Sampling order need not be sorted.
    return out


def write_store(directory, records_by_shard=None, **kwargs):
    writer = gs.GrowStoreWriter(directory, grow_index=2, source_ids=SOURCES, num_samples=N,
                                sources_per_shard=PER_SHARD, encode_batch_size=4, **kwargs)
    all_records = []
    for i in range(writer.num_shards):
        recs = (records_by_shard or {}).get(i) or make_records(writer.shard_source_ids(i), seed=i)
        writer.write_shard(i, recs)
        all_records += recs
    return writer, all_records


@pytest.fixture(scope="module")
def vocab_files(tmp_path_factory):
    """Two small, different SentencePiece models."""
    d = tmp_path_factory.mktemp("spm")
    text = ["ein Hund läuft über die Wiese", "a dog runs across the meadow", "zwei Männer spielen Fußball",
            "two men play football on a green field", "eine Frau liest ein Buch im Park"] * 20
    paths = []
    for size in (40, 45):
        prefix = str(d / f"sp{size}")
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=prefix, vocab_size=size,
                                       model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1,
                                       unk_id=2, bos_id=-1, hard_vocab_limit=False)
        paths.append(prefix + ".model")
    return paths


def by_key(columns):
    return {(int(s), int(j)): i for i, (s, j) in enumerate(zip(columns["source_id"], columns["sample_id"]))}


def assert_columns_equal_records(columns, records, grow_index=2):
    keys = by_key(columns)
    assert len(keys) == len(records) == len(columns["reward"])
    for rec in records:
        i = keys[(rec["source_id"], rec["sample_id"])]
        assert columns["source_text"][i] == rec["source_text"]
        assert columns["candidate_text"][i] == rec["candidate_text"]
        assert columns["reference_text"][i] == rec["reference_text"]
        np.testing.assert_array_equal(columns["source_tokens"][i], rec["source_tokens"])
        np.testing.assert_array_equal(columns["candidate_tokens"][i], rec["candidate_tokens"])
        assert columns["source_tokens"][i].dtype == np.int32
        assert columns["reward"][i] == np.float32(rec["reward"])  # float32-exact
        assert columns["is_reference"][i] == (rec["sample_id"] == -1)
        assert columns["grow_index"][i] == grow_index
        lps = rec.get("behaviour_logprobs", np.zeros(0, np.float32))
        np.testing.assert_array_equal(columns["behaviour_logprobs"][i], lps)
        if len(lps):
            assert columns["behaviour_logprob_sum"][i] == np.float32(np.sum(lps, dtype=np.float64))
        else:
            assert np.isnan(columns["behaviour_logprob_sum"][i])


def test_round_trip_values_match_input(tmp_path):
    writer, records = write_store(tmp_path)
    meta = writer.write_metadata(config={"temperature": 0.8}, checkpoint="/ckpt/5")
    store = gs.GrowStore(tmp_path)
    cols = store.as_numpy()
    assert_columns_equal_records(cols, records)
    # Shard i holds exactly the sources of chunk i of the ordered list.
    for i, path in enumerate(store.shard_paths):
        ids = gs_records._read_columns(path, ("source_id",))["source_id"]
        assert set(ids.tolist()) == set(SOURCES[i * PER_SHARD:(i + 1) * PER_SHARD])
    # Metadata: counts and reward statistics against float64 NumPy on the float32-rounded input.
    assert meta["counts"] == {"sources": 5, "records": 20, "samples": 15, "references": 5}
    r = np.array([np.float32(x["reward"]) for x in records], np.float64)
    ref = np.array([x["sample_id"] == -1 for x in records])
    for name, sel in (("all", slice(None)), ("samples", ~ref), ("references", ref)):
        st = store.reward_stats[name]
        assert st["count"] == len(r[sel])
        np.testing.assert_allclose([st["mean"], st["std"], st["min"], st["max"], st["quantiles"]["0.5"]],
                                   [r[sel].mean(), r[sel].std(), r[sel].min(), r[sel].max(),
                                    np.median(r[sel])], rtol=1e-12)
    assert store.metadata["checkpoint"] == "/ckpt/5" and store.metadata["config"] == {"temperature": 0.8}
    # Column subsets read only what a filter needs.
    sub = store.as_numpy(["reward", "source_id"])
    assert set(sub) == {"reward", "source_id"}
    np.testing.assert_array_equal(sub["reward"], cols["reward"])


def test_records_parse_with_protobuf_library(tmp_path):
    """The hand-written wire format must parse with the protobuf library too, not only with TF's parser."""
    _, records = write_store(tmp_path)
    shard0 = os.path.join(tmp_path, "shard-00000-of-00003.tfrecord")
    raw = next(iter(tf.data.TFRecordDataset(shard0))).numpy()
    ex = tf.train.Example.FromString(raw)
    f = ex.features.feature
    rec = next(r for r in records if r["source_id"] == f["source_id"].int64_list.value[0]
               and r["sample_id"] == f["sample_id"].int64_list.value[0])
    assert f["source_text"].bytes_list.value[0].decode() == rec["source_text"]
    assert list(f["candidate_tokens"].int64_list.value) == list(rec["candidate_tokens"])
    assert f["reward"].float_list.value[0] == np.float32(rec["reward"])
    assert list(f["behaviour_logprobs"].float_list.value) == rec["behaviour_logprobs"].tolist()
    assert sorted(f.keys()) == sorted(gs.FIELDS)
    # Re-serialising with protobuf and parsing gives the same record (negative varints included).
    assert tf.train.Example.FromString(ex.SerializeToString()) == ex


def test_column_batches_equal_record_dicts(tmp_path):
    recs = make_records(SOURCES[:2], seed=0)
    w = gs.GrowStoreWriter(tmp_path / "a", 1, SOURCES, N, sources_per_shard=PER_SHARD)
    w.write_shard(0, recs)
    batch = {k: [r[k] for r in recs] for k in recs[0]}
    w2 = gs.GrowStoreWriter(tmp_path / "b", 1, SOURCES, N, sources_per_shard=PER_SHARD)
    w2.write_shard(0, [{k: v[:5] for k, v in batch.items()}, {k: v[5:] for k, v in batch.items()}])
    assert open(w.shard_path(0), "rb").read() == open(w2.shard_path(0), "rb").read()


def test_crash_mid_shard_leaves_no_complete_shard_and_rerun_matches(tmp_path):
    recs = make_records(SOURCES[2:4], seed=1)

    def dying():
        for k, r in enumerate(recs):
            if k == 5:
                raise RuntimeError("preempted")
            yield r

    w = gs.GrowStoreWriter(tmp_path / "s", 2, SOURCES, N, sources_per_shard=PER_SHARD, encode_batch_size=2)
    with pytest.raises(RuntimeError, match="preempted"):
        w.write_shard(1, dying())
    assert not w.shard_is_complete(1)
    assert not os.path.exists(w.shard_path(1) + gs.TMP_SUFFIX)
    assert w.pending_shards() == [0, 1, 2]
    # A SIGKILL leaves a partial temp file: it is never taken as complete, and the rerun overwrites it.
    with open(w.shard_path(1) + gs.TMP_SUFFIX, "wb") as f:
        f.write(b"\x00garbage")
    w = gs.GrowStoreWriter(tmp_path / "s", 2, SOURCES, N, sources_per_shard=PER_SHARD)
    assert w.pending_shards() == [0, 1, 2]
    w.write_shard(1, recs)
    assert w.pending_shards() == [0, 2]
    clean = gs.GrowStoreWriter(tmp_path / "clean", 2, SOURCES, N, sources_per_shard=PER_SHARD)
    clean.write_shard(1, recs)
    assert open(w.shard_path(1), "rb").read() == open(clean.shard_path(1), "rb").read()
    assert not os.path.exists(w.shard_path(1) + gs.TMP_SUFFIX)
    assert_columns_equal_records(gs_records._read_columns(w.shard_path(1), tuple(gs.FIELDS)), recs)


def test_resume_pending_shards_and_incomplete_store(tmp_path):
    w = gs.GrowStoreWriter(tmp_path, 1, 10, N, sources_per_shard=2)  # 5 shards
    assert w.num_shards == 5
    assert w.pending_shards(0, 2) == [0, 2, 4] and w.pending_shards(1, 2) == [1, 3]
    for i in (0, 3):
        w.write_shard(i, make_records(w.shard_source_ids(i), seed=i))
    w = gs.GrowStoreWriter(tmp_path, 1, 10, N, sources_per_shard=2)  # resumed process
    assert w.pending_shards(0, 2) == [2, 4] and w.pending_shards(1, 2) == [1]
    with pytest.raises(gs.GrowIncompleteError, match="rerun the Grow command to resume"):
        w.write_metadata()
    with pytest.raises(gs.GrowIncompleteError, match="rerun the Grow command to resume"):
        gs.GrowStore(tmp_path)
    assert not gs.GrowStore.is_complete(tmp_path)
    for i in w.pending_shards():
        w.write_shard(i, make_records(w.shard_source_ids(i), seed=i))
    w.write_metadata()
    store = gs.GrowStore(tmp_path)
    cols = store.as_numpy(["source_id", "sample_id"])
    assert sorted(by_key(cols)) == sorted((s, j) for s in range(10) for j in range(-1, N))


def test_duplicate_missing_and_foreign_records_refused(tmp_path):
    w = gs.GrowStoreWriter(tmp_path, 1, SOURCES, N, sources_per_shard=PER_SHARD)
    recs = make_records(w.shard_source_ids(0))
    with pytest.raises(gs.GrowStoreCorruptError, match=r"duplicated 1 e\.g\. \[\(7, 1\)\]"):
        w.write_shard(0, recs + [r for r in recs if (r["source_id"], r["sample_id"]) == (7, 1)])
    missing = [r for r in recs if (r["source_id"], r["sample_id"]) != (3, -1)]
    with pytest.raises(gs.GrowStoreCorruptError, match=r"missing 1 e\.g\. \[\(3, -1\)\]"):
        w.write_shard(0, missing)
    with pytest.raises(gs.GrowStoreCorruptError, match=r"source_id\(s\) \[11\] do not belong to shard 0"):
        w.write_shard(0, recs + make_records([11]))
    with pytest.raises(gs.GrowStoreCorruptError, match=r"sample_id\(s\) \[3\] outside"):
        w.write_shard(0, recs + [dict(recs[0], sample_id=N)])
    assert w.pending_shards() == [0, 1, 2]
    # A duplicate that bypassed the writer (a shard file written by other means) is caught on read.
    batch = gs_writer._prepare_batch({k: [r[k] for r in recs + recs[:1]] for k in recs[0]}, len(recs) + 1, 1, "t")
    with tf.io.TFRecordWriter(w.shard_path(0)) as f:
        for x in gs.serialize_batch(batch):
            f.write(x)
    for i in (1, 2):
        w.write_shard(i, make_records(w.shard_source_ids(i)))
    with pytest.raises(gs.GrowStoreCorruptError, match="shard-00000-of-00003.tfrecord: every"):
        w.write_metadata()


def test_bad_records_name_the_record(tmp_path):
    w = gs.GrowStoreWriter(tmp_path, 1, SOURCES, N, sources_per_shard=PER_SHARD)
    recs = make_records(w.shard_source_ids(0))
    bad = [dict(r, reward=float("nan")) if (r["source_id"], r["sample_id"]) == (3, 2) else r for r in recs]
    with pytest.raises(gs.GrowRecordError, match=r"source_id=3, sample_id=2\) has a non-finite reward nan"):
        w.write_shard(0, bad)
    with pytest.raises(gs.GrowRecordError, match="is_reference inconsistent"):
        w.write_shard(0, [dict(recs[0], is_reference=int(recs[0]["sample_id"] != -1))])
    with pytest.raises(gs.GrowRecordError, match="Unknown record field"):
        w.write_shard(0, [dict(recs[0], rewrd=1.0)])
    with pytest.raises(gs.GrowRecordError, match="length other than candidate_tokens"):
        w.write_shard(0, [dict(recs[0], behaviour_logprobs=np.zeros(99))])
    with pytest.raises(gs.GrowRecordError, match="behaviour_logprob_sum"):
        r = next(r for r in recs if len(r["candidate_tokens"]))
        w.write_shard(0, [dict(r, behaviour_logprob_sum=1.0)])
    with pytest.raises(gs.GrowRecordError, match="grow_index 5"):
        w.write_shard(0, [dict(recs[0], grow_index=5)])
    assert w.pending_shards() == [0, 1, 2]
    assert not any(n.endswith(gs.TMP_SUFFIX) for n in os.listdir(tmp_path))


def test_truncated_and_corrupt_shards_give_clear_errors(tmp_path):
    writer, _ = write_store(tmp_path)
    writer.write_metadata()
    path = writer.shard_path(1)
    data = open(path, "rb").read()
    # Truncation: caught on open by the size recorded in metadata.json.
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(gs.GrowStoreCorruptError) as e:
        gs.GrowStore(tmp_path)
    assert path in str(e.value) and "delete it and rerun Grow to regenerate it" in str(e.value)
    # ... and by the reader itself (TF's DataLossError rethrown with the file name).
    with pytest.raises(gs.GrowStoreCorruptError) as e:
        gs_records._read_columns(path, ("reward",))
    assert path in str(e.value) and "shard is corrupt" in str(e.value)
    # A flipped byte (same size): CRC failure while reading, naming the file.
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(flipped))
    store = gs.GrowStore(tmp_path)
    with pytest.raises(gs.GrowStoreCorruptError) as e:
        store.as_numpy()
    assert path in str(e.value) and "delete it and rerun Grow to regenerate it" in str(e.value)
    with pytest.raises(gs.GrowStoreCorruptError, match="shard-00001-of-00003"):
        store.verify()
    # Following the advice: delete it, rerun Grow (write the shard and the metadata again).
    os.remove(path)
    assert writer.pending_shards() == [1]
    writer.write_shard(1, make_records(writer.shard_source_ids(1), seed=1))
    assert not os.path.exists(os.path.join(tmp_path, gs.METADATA_FILE))  # invalidated by the rewrite
    writer.write_metadata()
    gs.GrowStore(tmp_path).verify()


def test_missing_metadata_and_missing_store(tmp_path):
    writer, _ = write_store(tmp_path / "s")
    with pytest.raises(gs.GrowIncompleteError, match="Grow incomplete, rerun the Grow command to resume"):
        gs.GrowStore(tmp_path / "s")
    with pytest.raises(FileNotFoundError, match="No Grow store"):
        gs.GrowStore(tmp_path / "nothing")
    writer.write_metadata()
    os.remove(writer.shard_path(2))
    with pytest.raises(gs.GrowIncompleteError, match="shard-00002-of-00003.tfrecord is missing"):
        gs.GrowStore(tmp_path / "s")


def test_other_shard_count_is_refused(tmp_path):
    writer, _ = write_store(tmp_path)
    writer.write_metadata()
    # Resuming with another sources_per_shard would re-cut the sources: refused, naming what differs.
    with pytest.raises(gs.GrowStoreMismatchError, match="sources_per_shard: store has 2, now 3"):
        gs.GrowStoreWriter(tmp_path, 2, SOURCES, N, sources_per_shard=3)
    with pytest.raises(gs.GrowStoreMismatchError, match="num_samples: store has 3, now 4"):
        gs.GrowStoreWriter(tmp_path, 2, SOURCES, 4, sources_per_shard=PER_SHARD)
    # A shard file of another layout (e.g. copied in from another run) is refused on read and on resume.
    foreign = os.path.join(tmp_path, "shard-00000-of-00002.tfrecord")
    with open(writer.shard_path(0), "rb") as src, open(foreign, "wb") as dst:
        dst.write(src.read())
    with pytest.raises(gs.GrowStoreMismatchError, match="shard-00000-of-00002.tfrecord belongs to a store"):
        gs.GrowStore(tmp_path)
    os.remove(os.path.join(tmp_path, gs.LAYOUT_FILE))
    with pytest.raises(gs.GrowStoreMismatchError, match="different shard count"):
        gs.GrowStoreWriter(tmp_path, 2, SOURCES, N, sources_per_shard=PER_SHARD)


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab_size: int = 40
    num_heads: int = 2
    emb_dim: int = 8
    dropout_rate: float = 0.1
    dtype: str = "float32"
    mlp_activations: tuple = ("gelu", "linear")


def test_fingerprint_mismatch_errors(tmp_path, vocab_files):
    writer, _ = write_store(tmp_path)
    writer.write_metadata(vocab=vocab_files[0], model_config=TinyConfig())
    store = gs.GrowStore(tmp_path)
    store.check_compatible(vocab_files[0], TinyConfig())
    store.check_compatible(seqio.SentencePieceVocabulary(vocab_files[0]), TinyConfig(dropout_rate=0.0,
                                                                                     dtype="bfloat16"))
    with pytest.raises(gs.GrowStoreMismatchError) as e:
        store.check_compatible(vocab_files[1])
    msg = str(e.value)
    assert str(tmp_path) in msg and "vocabulary differs" in msg and vocab_files[0] in msg and vocab_files[1] in msg
    with pytest.raises(gs.GrowStoreMismatchError, match=r"num_heads: store 2, given 4") as e:
        store.check_compatible(model_config=TinyConfig(num_heads=4))
    assert str(tmp_path) in str(e.value)
    with pytest.raises(gs.GrowStoreMismatchError, match="mlp_activations"):
        store.check_compatible(model_config={**dataclasses.asdict(TinyConfig()), "mlp_activations": ("relu",)})
    assert gs.model_config_fingerprint(TinyConfig()) == gs.model_config_fingerprint(TinyConfig(dropout_rate=0.3))
    assert gs.model_config_fingerprint(TinyConfig()) != gs.model_config_fingerprint(TinyConfig(emb_dim=16))
    assert store.metadata["model_config"]["sha256"] == gs.model_config_fingerprint(TinyConfig())
    with pytest.raises(gs.GrowStoreMismatchError, match="vocabulary differs"):
        gs.register_seqio_task(store, seqio.SentencePieceVocabulary(vocab_files[1]))


def test_seqio_task_reads_every_record(tmp_path, vocab_files):
    writer, records = write_store(tmp_path)
    writer.write_metadata(vocab=vocab_files[0])
    vocab = seqio.SentencePieceVocabulary(vocab_files[0])
    task = gs.register_seqio_task(tmp_path, vocab, name="test_grow_store_task")
    assert seqio.TaskRegistry.get("test_grow_store_task") is task
    assert task.num_input_examples("train") == len(records)
    ds = task.get_dataset(sequence_length=None, split="train", shuffle=False)
    got = list(ds.as_numpy_iterator())
    assert len(got) == len(records)
    spec = ds.element_spec
    assert spec["inputs"].dtype == tf.int32 and spec["targets"].dtype == tf.int32
    assert spec["reward"].dtype == tf.float32 and spec["is_reference"].dtype == tf.bool
    keyed = {(r["source_id"], r["sample_id"]): r for r in records}
    assert len({(int(g["source_id"]), int(g["sample_id"])) for g in got}) == len(records)
    for g in got:
        rec = keyed[(int(g["source_id"]), int(g["sample_id"]))]
        np.testing.assert_array_equal(g["inputs"], rec["source_tokens"])
        np.testing.assert_array_equal(g["targets"], rec["candidate_tokens"])
        assert g["inputs_pretokenized"].decode() == rec["source_text"]
        assert g["targets_pretokenized"].decode() == rec["candidate_text"]
        assert g["reference_pretokenized"].decode() == rec["reference_text"]
        assert g["reward"] == np.float32(rec["reward"])
        np.testing.assert_array_equal(g["behaviour_logprobs"], rec["behaviour_logprobs"])
        assert g["is_reference"] == (rec["sample_id"] == -1) and g["grow_index"] == 2
    # Sharded across 3 hosts: each record read exactly once.
    seen = []
    for host in range(3):
        part = task.get_dataset(sequence_length=None, split="train", shuffle=False,
                                shard_info=seqio.ShardInfo(index=host, num_shards=3))
        seen += [(int(g["source_id"]), int(g["sample_id"])) for g in part.as_numpy_iterator()]
    assert sorted(seen) == sorted(keyed)
    # The plain tf.data view agrees.
    assert len(list(gs.GrowStore(tmp_path).as_tf_dataset(["reward"]).as_numpy_iterator())) == len(records)
    seqio.TaskRegistry.remove("test_grow_store_task")


def test_references_may_be_excluded_and_logprobs_omitted(tmp_path):
    w = gs.GrowStoreWriter(tmp_path, 1, [0, 1], N, sources_per_shard=4, include_references=False)
    recs = [r for r in make_records([0, 1], with_logprobs=False) if r["sample_id"] >= 0]
    w.write_shard(0, recs)
    meta = w.write_metadata()
    assert meta["counts"]["references"] == 0 and meta["reward_stats"]["references"] == {"count": 0}
    assert_columns_equal_records(gs.GrowStore(tmp_path).as_numpy(), recs, grow_index=1)
    w2 = gs.GrowStoreWriter(tmp_path / "x", 1, [0, 1], N, sources_per_shard=4, include_references=False)
    with pytest.raises(gs.GrowStoreCorruptError, match=r"sample_id\(s\) \[-1\] outside"):
        w2.write_shard(0, make_records([0, 1]))
