"""Helpers for inspecting a ReST run directory (notebooks/inspect_checkpoint.ipynb calls these).

A run of `python -m rest_jax.main rest` (ReST, Gulcehre et al. 2023, arXiv 2308.08998, Alg. 1) leaves one
directory per stage (layout: `rest_jax.rest`): `bc/` (the behaviour-cloned policy), `grow_<g>/store` (the
Grow dataset D_g with a reward per sample, Sec. 3 "Grow") and `grow_<g>/improve_<i>/` (the policy after
Improve step i on D_g filtered at threshold τ_i, Sec. 3 "Improve"), each finished when its `stage.json`
exists. This module reads those files; nothing here writes to a run except `make_tiny_run`.

    stages = list_stages(run_dir)                    # Stage(key='grow_1/improve_1', name='ReST G=1 I=1', ...)
    load_run_config(run_dir)                         # the run's gin config (model architecture, task, ...)
    policy = load_stage_policy(run_dir, "final")     # 'bc', 'final', 'grow_1/improve_0', 'ReST G=1 I=0', ...
    translate(policy, ["the dog sleeps ."])
    below, above = rows_near_threshold(grow_data(run_dir, 1), 0.7)
    compare_outputs(run_dir, ["bc", "final"], split="validation", n=5)

Paths may be local or `gs://` (etils.epath). Absolute paths recorded in stage.json are not trusted: a run
directory may have been copied elsewhere, so stages and checkpoints are found relative to `run_dir`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import subprocess
import sys
from typing import Any, Mapping, Sequence

import gin
import numpy as np
from etils import epath

from rest_jax import configurables
from rest_jax import gin_utils
from rest_jax import policy as policy_lib
from rest_jax import report
from rest_jax.io import atomic

CONFIG_FILES = ("config.gin", "operative_config.gin")
CHECKPOINTS_DIR = "checkpoints"
STORE_DIR = "store"
BC_KEY = "bc"
FINAL = "final"

# The small demo run of tests/test_rest_loop.py: BC 40 steps, Grow on 48 sources with N=2, I=0 and I=1 of
# 6 steps each; about a minute on two CPU cores. Used by the notebook when no run directory is given.
TINY_RUN_OVERRIDES = (
    "--gin.TASK='demo_synthetic'",
    "--gin.INPUT_LENGTH=32", "--gin.TARGET_LENGTH=32",
    "--gin.train.num_steps=40", "--gin.train.checkpoint_period=20",
    "--gin.run_rest.max_grow_sources=48", "--gin.run_rest.num_validation_sources=16",
    "--gin.run_rest.num_test_sources=16", "--gin.run_rest.best_of_n_ns=(1, 2)",
    "--gin.run_rest.num_improve_steps=1",
    "--gin.grow_dataset.num_samples=2", "--gin.grow_dataset.sources_per_shard=8",
    "--gin.grow_dataset.batch_size=16", "--gin.BATCH_SIZE=16",
    "--gin.improve_step.num_steps=6", "--gin.improve_step.eval_period=3",
)

# The run whose gin config `load_run_config` parsed last (helpers that need gin reuse it).
_LOADED_RUN: str | None = None

_GROW_RE = re.compile(r"^grow_(\d+)$")
_IMPROVE_RE = re.compile(r"^improve_(\d+)$")


# --------------------------------------------------------------------------------------------------------
# Stages and checkpoints.
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage directory of a run: BC, a Grow step or an Improve step.

    Attributes:
      key: Path relative to the run directory: 'bc', 'grow_1', 'grow_1/improve_0'.
      kind: 'bc', 'grow' or 'improve'.
      path: Full path of the stage directory.
      grow: g (0 for BC).
      improve: i for Improve stages, else None.
      result: The stage's stage.json (None while it has not finished).
    """

    key: str
    kind: str
    path: str
    grow: int
    improve: int | None
    result: Mapping[str, Any] | None

    @property
    def finished(self) -> bool:
        return self.result is not None

    @property
    def name(self) -> str:
        """The name used in report.md ('BC G=0 I=0', 'Grow 1', 'ReST G=1 I=0')."""
        if self.result and self.result.get("name"):
            return str(self.result["name"])
        if self.kind == "bc":
            return "BC G=0 I=0"
        if self.kind == "grow":
            return f"Grow {self.grow}"
        return f"ReST G={self.grow} I={self.improve}"

    @property
    def checkpoint_dir(self) -> str | None:
        """The stage's `checkpoints/` directory (None for Grow stages, which train nothing)."""
        if self.kind == "grow":
            return None
        return os.fspath(epath.Path(self.path) / CHECKPOINTS_DIR)

    @property
    def threshold(self) -> float | None:
        """τ_i of an Improve stage (None for other filters and stages)."""
        value = (self.result or {}).get("threshold")
        return None if value is None else float(value)

    @property
    def validation_reward(self) -> float | None:
        """The kept policy's reward on the validation split, as scored for the report (the same token
        limits for every stage); else the Improve step's own best validation reward (None if neither)."""
        result = self.result or {}
        score = (result.get("scores") or {}).get("validation", {}).get("reward")
        if score is None:
            score = result.get("validation_reward")
        return None if score is None else float(score)


