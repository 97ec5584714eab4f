"""The BC stage as a run does it vs its train step alone, at the same shape (issue 16, item 4).

    python benchmarks/bc_stage_benchmark.py                      # Multi30k De->En, 150 steps each
    python benchmarks/bc_stage_benchmark.py --gin_file=experiments/demo.gin --steps 100

Both parts parse the same experiment gin file (model, optimizer, loss, dropout, batch size, packing):

- **stage**: `rest_jax.train.train`, called as `rest`'s BC stage calls it (the run's SentencePiece vocabulary
  trained first, as `rest` does), for `--steps` steps without validation; its tokens/s are the run's own
  TensorBoard `tokens_per_sec` (target tokens with loss weight, the compiling step excluded), averaged over the
  log windows after the first (input pipeline warm-up). Everything a user's run does per step is in it:
  tokenising, shuffling and packing (tf.data), the host-to-device copy, the step, the metrics fetch, the hooks.
- **step**: the same jitted train step (built as `train()` builds it) on one batch of the same pipeline, kept on
  the device and repeated, the metrics fetched every step as the loop does: what the step benchmark measures.

stage / step is how close the real run comes to the benchmark (the issue asks for >= 0.85). Each part runs in
its own subprocess; `--repeats` alternates them and keeps the best of each (the machine is shared).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_gin(gin_files: list[str], bindings: list[str]) -> None:
    from rest_jax import configurables  # pylint: disable=import-outside-toplevel
    from rest_jax import gin_utils  # pylint: disable=import-outside-toplevel

    configurables.register()  # every command's configurables: experiment files bind several (e.g. `online`)
    gin_utils.parse(gin_files, [gin_utils.binding_from_flag(*b.split("=", 1)) for b in bindings])


def _run_settings() -> tuple[str, dict[str, int], int]:
    """The experiment's task, feature lengths and vocabulary size, as `run_rest` reads them."""
    from rest_jax import inspection  # pylint: disable=import-outside-toplevel

    return (inspection.run_rest_setting("task", None), inspection.feature_lengths(),
            int(inspection.run_rest_setting("vocab_size", None)))


