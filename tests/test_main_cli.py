"""Tests for the T5X-style command line (rest_jax.main) and its gin helpers (rest_jax.gin_utils).

The real entry functions are written elsewhere, so a fake entry module with throwaway gin configurables
is injected into the subcommand table.  Expected values are the ones the test passes in by hand.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import types
from typing import Any, Callable, Literal, Mapping, Sequence

import gin
import pytest

from rest_jax import configurables
from rest_jax import gin_utils
from rest_jax import main as cli

CALLS = []


@gin.configurable(module="clitest")
def cli_fake_train(model_dir: str = gin.REQUIRED, learning_rate: float = 1e-3, num_steps: int = 10,
                   data=None):
    CALLS.append(dict(model_dir=model_dir, learning_rate=learning_rate, num_steps=num_steps, data=data))


@gin.configurable(module="clitest")
def cli_fake_dataset(path: str = "", batch_size: int = 8):
    return (path, batch_size)


@gin.configurable(module="clitest")
def cli_fake_needs_arg(source_file, beam=1):
    CALLS.append(dict(source_file=source_file, beam=beam))


@gin.configurable(module="clitest")
def cli_fake_typed(sizes: Sequence[int] = (1,), lengths: Mapping[str, int] | None = None, limit: int | None = None,
                   path: str = "", ratio: float = 0.5, flag: bool = False, mode: Literal["a", "b"] = "a",
                   fn: Callable[[], Any] | None = None, pair: tuple[int, int] = (1, 2), name: str = None):
    return locals()


@gin.configurable(module="clitest")
def cli_fake_interrupted(model_dir: str = gin.REQUIRED):
    CALLS.append(dict(model_dir=model_dir))
    raise KeyboardInterrupt  # what Ctrl-C raises in the main thread


@gin.configurable(module="clitest")
def cli_fake_failing(error: str = "missing"):
    from rest_jax import checkpoints  # pylint: disable=import-outside-toplevel

    if error == "missing":
        raise FileNotFoundError("Vocabulary not found: /data/sp.model.")
    if error == "corrupt":  # one of rest_jax's own error classes, as a failing stage raises it
        raise checkpoints.CheckpointCorruptError("Checkpoint /run/2 is damaged.\nDelete it and rerun.")
    raise RuntimeError("an unforeseen failure")


@pytest.fixture(autouse=True)
def fake_entries(monkeypatch, tmp_path):
    module = types.ModuleType("clitest_entries")
    module.train = cli_fake_train
    module.infer = cli_fake_needs_arg
    monkeypatch.setitem(sys.modules, "clitest_entries", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "train", cli.Subcommand("clitest_entries:train", "fake train"))
    monkeypatch.setitem(cli.SUBCOMMANDS, "infer", cli.Subcommand("clitest_entries:infer", "fake infer"))
    # Keep the real configs/ out of the search path, so only this test's run configs exist.
    monkeypatch.setattr(gin_utils, "default_search_paths", lambda: [str(tmp_path / "configs")])
    monkeypatch.delenv(cli.DISTRIBUTED_ENV, raising=False)
    (tmp_path / "configs" / "runs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    CALLS.clear()
    yield
    gin.clear_config()  # also unlocks a finalized config


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_gin_files_overrides_and_model_dir_reach_the_entry(tmp_path, capsys):
    write(tmp_path / "configs/models/small.gin", """
        cli_fake_train.learning_rate = 0.5
        cli_fake_train.data = @cli_fake_dataset()
        cli_fake_dataset.path = %DATA
        DATA = 'default.tsv'
        """)
    model_dir = tmp_path / "run"
    code, _, err = run(["train", "--gin_file=models/small.gin", f"--model_dir={model_dir}",
                        "--gin.cli_fake_train.model_dir=%MODEL_DIR", "--gin.cli_fake_train.num_steps=7",
                        "--gin.DATA=/data/train.tsv", "--gin.cli_fake_dataset.batch_size", "4", "--verbose"], capsys)
    assert code == 0, err
    assert CALLS == [dict(model_dir=str(model_dir), learning_rate=0.5, num_steps=7, data=("/data/train.tsv", 4))]
    saved = (model_dir / "config.gin").read_text()
    assert "cli_fake_train.num_steps = 7" in saved and "DATA = '/data/train.tsv'" in saved
    assert saved.strip() in err  # the printed config is the saved one
    # The saved config is a complete, re-parseable description of the run.
    gin.clear_config()  # also unlocks a finalized config
    gin.parse_config(saved)
    assert gin.query_parameter("cli_fake_train.num_steps") == 7
    assert gin.query_parameter("%MODEL_DIR") == str(model_dir)
    operative = (model_dir / "operative_config.gin").read_text()
    assert "cli_fake_dataset.batch_size = 4" in operative
    assert not [p for p in os.listdir(model_dir) if ".tmp" in p]
    # Without --verbose the config is saved, not printed.
    gin.clear_config()
    code, _, err = run(["train", "--gin_file=models/small.gin", f"--model_dir={model_dir}",
                        "--gin.cli_fake_train.model_dir=%MODEL_DIR"], capsys)
    assert code == 0 and "cli_fake_train" not in err, err


def test_ctrl_c_exits_130_with_one_line_on_what_was_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.modules["clitest_entries"], "interrupted", cli_fake_interrupted, raising=False)
    monkeypatch.setitem(cli.SUBCOMMANDS, "train", cli.Subcommand("clitest_entries:interrupted", "fake Ctrl-C"))
    code, out, err = run(["train", f"--model_dir={tmp_path / 'run'}", "--no_run_config",
                          "--gin.cli_fake_interrupted.model_dir=%MODEL_DIR"], capsys)
    assert code == cli.EXIT_INTERRUPTED == 130 and CALLS == [dict(model_dir=str(tmp_path / "run"))]
    assert err == (f"rest_jax train: interrupted; nothing finished yet in {tmp_path / 'run'}. Rerun the same "
                   "command to start again.\n")


@pytest.mark.parametrize("error, lines", [
    ("missing", ["rest_jax train: error: FileNotFoundError: Vocabulary not found: /data/sp.model."]),
    ("corrupt", ["rest_jax train: error: CheckpointCorruptError: Checkpoint /run/2 is damaged.",
                 "rest_jax train: error: Delete it and rerun."]),
])
def test_an_error_that_says_what_to_do_is_one_message_and_verbose_shows_the_traceback(capsys, monkeypatch,
                                                                                     error, lines):
    monkeypatch.setattr(sys.modules["clitest_entries"], "failing", cli_fake_failing, raising=False)
    monkeypatch.setitem(cli.SUBCOMMANDS, "train", cli.Subcommand("clitest_entries:failing", "fake failure"))
    argv = ["train", "--no_run_config", f"--gin.cli_fake_failing.error='{error}'"]
    code, out, err = run(argv, capsys)
    assert code == cli.EXIT_FAILED == 1 and out == ""
    assert err.splitlines() == [*lines, "rest_jax train: (--verbose shows the traceback)"]
    gin.clear_config()
    with pytest.raises((FileNotFoundError, ValueError), match="not found|damaged"):
        cli.main([*argv, "--verbose"])


def test_an_unforeseen_error_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(sys.modules["clitest_entries"], "failing", cli_fake_failing, raising=False)
    monkeypatch.setitem(cli.SUBCOMMANDS, "train", cli.Subcommand("clitest_entries:failing", "fake failure"))
    with pytest.raises(RuntimeError, match="an unforeseen failure"):
        cli.main(["train", "--no_run_config", "--gin.cli_fake_failing.error='other'"])


def test_run_config_is_loaded_first_and_later_files_win(tmp_path, capsys):
    write(tmp_path / "configs/runs/train.gin", """
        MODEL_DIR = %gin.REQUIRED
        cli_fake_train.model_dir = %MODEL_DIR
        cli_fake_train.num_steps = 100
        """)
    write(tmp_path / "exp.gin", "cli_fake_train.num_steps = 3\n")
    code, _, err = run(["train", "--gin_file", "exp.gin", "--gin.MODEL_DIR='/tmp/x'", "--dry_run"], capsys)
    assert code == 0, err
    assert CALLS == []  # dry run
    assert gin.query_parameter("cli_fake_train.num_steps") == 3
    # Listing the run config explicitly (by its search-path name) loads it once, in the given place.
    code, out, err = run(["train", "--gin_file=exp.gin", "--gin_file=runs/train.gin", "--gin.MODEL_DIR='/tmp/x'",
                          "--dry_run"], capsys)
    assert code == 0, err
    assert gin.query_parameter("cli_fake_train.num_steps") == 100
    assert out.splitlines()[0].endswith("from exp.gin, runs/train.gin + 1 override(s)")
    code, _, err = run(["train", "--gin.MODEL_DIR='/tmp/x'", "--no_run_config", "--dry_run"], capsys)
    assert code == 2 and "model_dir" in err  # without the run config nothing binds the entry's argument


def test_unquoted_strings_only_when_unambiguous():
    assert gin_utils.binding_from_flag("MODEL_DIR", "gs://bucket/run").text == "MODEL_DIR = 'gs://bucket/run'"
    assert gin_utils.binding_from_flag("MODEL_DIR", "'/a b'").text == "MODEL_DIR = '/a b'"
    assert gin_utils.binding_from_flag("x.y", "1e-3").text == "x.y = 1e-3"
    assert gin_utils.binding_from_flag("x.y", "@foo()").text == "x.y = @foo()"
    assert gin_utils.binding_from_flag("x.y", "[1, 2]").text == "x.y = [1, 2]"
    for ambiguous in ["true", "none", "a b", "(1,", "x,y"]:
        with pytest.raises(gin_utils.GinConfigError, match="quotes"):
            gin_utils.binding_from_flag("x.y", ambiguous)


@pytest.mark.parametrize("argv, expected", [
    (["train", "--gin.cli_fake_trian.num_steps=3"], ["unknown configurable 'cli_fake_trian'", "cli_fake_train"]),
    (["train", "--gin.cli_fake_train.num_step=3"], ["no parameter 'num_step'", "num_steps"]),
    (["train", "--gin.cli_fake_train.data=@cli_fake_datset()"], ["@cli_fake_datset", "cli_fake_dataset"]),
    (["train", "--gin_fle=x.gin"], ["unknown flag --gin_fle", "--gin_file"]),
    (["trian"], ["unknown subcommand 'trian'", "train"]),
    (["train", "--gin_file=models/smal.gin"], ["models/smal.gin", "not found", "models/small.gin"]),
    (["train", "--gin.cli_fake_train.num_steps=true"], ["--gin.cli_fake_train.num_steps=true", "quotes"]),
    (["train", "--model_dir=/a", "--gin.MODEL_DIR=/b"], ["both --model_dir and --gin.MODEL_DIR"]),
])
def test_mistakes_give_one_clear_error_with_close_matches(tmp_path, capsys, argv, expected):
    write(tmp_path / "configs/models/small.gin", "cli_fake_train.num_steps = 1\n")
    code, out, err = run(argv, capsys)
    assert code == 2
    assert "Traceback" not in err and CALLS == []
    for text in expected:
        assert text in err


def test_error_in_gin_file_names_file_and_line(tmp_path, capsys):
    path = write(tmp_path / "bad.gin", "cli_fake_train.num_steps = 1\ncli_fake_train.lerning_rate = 2\n")
    code, _, err = run(["train", f"--gin_file={path}", "--model_dir=/tmp/x"], capsys)
    assert code == 2
    assert f"{path}:2" in err and "learning_rate" in err


_TYPED_BASE = ["train", "--gin.cli_fake_train.model_dir='m'", "--dry_run"]


def test_values_of_the_right_type_pass(tmp_path, capsys):
    # Macros, references, None for a None default, an int for a float, an integral float for an int, lists
    # for tuples: all valid gin for these hints.
    path = write(tmp_path / "typed.gin", """
        L = 4
        cli_fake_typed.sizes = [1, %L]
        cli_fake_typed.lengths = {'inputs': %L, 'targets': 8}
        cli_fake_typed.limit = None
        cli_fake_typed.path = 'gs://bucket/x'
        cli_fake_typed.ratio = 1
        cli_fake_typed.flag = True
        cli_fake_typed.mode = 'b'
        cli_fake_typed.fn = @cli_fake_dataset
        cli_fake_typed.pair = [3, 4]
        cli_fake_typed.name = None
        cli_fake_train.num_steps = 1e3
        cli_fake_train.data = @cli_fake_dataset()
        """)
    code, _, err = run([*_TYPED_BASE, f"--gin_file={path}"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("flag, expected", [
    ("--gin.cli_fake_train.num_steps='abc'", "cli_fake_train.num_steps expects int, got 'abc'"),
    ("--gin.cli_fake_train.num_steps=1.5", "cli_fake_train.num_steps expects int, got 1.5"),
    ("--gin.cli_fake_train.learning_rate='fast'", "cli_fake_train.learning_rate expects float, got 'fast'"),
    ("--gin.cli_fake_typed.sizes='abc'", "cli_fake_typed.sizes expects Sequence[int], got 'abc'"),
    ("--gin.cli_fake_typed.lengths={'inputs': 'x'}", "cli_fake_typed.lengths expects Mapping[str, int] | None"),
    ("--gin.cli_fake_typed.flag='False'", "cli_fake_typed.flag expects bool, got 'False'"),
    ("--gin.cli_fake_typed.mode='c'", "cli_fake_typed.mode expects Literal['a', 'b'], got 'c'"),
    ("--gin.cli_fake_typed.pair=(1, 2, 3)", "cli_fake_typed.pair expects tuple[int, int], got (1, 2, 3)"),
    ("--gin.cli_fake_typed.path=3", "cli_fake_typed.path expects str, got 3"),
])
def test_values_of_the_wrong_type_fail_in_a_dry_run_naming_the_flag(capsys, flag, expected):
    code, out, err = run([*_TYPED_BASE, flag], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"error: {flag.split('=', 1)[0]}=" in err and expected in err


def test_wrong_type_in_a_file_names_the_line_and_the_macro(tmp_path, capsys):
    path = write(tmp_path / "exp.gin", "cli_fake_train.num_steps = %STEPS\nSTEPS = %N\nN = 'abc'\n")
    code, _, err = run([*_TYPED_BASE, f"--gin_file={path}"], capsys)
    assert code == 2
    assert f"error: {path}:3: cli_fake_train.num_steps expects int, got 'abc' (through macro N)" in err
    code, _, err = run([*_TYPED_BASE, f"--gin_file={path}", "--gin.N='xyz'"], capsys)
    assert code == 2 and "error: --gin.N='xyz': cli_fake_train.num_steps expects int, got 'xyz'" in err


def test_recursive_include_is_one_line_naming_the_chain(tmp_path, capsys):
    write(tmp_path / "configs/exp/a.gin", "include 'exp/b.gin'\ncli_fake_train.num_steps = 1\n")
    write(tmp_path / "configs/exp/b.gin", "cli_fake_train.num_steps = 2\ninclude 'exp/a.gin'\n")
    write(tmp_path / "configs/exp/self.gin", "include 'exp/self.gin'\n")
    code, _, err = run([*_TYPED_BASE, "--gin_file=exp/a.gin"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err[-3000:]
    assert f"{tmp_path}/configs/exp/b.gin:2: recursive include: exp/a.gin -> exp/b.gin -> exp/a.gin" in err
    code, _, err = run([*_TYPED_BASE, "--gin_file=exp/self.gin"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "exp/self.gin -> exp/self.gin" in err


def test_home_is_expanded_in_gin_paths(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    code, _, err = run(["train", "--gin.MODEL_DIR='~/run'", "--gin.cli_fake_train.model_dir=%MODEL_DIR",
                        "--gin.cli_fake_train.data=@cli_fake_dataset()", "--gin.cli_fake_dataset.path='~/d.tsv'",
                        "--gin.cli_fake_typed.path='gs://b/~/x'"], capsys)
    assert code == 0, err
    assert CALLS == [dict(model_dir=str(home / "run"), learning_rate=1e-3, num_steps=10,
                          data=(str(home / "d.tsv"), 8))]
    assert (home / "run" / "config.gin").exists() and not (tmp_path / "~").exists()
    assert gin.query_parameter("cli_fake_typed.path") == "gs://b/~/x"  # not a home-relative path


def test_missing_required_macro_and_typo_of_it(tmp_path, capsys):
    write(tmp_path / "configs/runs/train.gin", """
        cli_fake_train.model_dir = %MODEL_DIR
        cli_fake_train.data = %TRAIN_DATA
        """)
    code, _, err = run(["train", "--model_dir=/tmp/x"], capsys)
    assert code == 2 and "macro TRAIN_DATA is required but not set" in err and "cli_fake_train.data" in err
    code, _, err = run(["train", "--model_dir=/tmp/x", "--gin.TRAIN_DTA=3"], capsys)
    assert code == 2 and "TRAIN_DTA" in err and "Did you mean: TRAIN_DATA" in err
    assert CALLS == []


def test_required_entry_argument_is_reported(capsys):
    code, _, err = run(["infer", "--dry_run"], capsys)
    assert code == 2 and "'source_file'" in err and "--gin.cli_fake_needs_arg.source_file" in err
    code, _, err = run(["infer", "--gin.cli_fake_needs_arg.source_file=in.txt"], capsys)
    assert code == 0, err
    assert CALLS == [dict(source_file="in.txt", beam=1)]


def test_help_lists_subcommands_run_configs_and_required_macros(tmp_path, capsys):
    write(tmp_path / "configs/runs/train.gin", """
        include 'common.gin'
        MODEL_DIR = %gin.REQUIRED
        cli_fake_train.model_dir = %MODEL_DIR
        cli_fake_train.data = %TRAIN_DATA
        cli_fake_dataset.batch_size = %BATCH  # bound in common.gin
        """)
    write(tmp_path / "configs/runs/common.gin", "BATCH = 8\ncli_fake_dataset.path = %VOCAB\n")
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name in cli.SUBCOMMANDS:
        assert f"  {name} " in out
    train_block = out.split("  train ")[1].split("\n  grow ")[0]
    assert "runs/train.gin" in train_block
    assert "required macros: VOCAB, MODEL_DIR, TRAIN_DATA" in train_block
    assert "--gin_search_paths" in out and "--model_dir" in out
    code, out, _ = run(["train", "--help", "--gin.TRAIN_DATA='x'"], capsys)
    assert code == 0 and "macros still required: VOCAB, MODEL_DIR" in out and "fake train" in out


def test_required_macros_static_scan_matches_hand_listing(tmp_path):
    path = write(tmp_path / "a.gin", """
        A = %gin.REQUIRED
        B = 1
        x.y = %B
        x.z = [%C, {'k': %D}]
        D = 2
        E = %F
        """)
    assert gin_utils.required_macros([str(path)], [str(tmp_path)]) == ["C", "F", "A"]
    assert gin_utils.required_macros([str(path)], [str(tmp_path)], ["A = 3", "F = 'f'"]) == ["C"]


def test_search_paths_flag(tmp_path, capsys):
    write(tmp_path / "elsewhere/exp/e.gin", "cli_fake_train.model_dir = 'm'\ncli_fake_train.num_steps = 9\n")
    code, _, err = run(["train", f"--gin_search_paths={tmp_path}/nothing,{tmp_path}/elsewhere",
                        "--gin_file=exp/e.gin", "--dry_run"], capsys)
    assert code == 0, err
    assert gin.query_parameter("cli_fake_train.num_steps") == 9


def test_multihost_initialises_jax_distributed_once(monkeypatch, capsys):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    for name in ["JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                 "TPU_PROCESS_ADDRESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    base = ["train", "--gin.cli_fake_train.model_dir='m'", "--dry_run"]
    assert run(base, capsys)[0] == 0 and calls == []  # one process: nothing to start
    assert run(base + ["--multihost"], capsys)[0] == 0 and len(calls) == 1
    monkeypatch.setenv(cli.DISTRIBUTED_ENV, "1")  # what scripts/tpu/launch.sh sets
    assert run(base, capsys)[0] == 0 and len(calls) == 2
    monkeypatch.delenv(cli.DISTRIBUTED_ENV)
    assert run(base + ["--gin.initialize_multihost.mode='always'"], capsys)[0] == 0 and len(calls) == 3


def test_save_config_is_atomic_and_creates_dirs(tmp_path):
    path = gin_utils.save_config(tmp_path / "a" / "b", "X = 1\n")
    assert path.read_text() == "X = 1\n" and os.listdir(tmp_path / "a" / "b") == ["config.gin"]


def test_save_config_keeps_a_different_earlier_config(tmp_path):
    tmp_path = tmp_path / "run"
    gin_utils.save_config(tmp_path, "X = 1\n")
    gin_utils.save_config(tmp_path, "X = 1\n")  # the same config again: nothing to keep
    assert sorted(os.listdir(tmp_path)) == ["config.gin"]
    gin_utils.save_config(tmp_path, "X = 2\n")
    gin_utils.save_config(tmp_path, "X = 3\n")
    assert sorted(os.listdir(tmp_path)) == ["config.1.gin", "config.2.gin", "config.gin"]
    texts = [(tmp_path / f).read_text() for f in ("config.1.gin", "config.2.gin", "config.gin")]
    assert texts == ["X = 1\n", "X = 2\n", "X = 3\n"]


def test_console_script_help_in_a_fresh_process():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "rest_jax.main", "--help"], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ["train", "grow", "improve", "rest", "eval", "infer", "score", "convert", "vocab"]:
        assert f"\n  {name} " in proc.stdout
    # One subcommand's help imports its entry (TensorFlow and JAX start-up logs): none of that by default.
    proc = subprocess.run([sys.executable, "-m", "rest_jax.main", "reward-model", "--help"], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "pass --gin_file=rewards/train_learned_qe.gin" in proc.stdout
    assert "Train a learned" in proc.stdout and "def " not in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "rest_jax.main", "grwo"], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Did you mean: grow" in proc.stderr and "Traceback" not in proc.stderr


# Macros each experiment leaves %gin.REQUIRED (data locations a user must give); dummies suffice to parse.
_EXPERIMENT_REQUIRED = {"iwslt14_de_en.gin": ["--gin.IWSLT14_DIR='/nonexistent'"],
                        "wmt_zh_en.gin": ["--gin.TFDS_DATA_DIR='/nonexistent'"]}
_EXPERIMENT_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs" / "experiments"
_EXPERIMENTS = sorted(p.relative_to(_EXPERIMENT_DIR).as_posix() for p in _EXPERIMENT_DIR.rglob("*.gin"))


# One process dry-runs every experiment file in turn through `main.main` (a subprocess per file cost ~7 s of
# imports each); a file with a misspelt binding goes last, so a failure after successes is seen to count.
_DRY_RUN_ALL = """
import contextlib, io, json, sys
from rest_jax import main
results = {}
for name, extra in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main.main(["rest", f"--gin_file={name}", "--gin.MODEL_DIR='/tmp/unused'", *extra, "--dry_run"])
    results[name] = [code, out.getvalue(), err.getvalue()[-2000:]]
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def experiment_dry_runs(tmp_path_factory) -> dict[str, list]:
    broken = tmp_path_factory.mktemp("broken") / "misspelt.gin"
    broken.write_text("include 'experiments/demo.gin'\nrun_rest.num_grow_stepz = 2\n")
    jobs = [(f"experiments/{name}", _EXPERIMENT_REQUIRED.get(name, [])) for name in _EXPERIMENTS]
    jobs.append((str(broken), []))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _DRY_RUN_ALL, json.dumps(jobs)], cwd=repo, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS ", 1)[1])
    code, _, err = results.pop(str(broken))
    assert code == 2 and "num_grow_stepz" in err, err
    return results


