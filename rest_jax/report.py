"""Run-directory bookkeeping for the ReST loop: finished-stage markers, report table and plots.

A stage (BC, a Grow step, an Improve step) is finished when its `stage.json` exists; it is written
atomically last, so a killed run is resumed by rerunning the same command (ReST's stages communicate only
through files, see ARCHITECTURE.md). Paths under the stage's own directory (its checkpoint, translations,
Grow store) are read back under the directory the stage is read from, not as written: a run whose MODEL_DIR
was relative may be resumed from another working directory, and a run copied elsewhere (gs:// to a
workstation) must not go on reading the original.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from rest_jax.io import atomic

STAGE_FILE = "stage.json"


STAGE_DIR_KEY = "stage_dir"  # where finish_stage wrote the stage, so that stage_result can relocate its paths


def stage_result(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded result of a finished stage, or None if it has not finished.

    Every path it recorded under its own directory is returned under `stage_dir` as given now. A stage.json
    written before the directory was recorded gets it from its checkpoint (`<stage_dir>/checkpoints`).
    """
    path = epath.Path(stage_dir) / STAGE_FILE
    if not path.exists():
        return None
    result = atomic.read_json(path)
    recorded = result.get(STAGE_DIR_KEY)
    checkpoint = result.get("checkpoint")
    if recorded is None and isinstance(checkpoint, str) and os.path.basename(checkpoint) == "checkpoints":
        recorded = os.path.dirname(checkpoint)
    if recorded is None:
        return result
    recorded, here = recorded.rstrip("/"), os.fspath(stage_dir).rstrip("/")

    def relocated(value: Any) -> Any:
        if isinstance(value, str) and (value == recorded or value.startswith(recorded + "/")):
            return here + value[len(recorded):]
        if isinstance(value, dict):
            return {k: relocated(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relocated(v) for v in value]
        return value

    return relocated(result)


def finish_stage(stage_dir: str | os.PathLike, result: Mapping[str, Any]) -> dict[str, Any]:
    """Marks the stage finished with `result` (and its directory, see `stage_result`); returns the result."""
    result = dict(result, **{STAGE_DIR_KEY: os.fspath(stage_dir)})
    atomic.write_json(epath.Path(stage_dir) / STAGE_FILE, result)
    return result


def fmt(x: Any, scale: float = 1.0, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * scale:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def format_delta(diff: Mapping[str, Any] | None, scale: float = 1.0) -> str:
    """'+0.8 [+0.2, +1.4]*' for a `significance.Difference.as_dict()` (* when p < 0.05)."""
    if not diff:
        return "-"
    star = "*" if diff["significant"] else ""
    return (f"{diff['delta'] * scale:+.1f} [{diff['ci_low'] * scale:+.1f}, {diff['ci_high'] * scale:+.1f}]"
            f"{star}")


def markdown_table(rows: Sequence[Mapping[str, Any]], split: str) -> str:
    """The paper's table (Gulcehre et al. 2023, Table 1 style): one row per policy, rewards on 0-100.

    Greedy reward with its paired-bootstrap difference to BC (95% interval, * when p < 0.05), the mean reward
    of samples (Table 1's measure), and the corpus metrics; a row's `held_out_drops` are flagged.
    """
    lines = [
        f"| run | {split} reward (greedy) | Δ reward vs BC [95% CI] | sample reward | BLEU | Δ BLEU vs BC | chrF | "
        "TER | kept fraction | threshold |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        vs = r.get("vs_bc") or {}
        flag = " ⚠" if r.get("held_out_drops") else ""
        lines.append(
            f"| {r['name']}{flag} | {fmt(r.get('reward'), 100.0)} | {format_delta(vs.get('reward'), 100.0)} | "
            f"{fmt(r.get('sample_reward'), 100.0)} | {fmt(r.get('bleu'))} | {format_delta(vs.get('bleu'))} | "
            f"{fmt(r.get('chrf'))} | {fmt(r.get('ter'))} | {fmt(r.get('kept_fraction'), digits=3)} | "
            f"{fmt(r.get('threshold'), digits=2)} |")
    return "\n".join(lines) + "\n"


def significance_notes(rows: Sequence[Mapping[str, Any]], reward_name: str) -> str:
    """What report.md says under the table: which differences to BC are significant, and held-out drops."""
    better, worse, flat, drops = [], [], [], []
    for r in rows:
        diff = (r.get("vs_bc") or {}).get("reward")
        if diff is None:
            continue
        (better if diff["significant"] and diff["delta"] > 0 else worse if diff["significant"] else flat).append(
            r["name"])
        if r.get("held_out_drops"):
            drops.append(f"{r['name']} ({', '.join(r['held_out_drops'])})")
    lines = ["Differences to BC: paired bootstrap over the test sentences (1,000 resamples, one seed: the "
             "interval covers the test set's sampling, not training noise; runs over several seeds are summarised "
             "by `scripts/study_table.py`)."]
    lines.append(f"- reward significantly higher than BC (p < 0.05): {', '.join(better) or 'none'}")
    lines.append(f"- significantly lower: {', '.join(worse) or 'none'}; not significant: {', '.join(flat) or 'none'}")
    lines.append(f"- held-out metrics (not the {reward_name} reward) significantly worse than BC, the reward-hacking "
                 f"monitor: {'; '.join(drops) or 'none'}")
    return "\n".join(lines) + "\n"


def plot_reward_distributions(rewards_per_grow: Mapping[str, Sequence[float]], thresholds: Mapping[str, float],
                              path: str | os.PathLike) -> None:
    """Histogram of Grow rewards per Grow step, with the Improve thresholds drawn as vertical lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rewards in rewards_per_grow.items():
        ax.hist(list(rewards), bins=40, range=(0, 1), alpha=0.5, label=name, density=True)
    for name, tau in thresholds.items():
        ax.axvline(tau, linestyle="--", linewidth=0.8, color="k")
        ax.text(tau, ax.get_ylim()[1] * 0.95, name, rotation=90, fontsize=7, va="top")
    ax.set_xlabel("reward R(x, y)")
    ax.set_ylabel("density")
    ax.set_title("Grow reward distribution (dashed: Improve thresholds)")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def figure(ax: Any = None, size: tuple[float, float] = (6, 4)) -> tuple[Any, Any]:
    """(Figure, Axes): `ax`'s, or a new matplotlib.figure.Figure (no pyplot state: any backend, notebooks)."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

    fig = Figure(figsize=size)
    return fig, fig.add_subplot()


def validation_curves(curves: Mapping[str, Sequence[tuple[int, float]]], baseline: float | None = None,
                           ax: Any = None) -> Any:
    """Validation reward (0-100) against training step, Improve steps laid end to end; returns the Figure.

    Each Improve step starts at its own step 0 (the policy it warm-starts from); the best point of each,
    the checkpoint it keeps (ReST Sec. 3), is circled. `baseline` (e.g. the BC policy's validation reward)
    is drawn as a dotted horizontal line.
    """
    fig, ax = figure(ax, (6, 3.5))
    offset = 0
    for name, points in curves.items():
        if not points:
            continue
        steps = np.array([p[0] for p in points]) + offset
        values = 100.0 * np.array([p[1] for p in points])
        line, = ax.plot(steps, values, marker=".", label=name)
        best = int(np.argmax(values))
        ax.plot(steps[best], values[best], "o", markersize=10, markerfacecolor="none", color=line.get_color())
        offset = int(steps.max())
    if baseline is not None:
        ax.axhline(100.0 * baseline, linestyle=":", color="gray", label="BC")
    ax.set_xlabel("training step (Improve steps laid end to end)")
    ax.set_ylabel("validation reward (0-100)")
    ax.set_title("Validation reward during Improve (circle: kept checkpoint)")
    if curves or baseline is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_validation_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike,
                           baseline: float | None = None) -> None:
    """Writes `validation_curves` to `path`."""
    _save(validation_curves(curves, baseline), path)


def plot_best_of_n(table: Sequence[Mapping[str, float]], path: str | os.PathLike) -> None:
    """Reward of the best-of-N candidate against N (log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    by_policy: dict[str, list[tuple[int, float]]] = {}
    for row in table:
        by_policy.setdefault(row["policy"], []).append((row["n"], row["reward"]))
    for name, pts in by_policy.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples per source)")
    ax.set_ylabel("reward of best of N (0-100)")
    ax.set_title("Best-of-N, reranked by the reward (oracle when it reads the reference)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def _save(fig: Any, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    buf = io.BytesIO()
    suffix = os.path.splitext(os.fspath(path))[1].lstrip(".")
    fig.savefig(buf, format=suffix or "png", dpi=120)
    plt.close(fig)
    atomic.write_bytes(path, buf.getvalue())