"""The benchmark harness end to end on the CPU reference runtime: real server processes on the tiny
merged checkpoint, real HTTP (token-id prompts, streamed and not), the real auto-tuner, a real DB.

What runs on the GPU (stock vLLM baselines, FlexQuant in vLLM) differs only in how each engine is
started (tests/test_vllm_launch.py covers the command); the timings here only have to be sane.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from sqlmodel import Session, select
from test_serve import PD, free_port

from storage.db import open_db
from storage.models import PolicyRecord, Run
from workbench.bench import report
from workbench.bench.engines import (
    BenchSpec,
    Target,
    baseline_target,
    control_target,
    engine_config,
    hinted_kernel,
)
from workbench.bench.report import control_drift
from workbench.bench.runner import SCHEMA, _autotune, run_bench, total_units
from workbench.policy import fixed_policy, parse_policy
from workbench.settings import Settings


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from test_flexmodel import build_tiny_checkpoints

    ckpt, _ = build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    return ckpt


def spec_for_cpu(**kw) -> BenchSpec:
    # 16 output tokens against a 1-token prefill run: the decode time stands clear of CPU noise
    base = dict(
        prompt_len=16,
        output_len=16,
        batches=(1, 3),
        rates=(4.0,),
        online_output_len=4,
        online_duration_s=1.5,
        repeats_small=3,
        warmup_s=0.2,
        runtime="cpu",
        cpu_threads=1,
        port=free_port(),
    )
    return BenchSpec(**{**base, **kw})


def pinned(label: str, ckpt) -> Target:
    """On the CPU runtime a baseline is the merged checkpoint pinned to one variant."""
    return Target(label=label, kind="flex", checkpoint=ckpt, variant=label, policies=[fixed_policy(label)])


def test_bench_measures_every_target_tunes_a_policy_and_records_it(tiny_ckpt, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    db = open_db(settings.db_path)
    spec = spec_for_cpu()
    targets = [
        Target(label="flex", kind="flex", checkpoint=tiny_ckpt, policies=[PD], auto_policy=True),
        pinned("w8a8", tiny_ckpt),
        pinned("w4a16", tiny_ckpt),
    ]
    seen = []
    out = tmp_path / "bench" / "results.json"
    results = run_bench(
        spec,
        targets,
        out_json=out,
        db=db,
        settings=settings,
        command="test",
        progress=lambda what, done: seen.append((what, done)),
    )
    assert results["status"] == "complete" and results["errors"] == [], results["errors"]
    assert json.loads(out.read_text()) == json.loads(json.dumps(results)) and results["schema"] == SCHEMA
    # baselines first (the auto policy is tuned from them), then FlexQuant with auto measured first
    assert [t["label"] for t in results["targets"]] == ["w8a8", "w4a16", "flex"]
    assert results["targets"][2]["policies"] == ["auto", "pd"]
    labels = ["w8a8:all-w8a8", "w4a16:all-w4a16", "flex:auto", "flex:pd"]
    assert [(r["label"], r["batch"]) for r in results["sweep"]] == [
        (lab, b) for lab in labels for b in (1, 3)
    ]
    for row in results["sweep"]:
        assert 0 < row["prefill_s"] < row["decode_s"] and row["tpot_ms"] > 0, row
        assert len(row["prefill_s_samples"]) == len(row["decode_s_samples"]) == row["repeats"] == 3
        assert row["prefill_s"] == sorted(row["prefill_s_samples"])[1]  # the median of the samples
        # streamed closed batch: each request's own first token and decode rate
        assert 0 < row["ttft_p50_ms"] < row["decode_s"] * 1000 and row["tpot_req_p50_ms"] > 0, row
        assert row["tpot_req_p50_ms"] == sorted(row["tpot_req_p50_samples"])[1]
        # last minus first TTFT of each streamed burst: 0 for one request, never negative
        spreads = row["ttft_spread_ms_samples"]
        assert len(spreads) == 3 and all(s >= 0 for s in spreads) and (row["batch"] > 1 or spreads == [0] * 3)
        # each request's TTFT, per burst; the mean is the median over bursts of each burst's mean
        bursts = row["ttft_ms_requests"]
        assert [len(b) for b in bursts] == [row["batch"]] * 3, bursts
        assert [max(b) - min(b) for b in bursts] == pytest.approx(spreads, abs=0.02)  # kept to 0.01 ms
        burst_means = sorted(sum(b) / len(b) for b in bursts)
        assert row["ttft_mean_ms"] == pytest.approx(burst_means[1], abs=0.01)
    assert [r["label"] for r in results["online"]] == labels
    for row in results["online"]:
        assert row["completed"] == row["requests"] > 0 and row["errors"] == 0, row
        assert row["ttft_ms"]["p50"] > 0 and row["tpot_ms"]["p50"] > 0 and row["output_throughput_tok_s"] > 0
    # which variant computed: pinned baselines run only theirs; pd (prefill w8a8, decode<=1 w4a16) mixes
    shares = {(r["label"], r["batch"]): r["variant_share"] for r in results["sweep"]}
    assert shares[("w8a8:all-w8a8", 3)] == {"w8a8": 1.0} and shares[("w4a16:all-w4a16", 1)] == {"w4a16": 1.0}
    assert set(shares[("flex:pd", 1)]) == {"w8a8", "w4a16"}
    # each measurement's wall-clock window, in order, to find its steps in the telemetry
    windows = [r["window"] for r in results["sweep"] + results["online"]]
    assert all(t0 < t1 for t0, t1 in windows)
    assert results["sweep"][1]["window"][0] >= results["sweep"][0]["window"][1]
    # the tuned policy is stored with its evidence, and named in the results
    tuned = results["autotune"]
    with Session(db) as s:
        record = s.exec(select(PolicyRecord).where(PolicyRecord.name == "auto")).one()
        bench_run = s.get(Run, results["run_id"])
    assert record.origin == "autotune" and record.body_yaml == tuned["policy_yaml"] and record.data_json
    assert bench_run.kind == "bench" and bench_run.status == "ended"
    assert json.loads(bench_run.result_json)["status"] == "complete"
    assert all(t["engine_start_s"] > 0 and t["weight_bytes_b1"] > 0 for t in results["targets"])
    # every policy was measured after a warm-up load (one list entry per policy)
    assert [len(t["warmup_bursts"]) for t in results["targets"]] == [1, 1, 2]
    assert all(n >= 1 for t in results["targets"] for n in t["warmup_bursts"])
    assert seen[-1][1] == total_units(spec, targets) - 1 and seen[0][0] == "starting w8a8"

    # --resume with the same workload keeps every measured target and starts no engine
    again = run_bench(spec, targets, out_json=out, db=db, settings=settings, command="again", resume=True)
    assert again["sweep"] == results["sweep"] and again["resumed"][0]["kept"] == ["flex", "w4a16", "w8a8"]
    with pytest.raises(ValueError, match="another workload"):
        run_bench(
            spec_for_cpu(output_len=5, port=spec.port),
            targets,
            out_json=out,
            db=db,
            settings=settings,
            resume=True,
        )
    db.dispose()


def test_interrupted_bench_keeps_what_it_measured_and_says_so(tiny_ckpt, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    db = open_db(settings.db_path)
    out = tmp_path / "results.json"

    def stop_at_the_online_load(what: str, done: int) -> None:
        if "req/s" in what:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(
            spec_for_cpu(),
            [pinned("w8a8", tiny_ckpt)],
            out_json=out,
            db=db,
            settings=settings,
            progress=stop_at_the_online_load,
        )
    saved = json.loads(out.read_text())
    assert saved["status"] == "interrupted" and saved["ended_at"] is not None
    assert [r["batch"] for r in saved["sweep"]] == [1, 3] and saved["online"] == []
    with Session(db) as s:
        runs = s.exec(select(Run)).all()
    assert {r.kind: r.status for r in runs}["bench"] == "interrupted"
    assert all(r.status != "running" for r in runs)  # the server's own Run was ended by stop()
    db.dispose()


def test_bench_inputs_are_checked_before_any_engine_starts(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="unknown baseline 'w3a3'"):
        baseline_target("w3a3", tiny_ckpt)
    with pytest.raises(ValueError, match="merged FlexQuant checkpoint"):
        baseline_target("w8a8", tiny_ckpt)
    with pytest.raises(ValueError, match="no config.json"):
        baseline_target("w8a8", tmp_path)
    with pytest.raises(ValueError, match="batch sizes"):
        BenchSpec(batches=(0,))
    with pytest.raises(ValueError, match="TPOT needs 2"):
        BenchSpec(output_len=1)
    settings = Settings(data_dir=tmp_path / "data")
    db = open_db(settings.db_path)
    with pytest.raises(ValueError, match="nothing to measure"):
        run_bench(spec_for_cpu(), [], out_json=tmp_path / "r.json", db=db, settings=settings)
    # a stock baseline cannot run on the CPU runtime: recorded as that target's error, not a crash
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 300}))
    results = run_bench(
        spec_for_cpu(),
        [baseline_target("w8a8", plain)],
        out_json=tmp_path / "r.json",
        db=db,
        settings=settings,
    )
    assert results["status"] == "failed" and "need the vLLM runtime" in results["errors"][0]
    db.dispose()


def test_time_budget_stops_before_the_next_engine_and_resume_goes_on(tiny_ckpt, tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    db = open_db(settings.db_path)
    out, spec = tmp_path / "results.json", spec_for_cpu(rates=())
    w8a8 = pinned("w8a8", tiny_ckpt)
    targets = [w8a8, control_target(w8a8), pinned("w4a16", tiny_ckpt)]
    first = run_bench(spec, targets, out_json=out, db=db, settings=settings, start_targets_within_s=0.0)
    assert first["status"] == "interrupted" and first["targets"] == [] and "--resume" in first["errors"][0]
    second = run_bench(spec, targets, out_json=out, db=db, settings=settings, resume=True)
    # the engine-order control runs last, whatever the order given
    assert second["status"] == "complete"
    assert [t["label"] for t in second["targets"]] == ["w8a8", "w4a16", "w8a8-control"]
    assert second["targets"][2]["control_of"] == "w8a8"
    drift = control_drift(second)
    assert len(drift) == 2 * len(spec.batches) + len(spec.batches)  # prefill, per-request and wall TPOT
    assert (drift["ratio"] > 0).all() and set(drift["baseline"]) == {"w8a8"}
    with pytest.raises(ValueError, match="already a control"):
        control_target(targets[1])
    db.dispose()


def test_weight_bytes_per_step_and_bf16_size_from_the_checkpoint_headers(tmp_path):
    from workbench.bench.weights import (
        bf16_bytes,
        decode_bytes_per_step,
        hbm_tb_s,
        roofline_fraction,
        tensor_bytes,
    )
    from workbench.quant.synthetic import make_synthetic_set

    sets = make_synthetic_set(tmp_path, shapes="tiny-llama", layouts=("bf16", "w8a8", "w4a16", "merged"))
    size = {layout: sum(tensor_bytes(path).values()) for layout, path in sets.items()}
    embed = tensor_bytes(sets["bf16"])["model.embed_tokens.weight"]  # untied: a lookup, not a read
    assert bf16_bytes(sets["merged"]) == size["bf16"]
    assert (
        decode_bytes_per_step(sets["merged"], "w8a8")
        == decode_bytes_per_step(sets["w8a8"])
        == size["w8a8"] - embed
    )
    assert decode_bytes_per_step(sets["merged"], "w4a16") == size["w4a16"] - embed
    assert decode_bytes_per_step(sets["bf16"]) == size["bf16"] - embed
    with pytest.raises(ValueError, match="name one of them"):
        decode_bytes_per_step(sets["merged"], "fp8")
    assert roofline_fraction(3_350_000_000, 1.0) == pytest.approx(1.0)  # 3.35 GB in 1 ms at 3.35 TB/s
    assert hbm_tb_s({"gpu": "NVIDIA H200"}) == 4.8 and hbm_tb_s({"gpu": "NVIDIA H100 80GB HBM3"}) == 3.35
    assert hbm_tb_s({"gpu": "NVIDIA H100 PCIe"}) == 2.0 and hbm_tb_s({"gpu": "RTX", "hbm_tb_s": 1.0}) == 1.0


def test_client_runs_inside_a_thread_that_already_has_an_event_loop():
    """The UI (Gradio callbacks) and Playwright's sync API keep a loop running in their thread;
    `asyncio.run` refuses there, so the bench client and the load generator go through `run_sync`."""
    import asyncio

    from workbench.bench.client import run_sync

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def from_a_running_loop() -> int:
        return run_sync(answer)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:  # a thread of its own, where a loop surely runs
        assert pool.submit(lambda: asyncio.run(from_a_running_loop())).result() == 42
    assert run_sync(answer) == 42  # this thread: a loop runs here after the browser tests, or not


def test_policies_name_the_int4_kernel_the_flex_engine_loads(tiny_ckpt):
    """A policy file's `kernel: marlin` hint reaches the engine (vLLM would pick Machete on Hopper)."""
    marlin = parse_policy(
        "name: m\nprefill: w8a8\ndecode:\n"
        "- {max_batch: 32, variant: w4a16, kernel: marlin}\n- {variant: w8a8}\n"
    )
    machete = parse_policy("name: k\nprefill: w8a8\ndecode:\n- {variant: w4a16, kernel: machete}\n")
    plain = fixed_policy("w8a8")
    assert hinted_kernel([plain]) is None
    assert hinted_kernel([plain, marlin]) == "marlin"
    with pytest.raises(ValueError, match=r"int4 kernels \['machete', 'marlin'\]"):
        hinted_kernel([marlin, machete])
    target = Target(
        label="flex",
        kind="flex",
        checkpoint=tiny_ckpt,
        policies=[plain, marlin],
        kernel=hinted_kernel([plain, marlin]),
    )
    assert engine_config(target, BenchSpec(), plain, 8100).kernels == {"w4a16": "marlin"}
    assert engine_config(replace(target, kernel=None), BenchSpec(), plain, 8100).kernels is None


