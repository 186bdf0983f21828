"""The CPU server as a real subprocess started by `serve.start_server`, spoken to over real HTTP."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from sqlmodel import Session, select
from test_flexmodel import VARIANTS, build_tiny_checkpoints, checkpoint_bytes

from storage.db import open_db
from storage.models import RequestRecord, Run, StepRecord
from workbench.chat_client import list_models, stream_chat
from workbench.policy import DecodeRule, Policy, PolicyError, StepInfo, decide, fixed_policy
from workbench.runtime.serve import start_server
from workbench.runtime.serve_config import ServeConfig, ServeError
from workbench.settings import Settings

PD = Policy(name="pd", prefill="w8a8",
            decode=[DecodeRule(max_batch=1, variant="w4a16"), DecodeRule(variant="w8a8")])
HELLO = [{"role": "user", "content": "hello"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    merged, _ = build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    return merged


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    """One CPU server for the module (start-up costs ~10 s of imports on this CPU)."""
    data = tmp_path_factory.mktemp("data")
    settings = Settings(data_dir=data)
    db = open_db(settings.db_path)
    handle = start_server(ServeConfig(checkpoint=ckpt, policy=PD, port=free_port(), cpu_threads=1),
                          engine=db, settings=settings)
    try:
        handle.wait_healthy(120)
        yield handle, db, settings
    finally:
        handle.stop()
        db.dispose()


def rows(db, model, run_id):
    with Session(db) as s:
        return s.exec(select(model).where(model.run_id == run_id).order_by(model.id)).all()


def wait_for(fn, timeout=30.0):
    """Poll until fn() is truthy (telemetry is written in batches every ~0.5 s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := fn():
            return value
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def test_concurrent_streaming_chats_and_step_telemetry(server):
    handle, db, _ = server
    results, errors = {}, []
    model = list_models(handle.base_url)[0]
    start = threading.Barrier(3)

    def chat(i):
        try:
            # Sent together, ignore_eos, 16+ tokens each: the replies surely overlap (decode batches
            # of 2+) even on a busy machine; an early EOS or a late thread made that a matter of luck
            start.wait(30)
            updates = list(stream_chat(handle.base_url, [{"role": "user", "content": f"hi {i}"}], model=model,
                                       max_tokens=16 + 4 * i, temperature=0.0, extra={"ignore_eos": True}))
            results[i] = updates[-1]
        except Exception as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 3
    for i, update in results.items():
        assert update.done and update.stats.finish_reason == "length"
        assert update.stats.output_tokens == 16 + 4 * i
    ids = {u.stats.request_id for u in results.values()}
    def mine():
        found = [r for r in rows(db, RequestRecord, handle.run_id) if r.request_id in ids]
        return found if len(found) == 3 else None

    recs = wait_for(mine)
    for rec in recs:
        assert rec.ttft_ms > 0 and rec.error is None and rec.output_tokens >= 1
    steps = rows(db, StepRecord, handle.run_id)
    assert steps
    assert all(s.variant == decide(PD, StepInfo(s.num_prefill_tokens, s.num_decode_reqs)) for s in steps)
    assert any(s.num_prefill_tokens > 0 for s in steps) and any(s.num_decode_reqs >= 2 for s in steps)


def test_non_stream_completion_and_models(server):
    handle, _, _ = server
    models = httpx.get(f"{handle.base_url}/v1/models").json()["data"]
    body = {"model": models[0]["id"], "messages": HELLO, "max_tokens": 5, "temperature": 0}
    out = httpx.post(f"{handle.base_url}/v1/chat/completions", json=body, timeout=60).json()
    assert out["object"] == "chat.completion" and out["choices"][0]["finish_reason"] in ("length", "stop")
    assert out["usage"]["completion_tokens"] <= 5 and out["usage"]["prompt_tokens"] > 0


@pytest.mark.parametrize("body, param", [
    ({"messages": HELLO, "max_tokens": 100_000}, "max_tokens"),
    ({"messages": HELLO, "max_tokens": 250}, "max_tokens"),  # prompt + 250 > the 256-token context
    ({"messages": HELLO, "temperature": 5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 400}]}, "messages"),  # longer than the context
])
def test_bad_requests_get_openai_style_400(server, body, param):
    handle, _, _ = server
    resp = httpx.post(f"{handle.base_url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and param in (err["param"] or "") and err["message"]


def test_unknown_model_is_404(server):
    handle, _, _ = server
    resp = httpx.post(f"{handle.base_url}/v1/chat/completions", json={"model": "gpt-9", "messages": HELLO})
    assert resp.status_code == 404 and "gpt-9" in resp.json()["error"]["message"]


def test_live_policy_change_visible_from_the_returned_step(server):
    handle, db, _ = server
    new = fixed_policy("w8a8")
    applied = handle.set_policy(new)["applied_at_step"]
    assert httpx.get(f"{handle.base_url}/flexquant/policy").json()["policy"]["name"] == new.name
    for _ in stream_chat(handle.base_url, HELLO, max_tokens=4):
        pass
    wait_for(lambda: any(s.step >= applied for s in rows(db, StepRecord, handle.run_id)))
    steps = rows(db, StepRecord, handle.run_id)
    assert all(s.policy_name == new.name and s.variant == "w8a8" for s in steps if s.step >= applied)
    assert all(s.policy_name == PD.name for s in steps if s.step < applied)
    handle.set_policy(PD)


def test_bad_policy_is_rejected_and_old_one_stays(server):
    handle, _, _ = server
    before = httpx.get(f"{handle.base_url}/flexquant/policy").json()["policy"]
    with pytest.raises(PolicyError, match="fp8"):
        handle.set_policy(fixed_policy("fp8"))
    resp = httpx.put(f"{handle.base_url}/flexquant/policy", json={"policy": {"name": "x", "prefill": "w8a8"}})
    assert resp.status_code == 400 and "decode" in resp.json()["error"]
    resp = httpx.put(f"{handle.base_url}/flexquant/policy", json={"nothing": 1})
    assert resp.status_code == 400
    assert httpx.get(f"{handle.base_url}/flexquant/policy").json()["policy"] == before


def test_stats_memory_equals_checkpoint_tensor_bytes(server, ckpt):
    handle, _, _ = server
    stats = httpx.get(f"{handle.base_url}/flexquant/stats").json()
    assert stats["weight_bytes"] == checkpoint_bytes(ckpt, VARIANTS)
    assert stats["memory"]["total"] == sum(checkpoint_bytes(ckpt, VARIANTS).values())
    assert stats["run_id"] == handle.run_id and stats["steps"] > 0


def test_client_disconnect_cancels_the_request(server):
    handle, db, _ = server
    rid = None
    with httpx.Client(timeout=60) as client:
        body = {"messages": HELLO, "max_tokens": 200, "temperature": 0, "stream": True}
        with client.stream("POST", f"{handle.base_url}/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    rid = json.loads(line[6:])["id"]
                    break
    assert rid
    rec = wait_for(lambda: next((r for r in rows(db, RequestRecord, handle.run_id) if r.request_id == rid),
                                None))
    assert rec.error == "cancelled by the client" and rec.output_tokens < 200


def test_start_errors_are_clear(server, ckpt, tmp_path):
    handle, db, settings = server
    taken = ServeConfig(checkpoint=ckpt, policy=PD, port=handle.cfg.port)
    with pytest.raises(ServeError, match="already in use"):
        start_server(taken, engine=db, settings=settings)
    with pytest.raises(ServeError, match="no config.json"):
        start_server(ServeConfig(checkpoint=tmp_path, policy=PD, port=free_port()),
                     engine=db, settings=settings)
    with pytest.raises(ServeError, match="fp8"):
        start_server(ServeConfig(checkpoint=ckpt, policy=fixed_policy("fp8"), port=free_port()),
                     engine=db, settings=settings)
    with pytest.raises(ServeError, match="GPU"):
        start_server(ServeConfig(checkpoint=ckpt, policy=PD, port=free_port(), runtime="vllm"),
                     engine=db, settings=settings)
    for exposed in ("0.0.0.0", "192.168.1.10", "example.org"):
        with pytest.raises(ServeError, match="has no login"):
            start_server(ServeConfig(checkpoint=ckpt, policy=PD, port=free_port(), host=exposed),
                         engine=db, settings=settings)


def test_stop_ends_process_and_run(ckpt, tmp_path):
    settings = Settings(data_dir=tmp_path)
    db = open_db(settings.db_path)
    handle = start_server(ServeConfig(checkpoint=ckpt, policy=PD, port=free_port(), cpu_threads=1),
                          engine=db, settings=settings)
    try:
        handle.wait_healthy(120)
        assert handle.log_path.parent == settings.logs_dir and handle.log_path.stat().st_size > 0
    finally:
        handle.stop()
    assert not handle.is_running()
    with Session(db) as s:
        run = s.get(Run, handle.run_id)
    assert run.runtime == "cpu" and run.status == "ended" and run.ended_at is not None
    assert "Shutting down" in handle.log_tail() or "shutdown" in handle.log_tail().lower()


def test_cli_creates_its_own_run_and_ends_it_on_sigterm(ckpt, tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from workbench.policy import policy_to_yaml

    db_path, policy_file, port = tmp_path / "wb.db", tmp_path / "policy.yaml", free_port()
    db = open_db(db_path)
    policy_file.write_text(policy_to_yaml(PD))
    argv = [sys.executable, "-m", "workbench.runtime.cpu_server", "--checkpoint", str(ckpt), "--policy",
            str(policy_file), "--port", str(port), "--db", str(db_path), "--threads", "1"]
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])
    try:
        def healthy():
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout=120)
        run_id = httpx.get(f"http://127.0.0.1:{port}/flexquant/stats").json()["run_id"]
        with Session(db) as s:
            run = s.get(Run, run_id)
        assert run.runtime == "cpu" and run.policy_name == "pd" and run.status == "running"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    with Session(db) as s:
        assert s.get(Run, run_id).status == "ended"


