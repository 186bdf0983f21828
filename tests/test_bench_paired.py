"""Engines measured in alternation: workbench/bench/paired.py, serve.py's `live_steps` option, and
scripts/gpu/paired_engines.py end to end.

- `parse_histograms` on a Prometheus text exposition as vLLM 0.26 writes it (label sets added,
  look-alike metrics ignored), `engine_means` between two scrapes, `cycle_orders` (rotation),
  `pair_summary` (per-cycle ratios, interval, goal-1 verdict), `step_split` and `decode_saving` on
  hand-made step telemetry whose expected numbers are worked out here;
- `ServerHandle(..., live_steps=False)` with a real subprocess that answers /health and a real SQLite
  DB: no step is copied while it serves until `import_new_steps()`, the rest arrives at `stop()`;
  with `live_steps=True` the importer thread copies them by itself; `_StepsImporter.read_new()`
  called from several threads imports each line once;
- the paired script on the CPU runtime with the tiny merged checkpoint: real servers, real HTTP, the
  paired.json it writes and the report it prints.
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlmodel import Session, select
from test_serve import free_port

from storage.db import open_db
from storage.models import Run, StepRecord
from workbench.bench.paired import (
    HISTOGRAMS,
    cycle_orders,
    decode_saving,
    engine_means,
    online_pair_row,
    online_pair_summary,
    pair_summary,
    parse_histograms,
    step_split,
)
from workbench.policy import fixed_policy
from workbench.runtime.serve import ServerHandle, _StepsImporter
from workbench.runtime.serve_config import ServeConfig, port_in_use
from workbench.runtime.telemetry import TelemetryWriter, create_run
from workbench.settings import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- parse_histograms / engine_means -------------------------------------------------------------

def histogram_block(metric: str, engine: str, total: str, count: str, *, header: bool) -> str:
    """One label set of a vLLM histogram as prometheus_client exposes it (buckets, sum, count, created)."""
    labels = f'engine="{engine}",model_name="bench"'
    lines = []
    if header:
        lines += [f"# HELP {metric} Histogram of the request's {metric.split(':')[1]}.",
                  f"# TYPE {metric} histogram"]
    lines += [f'{metric}_bucket{{engine="{engine}",le="{le}",model_name="bench"}} {n}'
              for le, n in (("0.005", "0.0"), ("0.05", "1.0"), ("0.5", count), ("+Inf", count))]
    lines += [f"{metric}_sum{{{labels}}} {total}",
              f"{metric}_count{{{labels}}} {count}",
              f"{metric}_created{{{labels}}} 1.7648716227e+09"]
    return "\n".join(lines)


def vllm_metrics_text() -> str:
    """/metrics of a two-engine vLLM 0.26 server: prefill and TTFT histograms on engines 0 and 1, no
    queue-time histogram, and look-alike metrics (other histograms, counters) in between."""
    prefill, ttft = HISTOGRAMS["prefill_s"], HISTOGRAMS["ttft_s"]
    kv = "vllm:request_prefill_kv_computed_tokens"
    return "\n".join([
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 1234.0',
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{engine="0",model_name="bench"} 0.0',
        histogram_block(prefill, "0", "1.5e-02", "3.0", header=True),
        histogram_block(prefill, "1", "0.0225", "2.0", header=False),
        histogram_block(kv, "0", "4096.0", "3.0", header=True),
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        'vllm:prompt_tokens_total{engine="0",model_name="bench"} 3072.0',
        histogram_block(ttft, "0", "6.0e-02", "3.0", header=True),
        histogram_block(ttft, "1", "4.5e-02", "2.0", header=False),
        histogram_block("vllm:time_to_first_token_seconds_extra", "0", "99.0", "9.0", header=True),
        "",
    ])


def test_parse_histograms_adds_label_sets_and_ignores_look_alike_metrics():
    parsed = parse_histograms(vllm_metrics_text())
    assert set(parsed) == {"prefill_s", "ttft_s"}  # no queue-time histogram in the text: no key
    prefill_sum, prefill_count = parsed["prefill_s"]
    assert prefill_sum == pytest.approx(0.015 + 0.0225)
    assert prefill_count == 5.0
    assert parsed["ttft_s"] == pytest.approx((0.06 + 0.045, 5.0))


def test_parse_histograms_of_one_label_set_reads_its_sum_and_count():
    text = histogram_block(HISTOGRAMS["queue_s"], "0", "2.5e-03", "4.0", header=True)
    assert parse_histograms(text) == {"queue_s": pytest.approx((0.0025, 4.0))}
    assert parse_histograms("# HELP nothing here\n") == {}


def test_engine_means_divide_the_new_sum_by_the_new_requests():
    before = {"queue_s": (0.10, 4.0), "prefill_s": (1.00, 4.0), "ttft_s": (2.00, 4.0)}
    after = {"prefill_s": (1.60, 7.0), "ttft_s": (2.00, 4.0)}
    means = engine_means(before, after)
    assert set(means) == set(HISTOGRAMS)
    assert means["prefill_s"] == pytest.approx(0.6 / 3)
    assert means["ttft_s"] is None  # no request finished between the scrapes
    assert means["queue_s"] is None  # gone from the second scrape
    assert engine_means({}, after) == dict.fromkeys(HISTOGRAMS)


def test_engine_means_of_two_parsed_scrapes():
    first = parse_histograms(vllm_metrics_text())
    second_text = vllm_metrics_text().replace(
        'vllm:request_prefill_time_seconds_sum{engine="1",model_name="bench"} 0.0225',
        'vllm:request_prefill_time_seconds_sum{engine="1",model_name="bench"} 0.0625').replace(
        'vllm:request_prefill_time_seconds_count{engine="1",model_name="bench"} 2.0',
        'vllm:request_prefill_time_seconds_count{engine="1",model_name="bench"} 4.0')
    means = engine_means(first, parse_histograms(second_text))
    assert means["prefill_s"] == pytest.approx(0.04 / 2)
    assert means["ttft_s"] is None and means["queue_s"] is None


# --- cycle_orders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("conditions", [["w8a8", "flex", "flex-live"], ["a", "b", "c", "d"], ["x", "y"]])
def test_cycle_orders_put_each_condition_at_each_position_equally_often(conditions):
    k = 4
    orders = cycle_orders(conditions, len(conditions) * k)
    assert len(orders) == len(conditions) * k
    for order in orders:
        assert sorted(order) == sorted(conditions)
    for position in range(len(conditions)):
        assert Counter(order[position] for order in orders) == dict.fromkeys(conditions, k)
    assert orders[0] == conditions  # the first cycle runs them in the order given


def test_cycle_orders_stop_at_the_number_of_cycles():
    assert len(cycle_orders(["a", "b", "c"], 5)) == 5
    assert cycle_orders(["a", "b", "c"], 0) == []


# --- pair_summary ----------------------------------------------------------------------------------

def burst_rows(ratio_of: dict[tuple[str, int], list[float]], cycles: int = 12) -> list[dict]:
    """Burst rows where each condition's wall_s is its ratio times the cycle's w8a8 wall_s; the w8a8
    wall_s moves from cycle to cycle (and between batches) as a machine's drift would."""
    rows = []
    for cycle in range(cycles):
        for batch in (1, 4):
            base = 0.020 * batch * (1 + 0.37 * math.sin(cycle))
            rows.append({"cycle": cycle, "condition": "w8a8", "batch": batch, "wall_s": base})
            for (condition, b), ratios in ratio_of.items():
                if b == batch:
                    rows.append({"cycle": cycle, "condition": condition, "batch": batch,
                                 "wall_s": base * ratios[cycle]})
    return rows