def test_prefill_graphs_give_every_engine_the_same_breakable_graph_settings(tiny_ckpt, tmp_path):
    """Stock and FlexQuant engines prefill the same way; off, prefill runs eagerly as before."""
    flex = Target(label="flex", kind="flex", checkpoint=tiny_ckpt, policies=[fixed_policy("w8a8")])
    stock = Target(label="w8a8", kind="stock", checkpoint=tiny_ckpt, variant="w8a8")
    spec = BenchSpec(batches=(1, 4, 16), prefill_graphs=True)
    configs = [engine_config(t, spec, fixed_policy("w8a8"), 8100) for t in (flex, stock)]
    assert configs[0].compilation_config == configs[1].compilation_config
    graphs = configs[0].compilation_config
    assert graphs["mode"] == 0 and graphs["cudagraph_mode"] == "FULL_AND_PIECEWISE"
    sizes = graphs["cudagraph_capture_sizes"]
    assert sizes == sorted(set(sizes)) and {1, 16, 1024, 2048, 4096, 8192} <= set(sizes)
    assert max(b - a for a, b in zip(sizes, sizes[1:], strict=False) if b <= 2048) <= 64
    eager_spec = BenchSpec(batches=(1, 4, 16), rates=(), prefill_graphs=False)
    eager = engine_config(flex, eager_spec, fixed_policy("w8a8"), 8100)
    assert eager.compilation_config == {
        "mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": [1, 2, 4, 8, 16]}
    assert eager.max_num_seqs == 16


