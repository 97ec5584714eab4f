"""Local multi-process runs: `rest_jax launch --num_processes=P --devices_per_process=K -- SUBCOMMAND ...`.

A TPU pod runs one JAX process per host, every host the same command (scripts/tpu/launch.sh). This
launcher gives the same shape on one machine: P processes of `rest_jax SUBCOMMAND ...` on the CPU, each
with K simulated devices (`--xla_force_host_platform_device_count`), joined by `jax.distributed` through
a coordinator on a free 127.0.0.1 port, with real cross-process collectives (gloo). The processes learn
their place from REST_JAX_COORDINATOR / REST_JAX_NUM_PROCESSES / REST_JAX_PROCESS_ID, which
`rest_jax.partitioning.initialize_multihost` reads; on a pod jax's own cluster detection takes that role,
and the rest of the code path is the same.

Each line a process prints comes out prefixed with its index (`[1] ...`). When one process fails, the
others get `grace_s` seconds to notice (a collective error or jax.distributed's heartbeat) and are then
stopped (Ctrl-C, then SIGKILL after 10 s); the launcher exits with the failing process's status and says
which one it was. Ctrl-C (or SIGTERM) on the launcher is passed on to every process as a Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence

from rest_jax.io import console
from rest_jax.partitioning import COORDINATOR_ENV, NUM_PROCESSES_ENV, PROCESS_ID_ENV

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

USAGE = """\
usage: rest_jax launch --num_processes=P [--devices_per_process=K] [--port=N] [--grace_s=S]
                       -- SUBCOMMAND [rest_jax flags...]

Starts P processes of `rest_jax SUBCOMMAND ...` on this machine's CPU as one multi-process JAX job
(the local stand-in for a TPU pod: one process per host), each with K devices, coordinated through
127.0.0.1. Output lines are prefixed with the process index; when one process fails the others are
stopped after --grace_s seconds (default 30) and the launcher exits with the failing status.

example:
  rest_jax launch --num_processes=2 --devices_per_process=4 -- rest --gin_file=experiments/demo.gin \\
      --gin.MODEL_DIR="'runs/demo_2x4'"
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(base: dict[str, str], *, coordinator: str, num_processes: int, process_id: int,
              devices_per_process: int | None) -> dict[str, str]:
    """The environment of process `process_id`: where the coordinator is, who it is, its devices."""
    env = dict(base)
    env[COORDINATOR_ENV] = coordinator
    env[NUM_PROCESSES_ENV] = str(num_processes)
    env[PROCESS_ID_ENV] = str(process_id)
    env["JAX_PLATFORMS"] = "cpu"  # the local stand-in: processes share one machine, not its accelerator
    if devices_per_process is not None:
        flags = re.sub(rf"{_DEVICE_COUNT_FLAG}=\S*", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
    env["PYTHONUNBUFFERED"] = "1"  # lines reach the prefixer as they are printed
    return env


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    if "--" in argv:
        split = argv.index("--")
        own, command = argv[:split], argv[split + 1:]
    else:
        own, command = argv, []
    parser = argparse.ArgumentParser(prog="rest_jax launch", add_help=False)
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--devices_per_process", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--grace_s", type=float, default=30.0)
    parser.add_argument("-h", "--help", action="store_true")
    args, unknown = parser.parse_known_args(own)
    if unknown:
        raise ValueError(f"unknown launcher argument(s) {' '.join(unknown)}; the rest_jax command goes "
                         "after `--`.")
    return args, command


# gloo's native start-up note, once per device and process ("[Gloo] Rank 3 is connected to 7 peer ranks...");
# threads of one process write them concurrently, so a line may hold pieces of two.
_NOISE = re.compile(r"\[Gloo\] Rank|Expected number of connected peer ranks")


