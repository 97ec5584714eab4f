"""The Multi30k study's table over seeds: mean ± 95% interval (Student's t) of each run, and its difference to
the same seed's BC policy, from the reports that scripts/multi30k_study.sh leaves.

    python scripts/study_table.py runs/m30k_study

Reads <dir>/s<seed>/<row>/report.json (every row that has a report); prints markdown.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

from rest_jax import significance


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", help="the directory of s<seed>/<row>/ runs (STUDY_DIR of the study script)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.study_dir)
    seeds = sorted((p for p in root.glob("s*") if re.fullmatch(r"s\d+", p.name) and any(p.glob("*/report.json"))),
                   key=lambda p: int(p.name[1:]))
    if not seeds:
        print(f"study_table: no s<seed>/<row>/report.json in {root}", file=sys.stderr)
        return 2
    rows = sorted({p.parent.name for s in seeds for p in s.glob("*/report.json")}, key=lambda r: (r != "bc", r))
    runs = {}
    for row in rows:
        reports = [json.loads((s / row / "report.json").read_text()) for s in seeds if (s / row / "report.json").exists()]
        runs[row] = [r["rows"] for r in reports]
    markdown, _ = significance.seed_table(runs)
    print(f"{len(seeds)} seeds ({', '.join(s.name for s in seeds)}) in {root}; test split of the reports; rewards "
          "0-100; mean ± half-width of the 95% t-interval over seeds; Δ: paired with the same seed's BC.\n")
    print(markdown)
    if "rest" in runs and "control" in runs:
        # Runs of the same seeds only: the two lists must pair up.
        both = [s for s in seeds if (s / "rest" / "report.json").exists() and (s / "control" / "report.json").exists()]
        paired = {row: [json.loads((s / row / "report.json").read_text())["rows"] for s in both]
                  for row in ("rest", "control")}
        print("ReST against its schedule-matched control (same seed, same Improve step):\n")
        print(significance.stage_differences(paired, "rest", "control"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