def _run_path(run_dir: str | os.PathLike) -> epath.Path:
    path = epath.Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"Run directory {os.fspath(run_dir)} does not exist.")
    return path


def _numbered(parent: epath.Path, pattern: re.Pattern[str]) -> list[tuple[int, epath.Path]]:
    found = [(int(m[1]), p) for p in parent.iterdir() if p.is_dir() and (m := pattern.match(p.name))]
    return sorted(found, key=lambda t: t[0])


def list_stages(run_dir: str | os.PathLike) -> list[Stage]:
    """Stages of a run in ReST order: bc, grow_1, grow_1/improve_0, grow_1/improve_1, ..., grow_2, ...

    Includes unfinished stages (`finished` False), so a run still in progress can be inspected.
    """
    root = _run_path(run_dir)
    stages = []
    bc = root / BC_KEY
    if bc.is_dir():
        stages.append(Stage(BC_KEY, "bc", os.fspath(bc), 0, None, report.stage_result(bc)))
    for g, grow_dir in _numbered(root, _GROW_RE):
        stages.append(Stage(grow_dir.name, "grow", os.fspath(grow_dir), g, None, report.stage_result(grow_dir)))
        for i, imp in _numbered(grow_dir, _IMPROVE_RE):
            stages.append(Stage(f"{grow_dir.name}/{imp.name}", "improve", os.fspath(imp), g, i,
                                report.stage_result(imp)))
    return stages


def checkpoint_steps(checkpoint_dir: str | os.PathLike) -> list[int]:
    """Complete checkpoint steps in a `checkpoints/` directory (Orbax writes `commit_success.txt` last)."""
    path = epath.Path(checkpoint_dir)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir()
                  if p.name.isdigit() and (p / "commit_success.txt").exists())


