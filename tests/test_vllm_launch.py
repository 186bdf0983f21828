"""CPU side of the vLLM runtime: `vllm serve` command, failure diagnosis, probe, and the live-policy
channel (engine state, policy watcher, step telemetry, the HTTP middleware) with real files/threads."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from workbench.policy import DEFAULT_POLICY, PolicyError, fixed_policy, policy_from_dict
from workbench.runtime import vllm_plugin
from workbench.runtime.vllm_launch import (
    build_vllm_command,
    diagnose_vllm_log,
    graph_compilation,
    probe_vllm,
    vllm_available,
)
from workbench.runtime.vllm_state import EngineState, PolicyWatcher, StepTelemetry, initial_policy

SWITCH = {"name": "switch-at-3", "prefill": "w8a8", "decode": [{"max_batch": 3, "variant": "w4a16"},
                                                             {"variant": "w8a8"}]}
PINNED = {"name": "pinned", "prefill": "w8a8", "decode": [{"variant": "w4a16"}],
          "layers": [{"first": 0, "last": 1, "variant": "w8a8"}]}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A merged-checkpoint folder as far as launching needs it: config.json with the FlexQuant config."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4,
        "quantization_config": {"quant_method": "flexquant", "format_version": 1,
                                "variants": {"w8a8": {}, "w4a16": {}}, "policy": DEFAULT_POLICY.model_dump()}}))
    return d


def cfg_for(ckpt: Path, tmp_path: Path, **kw) -> SimpleNamespace:
    base = dict(checkpoint=ckpt, policy=policy_from_dict(SWITCH), port=8011, host="127.0.0.1",
                gpu_memory_utilization=0.5, tensor_parallel_size=2, policy_file=tmp_path / "p.json",
                telemetry_file=tmp_path / "s.jsonl")
    return SimpleNamespace(**{**base, **kw})


# ---------------------------------------------------------------- command building


def test_command_carries_every_setting_and_env(ckpt, tmp_path):
    argv, env = build_vllm_command(cfg_for(ckpt, tmp_path, kernels={"w4a16": "marlin"}, max_model_len=2048),
                                   "/opt/serve/bin/python")
    assert argv[:5] == ["/opt/serve/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", str(ckpt.resolve())]
    flags = dict(zip(argv[5::2], argv[6::2], strict=False))
    assert flags["--port"] == "8011" and flags["--host"] == "127.0.0.1"
    assert flags["--gpu-memory-utilization"] == "0.5" and flags["--tensor-parallel-size"] == "2"
    assert flags["--max-model-len"] == "2048"
    assert json.loads(flags["--compilation-config"]) == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert flags["--middleware"] == "workbench.runtime.vllm_plugin.PolicyMiddleware"
    assert env["VLLM_PLUGINS"] == "flexquant" and env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "1"
    assert env[vllm_plugin.ENV_POLICY_FILE] == str(tmp_path / "p.json")
    assert env[vllm_plugin.ENV_TELEMETRY] == str(tmp_path / "s.jsonl")
    assert env[vllm_plugin.ENV_CHECKPOINT] == str(ckpt.resolve())
    assert json.loads(env[vllm_plugin.ENV_POLICY_JSON])["name"] == "switch-at-3"
    assert env[vllm_plugin.ENV_KERNELS] == "w4a16=marlin"


def test_piecewise_graphs_turn_on_vllms_breakable_graphs(ckpt, tmp_path):
    """Without torch.compile vLLM 0.26 would drop PIECEWISE, and with it every CUDA graph, silently."""
    _, env = build_vllm_command(cfg_for(ckpt, tmp_path), "python3")
    assert "VLLM_USE_BREAKABLE_CUDAGRAPH" not in env
    graphs = graph_compilation(True)
    assert graphs["cudagraph_mode"] == "FULL_AND_PIECEWISE" and graphs["mode"] == 0
    argv, env = build_vllm_command(cfg_for(ckpt, tmp_path, compilation_config=graphs), "python3")
    assert env["VLLM_USE_BREAKABLE_CUDAGRAPH"] == "1"
    assert json.loads(argv[argv.index("--compilation-config") + 1]) == graphs


def test_the_policys_kernel_hint_picks_the_int4_kernel_unless_kernels_are_given(ckpt, tmp_path):
    """vLLM would load Machete on Hopper; a tuned policy saying `kernel: marlin` must get Marlin."""
    hinted = policy_from_dict({"name": "tuned", "prefill": "w8a8", "decode": [
        {"max_batch": 32, "variant": "w4a16", "kernel": "marlin"}, {"variant": "w8a8"}]})
    _, env = build_vllm_command(cfg_for(ckpt, tmp_path, policy=hinted), "python3")
    assert env[vllm_plugin.ENV_KERNELS] == "w4a16=marlin"
    explicit = cfg_for(ckpt, tmp_path, policy=hinted, kernels={"w4a16": "machete"})
    _, env = build_vllm_command(explicit, "python3")
    assert env[vllm_plugin.ENV_KERNELS] == "w4a16=machete"
    _, env = build_vllm_command(cfg_for(ckpt, tmp_path), "python3")  # no hint, no kernels: vLLM chooses
    assert vllm_plugin.ENV_KERNELS not in env


@pytest.mark.parametrize("change, message", [
    ({"port": 0}, "port 0"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size"),
    ({"compilation_config": {"mode": 3}}, "compilation mode 0"),
    ({"policy": fixed_policy("fp8")}, "uses variant(s) ['fp8']"),
    ({"policy": policy_from_dict({**PINNED, "layers": [{"first": 0, "last": 9, "variant": "w8a8"}]})},
     "past the model's last layer 3"),
])
def test_command_refuses_settings_that_cannot_start(ckpt, tmp_path, change, message):
    with pytest.raises(ValueError) as err:
        build_vllm_command(cfg_for(ckpt, tmp_path, **change), "python3")
    assert message in str(err.value)


def test_stock_baseline_command_runs_plain_vllm(ckpt, tmp_path):
    """A benchmark baseline: a plain checkpoint, our plugin and middleware off, the bench's own flags."""
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4}))
    cfg = cfg_for(plain, tmp_path, stock=True, policy=fixed_policy("w8a8"), max_num_seqs=256,
                  compilation_config={"mode": 3}, extra_args=("--no-enable-prefix-caching",),
                  extra_env={"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"})
    argv, env = build_vllm_command(cfg, "python3")
    assert "--middleware" not in argv and argv[-1] == "--no-enable-prefix-caching"
    assert argv[argv.index("--max-num-seqs") + 1] == "256"
    assert json.loads(argv[argv.index("--compilation-config") + 1]) == {"mode": 3}  # stock may compile
    assert env["VLLM_PLUGINS"] == "" and vllm_plugin.ENV_POLICY_JSON not in env
    assert env["VLLM_DISABLED_KERNELS"] == "MacheteLinearKernel"
    with pytest.raises(ValueError, match="stock vLLM cannot load it"):
        build_vllm_command(cfg_for(ckpt, tmp_path, stock=True), "python3")


