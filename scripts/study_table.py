"""The Multi30k study's table over seeds: mean ± 95% interval (Student's t) of each run, and its difference to
the same seed's BC policy, from the reports that scripts/multi30k_study.sh leaves.

    python scripts/study_table.py runs/m30k_study
    python scripts/study_table.py runs/m30k_study --compare half_new_norefs half_same \
        --references ../shared/data/multi30k/test_2016_flickr.en
    python scripts/study_table.py runs/m30k_study --rows control rest rest_norefs --stages "G=1 I=1" "G=1 I=3"

Reads <dir>/s<seed>/<row>/report.json (every row that has a report, or those of `--rows` in that order; every
stage, or those of `--stages`); prints markdown. `--compare ROW BASELINE` adds ROW − BASELINE at each stage,
paired by seed (default: rest − control where both ran), and with the report split's references (the first n,
as many as the report scored), per seed the paired bootstrap of that difference over the test sentences (as
each row's difference to BC is in its report).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
from typing import Any

from rest_jax.io import console

with console.quiet_native_stderr():  # TensorFlow's start-up lines (oneDNN, cuda probes)
    from rest_jax import evaluate
    from rest_jax import inspection
    from rest_jax import report
    from rest_jax import rewards as rewards_lib
    from rest_jax import significance
    console.start_tensorflow()


def _stages(run_dir: pathlib.Path, keep: list[str] | None) -> dict[str, dict[str, Any]]:
    """The run's finished Improve stages by their "G=g I=i" (those in `keep` if given), read from the run directory
    (paths under it, so the study may have been copied or run from another working directory)."""
    stages = {f"G={s.grow} I={s.improve}": dict(s.result, name=s.name) for s in inspection.list_stages(run_dir)
              if s.kind == "improve" and s.finished}
    return {k: v for k, v in stages.items() if keep is None or k in keep}


def _report_rows(run_dir: pathlib.Path, keep: list[str] | None) -> list[dict[str, Any]]:
    """The rows of the run's report.json: BC first, then its stages (those in `keep` if given)."""
    rows = json.loads((run_dir / "report.json").read_text())["rows"]
    return [r for r in rows if r["name"].startswith("BC") or keep is None or r["name"].split(" ", 1)[1] in keep]


def _lines(path: str | pathlib.Path) -> list[str]:
    lines = pathlib.Path(path).read_text().split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _translations(stage: dict[str, Any], split: str, references: list[str]) -> list[str]:
    """The stage's translations of the first sentences of the split (a report scores the first n)."""
    path = pathlib.Path(stage["scores"][split]["translations"])
    if not path.exists():
        raise SystemExit(f"study_table: {path} (the translations of {stage['name']}) is missing.")
    hyps = _lines(path)
    if len(hyps) > len(references):
        raise SystemExit(f"study_table: {path} holds {len(hyps)} translations, --references {len(references)}.")
    return hyps


