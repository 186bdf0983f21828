"""Render a `flexquant bench` results JSON as the HTML report, a PNG of its headline figures, and the
README headline table.

    python scripts/bench_report.py RESULTS.json --html OUT.html [--png OUT.png] [--markdown OUT.md]

--png opens a self-contained copy of the report (plotly.js inline: the browser gets no network) in
headless Debian chromium through Playwright and screenshots the first four figures (batch sweep
prefill and TPOT, online TTFT and TPOT). Every file is written atomically.
"""

# ruff: noqa: T201  (a script: printing is its output)
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workbench.bench.goals import headline_markdown  # noqa: E402
from workbench.bench.report import ResultsError, load_results  # noqa: E402
from workbench.bench.report_html import write_report, write_text_atomic  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Plotly sets _fullLayout on a graph div once it has drawn it.
FIGURES_DRAWN = (
    "() => [...document.querySelectorAll('#headline-figures .plotly-graph-div')].every(d => d._fullLayout)"
)


def screenshot_headline(
    results: dict, png_path: Path, *, flex_label: str | None = None, chromium: str = CHROMIUM
) -> Path:
    """PNG of the report's headline figures, drawn by chromium from an inline-plotly.js copy."""
    from playwright.sync_api import sync_playwright

    if not Path(chromium).exists():
        raise FileNotFoundError(
            f"{chromium} not found: install Debian's chromium (apt-get install -y chromium)"
        )
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        page_path = write_report(results, Path(tmp) / "report.html", plotlyjs="inline", flex_label=flex_label)
        shot = png_path.with_name(f".{png_path.name}.tmp.png")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(page_path.as_uri())
                page.wait_for_function(FIGURES_DRAWN, timeout=30_000)
                page.locator("#headline-figures").screenshot(path=str(shot))
            finally:
                browser.close()
        shot.replace(png_path)
    return png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a flexquant-bench/1 results JSON")
    parser.add_argument("--html", type=Path, required=True, help="where to write the HTML report")
    parser.add_argument("--png", type=Path, help="also write a PNG of the headline figures")
    parser.add_argument("--markdown", type=Path, help="also write the README headline table")
    parser.add_argument(
        "--plotlyjs",
        choices=("cdn", "inline"),
        default="cdn",
        help="plotly.js from its CDN (small file, needs network to view) or inline (self-contained)",
    )
    parser.add_argument(
        "--flex-label", help="the FlexQuant label to judge (default: the auto-tuned policy's)"
    )
    parser.add_argument("--chromium", default=CHROMIUM, help="chromium executable for --png")
    args = parser.parse_args(argv)
    try:
        results, flex = load_results(args.results), args.flex_label
        print(f"wrote {write_report(results, args.html, plotlyjs=args.plotlyjs, flex_label=flex)}")
        if args.markdown:
            print(f"wrote {write_text_atomic(args.markdown, headline_markdown(results, flex))}")
        if args.png:
            print(f"wrote {screenshot_headline(results, args.png, flex_label=flex, chromium=args.chromium)}")
    except (ResultsError, ValueError, FileNotFoundError) as exc:
        print(f"bench_report: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
