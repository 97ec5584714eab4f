"""Rewards: sacreBLEU parity, [0, 1] maps, registry errors, de-duplication, bad-score errors."""

import numpy as np
import pytest
import sacrebleu

from rest_jax import rewards
from rest_jax.rewards import base

SOURCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch."]
CANDIDATES = ["A man rides a bike.", "Two dogs play in snow.", "A woman is reading a book."]
REFERENCES = ["A man is riding a bicycle.", "Two dogs are playing in the snow.", "A woman reads a book."]


def test_chrf_matches_sacrebleu_sentence_chrf():
    got = rewards.get("chrf").score(SOURCES, CANDIDATES, REFERENCES)
    want = [sacrebleu.sentence_chrf(c, [r]).score / 100 for c, r in zip(CANDIDATES, REFERENCES)]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert 0.0 < got.min() and got.max() < 1.0


def test_bleu_and_ter_match_sacrebleu_sentence_api():
    bleu = rewards.get("bleu").score(SOURCES, CANDIDATES, REFERENCES)
    ter = rewards.get("ter").score(SOURCES, CANDIDATES, REFERENCES)
    want_bleu = [sacrebleu.sentence_bleu(c, [r]).score / 100 for c, r in zip(CANDIDATES, REFERENCES)]
    want_ter = [max(0.0, 1 - sacrebleu.sentence_ter(c, [r]).score / 100) for c, r in zip(CANDIDATES, REFERENCES)]
    np.testing.assert_allclose(bleu, want_bleu, rtol=1e-6)
    np.testing.assert_allclose(ter, want_ter, rtol=1e-6)


@pytest.mark.parametrize("name", ["chrf", "bleu", "ter"])
def test_perfect_match_is_one_and_empty_candidate_is_zero(name):
    reward = rewards.get(name)
    got = reward.score(SOURCES[:2], [REFERENCES[0], ""], REFERENCES[:2])
    assert got[0] == 1.0  # BLEU's raw 100.00000000000004 must not leave [0, 1].
    assert got[1] == 0.0


def test_ter_is_clipped_at_zero_when_ter_exceeds_100():
    cand = "one two three four five six seven"
    assert sacrebleu.sentence_ter(cand, ["one"]).score > 100
    assert rewards.get("ter").score(["x"], [cand], ["one"])[0] == 0.0


def test_chrf_plus_plus_knob_changes_score():
    plain = rewards.get("chrf").score(SOURCES, CANDIDATES, REFERENCES)
    plus = rewards.get("chrf", word_order=2).score(SOURCES, CANDIDATES, REFERENCES)
    want = [sacrebleu.sentence_chrf(c, [r], word_order=2).score / 100 for c, r in zip(CANDIDATES, REFERENCES)]
    np.testing.assert_allclose(plus, want, rtol=1e-6)
    assert not np.allclose(plain, plus)


def test_unknown_name_lists_close_matches_and_known_names():
    with pytest.raises(KeyError, match=r"chrff.*Did you mean \['chrf'\].*Known rewards.*bleu.*ter"):
        rewards.get("chrff")


def test_declared_model_reward_without_module_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(base._LAZY_MODULES, "nonexistent_rm", "rest_jax.rewards.nonexistent_rm")
    with pytest.raises(KeyError, match="nonexistent_rm.*not installed"):
        rewards.get("nonexistent_rm")


def test_reference_based_reward_needs_references():
    with pytest.raises(ValueError, match="'chrf' is reference-based"):
        rewards.score_pairs(rewards.get("chrf"), SOURCES, CANDIDATES, None)
    with pytest.raises(ValueError, match="3 sources but 2 candidates"):
        rewards.get("chrf").score(SOURCES, CANDIDATES[:2], REFERENCES[:2])


