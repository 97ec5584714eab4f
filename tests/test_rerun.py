"""A rerun in a MODEL_DIR that holds finished work must use its settings (rest_jax.rerun; issue 11, part 5).

Before, rerunning a finished `rest` with other knobs exited 0, applied nothing (finished stages are skipped) and
rewrote config.gin with values that never made anything.  The real `rest` and `train` subcommands are driven
through `main.main` with their entry functions replaced by recorders, so nothing trains; the finished work is
laid out by hand as the loop and the trainer leave it.
"""

import gin
import pytest

from rest_jax import main as cli
from rest_jax import rest, train

CALLS = []


@pytest.fixture(autouse=True)
def recorded_entries(monkeypatch):
    # load_entry fetches the module attribute, so the recorders run instead of the real loop and trainer.
    monkeypatch.setattr(rest, "run_rest", lambda: CALLS.append("rest"))
    monkeypatch.setattr(train, "train", lambda: CALLS.append("train"))
    monkeypatch.delenv(cli.DISTRIBUTED_ENV, raising=False)
    CALLS.clear()
    yield
    gin.clear_config()  # also unlocks a finalized config


def _touch(path, text="{}"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _commit_checkpoint(step_dir):
    (step_dir / "state").mkdir(parents=True)
    _touch(step_dir / "commit_success.txt", "")


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_finished_work_follows_the_run_layouts(tmp_path):
    run = tmp_path / "run"
    assert rest.finished_work(str(run)) == [] and train.finished_work(str(run)) == []
    _touch(run / "vocab" / "sentencepiece.model", "")
    _commit_checkpoint(run / "bc" / "checkpoints" / "400")
    (run / "bc" / "checkpoints" / "800.orbax-checkpoint-tmp-17").mkdir()  # an interrupted save
    (run / "bc" / "checkpoints" / "800").mkdir()  # no commit marker: not finished
    for stage in ["grow_1", "grow_1/improve_0", "grow_1/improve_2", "grow_10", "grow_2/improve_1"]:
        _touch(run / stage / "stage.json")
    (run / "grow_2" / "improve_3").mkdir()  # begun, not finished
    assert rest.finished_work(str(run)) == ["vocab", "bc/checkpoints/400", "grow_1", "grow_1/improve_0",
                                            "grow_1/improve_2", "grow_2/improve_1", "grow_10"]
    _touch(run / "bc" / "stage.json")
    _touch(run / "best_of_n.json", "[]")
    assert rest.finished_work(str(run))[:3] == ["vocab", "bc", "grow_1"]
    assert rest.finished_work(str(run))[-1] == "best_of_n.json"
    assert train.finished_work(str(run / "bc")) == ["checkpoints/400"]


def test_finished_rest_rerun_with_other_settings_refuses_and_keeps_config_gin(tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "run"
    base = ["rest", "--gin_file=experiments/demo.gin", f"--model_dir={model_dir}"]
    code, _, err = _run(base, capsys)
    assert code == 0 and CALLS == ["rest"], err
    config = model_dir / "config.gin"
    saved = config.read_text()
    _touch(model_dir / "bc" / "stage.json")
    _touch(model_dir / "grow_1" / "stage.json")

    changed = [*base, "--gin.BATCH_SIZE=32", "--gin.train.num_steps=5"]
    for argv in (changed, [*changed, "--dry_run"]):
        code, out, err = _run(argv, capsys)
        assert code == 2 and out == "" and "Traceback" not in err
        assert f"{model_dir} holds work made with other settings (config.gin): bc, grow_1." in err
        for line in ["train.num_steps: 1200 -> 5", "train.batch_size: 64 -> 32", "grow_dataset.batch_size: 64 -> 32",
                     "improve_step.batch_size: 64 -> 32"]:
            assert f"rest_jax rest: error:   {line}\n" in err
        assert "Use a new MODEL_DIR, or delete that work" in err
    assert CALLS == ["rest"]  # nothing ran
    assert config.read_text() == saved and sorted(p.name for p in model_dir.glob("config*")) == ["config.gin"]

    # The same settings resume.
    assert _run(base, capsys)[0] == 0
    assert CALLS == ["rest"] * 2 and config.read_text() == saved
    assert sorted(p.name for p in model_dir.glob("config*")) == ["config.gin"]

    # A knob that cannot change finished work may differ; the earlier config is kept beside the new one.
    code, _, err = _run([*base, "--gin.initialize_multihost.mode='never'"], capsys)
    assert code == 0, err
    assert (model_dir / "config.1.gin").read_text() == saved
    assert "initialize_multihost.mode = 'never'" in config.read_text()

    # The same directory by another path (MODEL_DIR itself is not compared, so a moved run resumes too).
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(["rest", "--gin_file=experiments/demo.gin", "--model_dir=run",
                         "--gin.initialize_multihost.mode='never'"], capsys)
    assert code == 0, err
    assert CALLS == ["rest"] * 4 and "MODEL_DIR = 'run'" in config.read_text()


def test_rest_rerun_may_add_grow_steps_and_improve_steps_until_a_second_grow_begins(tmp_path, capsys):
    model_dir = tmp_path / "run"
    base = ["rest", "--gin_file=experiments/demo.gin", f"--model_dir={model_dir}"]
    assert _run(base, capsys)[0] == 0
    _touch(model_dir / "bc" / "stage.json")
    _touch(model_dir / "grow_1" / "stage.json")
    _touch(model_dir / "grow_1" / "improve_0" / "stage.json")
    code, _, err = _run([*base, "--gin.run_rest.num_improve_steps=3", "--gin.run_rest.num_grow_steps=2"], capsys)
    assert code == 0, err
    (model_dir / "grow_2" / "store").mkdir(parents=True)  # a second Grow has begun (a shard may be kept)
    code, _, err = _run([*base, "--gin.run_rest.num_improve_steps=3", "--gin.run_rest.num_grow_steps=3"], capsys)
    assert code == 0, err  # I as before (3), G changed
    code, _, err = _run([*base, "--gin.run_rest.num_improve_steps=4", "--gin.run_rest.num_grow_steps=3"], capsys)
    assert code == 2 and "rest_jax rest: error:   run_rest.num_improve_steps: 3 -> 4\n" in err
    assert "num_grow_steps" not in err
    assert CALLS == ["rest"] * 3


def test_train_rerun_may_go_on_longer_but_not_with_another_model(tmp_path, capsys):
    model_dir = tmp_path / "bc"
    base = ["train", "--gin_file=models/tiny.gin", "--gin_file=tasks/demo_synthetic.gin", f"--model_dir={model_dir}"]
    assert _run(base, capsys)[0] == 0
    config = model_dir / "config.gin"
    saved = config.read_text()
    (model_dir / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
    code, _, err = _run([*base, "--gin.T5Config.mlp_dim=256"], capsys)
    assert code == 0, err  # nothing committed yet: the new settings make everything
    config.write_text(saved)

    _commit_checkpoint(model_dir / "checkpoints" / "4")
    code, _, err = _run([*base, "--gin.T5Config.mlp_dim=256"], capsys)
    assert code == 2 and "checkpoints/4. A rerun resumes that work" in err
    assert "rest_jax train: error:   T5Config.mlp_dim: 128 -> 256\n" in err
    assert config.read_text() == saved

    # More steps continue the same run (the trajectory depends only on the step).
    code, _, err = _run([*base, "--gin.TRAIN_STEPS=200000"], capsys)
    assert code == 0, err
    assert "train.num_steps = %TRAIN_STEPS" in config.read_text() and "TRAIN_STEPS = 200000" in config.read_text()
    assert "TRAIN_STEPS = 100000" in (model_dir / "config.1.gin").read_text()
    assert CALLS == ["train"] * 3

    config.write_text("train.num_steps = (\n")  # not gin: cannot vouch for the checkpoints
    code, _, err = _run(base, capsys)
    assert code == 2 and f"{config} cannot be read as gin" in err and CALLS == ["train"] * 3


def test_a_path_setting_given_once_absolute_and_once_relative_is_the_same_setting(tmp_path, capsys, monkeypatch):
    # The Multi30k study ran with an absolute STUDY_DIR; resuming it with the README's relative one was refused
    # ('/abs/s0/bc' -> 'runs/s0/bc') although both name the same BC run.
    (tmp_path / "study" / "bc").mkdir(parents=True)
    (tmp_path / "other_bc").mkdir()
    model_dir = tmp_path / "study" / "rest"
    base = ["rest", "--gin_file=experiments/demo.gin", f"--model_dir={model_dir}"]
    assert _run([*base, f"--gin.run_rest.bc_run='{tmp_path / 'study' / 'bc'}'"], capsys)[0] == 0
    _touch(model_dir / "grow_1" / "stage.json")
    monkeypatch.chdir(tmp_path)
    for bc_run in ["study/bc", "./study/../study/bc/"]:
        code, _, err = _run([*base, f"--gin.run_rest.bc_run='{bc_run}'"], capsys)
        assert code == 0, err
    assert CALLS == ["rest"] * 3
    # Another directory, or one that does not exist, is another setting.
    for bc_run in ["other_bc", "missing/bc"]:
        code, _, err = _run([*base, f"--gin.run_rest.bc_run='{bc_run}'"], capsys)
        assert code == 2 and f"rest_jax rest: error:   run_rest.bc_run: './study/../study/bc/' -> '{bc_run}'\n" in err
    assert CALLS == ["rest"] * 3