def list_checkpoints(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per complete checkpoint: stage key and name, step, path, and the stage's validation reward.

    An Improve stage keeps only its best step on validation reward (ReST Sec. 3), so it lists one row; BC
    keeps its last few.
    """
    rows = []
    for stage in list_stages(run_dir):
        if stage.checkpoint_dir is None:
            continue
        for step in checkpoint_steps(stage.checkpoint_dir):
            rows.append({"stage": stage.key, "name": stage.name, "step": step,
                         "validation_reward": stage.validation_reward,
                         "path": os.fspath(epath.Path(stage.checkpoint_dir) / str(step))})
    return rows


def final_stage(run_dir: str | os.PathLike) -> Stage:
    """The latest finished stage with a checkpoint: the last Improve step, else BC (the policy ReST ends on).

    Raises:
      FileNotFoundError: when no stage with a checkpoint has finished yet.
    """
    trained = [s for s in list_stages(run_dir) if s.finished and s.checkpoint_dir is not None
               and checkpoint_steps(s.checkpoint_dir)]
    if not trained:
        raise FileNotFoundError(f"No finished stage with a checkpoint in {os.fspath(run_dir)} yet.")
    return trained[-1]


def find_stage(run_dir: str | os.PathLike, stage: str) -> Stage:
    """A stage by key ('bc', 'grow_1/improve_0'), by report name ('ReST G=1 I=0'), or 'final'.

    Raises:
      KeyError: unknown stage, with the known ones and close matches.
    """
    if stage.strip().lower() in (FINAL, "rest", "latest"):
        return final_stage(run_dir)
    stages = list_stages(run_dir)
    for s in stages:
        if stage.strip().strip("/") in (s.key, s.name) or stage.strip().lower() == s.key.lower():
            return s
    known = [s.key for s in stages] + [s.name for s in stages]
    close = difflib.get_close_matches(stage, known, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise KeyError(f"No stage {stage!r} in {os.fspath(run_dir)}; stages: {', '.join(s.key for s in stages)} "
                   f"(or 'final').{hint}")


# --------------------------------------------------------------------------------------------------------
# Gin config and policies.
# --------------------------------------------------------------------------------------------------------


def config_path(run_dir: str | os.PathLike) -> str:
    """The gin config the command line saved in the run (`config.gin`, else `operative_config.gin`)."""
    root = _run_path(run_dir)
    for name in CONFIG_FILES:
        if (root / name).exists():
            return os.fspath(root / name)
    raise FileNotFoundError(f"{os.fspath(run_dir)} has no {' or '.join(CONFIG_FILES)}; it was not written by "
                            "`python -m rest_jax.main`, so the model's architecture is unknown.")


def load_run_config(run_dir: str | os.PathLike, bindings: Sequence[str] = ()) -> str:
    """Parses the run's saved gin config (clearing any other), so models are built as in the run.

    The saved config is the fully resolved one (includes expanded, `import` lines at the top), so it
    needs no search path. `bindings` are extra gin lines applied after it, e.g. "train.batch_size = 8".
    The run's own vocabulary is bound to `get_task.vocabulary`, as `run_rest` does.

    Returns:
      The path of the parsed config file.
    """
    configurables.register()  # what the config may bind: any command's settings (experiment files set several)
    global _LOADED_RUN
    path = config_path(run_dir)
    extra = [gin_utils.Binding(b, f"load_run_config(bindings=[{b!r}])") for b in bindings]
    _LOADED_RUN = None
    gin_utils.parse([path], extra, search_paths=[os.fspath(run_dir)])
    vocab = _vocabulary_or_none(run_dir)
    if vocab is not None:
        gin.bind_parameter("get_task.vocabulary", vocab)
    _LOADED_RUN = _run_key(run_dir)
    return path


def _run_key(run_dir: str | os.PathLike) -> str:
    text = os.fspath(run_dir)
    return text if "://" in text else os.path.realpath(text)


def ensure_run_config(run_dir: str | os.PathLike) -> None:
    """Parses the run's gin config unless `load_run_config` already loaded this run's."""
    if _LOADED_RUN != _run_key(run_dir):
        load_run_config(run_dir)


def _vocabulary_or_none(run_dir: str | os.PathLike) -> str | None:
    from rest_jax.data import vocab as vocab_lib  # pylint: disable=import-outside-toplevel

    path = epath.Path(run_dir) / "vocab" / vocab_lib.DEFAULT_MODEL_NAME
    return os.fspath(path) if path.exists() else None


def vocabulary_path(run_dir: str | os.PathLike) -> str:
    """The run's SentencePiece model: `<run>/vocab/`, else the config's `run_rest.vocab_path`."""
    found = _vocabulary_or_none(run_dir)
    if found is not None:
        return found
    try:
        bound = gin.query_parameter("run_rest.vocab_path")
    except ValueError:
        bound = None
    if bound:
        return str(bound)
    raise FileNotFoundError(f"No vocabulary in {os.fspath(run_dir)}/vocab and no run_rest.vocab_path in the "
                            "loaded gin config (call load_run_config(run_dir) first).")


def feature_lengths() -> dict[str, int]:
    """Token limits of the loaded run config (INPUT_LENGTH / TARGET_LENGTH macros; 128 when unset)."""
    return {"inputs": int(gin_utils.macro_value("INPUT_LENGTH", 128)),
            "targets": int(gin_utils.macro_value("TARGET_LENGTH", 128))}


def translation_lengths() -> dict[str, int]:
    """Token limits of the translations `run_rest` saved and scored for the report: the training limits,
    raised to `run_rest.eval_max_length` (so long held-out sentences are translated whole)."""
    eval_max = run_rest_setting("eval_max_length", 0)
    return {k: max(v, int(eval_max or 0)) for k, v in feature_lengths().items()}


def run_rest_setting(name: str, fallback: Any) -> Any:
    """`run_rest.<name>` as bound in the loaded config, else run_rest's default, else `fallback`."""
    from rest_jax import rest  # pylint: disable=import-outside-toplevel

    return gin_utils.bound_setting(f"run_rest.{name}", rest.run_rest, fallback)


def load_stage_policy(run_dir: str | os.PathLike, stage: str = FINAL, step: int | None = None,
                      configure: bool = True) -> Any:
    """Loads a stage's policy (`rest_jax.policy.Policy`): model from the run's gin config, its vocabulary.

    Args:
      run_dir: The run directory.
      stage: See `find_stage` ('bc', 'final', 'grow_1/improve_1', 'ReST G=1 I=1', ...).
      step: Checkpoint step (default: the stage's latest; see `list_checkpoints`).
      configure: Make sure the run's gin config is loaded (`ensure_run_config`); False keeps the current
        gin state as it is.
    """
    found = find_stage(run_dir, stage)
    if found.checkpoint_dir is None:
        raise ValueError(f"Stage {found.key} ({found.name}) is a Grow step and has no policy checkpoint; "
                         f"its policy is the one it sampled from: {(found.result or {}).get('policy')}.")
    if configure:
        ensure_run_config(run_dir)
    return policy_lib.load_policy(checkpoint=found.checkpoint_dir, vocabulary=vocabulary_path(run_dir), step=step)


def translate(policy: Any, sources: Sequence[str], method: str = "greedy", **generate_kwargs: Any) -> list[str]:
    """First translation of each source (greedy by default), with the token limits of the run's saved
    translations (`translation_lengths`); pass max_input_length / max_decode_length to change them."""
    lengths = translation_lengths()
    generate_kwargs.setdefault("max_input_length", lengths["inputs"])
    generate_kwargs.setdefault("max_decode_length", lengths["targets"])
    return policy.generate(list(sources), method=method, **generate_kwargs).first()


# --------------------------------------------------------------------------------------------------------
# Grow stores.
# --------------------------------------------------------------------------------------------------------

BROWSE_COLUMNS = ("source_id", "sample_id", "is_reference", "reward", "source_text", "candidate_text",
                  "reference_text")


def grow_indices(run_dir: str | os.PathLike) -> list[int]:
    """g of every Grow step whose store is complete."""
    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel

    return [s.grow for s in list_stages(run_dir)
            if s.kind == "grow" and grow_store.GrowStore.is_complete(epath.Path(s.path) / STORE_DIR)]


def grow_data(run_dir: str | os.PathLike, grow: int = 1,
              columns: Sequence[str] = BROWSE_COLUMNS) -> dict[str, np.ndarray]:
    """Columns of Grow store D_g (`rest_jax.data.grow_store.GrowStore.as_numpy`)."""
    from rest_jax.data import grow_store  # pylint: disable=import-outside-toplevel

    return grow_store.GrowStore(epath.Path(run_dir) / f"grow_{grow}" / STORE_DIR).as_numpy(list(columns))


def grow_rewards(run_dir: str | os.PathLike, include_references: bool = False) -> dict[str, np.ndarray]:
    """'Grow g' -> rewards of the samples of D_g (the references too if asked), as plotted by run_rest."""
    out = {}
    for g in grow_indices(run_dir):
        data = grow_data(run_dir, g, ("reward", "is_reference"))
        keep = np.ones(len(data["reward"]), bool) if include_references else ~data["is_reference"].astype(bool)
        out[f"Grow {g}"] = data["reward"][keep]
    return out


def improve_thresholds(run_dir: str | os.PathLike) -> dict[str, float]:
    """'G=g I=i' -> τ_i of each finished Improve stage that used the threshold filter."""
    return {f"G={s.grow} I={s.improve}": s.threshold for s in list_stages(run_dir)
            if s.kind == "improve" and s.threshold is not None}


def rows_near_threshold(data: Mapping[str, np.ndarray], threshold: float, k: int = 5,
                        include_references: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The k records just below and just above τ: what the Improve filter barely drops and barely keeps.

    ReST's filter keeps a record when R(x, y) > τ (Sec. 3, strict), so "below" holds rewards <= τ (the
    largest first, closest to τ) and "above" rewards > τ (the smallest first). Ties are broken by
    (source_id, sample_id) so the result is reproducible.

    Args:
      data: Grow store columns (`grow_data`); needs 'reward', plus whatever the rows should show.
      threshold: τ.
      k: Rows on each side.
      include_references: Also show reference records (sample_id -1), which Improve trains on too.

    Returns:
      (below, above): lists of row dicts (one key per column, numpy scalars as Python values).
    """
    rewards = np.asarray(data["reward"], np.float64)
    n = len(rewards)
    keep = np.ones(n, bool)
    if not include_references and "is_reference" in data:
        keep &= ~np.asarray(data["is_reference"]).astype(bool)
    ids = np.asarray(data.get("source_id", np.arange(n)))
    samples = np.asarray(data.get("sample_id", np.zeros(n, np.int64)))
    below = np.flatnonzero(keep & (rewards <= threshold))
    above = np.flatnonzero(keep & (rewards > threshold))
    # lexsort: last key is primary.
    below = below[np.lexsort((samples[below], ids[below], -rewards[below]))][:k]
    above = above[np.lexsort((samples[above], ids[above], rewards[above]))][:k]
    return _rows(data, below), _rows(data, above)


def _rows(data: Mapping[str, np.ndarray], index: np.ndarray) -> list[dict[str, Any]]:
    return [{name: _py(col[i]) for name, col in data.items()} for i in index]


def _py(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------------
# Outputs: saved translations, side by side.
# --------------------------------------------------------------------------------------------------------


def saved_outputs(run_dir: str | os.PathLike, stage: str, split: str = "validation",
                  method: str = "greedy") -> list[str] | None:
    """Translations `run_rest` saved for a stage (`<stage>/<split>.<method>.txt`), or None if absent."""
    path = epath.Path(find_stage(run_dir, stage).path) / f"{split}.{method}.txt"
    if not path.exists():
        return None
    return path.read_text().splitlines()


def run_task(run_dir: str | os.PathLike) -> str:
    """The run's task name (report.json, else the gin config's `run_rest.task`)."""
    path = epath.Path(run_dir) / "report.json"
    if path.exists() and atomic.read_json(path).get("task"):
        return str(atomic.read_json(path)["task"])
    ensure_run_config(run_dir)
    task = gin.query_parameter("run_rest.task")
    if not isinstance(task, str):  # a macro reference such as %TASK
        task = gin_utils.macro_value("/".join(getattr(task, "scopes", ["TASK"])))
    if not isinstance(task, str):
        raise ValueError(f"{config_path(run_dir)} binds no task (run_rest.task).")
    return task


def split_data(run_dir: str | os.PathLike, split: str = "validation",
               limit: int | None = None) -> tuple[list[str], list[str]]:
    """(sources, references) of the run's task split, in order; data settings from the run's gin config."""
    from rest_jax.data import tasks  # pylint: disable=import-outside-toplevel

    ensure_run_config(run_dir)  # e.g. demo_source.data_dir
    return tasks.read_split(run_task(run_dir), split, limit)


def run_reward(run_dir: str | os.PathLike) -> Any:
    """The run's reward model (`report.json`'s reward name, else 'chrf')."""
    from rest_jax import rewards as rewards_lib  # pylint: disable=import-outside-toplevel

    path = epath.Path(run_dir) / "report.json"
    name = atomic.read_json(path).get("reward", "chrf") if path.exists() else "chrf"
    return rewards_lib.get(name)


def compare_outputs(run_dir: str | os.PathLike, stages: Sequence[str] = (BC_KEY, FINAL),
                    split: str = "validation", n: int = 5, translate_missing: bool = True,
                    with_rewards: bool = True) -> list[dict[str, Any]]:
    """Side-by-side translations of the first `n` sources of `split` by several stages.

    Each stage's translations come from the files `run_rest` saved (`<split>.greedy.txt`); a stage without
    them is translated now when `translate_missing` (greedy, as run_rest does). With `with_rewards`, each
    output's sentence-level reward under the run's reward model is added as `reward[<stage name>]`.

    Returns:
      One dict per source: 'source', 'reference', then '<stage name>' (and 'reward[<stage name>]') each.
    """
    sources, refs = split_data(run_dir, split, n)
    columns: dict[str, list[str]] = {}
    for key in stages:
        stage = find_stage(run_dir, key)
        outputs = saved_outputs(run_dir, stage.key, split)
        if outputs is None or len(outputs) < len(sources):
            if not translate_missing:
                raise FileNotFoundError(f"{stage.path} has no {split}.greedy.txt with {len(sources)} lines.")
            outputs = translate(load_stage_policy(run_dir, stage.key, configure=False), sources)
        columns[stage.name] = outputs[:len(sources)]
    rows = [{"source": s, "reference": r} for s, r in zip(sources, refs)]
    reward = run_reward(run_dir) if with_rewards else None
    for name, outputs in columns.items():
        scores = None
        if reward is not None:
            from rest_jax import rewards as rewards_lib  # pylint: disable=import-outside-toplevel

            scores = rewards_lib.score_pairs(reward, sources, outputs, refs if reward.needs_reference else None)
        for j, row in enumerate(rows):
            row[name] = outputs[j]
            if scores is not None:
                row[f"reward[{name}]"] = float(scores[j])
    return rows


# --------------------------------------------------------------------------------------------------------
# Validation curves and plots.
# --------------------------------------------------------------------------------------------------------


def validation_curves(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """Stage name -> [(training step, validation reward)] of each finished Improve step, in ReST order.

    Read from each stage's stage.json ('curve', measured every `improve_step.eval_period` steps, step 0 =
    the starting policy); stages listed only in report.json (e.g. a copied report) are added from there.
    """
    curves: dict[str, list[tuple[int, float]]] = {}
    for s in list_stages(run_dir):
        if s.kind == "improve" and s.result and s.result.get("curve"):
            curves[s.name] = [(int(a), float(b)) for a, b in s.result["curve"]]
    path = epath.Path(run_dir) / "report.json"
    if path.exists():
        for st in atomic.read_json(path).get("stages", []):
            if st.get("curve") and st.get("name") not in curves:
                curves[st["name"]] = [(int(a), float(b)) for a, b in st["curve"]]
    return curves


def report_rows(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The report table (`report.json` rows: name, reward, BLEU, chrF, kept fraction, threshold)."""
    path = epath.Path(run_dir) / "report.json"
    return list(atomic.read_json(path)["rows"]) if path.exists() else []