def _scalars(events_dir: str, tag: str) -> list[tuple[int, float]]:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    out = []
    for path in sorted(glob.glob(os.path.join(events_dir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            out += [(event.step, v.simple_value) for v in event.summary.value if v.tag == tag]
    return sorted(out)


def worker_stage(gin_files: list[str], bindings: list[str], steps: int, log_period: int, work_dir: str) -> dict:
    from rest_jax import rest  # pylint: disable=import-outside-toplevel
    from rest_jax import train as train_lib  # pylint: disable=import-outside-toplevel

    _parse_gin(gin_files, [*bindings, f"train.num_steps={steps}", "train.eval_split=None",
                           f"train.checkpoint_period={steps}", f"train.log_period={log_period}"])
    task, lengths, vocab_size = _run_settings()
    rest.run_vocabulary(work_dir, task, None, vocab_size)  # as `rest` does before BC (kept for the step worker)
    bc_dir = os.path.join(work_dir, f"bc_{time.time_ns()}")
    t0 = time.perf_counter()
    train_lib.train(model_dir=bc_dir, task=task, feature_lengths=lengths, seed=0)
    wall = time.perf_counter() - t0
    windows = _scalars(os.path.join(bc_dir, "train"), "tokens_per_sec")
    steady = [v for _, v in windows[1:]] or [v for _, v in windows]
    return {"part": "stage", "tokens_per_s": float(np.mean(steady)), "windows": [round(v, 1) for _, v in windows],
            "wall_s": wall}


def worker_step(gin_files: list[str], bindings: list[str], steps: int, work_dir: str) -> dict:
    import jax  # pylint: disable=import-outside-toplevel

    from rest_jax import gin_utils, losses, optim, partitioning, trainer  # pylint: disable=import-outside-toplevel
    from rest_jax import rest  # pylint: disable=import-outside-toplevel
    from rest_jax import train as train_lib  # pylint: disable=import-outside-toplevel

    from rest_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    from rest_jax.model import t5  # pylint: disable=import-outside-toplevel

    _parse_gin(gin_files, bindings)
    task, lengths, vocab_size = _run_settings()
    rest.run_vocabulary(work_dir, task, None, vocab_size)
    # What `train()` builds, from the same gin.
    part = partitioning.Partitioner.create(None)
    model, optimizer = t5.build_model(), optim.create_optimizer()
    state, shardings = trainer.init_train_state(model, optimizer, jax.random.key(0), part.mesh, part.rules)
    step = trainer.make_train_step(optimizer, losses.make_loss_fn(model), mesh=part.mesh, rules=part.rules,
                                   state_shardings=shardings)
    host = next(pipeline.get_batches(task, "train", batch_size=gin_utils.bound_setting("train.batch_size", train_lib.train),
                                     feature_lengths=lengths, shuffle=True, seed=0, repeat=True,
                                     pack=gin_utils.bound_setting("train.pack", train_lib.train)))
    batch = partitioning.shard_batch(trainer.token_features(host), part.mesh, part.rules)
    for _ in range(2):  # compile, warm up
        state, metrics = step(state, batch)
        jax.device_get(metrics)
    times, tokens = [], 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = step(state, batch)
        tokens += float(jax.device_get(metrics)["num_tokens"])
        times.append(time.perf_counter() - t0)
    return {"part": "step", "tokens_per_s": tokens / sum(times), "median_step_s": float(np.median(times))}


def _run_worker(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=REPO, capture_output=True,
                          text=True, check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"worker {args[:2]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gin_file", action="append", default=None,
                        help="experiment gin file(s) (default experiments/multi30k_de_en.gin)")
    parser.add_argument("--gin", action="append", default=[], metavar="KEY=VALUE", help="extra gin bindings")
    parser.add_argument("--steps", type=int, default=150, help="train steps of the stage (and timed steps)")
    parser.add_argument("--log_period", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    gin_files = args.gin_file or ["experiments/multi30k_de_en.gin"]

    if args.worker is not None:
        os.chdir(REPO)
        result = (worker_stage(gin_files, args.gin, args.steps, args.log_period, args.work_dir)
                  if args.worker == "stage" else worker_step(gin_files, args.gin, args.steps, args.work_dir))
        print("RESULT " + json.dumps(result), flush=True)
        return

    import train_benchmark  # pylint: disable=import-outside-toplevel  (this script's folder)

    command = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    print(f"command: {command}\nmachine: {train_benchmark._machine()}\n"  # pylint: disable=protected-access
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    flags = [f"--gin_file={f}" for f in gin_files] + [f"--gin={b}" for b in args.gin] + [f"--steps={args.steps}"]
    runs: dict[str, list[dict]] = {"stage": [], "step": []}
    with tempfile.TemporaryDirectory() as work_dir:
        for _ in range(args.repeats):
            for part in runs:  # the stage first: it trains the vocabulary both use
                runs[part].append(_run_worker([f"--worker={part}", f"--work_dir={work_dir}",
                                               f"--log_period={args.log_period}", *flags]))
                print(f"  {part}: {runs[part][-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    stage, step = (max(runs[k], key=lambda r: r["tokens_per_s"]) for k in ("stage", "step"))
    ratio = stage["tokens_per_s"] / step["tokens_per_s"]
    print(f"\n{', '.join(gin_files)}, {args.steps} steps\n| part | target tokens/s | of the step's |\n|---|---:|---:|\n"
          f"| train step alone (one batch on the device) | {step['tokens_per_s']:.0f} | 100% |\n"
          f"| BC stage (`train()`: pipeline, copies, hooks) | {stage['tokens_per_s']:.0f} | {100 * ratio:.0f}% |")
    print(f"\nstage tokens/s per log window: {stage['windows']}; all runs: stage "
          f"{[round(r['tokens_per_s']) for r in runs['stage']]}, step {[round(r['tokens_per_s']) for r in runs['step']]}"
          f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "runs": runs, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    main()