def summary_by(summary: list[dict]) -> dict[tuple, dict]:
    return {(s["condition"], s["batch"], s["measure"]): s for s in summary}


def test_pair_summary_of_a_constant_ratio_meets_the_goal_at_102_and_misses_it_at_110():
    rows = burst_rows({("flex", 1): [1.02] * 12, ("flex", 4): [1.10] * 12})
    summary = summary_by(pair_summary(rows, baseline="w8a8"))
    assert set(summary) == {("flex", 1, "wall_s"), ("flex", 4, "wall_s")}  # no row for the baseline

    small = summary[("flex", 1, "wall_s")]
    assert small["cycles"] == 12
    assert small["ratio_median"] == pytest.approx(1.02)
    assert small["ratio_geomean"] == pytest.approx(1.02)
    assert (small["ratio_low"], small["ratio_high"]) == pytest.approx((1.02, 1.02))
    assert 0.95 <= small["coverage"] < 1
    assert small["verdict"] == "met"
    base_1 = [r["wall_s"] for r in rows if r["condition"] == "w8a8" and r["batch"] == 1]
    assert small["baseline_median"] == pytest.approx(statistics.median(base_1))
    assert small["median"] == pytest.approx(1.02 * statistics.median(base_1))

    large = summary[("flex", 4, "wall_s")]
    assert large["ratio_median"] == pytest.approx(1.10)
    assert (large["ratio_low"], large["ratio_high"]) == pytest.approx((1.10, 1.10))
    assert large["verdict"] == "NOT met"