@pytest.mark.parametrize("name", _EXPERIMENTS)
def test_every_experiment_config_parses_in_a_dry_run(name, experiment_dry_runs):
    # A binding to a renamed or misspelt configurable in an experiment file fails only when a user runs it;
    # the dry run parses the whole file with the `rest` subcommand's real configurables.
    code, out, err = experiment_dry_runs[f"experiments/{name}"]
    assert code == 0, err
    assert "run_rest.model_dir = %MODEL_DIR" in out and "MODEL_DIR = '/tmp/unused'" in out


def test_includes_resolve_with_runs_and_models_folders_in_the_working_directory(tmp_path):
    # The README's first command writes runs/demo into the repository; gin then took `include
    # 'runs/rest.gin'` for the namespace package `runs` and failed before searching configs/.
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "rest_jax.main", "rest", "--gin_file=experiments/demo.gin",
                           "--gin.MODEL_DIR='runs/demo'", "--dry_run"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "T5Config.emb_dim = 64" in proc.stdout  # from models/tiny.gin, two includes deep


def _modules_registering_configurables() -> set[str]:
    """rest_jax modules whose source registers a gin configurable, found by reading the code (ast)."""
    import ast  # pylint: disable=import-outside-toplevel
    import pathlib  # pylint: disable=import-outside-toplevel

    root = pathlib.Path(cli.__file__).resolve().parent
    found = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            target = node.func if isinstance(node, ast.Call) else node
            if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                    and target.value.id == "gin"
                    and target.attr in ("configurable", "external_configurable", "register")):
                rel = path.relative_to(root.parent).with_suffix("")
                found.add(".".join(rel.parts))
    return found


