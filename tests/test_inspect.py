"""rest_jax.inspection on a hand-built run directory: every expected value is written down by hand here.

The real run (and the notebook on it) is tested in test_notebook.py; these tests need no model and run in
seconds.
"""

import json
import os
import subprocess
import sys

import numpy as np
import gin
import pytest
import sacrebleu

from rest_jax import filters
from rest_jax import inspection as ri
from rest_jax.data import grow_store as gs

# Grow 1 store: 3 sources x (N=2 samples + reference). Rewards chosen by hand around τ = 0.5.
G1_REWARDS = {  # (source_id, sample_id) -> reward
    (0, -1): 1.0, (0, 0): 0.50, (0, 1): 0.45,
    (1, -1): 0.9, (1, 0): 0.55, (1, 1): 0.10,
    (2, -1): 0.8, (2, 0): 0.50, (2, 1): 0.90,
}
G2_REWARDS = {(0, -1): 1.0, (0, 0): 0.7, (0, 1): 0.6}
VALIDATION = [("ein hund", "a dog"), ("eine katze schläft", "a cat sleeps"), ("das haus", "the house")]



@pytest.fixture(autouse=True)
def _clean_gin():
    """load_run_config parses a run's gin config globally; leave no trace for other test files."""
    yield
    gin.clear_config()
    ri._LOADED_RUN = None  # pylint: disable=protected-access

def _stage(path, result):
    path.mkdir(parents=True, exist_ok=True)
    (path / "stage.json").write_text(json.dumps(result))


def _checkpoint(stage_dir, step, complete=True):
    step_dir = stage_dir / "checkpoints" / str(step)
    (step_dir / "state").mkdir(parents=True)
    if complete:
        (step_dir / "commit_success.txt").write_text("ok")


