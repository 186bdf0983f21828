"""The "quantize" job kind through the real queue and a real worker process, on a tiny random Llama."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from sqlmodel import Session, select

from jobs import queue
from jobs.worker import start_worker
from storage.models import Checkpoint, Variant
from workbench.models import add_model
from workbench.quant.check import check_checkpoint
from workbench.quant.jobs import validate_quantize
from workbench.quant.recipe import QuantRecipe
from workbench.quant.shapes import make_tiny_source_model

MODULES = ["workbench.quant.jobs"]
RECIPE = {"num_samples": 8, "seq_len": 64}


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return make_tiny_source_model(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture
def registered(db_engine, tiny_source):
    add_model(db_engine, name="tiny", path=tiny_source)
    return db_engine


def _wait(engine, job_id: int, condition, what: str, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.get_job(engine, job_id)
        if condition(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached {what}; last: {job.status} {job.stage} {job.error}")


@pytest.fixture
def worker(tmp_path):
    procs = []

    def start():
        proc = start_worker(
            tmp_path / "wb.db",
            tmp_path,
            MODULES,
            once=True,
            poll_s=0.1,
            heartbeat_s=0.5,
            log_path=tmp_path / "worker.log",
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_validate_refuses_bad_requests_before_queueing(registered):
    engine = registered
    ok = validate_quantize({"model": "tiny", "checkpoint": "c1", "recipe": {}}, engine)
    assert (
        ok["recipe"]["variants"] == ["w8a8", "w4a16"]
        and ok["recipe"]["num_samples"] == QuantRecipe().num_samples
    )
    bad = [
        ({"model": "nope", "checkpoint": "c1"}, "no model named 'nope'"),
        ({"model": "tiny", "checkpoint": "has space"}, "not usable"),
        ({"model": "tiny", "checkpoint": "c1", "recipe": {"variants": ["w2"]}}, "unknown variant"),
        (
            {"model": "tiny", "checkpoint": "c1", "recipe": {"calibration_path": "/no/such.txt"}},
            "does not exist",
        ),
        ({"model": "tiny", "checkpoint": "c1", "colour": "red"}, "unknown quantize param"),
    ]
    for params, message in bad:
        with pytest.raises(ValueError, match=message):
            queue.submit(engine, "quantize", params)
    assert queue.list_jobs(engine) == []


def test_quantize_job_publishes_and_registers_the_checkpoint(registered, worker, tmp_path):
    engine = registered
    job = queue.submit(engine, "quantize", {"model": "tiny", "checkpoint": "tiny-flex", "recipe": RECIPE})
    worker()
    job = _wait(engine, job.id, lambda j: j.status in ("done", "failed", "cancelled"), "the end")
    assert job.status == "done", (job.error, job.log_tail)
    result = json.loads(job.result_json)
    folder = tmp_path / "checkpoints" / "tiny-flex"
    assert result["path"] == str(folder.resolve())
    assert check_checkpoint(folder).ok
    assert "group size 64 instead of 128" in job.log_tail
    assert job.peak_rss_bytes and job.peak_rss_bytes > 100 * 2**20
    with Session(engine) as session:
        ckpt = session.exec(select(Checkpoint).where(Checkpoint.name == "tiny-flex")).one()
        variants = {v.name: v for v in session.exec(select(Variant).where(Variant.checkpoint_id == ckpt.id))}
    assert ckpt.kind == "merged" and ckpt.job_id == job.id and ckpt.size_bytes > 0
    assert json.loads(ckpt.manifest_json)["recipe"]["num_samples"] == 8
    assert variants["w4a16"].group_size == 64 and variants["w8a8"].group_size is None
    assert variants["w8a8"].scheme == "W8A8" and variants["w4a16"].scheme == "W4A16"
    assert 0 < variants["w4a16"].weight_bytes < variants["w8a8"].weight_bytes
    assert json.loads(variants["w4a16"].config_json)["format"] == "pack-quantized"
    # the name is now taken
    with pytest.raises(ValueError, match="already exists"):
        queue.submit(engine, "quantize", {"model": "tiny", "checkpoint": "tiny-flex", "recipe": RECIPE})


def test_cancelled_quantize_job_leaves_no_checkpoint(registered, worker, tmp_path):
    engine = registered
    recipe = {**RECIPE, "variants": ["w8a8", "w4a16", "fp8"]}
    job = queue.submit(engine, "quantize", {"model": "tiny", "checkpoint": "gone", "recipe": recipe})
    worker()
    _wait(
        engine,
        job.id,
        lambda j: j.stage in ("smooth", "quantize w8a8") or j.status not in ("queued", "running"),
        "SmoothQuant or the first GPTQ",
    )
    # Cancel early: three variants are still to come, each checking for cancel per layer.
    queue.cancel(engine, job.id)
    job = _wait(engine, job.id, lambda j: j.status in ("done", "failed", "cancelled"), "the end")
    assert job.status == "cancelled", (job.status, job.stage, job.error, job.log_tail[-2000:])
    assert not (tmp_path / "checkpoints" / "gone").exists()
    with Session(engine) as session:
        assert session.exec(select(Checkpoint)).all() == []
