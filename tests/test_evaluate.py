"""Accuracy evaluation: BF16 vs each variant vs a mixing policy, as a library call and as a job."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from sqlmodel import Session, select

from jobs import queue
from jobs.progress import Reporter
from jobs.worker import start_worker
from storage.crud import insert_row
from storage.models import Checkpoint, EvalResult, SourceModel
from workbench.evaluate import evaluate_checkpoint
from workbench.policy import DEFAULT_POLICY, fixed_policy
from workbench.quant.factory import quantize_and_merge
from workbench.quant.recipe import QuantRecipe
from workbench.quant.shapes import make_tiny_source_model
from workbench.textdata import eval_texts


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random bf16 Llama and its real W8A8+W4A16 merged checkpoint (llmcompressor, ~10 s)."""
    root = tmp_path_factory.mktemp("tiny-eval")
    source = make_tiny_source_model(root / "source")
    merged = quantize_and_merge(
        source, root / "merged", QuantRecipe(num_samples=8, seq_len=64), reporter=Reporter(), work_dir=root / "w"
    )
    return source, merged


def test_targets_share_positions_and_a_mixing_policy_is_its_own_target(tiny_pair):
    source, merged = tiny_pair
    texts = eval_texts(max_docs=3)
    rows = {r.target: r for r in evaluate_checkpoint(merged, source, texts, policies=[DEFAULT_POLICY],
                                                    seq_len=64, prefix_len=16)}
    assert list(rows) == ["bf16", "all-w8a8", "all-w4a16", DEFAULT_POLICY.name]
    assert len({r.num_tokens for r in rows.values()}) == 1 and rows["bf16"].num_tokens > 0
    assert rows["bf16"].token_agreement == 1.0
    # Quantization moves the top-1 choices somewhat but not entirely.
    for name in ("all-w8a8", "all-w4a16", DEFAULT_POLICY.name):
        assert 0.3 < rows[name].token_agreement <= 1.0
    # The mixing policy's positions are decided by w8a8 (prefix) and w4a16 (decode at batch 1): it is
    # a different target than either variant alone, evaluated step by step.
    mixed = rows[DEFAULT_POLICY.name]
    assert mixed.perplexity not in (rows["all-w8a8"].perplexity, rows["all-w4a16"].perplexity)


def test_a_fixed_policy_scores_exactly_like_its_variant(tiny_pair):
    source, merged = tiny_pair
    texts = eval_texts(max_docs=2)
    rows = {r.target: r for r in evaluate_checkpoint(
        merged, None, texts, policies=[fixed_policy("w4a16").model_copy(update={"name": "same-as-w4"})],
        seq_len=48, prefix_len=16)}
    assert "bf16" not in rows
    assert rows["same-as-w4"].perplexity == pytest.approx(rows["all-w4a16"].perplexity, rel=1e-6)


def test_a_missing_bf16_reference_is_named_not_looked_up_on_a_model_hub(tiny_pair, tmp_path):
    _, merged = tiny_pair
    with pytest.raises(ValueError, match=r"BF16 reference .*gone-model has no config.json"):
        evaluate_checkpoint(merged, tmp_path / "gone-model", eval_texts(max_docs=1), seq_len=48)


def test_importing_the_workbench_keeps_transformers_off_the_model_hub(tmp_path):
    """A model path that does not exist fails at once as not found: no download, no network retries."""
    import os
    import subprocess
    import sys

    code = (
        "import os, time, workbench\n"
        "from transformers import AutoConfig\n"
        "t = time.time()\n"
        "try:\n"
        "    AutoConfig.from_pretrained('models/no-such-model')\n"
        "except OSError:\n"
        "    print(os.environ['HF_HUB_OFFLINE'], time.time() - t < 5)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["1", "True"], done.stdout + done.stderr[-2000:]
    env["HF_HUB_OFFLINE"] = "0"  # the user's own setting wins
    done = subprocess.run([sys.executable, "-c", "import os, workbench; print(os.environ['HF_HUB_OFFLINE'])"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "0"


def test_evaluate_job_stores_one_row_per_target(tiny_pair, db_engine, tmp_path):
    source, merged = tiny_pair
    src = insert_row(db_engine, SourceModel(name="tiny", path=str(source), architecture="LlamaForCausalLM"))
    insert_row(db_engine, Checkpoint(name="tiny-flex", path=str(merged), source_model_id=src.id))
    with pytest.raises(ValueError, match="no checkpoint named 'nope'"):
        queue.submit(db_engine, "evaluate", {"checkpoint": "nope"})
    with pytest.raises(ValueError, match="no saved policy named 'ghost'"):
        queue.submit(db_engine, "evaluate", {"checkpoint": "tiny-flex", "policies": ["ghost"]})
    job = queue.submit(db_engine, "evaluate", {"checkpoint": "tiny-flex", "max_docs": 2, "seq_len": 48,
                                               "prefix_len": 16})
    worker = start_worker(Path(db_engine.url.database), tmp_path / "data", ["workbench.evaluate"], once=True)
    assert worker.wait(timeout=300) == 0
    done = queue.get_job(db_engine, job.id)
    assert done.status == "done", done.error or done.log_tail
    with Session(db_engine) as session:
        stored = session.exec(select(EvalResult).where(EvalResult.job_id == job.id)).all()
    assert sorted(r.target for r in stored) == sorted(["bf16", "all-w8a8", "all-w4a16", "pd-batch-aware"])
    assert json.loads(done.result_json)["rows"][0]["target"] == "bf16"
    assert all(torch.isfinite(torch.tensor(r.perplexity)) for r in stored)
