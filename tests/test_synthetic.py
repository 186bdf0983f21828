"""Synthetic checkpoint sets (`make_synthetic_set`, `flexquant synth`) on tiny-llama shapes, on the CPU.

The expectations are built independently of the writer: the random stream is re-drawn here with a
plain `torch.Generator`, the quantized tensors are recomputed from the bf16 layout's weights the way
the earlier per-layout writer did (fp32 min-max scale, compressed-tensors' compressor) and decoded
with compressed-tensors' own decompressors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from workbench import ckpt_format as fmt
from workbench.cli import app
from workbench.quant import ckpt_io, ckpt_read
from workbench.quant.check import check_checkpoint
from workbench.quant.merge import strip_variant_suffix
from workbench.quant.recipe import VARIANT_SPECS, variant_scheme
from workbench.quant.shapes import SHAPES, ShapeSpec
from workbench.quant.synthetic import QMAX, WEIGHT_STD, make_synthetic_checkpoint, make_synthetic_set

SPEC = SHAPES["tiny-llama"]
GROUP = 64  # tiny-llama's hidden 64 does not divide by 128
Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> dict[str, Path]:
    # Small shards: several per layout, so the background save/hash path runs more than once.
    return make_synthetic_set(
        tmp_path_factory.mktemp("set"), shapes="tiny-llama", seed=3, max_shard_bytes=50_000
    )


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, path in ckpt_read.tensor_index(folder).items():
        with safe_open(str(path), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def quantize_like_old_writer(weight: torch.Tensor, variant: str) -> dict[str, torch.Tensor]:
    """What the per-layout writer stored for one bf16 weight before the one-pass writer existed."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = variant_scheme(variant, GROUP if VARIANT_SPECS[variant].grouped else None)
    w = weight.float()
    if VARIANT_SPECS[variant].grouped:
        absmax = w.reshape(w.shape[0], -1, GROUP).abs().amax(-1)
    else:
        absmax = w.abs().amax(-1, keepdim=True)
    scale = (absmax / QMAX[variant]).clamp_min(1e-8).to(weight.dtype)
    return BaseCompressor.get_value_from_registry(scheme.format).compress(
        {"weight": weight, "weight_scale": scale}, scheme
    )


