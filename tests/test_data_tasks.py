"""SeqIO tasks and the batch pipeline, checked against the files and a brute-force tokenizer."""

import os
import time

import gin
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from rest_jax.data import pipeline
from rest_jax.data import tasks
from rest_jax.data import text_files
from rest_jax.data import vocab

LENGTHS = {"inputs": 24, "targets": 24}


@pytest.fixture(scope="module")
def vocab_path(multi30k_dir, tmp_path_factory):
    lines = []
    for lang in ("de", "en"):
        with open(multi30k_dir / f"train.{lang}", encoding="utf-8") as f:
            lines += [next(f).rstrip("\n") for _ in range(4000)]
    return vocab.train_vocabulary(
        lines, str(tmp_path_factory.mktemp("vocab")), vocab_size=500, num_threads=1
    )


@pytest.fixture
def multi30k(multi30k_dir, vocab_path):
    gin.bind_parameter("multi30k_source.data_dir", str(multi30k_dir))
    gin.bind_parameter("get_task.vocabulary", vocab_path)
    yield multi30k_dir
    gin.clear_config()


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def _brute_force_row(sp, text, length):
    """Reference tokenization: SentencePiece ids, trimmed to length-1, then EOS, then 0s."""
    ids = sp.encode(text)[: length - 1] + [1]
    return np.array(ids + [0] * (length - len(ids)), np.int32)


def test_multi30k_sizes_first_pair_and_ids(multi30k, vocab_path):
    task = tasks.get_task("multi30k_de_en")
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    expected = {"train": (29000, "train"), "validation": (1014, "val"), "test_2016": (1000, "test_2016_flickr")}
    assert set(task.splits) == set(expected)
    for split, (size, stem) in expected.items():
        examples = list(task.get_dataset(split=split, shuffle=False).as_numpy_iterator())
        assert len(examples) == size
        first = examples[0]
        de = _lines(multi30k / f"{stem}.de")
        en = _lines(multi30k / f"{stem}.en")
        assert first["inputs_pretokenized"].decode() == de[0]
        assert first["targets_pretokenized"].decode() == en[0]
        assert first["inputs"].tolist() == sp.encode(de[0]) + [1]
        assert first["targets"].tolist() == sp.encode(en[0]) + [1]
        assert [int(ex["source_id"]) for ex in examples] == list(range(size))
        last = examples[-1]
        assert last["targets_pretokenized"].decode() == en[-1]
    assert tasks.get_task("multi30k_de_en") is not task  # Re-registered under the same name.
    assert tasks.get_task("multi30k_de_en").name == "multi30k_de_en"


def test_multi30k_reverse_direction(multi30k):
    ex = next(tasks.get_task("multi30k_en_de").get_dataset(split="validation", shuffle=False).as_numpy_iterator())
    assert ex["inputs_pretokenized"].decode() == _lines(multi30k / "val.en")[0]
    assert ex["targets_pretokenized"].decode() == _lines(multi30k / "val.de")[0]


def test_unknown_task_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"Unknown task 'multi30k_de_fr'.*Did you mean 'multi30k_de_en'"):
        tasks.get_task("multi30k_de_fr", vocabulary="unused")
    with pytest.raises(ValueError, match="Known tasks: .*demo_synthetic"):
        tasks.get_source("no_such_task_at_all")


def test_missing_data_dir_and_vocabulary_say_which_knob(vocab_path):
    with pytest.raises(tasks.DataNotPreparedError, match="multi30k_source.data_dir"):
        tasks.get_task("multi30k_de_en", vocabulary=vocab_path)
    with pytest.raises(ValueError, match="get_task.vocabulary"):
        tasks.get_task("wmt14_de_en")


@pytest.mark.parametrize(
    "name, tfds_name",
    [("wmt14_de_en", "wmt14_translate/de-en"), ("wmt19_zh_en", "wmt19_translate/zh-en"),
     ("wmt_t2t_en_de", "wmt_t2t_translate/de-en")],
)
def test_tfds_offline_error_is_fast_and_says_how_to_prepare(tmp_path, vocab_path, name, tfds_name):
    gin.bind_parameter("tfds_translation_source.data_dir", str(tmp_path))
    try:
        start = time.time()
        task = tasks.get_task(name, vocabulary=vocab_path)
        with pytest.raises(tasks.DataNotPreparedError) as e:
            task.get_dataset(split="validation", shuffle=False)
        assert time.time() - start < 5
        assert f"tfds build {tfds_name} --data_dir={tmp_path}" in str(e.value)
        assert "download_and_prepare" in str(e.value)
    finally:
        gin.clear_config()


