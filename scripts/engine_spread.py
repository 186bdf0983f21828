"""Goal 1 across engine starts: compare FlexQuant's TTFT with the stock W8A8 engines around it over
several rounds of `flexquant bench --control` (workbench/bench/engine_spread.py says how).

    python scripts/engine_spread.py ROUND.json [ROUND.json ...] [--markdown OUT.md] [--splits]

Prints the per-round A-B-A ratios and the summary table; --markdown also writes the table (atomically);
--splits also prints how the streamed bursts were split over engine steps, per engine kind, with the
TTFT at each split (rounds that kept each request's TTFT, since run 10).
"""

# ruff: noqa: T201  (a script: printing is its output)
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.bench.engine_spread import (  # noqa: E402
    aba_ratios,
    burst_splits,
    engine_ttfts,
    first_step_contrast,
    split_summary,
    spread_markdown,
)
from workbench.bench.report import ResultsError, load_results  # noqa: E402
from workbench.bench.report_html import write_text_atomic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "results", type=Path, nargs="+", help="flexquant-bench/1 results JSONs, one per round"
    )
    parser.add_argument("--baseline", default="w8a8", help="the stock label FlexQuant is compared with")
    parser.add_argument("--markdown", type=Path, help="also write the summary table here")
    parser.add_argument(
        "--splits", action="store_true", help="also print the streamed bursts' first-step splits"
    )
    args = parser.parse_args(argv)
    try:
        rounds = [(str(path), load_results(path)) for path in args.results]
    except ResultsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    engines = engine_ttfts(rounds)
    ratios = aba_ratios(engines, args.baseline)
    if ratios.empty:
        print(f"error: no round has both a FlexQuant and a {args.baseline!r} engine", file=sys.stderr)
        return 2
    print(ratios.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    table = spread_markdown(engines, args.baseline)
    print(table)
    if args.markdown:
        print(f"wrote {write_text_atomic(args.markdown, table)}")
    if args.splits:
        bursts = burst_splits(rounds)
        if bursts.empty:
            print("no round kept each streamed request's TTFT (ttft_ms_requests): no splits")
        else:
            print(split_summary(bursts).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
            print("\nbursts whose first step took 1 request, FlexQuant vs stock:")
            contrast = first_step_contrast(bursts, stock=args.baseline)
            print(contrast.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