def test_online_loads_get_engine_room_beyond_the_sweeps_largest_batch(tiny_ckpt):
    """A sweep to batch 16 with a 24 req/s load: ~30 requests in flight must not queue behind a cap
    of 16 (run 11 measured TTFT p50 3.1 s that way); decode graphs cover the same range (vLLM captures
    full decode graphs up to max_num_seqs: run 10's engines, capped at 16, logged 5 of them)."""
    flex = Target(label="flex", kind="flex", checkpoint=tiny_ckpt, policies=[fixed_policy("w8a8")])
    for batches, rates, seqs in (((1, 4, 16), (24.0,), 256), ((1, 512), (24.0,), 512), ((1, 4), (), 16)):
        config = engine_config(flex, BenchSpec(batches=batches, rates=rates), fixed_policy("w8a8"), 8100)
        decode_sizes = [s for s in config.compilation_config["cudagraph_capture_sizes"] if s <= seqs]
        assert config.max_num_seqs == seqs and max(decode_sizes) == seqs, (batches, rates, config)
    # op-by-op prefill: the capture list is the decode list alone, and it ends at the engine's cap
    for rates, last in (((24.0,), 256), ((), 16)):
        spec = BenchSpec(batches=(1, 4, 16), rates=rates, prefill_graphs=False)
        assert engine_config(flex, spec, fixed_policy("w8a8"), 8100).compilation_config[
            "cudagraph_capture_sizes"][-1] == last


def test_auto_policy_is_tuned_within_the_kernel_the_given_policies_fixed(tiny_ckpt, tmp_path):
    """On the H100 sample the tuner prefers Marlin; an engine fixed to Machete gets a Machete policy."""
    sample = report.load_results(Path(__file__).parent / "data" / "bench-sample.json")
    db = open_db(tmp_path / "t.db")
    free = _autotune(json.loads(json.dumps(sample)), Target("flex", "flex", tiny_ckpt, auto_policy=True), db)
    fixed = _autotune(sample, Target("flex", "flex", tiny_ckpt, kernel="machete", auto_policy=True), db)
    assert free.kernel == "marlin" and fixed.kernel == "machete"
    assert sample["autotune"]["kernel"] == "machete"
    assert {r.kernel for r in fixed.policies[0].decode if r.variant == "w4a16"} <= {"machete"}
    db.dispose()
