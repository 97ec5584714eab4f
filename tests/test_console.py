"""What a command prints (issue 11, parts 6 and 7): quiet by default, everything with --verbose, and a Ctrl-C
that stops at once with one line saying what was kept.

Real `python -m rest_jax.main train` subprocesses on a small generated corpus, tiny model, one CPU device.
"""

import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from rest_jax import checkpoints
from rest_jax import report
from rest_jax.data import demo_corpus, text_files, vocab
from rest_jax.io import console

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB_SIZE = 96
MODEL = {"num_encoder_layers": 1, "num_decoder_layers": 1, "emb_dim": 32, "mlp_dim": 64, "num_heads": 2,
         "head_dim": 16}
# Lines that only --verbose may show: library INFO logs, sharding notices, TF/XLA C++ start-up lines.
NOISE = re.compile(r"INFO absl|orbax|replicating|oneDNN|cuda|cuInit|InitializeLog|libtpu|Traceback", re.I)
QUIET_MAX_LINES = 5  # config saved, the train summary; a little room for an actionable warning


# ----------------------------------------------------------------------------------------------------------
# The pieces, in-process.


def test_native_start_up_lines_are_hidden_and_replayed_when_start_up_fails(capfd):
    with console.quiet_native_stderr():
        os.write(2, b"I0000 port.cc:153] oneDNN custom operations are on\n")  # as C++ code writes it
    assert capfd.readouterr().err == ""
    with pytest.raises(ImportError):
        with console.quiet_native_stderr():
            os.write(2, b"E0000 the reason the import failed\n")
            raise ImportError("no module")
    assert capfd.readouterr().err == "E0000 the reason the import failed\n"
    with console.quiet_native_stderr(enabled=False):
        os.write(2, b"shown with --verbose\n")
    assert capfd.readouterr().err == "shown with --verbose\n"


def test_quiet_shows_warnings_and_console_lines_only_and_restores_the_levels():
    before = [logging.getLogger(name).level for name in ("", "rest_jax", "rest_jax.console")]
    with console.verbosity(False):
        assert not logging.getLogger("absl").isEnabledFor(logging.INFO)  # Orbax logs through absl
        assert not logging.getLogger("rest_jax.partitioning").isEnabledFor(logging.INFO)
        assert logging.getLogger("rest_jax.console").isEnabledFor(logging.INFO)
        assert logging.getLogger("jax._src.xla_bridge").isEnabledFor(logging.WARNING)
    with console.verbosity(True):
        assert logging.getLogger("absl").isEnabledFor(logging.INFO)
        assert logging.getLogger("rest_jax.partitioning").isEnabledFor(logging.INFO)
    assert [logging.getLogger(name).level for name in ("", "rest_jax", "rest_jax.console")] == before


def test_interrupted_line_names_finished_stages_and_the_newest_complete_checkpoint(tmp_path):
    assert console.STAGE_FILE == report.STAGE_FILE
    assert console.COMMIT_MARKER == checkpoints._COMMIT_MARKER  # pylint: disable=protected-access
    assert console.interrupted_line("train", str(tmp_path)) == (
        f"rest_jax train: interrupted; nothing finished yet in {tmp_path}. Rerun the same command to start again.")
    assert console.interrupted_line("infer", None) == (
        "rest_jax infer: interrupted; nothing was saved. Rerun the same command to start again.")
    (tmp_path / "bc" / "stage.json").parent.mkdir()
    (tmp_path / "bc" / "stage.json").write_text("{}")
    for step, complete in ((4, True), (2, True), (8, False)):  # 8: a save cut short (no commit marker)
        (tmp_path / "bc" / "checkpoints" / str(step) / "state").mkdir(parents=True)
        if complete:
            (tmp_path / "bc" / "checkpoints" / str(step) / "commit_success.txt").write_text("")
        # Saved within one second: file systems (and epath) with whole-second mtimes cannot order them.
        os.utime(tmp_path / "bc" / "checkpoints" / str(step), (1_700_000_000, 1_700_000_000))
    (tmp_path / "grow_1" / "improve_0" / "checkpoints" / "1.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    assert console.interrupted_line("rest", str(tmp_path)) == (
        f"rest_jax rest: interrupted. Kept: finished stages bc; checkpoint {tmp_path / 'bc' / 'checkpoints' / '4'}. "
        "Rerun the same command to resume (what is kept is not redone).")