def sentence_bootstrap(seed_dirs: list[pathlib.Path], row: str, baseline: str, references: list[str],
                       sources: list[str] | None, keep: list[str] | None = None) -> str:
    """Per seed and stage, `row` − `baseline` by the paired bootstrap over the test sentences, as markdown."""
    lines = [f"| {row} − {baseline} | stage | Δ reward [95% CI] | Δ BLEU [95% CI] | Δ chrF [95% CI] |",
             "| --- | --- | ---: | ---: | ---: |"]
    for seed_dir in seed_dirs:
        a, b = (json.loads((seed_dir / r / "report.json").read_text()) for r in (row, baseline))
        if a["split"] != b["split"] or a["reward"] != b["reward"]:
            raise SystemExit(f"study_table: {row} and {baseline} of {seed_dir.name} report different splits or "
                             "rewards.")
        reward = rewards_lib.get(a["reward"])
        if not reward.needs_reference and sources is None:  # a quality-estimation reward reads the source
            raise SystemExit(f"study_table: the {a['reward']} reward reads the source: give --sources.")
        srcs = sources if sources is not None else [""] * len(references)

        stages_a, stages_b = _stages(seed_dir / row, keep), _stages(seed_dir / baseline, keep)
        for stage in (s for s in stages_a if s in stages_b):
            hyps_b, hyps_a = (_translations(st[stage], a["split"], references) for st in (stages_b, stages_a))
            n = len(hyps_a)
            diffs = evaluate.compare_translations(hyps_b, hyps_a, srcs[:n], references[:n], reward,
                                                  metrics=("bleu", "chrf"), seed=int(seed_dir.name[1:]))
            cells = [report.format_delta(diffs[m].as_dict(), scale) for m, scale in (("reward", 100), ("bleu", 1),
                                                                                      ("chrf", 1))]
            lines.append(f"| {seed_dir.name} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", help="the directory of s<seed>/<row>/ runs (STUDY_DIR of the study script)")
    parser.add_argument("--compare", nargs=2, action="append", metavar=("ROW", "BASELINE"), default=[],
                        help="print ROW − BASELINE at each stage, paired by seed (repeatable)")
    parser.add_argument("--references", help="the report split's references, one per line: adds each --compare "
                        "pair's paired bootstrap over the sentences, per seed")
    parser.add_argument("--sources", help="its sources, one per line (for rewards that read the source)")
    parser.add_argument("--rows", nargs="+", metavar="ROW", help="only these rows, in this order (BC first always)")
    parser.add_argument("--stages", nargs="+", metavar="STAGE", help='only these stages, e.g. "G=1 I=1" "G=1 I=3"')
    args = parser.parse_args(argv)
    root = pathlib.Path(args.study_dir)
    seeds = sorted((p for p in root.glob("s*") if re.fullmatch(r"s\d+", p.name) and any(p.glob("*/report.json"))),
                   key=lambda p: int(p.name[1:]))
    if not seeds:
        print(f"study_table: no s<seed>/<row>/report.json in {root}", file=sys.stderr)
        return 2
    found = sorted({p.parent.name for s in seeds for p in s.glob("*/report.json")}, key=lambda r: (r != "bc", r))
    missing = sorted(set(args.rows or ()) - set(found))
    if missing:
        print(f"study_table: no report of row(s) {', '.join(missing)} in {root} (rows: {', '.join(found)})",
              file=sys.stderr)
        return 2
    rows = found
    if args.rows:
        rows = (["bc"] if "bc" in found and "bc" not in args.rows else []) + args.rows
    stages = {r["name"].split(" ", 1)[1] for s in seeds for row in rows if (s / row / "report.json").exists()
              for r in _report_rows(s / row, None)}
    unknown = [s for s in args.stages or () if s not in stages]
    if unknown:
        print(f"study_table: no row has stage(s) {', '.join(unknown)} (stages: {', '.join(sorted(stages))})",
              file=sys.stderr)
        return 2
    runs = {row: [_report_rows(s / row, args.stages) for s in seeds if (s / row / "report.json").exists()]
            for row in rows}
    markdown, _ = significance.seed_table(runs)
    print(f"{len(seeds)} seeds ({', '.join(s.name for s in seeds)}) in {root}; test split of the reports; rewards "
          "0-100; mean ± half-width of the 95% t-interval over seeds; Δ: paired with the same seed's BC.\n")
    print(markdown)
    compare = args.compare or ([("rest", "control")] if "rest" in runs and "control" in runs else [])
    references = _lines(args.references) if args.references else None
    sources = _lines(args.sources) if args.sources else None
    for row, baseline in compare:
        # Runs of the same seeds only: the two lists must pair up.
        both = [s for s in seeds if (s / row / "report.json").exists() and (s / baseline / "report.json").exists()]
        if not both:
            print(f"study_table: no seed has both {row} and {baseline}", file=sys.stderr)
            return 2
        paired = {r: [_report_rows(s / r, args.stages) for s in both] for r in (row, baseline)}
        what = "its schedule-matched control" if (row, baseline) == ("rest", "control") else baseline
        print(f"{row} against {what} (same seed, same Improve step):\n")
        print(significance.stage_differences(paired, row, baseline))
        if references is not None:
            print(f"{row} against {baseline}, each seed over its test sentences (paired bootstrap; * p < 0.05):\n")
            print(sentence_bootstrap(both, row, baseline, references, sources, args.stages))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