def test_command_needs_a_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        build_vllm_command(cfg_for(tmp_path / "missing", tmp_path), "python3")


# ---------------------------------------------------------------- failure diagnosis


@pytest.mark.parametrize("log_line, expected", [
    ("ERROR ... OSError: [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): "
     "address already in use", "port is already in use"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "ran out of memory"),
    ("ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization`",
     "KV cache"),
    ("RuntimeError: No CUDA GPUs are available", "no usable NVIDIA GPU"),
    ("ModuleNotFoundError: No module named 'vllm'", "vLLM is not installed"),
    ("ValueError: Invalid quantization method: flexquant", "did not load the FlexQuant plugin"),
    ("workbench.runtime.vllm_state.FlexQuantError: FlexQuant checkpoint is missing 3 tensor(s), e.g. "
     "['model.layers.0.self_attn.qkv_proj.w4a16.weight_packed']", "missing 3 tensor(s)"),
    ("workbench.policy.PolicyError: FlexQuant start-up policy from FLEXQUANT_POLICY_JSON: policy 'x' uses "
     "variant(s) ['fp8']", "does not fit this checkpoint"),
    ("safetensors_rust.SafetensorError: Error while deserializing header: HeaderTooLarge", "damaged"),
    ("ValueError: There is no module or parameter named 'model.layers.0.mlp.up_proj.w4a16' in "
     "LlamaForCausalLM", "names do not match"),
])
def test_diagnosis_turns_log_lines_into_reasons(log_line, expected):
    text = "INFO starting\nINFO FlexQuant captured 5 graphs in each of 2 banks\n" + log_line + "\nTraceback ...\n"
    reason = diagnose_vllm_log(text)
    assert reason is not None and expected in reason


