"""Goal 1 across engine starts (workbench/bench/engine_spread.py) on the H100 measurements committed
under docs/benchmarks/: run 7's four rounds of W8A8, FlexQuant, W8A8 again, and run 6's control."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest

from workbench.bench import engine_spread, report

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = sorted(
    (ROOT / "docs/benchmarks/2026-11-26-llama3-8b-h100-prefill-engines/rounds").glob("round-*.json")
)
RUN6 = ROOT / "docs/benchmarks/2026-11-26-llama3-8b-h100-control/results.json"


@pytest.fixture(scope="module")
def engines():
    assert len(ROUNDS) == 4
    return engine_spread.engine_ttfts([(p.stem, report.load_results(p)) for p in ROUNDS])


def test_every_round_has_two_w8a8_engines_around_one_flexquant_engine(engines):
    for _, part in engines.groupby("round"):
        order = part.drop_duplicates("engine").sort_values("position")
        assert list(order["engine"]) == ["w8a8", "flex", "w8a8-control"]
        assert list(order["baseline"]) == ["w8a8", "flex", "w8a8"]  # the control counts as W8A8
    # batch 1, 4, 16 prefill wall and TTFT p50, and the 4 req/s window, on each of 12 engines
    assert len(engines) == 12 * 7 and engines["ttft_ms"].gt(0).all()


def test_aba_ratio_is_flexquant_over_the_geometric_mean_of_its_round(engines):
    ratios = engine_spread.aba_ratios(engines)
    assert len(ratios) == 4 * 7 and set(ratios["stock_engines"]) == {2}
    r1 = report.load_results(ROUNDS[0])
    row = {(r["target"], r["batch"]): r["prefill_s"] * 1000 for r in r1["sweep"]}
    got = ratios[(ratios["round"] == "round-1") & (ratios["where"] == "batch 1, prefill wall")].iloc[0]
    expected = row["flex", 1] / math.sqrt(row["w8a8", 1] * row["w8a8-control", 1])
    assert got["ratio"] == pytest.approx(expected) and got["flex_ms"] == pytest.approx(row["flex", 1])


def test_summary_reports_the_spread_and_leaves_straddling_rounds_unresolved(engines):
    summary = engine_spread.spread_summary(engines).set_index("where")
    b1 = summary.loc["batch 1, prefill wall"]
    assert (b1["stock_n"], b1["flex_n"], b1["rounds"]) == (8, 4, 4)
    assert b1["stock_min_ms"] <= b1["stock_median_ms"] <= b1["stock_max_ms"]
    # measured: the W8A8 engines' batch-1 prefill spans 22.9-40.9 ms, the rounds' ratio 0.78-1.28
    assert b1["stock_max_ms"] / b1["stock_min_ms"] > 1.5 and b1["ratio_min"] < 1.03 < b1["ratio_max"]
    table = engine_spread.spread_markdown(engines)
    assert table.count("\n") == 2 + len(summary) and "not resolved (interval across the goal)" in table
    # four rounds: no pair of order statistics reaches 95%, so the interval is the range (87.5%)
    assert (b1["ratio_ci_low"], b1["ratio_ci_high"]) == (b1["ratio_min"], b1["ratio_max"])
    assert b1["ratio_ci_coverage"] == pytest.approx(1 - 2 / 16) and "87.5%]" in table


def test_verdict_needs_the_whole_interval_on_one_side_of_the_goal():
    assert engine_spread.spread_verdict(0.95, 1.02) == "met"
    assert engine_spread.spread_verdict(1.04, 1.2) == "NOT met"
    assert engine_spread.spread_verdict(0.9, 1.1).startswith("not resolved")


def test_median_interval_takes_the_order_statistics_that_cover_95_percent():
    rounds = [1.12, 0.94, 1.04, 0.98, 1.00, 0.99, 0.97, 1.01, 1.02, 0.96]  # 10 rounds, shuffled
    # P(Binomial(10, 1/2) <= 1) = 11/1024 on each side: x(2)..x(9) covers 97.9%; x(3)..x(8) only 89%
    assert engine_spread.median_interval(rounds) == (0.96, 1.04, pytest.approx(1 - 22 / 1024))
    # one outlying round moves the range, not the interval
    assert engine_spread.median_interval([3.0, *rounds[1:]])[:2] == (0.96, 1.04)
    assert engine_spread.median_interval(rounds[:5]) == (0.94, 1.12, pytest.approx(1 - 2 / 32))
    assert engine_spread.median_interval(rounds, level=0.8)[:2] == (0.97, 1.02)
    with pytest.raises(ValueError, match="at least one"):
        engine_spread.median_interval([])


def test_mean_ttft_joins_the_table_where_a_round_recorded_it(engines):
    # rounds before run 9 have no `ttft_mean_ms`: no such rows, not NaN ones
    assert not engines["where"].str.contains("TTFT mean").any()
    results = copy.deepcopy(report.load_results(ROUNDS[0]))
    means = {"w8a8": 30.0, "flex": 33.0, "w8a8-control": 40.0}
    for row in results["sweep"]:
        row["ttft_mean_ms"] = means[row["target"]] * row["batch"]
    ratios = engine_spread.aba_ratios(engine_spread.engine_ttfts([("r", results)])).set_index("where")
    assert {f"batch {b}, TTFT mean" for b in (1, 4, 16)} <= set(ratios.index)
    assert ratios.loc["batch 4, TTFT mean", "ratio"] == pytest.approx(33.0 / math.sqrt(30.0 * 40.0))


def test_burst_splits_compare_engines_at_the_same_first_step():
    results = copy.deepcopy(report.load_results(ROUNDS[0]))
    # batch 4: the first step took 1 request (the rest ~60 ms later) or 2 (within 8 ms of each other)
    bursts = {
        "w8a8": [[20.0, 80.0, 81.0, 82.0], [20.0, 25.0, 80.0, 81.0]],
        "w8a8-control": [[22.0, 27.0, 83.0, 84.0]],
        "flex": [[21.0, 82.0, 83.0, 84.0], [21.0, 83.0, 84.0, 85.0]],
    }
    for row in results["sweep"]:
        row["ttft_ms_requests"] = bursts[row["target"]] if row["batch"] == 4 else []
    splits = engine_spread.burst_splits([("r", results)])
    assert len(splits) == 5 and set(splits["baseline"]) == {"w8a8", "flex"}  # the control counts as W8A8
    assert sorted(splits[splits["engine"] == "flex"]["first_step"]) == [1, 1]
    summary = engine_spread.split_summary(splits).set_index(["baseline", "first_step"])
    w8a8_two = summary.loc[("w8a8", 2)]
    assert w8a8_two["bursts"] == 2 and w8a8_two["share"] == pytest.approx(2 / 3)
    assert summary.loc[("flex", 1), "share"] == 1.0
    # same split, same timing: the mean of [20, 80, 81, 82] is 65.75, its median 80.5
    assert summary.loc[("w8a8", 1), ["mean_ms", "p50_ms", "last_ms"]].tolist() == [65.75, 80.5, 82.0]
    before_run_10 = engine_spread.burst_splits([("old", report.load_results(ROUNDS[1]))])
    assert engine_spread.split_summary(before_run_10).empty


def test_fisher_exact_p_matches_the_textbook_tables():
    assert engine_spread.fisher_exact_p(3, 1, 1, 3) == pytest.approx(0.4857, abs=1e-4)  # tea tasting
    assert engine_spread.fisher_exact_p(10, 0, 0, 10) == pytest.approx(2 / math.comb(20, 10))
    assert engine_spread.fisher_exact_p(5, 5, 5, 5) == 1.0


def test_run_10_flexquant_bursts_started_with_one_request_more_often():
    """Run 10's committed rounds (each streamed request's TTFT kept): the split counts in the README."""
    rounds = ROOT / "docs/benchmarks/2026-11-26-llama3-8b-h100-prefill-graphs/machine-3/rounds"
    paths = sorted(rounds.glob("*.json"))
    splits = engine_spread.burst_splits([(p.stem, report.load_results(p)) for p in paths])
    contrast = engine_spread.first_step_contrast(splits).set_index("where")
    pooled = contrast.loc["batches > 1"]
    assert (pooled["flex_hits"], pooled["flex_bursts"], pooled["stock_hits"], pooled["stock_bursts"]) == (
        28, 50, 35, 100)
    assert 0.02 < pooled["fisher_p"] < 0.025 and contrast.loc["batch 16", "flex_hits"] == 11


def test_a_full_run_with_control_counts_only_w8a8_engines_as_stock():
    engines = engine_spread.engine_ttfts([("run 6", report.load_results(RUN6))])
    ratios = engine_spread.aba_ratios(engines).set_index("where")
    # Marlin and Machete engines are in the table but not in the W8A8 reference
    assert {"w4a16-marlin", "w4a16-machete"} <= set(engines["engine"])
    assert set(ratios["stock_engines"]) == {2} and "batch 256, prefill wall" in ratios.index


def test_script_prints_the_table_and_writes_it(tmp_path):
    out = tmp_path / "spread.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/engine_spread.py"), *map(str, ROUNDS), "--markdown", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert out.read_text() in done.stdout and "| batch 16, TTFT p50 |" in out.read_text()
    splits = subprocess.run(
        [sys.executable, str(ROOT / "scripts/engine_spread.py"), str(ROUNDS[0]), "--splits"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert splits.returncode == 0 and "no round kept each streamed request's TTFT" in splits.stdout
    bad = subprocess.run(
        [sys.executable, str(ROOT / "scripts/engine_spread.py"), str(ROOT / "README.md")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "README.md" in bad.stderr