def plot_grow_rewards(rewards: Mapping[str, np.ndarray], thresholds: Mapping[str, float] | None = None,
                      bins: int = 20, ax: Any = None) -> Any:
    """Histogram (counts) of sample rewards per Grow, Improve thresholds as dashed lines; returns the Figure."""
    fig, ax = report.figure(ax, (6, 3.5))
    for name, values in rewards.items():
        ax.hist(np.asarray(values, np.float64), bins=bins, range=(0.0, 1.0), alpha=0.5, label=name)
    for label, tau in (thresholds or {}).items():
        ax.axvline(tau, linestyle="--", linewidth=0.8, color="k")
        ax.annotate(label, (tau, 0.98), xycoords=("data", "axes fraction"), xytext=(3, 0),
                    textcoords="offset points", rotation=90, fontsize=7, va="top")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("reward R(x, y) of a Grow sample")
    ax.set_ylabel("samples")
    ax.set_title("Grow rewards (dashed: Improve thresholds)")
    if rewards:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# One figure for the notebook and for the run's plots/validation_reward.png.
plot_validation_curves = report.validation_curves


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 max_width: int = 48) -> str:
    """A plain-text table of dict rows (long texts cut to `max_width`), for printing in a notebook."""
    if not rows:
        return "(no rows)"
    columns = list(columns or dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text if len(text) <= max_width else text[:max_width - 1] + "…"

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[j]) for row in cells)) for j, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# A tiny run to look at.
# --------------------------------------------------------------------------------------------------------


