"""Filters: hand-computed masks, strictness, the τ_1 warning, sources-without-data report, brute force."""

import logging

import gin
import numpy as np
import pytest

from rest_jax import filters

# Two sources: 0 has rewards 0.2, 0.5, 0.8, 0.5; source 1 has 0.7, 0.9; source 2 has 0.1.
REWARDS = np.array([0.2, 0.5, 0.8, 0.7, 0.5, 0.9, 0.1])
IDS = np.array([0, 0, 0, 1, 0, 1, 2])


def test_global_threshold_is_strict():
    np.testing.assert_array_equal(filters.global_threshold_mask(REWARDS, 0.5),
                                  [False, False, True, True, False, True, False])
    # Exactly τ is dropped: 1[R > τ].
    assert not filters.global_threshold_mask(np.array([0.7]), 0.7)[0]
    assert filters.global_threshold_mask(np.array([0.7000001]), 0.7)[0]


def test_threshold_zero_is_keep_all():
    assert filters.global_threshold_mask(np.array([0.0, 0.3]), 0.0).all()


def test_threshold_schedule_defaults_and_errors():
    assert [filters.threshold_for_step(i) for i in range(6)] == [0.0, 0.7, 0.8, 0.9, 0.95, 0.99]
    with pytest.raises(ValueError, match="step 6 has no entry"):
        filters.threshold_for_step(6)
    with pytest.raises(ValueError, match="must not decrease"):
        filters.threshold_for_step(1, schedule=(0.0, 0.8, 0.7))


def test_threshold_schedule_is_gin_configurable():
    with gin.unlock_config():
        gin.parse_config("threshold_for_step.schedule = (0.0, 0.5, 0.6)")
    try:
        assert filters.threshold_for_step(1) == 0.5
    finally:
        gin.clear_config()


def test_percentile_mask_hand_computed():
    # Source 0 sorted: 0.2, 0.5, 0.5, 0.8; p50 = 0.5 -> keep 0.5, 0.8, 0.5. Source 1: 0.7, 0.9; p50 = 0.8
    # -> keep 0.9. Source 2 alone: keeps its one.
    np.testing.assert_array_equal(filters.percentile_mask(REWARDS, IDS, 50.0),
                                  [False, True, True, False, True, True, True])
    # p = 75 for source 0: pos 2.25 -> 0.5 + 0.25 * 0.3 = 0.575 -> only 0.8.
    np.testing.assert_array_equal(filters.percentile_mask(REWARDS, IDS, 75.0)[[0, 1, 2, 4]],
                                  [False, False, True, False])
    assert filters.percentile_mask(REWARDS, IDS, 0.0).all()


def test_gamma_mask_hand_computed():
    # Source 0: mean 0.5, max 0.8. γ=0 -> τ=0.5 keeps 0.5, 0.8, 0.5; γ=0.5 -> τ=0.65 keeps 0.8.
    # Source 1: mean 0.8, max 0.9. γ=0 keeps 0.9; γ=0.5 -> 0.85 keeps 0.9. Source 2 keeps its only one.
    np.testing.assert_array_equal(filters.gamma_mask(REWARDS, IDS, 0.0),
                                  [False, True, True, False, True, True, True])
    np.testing.assert_array_equal(filters.gamma_mask(REWARDS, IDS, 0.5),
                                  [False, False, True, False, False, True, True])
    # γ = 1 keeps each source's best, including a source whose rewards all tie (τ = max = mean).
    ties = np.array([0.3, 0.3, 0.3, 0.1, 0.9])
    np.testing.assert_array_equal(filters.gamma_mask(ties, np.array([5, 5, 5, 6, 6]), 1.0),
                                  [True, True, True, False, True])


def test_top_k_mask_hand_computed_with_stable_ties():
    # Source 0 by reward: 0.8 (i=2), 0.5 (i=1), 0.5 (i=4), 0.2; k=2 keeps i=2 and the earlier 0.5 (i=1).
    np.testing.assert_array_equal(filters.top_k_mask(REWARDS, IDS, 2),
                                  [False, True, True, True, False, True, True])
    np.testing.assert_array_equal(filters.top_k_mask(REWARDS, IDS, 1),
                                  [False, False, True, False, False, True, True])