def test_pair_summary_leaves_the_verdict_open_when_the_interval_crosses_the_goal():
    mixed = [0.98 + 0.08 * i / 11 for i in range(12)]  # 0.98 .. 1.06, shuffled over the cycles
    mixed = mixed[5:] + mixed[:5]
    summary = summary_by(pair_summary(burst_rows({("flex", 1): mixed}), baseline="w8a8"))
    row = summary[("flex", 1, "wall_s")]
    assert row["ratio_low"] < 1.03 < row["ratio_high"]
    assert 0.98 <= row["ratio_low"] and row["ratio_high"] <= 1.06
    assert row["ratio_median"] == pytest.approx(statistics.median(mixed))
    assert row["verdict"] == "not resolved (interval across the goal)"
    assert pair_summary(burst_rows({("flex", 1): mixed}), baseline="w8a8", goal=1.07)[0]["verdict"] == "met"


def test_pair_summary_leaves_out_a_cycle_whose_measure_is_missing():
    rows = burst_rows({("flex", 1): [1.02] * 12, ("flex-live", 1): [1.05] * 12})
    for r in rows:  # the engine's prefill time beside the wall time, 0.8 of it
        r["prefill_s"] = r["wall_s"] * 0.8
    flex_cycle_3 = next(r for r in rows if (r["cycle"], r["condition"], r["batch"]) == (3, "flex", 1))
    flex_cycle_3["prefill_s"] = None
    baseline_cycle_7 = next(r for r in rows if (r["cycle"], r["condition"], r["batch"]) == (7, "w8a8", 1))
    del baseline_cycle_7["prefill_s"]
    summary = summary_by(pair_summary(rows, baseline="w8a8"))
    assert {key[0] for key in summary} == {"flex", "flex-live"}
    assert summary[("flex", 1, "wall_s")]["cycles"] == 12
    assert summary[("flex", 1, "prefill_s")]["cycles"] == 10  # cycle 3 (flex) and 7 (baseline) left out
    assert summary[("flex-live", 1, "prefill_s")]["cycles"] == 11  # only the baseline's cycle 7
    assert summary[("flex-live", 1, "prefill_s")]["ratio_median"] == pytest.approx(1.05)
    assert not any(key[2] in ("queue_s", "ttft_s") for key in summary)  # never measured: no rows


def test_pair_summary_skips_a_cycle_without_its_baseline_burst():
    rows = [r for r in burst_rows({("flex", 1): [1.02] * 12})
            if not (r["condition"] == "w8a8" and r["cycle"] == 0 and r["batch"] == 1)]
    summary = summary_by(pair_summary(rows, baseline="w8a8"))
    assert summary[("flex", 1, "wall_s")]["cycles"] == 11


# --- step_split / decode_saving --------------------------------------------------------------------

def step(ts, variant, duration_ms, prefill_tokens, decode_reqs) -> dict:
    return {"ts": ts, "variant": variant, "duration_ms": duration_ms,
            "num_prefill_tokens": prefill_tokens, "num_decode_reqs": decode_reqs}


# window [10, 20]: two prefill-carrying steps (one mixed with decodes), six decode-only steps
WINDOW_STEPS = [
    step(9.9, "w8a8", 100.0, 512, 0),  # before the window
    step(10.0, "w8a8", 20.0, 512, 0),
    step(11.0, "w8a8", 16.0, 256, 3),
    step(12.0, "w4a16", 4.0, 0, 1),
    step(13.0, "w4a16", 6.0, 0, 1),
    step(14.0, "w8a8", 8.0, 0, 1),
    step(15.0, "w8a8", 10.0, 0, 20),
    step(16.0, "w8a8", 30.0, 0, 300),
    step(17.0, "w4a16", None, 0, 2),  # no duration (the last step before a pause): not counted
    step(20.0, "w4a16", 12.0, 0, 18),
    step(20.1, "w4a16", 50.0, 0, 1),  # after the window
]


