"""An Improve stage on a real run's Grow data, on rows of one example vs packed rows (issue 16, item 4).

    python benchmarks/improve_stage_benchmark.py RUN_DIR            # RUN_DIR: a finished `rest` run
    python benchmarks/improve_stage_benchmark.py runs/m30k_study/s1/half_new_norefs --steps 200 --repeats 2

Each part is the `improve` subcommand as a user types it, on the run's own settings (its config.gin: model,
optimizer, loss, batch size, feature lengths), the store of Grow step `--grow`, Improve index `--improve_index`,
from the run's BC checkpoint, at the run's feature lengths (`rest` passes them; `improve` has its own), for
`--steps` steps (validation on a few sentences every quarter):

- **rows**: `improve_step.pack = False` (the default: one Grow row per batch row, padded to the target length);
- **packed**: `improve_step.pack = True` (several Grow rows per batch row, as BC trains with `train.pack`).

Tokens/s are the stage's own TensorBoard `tokens_per_sec` (target tokens with loss weight), averaged over the
log windows after the first. A batch of either part has the same shape, so step times are alike and packed
rows get through the same data in fewer steps. Parts alternate over `--repeats` and the best of each is kept
(the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = {"rows": False, "packed": True}


def _setting(config: str, name: str) -> str:
    """A binding's value in a run's config.gin (as written there)."""
    found = re.search(rf"^{re.escape(name)} = (.+)$", config, re.M)
    if not found:
        raise ValueError(f"the run's config.gin binds no {name}")
    value = found.group(1).strip()
    return _setting(config, value[1:]) if value.startswith("%") else value  # a macro: its value


def command(run_dir: str, grow: int, improve_index: int, steps: int, pack: bool, out_dir: str) -> list[str]:
    """The `improve` subcommand of one part: the run's config.gin, its store and its BC checkpoint."""
    with open(os.path.join(run_dir, "config.gin")) as f:
        config = f.read()
    bc_run = _setting(config, "run_rest.bc_run").strip("'\"") if "run_rest.bc_run" in config else "None"
    bc_run = run_dir if bc_run == "None" else bc_run
    return [sys.executable, "-m", "rest_jax.main", "improve", f"--gin_file={os.path.join(run_dir, 'config.gin')}",
            f"--gin.MODEL_DIR='{out_dir}'", f"--gin.TASK={_setting(config, 'run_rest.task')}",
            f"--gin.GROW_STORE='{os.path.join(run_dir, f'grow_{grow}', 'store')}'",
            f"--gin.CHECKPOINT='{os.path.join(bc_run, 'bc', 'checkpoints')}'",
            f"--gin.VOCABULARY='{os.path.join(bc_run, 'vocab', 'sentencepiece.model')}'",
            f"--gin.IMPROVE_INDEX={improve_index}",
            "--gin.improve.num_validation_sources=32", f"--gin.improve_step.num_steps={steps}",
            f"--gin.improve_step.eval_period={max(1, steps // 4)}", f"--gin.improve_step.patience={steps}",
            f"--gin.improve_step.pack={pack}"]


def run_part(run_dir: str, grow: int, improve_index: int, steps: int, part: str, work_dir: str) -> dict:
    out_dir = os.path.join(work_dir, f"{part}_{time.time_ns()}")
    t0 = time.perf_counter()
    proc = subprocess.run(command(run_dir, grow, improve_index, steps, PARTS[part], out_dir), cwd=REPO,
                          capture_output=True, text=True, check=False, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"part {part} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    from bc_stage_benchmark import _scalars  # pylint: disable=import-outside-toplevel  (this script's folder)

    events = os.path.join(out_dir, "improve")  # the stage's MetricWriter(out_dir, "improve")
    windows, step_times = _scalars(events, "tokens_per_sec"), _scalars(events, "step_time_sec")
    if not windows or not step_times:
        raise RuntimeError(f"part {part} wrote no tokens_per_sec/step_time_sec under {out_dir}")

    def steady(values: list[tuple[int, float]]) -> float:  # the windows after the first (compile, warm-up)
        return float(np.mean([v for _, v in values[1:]] or [v for _, v in values]))

    return {"part": part, "tokens_per_s": steady(windows), "windows": [round(v, 1) for _, v in windows],
            "steps_per_s": 1.0 / steady(step_times), "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished `rest` run (config.gin, grow_<g>/store, its BC run)")
    parser.add_argument("--grow", type=int, default=1, help="which Grow step's store")
    parser.add_argument("--improve_index", type=int, default=0, help="filter index (0 keeps all rows)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import train_benchmark  # pylint: disable=import-outside-toplevel  (this script's folder)

    run_dir = os.path.abspath(args.run_dir)
    cmd = "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:])
    print(f"command: {cmd}\nmachine: {train_benchmark._machine()}\n"  # pylint: disable=protected-access
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    runs: dict[str, list[dict]] = {part: [] for part in PARTS}
    with tempfile.TemporaryDirectory() as work_dir:
        for _ in range(args.repeats):
            for part in runs:
                runs[part].append(run_part(run_dir, args.grow, args.improve_index, args.steps, part, work_dir))
                r = runs[part][-1]
                print(f"  {part}: {r['tokens_per_s']:.0f} tokens/s, {r['steps_per_s']:.2f} steps/s", flush=True)
    best = {part: max(rs, key=lambda r: r["tokens_per_s"]) for part, rs in runs.items()}
    rows, packed = best["rows"], best["packed"]
    print(f"\n{args.run_dir}, Grow {args.grow}, Improve index {args.improve_index}, {args.steps} steps\n"
          "| Improve batches | target tokens/s | steps/s | target tokens/step |\n|---|---:|---:|---:|")
    for part, r in best.items():
        print(f"| {part} | {r['tokens_per_s']:.0f} | {r['steps_per_s']:.2f} | "
              f"{r['tokens_per_s'] / r['steps_per_s']:.0f} |")
    print(f"\npacked / rows: {packed['tokens_per_s'] / rows['tokens_per_s']:.2f}x target tokens/s; all runs: "
          + "; ".join(f"{p} {[round(r['tokens_per_s']) for r in rs]}" for p, rs in runs.items())
          + f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
