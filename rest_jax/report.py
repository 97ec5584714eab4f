"""Run-directory bookkeeping for the ReST loop: finished-stage markers, report table and plots.

A stage (BC, a Grow step, an Improve step) is finished when its `stage.json` exists; it is written
atomically last, so a killed run is resumed by rerunning the same command (ReST's stages communicate only
through files, see ARCHITECTURE.md).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

from etils import epath

STAGE_FILE = "stage.json"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` through a temporary name and a rename, so readers never see half a file."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        tmp.write_text(text)
        tmp.replace(path)  # rename() refuses to overwrite; a rerun rewrites its outputs
    except BaseException:
        # The old file (if any) is untouched; do not leave a half-written temporary behind (e.g. disk full).
        if tmp.exists():
            tmp.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def read_json(path: str | os.PathLike) -> Any:
    """Parses a JSON file; an unparsable one (copied partly or damaged: our writes are atomic) names itself."""
    text = epath.Path(path).read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): the file is truncated or damaged. Delete it and "
                         "rerun the same command to redo what wrote it (finished BC checkpoints and Grow "
                         "shards are reused).") from e


def stage_result(stage_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The recorded result of a finished stage, or None if it has not finished."""
    path = epath.Path(stage_dir) / STAGE_FILE
    return read_json(path) if path.exists() else None


def finish_stage(stage_dir: str | os.PathLike, result: Mapping[str, Any]) -> dict[str, Any]:
    result = dict(result)
    write_json(epath.Path(stage_dir) / STAGE_FILE, result)
    return result


def _fmt(x: Any, scale: float = 1.0, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x * scale:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _fmt_delta(diff: Mapping[str, Any] | None, scale: float = 1.0) -> str:
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
            f"| {r['name']}{flag} | {_fmt(r.get('reward'), 100.0)} | {_fmt_delta(vs.get('reward'), 100.0)} | "
            f"{_fmt(r.get('sample_reward'), 100.0)} | {_fmt(r.get('bleu'))} | {_fmt_delta(vs.get('bleu'))} | "
            f"{_fmt(r.get('chrf'))} | {_fmt(r.get('ter'))} | {_fmt(r.get('kept_fraction'), digits=3)} | "
            f"{_fmt(r.get('threshold'), digits=2)} |")
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


def plot_validation_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: str | os.PathLike) -> None:
    """Validation reward against training step, one line per Improve step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    offset = 0
    for name, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points)
        ax.plot([offset + s for s in steps], [100 * v for v in values], marker="o", label=name)
        offset += max(steps)
    ax.set_xlabel("training step (Improve steps laid end to end)")
    ax.set_ylabel("validation reward (0-100)")
    ax.set_title("Validation reward during Improve")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


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
    import matplotlib.pyplot as plt

    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}{path.suffix}"
    with tmp.open("wb") as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    tmp.replace(path)