def test_step_split_divides_the_window_into_prefill_and_decode_steps():
    split = step_split(WINDOW_STEPS, 10.0, 20.0)
    assert split["steps"] == 8
    assert split["prefill_steps"] == 2 and split["decode_steps"] == 6
    assert split["prefill_ms"] == pytest.approx(20.0 + 16.0)
    assert split["decode_ms"] == pytest.approx(4.0 + 6.0 + 8.0 + 10.0 + 30.0 + 12.0)
    assert split["total_ms"] == pytest.approx(106.0)
    assert split["prefill_time_share"] == pytest.approx(36.0 / 106.0, abs=1e-4)
    assert split["prefill_step_mean_ms"] == pytest.approx(18.0)
    assert split["prefill_tokens_mean"] == pytest.approx(384.0)
    assert split["decode_by_batch"] == {
        "1": {"w4a16": {"steps": 2, "mean_ms": 5.0, "total_ms": 10.0},
              "w8a8": {"steps": 1, "mean_ms": 8.0, "total_ms": 8.0}},
        "17-24": {"w4a16": {"steps": 1, "mean_ms": 12.0, "total_ms": 12.0},
                  "w8a8": {"steps": 1, "mean_ms": 10.0, "total_ms": 10.0}},
        ">256": {"w8a8": {"steps": 1, "mean_ms": 30.0, "total_ms": 30.0}},
    }
    assert list(split["decode_by_batch"]) == ["1", "17-24", ">256"]


@pytest.mark.parametrize(("batch", "label"), [
    (1, "1"), (2, "2-8"), (8, "2-8"), (9, "9-16"), (17, "17-24"), (20, "17-24"), (24, "17-24"),
    (33, "33-48"), (129, "129-192"), (256, "193-256"), (257, ">256"), (300, ">256"),
])
def test_step_split_labels_the_decode_batch_ranges(batch, label):
    split = step_split([step(1.0, "w8a8", 2.0, 0, batch)], 0.0, 2.0)
    assert list(split["decode_by_batch"]) == [label]


def test_step_split_orders_batch_ranges_numerically():
    steps = [step(float(i), "w8a8", 1.0, 0, b) for i, b in enumerate((300, 100, 9, 1, 200, 40))]
    split = step_split(steps, 0.0, 10.0)
    assert list(split["decode_by_batch"]) == ["1", "9-16", "33-48", "97-128", "193-256", ">256"]


def test_step_split_of_an_empty_window():
    split = step_split(WINDOW_STEPS, 30.0, 40.0)
    assert (split["steps"], split["total_ms"], split["prefill_time_share"]) == (0, 0, None)
    assert split["prefill_step_mean_ms"] is None and split["decode_by_batch"] == {}
    assert decode_saving(split, [])["saved_share_of_window"] is None


def test_decode_saving_prices_each_decode_step_at_the_fastest_variant_of_its_range():
    split = step_split(WINDOW_STEPS, 10.0, 20.0)
    other_policy = step_split([
        step(30.0, "w8a8", 3.0, 0, 1),  # batch 1 on W8A8 under the other policy: 3 ms, the fastest
        step(31.0, "w8a8", 3.0, 0, 1),
        step(32.0, "w8a8", 11.0, 0, 22),  # 17-24: slower than this window's 10 ms on W8A8
        step(33.0, "w8a8", 25.0, 64, 0),  # a prefill step: not a decode price
    ], 30.0, 40.0)
    saving = decode_saving(split, [other_policy])
    # batch 1: 3 steps at 3 ms; 17-24: 2 steps at 10 ms; >256: 1 step at 30 ms (only this window has it)
    best = 3 * 3.0 + 2 * 10.0 + 1 * 30.0
    assert saving["decode_ms_best"] == pytest.approx(best)
    assert saving["saved_ms"] == pytest.approx(70.0 - best)
    assert saving["saved_share_of_window"] == pytest.approx((70.0 - best) / 106.0, abs=1e-4)

    alone = decode_saving(split, [])  # the window's own fastest variant per range: 5 ms at batch 1
    assert alone["decode_ms_best"] == pytest.approx(3 * 5.0 + 2 * 10.0 + 30.0)
    assert alone["saved_ms"] == pytest.approx(70.0 - 65.0)


# --- serve.py: live_steps ---------------------------------------------------------------------------

HEALTH_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


def step_line(n: int, variant: str = "w8a8") -> str:
    return json.dumps({"step": n, "ts": 100.0 + n, "duration_ms": 2.5 + n, "num_prefill_tokens": 0,
                       "num_decode_reqs": 1 + n, "variant": variant, "policy_name": "pd",
                       "cudagraph": True, "executed": [variant]}) + "\n"


def step_numbers(db, run_id: int) -> list[int]:
    with Session(db) as s:
        rows = s.exec(select(StepRecord).where(StepRecord.run_id == run_id).order_by(StepRecord.id)).all()
        return [r.step for r in rows]