def test_diagnosis_stays_quiet_on_a_healthy_log():
    healthy = ("INFO Using V2 Model Runner\nINFO FlexQuant policy 'a' applies from step 3\n"
               "INFO Application startup complete.\n")
    assert diagnose_vllm_log(healthy) is None


def test_probe_explains_a_python_without_vllm(tmp_path):
    probe = probe_vllm(sys.executable)  # the workbench venv deliberately has no vLLM
    assert not probe.ok and "vLLM is not installed" in probe.reason
    assert not vllm_available(sys.executable)
    missing = probe_vllm(str(tmp_path / "no-python"))
    assert not missing.ok and "does not exist" in missing.reason


# ---------------------------------------------------------------- engine state and the policy channel


def make_state(policy: dict = SWITCH, layers: int = 4) -> EngineState:
    state = EngineState()
    state.configure(["w8a8", "w4a16"], layers, policy_from_dict(policy))
    return state


def test_state_decides_each_step_and_pins_layers():
    state = make_state()
    assert [state.choose(0, n) for n in (1, 3, 4, 16)] == ["w4a16", "w4a16", "w8a8", "w8a8"]
    assert state.choose(7, 2) == "w8a8" and state.plan is None  # any prefill -> prefill variant
    pinned = make_state(PINNED)
    assert pinned.choose(0, 5) == "w4a16" and pinned.plan == ["w8a8", "w8a8", "w4a16", "w4a16"]
    pinned.force("w4a16")  # what a graph bank captures
    assert pinned.step_variant == "w4a16" and pinned.plan == ["w8a8", "w8a8", "w4a16", "w4a16"]


def test_pending_policy_applies_at_the_announced_step():
    state = make_state()
    state.begin_step(real=True)
    assert state.offer(fixed_policy("w4a16")) == 2
    assert state.policy.name == "switch-at-3"  # not before the step starts
    state.begin_step(real=False)  # a warm-up step adopts it but does not count
    assert state.policy.name == "all-w4a16" and state.step == 1
    state.begin_step(real=True)
    assert state.step == 2 and state.choose(0, 1) == "w4a16"


def test_start_up_policy_sources_and_errors(tmp_path, monkeypatch):
    state = make_state()
    monkeypatch.delenv(vllm_plugin.ENV_POLICY_JSON, raising=False)
    assert initial_policy(SWITCH, state, None).name == "switch-at-3"
    vllm_plugin.publish_policy(tmp_path / "p.json", fixed_policy("w8a8"))
    assert initial_policy(SWITCH, state, tmp_path / "p.json").name == "all-w8a8"
    monkeypatch.setenv(vllm_plugin.ENV_POLICY_JSON, json.dumps(fixed_policy("w4a16").model_dump()))
    assert initial_policy(SWITCH, state, tmp_path / "p.json").name == "all-w4a16"
    monkeypatch.setenv(vllm_plugin.ENV_POLICY_JSON, json.dumps(fixed_policy("fp8").model_dump()))
    with pytest.raises(PolicyError, match="FLEXQUANT_POLICY_JSON"):
        initial_policy(SWITCH, state, None)


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def test_watcher_validates_queues_and_acknowledges(tmp_path):
    state, pf = make_state(), tmp_path / "policy.json"
    watcher = PolicyWatcher(pf, state, interval_s=0.01).start()
    try:
        assert vllm_plugin.read_json(vllm_plugin.ack_path(pf))["policy_name"] == "switch-at-3"
        pf.write_text(json.dumps({"version": "v-bad", "policy": {**SWITCH, "prefill": "int3"}}))
        ack = wait_for(lambda: (a := vllm_plugin.read_json(vllm_plugin.ack_path(pf))) and
                       a["version"] == "v-bad" and a)
        assert not ack["ok"] and "int3" in ack["error"] and state.policy.name == "switch-at-3"
        version = vllm_plugin.publish_policy(pf, policy_from_dict(PINNED))
        ack = wait_for(lambda: (a := vllm_plugin.read_json(vllm_plugin.ack_path(pf))) and
                       a["version"] == version and a)
        assert ack["ok"] and ack["applied_at_step"] == 1
        state.begin_step(real=True)
        assert state.policy.name == "pinned" and state.step == 1
    finally:
        watcher.stop()


