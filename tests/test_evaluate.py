"""Evaluation: corpus metrics against sacreBLEU, tokenisation limits, best-of-N selection by hand."""

import numpy as np
import pytest
import sacrebleu

from rest_jax import evaluate
from rest_jax import policy as policy_lib
from rest_jax import rewards


class _CharVocab:
    """A stand-in vocabulary: one id per character (ids from 3), enough to test trimming and EOS."""

    def encode(self, text):
        return [ord(c) - 94 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 94) for i in ids)


def test_corpus_scores_equal_sacrebleu():
    hyps = ["the cat sat on the mat", "a dog runs", "hello world"]
    refs = ["the cat sat on a mat", "the dog runs fast", "hello there world"]
    got = evaluate.corpus_scores(hyps, refs)
    assert abs(got["bleu"] - sacrebleu.corpus_bleu(hyps, [refs]).score) < 1e-9
    assert abs(got["chrf"] - sacrebleu.corpus_chrf(hyps, [refs]).score) < 1e-9
    assert got["bleu_signature"].startswith("nrefs:1|case:mixed")
    assert "chrF" in got["chrf_signature"] or "nc:6" in got["chrf_signature"]


def test_heldout_guard_measures_with_sacrebleu_and_counts_a_drop_in_the_metrics_direction():
    hyps = ["the cat sat on the mat", "a dog runs", "hello world"]
    refs = ["the cat sat on a mat", "the dog runs fast", "hello there world"]
    for metric, want in (("bleu", sacrebleu.corpus_bleu(hyps, [refs]).score),
                         ("chrf", sacrebleu.corpus_chrf(hyps, [refs]).score),
                         ("ter", sacrebleu.corpus_ter(hyps, [refs]).score)):
        assert abs(evaluate.HeldoutGuard(metric).measure(hyps, refs) - want) < 1e-9
    bleu, ter = evaluate.HeldoutGuard("bleu", max_drop=1.0), evaluate.HeldoutGuard("ter", max_drop=1.0)
    assert bleu.allows(39.0, start=40.0) and not bleu.allows(38.9, start=40.0) and bleu.allows(45.0, start=40.0)
    # TER is an error rate: higher is worse.
    assert ter.allows(41.0, start=40.0) and not ter.allows(41.1, start=40.0) and ter.allows(30.0, start=40.0)
    with pytest.raises(ValueError, match="HeldoutGuard.metric='meteor'"):
        evaluate.HeldoutGuard("meteor")
    with pytest.raises(ValueError, match="HeldoutGuard.max_drop=-1"):
        evaluate.HeldoutGuard("bleu", max_drop=-1)


def test_tokenize_trims_keeping_eos_and_detokenize_stops_at_eos():
    vocab = _CharVocab()
    ids, trimmed = policy_lib.tokenize(vocab, ["abc", "abcdefgh"], max_length=5)
    assert trimmed == 1
    assert ids[0] == [3, 4, 5, 1]
    assert ids[1] == [3, 4, 5, 6, 1]
    assert policy_lib.detokenize(vocab, [3, 4, 1, 5, 0, 0]) == "ab"
    assert policy_lib.detokenize(vocab, [3, 4, 5]) == "abc"


def test_best_of_n_picks_reward_argmax_among_first_n():
    sources = ["s0", "s1"]
    references = ["good answer", "fine reply"]
    candidates = [["bad", "good answ", "good answer", "xx"], ["fine", "zzz", "fine rep", "fine reply"]]

    class FakePolicy:  # samples fixed candidates: the reranking alone is under test
        def generate(self, srcs, *, method, num_samples, **kwargs):
            assert method == "sample" and num_samples == 4 and list(srcs) == sources
            return policy_lib.Generations([list(c) for c in candidates], [], [])

    reward = rewards.get("chrf")
    table = evaluate.best_of_n(FakePolicy(), sources, references, reward, ns=(1, 2, 4))
    for row in table:
        n = row["n"]
        expected = []
        for cands, ref in zip(candidates, references):
            scores = [sacrebleu.sentence_chrf(c, [ref]).score / 100 for c in cands[:n]]
            expected.append(max(scores))
        assert abs(row["reward"] - float(np.mean(expected))) < 1e-6
    assert table[-1]["reward"] == 1.0  # both exact references are among the 4
    assert [r["n"] for r in table] == [1, 2, 4]


def test_policy_with_a_vocabulary_larger_than_the_model_is_refused():
    """Ids past the embedding table would give NaN embeddings and NaN log-probs deep inside Grow."""
    import pytest

    from rest_jax.model import t5

    class Sized(_CharVocab):
        vocab_size = 600
        sentencepiece_model_file = "/runs/x/vocab/sentencepiece.model"

    model = t5.Transformer(t5.T5Config(vocab_size=512))
    with pytest.raises(ValueError, match=r"vocabulary /runs/x/vocab/sentencepiece.model has 600 ids but the model "
                                         r"has vocab_size=512"):
        policy_lib.Policy(model, None, Sized())
    Sized.vocab_size = 512
    assert policy_lib.Policy(model, None, Sized()).vocab.vocab_size == 512