def test_every_module_with_configurables_is_imported_before_gin_parses():
    """What a gin file may bind cannot depend on which modules a subcommand imports first (issue 11)."""
    found = _modules_registering_configurables()
    assert "rest_jax.evaluate" in found and "rest_jax.data.tasks" in found  # the scan sees decorators
    assert found - {"rest_jax.main"} == set(configurables.CONFIGURABLE_MODULES)


def test_subcommand_importing_late_modules_runs_after_gin_is_locked(tmp_path):
    """`score` imports the text readers inside its entry, after gin is finalised: it must still run."""
    (tmp_path / "src.txt").write_text("a b c\nd e\n")
    (tmp_path / "hyp.txt").write_text("a b c\n\n")  # an empty translation is a valid system output
    env = dict(os.environ, XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-m", "rest_jax.main", "score", f"--gin.SOURCES_FILE='{tmp_path}/src.txt'",
                           f"--gin.HYPOTHESES_FILE='{tmp_path}/hyp.txt'", f"--gin.REFERENCES_FILE='{tmp_path}/src.txt'",
                           f"--gin.OUTPUT_FILE='{tmp_path}/out.txt'"], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import sacrebleu  # pylint: disable=import-outside-toplevel

    expected = [sacrebleu.sentence_chrf(h, [r]).score / 100 for h, r in [("a b c", "a b c"), ("", "d e")]]
    assert [float(x) for x in (tmp_path / "out.txt").read_text().split()] == pytest.approx(expected, abs=1e-6)


