"""Reward against cost for ReST, DPO-from-Grow and online RL over seeds (issue 15; ReST Sec. 5's comparison).

    python scripts/cost_table.py runs/demo_cost
    python scripts/cost_table.py runs/m30k_cost --compare "GRPO (156 it.)" "ReST G=1 I=1" \
        --references ../shared/data/multi30k/test_2016_flickr.en

Reads <dir>/s<seed>/<method>/report.json as scripts/cost_comparison.sh leaves them. Cost of a policy: the
reward-model calls that made its training data (ReST and DPO: every record of the Grow stores behind it,
references included; online: one per sample) and the seconds of the stages behind it (Grow, Improve steps up
to it, or the online iterations; BC, shared by all, and the test scoring not counted). Prints markdown: the
table over seeds (mean ± 95% t-interval, Δ paired with the seed's BC), then each seed's policies against its BC
(the paired bootstrap over the test sentences from the reports, BLEU and TER beside the reward, and the words
per translation: the reward-hacking and length monitors); `--compare POLICY BASELINE` adds, per seed, one
policy against another over the same test sentences (the reports' split references, the first n as scored).
Writes <dir>/plots/cost_vs_reward.png (test reward, greedy and sample mean, against calls and against seconds).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import numpy as np

from rest_jax.io import console

with console.quiet_native_stderr():  # TensorFlow's start-up lines (oneDNN, cuda probes)
    from rest_jax import evaluate
    from rest_jax import report
    from rest_jax import rewards as rewards_lib
    from rest_jax import significance
    console.start_tensorflow()


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


def _label(method: str, name: str) -> str:
    return name if method in ("rest", "grpo", "ppo") else f"{method.upper()}: {name}"


def _translations(run_report: dict, row: dict) -> pathlib.Path:
    """The file of the row's greedy translations of the report's split (recorded in its stage)."""
    stage = next(s for s in run_report["stages"] if s["name"] == row["name"])
    return pathlib.Path(stage["scores"][run_report["split"]]["translations"])


def _lines(path: pathlib.Path) -> list[str]:
    if not path.exists():
        raise SystemExit(f"cost_table: {path} is missing.")
    lines = path.read_text().split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _words(path: pathlib.Path) -> float:
    return float(np.mean([len(line.split()) for line in _lines(path)]))


def per_seed_table(points: dict, bc: dict) -> str:
    """Each policy of each seed against that seed's BC: the paired bootstrap over the test sentences that its
    report holds (`vs_bc`), and the mean length of its translations (chrF rewards recall: a length monitor)."""
    lines = ["| policy | seed | reward calls | reward (greedy) | Δ reward vs BC | sample reward | Δ BLEU vs BC | "
             "Δ TER vs BC (lower is better) | words per translation |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for seed, (row, path) in bc.items():
        lines.append(f"| BC | {seed} | 0 | {report.fmt(row['reward'], 100)} | - | "
                     f"{report.fmt(row.get('sample_reward'), 100)} | - | - | {_words(path):.1f} |")
    for label, entries in points.items():
        for p in entries:
            row, vs = p["row"], p["row"].get("vs_bc") or {}
            lines.append(f"| {label} | {p['seed']} | {p['calls']:,} | {report.fmt(row['reward'], 100)} | "
                         f"{report.format_delta(vs.get('reward'), 100)} | {report.fmt(row.get('sample_reward'), 100)} | "
                         f"{report.format_delta(vs.get('bleu'))} | {report.format_delta(vs.get('ter'))} | "
                         f"{_words(p['translations']):.1f} |")
    return "\n".join(lines) + "\n"


def compare_table(points: dict, label: str, baseline: str, references: list[str], sources: list[str] | None,
                  reward_name: str) -> str:
    """`label` − `baseline`, per seed that ran both, by the paired bootstrap over the test sentences."""
    reward = rewards_lib.get(reward_name)
    if not reward.needs_reference and sources is None:  # a quality-estimation reward reads the source
        raise SystemExit(f"cost_table: the {reward_name} reward reads the source: give --sources.")
    for name in (label, baseline):
        if name not in points:
            raise SystemExit(f"cost_table: no policy '{name}'; the table's policies: {', '.join(points)}")
    lines = [f"| {label} − {baseline} | seed | Δ reward [95% CI] | Δ BLEU [95% CI] | Δ TER [95% CI] |",
             "| --- | ---: | ---: | ---: | ---: |"]
    base = {p["seed"]: p for p in points[baseline]}
    for p in points[label]:
        if p["seed"] not in base:
            continue
        hyps_b, hyps = _lines(base[p["seed"]]["translations"]), _lines(p["translations"])
        n = len(hyps)
        if len(hyps_b) != n or n > len(references):
            raise SystemExit(f"cost_table: {n} and {len(hyps_b)} translations, {len(references)} references.")
        srcs = sources[:n] if sources is not None else [""] * n
        diffs = evaluate.compare_translations(hyps_b, hyps, srcs, references[:n], reward,
                                              seed=int(p["seed"][1:]))
        cells = [report.format_delta(diffs[m].as_dict(), scale) for m, scale in (("reward", 100), ("bleu", 1),
                                                                                  ("ter", 1))]
        lines.append(f"| | {p['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cost_dir", help="the directory of s<seed>/<method>/ runs (COST_DIR of the script)")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("POLICY", "BASELINE"), default=[],
                        help="print POLICY − BASELINE (two policies of the table) per seed, by the paired "
                        "bootstrap over the test sentences; needs --references (repeatable)")
    parser.add_argument("--references", help="the reports' split references, one per line")
    parser.add_argument("--sources", help="its sources, one per line (for rewards that read the source)")
    args = parser.parse_args(argv)
    if args.compare and not args.references:
        parser.error("--compare needs --references")
    root = pathlib.Path(args.cost_dir)
    seeds = sorted((p for p in root.glob("s*") if re.fullmatch(r"s\d+", p.name)), key=lambda p: int(p.name[1:]))
    methods = [m for m in ("rest", "dpo", "grpo", "ppo") if any((s / m / "report.json").exists() for s in seeds)]
    if not methods:
        print(f"cost_table: no s<seed>/<method>/report.json in {root}", file=sys.stderr)
        return 2
    # {policy label: [point, with its seed, its seed's BC row and its translations file, ...]}
    points: dict[str, list[dict]] = {}
    bc: dict[str, tuple[dict, pathlib.Path]] = {}  # {seed: (BC row, its translations)}
    reward_names = set()
    for s in seeds:
        for m in methods:
            path = s / m / "report.json"
            if not path.exists():
                continue
            run_report = _read(path)
            rows = run_report["rows"]
            reward_names.add(run_report["reward"])
            bc.setdefault(s.name, (rows[0], _translations(run_report, rows[0])))
            found = online_points(s / m, rows) if "cost" in run_report else rest_points(s / m, rows)
            for p in found:
                points.setdefault(_label(m, p["name"]), []).append(
                    dict(p, seed=s.name, bc=rows[0], translations=_translations(run_report, p["row"])))

    def cell(values: list[float], scale: float, signed: bool = False) -> str:
        mean, half = significance.seed_interval(values)
        return f"{mean * scale:{'+' if signed else ''}.1f}" + ("" if np.isnan(half) else f" ± {half * scale:.1f}")

    print(f"{len(seeds)} seeds ({', '.join(s.name for s in seeds)}) in {root}; test split; rewards 0-100; mean ± "
          "half-width of the 95% t-interval over seeds; Δ: paired with the same seed's BC.\n")
    print("| policy | seeds | reward calls | seconds | reward (greedy) | Δ reward | sample reward | Δ sample reward |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    bc_rows = [row for row, _ in bc.values()]
    print(f"| BC | {len(bc_rows)} | 0 | 0 | {cell([r['reward'] for r in bc_rows], 100)} | - | "
          f"{cell([r['sample_reward'] for r in bc_rows], 100)} | - |")
    summary = []
    for label, entries in points.items():
        calls = [p["calls"] for p in entries]
        secs = [p["seconds"] for p in entries]
        greedy = [p["row"]["reward"] for p in entries]
        sample = [p["row"]["sample_reward"] for p in entries]
        d_greedy = [p["row"]["reward"] - p["bc"]["reward"] for p in entries]
        d_sample = [p["row"]["sample_reward"] - p["bc"]["sample_reward"] for p in entries]
        print(f"| {label} | {len(entries)} | {np.mean(calls):,.0f} | {np.mean(secs):.0f} | {cell(greedy, 100)} | "
              f"{cell(d_greedy, 100, True)} | {cell(sample, 100)} | {cell(d_sample, 100, True)} |")
        summary.append((label, np.mean(calls), np.mean(secs), significance.seed_interval(greedy),
                        significance.seed_interval(sample)))
    print("\nPer seed, against the seed's BC: paired bootstrap over the test sentences (95% interval; * p < 0.05):\n")
    print(per_seed_table(points, bc))
    if args.compare:
        if len(reward_names) != 1:
            raise SystemExit(f"cost_table: the reports use different rewards: {sorted(reward_names)}")
        (reward_name,) = reward_names
        references = _lines(pathlib.Path(args.references))
        sources = _lines(pathlib.Path(args.sources)) if args.sources else None
        for label, baseline in args.compare:
            print(f"{label} against {baseline}, same seed, same test sentences (paired bootstrap; * p < 0.05):\n")
            print(compare_table(points, label, baseline, references, sources, reward_name))
    _plot(summary, bc_rows, root / "plots" / "cost_vs_reward.png")
    print(f"\nplot: {root / 'plots' / 'cost_vs_reward.png'}")
    return 0


def _plot(summary: list, bc_rows: list[dict], path: pathlib.Path) -> None:
    """Greedy and sample-mean reward of each policy against its reward-model calls and its seconds; policies at
    the same cost are spread sideways (by 1.2% of the axis each) so that none hides another."""
    from matplotlib import colormaps  # pylint: disable=import-outside-toplevel
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=(13, 4.5))
    left, right = fig.subplots(1, 2)
    colors = colormaps["tab20"]
    for ax, index, unit in ((left, 1, "reward-model calls (training data)"), (right, 2, "seconds on this machine")):
        xs = [row[index] for row in summary]
        width = 0.012 * (max(xs) - min(xs) or max(max(xs), 1))
        for k, (label, *_, (g_mean, g_half), (s_mean, s_half)) in enumerate(summary):
            same = [j for j, x in enumerate(xs) if x == xs[k]]
            x = xs[k] + (same.index(k) - (len(same) - 1) / 2) * width
            color = colors(k % colors.N)
            ax.errorbar([x], [100 * g_mean], yerr=[0 if np.isnan(g_half) else 100 * g_half], fmt="o",
                        capsize=3, color=color, label=label)
            ax.errorbar([x], [100 * s_mean], yerr=[0 if np.isnan(s_half) else 100 * s_half], fmt="s", capsize=3,
                        color=color, alpha=0.5)
        if bc_rows:
            ax.axhline(100 * np.mean([r["reward"] for r in bc_rows]), color="grey", ls="--", lw=1)
            ax.axhline(100 * np.mean([r["sample_reward"] for r in bc_rows]), color="grey", ls=":", lw=1)
        ax.set_xlabel(unit)
        ax.set_ylabel("test reward (0-100): ● greedy, ■ sample mean")
    fig.legend(*left.get_legend_handles_labels(), fontsize=7, loc="center right")
    fig.suptitle("Reward against cost, mean ± 95% interval over seeds (BC: grey, dashed greedy, dotted sample mean)")
    fig.tight_layout(rect=(0, 0, 0.83, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
