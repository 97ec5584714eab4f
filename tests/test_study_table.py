"""scripts/study_table.py: two rows of a study compared per seed over the test sentences, against the
differences of their translations' scores computed here with sacreBLEU."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import sacrebleu

REPO = pathlib.Path(__file__).resolve().parents[1]
REFS = ["a man rides a red bike .", "two dogs play in the snow .", "a woman reads a book outside .",
        "children run on the beach .", "a cat sleeps on the sofa .", "an old man sells fish at a market ."]
HYPS = {  # (row, stage) -> translations of the six sentences
    ("base", "G=1 I=0"): ["a man rides a bike .", "two dog play in snow .", "a woman reads outside .",
                          "child runs on beach .", "a cat sleeps .", "an man sells fish ."],
    ("base", "G=1 I=1"): ["a man rides a red bike .", "two dog play in snow .", "a woman reads outside .",
                          "child runs on beach .", "a cat sleeps .", "an man sells fish ."],
    ("new", "G=1 I=0"): ["a man rides a red bike .", "two dogs play in the snow .", "a woman reads a book .",
                         "children run on the beach .", "a cat sleeps on a sofa .", "an old man sells fish ."],
    ("new", "G=1 I=1"): ["a man rides a bike .", "two dog play in snow .", "a woman reads outside .",
                         "child runs on beach .", "a cat sleeps .", "an man sells fish ."],
}

REPORTED = {("base", "G=1 I=0"): 0.55, ("base", "G=1 I=1"): 0.6, ("new", "G=1 I=0"): 0.58, ("new", "G=1 I=1"): 0.52}


def _study(tmp_path):
    """Two rows of seed 0, as the study leaves them, but with stage.json paths that name where the study ran
    (another machine): the script must read each stage under the run directory it is given."""
    for row in ("base", "new"):
        run = tmp_path / "study" / "s0" / row
        rows = [{"name": "BC G=0 I=0", "reward": 0.5, "bleu": 30.0, "chrf": 50.0}]
        for stage in ("G=1 I=0", "G=1 I=1"):
            i = stage[-1]
            stage_dir = run / "grow_1" / f"improve_{i}"
            stage_dir.mkdir(parents=True)
            (stage_dir / "test.greedy.txt").write_text("".join(h + "\n" for h in HYPS[row, stage]))
            elsewhere = f"/elsewhere/s0/{row}/grow_1/improve_{i}"
            (stage_dir / "stage.json").write_text(json.dumps({
                "name": f"ReST {stage}", "stage_dir": elsewhere, "checkpoint": f"{elsewhere}/checkpoints",
                "scores": {"test": {"translations": f"{elsewhere}/test.greedy.txt"}}}))
            rows.append({"name": f"ReST {stage}", "reward": REPORTED[row, stage], "bleu": 31.0, "chrf": 51.0})
        (run / "report.json").write_text(json.dumps({"split": "test", "reward": "chrf", "rows": rows}))
    refs = tmp_path / "refs.txt"
    refs.write_text("".join(r + "\n" for r in REFS + ["a sentence the report did not score ."]))
    return tmp_path / "study", refs


def test_compare_rows_per_seed_over_the_test_sentences(tmp_path):
    study, refs = _study(tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "scripts/study_table.py"), str(study), "--compare", "new",
                           "base", "--references", str(refs)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split("|")[2].strip(): line for line in proc.stdout.splitlines() if line.startswith("| s0 |")}
    for stage in ("G=1 I=0", "G=1 I=1"):
        # By hand: the mean sentence chrF (the reward, 0-1, shown x100) and the corpus BLEU / chrF differences.
        mean = lambda hyps: np.mean([sacrebleu.sentence_chrf(h, [r]).score / 100 for h, r in zip(hyps, REFS)])
        new, base = HYPS["new", stage], HYPS["base", stage]
        want = [100 * (mean(new) - mean(base)),
                sacrebleu.corpus_bleu(new, [REFS]).score - sacrebleu.corpus_bleu(base, [REFS]).score,
                sacrebleu.corpus_chrf(new, [REFS]).score - sacrebleu.corpus_chrf(base, [REFS]).score]
        cells = lines[stage].split("|")[3:6]
        got = [float(c.split("[")[0]) for c in cells]
        np.testing.assert_allclose(got, want, atol=0.051)
    assert lines["G=1 I=1"].split("|")[3].strip().startswith("-")  # "new" is worse at I=1, better at I=0
    assert lines["G=1 I=0"].split("|")[3].strip().startswith("+")
    assert "| G=1 I=1 | 1 |" in proc.stdout  # the difference over seeds (one seed here)


def _table(stdout):
    """The seed table's rows: run label -> its cells."""
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in stdout.splitlines() if line.startswith("| ")]
    return {c[0]: c[1:] for c in cells if c[0].startswith("BC G=") or ": ReST G=" in c[0]}


def test_rows_and_stages_select_what_the_table_shows(tmp_path):
    study, _ = _study(tmp_path)
    script = [sys.executable, str(REPO / "scripts/study_table.py"), str(study)]
    proc = subprocess.run(script + ["--rows", "new", "--stages", "G=1 I=1"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr  # no TensorFlow start-up lines either
    table = _table(proc.stdout)
    assert list(table) == ["BC G=0 I=0", "new: ReST G=1 I=1"]
    # One seed: reward 52.0 against its BC's 50.0 (reward 0-1 shown x100).
    assert table["new: ReST G=1 I=1"][1:3] == ["52.0", "+2.0"]

    proc = subprocess.run(script + ["--rows", "new", "base", "--compare", "new", "base"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert list(_table(proc.stdout)) == ["BC G=0 I=0", "new: ReST G=1 I=0", "new: ReST G=1 I=1",
                                         "base: ReST G=1 I=0", "base: ReST G=1 I=1"]
    diffs = {line.split("|")[1].strip(): line.split("|")[3].strip() for line in proc.stdout.splitlines()
             if line.startswith("| G=1 I=")}
    assert diffs == {"G=1 I=0": "+3.0", "G=1 I=1": "-8.0"}  # 58 - 55, 52 - 60: one seed, no interval


def test_unknown_rows_and_stages_are_named(tmp_path):
    study, _ = _study(tmp_path)
    script = [sys.executable, str(REPO / "scripts/study_table.py"), str(study)]
    proc = subprocess.run(script + ["--rows", "new", "nope"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "row(s) nope" in proc.stderr and "base, new" in proc.stderr
    proc = subprocess.run(script + ["--stages", "G=1 I=7"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "stage(s) G=1 I=7" in proc.stderr and "G=1 I=1" in proc.stderr