def wait_for_steps(db, run_id: int, expected: list[int], timeout: float = 5.0) -> list[int]:
    """The run's step numbers once they equal `expected` or `timeout` passed (the telemetry writer
    commits its buffer every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while (got := step_numbers(db, run_id)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


@pytest.fixture
def vllm_like_handle(tmp_path):
    """make(live_steps) -> (ServerHandle, db, steps file): a real process answering /health in place
    of vLLM, a Run row in a real DB, and the plugin's step telemetry file (empty)."""
    db = open_db(tmp_path / "db.sqlite")
    handles = []

    def make(live_steps: bool):
        run_id = create_run(db, runtime="vllm", checkpoint_path="/ck", policy_name="pd")
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(port)], start_new_session=True)
        steps = tmp_path / f"run-{run_id}-steps.jsonl"
        steps.write_text("")
        cfg = ServeConfig(checkpoint=tmp_path / "ckpt", policy=fixed_policy("w8a8"), port=port)
        handle = ServerHandle(cfg, "vllm", proc, run_id, tmp_path / f"run-{run_id}.log", db,
                              steps_file=steps, live_steps=live_steps)
        handles.append(handle)
        return handle, steps

    yield make, db
    for handle in handles:
        handle.stop(timeout=2)
    db.dispose()


def test_without_live_steps_the_telemetry_waits_for_import_new_steps_and_stop(vllm_like_handle):
    make, db = vllm_like_handle
    handle, steps = make(live_steps=False)
    assert handle.steps_file == steps
    handle.wait_healthy(30)
    half = step_line(2)
    steps.write_text(step_line(0) + step_line(1) + half[:25])  # the last line is half-written
    time.sleep(1.5)  # three periods of the live importer: it must not be running
    assert step_numbers(db, handle.run_id) == []

    handle.import_new_steps()
    assert wait_for_steps(db, handle.run_id, [0, 1]) == [0, 1]
    time.sleep(1.0)
    assert step_numbers(db, handle.run_id) == [0, 1]  # nothing copied twice, nothing after

    with steps.open("a") as f:
        f.write(half[25:] + step_line(3))
    time.sleep(1.0)
    assert step_numbers(db, handle.run_id) == [0, 1]  # still no live copy
    handle.stop(timeout=5)
    assert handle.proc.poll() == -signal.SIGTERM
    assert step_numbers(db, handle.run_id) == [0, 1, 2, 3]
    with Session(db) as s:
        run = s.get(Run, handle.run_id)
        assert run.status == "ended" and run.ended_at is not None
    recorded = step_line(3)
    with Session(db) as s:
        last = s.exec(select(StepRecord).where(StepRecord.run_id == handle.run_id,
                                               StepRecord.step == 3)).one()
        assert (last.ts, last.duration_ms, last.num_decode_reqs, last.variant) == tuple(
            json.loads(recorded)[k] for k in ("ts", "duration_ms", "num_decode_reqs", "variant"))


def test_with_live_steps_the_importer_copies_while_the_server_runs(vllm_like_handle):
    make, db = vllm_like_handle
    handle, steps = make(live_steps=True)
    handle.wait_healthy(30)
    steps.write_text(step_line(0) + step_line(1, "w4a16"))
    assert wait_for_steps(db, handle.run_id, [0, 1]) == [0, 1]
    assert handle.is_running()
    handle.import_new_steps()  # beside the live thread: nothing is read twice
    with steps.open("a") as f:
        f.write(step_line(2))
    assert wait_for_steps(db, handle.run_id, [0, 1, 2]) == [0, 1, 2]
    handle.stop(timeout=5)
    assert step_numbers(db, handle.run_id) == [0, 1, 2]


def test_import_new_steps_without_a_steps_file_does_nothing(vllm_like_handle, tmp_path):
    make, db = vllm_like_handle
    handle, _ = make(live_steps=False)
    cpu = ServerHandle(handle.cfg, "cpu", handle.proc, handle.run_id, handle.log_path, db, live_steps=False)
    assert cpu.steps_file is None
    cpu.import_new_steps()
    assert step_numbers(db, handle.run_id) == []