class _CountingReward(base.Reward):
    """Test double: records every triple it is asked to score."""

    name = "counting"
    needs_reference = True

    def __init__(self, values=None):
        self.calls = []
        self.values = values or {}

    def _score(self, sources, candidates, references):
        self.calls.append(list(zip(sources, candidates, references)))
        return np.array([self.values.get(c, len(c) / 100) for c in candidates])


def test_register_and_get_a_new_reward():
    rewards.register("counting_test")(_CountingReward)
    assert isinstance(rewards.get("counting_test"), _CountingReward)
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("counting_test")(lambda: None)


def test_score_pairs_scores_each_distinct_triple_once_in_batches():
    src = ["s1", "s1", "s1", "s2", "s2", "s1"]
    cand = ["a", "b", "a", "a", "a", "b"]
    ref = ["r1", "r1", "r1", "r2", "r2", "r1"]
    reward = _CountingReward()
    got = rewards.score_pairs(reward, src, cand, ref, batch_size=2)
    seen = [t for call in reward.calls for t in call]
    assert sorted(seen) == sorted({("s1", "a", "r1"), ("s1", "b", "r1"), ("s2", "a", "r2")})
    assert [len(c) for c in reward.calls] == [2, 1]
    np.testing.assert_allclose(got, [0.01] * 6)
    assert got.dtype == np.float32


def test_score_pairs_agrees_with_direct_scoring():
    chrf = rewards.get("chrf")
    src, cand, ref = SOURCES * 3, CANDIDATES * 3, REFERENCES * 3
    np.testing.assert_allclose(rewards.score_pairs(chrf, src, cand, ref, batch_size=2),
                               [sacrebleu.sentence_chrf(c, [r]).score / 100 for c, r in zip(cand, ref)], rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -0.1])
def test_bad_score_raises_naming_reward_and_example(bad):
    reward = _CountingReward(values={"broken output": bad})
    cand = ["fine", "ok", "broken output"]
    with pytest.raises(rewards.RewardError, match=r"'counting'.*example 2.*broken output"):
        rewards.score_pairs(reward, ["x", "y", "z"], cand, ["r", "r", "r"], batch_size=2)


def test_wrong_shape_is_an_error():
    class Short(_CountingReward):
        def _score(self, sources, candidates, references):
            return np.zeros(len(candidates) - 1)

    with pytest.raises(rewards.RewardError, match="shape"):
        rewards.score_pairs(Short(), ["x", "y"], ["a", "b"], ["r", "r"])


def test_process_pool_matches_in_process(monkeypatch):
    monkeypatch.setattr("rest_jax.rewards.sacrebleu_rewards._MIN_PARALLEL", 1)
    reward = rewards.get("chrf", num_workers=2)
    try:
        got = reward.score(SOURCES * 2, CANDIDATES * 2, REFERENCES * 2)
        assert reward._pool is not None  # The pool really ran.
    finally:
        reward.close()
    np.testing.assert_allclose(got, rewards.get("chrf").score(SOURCES * 2, CANDIDATES * 2, REFERENCES * 2))


def test_model_rewards_load_after_the_command_line_locks_gin(tmp_path):
    """`rest_jax ...` finalizes gin before the entry runs; a reward module imported on first `get` must still
    register its configurables. A fresh process, so that no other test has imported them yet. Scoring with a
    learned reward does not pull in reward-model training (`rest_jax.reward_model`, the trainer)."""
    import subprocess
    import sys

    script = (
        "import sys, gin\n"
        "from rest_jax import rewards\n"
        "gin.finalize()\n"
        "for name in ('learned', 'metricx'):\n"
        "    assert f'rest_jax.rewards.{name}' not in sys.modules\n"
        "    try:\n"
        "        rewards.get(name)\n"
        "    except (FileNotFoundError, ValueError, TypeError) as e:  # imported; no model given\n"
        "        print(name, 'needs a model:', type(e).__name__)\n"
        "assert 'rest_jax.reward_model' not in sys.modules and 'rest_jax.trainer' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learned needs a model" in proc.stdout and "metricx needs a model" in proc.stdout
