"""The real quantize path (llmcompressor SmoothQuant + GPTQ) on a tiny random Llama, and once on SmolLM2.

Tiny model: plumbing, provenance, cancellation, and the key property of the merged layout: a variant
taken out of the merged checkpoint computes exactly what that variant quantized alone from the same
smoothed model computes. SmolLM2 (slow): the whole chain on a real model, down to generated text.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jobs.progress import Cancelled, Reporter
from workbench import ckpt_format as fmt
from workbench.quant.calibration import calibration_dataset
from workbench.quant.check import check_checkpoint
from workbench.quant.ckpt_read import tensor_index
from workbench.quant.export import export_variant
from workbench.quant.factory import quantize_and_merge
from workbench.quant.recipe import QuantRecipe
from workbench.quant.shapes import make_tiny_source_model
from workbench.quant.stages import quantize_variant


class RecordingReporter(Reporter):
    """Keeps every update and log line; optionally cancels once a given stage starts."""

    def __init__(self, cancel_at: str | None = None):
        super().__init__()
        self.updates: list[tuple[str, float, str]] = []
        self.lines: list[str] = []
        self.cancel_at = cancel_at

    def on_update(self, stage, percent, message, eta_s):
        self.updates.append((stage, percent, message))

    def log(self, line):
        self.lines.append(line)

    def check_cancelled(self):
        if self.cancel_at and any(s == self.cancel_at for s, _, _ in self.updates):
            raise Cancelled()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread while these tests run (the 2 cores are shared), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> Path:
    return make_tiny_source_model(tmp_path_factory.mktemp("src") / "tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_source):
    root = tmp_path_factory.mktemp("run")
    reporter = RecordingReporter()
    recipe = QuantRecipe(num_samples=16, seq_len=64)
    out = quantize_and_merge(
        tiny_source,
        root / "merged",
        recipe,
        reporter=reporter,
        work_dir=root / "work",
        keep_intermediates=True,
    )
    return out, root, reporter, recipe


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def test_merged_checkpoint_is_valid_and_says_where_it_came_from(tiny_run, tiny_source):
    out, root, reporter, recipe = tiny_run
    report = check_checkpoint(out)
    assert report.ok, report.problems
    assert report.variants == ["w8a8", "w4a16"]
    manifest = json.loads((out / fmt.MANIFEST_NAME).read_text())
    assert manifest["source"]["path"] == str(tiny_source.resolve())
    assert manifest["recipe"] == recipe.model_dump()
    assert manifest["calibration"]["num_samples"] == 16 and len(manifest["calibration"]["sha256"]) == 64
    assert set(manifest["versions"]) >= {"torch", "transformers", "llmcompressor", "compressed-tensors"}
    assert manifest["group_sizes"] == {"w8a8": None, "w4a16": 64}
    assert manifest["peak_rss_bytes"] > 50 * 2**20
    # hidden size 64 cannot take group 128: said in the job log and the manifest
    assert any("group size 64 instead of 128" in line for line in reporter.lines)
    assert any("group size 64 instead of 128" in note for note in manifest["notes"])
    stages = [s for s, _, _ in reporter.updates]
    for stage in (
        "load",
        "smooth",
        "quantize w8a8",
        "save w8a8",
        "quantize w4a16",
        "merge",
        "validate",
        "done",
    ):
        assert stage in stages
    assert any(m == "layer 2/2" for s, _, m in reporter.updates if s == "quantize w4a16")
    percents = [p for _, p, _ in reporter.updates]
    assert percents == sorted(percents) and percents[-1] == 100.0


def test_smoothquant_ran_once_and_its_norms_are_shared(tiny_run, tiny_source):
    out, root, _, _ = tiny_run
    key = "model.layers.0.input_layernorm.weight"
    source = load_file(tiny_source / "model.safetensors")[key]
    smoothed = load_file(root / "work" / "smoothed" / "model.safetensors")[key]
    merged = load_file(tensor_index(out)[key])[key]
    assert not torch.equal(source, smoothed)  # SmoothQuant folded its scales into the norm
    assert torch.equal(merged, smoothed)  # ... and every variant uses that one smoothed norm


def test_exported_variant_equals_variant_quantized_alone(tiny_run, tmp_path):
    from transformers import AutoTokenizer

    out, root, _, recipe = tiny_run
    tokenizer = AutoTokenizer.from_pretrained(out)
    data, _ = calibration_dataset(tokenizer, recipe)
    alone = quantize_variant(
        root / "work" / "smoothed",
        "w8a8",
        tmp_path / "alone",
        recipe=recipe,
        data=data,
        tokenizer=tokenizer,
        group_size=None,
    )
    exported = export_variant(out, "w8a8", tmp_path / "exported")
    assert check_checkpoint(exported).ok
    ids = tokenizer("The prime minister said on Tuesday that", return_tensors="pt").input_ids
    assert torch.equal(_logits(exported, ids), _logits(alone, ids))
    # the other variant is a different model: its logits differ
    w4 = export_variant(out, "w4a16", tmp_path / "w4")
    assert not torch.equal(_logits(w4, ids), _logits(exported, ids))


def test_cancel_between_stages_publishes_nothing(tiny_source, tmp_path):
    reporter = RecordingReporter(cancel_at="quantize w4a16")
    with pytest.raises(Cancelled):
        quantize_and_merge(
            tiny_source,
            tmp_path / "out",
            QuantRecipe(num_samples=4, seq_len=32),
            reporter=reporter,
            work_dir=tmp_path / "work",
        )
    assert not (tmp_path / "out").exists()
    assert "merge" not in [s for s, _, _ in reporter.updates]


def test_existing_output_is_refused_before_any_work(tiny_source, tmp_path):
    (tmp_path / "out").mkdir()
    reporter = RecordingReporter()
    with pytest.raises(FileExistsError, match="already exists"):
        quantize_and_merge(tiny_source, tmp_path / "out", QuantRecipe(), reporter=reporter, work_dir=tmp_path)
    assert reporter.updates == []


@pytest.mark.slow
def test_smollm2_quantize_merge_export_generate(default_model_dir, tmp_path):
    """The real model end to end: quantize -> merge -> check -> export -> load -> generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    reporter = RecordingReporter()
    recipe = QuantRecipe(num_samples=8, seq_len=256)
    out = quantize_and_merge(
        default_model_dir, tmp_path / "smol", recipe, reporter=reporter, work_dir=tmp_path / "work"
    )
    report = check_checkpoint(out)
    assert report.ok, report.problems
    assert json.loads((out / fmt.MANIFEST_NAME).read_text())["group_sizes"]["w4a16"] == 64  # 576 % 128 != 0
    assert report.weight_bytes["w4a16"] < report.weight_bytes["w8a8"] < 2 * report.weight_bytes["w4a16"] + 1e7
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    for variant in ("w8a8", "w4a16"):
        model = AutoModelForCausalLM.from_pretrained(export_variant(out, variant, tmp_path / variant))
        text = tokenizer.decode(model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :])
        assert "Paris" in text, (variant, text)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_variants_side_by_side_give_the_same_checkpoint(tiny_source, tmp_path, monkeypatch):
    """One process per variant (what SmolLM2-sized models get on a CPU) = one after the other, bit for bit."""
    recipe = QuantRecipe(num_samples=4, seq_len=32)
    monkeypatch.setenv("FLEXQUANT_PARALLEL_VARIANTS", "0")
    sequential = quantize_and_merge(
        tiny_source, tmp_path / "seq", recipe, reporter=RecordingReporter(), work_dir=tmp_path / "w1"
    )
    monkeypatch.setenv("FLEXQUANT_PARALLEL_VARIANTS", "1")
    reporter = RecordingReporter()
    parallel = quantize_and_merge(
        tiny_source, tmp_path / "par", recipe, reporter=reporter, work_dir=tmp_path / "w2"
    )
    assert check_checkpoint(parallel).ok
    manifest = json.loads((parallel / fmt.MANIFEST_NAME).read_text())
    assert manifest["peak_rss_largest_child_bytes"] > 50 * 2**20  # a child loaded torch and the model
    a, b = _tensors(sequential), _tensors(parallel)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    stages = [s for s, _, _ in reporter.updates]
    assert "quantize w8a8+w4a16" in stages and "quantize w8a8" not in stages
    side = [m for s, _, m in reporter.updates if s == "quantize w8a8+w4a16"]
    assert any("w8a8 layer 2/2" in m for m in side) and any("w4a16 layer 2/2" in m for m in side), side
    assert any("side by side" in line for line in reporter.lines)
    percents = [p for _, p, _ in reporter.updates]
    assert percents == sorted(percents)  # the mean of two children never goes backwards


def test_cancel_while_variants_run_side_by_side_kills_them(tiny_source, tmp_path, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("FLEXQUANT_PARALLEL_VARIANTS", "1")
    reporter = RecordingReporter(cancel_at="quantize w8a8+w4a16")
    with pytest.raises(Cancelled):
        quantize_and_merge(
            tiny_source,
            tmp_path / "out",
            QuantRecipe(num_samples=4, seq_len=32),
            reporter=reporter,
            work_dir=tmp_path / "work",
        )
    assert not (tmp_path / "out").exists()
    assert multiprocessing.active_children() == []