# One process configures each case in turn (a subprocess per case cost ~10 s of imports each).
_STEP_LENGTHS = """
import json, sys
import gin
from rest_jax import configurables, main

def resolve(value):  # a macro's value, through nested macros
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    return resolve(value.scoped_configurable_fn()) if hasattr(value, "scoped_configurable_fn") else value

configurables.register()
found = []
for command, knobs, extra in json.loads(sys.argv[1]):
    required = ["MODEL_DIR", "TASK", "CHECKPOINT", "VOCABULARY"] + (["GROW_STORE"] if command == "improve" else [])
    inv = main.parse_args([command, *extra, *[f"--gin.{m}='x'" for m in required]])
    gin.clear_config()
    main.configure(inv, main.load_entry(main.SUBCOMMANDS[command]))
    found.append([resolve(gin.query_parameter(k)) for k in knobs])
print("LENGTHS " + json.dumps(found))
"""


def test_grow_and_improve_subcommands_take_the_experiments_lengths():
    # `rest_jax improve --gin_file=<a Multi30k run's config.gin>` trained at improve_step's default 128 x 128
    # while the run (and its Grow) used 32 x 32: 4x the work per step, on padding.
    knobs = {"improve": ["improve_step.feature_lengths"],
             "grow": ["grow_dataset.max_input_length", "grow_dataset.max_decode_length"]}
    cases = {  # gin flags -> (inputs, targets)
        ("--gin_file=experiments/multi30k_de_en.gin",): (32, 32),
        ("--gin_file=models/tiny.gin",): (128, 128),  # no experiment: the run config's own limits
        ("--gin_file=models/tiny.gin", "--gin.INPUT_LENGTH=16"): (16, 128)}  # a user's binding wins
    jobs = [(command, knobs[command], list(flags)) for command in knobs for flags in cases]
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _STEP_LENGTHS, json.dumps(jobs)], cwd=repo, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("LENGTHS ", 1)[1])
    for (command, _, flags), values in zip(jobs, found):
        inputs, targets = cases[tuple(flags)]
        expected = [{"inputs": inputs, "targets": targets}] if command == "improve" else [inputs, targets]
        assert values == expected, (command, flags)
