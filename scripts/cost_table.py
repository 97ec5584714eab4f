"""Reward against cost for ReST, DPO-from-Grow and online RL over seeds (issue 15; ReST Sec. 5's comparison).

    python scripts/cost_table.py runs/demo_cost

Reads <dir>/s<seed>/<method>/report.json as scripts/cost_comparison.sh leaves them. Cost of a policy: the
reward-model calls that made its training data (ReST and DPO: every record of the Grow stores behind it,
references included; online: one per sample) and the seconds of the stages behind it (Grow, Improve steps up
to it, or the online iterations; BC, shared by all, and the test scoring not counted). Prints a markdown
table (mean ± 95% t-interval over seeds, Δ paired with the seed's BC) and writes
<dir>/plots/cost_vs_reward.png (test reward, greedy and sample mean, against calls and against seconds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np

from rest_jax import significance


def _read(path: pathlib.Path) -> dict:
    return json.loads(path.read_text())


def rest_points(run: pathlib.Path, rows: list[dict]) -> list[dict]:
    """One point per row after BC: cost up to that Improve step of a `rest` run."""
    stages = {s["name"]: s for s in _read(run / "report.json")["stages"]}
    points, seconds_before = [], 0.0
    for row in rows[1:]:
        stage = stages[row["name"]]
        g = int(re.search(r"G=(\d+)", row["name"]).group(1))
        grows = [run / f"grow_{k}" for k in range(1, g + 1)]
        calls = sum(_read(d / "store" / "metadata.json")["counts"]["records"] for d in grows)
        grow_seconds = sum(_read(d / "stage.json")["timing"]["total"] for d in grows)
        seconds_before += stage.get("seconds", float("nan"))
        points.append({"name": row["name"], "calls": calls, "seconds": grow_seconds + seconds_before, "row": row})
    return points


def online_points(run: pathlib.Path, rows: list[dict]) -> list[dict]:
    cost = _read(run / "report.json")["cost"]
    return [{"name": rows[1]["name"], "calls": cost["reward_calls"], "seconds": cost["wall_seconds"], "row": rows[1]}]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cost_dir", help="the directory of s<seed>/<method>/ runs (COST_DIR of the script)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.cost_dir)
    seeds = sorted((p for p in root.glob("s*") if re.fullmatch(r"s\d+", p.name)), key=lambda p: int(p.name[1:]))
    methods = [m for m in ("rest", "dpo", "grpo", "ppo") if any((s / m / "report.json").exists() for s in seeds)]
    if not methods:
        print(f"cost_table: no s<seed>/<method>/report.json in {root}", file=sys.stderr)
        return 2
    # {(method, row name): [(point, the seed's BC row), ...]}
    points: dict[tuple[str, str], list[tuple[dict, dict]]] = {}
    bc_rows = []
    for s in seeds:
        for m in methods:
            path = s / m / "report.json"
            if not path.exists():
                continue
            rows = _read(path)["rows"]
            if m == methods[0]:
                bc_rows.append(rows[0])
            found = online_points(s / m, rows) if "cost" in _read(path) else rest_points(s / m, rows)
            for p in found:
                points.setdefault((m, p["name"]), []).append((p, rows[0]))

    def cell(values: list[float], scale: float, signed: bool = False) -> str:
        mean, half = significance.seed_interval(values)
        return f"{mean * scale:{'+' if signed else ''}.1f}" + ("" if np.isnan(half) else f" ± {half * scale:.1f}")

    print(f"{len(seeds)} seeds ({', '.join(s.name for s in seeds)}) in {root}; test split; rewards 0-100; mean ± "
          "half-width of the 95% t-interval over seeds; Δ: paired with the same seed's BC.\n")
    print("| policy | seeds | reward calls | seconds | reward (greedy) | Δ reward | sample reward | Δ sample reward |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    if bc_rows:
        print(f"| BC | {len(bc_rows)} | 0 | 0 | {cell([r['reward'] for r in bc_rows], 100)} | - | "
              f"{cell([r['sample_reward'] for r in bc_rows], 100)} | - |")
    summary = []
    for (m, name), pairs in points.items():
        calls = [p["calls"] for p, _ in pairs]
        secs = [p["seconds"] for p, _ in pairs]
        greedy = [p["row"]["reward"] for p, _ in pairs]
        sample = [p["row"]["sample_reward"] for p, _ in pairs]
        d_greedy = [p["row"]["reward"] - b["reward"] for p, b in pairs]
        d_sample = [p["row"]["sample_reward"] - b["sample_reward"] for p, b in pairs]
        label = name if m in ("rest", "grpo", "ppo") else f"{m.upper()}: {name}"
        print(f"| {label} | {len(pairs)} | {np.mean(calls):,.0f} | {np.mean(secs):.0f} | {cell(greedy, 100)} | "
              f"{cell(d_greedy, 100, True)} | {cell(sample, 100)} | {cell(d_sample, 100, True)} |")
        summary.append((label, np.mean(calls), np.mean(secs), significance.seed_interval(greedy),
                        significance.seed_interval(sample)))
    _plot(summary, bc_rows, root / "plots" / "cost_vs_reward.png")
    print(f"\nplot: {root / 'plots' / 'cost_vs_reward.png'}")
    return 0


def _plot(summary: list, bc_rows: list[dict], path: pathlib.Path) -> None:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    for ax, index, unit in ((left, 1, "reward-model calls (training data)"), (right, 2, "seconds on this machine")):
        for label, *costs, (g_mean, g_half), (s_mean, s_half) in summary:
            x = costs[index - 1]
            line = ax.errorbar([x], [100 * g_mean], yerr=[0 if np.isnan(g_half) else 100 * g_half], fmt="o",
                               capsize=3, label=f"{label} (greedy)")
            ax.errorbar([x], [100 * s_mean], yerr=[0 if np.isnan(s_half) else 100 * s_half], fmt="s", capsize=3,
                        color=line[0].get_color(), alpha=0.5)
        if bc_rows:
            ax.axhline(100 * np.mean([r["reward"] for r in bc_rows]), color="grey", ls="--", lw=1)
            ax.axhline(100 * np.mean([r["sample_reward"] for r in bc_rows]), color="grey", ls=":", lw=1)
        ax.set_xlabel(unit)
        ax.set_ylabel("test reward (0-100): ● greedy, ■ sample mean")
    left.legend(fontsize=7, loc="lower right")
    fig.suptitle("Reward against cost (BC: grey lines, dashed greedy, dotted sample mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
