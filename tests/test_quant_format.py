"""Merged-checkpoint layout, export, merge and the validator, on tiny synthetic checkpoints (fast).

Corruption tests damage a real written checkpoint the way disks and people do (truncate a shard,
flip bytes inside a tensor, drop a tensor, swap the quant_method) and assert the problem names the
file or tensor at fault.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workbench import ckpt_format as fmt
from workbench.policy import DEFAULT_POLICY, policy_from_dict
from workbench.quant.check import check_checkpoint
from workbench.quant.ckpt_io import write_manifest
from workbench.quant.ckpt_read import read_safetensors_header, tensor_index
from workbench.quant.export import export_variant
from workbench.quant.merge import default_policy_for, merge_variants
from workbench.quant.recipe import choose_group_size, parse_recipe, variant_quant_config
from workbench.quant.shapes import SHAPES, ShapeSpec, write_tiny_tokenizer
from workbench.quant.synthetic import make_synthetic_checkpoint

Q = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tokenizer_dir) -> Path:
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("m") / "ckpt", tokenizer_dir=tokenizer_dir)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, path in tensor_index(folder).items():
        with safe_open(str(path), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


def test_merged_layout_matches_design(merged):
    report = check_checkpoint(merged)
    assert report.ok, report.problems
    assert report.kind == "merged" and report.variants == ["w8a8", "w4a16"]
    tensors = _all_tensors(merged)
    assert tensors[f"{Q}.w8a8.weight"].dtype == torch.int8 and tensors[f"{Q}.w8a8.weight"].shape == (64, 64)
    assert tensors[f"{Q}.w8a8.weight_scale"].shape == (64, 1)
    # hidden 64 does not divide by 128: W4A16 falls back to group 64 (one group per row here)
    assert tensors[f"{Q}.w4a16.weight_packed"].dtype == torch.int32
    assert tensors[f"{Q}.w4a16.weight_packed"].shape == (64, 64 // 8)
    assert tensors[f"{Q}.w4a16.weight_scale"].shape == (64, 1)
    assert tensors[f"{Q}.w4a16.weight_shape"].tolist() == [64, 64]
    assert f"{Q}.weight" not in tensors and "model.norm.weight" in tensors and "lm_head.weight" in tensors
    qcfg = fmt.read_flexquant_config(merged)
    assert qcfg["variants"]["w4a16"]["config_groups"]["group_0"]["weights"]["group_size"] == 64
    assert policy_from_dict(qcfg["policy"]) == DEFAULT_POLICY
    manifest = json.loads((merged / fmt.MANIFEST_NAME).read_text())
    assert manifest["group_sizes"] == {"w8a8": None, "w4a16": 64}
    assert set(manifest["files"]) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert manifest["variants"]["w8a8"]["scheme"] == "W8A8"
    # the validator's byte count and the tensors agree
    w4_bytes = sum(t.nbytes for k, t in tensors.items() if ".w4a16." in k)
    assert report.weight_bytes["w4a16"] == w4_bytes and report.weight_bytes["w8a8"] > w4_bytes


def test_export_equals_single_variant_written_directly(merged, tokenizer_dir, tmp_path):
    exported = export_variant(merged, "w4a16", tmp_path / "exp")
    report = check_checkpoint(exported)
    assert report.ok, report.problems
    assert report.kind == "single"
    direct = make_synthetic_checkpoint(
        tmp_path / "direct", variants=["w4a16"], layout="single", tokenizer_dir=tokenizer_dir
    )
    a, b = _all_tensors(exported), _all_tensors(direct)
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert fmt.read_config(exported)["quantization_config"] == fmt.read_config(direct)["quantization_config"]
    with pytest.raises(ValueError, match="not 'fp8'"):
        export_variant(merged, "fp8", tmp_path / "nope")


def test_exported_variant_loads_in_transformers(merged, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = export_variant(merged, "w8a8", tmp_path / "exp")
    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5
    # the decompressed weight is scale * int8, exactly
    t = _all_tensors(merged)
    want = t[f"{Q}.w8a8.weight"].float() * t[f"{Q}.w8a8.weight_scale"].float()
    got = model.model.layers[0].self_attn.q_proj.weight.float()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-6)


def test_merge_of_singles_equals_merged_and_refuses_mismatched_variants(merged, tokenizer_dir, tmp_path):
    singles = {
        v: make_synthetic_checkpoint(tmp_path / v, variants=[v], layout="single", tokenizer_dir=tokenizer_dir)
        for v in ("w8a8", "w4a16")
    }
    out = merge_variants(singles, tmp_path / "merged", tokenizer_dir=tokenizer_dir, manifest={"note": "test"})
    assert check_checkpoint(out).ok
    a, b = _all_tensors(out), _all_tensors(merged)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    other = make_synthetic_checkpoint(tmp_path / "other", variants=["w4a16"], layout="single", seed=1)
    with pytest.raises(ValueError, match="differs between variants"):
        merge_variants({"w8a8": singles["w8a8"], "w4a16": other}, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]  # temp dir cleaned up
    with pytest.raises(FileExistsError, match="already exists"):
        merge_variants(singles, tmp_path / "merged")


def test_sharded_checkpoint_and_fp8(tmp_path, tokenizer_dir):
    ckpt = make_synthetic_checkpoint(
        tmp_path / "c", variants=["w8a8", "w4a16", "fp8"], tokenizer_dir=tokenizer_dir, max_shard_bytes=60_000
    )
    names = sorted(p.name for p in ckpt.glob("*.safetensors"))
    assert len(names) >= 3 and (ckpt / "model.safetensors.index.json").is_file()
    report = check_checkpoint(ckpt)
    assert report.ok, report.problems
    assert set(report.variants) == {"w8a8", "w4a16", "fp8"}
    exported = export_variant(ckpt, "fp8", tmp_path / "fp8")
    assert check_checkpoint(exported).ok
    assert _all_tensors(exported)[f"{Q}.weight"].dtype == torch.float8_e4m3fn


def test_truncated_shard_is_named(merged, tmp_path):
    ckpt = _copy(merged, tmp_path)
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    report = check_checkpoint(ckpt)
    assert not report.ok
    assert any("model.safetensors" in p and "truncated" in p for p in report.problems), report.problems


def test_flipped_bytes_name_the_tensor(merged, tmp_path):
    ckpt = _copy(merged, tmp_path)
    path = ckpt / "model.safetensors"
    header, start = read_safetensors_header(path)
    key = "model.layers.1.mlp.down_proj.w4a16.weight_packed"
    offset = start + header[key]["data_offsets"][0] + 10
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    report = check_checkpoint(ckpt)
    assert len(report.problems) == 1, report.problems
    assert "sha256" in report.problems[0] and key in report.problems[0]


def test_dropped_variant_tensor_is_named_even_with_a_fresh_manifest(merged, tmp_path):
    ckpt = _copy(merged, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.w8a8.weight_scale"
    del tensors[key]
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((ckpt / fmt.MANIFEST_NAME).read_text())
    (ckpt / fmt.MANIFEST_NAME).unlink()
    write_manifest(ckpt, {k: v for k, v in manifest.items() if k not in ("files", "created_at")})
    report = check_checkpoint(ckpt)
    assert report.problems == ["model.layers.1.mlp.up_proj: variant w8a8 lacks tensor 'weight_scale'"]


def test_foreign_quant_method_and_bad_variant_config(merged, tmp_path):
    ckpt = _copy(merged, tmp_path)
    config = fmt.read_config(ckpt)
    config["quantization_config"]["quant_method"] = "gptq"
    (ckpt / "config.json").write_text(json.dumps(config))
    report = check_checkpoint(ckpt)
    assert any("quant_method is 'gptq'" in p for p in report.problems), report.problems

    config["quantization_config"]["quant_method"] = "flexquant"
    config["quantization_config"]["variants"]["w4a16"]["config_groups"]["group_0"]["weights"]["num_bits"] = (
        "four"
    )
    (ckpt / "config.json").write_text(json.dumps(config))
    report = check_checkpoint(ckpt, verify_hashes=False)
    assert any("variant 'w4a16' quantization_config is invalid" in p for p in report.problems), (
        report.problems
    )


def test_wrong_shape_missing_tokenizer_and_unlisted_file(merged, tmp_path):
    ckpt = _copy(merged, tmp_path)
    tensors = load_file(ckpt / "model.safetensors")
    tensors[f"{Q}.w4a16.weight_scale"] = torch.ones(
        64, 2, dtype=torch.bfloat16
    )  # group 32 scales, config says 64
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    (ckpt / "tokenizer.json").unlink()
    (ckpt / "extra.safetensors").write_bytes(b"")
    problems = check_checkpoint(ckpt).problems
    assert f"{Q}.w4a16.weight_scale: shape [64, 2], expected [64, 1]" in problems
    assert any("no tokenizer files" in p for p in problems)
    assert any(p.startswith("tokenizer.json: listed in the manifest but missing") for p in problems)
    assert any(p.startswith("extra.safetensors: present but not listed") for p in problems)


def test_recipe_validation_and_group_size_choice():
    assert parse_recipe({}).variants == ["w8a8", "w4a16"]
    with pytest.raises(ValueError, match="unknown variant"):
        parse_recipe({"variants": ["w3a16"]})
    with pytest.raises(ValueError, match="power of two"):
        parse_recipe({"w4a16_group_size": 96})
    with pytest.raises(ValueError, match="num_samples"):
        parse_recipe({"num_samples": 0})
    with pytest.raises(ValueError, match="seq_len"):
        parse_recipe({"seq_len": "long"})
    assert choose_group_size(128, [576, 1536]) == 64  # SmolLM2
    assert choose_group_size(128, [4096, 14336]) == 128  # Llama-3-8B
    with pytest.raises(ValueError, match="no group size"):
        choose_group_size(128, [100])
    assert variant_quant_config("w4a16", 64)["config_groups"]["group_0"]["weights"]["group_size"] == 64


def test_default_policy_adapts_to_variants():
    assert policy_from_dict(default_policy_for(["w8a8", "w4a16"])) == DEFAULT_POLICY
    assert policy_from_dict(default_policy_for(["w8a8"])).variants == {"w8a8"}
    fp8_policy = policy_from_dict(default_policy_for(["fp8", "w4a16"]))
    assert fp8_policy.prefill == "fp8" and fp8_policy.decode[0].variant == "w4a16"


def test_qwen2_layout_keeps_qkv_bias_shared_and_loads(monkeypatch, tmp_path, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    monkeypatch.setitem(
        SHAPES, "tiny-qwen2", ShapeSpec("Qwen2ForCausalLM", 64, 128, 2, 4, 2, 256, qkv_bias=True)
    )
    ckpt = make_synthetic_checkpoint(tmp_path / "q", shapes="tiny-qwen2", tokenizer_dir=tokenizer_dir)
    assert check_checkpoint(ckpt).ok
    tensors = _all_tensors(ckpt)
    assert tensors[f"{Q}.bias"].shape == (64,) and not any(k.endswith(".w8a8.bias") for k in tensors)
    exported = export_variant(ckpt, "w4a16", tmp_path / "w4")
    model = AutoModelForCausalLM.from_pretrained(exported)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias.detach(), tensors[f"{Q}.bias"])
    assert model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False).shape == (1, 6)

    tensors.pop("model.layers.1.self_attn.v_proj.bias")
    save_file(tensors, ckpt / "model.safetensors", metadata={"format": "pt"})
    assert "shared tensor model.layers.1.self_attn.v_proj.bias is missing" in check_checkpoint(ckpt).problems