def _store(path, grow, rewards):
    sources = sorted({s for s, _ in rewards})
    writer = gs.GrowStoreWriter(str(path), grow_index=grow, source_ids=sources, num_samples=2,
                                sources_per_shard=2)
    for shard in range(writer.num_shards):
        records = []
        for (s, j), r in rewards.items():
            if s in writer.shard_source_ids(shard):
                records.append({"source_id": s, "sample_id": j, "source_text": f"src {s}",
                                "candidate_text": f"cand {s}/{j}", "reference_text": f"ref {s}",
                                "source_tokens": [5, 1], "candidate_tokens": [6, 1], "reward": r})
        writer.write_shard(shard, records)
    writer.write_metadata()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run as rest.py lays it out: BC, Grow 1 with I=0,1 and an unfinished I=2, Grow 2 with I=10."""
    root = tmp_path_factory.mktemp("run")
    _stage(root / "bc", {"name": "BC G=0 I=0", "scores": {"validation": {"reward": 0.25}}})
    _checkpoint(root / "bc", 20)
    _checkpoint(root / "bc", 40)
    _checkpoint(root / "bc", 60, complete=False)  # killed mid-save: not listed
    _stage(root / "grow_1", {"name": "Grow 1"})
    _store(root / "grow_1" / "store", 1, G1_REWARDS)
    _stage(root / "grow_1" / "improve_0", {"name": "ReST G=1 I=0", "threshold": 0.0, "validation_reward": 0.3,
                                           "curve": [[0, 0.25], [5, 0.3], [10, 0.28]]})
    _checkpoint(root / "grow_1" / "improve_0", 5)
    _stage(root / "grow_1" / "improve_1", {"name": "ReST G=1 I=1", "threshold": 0.5, "validation_reward": 0.35,
                                           "scores": {"validation": {"reward": 0.36}},  # the report's: wins
                                           "curve": [[0, 0.3], [4, 0.35]]})
    _checkpoint(root / "grow_1" / "improve_1", 4)
    (root / "grow_1" / "improve_2" / "checkpoints").mkdir(parents=True)  # still running: no stage.json
    _stage(root / "grow_2", {"name": "Grow 2"})
    _store(root / "grow_2" / "store", 2, G2_REWARDS)
    _stage(root / "grow_2" / "improve_10", {"name": "ReST G=2 I=10", "threshold": 0.95,
                                            "curve": [[0, 0.4], [3, 0.45]]})
    _checkpoint(root / "grow_2" / "improve_10", 3)
    (root / "grow_2" / "improve_10" / "notes").mkdir()  # stray directories are not stages
    (root / "plots").mkdir()
    # Saved greedy translations of the first validation sources, and what the report says.
    (root / "bc" / "validation.greedy.txt").write_text("a dog\na cat\nhouse\n")
    (root / "grow_2" / "improve_10" / "validation.greedy.txt").write_text("a dog\na cat sleeps\nthe house\n")
    tsv = root / "validation.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in VALIDATION))
    (root / "config.gin").write_text(
        "import rest_jax.data.tasks\n"
        f"parallel_text_source.files = {{'validation': '{tsv}'}}\n"
        "run_rest.task = 'parallel_text'\n")
    (root / "report.json").write_text(json.dumps({
        "task": "parallel_text", "reward": "chrf",
        "rows": [{"name": "BC G=0 I=0", "reward": 0.25}],
        "stages": [{"name": "ReST G=1 I=0", "curve": [[0, 0.0]]},  # stage.json wins over the report
                   {"name": "Only in report", "curve": [[0, 0.1], [2, 0.2]]}]}))
    return root


def test_stage_listing_matches_directories(run_dir):
    stages = ri.list_stages(run_dir)
    assert [s.key for s in stages] == ["bc", "grow_1", "grow_1/improve_0", "grow_1/improve_1", "grow_1/improve_2",
                                       "grow_2", "grow_2/improve_10"]
    assert [s.kind for s in stages] == ["bc", "grow", "improve", "improve", "improve", "grow", "improve"]
    assert [(s.grow, s.improve) for s in stages] == [(0, None), (1, None), (1, 0), (1, 1), (1, 2), (2, None),
                                                     (2, 10)]
    for s in stages:
        assert os.path.samefile(s.path, run_dir / s.key)
    assert [s.finished for s in stages] == [True, True, True, True, False, True, True]
    assert stages[4].name == "ReST G=1 I=2"  # derived while the stage has no stage.json
    assert stages[1].checkpoint_dir is None
    assert [s.threshold for s in stages if s.kind == "improve"] == [0.0, 0.5, None, 0.95]


def test_checkpoint_listing_skips_incomplete_steps(run_dir):
    rows = ri.list_checkpoints(run_dir)
    assert [(r["stage"], r["step"]) for r in rows] == [
        ("bc", 20), ("bc", 40), ("grow_1/improve_0", 5), ("grow_1/improve_1", 4), ("grow_2/improve_10", 3)]
    assert [r["validation_reward"] for r in rows] == [0.25, 0.25, 0.3, 0.36, None]
    assert os.path.samefile(rows[1]["path"], run_dir / "bc" / "checkpoints" / "40")


def test_find_stage(run_dir):
    assert ri.find_stage(run_dir, "final").key == "grow_2/improve_10"  # last finished with a checkpoint
    assert ri.find_stage(run_dir, "ReST G=1 I=1").key == "grow_1/improve_1"
    assert ri.find_stage(run_dir, "BC").key == "bc"
    with pytest.raises(KeyError, match="Did you mean: grow_1/improve_1"):
        ri.find_stage(run_dir, "grow_1/improv_1")
    with pytest.raises(ValueError, match="Grow step"):
        ri.load_stage_policy(run_dir, "grow_1", configure=False)


def test_final_stage_needs_a_checkpoint(tmp_path):
    _stage(tmp_path / "bc", {"name": "BC G=0 I=0"})
    with pytest.raises(FileNotFoundError, match="No finished stage"):
        ri.final_stage(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ri.list_stages(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.gin"):
        ri.config_path(tmp_path)


def test_grow_rewards_and_thresholds(run_dir):
    rewards = ri.grow_rewards(run_dir)
    assert list(rewards) == ["Grow 1", "Grow 2"]
    samples = sorted(r for (s, j), r in G1_REWARDS.items() if j >= 0)
    np.testing.assert_allclose(sorted(rewards["Grow 1"]), samples, rtol=1e-6)
    np.testing.assert_allclose(sorted(ri.grow_rewards(run_dir, include_references=True)["Grow 2"]),
                               [0.6, 0.7, 1.0], rtol=1e-6)
    assert ri.improve_thresholds(run_dir) == {"G=1 I=0": 0.0, "G=1 I=1": 0.5, "G=2 I=10": 0.95}


def test_rows_near_threshold_straddle_it(run_dir):
    data = ri.grow_data(run_dir, 1)
    below, above = ri.rows_near_threshold(data, 0.5, k=2)
    # By hand: samples <= 0.5 are 0.50 (0/0), 0.50 (2/0), 0.45, 0.10; > 0.5 are 0.55 (1/0), 0.90 (2/1).
    assert [(r["source_id"], r["sample_id"]) for r in below] == [(0, 0), (2, 0)]
    assert [(r["source_id"], r["sample_id"]) for r in above] == [(1, 0), (2, 1)]
    assert all(r["reward"] <= 0.5 for r in below) and all(r["reward"] > 0.5 for r in above)
    assert above[0]["candidate_text"] == "cand 1/0" and above[0]["reference_text"] == "ref 1"
    # The Improve filter (strict R > τ) agrees on which side each row falls.
    for rows, kept in ((below, False), (above, True)):
        assert filters.global_threshold_mask(np.array([r["reward"] for r in rows]), 0.5).tolist() == [kept] * 2
    below, above = ri.rows_near_threshold(data, 0.5, k=10)
    assert [r["reward"] for r in below] == pytest.approx([0.5, 0.5, 0.45, 0.1])
    assert [r["reward"] for r in above] == pytest.approx([0.55, 0.9])
    _, above = ri.rows_near_threshold(data, 0.5, k=10, include_references=True)
    assert [(r["source_id"], r["sample_id"]) for r in above] == [(1, 0), (2, -1), (1, -1), (2, 1), (0, -1)]
    below, above = ri.rows_near_threshold(data, 0.95, k=3)
    assert above == [] and [r["reward"] for r in below] == pytest.approx([0.9, 0.55, 0.5])


def test_validation_curves_and_plots(run_dir):
    curves = ri.validation_curves(run_dir)
    assert curves == {"ReST G=1 I=0": [(0, 0.25), (5, 0.3), (10, 0.28)], "ReST G=1 I=1": [(0, 0.3), (4, 0.35)],
                      "ReST G=2 I=10": [(0, 0.4), (3, 0.45)], "Only in report": [(0, 0.1), (2, 0.2)]}
    fig = ri.plot_validation_curves(curves, baseline=0.25)
    ax = fig.axes[0]
    curve_lines = [ln for ln in ax.lines if ln.get_label() in curves]
    # Laid end to end: each curve starts where the previous one ended.
    assert [list(ln.get_xdata()) for ln in curve_lines] == [[0, 5, 10], [10, 14], [14, 17], [17, 19]]
    assert list(curve_lines[0].get_ydata()) == pytest.approx([25, 30, 28])
    best_marks = [ln for ln in ax.lines if ln.get_label().startswith("_") and len(ln.get_xdata()) == 1]
    assert [float(m.get_xdata()[0]) for m in best_marks] == [5, 14, 17, 19]
    assert [float(m.get_ydata()[0]) for m in best_marks] == pytest.approx([30, 35, 45, 20])
    assert [ln.get_ydata()[0] for ln in ax.lines if ln.get_label() == "BC"] == pytest.approx([25])
    fig = ri.plot_grow_rewards(ri.grow_rewards(run_dir), ri.improve_thresholds(run_dir), bins=4)
    ax = fig.axes[0]
    # Grow 1's samples 0.10 | 0.45 | 0.50 0.50 0.55 | 0.90 in quarters of [0, 1]; Grow 2's 0.6 0.7 | -.
    assert [p.get_height() for p in ax.patches] == [1, 1, 3, 1, 0, 0, 2, 0]
    vlines = sorted(float(ln.get_xdata()[0]) for ln in ax.lines)
    assert vlines == [0.0, 0.5, 0.95]


def test_compare_outputs_from_saved_files(run_dir):
    rows = ri.compare_outputs(run_dir, ["bc", "final"], split="validation", n=3, translate_missing=False)
    assert [r["source"] for r in rows] == [s for s, _ in VALIDATION]
    assert [r["reference"] for r in rows] == [t for _, t in VALIDATION]
    assert [r["BC G=0 I=0"] for r in rows] == ["a dog", "a cat", "house"]
    assert [r["ReST G=2 I=10"] for r in rows] == ["a dog", "a cat sleeps", "the house"]
    for r in rows:
        for name in ("BC G=0 I=0", "ReST G=2 I=10"):
            expected = sacrebleu.sentence_chrf(r[name], [r["reference"]]).score / 100
            assert r[f"reward[{name}]"] == pytest.approx(expected, abs=1e-6)
    assert rows[1]["reward[ReST G=2 I=10]"] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError, match="validation.greedy.txt"):
        ri.compare_outputs(run_dir, ["grow_1/improve_0"], n=3, translate_missing=False)


def test_format_table():
    text = ri.format_table([{"a": 1, "b": "x" * 10}, {"a": 0.5}], max_width=6)
    assert text.splitlines() == ["a      | b     ", "-------+-------", "1      | xxxxx…", "0.5000 |       "]
    assert ri.format_table([]) == "(no rows)"


def test_a_config_binding_any_commands_settings_loads_in_a_fresh_process(tmp_path):
    """A `rest` run's saved config also holds what its experiment file sets for other commands (the demo's
    online budget); reading it back must not depend on which modules the reader imported before (a fresh
    process, as a notebook kernel is, had not imported rest_jax.online)."""
    (tmp_path / "config.gin").write_text("TASK = 'demo_synthetic'\nrun_rest.task = %TASK\n"
                                         "online.num_iterations = 60\nPromptFormat.source_language = 'en'\n")
    code = ("import sys, gin; from rest_jax import inspection as ri; ri.load_run_config(sys.argv[1]); "
            "print(gin.query_parameter('online.num_iterations'))")
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "60"


def test_task_and_data_from_the_saved_gin_config(tmp_path):
    """Without report.json the task comes from config.gin, here through a macro, as runs/rest.gin binds it."""
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in VALIDATION))
    (tmp_path / "config.gin").write_text(
        "import rest_jax.data.tasks\n"
        "TASK = 'parallel_text'\n"
        "run_rest.task = %TASK\n"
        f"parallel_text_source.files = {{'validation': '{tsv}'}}\n"
        "INPUT_LENGTH = 24\n")
    assert ri.load_run_config(tmp_path, bindings=["TARGET_LENGTH = 40"]) == str(tmp_path / "config.gin")
    assert ri.feature_lengths() == {"inputs": 24, "targets": 40}
    assert ri.translation_lengths() == {"inputs": 128, "targets": 128}  # run_rest's eval_max_length default
    ri.load_run_config(tmp_path, bindings=["TARGET_LENGTH = 40", "run_rest.eval_max_length = 32"])
    assert ri.translation_lengths() == {"inputs": 32, "targets": 40}
    assert ri.run_task(tmp_path) == "parallel_text"
    assert ri.split_data(tmp_path, "validation", limit=2) == ([s for s, _ in VALIDATION[:2]],
                                                             [t for _, t in VALIDATION[:2]])
