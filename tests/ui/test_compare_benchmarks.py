"""Browser flow: benchmark results imported with `flexquant bench --import` are shown in the Compare tab.

The import goes through the real CLI into the running app's data folder (its SQLite file), as a user
who copied `results.json` off a GPU machine would do it; the tab is then opened in Chromium.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect
from uihelpers import choose

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
H200 = ROOT / "docs/benchmarks/2026-11-26-llama3-8b-h200/results.json"
H100_RUN5 = ROOT / "docs/benchmarks/2026-11-26-llama3-8b-h100-streamed/results.json"  # per-request TPOT
H100_RUN6 = ROOT / "docs/benchmarks/2026-11-26-llama3-8b-h100-control/results.json"  # W8A8 twice
SAMPLE = ROOT / "tests/data/bench-sample.json"


def reopen_compare(page) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("tab", name="Compare").click()


def import_results(app, path: Path) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "workbench.cli",
            "--data-dir",
            str(app.data_dir),
            "bench",
            "--import",
            str(path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_imported_benchmark_results_in_compare_tab(page, app):
    page.get_by_role("tab", name="Compare").click()
    expect(page.locator("#fq-bench-info")).to_contain_text("No benchmark results stored yet")
    expect(page.locator("#fq-bench-info")).to_contain_text("flexquant bench --import results.json")

    assert "stored as bench run" in import_results(app, H200)
    assert "stored as bench run" in import_results(app, SAMPLE)  # no start time: stored as newest
    reopen_compare(page)  # opening the tab lists the new runs
    expect(page.locator("#fq-bench-info")).to_contain_text("on NVIDIA H100 80GB HBM3")  # newest shown
    expect(page.locator("#fq-bench-headline")).to_contain_text("No FlexQuant measurement in this run")

    choose(page, "fq-bench-run", "NVIDIA H200")
    info, headline = page.locator("#fq-bench-info"), page.locator("#fq-bench-headline")
    expect(info).to_contain_text("complete run of 2026-11-26 01:35 UTC on NVIDIA H200")
    expect(headline).to_contain_text("flex:auto vs single variants")
    expect(headline.locator("table").first).to_contain_text("batch 64")
    expect(headline.locator("table").first).to_contain_text("1.20×")  # TTFT vs W8A8 at batch 64
    expect(headline).to_contain_text("TTFT <= 1.03x W8A8-only")
    for elem_id, axis in (
        ("fq-bench-sweep-prefill_s", "batch (requests)"),
        ("fq-bench-sweep-tpot_ms", "batch (requests)"),
        ("fq-bench-online-ttft_p50_ms", "arrival rate (req/s)"),
        ("fq-bench-online-tpot_p50_ms", "arrival rate (req/s)"),
    ):
        plot = page.locator(f"#{elem_id} .js-plotly-plot")
        expect(plot).to_be_visible()
        expect(plot).to_contain_text(axis)
        for label in ("flex:auto", "w8a8", "w4a16-marlin"):
            expect(plot).to_contain_text(label)  # one line per measured label, in the legend

    # a run with streamed batches: the batch-TPOT chart shows the per-request TPOT
    expect(page.locator("#fq-bench-sweep-tpot_ms .js-plotly-plot")).not_to_contain_text("per request")
    assert "stored as bench run" in import_results(app, H100_RUN5)
    reopen_compare(page)
    choose(page, "fq-bench-run", "w4a16-machete, flex:auto")
    expect(info).to_contain_text("on NVIDIA H100 80GB HBM3")
    expect(headline).to_contain_text("TPOT <= 1.03x best single variant (per request)")
    tpot = page.locator("#fq-bench-sweep-tpot_ms .js-plotly-plot")
    expect(tpot).to_contain_text("TPOT per request, p50")
    expect(tpot).to_contain_text("w4a16-machete")

    # a run with an engine-order control: its drift is reported, and a miss inside it is named so
    assert "stored as bench run" in import_results(app, H100_RUN6)
    reopen_compare(page)
    choose(page, "fq-bench-run", "w8a8-control")
    expect(headline).to_contain_text("Engine-order control: w8a8 measured again after FlexQuant")
    expect(headline).to_contain_text("NOT met (1 of 2 misses within engine drift)")
    expect(page.locator("#fq-bench-sweep-prefill_s .js-plotly-plot")).to_contain_text("w8a8-control")

    page.wait_for_timeout(500)  # let Plotly finish its transitions before the picture
    page.locator("#fq-bench").screenshot(path=str(app.shots / "compare-benchmarks.png"))