def _status_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _pump(stream, index: int, out, lock: threading.Lock, verbose: bool) -> None:
    """Copies one process's output line by line to `out`, each line prefixed with `[index] `."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        # Progress bars redraw with carriage returns: keep the last state of the line.
        line = line.rsplit("\r", 1)[-1]
        if not verbose and _NOISE.search(line):
            continue
        with lock:
            out.write(f"[{index}] {line}\n")
            out.flush()
    stream.close()


def _stop(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass


def run(command: Sequence[str], num_processes: int, devices_per_process: int | None = None,
        port: int | None = None, grace_s: float = 30.0, out=None, program: Sequence[str] | None = None) -> int:
    """Runs `rest_jax *command` as `num_processes` coordinated processes; returns the launch's exit status.

    Status: 0 when every process succeeded, else the status of the first process that failed.
    `program` replaces `python -m rest_jax.main` (tests launch small scripts with it).
    """
    out = out or sys.stdout
    program = list(program or [sys.executable, "-m", "rest_jax.main"])
    verbose = "--verbose" in command or console.verbose_from_env()
    coordinator = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    failed: tuple[int, int] | None = None  # (process index, status)
    deadline = None
    # The handlers go in before the first process starts: a Ctrl-C or SIGTERM that arrived between the start and
    # the wait loop would otherwise kill the launcher alone and orphan the processes (own sessions).
    with _interrupt_flag() as interrupted:
        for i in range(num_processes):
            if interrupted.is_set():
                break
            env = child_env(os.environ, coordinator=coordinator, num_processes=num_processes, process_id=i,
                            devices_per_process=devices_per_process)
            proc = subprocess.Popen([*program, *command], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)  # Ctrl-C reaches them through us, once
            procs.append(proc)
            thread = threading.Thread(target=_pump, args=(proc.stdout, i, out, lock, verbose), daemon=True)
            thread.start()
            pumps.append(thread)
        _say(out, lock, f"started {num_processes} process(es) of `rest_jax {' '.join(command)}`"
                        f"{f' with {devices_per_process} device(s) each' if devices_per_process else ''}; "
                        f"coordinator {coordinator}.")
        while any(p.poll() is None for p in procs):
            if interrupted.is_set():
                _stop(procs, signal.SIGINT)
                _wait_or_kill(procs, 30.0)
                for thread in pumps:
                    thread.join(timeout=5)
                _say(out, lock, "interrupted; every process was passed the Ctrl-C.")
                return EXIT_INTERRUPTED
            if failed is None:
                for i, proc in enumerate(procs):
                    code = proc.poll()
                    if code not in (None, 0):
                        failed = (i, code)
                        deadline = time.monotonic() + grace_s
                        _say(out, lock, f"process {i} {_status_text(code)}; stopping the others in "
                                        f"{grace_s:g} s unless they finish first.")
                        break
            elif time.monotonic() > deadline:
                _say(out, lock, f"stopping the processes still running after process {failed[0]} failed.")
                # SIGINT, not SIGTERM: jax.distributed takes SIGTERM as a preemption notice and carries on,
                # while rest_jax stops on a Ctrl-C at once, keeping what it saved.
                _stop(procs, signal.SIGINT)
                _wait_or_kill(procs, 10.0)
            interrupted.wait(0.1)
    for thread in pumps:
        thread.join(timeout=5)
    if failed is None:
        failed = next(((i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
        _say(out, lock, f"failed: process {failed[0]} of {num_processes} {_status_text(failed[1])}.")
        return failed[1] if failed[1] > 0 else 1
    _say(out, lock, f"all {num_processes} processes finished.")
    return 0


def _wait_or_kill(procs: Sequence[subprocess.Popen], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _say(out, lock: threading.Lock, message: str) -> None:
    with lock:
        out.write(f"[launch] {message}\n")
        out.flush()


@contextlib.contextmanager
def _interrupt_flag() -> Iterator[threading.Event]:
    """An event set by Ctrl-C or SIGTERM while the launcher waits (restoring the old handlers after).

    A flag, not KeyboardInterrupt: an exception raised at an arbitrary point of `Popen.poll` can leave the
    Popen's internal lock held, and the wait that follows would hang. SIGTERM counts as a Ctrl-C: the
    processes run in sessions of their own, so a launcher stopped without passing it on would orphan them.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event  # signal handlers can only be set from the main thread
        return
    handler = lambda signum, frame: event.set()  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def main(argv: Sequence[str]) -> int:
    """`rest_jax launch ...`; returns the exit status (usage errors: 2)."""
    try:
        args, command = _parse(argv)
    except ValueError as e:
        print(f"rest_jax launch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.help:
        print(USAGE)
        return 0
    problems = []
    if args.num_processes is None or args.num_processes < 1:
        problems.append("--num_processes=P (P >= 1) is required")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        problems.append("--devices_per_process must be >= 1")
    if not command:
        problems.append("the rest_jax command to run goes after `--`, e.g. `-- rest --gin_file=...`")
    elif command[0] == "launch":
        problems.append("the command after `--` is a rest_jax subcommand, not another launch")
    if problems:
        print(f"rest_jax launch: error: {'; '.join(problems)}.\n\n{USAGE}", file=sys.stderr)
        return EXIT_USAGE
    return run(command, args.num_processes, args.devices_per_process, args.port, args.grace_s)
