"""The figure builders: traces, colours and axis data read back from the Figure objects."""

from __future__ import annotations

import pandas as pd
import pytest

from workbench import plots, plots_compare, plots_live
from workbench.policy import DecodeRule, LayerRule, Policy, fixed_policy


def make_steps() -> pd.DataFrame:
    # 6 steps: a prefill on w8a8, decode on w4a16, then policy "all-w8a8" applied at step 4.
    rows = [
        (0, 0.0, 12.0, 5, 0, "w8a8", "pd"),
        (1, 0.1, 4.0, 0, 1, "w4a16", "pd"),
        (2, 0.2, 4.5, 0, 2, "w4a16", "pd"),
        (3, 0.3, 11.0, 7, 2, "w8a8", "pd"),
        (4, 0.4, 6.0, 0, 3, "w8a8", "all-w8a8"),
        (5, 0.5, 6.1, 0, 3, "w8a8", "all-w8a8"),
    ]
    df = pd.DataFrame(
        rows,
        columns=[
            "step",
            "t_s",
            "duration_ms",
            "num_prefill_tokens",
            "num_decode_reqs",
            "variant",
            "policy_name",
        ],
    )
    df["phase"] = ["prefill" if n > 0 else "decode" for n in df["num_prefill_tokens"]]
    return df


def shapes_x(fig) -> list[float]:
    return sorted({s.x0 for s in fig.layout.shapes})


def test_policy_change_points_finds_only_real_changes():
    changes = plots_live.policy_change_points(make_steps())
    assert changes.to_dict("records") == [{"t_s": 0.4, "policy_name": "all-w8a8"}]
    assert plots_live.policy_change_points(make_steps().iloc[:3]).empty


def test_variant_timeline_traces_colours_and_markers():
    fig = plots_live.variant_timeline_figure(make_steps())
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"w8a8 prefill", "w8a8 decode", "w4a16 decode"}
    assert by_name["w8a8 prefill"].marker.symbol == "square"
    assert by_name["w4a16 decode"].marker.symbol == "circle"
    assert by_name["w8a8 prefill"].marker.color == plots.VARIANT_COLORS["w8a8"]
    assert by_name["w4a16 decode"].marker.color == plots.VARIANT_COLORS["w4a16"]
    assert list(by_name["w8a8 prefill"].x) == [0.0, 0.3]
    assert list(by_name["w4a16 decode"].x) == [0.1, 0.2]
    # the policy switch is a vertical line at its time, annotated with the new policy
    assert shapes_x(fig) == [0.4]
    assert any("all-w8a8" in a.text for a in fig.layout.annotations)


def test_batch_composition_per_variant_and_row():
    fig = plots_live.batch_composition_figure(make_steps())
    decode = {t.name: list(t.y) for t in fig.data if t.yaxis == "y"}
    prefill = {t.name: list(t.y) for t in fig.data if t.yaxis == "y2"}
    assert decode == {"w4a16": [1, 2], "w8a8": [0, 2, 3, 3]}
    assert prefill == {"w4a16": [0, 0], "w8a8": [5, 7, 0, 0]}
    assert all(t.marker.color == plots.variant_color(t.name) for t in fig.data)
    assert 0.4 in shapes_x(fig)


def test_step_latency_has_one_trace_per_variant():
    fig = plots_live.step_latency_figure(make_steps())
    assert [t.name for t in fig.data] == ["w4a16", "w8a8"]
    assert list(fig.data[0].y) == [4.0, 4.5]


def test_rolling_latency_median_and_changes():
    req = pd.DataFrame(
        {"t_s": [1.0, 2.0, 3.0, 4.0], "ttft_ms": [10.0, 30.0, 20.0, None], "tpot_ms": [5.0, 7.0, 6.0, None]}
    )
    fig = plots_live.rolling_latency_figure(
        req, window=2, changes=pd.DataFrame({"t_s": [2.5], "policy_name": ["x"]})
    )
    rolling_ttft = next(t for t in fig.data if t.name == "TTFT rolling median")
    assert list(rolling_ttft.y) == [10.0, 20.0, 25.0]  # unfinished request dropped
    rolling_tpot = next(t for t in fig.data if t.name == "TPOT rolling median")
    assert list(rolling_tpot.y) == [5.0, 6.0, 6.5]
    assert 2.5 in shapes_x(fig)