def test_telemetry_lines_durations_pause_and_meta(tmp_path):
    path = tmp_path / "steps.jsonl"
    tel = StepTelemetry(path, interval_s=0.01)
    t = time.perf_counter()
    tel.submit({"step": 1, "variant": "w8a8"}, t, t + 0.001)
    tel.submit({"step": 2, "variant": "w4a16"}, t + 0.002, t + 0.003)  # started 1 ms after step 1 ended
    tel.submit({"step": 3, "variant": "w4a16"}, t + 1.0, t + 1.004)  # after an idle second
    tel.add_main_cost(2000)
    (tmp_path / "steps.jsonl.pause").touch()
    wait_for(lambda: tel.paused)
    tel.close()
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["duration_ms"] == pytest.approx(2.0, abs=1e-3)  # start -> next start
    assert rows[1]["duration_ms"] == pytest.approx(1.0, abs=1e-3)  # idle gap: its own time
    assert rows[2]["duration_ms"] == pytest.approx(4.0, abs=1e-3)
    meta = json.loads((tmp_path / "steps.jsonl.meta.json").read_text())
    assert meta["steps"] == 1 and meta["lines"] == 3 and meta["engine_thread_us_per_step"] == 2.0
    stats = vllm_plugin.telemetry_stats(path)
    assert stats["steps"] == 3 and stats["by_variant"] == {"w8a8": 1, "w4a16": 2} and stats["last_step"] == 3


# ---------------------------------------------------------------- HTTP middleware (ASGI, no server needed)


async def asgi_call(method: str, path: str, body: object = None) -> tuple[int, dict]:
    passed = []

    async def app(scope, receive, send):
        passed.append(scope["path"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware, sent = vllm_plugin.PolicyMiddleware(app), []
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    messages = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    await middleware({"type": "http", "method": method, "path": path}, receive, send)
    payload = sent[1]["body"]
    return sent[0]["status"], (json.loads(payload) if payload else {"passed": passed})


def test_middleware_live_policy_edit(ckpt, tmp_path, monkeypatch):
    pf = tmp_path / "policy.json"
    monkeypatch.setenv(vllm_plugin.ENV_POLICY_FILE, str(pf))
    monkeypatch.setenv(vllm_plugin.ENV_CHECKPOINT, str(ckpt))
    monkeypatch.setenv(vllm_plugin.ENV_TELEMETRY, str(tmp_path / "steps.jsonl"))
    state = make_state()
    watcher = PolicyWatcher(pf, state, interval_s=0.01).start()  # stands in for the engine process
    try:
        assert asyncio.run(asgi_call("GET", "/v1/models"))[1] == {"passed": ["/v1/models"]}
        code, out = asyncio.run(asgi_call("PUT", "/flexquant/policy", {"policy": {**SWITCH, "prefill": "w9"}}))
        assert code == 400 and "w9" in out["error"]
        code, out = asyncio.run(asgi_call("PUT", "/flexquant/policy", b"{not json"))
        assert code == 400 and out["error"]
        code, out = asyncio.run(asgi_call("PUT", "/flexquant/policy",
                                          {"policy": {**PINNED, "layers": [{"first": 0, "last": 7, "variant": "w8a8"}]}}))
        assert code == 400 and "last layer 3" in out["error"]
        assert asyncio.run(asgi_call("GET", "/flexquant/policy"))[1]["policy"]["name"] == "switch-at-3"
        code, out = asyncio.run(asgi_call("PUT", "/flexquant/policy", {"policy": fixed_policy("w4a16").model_dump()}))
        assert code == 200 and out == {"applied_at_step": 1, "policy_name": "all-w4a16"}
        assert asyncio.run(asgi_call("GET", "/flexquant/policy"))[1]["policy"]["name"] == "all-w4a16"
        assert asyncio.run(asgi_call("DELETE", "/flexquant/policy"))[0] == 405
        assert asyncio.run(asgi_call("GET", "/flexquant/stats")) == (200, {"steps": 0})
    finally:
        watcher.stop()


def test_apply_times_out_without_an_engine(tmp_path):
    policy = fixed_policy("w8a8")
    ack = asyncio.run(vllm_plugin.apply_policy(tmp_path / "policy.json", policy, timeout_s=0.2))
    assert ack["timeout"] and "did not pick up" in ack["error"]
