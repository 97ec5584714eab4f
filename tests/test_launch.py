"""`rest_jax launch`: P real JAX processes on 127.0.0.1 joined by jax.distributed (issue 12, item 2).

The processes are real (gloo collectives across processes); the reference for the global sum is the
sum of every process's rows computed here, by hand.
"""

import io
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from rest_jax import launch

CHILD = [sys.executable, os.path.join(os.path.dirname(__file__), "launch_child.py")]


def _run(scenario: str, num_processes: int = 2, devices: int = 2, **kwargs) -> tuple[int, str, float]:
    out = io.StringIO()
    start = time.monotonic()
    code = launch.run([scenario], num_processes, devices, out=out, program=CHILD, **kwargs)
    return code, out.getvalue(), time.monotonic() - start


def _expected_sum(num_processes: int, devices: int) -> float:
    rows = [np.arange(devices * 3, dtype=np.float64) + 100 * i for i in range(num_processes)]
    return float(sum(r.sum() for r in rows))


@pytest.mark.parametrize("num_processes,devices", [(2, 2), (3, 1)])
def test_processes_form_one_job_with_real_collectives(num_processes, devices):
    code, out, _ = _run("ok", num_processes, devices)
    assert code == 0, out
    total = _expected_sum(num_processes, devices)
    for i in range(num_processes):
        line = f"[{i}] process {i} of {num_processes}: {num_processes * devices} devices, global sum {total:.1f}"
        assert line in out.splitlines(), out
        # Partitioner.gather: every process gets all rows; Partitioner.place: a host value onto the global mesh.
        rows = num_processes * devices
        assert f"[{i}] process {i}: gathered ({rows}, 3) sum {total:.1f}, placed sum 6.0" in out.splitlines(), out
    assert "[Gloo]" not in out  # gloo's per-rank start-up notes are dropped unless --verbose
    assert out.splitlines()[-1] == f"[launch] all {num_processes} processes finished."


def test_generate_split_across_processes_equals_one_process_decoding_everything():
    code, out, _ = _run("generate", 2, 1)
    assert code == 0, out
    for i in range(2):
        assert f"[{i}] process {i}: split generate equals whole: True (7 sources)" in out.splitlines(), out


def test_a_failing_process_stops_the_others_and_sets_the_status():
    code, out, elapsed = _run("sleep", grace_s=1.0)
    assert code == 5, out
    assert "[launch] process 1 exited with status 5; stopping the others in 1 s" in out
    assert "[launch] failed: process 1 of 2 exited with status 5." in out
    assert elapsed < 60  # process 0 would sleep 600 s


def test_killed_process_makes_the_survivor_exit_within_the_heartbeat(monkeypatch):
    """SIGKILL of one process: the other, blocked on collectives with it, exits instead of hanging."""
    monkeypatch.setenv("HEARTBEAT_S", "10")
    code, out, elapsed = _run("kill", grace_s=120.0)  # the survivor must stop on its own, not be stopped
    assert code != 0, out
    assert "[launch] process 1 was killed by SIGKILL" in out
    assert "stopping the processes still running" not in out, out
    assert "unhealthy" in out  # jax.distributed names the dead task
    assert elapsed < 60, out


def test_unreachable_coordinator_names_the_address_and_timeout(monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = launch.child_env(os.environ, coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=1,
                           devices_per_process=1)
    code = ("from rest_jax import partitioning\n"
            "partitioning.initialize_multihost(initialization_timeout_s=3)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    message = next(line for line in proc.stderr.splitlines() if "CoordinatorUnreachableError:" in line)
    assert f"127.0.0.1:{port}" in message and "initialization_timeout_s=3" in message, proc.stderr[-2000:]
    assert "process 1 of 2" in message


def test_child_environment():
    base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "KEEP": "x"}
    env = launch.child_env(base, coordinator="127.0.0.1:9", num_processes=4, process_id=3, devices_per_process=2)
    assert env["XLA_FLAGS"].split() == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]
    assert (env[launch.COORDINATOR_ENV], env[launch.NUM_PROCESSES_ENV], env[launch.PROCESS_ID_ENV]) == (
        "127.0.0.1:9", "4", "3")
    assert env["KEEP"] == "x" and env["JAX_PLATFORMS"] == "cpu"
    assert base["XLA_FLAGS"].endswith("=8")  # the launcher's own environment is untouched


@pytest.mark.parametrize("argv,message", [
    (["--num_processes=2"], "goes after `--`"),
    (["--devices_per_process=2", "--", "rest"], "--num_processes=P (P >= 1) is required"),
    (["--num_processes=2", "--bogus", "--", "rest"], "unknown launcher argument(s) --bogus"),
    (["--num_processes=2", "--", "launch", "--num_processes=2"], "not another launch"),
])
def test_usage_errors(argv, message, capsys):
    assert launch.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_interrupt_reaches_every_process(tmp_path, sig):
    """Ctrl-C (or SIGTERM) on `rest_jax launch` is passed to each process; the launch exits 130 with one line.

    The launcher is held for 5 s after starting the processes (its "started" line), so the signal arrives before
    its wait loop: the handlers must already be in place then, or the launcher alone dies and orphans them."""
    script = tmp_path / "child.py"
    # Default Ctrl-C handling, as rest_jax.main sets it (a background job's children inherit SIGINT ignored).
    script.write_text("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
                      "print('ready', flush=True)\ntime.sleep(600)\n")
    code = ("import sys, time\nfrom rest_jax import launch\nsay = launch._say\n"
            "launch._say = lambda out, lock, m: (m.startswith('started') and time.sleep(5), say(out, lock, m))\n"
            f"sys.exit(launch.run([], 2, 1, program=[sys.executable, {str(script)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    while sum("ready" in line for line in lines) < 2:
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines)
    start = time.monotonic()
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, rest
    assert time.monotonic() - start < 30
    assert "[launch] interrupted; every process was passed the Ctrl-C." in rest