def test_steps_importer_read_new_from_several_threads_imports_each_line_once(db_engine, tmp_path):
    run_id = create_run(db_engine, runtime="vllm", checkpoint_path="/ck", policy_name="pd")
    path = tmp_path / "steps.jsonl"
    importer = _StepsImporter(path, TelemetryWriter(db_engine, run_id))
    importer.read_new()  # no file yet: nothing, no error
    # long lines (JSON allows the padding): a read takes long enough for the threads to overlap
    path.write_text("".join(step_line(n).replace("\n", " " * 50_000 + "\n") for n in range(400)))
    start = threading.Barrier(6)
    threads = [threading.Thread(target=lambda: (start.wait(), importer.read_new())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    importer.stop()
    assert step_numbers(db_engine, run_id) == list(range(400))


# --- scripts/gpu/paired_engines.py on the CPU runtime -----------------------------------------------

def two_free_ports() -> int:
    """A port p with p and p + 1 free (the script serves W8A8 on p, FlexQuant on p + 1)."""
    for _ in range(50):
        port = free_port()
        if port < 65535 and not port_in_use("127.0.0.1", port + 1):
            return port
    raise RuntimeError("no two adjacent free ports")


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory):
    """Runs the script once: (completed process, paired.json, out folder, first port)."""
    from test_flexmodel import build_tiny_checkpoints

    ckpt, _ = build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    out = tmp_path_factory.mktemp("paired") / "out"
    port = two_free_ports()
    argv = [sys.executable, "scripts/gpu/paired_engines.py", "--w8a8", str(ckpt.parent / "w8a8"),
            "--merged", str(ckpt), "--policy", "scripts/gpu/policies/w8a8-only.yaml",
            "--policy", "scripts/gpu/policies/tuned-h100.yaml", "--runtime", "cpu", "--batches", "1,2",
            "--prompt-len", "16", "--cycles-until", "60", "--max-cycles", "3", "--rate", "4",
            "--online-duration", "1.5", "--online-output-len", "4", "--port", str(port), "--out", str(out),
            "--online-pairs", "2", "--pair-rates", "4", "--pair-window", "1.0"]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc, json.loads((out / "paired.json").read_text()), out, port


CONDITIONS = ("w8a8", "flex", "flex-live")


def test_paired_script_measures_every_condition_once_per_cycle(paired_run):
    _, record, _, port = paired_run
    assert record["status"] == "complete"
    assert record["schema"] == "flexquant-paired/1"
    assert {label: e["port"] for label, e in record["engines"].items()} == {"w8a8": port, "flex": port + 1}
    bursts = record["bursts"]
    assert len(bursts) == 3 * len(CONDITIONS) * 2
    assert all(b["wall_s"] > 0 for b in bursts)
    assert Counter((b["cycle"], b["condition"], b["batch"]) for b in bursts) == {
        (c, cond, b): 1 for c in range(3) for cond in CONDITIONS for b in (1, 2)}
    # the CPU runtime has no /metrics: no engine-side histogram means
    assert all(b[key] is None for b in bursts for key in HISTOGRAMS)
    firsts = []
    for cycle in range(3):
        order = [b["condition"] for b in bursts if b["cycle"] == cycle]
        blocks = [order[i] for i in range(0, len(order), 2)]  # a condition's batches run back to back
        assert order == [c for c in blocks for _ in (1, 2)]
        assert sorted(blocks) == sorted(CONDITIONS)
        firsts.append(blocks[0])
    assert sorted(firsts) == sorted(CONDITIONS)  # rotated: each condition opened one cycle


def test_paired_script_summarizes_wall_time_against_w8a8(paired_run):
    _, record, _, _ = paired_run
    summary = summary_by(record["summary"])
    assert set(summary) == {(c, b, "wall_s") for c in ("flex", "flex-live") for b in (1, 2)}
    for (condition, batch, _), s in summary.items():
        assert s["cycles"] == 3
        assert s["ratio_low"] <= s["ratio_median"] <= s["ratio_high"]
        walls = {b["cycle"]: b["wall_s"] for b in record["bursts"]
                 if (b["condition"], b["batch"]) == (condition, batch)}
        base = {b["cycle"]: b["wall_s"] for b in record["bursts"]
                if (b["condition"], b["batch"]) == ("w8a8", batch)}
        assert s["ratio_median"] == pytest.approx(statistics.median(walls[c] / base[c] for c in range(3)))


def test_paired_script_runs_the_online_windows_and_splits_flexquant_steps(paired_run):
    _, record, _, _ = paired_run
    online = {o["label"]: o for o in record["online"]}
    assert list(online) == ["flex:w8a8-only", "flex:tuned-h100", "w8a8"]
    for o in online.values():
        assert o["completed"] == o["requests"] > 0
        assert o["window"][0] < o["window"][1]
    splits = record["online_steps"]
    assert set(splits) == {"flex:w8a8-only", "flex:tuned-h100"}
    for split in splits.values():
        assert split["steps"] > 0 and split["prefill_steps"] > 0 and split["decode_steps"] > 0
        assert set(split["decode_saving"]) == {"decode_ms_best", "saved_ms", "saved_share_of_window"}
    variants = {label: {v for by_variant in s["decode_by_batch"].values() for v in by_variant}
                for label, s in splits.items()}
    assert variants["flex:w8a8-only"] == {"w8a8"}
    assert variants["flex:tuned-h100"] == {"w4a16"}  # small batches: the live-switched policy's W4A16


def test_paired_script_runs_online_pairs_in_rotated_order_and_judges_them(paired_run):
    proc, record, _, _ = paired_run
    pairs = record["online_pairs"]
    order = [(r["cycle"], r["condition"]) for r in pairs]
    assert order == [(0, "w8a8"), (0, "flex"), (1, "flex"), (1, "w8a8")]
    assert all(r["rate"] == 4.0 and r["completed"] == r["requests"] > 0 for r in pairs)
    summary = {s["measure"]: s for s in record["online_pair_summary"]}
    assert set(summary) == {"ttft_p50_ms", "tpot_p50_ms", "output_tok_s"}
    by = {(r["cycle"], r["condition"]): r for r in pairs}
    ttft_ratios = sorted(by[(c, "flex")]["ttft_p50_ms"] / by[(c, "w8a8")]["ttft_p50_ms"] for c in (0, 1))
    assert summary["ttft_p50_ms"]["ratio_median"] == pytest.approx(statistics.median(ttft_ratios))
    ttft = summary["ttft_p50_ms"]
    assert (ttft["ratio_low"], ttft["ratio_high"]) == pytest.approx(ttft_ratios)  # 2 pairs: their range
    assert summary["output_tok_s"]["verdict"] == "—"
    assert "online pairs: flex / w8a8" in proc.stdout


def test_online_pair_summary_judges_ttft_at_1_03_and_tpot_at_0_85():
    rows = []
    for pair in range(8):
        base = {"ttft_p50_ms": 50.0 + pair, "tpot_p50_ms": 10.0 + pair / 10, "output_tok_s": 2800.0}
        for condition, scale in (("w8a8", (1.0, 1.0, 1.0)), ("flex", (1.02, 0.90, 1.001))):
            summary = {"ttft_ms": {"p50": base["ttft_p50_ms"] * scale[0]},
                       "tpot_ms": {"p50": base["tpot_p50_ms"] * scale[1]},
                       "output_throughput_tok_s": base["output_tok_s"] * scale[2],
                       "completed": 9, "requests": 9}
            rows.append(online_pair_row(pair, condition, 24.0, summary))
    out = {s["measure"]: s for s in online_pair_summary(rows, "w8a8")}
    assert out["ttft_p50_ms"]["ratio_median"] == pytest.approx(1.02)
    assert out["ttft_p50_ms"]["verdict"] == "met"  # within goal 1's 1.03
    assert out["tpot_p50_ms"]["ratio_median"] == pytest.approx(0.90)
    assert out["tpot_p50_ms"]["verdict"] == "NOT met"  # 10% below W8A8 is short of goal 3's 15%
    assert out["output_tok_s"]["verdict"] == "—"
    assert out["output_tok_s"]["ratio_median"] == pytest.approx(1.001)
    assert all(s["rate"] == 24.0 and s["cycles"] == 8 for s in out.values())


def test_paired_script_prints_its_report_and_ends_both_runs(paired_run):
    proc, _, out, _ = paired_run
    assert "paired bursts" in proc.stdout
    assert "online flex:tuned-h100" in proc.stdout
    assert "steps flex:w8a8-only" in proc.stdout
    db = open_db(Settings(data_dir=out / "data").db_path)
    try:
        with Session(db) as s:
            runs = s.exec(select(Run)).all()
    finally:
        db.dispose()
    assert len(runs) == 2
    assert all(r.status == "ended" and r.ended_at is not None for r in runs)


def test_decode_saving_is_zero_for_a_window_already_on_its_only_variant():
    """Priced from the sums, not the rounded means: 900 steps whose mean (1.00023 ms) rounds to 1.0
    would otherwise report ~0.2 ms saved where nothing could be saved."""
    steps = [step(1.0 + i * 1e-3, "w4a16", 1.0 if i % 100 else 1.207, 0, 1) for i in range(900)]
    split = step_split(steps, 0.0, 10.0)
    assert split["decode_by_batch"]["1"]["w4a16"]["mean_ms"] == pytest.approx(1.0023, abs=1e-3)
    assert decode_saving(split, [])["saved_ms"] == pytest.approx(0.0, abs=1e-3)


# --- the report over the committed H100 runs (docs/benchmarks/2026-11-26-llama3-8b-h100-paired) --------

PAIRED_DOCS = REPO_ROOT / "docs" / "benchmarks" / "2026-11-26-llama3-8b-h100-paired"


def committed_runs() -> list[tuple[str, dict]]:
    paths = sorted(PAIRED_DOCS.glob("machine-*/paired.json"))
    return [(p.parent.name, json.loads(p.read_text())) for p in paths]


def test_goal1_table_pools_the_committed_cycles_within_their_machines():
    from workbench.bench.paired_report import goal1_markdown

    records = committed_runs()
    with_bursts = [name for name, rec in records if rec.get("bursts")]
    assert len(with_bursts) >= 3 and len(records) > len(with_bursts)  # one run has online pairs only
    table = goal1_markdown(records)
    header = table.splitlines()[0]
    assert all(name in header for name in with_bursts) and "pooled" in header
    assert not any(name in header for name, rec in records if not rec.get("bursts"))
    # the pooled batch-1 wall ratio is the median over every machine's own cycles
    ratios = []
    for _, rec in records:
        by = {(b["cycle"], b["condition"]): b for b in rec["bursts"] if b["batch"] == 1}
        ratios += [by[(c, "flex")]["wall_s"] / by[(c, "w8a8")]["wall_s"]
                   for (c, cond) in by if cond == "w8a8" and (c, "flex") in by]
    row = next(line for line in table.splitlines() if line.startswith("| 1 | client wall |"))
    pooled_cell = row.split(" | ")[-2]
    assert f"{statistics.median(ratios):.3f}×" in pooled_cell and f"({len(ratios)})" in pooled_cell


def test_paired_report_script_prints_every_section_for_the_committed_runs():
    paths = [str(p) for p in sorted(PAIRED_DOCS.glob("machine-*/paired.json"))]
    proc = subprocess.run([sys.executable, "scripts/paired_report.py", "--full", *paths], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for section in ("## Goal 1", "## Step telemetry copied", "## Online pairs", "## Online windows"):
        assert section in proc.stdout
    # a TPOT-vs-stock cell recomputed from one committed window
    name, rec = next((n, r) for n, r in committed_runs() if r.get("online"))
    tuned = next(o for o in rec["online"] if o["label"] == "flex:tuned-h100")
    stock = next(o for o in rec["online"] if o["label"] == "w8a8")
    assert f"{tuned['tpot_ms']['p50'] / stock['tpot_ms']['p50'] - 1:+.1%}" in proc.stdout
    bad = subprocess.run([sys.executable, "scripts/paired_report.py", str(PAIRED_DOCS / "nope.json")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_paired_report_pools_online_pairs_within_machines_and_prints_only_measured_sections():
    """Runs 15, 17 and 18 (machine-4 to -6) have online pairs only: no burst or window section, and a
    pooled row whose median is over every pair's own FlexQuant / W8A8 ratio."""
    runs = [(n, r) for n, r in committed_runs() if r.get("online_pairs")]
    assert [n for n, _ in runs] == ["machine-4", "machine-5", "machine-6"]
    proc = subprocess.run([sys.executable, "scripts/paired_report.py",
                           *(str(PAIRED_DOCS / n / "paired.json") for n, _ in runs)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "## Online pairs" in proc.stdout
    assert "## Goal 1" not in proc.stdout and "## Online windows" not in proc.stdout
    ratios = []
    for _, rec in runs:
        by = {(p["cycle"], p["condition"]): p for p in rec["online_pairs"] if p["rate"] == 24}
        ratios += [by[(c, "flex")]["ttft_p50_ms"] / by[(c, "w8a8")]["ttft_p50_ms"]
                   for (c, cond) in by if cond == "w8a8" and (c, "flex") in by]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| pooled | 24 | ttft_p50_ms |"))
    assert f"{statistics.median(ratios):.3f}×" in row and f"({len(ratios)})" in row and len(ratios) == 18


def test_paired_script_marks_a_failed_run_failed_with_its_error(tmp_path):
    """An engine that cannot start (here: no checkpoint) ends the run "failed", with the reason kept."""
    out = tmp_path / "out"
    argv = [sys.executable, "scripts/gpu/paired_engines.py", "--w8a8", str(tmp_path / "none"),
            "--merged", str(tmp_path / "none"), "--policy", "scripts/gpu/policies/w8a8-only.yaml",
            "--runtime", "cpu", "--port", str(two_free_ports()), "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    record = json.loads((out / "paired.json").read_text())
    assert record["status"] == "failed"
    assert "config.json" in record["error"] and record["ended_at"] >= record["started_at"]