def _write_fake_tfds(data_dir, sizes):
    """A prepared `wmt14_translate/de-en` folder, written without any download."""
    import tensorflow_datasets as tfds

    features = tfds.features.Translation(languages=["de", "en"])
    folder = os.path.join(data_dir, "wmt14_translate", "de-en", "1.0.0")
    os.makedirs(folder)
    pairs = {}
    for split, (n, shards) in sizes.items():
        pairs[split] = [(f"Satz {split} {i}", f"Sentence {split} {i}") for i in range(n)]
        for k in range(shards):
            name = f"wmt14_translate-{split}.tfrecord-{k:05d}-of-{shards:05d}"
            with tf.io.TFRecordWriter(os.path.join(folder, name)) as w:
                for de, en in pairs[split][k * n // shards:(k + 1) * n // shards]:
                    w.write(features.serialize_example({"de": de, "en": en}))
    tfds.folder_dataset.write_metadata(
        data_dir=folder, features=features, split_infos=None,
        filename_template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
    )
    return pairs


def test_tfds_task_reads_prepared_data_with_stable_source_ids(tmp_path, vocab_path):
    pairs = _write_fake_tfds(str(tmp_path), {"train": (40, 3), "validation": (9, 1), "test": (5, 1)})
    gin.bind_parameter("tfds_translation_source.data_dir", str(tmp_path))
    try:
        task = tasks.get_task("wmt14_en_de", vocabulary=vocab_path)
        val = list(task.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
        assert [(e["inputs_pretokenized"].decode(), e["targets_pretokenized"].decode()) for e in val] == [
            (en, de) for de, en in pairs["validation"]
        ]
        # Shuffled files and two host shards: every pair once, ids = position in the split.
        seen = {}
        for index in range(2):
            ds = task.get_dataset(split="train", shuffle=True, seed=1,
                                  shard_info=tasks.seqio.ShardInfo(index, 2))
            for e in ds.as_numpy_iterator():
                seen[int(e["source_id"])] = e["targets_pretokenized"].decode()
        assert seen == {i: de for i, (de, _) in enumerate(pairs["train"])}
    finally:
        gin.clear_config()


def test_iwslt_not_prepared_says_to_run_the_script(tmp_path, vocab_path):
    gin.bind_parameter("iwslt14_source.data_dir", str(tmp_path))
    try:
        task = tasks.get_task("iwslt14_de_en", vocabulary=vocab_path)
        with pytest.raises(tasks.DataNotPreparedError, match=r"prepare_iwslt14.py.*train\.de|train\.de.*prepare_iwslt14.py"):
            task.get_dataset(split="train")
    finally:
        gin.clear_config()


def test_parallel_text_task_reports_bad_file_line(tmp_path, vocab_path):
    (tmp_path / "a.tsv").write_text("Haus\thouse\nBaum tree\n")
    gin.bind_parameter("parallel_text_source.files", {"train": str(tmp_path / "a.tsv")})
    try:
        task = tasks.get_task("parallel_text", vocabulary=vocab_path)
        with pytest.raises(text_files.ParallelDataError, match=r"a.tsv:2: expected exactly one tab"):
            task.get_dataset(split="train")
    finally:
        gin.clear_config()


def test_count_overlong_matches_brute_force(multi30k, vocab_path):
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    de, en = _lines(multi30k / "val.de"), _lines(multi30k / "val.en")
    lengths = {"inputs": 20, "targets": 18}
    counts = tasks.count_overlong("multi30k_de_en", "validation", lengths)
    len_in = np.array([len(sp.encode(s)) + 1 for s in de])  # +1: EOS.
    len_tg = np.array([len(sp.encode(s)) + 1 for s in en])
    assert counts == {
        "examples": 1014,
        "inputs": int((len_in > 20).sum()),
        "targets": int((len_tg > 18).sum()),
        "any": int(((len_in > 20) | (len_tg > 18)).sum()),
        "max_inputs": int(len_in.max()),
        "max_targets": int(len_tg.max()),
    }
    assert 0 < counts["any"] < 1014  # The limits do cut something here.


def test_batches_match_brute_force_features(multi30k, vocab_path):
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    de, en = _lines(multi30k / "val.de"), _lines(multi30k / "val.en")
    batch = next(pipeline.get_batches(
        "multi30k_de_en", "validation", batch_size=16, feature_lengths=LENGTHS, shuffle=False,
        shard_index=0, num_shards=1,
    ))
    assert set(batch) == {"encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                          "decoder_loss_weights"}
    for i in range(16):
        target = _brute_force_row(sp, en[i], 24)
        np.testing.assert_array_equal(batch["encoder_input_tokens"][i], _brute_force_row(sp, de[i], 24))
        np.testing.assert_array_equal(batch["decoder_target_tokens"][i], target)
        np.testing.assert_array_equal(batch["decoder_input_tokens"][i], np.concatenate([[0], target[:-1]]))
        np.testing.assert_array_equal(batch["decoder_loss_weights"][i], (target != 0).astype(np.float32))
    assert batch["encoder_input_tokens"].dtype == np.int32
    assert batch["decoder_loss_weights"].dtype == np.float32


@pytest.mark.parametrize("pack", [False, True])
def test_resumed_iterator_equals_skipped_uninterrupted_one(multi30k, pack):
    # Unpacked: validation (1,014 pairs) is 16 batches an epoch, so 20 batches cross epochs.
    lengths = {"inputs": 64, "targets": 64} if pack else LENGTHS
    kwargs = dict(batch_size=64 if not pack else 16, feature_lengths=lengths, seed=7, pack=pack,
                  shard_index=0, num_shards=1)
    full = pipeline.get_batches("multi30k_de_en", "validation", **kwargs)
    reference = [next(full) for _ in range(20)]
    resumed = pipeline.get_batches("multi30k_de_en", "validation", start_step=13, **kwargs)
    for want in reference[13:]:
        got = next(resumed)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    other_seed = next(pipeline.get_batches("multi30k_de_en", "validation", **{**kwargs, "seed": 8}))
    assert not np.array_equal(other_seed["encoder_input_tokens"], reference[0]["encoder_input_tokens"])
    if pack:
        assert reference[0]["encoder_segment_ids"].max() > 1  # Rows do hold several examples.


def test_hosts_rows_assemble_the_one_host_batches(multi30k):
    """Multi-process BC (issue 12): host i's rows of every global batch, stacked, are the one-host batch,
    whatever the number of hosts, also when resuming (so P=2 trains on exactly what P=1 trains on)."""
    kwargs = dict(batch_size=48, feature_lengths=LENGTHS, seed=5)
    one = pipeline.get_batches("multi30k_de_en", "validation", shard_index=0, num_shards=1, **kwargs)
    reference = [next(one) for _ in range(25)]  # 21 batches an epoch: crosses into the second epoch
    for hosts, start in ((2, 0), (3, 0), (2, 17)):
        streams = [pipeline.get_batches("multi30k_de_en", "validation", shard_index=i, num_shards=hosts,
                                        start_step=start, **kwargs) for i in range(hosts)]
        for want in reference[start:]:
            parts = [next(s) for s in streams]
            assert all(len(p["encoder_input_tokens"]) == 48 // hosts for p in parts)
            for k in want:
                np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), want[k])


def test_pipelines_skip_autograph_and_give_the_batches_autograph_gives(multi30k, monkeypatch):
    """Pipelines build without AutoGraph's source rewrite (`tf_tracing`: ~3 s off each command's start), except
    seqio's packer, which needs it, and yield exactly what the same pipelines traced through AutoGraph
    (TensorFlow's default) yield."""
    from tensorflow.python.autograph.impl import api as autograph_api  # pylint: disable=import-outside-toplevel

    from rest_jax.data import tf_tracing  # pylint: disable=import-outside-toplevel

    converted = []
    real = autograph_api.converted_call
    monkeypatch.setattr(autograph_api, "converted_call",
                        lambda f, *a, **k: converted.append(getattr(f, "__name__", f)) or real(f, *a, **k))
    kwargs = dict(feature_lengths=LENGTHS, shard_index=0, num_shards=1)

    def build(pack):
        if pack:
            return [next(pipeline.get_batches("multi30k_de_en", "validation", batch_size=16, seed=3, pack=True,
                                              **kwargs))]
        return [next(pipeline.get_batches("multi30k_de_en", "validation", batch_size=16, seed=3, **kwargs)),
                next(pipeline.get_eval_batches("multi30k_de_en", "test_2016", batch_size=16, **kwargs)),
                tasks.count_overlong("multi30k_de_en", "validation", LENGTHS)]

    got = build(pack=False)
    assert not converted, converted
    got += build(pack=True)
    assert converted  # AutoGraph on for the packer (it loops over a tensor); the count above sees conversions
    monkeypatch.setattr(tf_tracing, "ag_ctx", None)  # the reference: TensorFlow's default, AutoGraph on
    want = build(pack=False) + build(pack=True)
    assert got[2] == want[2]
    for g, w in zip(got[:2] + got[3:], want[:2] + want[3:]):
        assert set(g) == set(w)
        for k in w:
            np.testing.assert_array_equal(g[k], w[k])


def test_a_preprocessor_that_needs_autograph_gets_it(multi30k, monkeypatch):
    """A user's seqio preprocessor with Python control flow over a tensor fails without AutoGraph, so the
    pipeline is built again with it: the batches are those of TensorFlow's default (AutoGraph on)."""
    import seqio  # pylint: disable=import-outside-toplevel

    from rest_jax.data import tf_tracing  # pylint: disable=import-outside-toplevel

    def short_targets(ds):
        def fn(ex):
            targets = ex["targets"]
            if tf.size(targets) > 5:  # a Python `if` on a tensor: a graph op only through AutoGraph
                targets = targets[:5]
            return {**ex, "targets": targets}
        return ds.map(fn)

    base = tasks.get_task("multi30k_de_en")
    task = seqio.Task("multi30k_short_targets", source=base.source, output_features=base.output_features,
                      preprocessors=[*base.preprocessors, short_targets])
    kwargs = dict(split="validation", batch_size=16, feature_lengths=LENGTHS, shuffle=False, shard_index=0,
                  num_shards=1)
    with tf_tracing.autograph(False), pytest.raises(tf.errors.OperatorNotAllowedInGraphError):
        pipeline.get_batches.__wrapped__(task, **kwargs)
    got = next(pipeline.get_batches(task, **kwargs))
    monkeypatch.setattr(tf_tracing, "ag_ctx", None)  # the reference: TensorFlow's default, AutoGraph on
    want = next(pipeline.get_batches(task, **kwargs))
    assert (got["decoder_target_tokens"] != 0).sum(axis=1).max() == 5
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


def test_source_shuffle_is_a_new_permutation_each_epoch(multi30k):
    source = tasks.get_source("multi30k_de_en")
    ds = source.get_dataset("validation", shuffle=True, seed=3).repeat(2)
    ids = np.array([int(e["source_id"]) for e in ds.as_numpy_iterator()])
    first, second = ids[:1014], ids[1014:]
    assert sorted(first) == list(range(1014)) and sorted(second) == list(range(1014))
    assert not np.array_equal(first, second)
    assert not np.array_equal(first, np.arange(1014))


def test_eval_batches_cover_each_example_once_across_hosts(multi30k):
    de = _lines(multi30k / "val.de")
    en = _lines(multi30k / "val.en")
    per_host = []
    for index in range(3):
        per_host.append(list(pipeline.get_eval_batches(
            "multi30k_de_en", "validation", batch_size=300, feature_lengths=LENGTHS,
            shard_index=index, num_shards=3,
        )))
    assert [len(b) for b in per_host] == [4, 4, 4]  # ceil(338 / 100) batches on every host.
    seen = []
    for batches in per_host:
        for b in batches:
            assert b["encoder_input_tokens"].shape == (100, 24)
            assert b["mask"].dtype == bool
            for i in np.flatnonzero(b["mask"]):
                sid = int(b["source_id"][i])
                assert b["inputs_pretokenized"][i] == de[sid]
                assert b["targets_pretokenized"][i] == en[sid]
                seen.append(sid)
            pad = ~b["mask"]
            assert (b["source_id"][pad] == -1).all() and (b["encoder_input_tokens"][pad] == 0).all()
            assert (b["decoder_loss_weights"][pad] == 0).all()
    assert sorted(seen) == list(range(1014))


def test_demo_task_reads_generated_folder(tmp_path, vocab_path):
    gin.bind_parameter("demo_source.data_dir", str(tmp_path / "demo"))
    gin.bind_parameter("ensure_corpus.train_size", 50)
    gin.bind_parameter("ensure_corpus.validation_size", 7)
    gin.bind_parameter("ensure_corpus.test_size", 5)
    try:
        task = tasks.get_task("demo_synthetic", vocabulary=vocab_path)
        sizes = {s: len(list(task.get_dataset(split=s, shuffle=False).as_numpy_iterator()))
                 for s in ("train", "validation", "test")}
        assert sizes == {"train": 50, "validation": 7, "test": 5}
        first = next(task.get_dataset(split="test", shuffle=False).as_numpy_iterator())
        assert first["inputs_pretokenized"].decode() == _lines(tmp_path / "demo" / "test.src")[0]
    finally:
        gin.clear_config()


def _load_prepare_script():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "prepare_iwslt14.py"
    spec = importlib.util.spec_from_file_location("prepare_iwslt14", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_iwslt_archive(path):
    """A miniature de-en.tgz with the real archive's member names and markup."""
    import io
    import tarfile

    de = ["<url>http://www.ted.com/talks/x</url>", "<talkid>1</talkid>", "<keywords>k</keywords>",
          "<title>Ein Titel</title>"]
    en = ["<url>http://www.ted.com/talks/x</url>", "<talkid>1</talkid>", "<keywords>k</keywords>",
          "<title>A Title</title>"]
    for i in range(60):
        de.append(f"Das ist Satz Nummer {i}.")
        en.append(f"This is sentence number {i}.")
    de.append("Kurz.")  # Ratio 2 / 7 tokens: removed by the 1.5 ratio filter.
    en.append("This one is far too long.")
    de.append(" ".join(["wort"] * 180))  # Over 175 tokens: removed.
    en.append(" ".join(["word"] * 180))
    members = {"de-en/train.tags.de-en.de": "\n".join(de) + "\n",
               "de-en/train.tags.de-en.en": "\n".join(en) + "\n"}
    names = ["IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010",
             "IWSLT14.TED.tst2011", "IWSLT14.TED.tst2012"]
    for k, name in enumerate(names):
        for lang, word in (("de", "Test"), ("en", "Test’s")):
            members[f"de-en/{name}.de-en.{lang}.xml"] = (
                "<mteval>\n<doc docid=\"1\">\n"
                f"<seg id=\"1\"> {word} {k} A </seg>\n<seg id=\"2\">{word} {k} B</seg>\n</doc>\n"
            )
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_prepare_iwslt14_follows_fairseq_recipe_and_feeds_the_task(tmp_path, vocab_path):
    prep = _load_prepare_script()
    archive = str(tmp_path / "de-en.tgz")
    _fake_iwslt_archive(archive)
    out = tmp_path / "iwslt14"
    assert prep.main([f"--output={out}", f"--archive={archive}"]) == 0
    kept = [(f"das ist satz nummer {i}.", f"this is sentence number {i}.") for i in range(60)]
    kept.insert(0, ("ein titel", "a title"))  # Title tags are stripped, the text kept.
    valid = [p for i, p in enumerate(kept, start=1) if i % 23 == 0]
    train = [p for i, p in enumerate(kept, start=1) if i % 23 != 0]
    assert _lines(out / "valid.de") == [d for d, _ in valid]
    assert _lines(out / "train.en") == [e for _, e in train]
    assert _lines(out / "test.en")[:4] == ["test's 0 a", "test's 0 b", "test's 1 a", "test's 1 b"]
    assert len(_lines(out / "test.de")) == 10
    gin.bind_parameter("iwslt14_source.data_dir", str(out))
    try:
        task = tasks.get_task("iwslt14_de_en", vocabulary=vocab_path)
        ex = list(task.get_dataset(split="validation", shuffle=False).as_numpy_iterator())
        assert [(e["inputs_pretokenized"].decode(), e["targets_pretokenized"].decode()) for e in ex] == valid
    finally:
        gin.clear_config()
    # A wrong checksum is refused.
    assert prep.main([f"--output={out}", f"--archive={archive}", "--sha256=" + "0" * 64]) == 2


def test_prepare_iwslt14_offline_fails_fast_with_instructions(tmp_path, capsys):
    prep = _load_prepare_script()
    start = time.time()
    rc = prep.main([f"--output={tmp_path}", "--url=http://127.0.0.1:9/de-en.tgz", "--timeout=3"])
    assert rc == 2 and time.time() - start < 10
    err = capsys.readouterr().err
    assert "Could not download" in err and "--archive=" in err
    assert str(tmp_path / "orig" / "de-en.tgz") in err
    assert not (tmp_path / "orig" / "de-en.tgz.part").exists()


@pytest.mark.parametrize("name", ["multi30k_de_en", "iwslt14_de_en", "wmt14_de_en", "wmt19_zh_en",
                                  "parallel_text", "demo_synthetic"])
def test_task_gin_files_bind_existing_knobs(name, multi30k_dir, tmp_path):
    import pathlib

    config = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tasks" / f"{name}.gin"
    bindings = {
        "multi30k_de_en": [f"MULTI30K_DIR = '{multi30k_dir}'"],
        "iwslt14_de_en": [f"IWSLT14_DIR = '{tmp_path}'"],
        "wmt14_de_en": [f"TFDS_DATA_DIR = '{tmp_path}'"],
        "wmt19_zh_en": [f"TFDS_DATA_DIR = '{tmp_path}'"],
        "parallel_text": [f"TRAIN_FILES = '{tmp_path}/t.tsv'", f"VALIDATION_FILES = '{tmp_path}/v.tsv'"],
        "demo_synthetic": [f"DEMO_DIR = '{tmp_path}/demo'"],
    }[name]
    try:
        gin.parse_config_files_and_bindings([str(config)], bindings)
        task_name = gin.query_parameter("%TASK")
        assert task_name == name
        source = tasks.get_source(task_name)
        assert "train" in source.splits and "validation" in source.splits
        if name == "multi30k_de_en":
            assert source.num_input_examples("validation") == 1014
        if name == "parallel_text":
            assert source._split_files["validation"] == f"{tmp_path}/v.tsv"
        elif name.startswith("wmt"):
            assert source._data_dir == str(tmp_path)
        else:
            folder = str(multi30k_dir) if name == "multi30k_de_en" else str(tmp_path)
            assert all(p.startswith(folder) for pair in source._split_files.values() for p in pair)
    finally:
        gin.clear_config()


def test_a_slice_of_a_split_is_that_part_of_its_lines_for_training_and_for_grow(multi30k, vocab_path):
    # Issue 13's held-out Grow: BC on train[:14500], Grow on train[14500:] (sources BC never saw).
    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    de, en = _lines(multi30k / "train.de"), _lines(multi30k / "train.en")
    source = tasks.get_source("multi30k_de_en")
    assert source.pairs("train[:14500]") == (de[:14500], en[:14500])
    assert source.pairs("train[14500:]") == (de[14500:], en[14500:])
    assert tasks.read_split("multi30k_de_en", "train[28990:]") == (de[28990:], en[28990:])
    batch = next(pipeline.get_batches("multi30k_de_en", "train[14500:14516]", batch_size=16,
                                      feature_lengths=LENGTHS, shuffle=False, shard_index=0, num_shards=1))
    expected = [_brute_force_row(sp, s, LENGTHS["inputs"]) for s in de[14500:14516]]
    np.testing.assert_array_equal(batch["encoder_input_tokens"], np.array(expected))
    with pytest.raises(ValueError, match="Unknown split 'tran\\[:10\\]'"):
        source.pairs("tran[:10]")


@pytest.mark.parametrize("kind", ["text files", "seqio source"])
def test_read_split_reads_a_split_its_slices_and_its_first_rows_in_order(tmp_path, kind):
    # Two ways in: text files (their source holds the pairs) and any other seqio source (read in batches,
    # here 3 rows at a time against 10 rows, so the last batch is partial).
    pairs = [(f"quelle {i} é", f"source {i}") for i in range(10)]
    name = "parallel_text"
    if kind == "text files":
        (tmp_path / "valid.tsv").write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
        gin.bind_parameter("parallel_text_source.files", {"validation": str(tmp_path / "valid.tsv")})
    else:
        name = "test_read_split_function_source"

        def dataset(split, shuffle_files, seed=None):
            del split, shuffle_files, seed
            return tf.data.Dataset.from_tensor_slices(
                {"inputs": [a for a, _ in pairs], "targets": [b for _, b in pairs]})

        source = seqio.FunctionDataSource(dataset, splits=["validation"])
        seqio.TaskRegistry.add(name, source=source, output_features={})
    src, tgt = [a for a, _ in pairs], [b for _, b in pairs]
    try:
        assert tasks.read_split(name, "validation") == (src, tgt)
        assert tasks.read_split(name, "validation[:4]") == (src[:4], tgt[:4])
        assert tasks.read_split(name, "validation[4:]", 2) == (src[4:6], tgt[4:6])
        assert tasks.read_split(name, "validation[-3:]") == (src[-3:], tgt[-3:])
        assert tasks.read_split(name, "validation", 7) == (src[:7], tgt[:7])
        assert list(tasks.iterate_pairs(name, "validation", batch_size=3)) == pairs
    finally:
        gin.clear_config()
        if name in seqio.TaskRegistry.names():
            seqio.TaskRegistry.remove(name)
