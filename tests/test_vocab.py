"""SentencePiece vocabularies: T5 ids, round trip, loading checks, the command, reuse."""

import os
import unicodedata

import gin
import numpy as np
import pytest
import sentencepiece as spm
import tensorflow as tf

from rest_jax.data import task_vocab
from rest_jax.data import vocab

VOCAB_SIZE = 400


@pytest.fixture(scope="module")
def multi30k_vocab(multi30k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab")
    lines = []
    for lang in ("de", "en"):
        with open(multi30k_dir / f"train.{lang}", encoding="utf-8") as f:
            lines += [next(f).rstrip("\n") for _ in range(3000)]
    path = vocab.train_vocabulary(lines, str(out), vocab_size=VOCAB_SIZE, num_threads=1)
    return path


def _val_sentences(multi30k_dir, lang):
    with open(multi30k_dir / f"val.{lang}", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f][:200]


def test_t5_ids_and_size(multi30k_vocab):
    v = vocab.load_vocabulary(multi30k_vocab)
    assert v.vocab_size == VOCAB_SIZE
    assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
    sp = spm.SentencePieceProcessor(model_file=multi30k_vocab)
    assert sp.bos_id() == -1  # No BOS, like T5.
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    # Nothing half-written is left behind; the listing and metadata are there.
    folder = os.path.dirname(multi30k_vocab)
    assert sorted(os.listdir(folder)) == ["sentencepiece.json", "sentencepiece.model", "sentencepiece.vocab"]


@pytest.mark.parametrize("lang", ["de", "en"])
def test_round_trip_matches_nfkc_normalised_text(multi30k_vocab, multi30k_dir, lang):
    v = vocab.load_vocabulary(multi30k_vocab)
    for s in _val_sentences(multi30k_dir, lang):
        ids = v.encode(s)
        assert 0 not in ids and 1 not in ids  # No pad or EOS inside the text.
        # Reference: SentencePiece's nmt_nfkc = NFKC plus whitespace collapsing.
        assert v.decode(ids) == " ".join(unicodedata.normalize("NFKC", s).split())


def test_tf_and_python_tokenizers_agree(multi30k_vocab, multi30k_dir):
    v = vocab.load_vocabulary(multi30k_vocab)
    sents = _val_sentences(multi30k_dir, "de")[:50]
    for s in sents:
        assert v.encode_tf(tf.constant(s)).numpy().tolist() == v.encode(s)
    # The independent SentencePiece processor gives the same ids.
    sp = spm.SentencePieceProcessor(model_file=multi30k_vocab)
    assert [sp.encode(s) for s in sents] == [v.encode(s) for s in sents]


def test_unknown_character_maps_to_unk(multi30k_vocab):
    v = vocab.load_vocabulary(multi30k_vocab)
    assert 2 in v.encode("Ein Hund 犬")


def test_directory_path_is_accepted(multi30k_vocab):
    v = vocab.load_vocabulary(os.path.dirname(multi30k_vocab))
    assert v.encode("Ein Hund.") == vocab.load_vocabulary(multi30k_vocab).encode("Ein Hund.")


def test_missing_model_error_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m rest_jax.data.task_vocab"):
        vocab.load_vocabulary(str(tmp_path / "none.model"))


def test_model_with_other_ids_is_rejected(tmp_path):
    prefix = str(tmp_path / "plain")
    text = ["ein kleiner hund", "a small dog", "zwei katzen", "two cats"] * 20
    # SentencePiece's own defaults: unk=0, bos=1, eos=2.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=prefix, vocab_size=25, minloglevel=2
    )
    with pytest.raises(ValueError, match=r"\(pad, eos, unk\) are \(-1, 2, 0\)"):
        vocab.load_vocabulary(prefix + ".model")


def test_training_is_deterministic_for_a_seed(tmp_path):
    rng = np.random.default_rng(0)
    syllables = ["ka", "to", "mi", "re", "su", "ban", "lo", "pe", "dri", "gu", "fen", "wa"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(300)]
    text = [" ".join(rng.choice(words, size=6)) for _ in range(2000)]
    kwargs = dict(vocab_size=60, max_sentences=300, num_threads=1)
    a = vocab.train_vocabulary(text, str(tmp_path / "a"), seed=3, **kwargs)
    b = vocab.train_vocabulary(text, str(tmp_path / "b"), seed=3, **kwargs)
    c = vocab.train_vocabulary(text, str(tmp_path / "c"), seed=4, **kwargs)
    assert open(a, "rb").read() == open(b, "rb").read()
    # Another seed samples other sentences (a check that the sample is used at all).
    assert open(a, "rb").read() != open(c, "rb").read()


def test_command_trains_on_a_task_and_ensure_reuses(tmp_path):
    src, tgt = tmp_path / "train.de", tmp_path / "train.en"
    src.write_text("".join(f"das ist satz nummer {i} im haus\n" for i in range(200)))
    tgt.write_text("".join(f"this is sentence number {i} in the house\n" for i in range(200)))
    out = tmp_path / "run" / "vocab"
    binding = f"parallel_text_source.files = {{'train': ('{src}', '{tgt}')}}"
    try:
        path = task_vocab.main(
            ["--task=parallel_text", f"--output={out}", "--vocab_size=50", f"--gin={binding}"]
        )
        v = vocab.load_vocabulary(path)
        assert v.vocab_size == 50
        # Joint vocabulary: both languages' words are covered without unk.
        assert 2 not in v.encode("das haus") and 2 not in v.encode("the house")
        mtime = os.path.getmtime(path)
        assert task_vocab.ensure_vocabulary("parallel_text", str(out)) == path
        assert os.path.getmtime(path) == mtime
    finally:
        gin.clear_config()
