"""Print the int4 kernel survey (scripts/gpu/int4_kernels.py's JSON files) as Markdown tables.

    python scripts/kernel_report.py docs/benchmarks/2026-11-26-h100-int4-kernels/*.json
"""
# ruff: noqa: T201  (a script: printing is its output)

from __future__ import annotations

import argparse
import json
from pathlib import Path

from workbench.bench.kernel_survey import survey_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("survey_json", type=Path, nargs="+", help="int4_kernels.py JSON file(s)")
    for path in ap.parse_args().survey_json:
        print(f"## {path}\n")
        print("\n".join(survey_markdown(json.loads(path.read_text()))))
        print()


if __name__ == "__main__":
    main()