@pytest.mark.parametrize(
    "builder",
    [plots_live.variant_timeline_figure, plots_live.batch_composition_figure, plots_live.step_latency_figure],
)
def test_empty_frames_give_a_message_not_an_error(builder):
    fig = builder(make_steps().iloc[0:0])
    assert len(fig.data) == 0
    assert fig.layout.annotations[0].text == "no data yet"


def test_accuracy_figure_bars():
    evals = pd.DataFrame(
        {
            "target": ["bf16", "w8a8", "w4a16"],
            "perplexity": [38.6, 39.0, 49.1],
            "token_agreement": [1.0, 0.93, 0.81],
        }
    )
    fig = plots_compare.accuracy_figure(evals)
    ppl, agree = fig.data
    assert list(ppl.x) == ["bf16", "w8a8", "w4a16"]
    assert list(ppl.y) == [38.6, 39.0, 49.1]
    assert list(agree.y) == [1.0, 0.93, 0.81]
    assert list(ppl.marker.color) == [plots.variant_color(t) for t in ("bf16", "w8a8", "w4a16")]


def test_policy_figure_bars_cover_batch_ranges_and_layers():
    policy = Policy(
        name="p",
        prefill="w8a8",
        decode=[DecodeRule(max_batch=8, variant="w4a16"), DecodeRule(variant="w8a8")],
        layers=[LayerRule(first=0, last=1, variant="w8a8")],
    )
    fig = plots.policy_figure(policy, num_layers=4, max_batch=20)
    bars = [
        (t.y[0], t.base[0], t.base[0] + t.x[0], t.name) for t in fig.data if t.name != "follow step policy"
    ]
    assert ("prefill", 0.5, 20.5, "w8a8") in bars
    assert ("decode", 0.5, 8.5, "w4a16") in bars
    assert ("decode", 8.5, 20.5, "w8a8") in bars
    assert ("layers", -0.5, 1.5, "w8a8") in bars
    free = next(t for t in fig.data if t.name == "follow step policy")
    assert list(free.base) == [1.5, 2.5]  # layers 2 and 3
    # each variant appears once in the legend
    assert sorted(t.name for t in fig.data if t.showlegend is not False) == [
        "follow step policy",
        "w4a16",
        "w8a8",
    ]


def test_policy_figure_fixed_policy_is_one_colour():
    fig = plots.policy_figure(fixed_policy("w4a16"))
    assert {t.marker.color for t in fig.data} == {plots.VARIANT_COLORS["w4a16"]}


def make_bench() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "policy": ["a", "a", "b", "b"],
            "rate": [1.0, 2.0, 1.0, 2.0],
            "ttft_p50_ms": [100.0, 120.0, 90.0, 150.0],
            "tpot_p50_ms": [20.0, 25.0, 15.0, 18.0],
        }
    )


def test_pick_winner_lowest_mean():
    assert plots_compare.pick_winner(make_bench()) == "b"
    assert plots_compare.pick_winner(make_bench(), "ttft_p50_ms") == "a"
    assert plots_compare.pick_winner(make_bench().iloc[0:0]) is None


def test_compare_figure_highlights_winner():
    fig = plots_compare.compare_figure(make_bench())
    assert len(fig.data) == 4
    winner = [t for t in fig.data if t.name == "b ★"]
    loser = [t for t in fig.data if t.name == "a"]
    assert len(winner) == 2 and len(loser) == 2
    assert all(t.line.width > loser[0].line.width for t in winner)
    assert list(winner[0].x) == [1.0, 2.0] and list(winner[1].y) == [15.0, 18.0]
    assert "winner on tpot_p50_ms: b" in fig.layout.title.text


def test_variant_color_stable_for_unknown_names():
    assert plots.variant_color("w4a8") == plots.variant_color("w4a8")
    assert plots.variant_color("w8a8") == "#1f77b4"