# ----------------------------------------------------------------------------------------------------------
# Whole commands.


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("console_demo")
    corpus = root / "corpus"
    demo_corpus.write_corpus(str(corpus), train_size=400, validation_size=16, test_size=16)
    lines = [*text_files.read_lines(str(corpus / "train.src")), *text_files.read_lines(str(corpus / "train.tgt"))]
    return {"corpus": corpus, "vocab": vocab.train_vocabulary(lines, str(root / "vocab"), vocab_size=VOCAB_SIZE)}


def _env():
    env = dict(os.environ)
    # One CPU device: the 8 simulated ones of conftest would only slow the subprocess down.
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("REST_JAX_VERBOSE", None)
    return env


def _train_args(demo, model_dir, steps, checkpoint_period=4):
    return [sys.executable, "-m", "rest_jax.main", "train", "--gin_file=models/tiny.gin",
            "--gin_file=tasks/demo_synthetic.gin", f"--gin.MODEL_DIR='{model_dir}'",
            f"--gin.get_task.vocabulary='{demo['vocab']}'", f"--gin.demo_source.data_dir='{demo['corpus']}'",
            "--gin.demo_source.generate_if_missing=False", f"--gin.VOCAB_SIZE={VOCAB_SIZE}",
            "--gin.create_mesh.mesh_shape=(1, 1)", f"--gin.TRAIN_STEPS={steps}",
            f"--gin.CHECKPOINT_PERIOD={checkpoint_period}", "--gin.EVAL_PERIOD=0", "--gin.train.eval_split=None",
            "--gin.BATCH_SIZE=8", "--gin.TASK_FEATURE_LENGTHS={'inputs': 24, 'targets': 24}",
            # Adafactor's factored moments are what the sharding code logs "replicating" notices for.
            "--gin.create_optimizer.optimizer='adafactor'",
            *[f"--gin.T5Config.{k}={v}" for k, v in MODEL.items()]]


def _run(args):
    proc = subprocess.run(args, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout


def test_quiet_by_default_and_everything_with_verbose(demo, tmp_path):
    rc, out = _run(_train_args(demo, tmp_path / "quiet", steps=4))
    assert rc == 0, out[-3000:]
    lines = out.splitlines()
    assert len(lines) <= QUIET_MAX_LINES, out
    assert not [line for line in lines if NOISE.search(line)], out
    assert "train.num_steps" not in out  # the config is saved, not printed
    assert f"Saved gin config to {tmp_path / 'quiet' / 'config.gin'} (--verbose prints it)" in out
    summary = [line for line in lines if "train done in" in line]
    assert len(summary) == 1 and "step 4, loss " in summary[0] and "tokens/s" in summary[0], out

    rc, out = _run(_train_args(demo, tmp_path / "verbose", steps=4) + ["--verbose"])
    assert rc == 0, out[-3000:]
    assert "INFO absl" in out and "replicating" in out and "train.num_steps = %TRAIN_STEPS" in out
    assert "Saved checkpoint" in out and "[train] step 4:" in out  # rest_jax's own detail lines
    assert "train done in" in out


@pytest.mark.slow
def test_ctrl_c_stops_at_once_with_one_line_and_the_rerun_resumes(demo, tmp_path):
    model_dir = tmp_path / "run"
    ckpt = model_dir / "checkpoints"
    # A launcher that ignores SIGINT (`pytest &` in a script) would hand that on to the run: not for the child.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    with open(tmp_path / "interrupted.log", "w") as log:
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            proc = subprocess.Popen(_train_args(demo, model_dir, steps=100_000, checkpoint_period=3), cwd=REPO,
                                    env=_env(), stdout=log, stderr=subprocess.STDOUT)
        finally:
            if ignored:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            deadline = time.monotonic() + 300
            while not list(ckpt.glob("*/commit_success.txt")):
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "interrupted.log").read_text()
                time.sleep(0.05)
            time.sleep(0.5)  # mid-training, possibly mid-save
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=60)
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    out = (tmp_path / "interrupted.log").read_text()
    assert rc == 130, out[-3000:]
    assert took < 3.0, f"exit took {took:.1f}s"
    kept = checkpoints.CheckpointManager(ckpt, cleanup_tmp=False).latest_step()
    assert kept is not None and kept % 3 == 0
    lines = out.splitlines()
    assert len(lines) <= 3 and "Traceback" not in out, out
    assert lines[-1] == (f"rest_jax train: interrupted. Kept: checkpoint {ckpt / str(kept)}. "
                         "Rerun the same command to resume (what is kept is not redone)."), out

    rc, out = _run(_train_args(demo, model_dir, steps=kept + 2, checkpoint_period=3))
    assert rc == 0, out[-3000:]
    assert f"Resuming from {ckpt / str(kept)} (step {kept})." in out
    assert "train done in" in out and f"step {kept + 2}, loss" in out
