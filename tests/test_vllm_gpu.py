"""FlexQuant on a real GPU with vLLM 0.26 (skipped where either is missing).

Runs `scripts/gpu/flexquant_proof.py` (stock engines on single-variant exports, one FlexQuant engine
on the merged checkpoint, each in its own process) and `scripts/gpu/serve_check.py` (`vllm serve`
with the policy middleware), then asserts on their summaries. Recorded runs: docs/gpu-runs/.
Needs this package installed in the serving Python (`pip install --no-deps .`) for the entry point.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_ready() -> bool:
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not _gpu_ready(), reason="needs an NVIDIA GPU and vLLM 0.26")]


def _run_proof(tmp_path_factory, *flags: str, **env: str) -> dict:
    work, out = tmp_path_factory.mktemp("work"), tmp_path_factory.mktemp("out")
    env = {**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0", **env}
    subprocess.run([sys.executable, str(ROOT / "scripts/gpu/flexquant_proof.py"), "all", "--work", str(work),
                    "--out", str(out), *flags], env=env, check=True, timeout=1500)
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def proof(tmp_path_factory) -> dict:
    return _run_proof(tmp_path_factory, PROOF_STOCK_RUNS="w8a8,w4a16-marlin")


@pytest.fixture(scope="module")
def graph_proof(tmp_path_factory) -> dict:
    """Prefill and mixed steps in breakable CUDA graphs, one bank per variant (stock w8a8 likewise)."""
    return _run_proof(tmp_path_factory, PROOF_STOCK_RUNS="w8a8", PROOF_PREFILL_GRAPHS="1")


def test_engines_ran(proof):
    assert "error" not in proof, proof.get("error")


def test_all_w8a8_gives_stock_w8a8_tokens(proof):
    assert proof["token_equality_vs_stock"]["w8a8"] == {"b1": True, "b8": True, "chunked": True}


def test_all_w4a16_gives_stock_w4a16_tokens_where_stock_is_reproducible(proof):
    stock_stable = proof["stock_self_equal"]["w4a16-marlin"]
    flex_stable = proof["flex_w4a16_self_equal"]
    for workload, equal in proof["token_equality_vs_stock"]["w4a16-marlin"].items():
        if stock_stable[workload] is True and flex_stable[workload] is True:
            assert equal is True, workload


def test_every_step_ran_the_variant_the_policy_names(proof):
    tel = proof["telemetry"]
    assert tel["mismatches"] == []
    switch = tel["by_policy"]["switch-at-3"]
    assert switch.get("decode/w4a16/graph") and switch.get("decode/w8a8/graph") and switch.get("prefill/w8a8/eager")


def test_live_policy_applies_at_the_acknowledged_step(proof):
    tel = proof["telemetry"]
    for name in ("all-w4a16", "switch-at-3", "pinned-0-9"):
        assert tel[f"{name}_applied_at_step"] == tel[f"{name}_first_telemetry_step"], name


def test_telemetry_costs_under_two_percent_of_a_decode_step(proof):
    meta = proof["telemetry_self_timed"]
    step_ms = min(proof["telemetry_cost"]["median_on"], proof["telemetry_cost"]["median_off"])
    cost_ms = (meta["engine_thread_us_per_step"] + meta["writer_thread_us_per_line"]) / 1000
    print(f"telemetry {cost_ms * 1000:.1f} us per step = {cost_ms / step_ms:.2%} of a {step_ms:.3f} ms step")
    assert cost_ms / step_ms < 0.02


def test_vllm_serve_live_policy_over_http(proof):
    serve = proof["serve"]
    assert "failed" not in serve, serve.get("failed")
    assert serve["completion"]["status"] == 200
    assert serve["bad_policy"][0] == 400 and "w9" in serve["bad_policy"][1]["error"]
    assert serve["bad_layers"][0] == 400 and serve["policy_after_bad"] == "serve-switch"
    for key in ("live_all-w4a16", "live_serve-pinned"):
        live = serve[key]
        assert live["status"] == 200 and live["first_step"] == live["response"]["applied_at_step"]
        assert live["first_step_ts_minus_put_s"] < 10


def test_vllm_serve_takes_the_int4_kernel_from_the_policy_hint(proof):
    serve = proof["serve"]
    assert "MarlinLinearKernel" in serve["log_kernels"], serve["log_kernels"]
    # on Hopper vLLM picks Machete, so Marlin here means the policy's `kernel: marlin` hint took effect
    if "MacheteLinearKernel" in serve["log_kernels"]:
        assert any(o.startswith("variant w4a16 uses MarlinLinearKernel") for o in serve["kernel_overrides"])


def test_prefill_graphs_give_stock_w8a8_tokens_and_replay_each_variants_bank(graph_proof):
    assert "error" not in graph_proof, graph_proof.get("error")
    assert graph_proof["compilation"]["cudagraph_mode"] == "FULL_AND_PIECEWISE"
    assert graph_proof["token_equality_vs_stock"]["w8a8"] == {"b1": True, "b8": True, "chunked": True}
    tel = graph_proof["telemetry"]
    assert tel["mismatches"] == []  # every step's executed kernels = the chosen bank's, per `decide`
    switch = tel["by_policy"]["switch-at-3"]
    for key in ("prefill/w8a8/graph", "decode/w4a16/graph", "decode/w8a8/graph"):
        assert switch.get(key), (key, switch)
    assert not any(key.endswith("/eager") for key in switch), switch  # every step fits a captured size
    for name in ("all-w4a16", "switch-at-3", "pinned-0-9"):
        assert tel[f"{name}_applied_at_step"] == tel[f"{name}_first_telemetry_step"], name
    # new pins re-capture the decode banks; prefill graphs are dropped (vllm_dispatch.recapture says why)
    pinned = tel["by_policy"]["pinned-0-9"]
    assert pinned.get("decode/w4a16/graph") and pinned.get("prefill/w4a16/eager", 0) == 0, pinned
    assert pinned.get("prefill/w8a8/eager"), pinned


def test_vllm_serve_with_prefill_graphs_takes_live_policies(graph_proof):
    """`vllm serve` with the settings of `flexquant serve --prefill-graphs`: prefill replays graphs, live
    edits apply at their acknowledged step, and after the pin change prefill runs op by op."""
    serve = graph_proof["serve"]
    assert "failed" not in serve, serve.get("failed")
    assert serve["env"]["VLLM_USE_BREAKABLE_CUDAGRAPH"] == "1" and serve["completion"]["status"] == 200
    for key in ("live_all-w4a16", "live_serve-pinned"):
        live = serve[key]
        assert live["status"] == 200 and live["first_step"] == live["response"]["applied_at_step"]
    assert serve["prefill_steps"]["graph"] > 0 and serve["prefill_steps"]["eager"] > 0, serve["prefill_steps"]