def test_per_source_masks_match_brute_force_on_random_data():
    rng = np.random.default_rng(0)
    m = 400
    rewards = np.round(rng.random(m), 2)  # Rounded: many ties.
    ids = rng.integers(0, 37, m) * 3
    eligible = rng.random(m) > 0.2
    for p in (0.0, 10.0, 50.0, 90.0, 100.0):
        want = np.zeros(m, bool)
        for s in np.unique(ids[eligible]):
            sel = eligible & (ids == s)
            want |= sel & (rewards >= np.percentile(rewards[sel], p))
        np.testing.assert_array_equal(filters.percentile_mask(rewards, ids, p, eligible), want, err_msg=f"p={p}")
    for g in (0.0, 0.3, 1.0):
        want = np.zeros(m, bool)
        for s in np.unique(ids[eligible]):
            sel = eligible & (ids == s)
            r = rewards[sel]
            want |= sel & (rewards >= min(g * r.max() + (1 - g) * r.mean(), r.max()) - 1e-12)
        np.testing.assert_array_equal(filters.gamma_mask(rewards, ids, g, eligible), want, err_msg=f"g={g}")
    for k in (1, 3):
        want = np.zeros(m, bool)
        for s in np.unique(ids[eligible]):
            members = [i for i in range(m) if eligible[i] and ids[i] == s]
            members.sort(key=lambda i: (-rewards[i], i))
            want[members[:k]] = True
        np.testing.assert_array_equal(filters.top_k_mask(rewards, ids, k, eligible), want, err_msg=f"k={k}")


def test_validity_mask_hand_computed():
    sources = ["Ein Hund läuft.", "Ein Hund läuft.", "Ein Hund läuft.", "Ein Hund läuft.", "Ein Hund läuft.",
               "Ja.", "Ein Hund läuft."]
    candidates = ["A dog runs.", "  ", "A", "Ein Hund läuft.", "A dog runs.", "Yes.", "A dog is running."]
    references = ["A dog runs."] * 5 + ["Yes."] + ["A dog runs."]
    ids = np.array([0, 0, 0, 0, 0, 1, 0])
    # "A" is 1/11 of its reference's length (< 0.25); duplicates are kept by default.
    mask, dropped = filters.validity_mask(sources, candidates, references, ids)
    np.testing.assert_array_equal(mask, [True, False, False, False, True, True, True])
    assert dropped == {"empty": 1, "length_ratio": 1, "copy": 1, "duplicate": 0}
    mask, dropped = filters.validity_mask(sources, candidates, references, ids, drop_duplicates=True)
    np.testing.assert_array_equal(mask, [True, False, False, False, False, True, True])
    assert dropped == {"empty": 1, "length_ratio": 1, "copy": 1, "duplicate": 1}
    # Each check can be switched off.
    mask, dropped = filters.validity_mask(sources, candidates, references, ids, drop_copies=False,
                                          min_length_ratio=None)
    np.testing.assert_array_equal(mask, [True, False, True, True, True, True, True])
    # A long hallucinated repetition fails the upper ratio.
    mask, _ = filters.validity_mask(["kurz."], ["short " * 20], ["short."], np.array([0]))
    assert not mask[0]


def test_validity_length_window_holds_for_any_language_pair():
    # zh→en: an English translation is ~2-4× its Chinese source in characters, so a source-relative window
    # [0.25, 4] dropped good translations (here 28/7 = 4.0 and 33/7); against the reference they are 1-3×.
    src, ref = "我真的很爱你。", "I really love you."
    good = ["I really love you very much.", "I truly love you very, very much."]
    mask, _ = filters.validity_mask([src] * 2, good, [ref] * 2, np.array([0, 0]))
    assert mask.all()
    # en→zh: a Chinese translation is ~1/4 of its English source; against the Chinese reference it is ~1.
    mask, _ = filters.validity_mask(["I really love you very much."], ["我真的很爱你。"], ["我很爱你。"], np.array([0]))
    assert mask.all()


def test_validity_filters_never_drop_references():
    # A reference may be empty, short, a copy of its source (names, numbers) or repeated in a pooled store.
    sources = ["Berlin.", "Berlin.", "Berlin.", "Hallo Welt"]
    candidates = ["Berlin.", "Berlin.", "Berlin.", ""]
    references = ["Berlin.", "Berlin.", "Berlin.", ""]
    is_ref = np.array([True, True, False, True])
    ids = np.array([0, 0, 0, 1])
    mask, dropped = filters.validity_mask(sources, candidates, references, ids, is_ref, drop_duplicates=True)
    np.testing.assert_array_equal(mask, [True, True, False, True])  # the sample copies its source
    assert dropped == {"empty": 0, "length_ratio": 0, "copy": 1, "duplicate": 0}
    result = filters.apply_filters(np.array([1.0, 1.0, 0.9, 0.2]), ids, step=0, sources=sources,
                                   candidates=candidates, references=references, is_reference=is_ref)
    np.testing.assert_array_equal(result.mask, [True, True, False, True])


