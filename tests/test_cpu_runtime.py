"""The CPU reference engine on a real tiny merged checkpoint, with telemetry in a real SQLite DB."""

from __future__ import annotations

import json

import pytest
import torch
from sqlmodel import Session, select
from test_flexmodel import build_tiny_checkpoints

from storage.models import RequestRecord, StepRecord
from workbench.policy import DecodeRule, LayerRule, Policy, PolicyError, StepInfo, decide, fixed_policy
from workbench.runtime.cpu_engine import CpuEngine
from workbench.runtime.cpu_request import SamplingParams
from workbench.runtime.flexmodel import FlexModel
from workbench.runtime.telemetry import TelemetryWriter, create_run

PD = Policy(name="pd", prefill="w8a8",
            decode=[DecodeRule(max_batch=1, variant="w4a16"), DecodeRule(variant="w8a8")])


@pytest.fixture(scope="module")
def flex(tmp_path_factory):
    torch.set_num_threads(1)
    merged, _ = build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))
    return FlexModel.load(merged)


@pytest.fixture
def run(db_engine, flex):
    """(engine, run_id, writer, make_engine) with the engine stopped and telemetry flushed at the end."""
    run_id = create_run(db_engine, runtime="cpu", checkpoint_path=str(flex.ckpt_dir), policy_name="pd")
    writer = TelemetryWriter(db_engine, run_id)
    engines = []

    def make(policy=PD, **kw):
        engines.append(CpuEngine(flex, policy, telemetry=writer, **kw).start())
        return engines[-1]

    yield db_engine, run_id, writer, make
    for e in engines:
        e.stop()
    writer.close()


def rows(db, model, run_id):
    with Session(db) as s:
        return s.exec(select(model).where(model.run_id == run_id)).all()


def prompts(tok):
    return [tok.encode(t) for t in ("hello there", "a longer prompt about quantization", "xyz")]


def test_concurrent_requests_complete_and_steps_follow_policy(run, flex):
    db, run_id, writer, make = run
    engine = make()
    reqs = [engine.submit(p, SamplingParams(max_tokens=n))
            for p, n in zip(prompts(flex.tokenizer), (3, 6, 9), strict=True)]
    for r in reqs:
        assert r.done.wait(60), "request did not finish"
    writer.flush()
    steps = sorted(rows(db, StepRecord, run_id), key=lambda s: s.step)
    assert [s.step for s in steps] == list(range(len(steps)))
    for s in steps:
        assert s.variant == decide(PD, StepInfo(s.num_prefill_tokens, s.num_decode_reqs)), s
        assert (s.num_prefill_tokens == 0) != (s.num_decode_reqs == 0), "prefill and decode share a step"
    decode_batches = {s.num_decode_reqs for s in steps if s.num_prefill_tokens == 0}
    assert max(decode_batches) >= 2 and 1 in decode_batches  # several requests ran together, then one
    assert {s.variant for s in steps} == {"w8a8", "w4a16"}
    by_id = {r.request_id: r for r in rows(db, RequestRecord, run_id)}
    for req in reqs:
        rec = by_id[req.request_id]
        assert rec.output_tokens == len(req.output_ids) >= 1 and rec.error is None
        assert rec.ttft_ms is not None and rec.ttft_ms >= 0
        mix = json.loads(rec.variant_mix_json)
        # Every token after the first comes from one decode step (unless it stopped at eos).
        assert sum(mix.values()) in (len(req.output_ids) - 1, len(req.output_ids))
        assert req.finish_reason in ("length", "stop")


def test_concurrent_greedy_equals_single_request_generate(run, flex):
    _, _, _, make = run
    engine = make(fixed_policy("w4a16"))
    ps = prompts(flex.tokenizer)
    reqs = [engine.submit(p, SamplingParams(max_tokens=8)) for p in ps]
    for r in reqs:
        assert r.done.wait(60)
    flex.use_variant("w4a16")
    for p, r in zip(ps, reqs, strict=True):
        out = flex.model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=sorted(engine.eos_ids), pad_token_id=0)
        expected = [t for t in out[0, len(p):].tolist() if t not in engine.eos_ids]
        assert r.output_ids == expected


