"""Tables from paired runs (scripts/gpu/paired_engines.py): goal 1 per batch for each run and pooled,
and the online windows with their step split; Markdown, as in docs/benchmarks/README.md.

    python scripts/paired_report.py docs/benchmarks/2026-11-26-llama3-8b-h100-paired/machine-*/paired.json
"""
# ruff: noqa: T201  (a script: printing is its output)

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from workbench.bench.paired_report import (
    goal1_markdown,
    online_markdown,
    online_pairs_markdown,
    report_lines,
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paired_json", type=Path, nargs="+", help="paired.json of each run")
    ap.add_argument("--full", action="store_true", help="also print each run's own summary")
    args = ap.parse_args()
    records = []
    for path in args.paired_json:
        try:
            records.append((path.parent.name, json.loads(path.read_text())))
        except (OSError, ValueError) as exc:
            print(f"error: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    if args.full:
        for name, rec in records:
            print(f"## {name}: the run's own summary\n\n```\n" + "\n".join(report_lines(rec)) + "\n```\n")
    # Each section only where some run measured it (a run with CYCLES_UNTIL=0 has no bursts).
    if any(rec.get("bursts") for _, rec in records):
        print("## Goal 1: prefill bursts, FlexQuant / W8A8 within each cycle\n")
        print(goal1_markdown(records))
        print("## Step telemetry copied into the DB while serving: flex-live / flex, same engine\n")
        print(goal1_markdown(records, condition="flex-live", baseline="flex"))
    if any(rec.get("online_pairs") for _, rec in records):
        print("## Online pairs: short windows on each engine in turn, FlexQuant / W8A8 within each pair\n")
        print(online_pairs_markdown(records))
    if any(rec.get("online") for _, rec in records):
        print("## Online windows and their engine steps\n")
        print(online_markdown(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