def test_warning_when_first_threshold_not_above_mean(caplog):
    rewards = np.array([0.25, 0.5, 0.75, 0.5])  # Mean exactly 0.5.
    with caplog.at_level(logging.WARNING):
        assert not filters.check_first_threshold(0.4, float(np.mean(rewards)))
    assert "tau_1=0.4" in caplog.text and "mean Grow reward 0.5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert not filters.check_first_threshold(0.5, float(np.mean(rewards)))  # Equal is not above.
        assert filters.check_first_threshold(0.6, float(np.mean(rewards)))
    assert len(caplog.records) == 1
    caplog.clear()
    high = np.array([0.75, 1.0, 0.75, 1.0])  # Mean 0.875 > default τ_1 = 0.7.
    with caplog.at_level(logging.WARNING):
        filters.apply_filters(high, np.arange(4), step=1, validity=False)
    assert "not above the mean" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        filters.apply_filters(high, np.arange(4), step=2, validity=False)  # Only τ_1 is checked.
        filters.apply_filters(rewards, np.arange(4), step=1, validity=False)  # 0.7 > 0.5: fine.
    assert "not above the mean" not in caplog.text


def test_apply_filters_reports_kept_fraction_and_sources_without_data():
    result = filters.apply_filters(REWARDS, IDS, step=1, validity=False)  # τ_1 = 0.7, strict.
    np.testing.assert_array_equal(result.mask, [False, False, True, False, False, True, False])
    assert result.num_kept == 2 and result.kept_fraction == pytest.approx(2 / 7)
    assert result.num_sources == 3
    np.testing.assert_array_equal(result.sources_without_data, [2])
    assert result.num_sources_without_data == 1
    assert result.dropped == {"reward": 5}
    assert result.summary()["num_sources_without_data"] == 1

    # Step 0 keeps everything, including a reward of exactly 0.
    result = filters.apply_filters(np.array([0.0, 0.4]), np.array([0, 1]), step=0, validity=False)
    assert result.mask.all() and result.num_sources_without_data == 0


def test_apply_filters_composes_validity_method_and_cap():
    sources = ["Ein Hund läuft."] * 5 + ["Eine Katze."] * 2
    candidates = ["A dog runs.", "A dog runs.", "", "A dog is running.", "The dog runs.", "A cat.", "Cats."]
    references = ["A dog runs."] * 5 + ["A cat."] * 2
    rewards = np.array([0.9, 0.9, 0.0, 0.6, 0.8, 0.4, 0.3])
    ids = np.array([0, 0, 0, 0, 0, 1, 1])
    texts = {"sources": sources, "candidates": candidates, "references": references}
    result = filters.apply_filters(rewards, ids, step=0, method="top_k", value=2, **texts)
    # Valid: all but the empty 2 (repeats are kept). Top-2: source 0 -> 0, 1 (tie at 0.9); source 1 -> 5, 6.
    np.testing.assert_array_equal(result.mask, [True, True, False, False, False, True, True])
    assert result.dropped == {"empty": 1, "length_ratio": 0, "copy": 0, "duplicate": 0, "reward": 2}
    result = filters.apply_filters(rewards, ids, step=1, method="gamma", max_per_source=1, **texts)
    # γ_1 = 0: source 0 valid rewards 0.9, 0.9, 0.6, 0.8 (mean 0.8) keep 0, 1, 4; cap 1 keeps 0 (earlier tie).
    np.testing.assert_array_equal(result.mask, [True, False, False, False, False, True, False])
    assert result.dropped["max_per_source"] == 2


def test_apply_filters_bad_input_errors():
    with pytest.raises(ValueError, match="unknown filter method 'best'"):
        filters.apply_filters(REWARDS, IDS, step=1, method="best", validity=False)
    with pytest.raises(ValueError, match="need `sources`, `candidates` and `references`"):
        filters.apply_filters(REWARDS, IDS, step=1)
    with pytest.raises(ValueError, match=r"rewards\[1\] = nan"):
        filters.apply_filters(np.array([0.1, np.nan]), np.array([0, 1]), step=1, validity=False)
    with pytest.raises(ValueError, match="source_ids shape"):
        filters.apply_filters(REWARDS, IDS[:3], step=1, validity=False)