def decode(stored: dict[str, torch.Tensor], variant: str) -> torch.Tensor:
    """Dequantized weight, by compressed-tensors' own decompressor."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = variant_scheme(variant, GROUP if VARIANT_SPECS[variant].grouped else None)
    return BaseCompressor.get_value_from_registry(scheme.format).decompress(dict(stored), scheme)["weight"]


def linear_tensors(all_tensors: dict[str, torch.Tensor], linear: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(linear + "."): t for k, t in all_tensors.items() if k.rsplit(".", 1)[0] == linear}


def test_set_layout_folders_and_random_stream(tiny_set):
    assert {k: p.name for k, p in tiny_set.items()} == {
        layout: f"tiny-llama-{layout}" for layout in ("bf16", "w8a8", "w4a16", "merged")
    }
    bf16 = tensors(tiny_set["bf16"])
    # The draw order the earlier writer used: embedding, then layer 0's q_proj weight, ...
    gen = torch.Generator().manual_seed(3)
    embed = (torch.randn(SPEC.vocab, SPEC.hidden, generator=gen) * WEIGHT_STD).to(torch.bfloat16)
    q_weight = (torch.randn(SPEC.hidden, SPEC.hidden, generator=gen) * WEIGHT_STD).to(torch.bfloat16)
    assert torch.equal(bf16["model.embed_tokens.weight"], embed)
    assert torch.equal(bf16[f"{Q}.weight"], q_weight)
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    assert "quantization_config" not in fmt.read_config(tiny_set["bf16"])
    manifest = json.loads((tiny_set["bf16"] / fmt.MANIFEST_NAME).read_text())
    assert manifest["kind"] == "bf16" and manifest["synthetic"] == {
        "shapes": "tiny-llama",
        "seed": 3,
        "device": "cpu",
    }
    assert len(list(tiny_set["merged"].glob("*.safetensors"))) > 2  # sharded
    # every other layout shares the bf16 layout's unquantized tensors, bit for bit
    for layout in ("w8a8", "w4a16", "merged"):
        got = tensors(tiny_set[layout])
        assert all(torch.equal(got[k], bf16[k]) for k in bf16 if not k.endswith("_proj.weight"))


def test_quantized_layouts_equal_the_earlier_writer_and_decode_to_the_bf16_weights(tiny_set):
    bf16, merged = tensors(tiny_set["bf16"]), tensors(tiny_set["merged"])
    singles = {v: tensors(tiny_set[v]) for v in ("w8a8", "w4a16")}
    for variant, single in singles.items():
        # the merged slice of a variant is exactly the single-variant checkpoint (keys, dtypes, bytes)
        sliced = {strip_variant_suffix(k, variant): t for k, t in merged.items() if f".{variant}." in k}
        shared = {k: t for k, t in merged.items() if not any(f".{v}." in k for v in singles)}
        assert same_tensors({**sliced, **shared}, single)
    for key, weight in bf16.items():
        if not key.endswith("_proj.weight"):
            continue
        linear = key.removesuffix(".weight")
        for variant, single in singles.items():
            stored = linear_tensors(single, linear)
            assert same_tensors(stored, quantize_like_old_writer(weight, variant)), (linear, variant)
            scale = (
                stored["weight_scale"]
                .float()
                .repeat_interleave(weight.shape[1] // stored["weight_scale"].shape[1], 1)
            )
            error = (decode(stored, variant).float() - weight.float()).abs()
            # round-to-nearest: within half a step (+ bf16 rounding of scale and result), on average ~1/4
            assert (error <= 0.5 * scale + weight.float().abs() / 64 + 1e-6).all(), (linear, variant)
            assert error.mean() < 0.35 * scale.mean()
    # a different weight (the next layer's) is far outside that error: the check can fail
    other = decode(linear_tensors(singles["w8a8"], "model.layers.1.self_attn.q_proj"), "w8a8")
    assert (other.float() - bf16[f"{Q}.weight"].float()).abs().mean() > 10 * singles["w8a8"][
        f"{Q}.weight_scale"
    ].float().mean()


def test_make_synthetic_checkpoint_writes_what_the_set_writes(tiny_set, tmp_path):
    merged = make_synthetic_checkpoint(tmp_path / "m", seed=3, tokenizer_dir=tiny_set["bf16"])
    single = make_synthetic_checkpoint(tmp_path / "s", variants=["w4a16"], layout="single", seed=3)
    assert same_tensors(tensors(merged), tensors(tiny_set["merged"]))
    assert same_tensors(tensors(single), tensors(tiny_set["w4a16"]))
    assert fmt.read_config(merged) == fmt.read_config(tiny_set["merged"])
    assert (merged / "tokenizer.json").read_bytes() == (tiny_set["merged"] / "tokenizer.json").read_bytes()


def test_bf16_layout_loads_in_transformers_and_the_tokenizer_covers_the_vocab(tiny_set):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_set["bf16"])
    assert model.dtype == torch.bfloat16
    assert torch.equal(
        model.model.layers[0].self_attn.q_proj.weight.detach(), tensors(tiny_set["bf16"])[f"{Q}.weight"]
    )
    tok = AutoTokenizer.from_pretrained(tiny_set["bf16"])
    ids = tok("t5 t17 t1 t255 word", return_tensors="pt").input_ids
    assert ids.tolist() == [[5, 17, 1, 255, 1]]  # one id per word; unknown words are t1
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    assert tok.decode(list(range(SPEC.vocab))).split() == [f"t{i}" for i in range(SPEC.vocab)]


def test_flexquant_check_passes_on_merged_and_single_layouts(tiny_set):
    root = tiny_set["merged"].parent
    for layout, kind in (("merged", "merged"), ("w8a8", "single"), ("w4a16", "single")):
        result = CliRunner().invoke(
            app, ["--data-dir", str(root / "data"), "--allow-root", str(root), "check", str(tiny_set[layout])]
        )
        assert result.exit_code == 0, result.output
        assert "checkpoint ok" in result.output and kind in result.output
    # the manifest hashes made in the background match the files
    assert check_checkpoint(tiny_set["merged"], verify_hashes=True).ok


def test_qwen2_shapes_with_qkv_bias(monkeypatch, tmp_path):
    monkeypatch.setitem(
        SHAPES, "tiny-qwen2", ShapeSpec("Qwen2ForCausalLM", 64, 128, 2, 4, 2, 256, qkv_bias=True)
    )
    paths = make_synthetic_set(tmp_path, shapes="tiny-qwen2", layouts=["merged", "bf16"], tokenizer=None)
    assert check_checkpoint(paths["merged"]).ok
    bias = f"{Q}.bias"
    assert torch.equal(tensors(paths["merged"])[bias], tensors(paths["bf16"])[bias])


def test_bad_requests_fail_before_writing_anything(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown shapes 'llama9'.*llama3-8b"):
        make_synthetic_set(tmp_path, shapes="llama9")
    with pytest.raises(ValueError, match="name one or more of"):
        make_synthetic_set(tmp_path, shapes="tiny-llama", layouts=["bf16", "w3a3"])
    with pytest.raises(ValueError, match="each once"):
        make_synthetic_set(tmp_path, shapes="tiny-llama", layouts=["bf16", "bf16"])
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        make_synthetic_set(tmp_path, shapes="tiny-llama", device="mps")
    with pytest.raises(ValueError, match="holds none of tokenizer.json"):
        make_synthetic_set(tmp_path, shapes="tiny-llama", tokenizer=tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' asked.*use device 'cpu'"):
        make_synthetic_set(tmp_path, shapes="tiny-llama", device="cuda")
    (tmp_path / "tiny-llama-merged").mkdir()
    with pytest.raises(FileExistsError, match="tiny-llama-merged already exists"):
        make_synthetic_set(tmp_path, shapes="tiny-llama")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama-merged"]  # no other folder, no temp left


def test_cancel_mid_run_publishes_nothing(tmp_path):
    from jobs.progress import Cancelled, Reporter

    class CancelAtLayer2(Reporter):
        def check_cancelled(self) -> None:
            if self.percent >= 100:
                raise Cancelled("stop")

    with pytest.raises(Cancelled):
        make_synthetic_set(tmp_path, shapes="tiny-llama", max_shard_bytes=20_000, reporter=CancelAtLayer2())
    assert list(tmp_path.iterdir()) == []


def test_cli_synth_writes_the_set_and_reports_bad_input(tmp_path, monkeypatch):
    def synth(*args: str):
        result = CliRunner().invoke(app, ["--data-dir", str(tmp_path / "data"), "synth", *args])
        assert "Traceback" not in result.output, result.output
        return result

    out = tmp_path / "out"
    ok = synth("--shapes", "tiny-llama", "--out", str(out), "--layouts", "bf16,w8a8", "--seed", "1")
    assert ok.exit_code == 0, ok.output
    assert sorted(p.name for p in out.iterdir()) == ["tiny-llama-bf16", "tiny-llama-w8a8"]
    assert "wrote 2 checkpoint(s)" in ok.output and "100.0%" in ok.output
    assert check_checkpoint(out / "tiny-llama-w8a8").ok

    bad = synth("--shapes", "llama9", "--out", str(out))
    assert bad.exit_code == 2 and "unknown shapes 'llama9'" in bad.output and "%" not in bad.output
    bad = synth("--shapes", "tiny-llama", "--out", str(out), "--layouts", "w8a8")
    assert bad.exit_code == 2 and "tiny-llama-w8a8 already exists" in bad.output
    bad = synth("--shapes", "tiny-llama", "--out", str(out), "--layouts", "int3")
    assert bad.exit_code == 2 and "layouts ['int3']" in bad.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bad = synth("--shapes", "tiny-llama", "--out", str(tmp_path / "gpu"), "--device", "cuda")
    assert bad.exit_code == 2 and "device 'cuda' asked" in bad.output
    assert not (tmp_path / "gpu").exists() or not any((tmp_path / "gpu").iterdir())


def test_cli_modules_stay_light():
    code = (
        "import sys, workbench.cli_synth\n"
        "print(sorted(m for m in ('torch', 'gradio', 'transformers', 'vllm') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "[]"


def test_shard_writer_in_background_hashes_like_hash_file(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        writer = ckpt_io.ShardWriter(tmp_path, max_shard_bytes=3000, executor=pool)
        for i in range(10):
            writer.add(f"t{i}", torch.full((300,), i, dtype=torch.float32))
        names = writer.finish()
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) == 5 and writer.file_records == {n: ckpt_read.hash_file(tmp_path / n) for n in shards}
    manifest = ckpt_io.write_manifest(tmp_path, {"kind": "test"}, known=writer.file_records)
    assert manifest["files"] == ckpt_read.hash_files(
        p for p in sorted(tmp_path.iterdir()) if p.name != fmt.MANIFEST_NAME
    )
    # a stale record (size no longer matches) is not trusted: the file is hashed again
    save_file({"other": torch.zeros(2)}, tmp_path / shards[0])
    again = ckpt_io.write_manifest(tmp_path, {}, known=writer.file_records)
    assert (
        again["files"][shards[0]]
        == ckpt_read.hash_file(tmp_path / shards[0])
        != writer.file_records[shards[0]]
    )
    # a save that fails in the background is raised by finish()
    with ThreadPoolExecutor(1) as pool:
        broken = ckpt_io.ShardWriter(tmp_path / "gone", executor=pool)
        broken.add("x", torch.zeros(4))
        with pytest.raises(Exception, match="gone|No such file"):
            broken.finish()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_draw_quantizes_on_the_gpu_within_rounding_of_the_cpu_compressor(tmp_path):
    paths = make_synthetic_set(tmp_path, shapes="tiny-llama", layouts=["bf16", "merged"], device="cuda")
    assert check_checkpoint(paths["merged"]).ok
    bf16, merged = tensors(paths["bf16"]), tensors(paths["merged"])
    for variant in ("w8a8", "w4a16"):
        stored = {
            k.removeprefix(f"{Q}.{variant}."): t for k, t in merged.items() if k.startswith(f"{Q}.{variant}.")
        }
        want = quantize_like_old_writer(bf16[f"{Q}.weight"], variant)
        assert torch.equal(stored["weight_scale"], want["weight_scale"])
        # compressed-tensors 0.19 quantizes CUDA tensors in fp32 (Triton), the CPU path in bf16: a
        # value on a rounding boundary may land one step apart, never more
        diff = (decode(stored, variant).float() - decode(want, variant).float()).abs()
        assert (diff <= stored["weight_scale"].float().max() * 1.01).all()
