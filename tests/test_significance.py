"""Paired bootstrap and intervals over seeds (rest_jax.significance) against brute force and hand values.

References: sacreBLEU's own corpus scores recomputed on every resampled test set (the bootstrap computes them
from summed sufficient statistics), hand-computed differences, and Student's t quantile from a table.
"""

import math

import numpy as np
import pytest
import sacrebleu

from rest_jax import significance

REFS = ["a dog runs in the park", "two men play chess", "a woman reads a book", "children swim in a lake",
        "the cat sleeps on a chair", "a man rides a red bike", "people walk down a busy street",
        "a girl jumps into the water", "an old man sells fruit", "a band plays on a stage"] * 2
BASE = ["a dog runs in a park", "two man plays chess", "woman read book", "kids swim in the lake",
        "a cat sleeps on the chair", "a man rides a bike", "people walk on a street", "girl jumps in water",
        "old man sells fruits", "band plays on stage"] * 2
BETTER = ["a dog runs in the park", "two men play chess", "a woman reads book", "children swim in a lake",
          "the cat sleeps on a chair", "a man rides a red bike", "people walk down a street",
          "a girl jumps into water", "an old man sells fruit", "a band plays on stage"] * 2


@pytest.mark.parametrize("metric", ["bleu", "chrf", "ter"])
def test_bootstrap_equals_rescoring_every_resample(metric):
    num_samples, seed = 30, 7
    base, score = significance.sentence_statistics(metric, BASE, REFS)
    system, _ = significance.sentence_statistics(metric, BETTER, REFS)
    got = significance.paired_bootstrap(base, system, score, metric, num_samples=num_samples, seed=seed)
    corpus = lambda hyps, idx: getattr(sacrebleu, f"corpus_{metric}")(  # noqa: E731
        [hyps[i] for i in idx], [[REFS[i] for i in idx]]).score
    assert got.baseline == pytest.approx(corpus(BASE, range(len(REFS))))
    assert got.system == pytest.approx(corpus(BETTER, range(len(REFS))))
    draws = np.random.default_rng(seed).integers(0, len(REFS), size=(num_samples, len(REFS)))
    deltas = np.array([corpus(BETTER, d) - corpus(BASE, d) for d in draws])
    assert [got.ci_low, got.ci_high] == pytest.approx(list(np.percentile(deltas, [2.5, 97.5])), abs=1e-9)
    assert got.p_value == pytest.approx(min(1.0, 2 * min(np.mean(deltas <= 0), np.mean(deltas >= 0))))
    assert got.better  # the second system is better on every metric here (TER: lower)
    assert (got.delta < 0) == (metric == "ter")


def test_reward_difference_by_hand():
    base = np.linspace(0.2, 0.8, 20)
    diffs = significance.compare(BASE, BASE, REFS, base, base + 0.1, metrics=())
    d = diffs["reward"]
    # Every sentence gains exactly 0.1: every resample's difference is 0.1.
    assert d.delta == pytest.approx(0.1) and d.ci_low == pytest.approx(0.1) and d.ci_high == pytest.approx(0.1)
    assert d.p_value == 0.0 and d.better and not d.worse
    same = significance.compare(BASE, BASE, REFS, base, base)
    assert all(x.delta == 0 and x.p_value == 1.0 and not x.significant for x in same.values())
    with pytest.raises(ValueError, match="both systems or of neither"):
        significance.compare(BASE, BASE, REFS, base, None)


def test_held_out_drops_flag_metrics_other_than_the_reward():
    diffs = significance.compare(BETTER, BASE, REFS)  # BASE is worse on every metric
    assert significance.held_out_drops(diffs, "chrf") == ["bleu", "ter"]
    assert significance.held_out_drops(diffs, "bleu") == ["chrf", "ter"]
    assert significance.held_out_drops(significance.compare(BASE, BETTER, REFS), "chrf") == []


def test_seed_interval_is_students_t():
    mean, half = significance.seed_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.3027
    mean, half = significance.seed_interval([0.5])
    assert mean == 0.5 and math.isnan(half)


def test_seed_table_pairs_each_seed_with_its_own_bc():
    def rows(bc, rest, p):
        vs = {"reward": {"delta": rest - bc, "significant": p < 0.05}}
        return [{"name": "BC G=0 I=0", "reward": bc, "bleu": 30.0, "chrf": 50.0, "ter": 60.0, "sample_reward": None},
                {"name": "ReST G=1 I=1", "reward": rest, "bleu": 31.0, "chrf": 51.0, "ter": 59.0,
                 "sample_reward": None, "vs_bc": vs}]

    runs = {"bc": [rows(0.60, 0.60, 1)[:1], rows(0.50, 0.50, 1)[:1], rows(0.55, 0.55, 1)[:1]],
            "rest": [rows(0.60, 0.61, 0.01), rows(0.50, 0.52, 0.01), rows(0.55, 0.55, 0.5)]}
    markdown, table = significance.seed_table(runs)
    assert [t["name"] for t in table] == ["BC G=0 I=0", "rest: ReST G=1 I=1"]
    lines = markdown.splitlines()
    # BC 55.0 ± t·s/√3 with s = 5; Δ = (1, 2, 0) points: mean +1.0 ± 4.303·1/√3 = 2.5; 2 of 3 seeds significant.
    assert lines[2].startswith(f"| BC G=0 I=0 | 3 | 55.0 ± {4.302653 * 5 / math.sqrt(3):.1f} | - |")
    assert "| +1.0 ± 2.5 |" in lines[3] and lines[3].endswith("| 2 / 0 |")


def test_stage_differences_pair_rest_with_its_control_by_seed():
    def rows(kind, rewards):
        return [{"name": "BC G=0 I=0", "reward": 0.5}] + [
            {"name": f"{kind} G=1 I={i}", "reward": r, "bleu": 30.0, "chrf": 50.0, "sample_reward": None}
            for i, r in enumerate(rewards)]

    runs = {"rest": [rows("ReST", [0.50, 0.53]), rows("ReST", [0.50, 0.51])],
            "control": [rows("Control", [0.50, 0.52]), rows("Control", [0.50, 0.52])]}
    lines = significance.stage_differences(runs, "rest", "control").splitlines()
    assert lines[2].startswith("| G=1 I=0 | 2 | +0.0 ± 0.0 | - | +0.0 ± 0.0 |")
    # Δ per seed: +1 and -1 points: mean 0, half-width t(0.975, 1) · √2 / √2 = 12.706.
    assert lines[3].startswith("| G=1 I=1 | 2 | +0.0 ± 12.7 | - |")