def test_live_policy_change_applies_from_the_returned_step(run, flex):
    db, run_id, writer, make = run
    engine = make()
    applied = {}
    other = fixed_policy("w8a8")

    def on_event(ev):
        if ev.token_id is not None and "at" not in applied and len(req.output_ids) == 4:
            applied["at"] = engine.set_policy(other)

    req = engine.submit(prompts(flex.tokenizer)[0], SamplingParams(max_tokens=10), on_event=on_event)
    assert req.done.wait(60) and req.finish_reason == "length"
    writer.flush()
    steps = sorted(rows(db, StepRecord, run_id), key=lambda s: s.step)
    at = applied["at"]
    assert 0 < at < len(steps)
    assert all(s.policy_name == "pd" for s in steps[:at])
    assert all(s.policy_name == other.name and s.variant == "w8a8" for s in steps[at:])
    assert steps[at - 1].variant == "w4a16"  # single decode under "pd" ran w4a16 until the switch
    with pytest.raises(PolicyError, match="fp8"):
        engine.set_policy(fixed_policy("fp8"))
    assert engine.policy == other


def test_cancel_stops_one_request_and_records_it(run, flex):
    db, run_id, writer, make = run
    engine = make()

    def on_event(ev):
        if ev.token_id is not None and len(long.output_ids) == 2:
            engine.cancel(long.request_id)

    long = engine.submit(prompts(flex.tokenizer)[1], SamplingParams(max_tokens=200), on_event=on_event)
    short = engine.submit(prompts(flex.tokenizer)[0], SamplingParams(max_tokens=5))
    assert long.done.wait(60) and short.done.wait(60)
    assert long.finish_reason == "cancelled" and len(long.output_ids) <= 4
    assert short.finish_reason in ("length", "stop")
    writer.flush()
    rec = {r.request_id: r for r in rows(db, RequestRecord, run_id)}[long.request_id]
    assert rec.error == "cancelled by the client" and rec.output_tokens == len(long.output_ids)


def test_layer_rules_are_recorded_per_layer_group(run, flex):
    db, run_id, writer, make = run
    policy = Policy(name="pin", prefill="w8a8", decode=[DecodeRule(variant="w4a16")],
                    layers=[LayerRule(first=0, last=0, variant="w8a8")])
    engine = make(policy)
    req = engine.submit(prompts(flex.tokenizer)[0], SamplingParams(max_tokens=3))
    assert req.done.wait(60)
    writer.flush()
    decode = [s for s in rows(db, StepRecord, run_id) if s.num_prefill_tokens == 0]
    assert decode and all(s.variant == "w4a16" for s in decode)
    assert json.loads(decode[0].layer_variants_json) == [{"first": 0, "last": 0, "variant": "w8a8"},
                                                         {"first": 1, "last": 1, "variant": "w4a16"}]


def test_sampling_seeded_and_top_p_tiny_is_greedy(run, flex):
    _, _, _, make = run
    engine = make(fixed_policy("w8a8"))
    p = prompts(flex.tokenizer)[1]
    a = engine.submit(p, SamplingParams(max_tokens=8, temperature=1.5, seed=7))
    b = engine.submit(p, SamplingParams(max_tokens=8, temperature=1.5, seed=7))
    g = engine.submit(p, SamplingParams(max_tokens=8))
    t = engine.submit(p, SamplingParams(max_tokens=8, temperature=1.0, top_p=1e-6, seed=3))
    for r in (a, b, g, t):
        assert r.done.wait(60)
    assert a.output_ids == b.output_ids
    assert t.output_ids == g.output_ids


def test_rejects_empty_and_too_long_prompts(run, flex):
    _, _, _, make = run
    engine = make()
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="at most"):
        engine.submit([1] * engine.max_context, SamplingParams())