@pytest.fixture(scope="module")
def smollm2_merged(default_model_dir, tmp_path_factory):
    """SmolLM2-135M-Instruct quantized round-to-nearest (data-free) to W8A8 and W4A16 group 64
    (576 is not a multiple of 128) by llmcompressor, then merged."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from test_flexmodel import merge_singles
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("smollm2")
    w4 = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=64))
    recipes = {"w8a8": QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"]),
               "w4a16": QuantizationModifier(config_groups={"group_0": w4}, ignore=["lm_head"])}
    singles = {}
    for variant, recipe in recipes.items():
        model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.bfloat16)
        oneshot(model=model, recipe=recipe)
        singles[variant] = root / variant
        model.save_pretrained(singles[variant], save_compressed=True)
        for f in default_model_dir.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                (singles[variant] / f.name).write_bytes(f.read_bytes())
    try:
        from workbench.quant.merge import merge_variants
    except ImportError:
        return merge_singles(singles, root / "merged"), singles
    return merge_variants(singles, root / "merged", tokenizer_dir=default_model_dir), singles


@pytest.mark.slow
def test_real_smollm2_checkpoint_matches_transformers_and_serves_a_chat(smollm2_merged, tmp_path):
    import torch
    from test_flexmodel import reference_model

    from workbench.runtime.flexmodel import FlexModel

    merged, singles = smollm2_merged
    flex = FlexModel.load(merged)
    ids = torch.tensor([flex.tokenizer.encode("The capital of France is")])
    for variant in ("w4a16", "w8a8"):
        flex.use_variant(variant)
        with torch.no_grad():
            torch.testing.assert_close(flex.model(ids).logits, reference_model(singles[variant])(ids).logits,
                                       rtol=1e-3, atol=1e-3)
    report = flex.memory_report()
    assert report.ratio_vs_bf16 < 1.0, report.as_dict()  # both variants resident, still below BF16
    del flex

    settings = Settings(data_dir=tmp_path)
    db = open_db(settings.db_path)
    handle = start_server(ServeConfig(checkpoint=merged, policy=PD, port=free_port(), cpu_threads=1),
                          engine=db, settings=settings)
    try:
        handle.wait_healthy(300)
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        updates = list(stream_chat(handle.base_url, messages, max_tokens=24, temperature=0.0))
        reply, stats = updates[-1].text, updates[-1].stats
        assert "paris" in reply.lower() and stats.finish_reason == "stop", reply
        handle.set_policy(fixed_policy("w4a16"))
        again = list(stream_chat(handle.base_url, messages, max_tokens=24, temperature=0.0))[-1].text
        assert "paris" in again.lower(), again
        steps = wait_for(lambda: rows(db, StepRecord, handle.run_id))
        assert all(s.variant == decide(PD, StepInfo(s.num_prefill_tokens, s.num_decode_reqs))
                   for s in steps if s.policy_name == PD.name)
    finally:
        handle.stop()
        db.dispose()


def test_vllm_step_lines_are_imported_as_step_records(db_engine, tmp_path):
    """The vLLM plugin writes step telemetry as JSONL; the handle copies complete lines into the DB."""
    from workbench.runtime.serve import _StepsImporter
    from workbench.runtime.telemetry import TelemetryWriter, create_run

    run_id = create_run(db_engine, runtime="vllm", checkpoint_path="/ck", policy_name="pd")
    path = tmp_path / "steps.jsonl"
    line = {"step": 0, "ts": 1.0, "duration_ms": 3.5, "num_prefill_tokens": 7, "num_decode_reqs": 0,
            "variant": "w8a8", "policy_name": "pd", "cudagraph": False, "executed": ["w8a8"]}
    second = dict(line, step=1, num_prefill_tokens=0, num_decode_reqs=2, variant="w4a16")
    path.write_text(json.dumps(line) + "\nnot json\n" + json.dumps(second)[:20])  # last line half-written
    importer = _StepsImporter(path, TelemetryWriter(db_engine, run_id))
    importer.read_new()
    with path.open("a") as f:
        f.write(json.dumps(second)[20:] + "\n")
    importer.stop()
    steps = rows(db_engine, StepRecord, run_id)
    assert [(s.step, s.variant, s.num_decode_reqs) for s in steps] == [(0, "w8a8", 0), (1, "w4a16", 2)]