def make_tiny_run(run_dir: str | os.PathLike, demo_dir: str | os.PathLike | None = None,
                  extra_overrides: Sequence[str] = (), timeout: float = 1800.0) -> str:
    """Runs the demo ReST loop with `TINY_RUN_OVERRIDES` into `run_dir`, unless it has a report.json.

    Runs `python -m rest_jax.main rest --gin_file=experiments/demo.gin ...` in a subprocess (so its gin and
    JAX state stay out of the caller's). A killed run is resumed by calling this again.

    Args:
      run_dir: Model directory.
      demo_dir: Where the generated demo corpus goes (default: `<run_dir>/../demo_corpus`).
      extra_overrides: More `--gin.KEY=VALUE` flags (after the tiny ones, so they win).
      timeout: Seconds before the subprocess is killed.

    Returns:
      `run_dir` as a string.

    Raises:
      RuntimeError: the run failed; carries the end of its stderr.
    """
    run_dir = os.fspath(run_dir)
    if (epath.Path(run_dir) / "report.json").exists():
        return run_dir
    demo_dir = os.fspath(demo_dir or os.path.join(os.path.dirname(os.path.abspath(run_dir)), "demo_corpus"))
    cmd = [sys.executable, "-m", "rest_jax.main", "rest", "--gin_file=experiments/demo.gin",
           f"--gin.MODEL_DIR={run_dir!r}", f"--gin.demo_source.data_dir={demo_dir!r}",
           *TINY_RUN_OVERRIDES, *extra_overrides]
    env = dict(os.environ)
    # One CPU device is fastest for the tiny model; test setups may simulate several.
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
                          cwd=os.fspath(epath.Path(__file__).resolve().parents[1]))
    if proc.returncode != 0:
        raise RuntimeError(f"The tiny ReST run into {run_dir} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return run_dir
