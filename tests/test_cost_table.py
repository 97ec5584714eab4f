"""scripts/cost_table.py: each seed's policies against its BC and one policy against another over the test
sentences, checked against scores of their translations computed here with sacreBLEU."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import sacrebleu

REPO = pathlib.Path(__file__).resolve().parents[1]
REFS = ["a man rides a red bike .", "two dogs play in the snow .", "a woman reads a book outside .",
        "children run on the beach .", "a cat sleeps on the sofa .", "an old man sells fish at a market ."]
HYPS = {  # (seed, policy) -> translations of the six sentences
    ("s0", "bc"): ["a man rides a bike .", "two dog play in snow .", "a woman reads outside .",
                   "child runs on beach .", "a cat sleeps .", "an man sells fish ."],
    ("s0", "grpo"): ["a man rides a red bike .", "two dogs play in the snow .", "a woman reads a book .",
                     "children run on the beach .", "a cat sleeps on a sofa .", "an old man sells fish ."],
    ("s0", "ppo"): ["a man rides a red bike .", "two dog play in snow .", "a woman reads outside .",
                    "child runs on beach .", "a cat sleeps .", "an man sells fish ."],
    ("s1", "bc"): ["a man rides a red bike .", "dogs play .", "a woman reads a book .", "children run .",
                   "a cat sleeps on the sofa .", "a man sells fish ."],
    ("s1", "grpo"): ["a man rides .", "dogs play .", "a woman reads .", "children run .", "a cat sleeps .",
                     "a man sells fish at a market at a market ."],
    ("s1", "ppo"): ["a man rides a red bike .", "two dogs play in the snow .", "a woman reads a book outside .",
                    "children run .", "a cat sleeps on the sofa .", "a man sells fish ."],
}
NAMES = {"grpo": "GRPO (2 it.)", "ppo": "PPO (2 it.)"}


def _mean_chrf(hyps):
    return np.mean([sacrebleu.sentence_chrf(h, [r]).score / 100 for h, r in zip(hyps, REFS)])


def _cost_dir(tmp_path):
    """Two seeds of two online methods, each from its seed's BC, as scripts/cost_comparison.sh leaves them."""
    for seed in ("s0", "s1"):
        bc_file = tmp_path / "bc" / seed / "test.greedy.txt"
        bc_file.parent.mkdir(parents=True)
        bc_file.write_text("".join(h + "\n" for h in HYPS[seed, "bc"]))
        bc_row = {"name": "BC G=0 I=0", "reward": _mean_chrf(HYPS[seed, "bc"]), "sample_reward": 0.5}
        for method, name in NAMES.items():
            run = tmp_path / "cost" / seed / method
            (run / "online").mkdir(parents=True)
            (run / "online" / "test.greedy.txt").write_text("".join(h + "\n" for h in HYPS[seed, method]))
            row = {"name": name, "reward": _mean_chrf(HYPS[seed, method]), "sample_reward": 0.6,
                   "vs_bc": {"reward": {"delta": 0.01, "ci_low": -0.02, "ci_high": 0.04, "significant": False}}}
            stages = [{"name": bc_row["name"], "scores": {"test": {"translations": str(bc_file)}}},
                      {"name": name, "scores": {"test": {"translations": str(run / "online" / "test.greedy.txt")}}}]
            (run / "report.json").write_text(json.dumps({
                "split": "test", "reward": "chrf", "rows": [bc_row, row], "stages": stages,
                "cost": {"reward_calls": 64, "wall_seconds": 5.0}}))
    refs = tmp_path / "refs.txt"
    refs.write_text("".join(r + "\n" for r in REFS + ["a sentence the reports did not score ."]))
    return tmp_path / "cost", refs


def test_policies_per_seed_and_against_each_other(tmp_path):
    cost, refs = _cost_dir(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/cost_table.py"), str(cost), "--compare",
                           NAMES["grpo"], NAMES["ppo"], "--references", str(refs)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no TensorFlow start-up lines either
    per_seed, compared = proc.stdout.split("Per seed")[1].split(f"{NAMES['grpo']} against ")
    for seed in ("s0", "s1"):
        # Words per translation, by hand, for BC and for GRPO.
        for label, method in (("BC", "bc"), (NAMES["grpo"], "grpo")):
            line = next(x for x in per_seed.splitlines() if x.startswith(f"| {label} | {seed} |"))
            want = np.mean([len(h.split()) for h in HYPS[seed, method]])
            assert float(line.split("|")[-2]) == round(want, 1), (line, want)
        # GRPO − PPO: the mean sentence chrF (x100), corpus BLEU and TER differences.
        grpo, ppo = HYPS[seed, "grpo"], HYPS[seed, "ppo"]
        want = [100 * (_mean_chrf(grpo) - _mean_chrf(ppo)),
                sacrebleu.corpus_bleu(grpo, [REFS]).score - sacrebleu.corpus_bleu(ppo, [REFS]).score,
                sacrebleu.corpus_ter(grpo, [REFS]).score - sacrebleu.corpus_ter(ppo, [REFS]).score]
        line = next(x for x in compared.splitlines() if x.startswith(f"| | {seed} |"))
        got = [float(c.split("[")[0]) for c in line.split("|")[3:6]]
        np.testing.assert_allclose(got, want, atol=0.051)
    assert "+1.0 [-2.0, +4.0]" in per_seed  # the report's own paired interval against BC, as stored


def test_compare_names_an_unknown_policy(tmp_path):
    cost, refs = _cost_dir(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/cost_table.py"), str(cost), "--compare",
                           "GRPO", NAMES["ppo"], "--references", str(refs)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "no policy 'GRPO'" in proc.stderr and NAMES["grpo"] in proc.stderr
