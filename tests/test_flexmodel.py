"""FlexModel on a real tiny merged checkpoint built with llmcompressor.

The reference for each variant is transformers loading that single compressed-tensors checkpoint
(it decompresses through compressed-tensors); FlexModel must compute the same logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.ckpt_format import FORMAT_VERSION, QUANT_METHOD, split_variant_key
from workbench.policy import DecodeRule, LayerRule, Policy, PolicyError, StepInfo, fixed_policy

VARIANTS = {"w8a8": "W8A8", "w4a16": "W4A16"}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_tokenizer(out_dir: Path) -> None:
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}  # a list in set order: sort
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.save_pretrained(out_dir)


def build_tiny_checkpoints(root: Path) -> tuple[Path, dict[str, Path]]:
    """A tiny random Llama quantized by llmcompressor oneshot into W8A8 and W4A16 single
    checkpoints, and the merged checkpoint assembled from them. Returns (merged, {variant: single})."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = root / "base"
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=272, max_position_embeddings=256,
                      bos_token_id=256, eos_token_id=257, pad_token_id=256)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # bigger weights than the init so greedy decoding is not trivially flat
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    model.save_pretrained(base)
    save_tiny_tokenizer(base)
    singles = {}
    for variant, scheme in VARIANTS.items():
        m = LlamaForCausalLM.from_pretrained(base)
        oneshot(model=m, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
        singles[variant] = root / variant
        m.save_pretrained(singles[variant], save_compressed=True)
        save_tiny_tokenizer(singles[variant])
    try:  # the project's merger (manifest, default policy, validation) once it is there
        from workbench.quant.merge import merge_variants
    except ImportError:
        return merge_singles(singles, root / "merged"), singles
    return merge_variants(singles, root / "merged", tokenizer_dir=base), singles


def merge_singles(singles: dict[str, Path], out: Path) -> Path:
    """Stand-in merger for builds without workbench.quant.merge: P.<tensor> -> P.<variant>.<tensor>."""
    tensors: dict[str, torch.Tensor] = {}
    qconfigs = {}
    for variant, path in singles.items():
        config = json.loads((path / "config.json").read_text())
        qconfigs[variant] = config.pop("quantization_config")
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            keys = list(f.keys())
            quantized = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_scale")}
            for key in keys:
                prefix, _, name = key.rpartition(".")
                if prefix in quantized:
                    tensors[f"{prefix}.{variant}.{name}"] = f.get_tensor(key)
                else:
                    tensors[key] = f.get_tensor(key)
    out.mkdir(parents=True)
    config["quantization_config"] = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
                                     "variants": qconfigs, "policy": None}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "model.safetensors"))
    first = next(iter(singles.values()))
    for f in first.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.set_num_threads(1)
    return build_tiny_checkpoints(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def flex(ckpts):
    from workbench.runtime.flexmodel import FlexModel

    return FlexModel.load(ckpts[0])


def reference_model(single: Path, quantize_inputs: bool = True):
    """transformers' own load of one compressed-tensors variant, decompressed to float.

    The decompressed modules keep compressed-tensors' QDQ forward, so a W8A8 reference quantizes
    activations per token like an int8 kernel; `quantize_inputs=False` switches that off.
    """
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    config = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(single, quantization_config=config, dtype=torch.float32)
    if not quantize_inputs:
        for module in model.modules():
            if getattr(module, "quantization_scheme", None) is not None:
                module.quantization_enabled = False
    return model.eval()


@pytest.mark.parametrize("variant", ["w4a16", "w8a8"])
def test_flexmodel_matches_transformers_on_single_variant(ckpts, flex, variant):
    merged, singles = ckpts
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = reference_model(singles[variant])
    flex.use_variant(variant)
    with torch.no_grad():
        got, want = flex.model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_variants_differ_and_w8a8_quantizes_activations(ckpts, flex):
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        flex.use_variant("w8a8")
        w8 = flex.model(ids).logits
        flex.use_variant("w4a16")
        w4 = flex.model(ids).logits
        ref_no_act_quant = reference_model(ckpts[1]["w8a8"], quantize_inputs=False)(ids).logits
    assert (w8 - w4).abs().max() > 1e-2
    # Same int8 weights, but without activation QDQ the logits move: the emulation is not a no-op.
    assert (w8 - ref_no_act_quant).abs().max() > 1e-5


def test_set_step_follows_policy_per_layer(flex):
    policy = Policy(name="t", prefill="w8a8", decode=[DecodeRule(max_batch=2, variant="w4a16"),
                                                       DecodeRule(variant="w8a8")],
                    layers=[LayerRule(first=1, last=1, variant="w4a16")])
    assert flex.set_step(policy, StepInfo(10, 0)) == {0: "w8a8", 1: "w4a16"}
    assert flex.linears["model.layers.0.mlp.up_proj"].active == "w8a8"
    assert flex.linears["model.layers.1.mlp.up_proj"].active == "w4a16"
    assert flex.set_step(policy, StepInfo(0, 2)) == {0: "w4a16", 1: "w4a16"}
    assert flex.set_step(policy, StepInfo(0, 3)) == {0: "w8a8", 1: "w4a16"}
    with pytest.raises(PolicyError, match="fp8"):
        flex.check_policy(fixed_policy("fp8"))
    with pytest.raises(PolicyError, match="past the model"):
        flex.check_policy(Policy(name="x", prefill="w8a8", decode=[DecodeRule(variant="w8a8")],
                                 layers=[LayerRule(first=2, last=5, variant="w4a16")]))


def checkpoint_bytes(path: Path, variants) -> dict[str, int]:
    sizes = {v: 0 for v in variants} | {"shared": 0}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118
                split = split_variant_key(key, list(variants))
                sizes[split[1] if split else "shared"] += f.get_tensor(key).nbytes
    return sizes


def test_weight_bytes_equal_checkpoint_tensor_bytes(ckpts, flex):
    assert flex.weight_bytes() == checkpoint_bytes(ckpts[0], VARIANTS)
    report = flex.memory_report()
    assert report.total == sum(checkpoint_bytes(ckpts[0], VARIANTS).values())
    assert report.per_variant["w4a16"] < report.per_variant["w8a8"]


def test_drop_unused_frees_pinned_layers_only(ckpts):
    from workbench.runtime.flexmodel import FlexModel

    flex = FlexModel.load(ckpts[0])
    before = flex.weight_bytes()
    layer0 = {p: lin.quant_bytes["w4a16"] for p, lin in flex.linears.items() if flex.layer_of[p] == 0}
    pinned = Policy(name="pin0", prefill="w8a8", decode=[DecodeRule(max_batch=4, variant="w4a16"),
                                                          DecodeRule(variant="w8a8")],
                    layers=[LayerRule(first=0, last=0, variant="w8a8")])
    freed = flex.drop_unused(pinned)
    assert freed == sum(layer0.values()) > 0
    after = flex.weight_bytes()
    assert after["w4a16"] == before["w4a16"] - freed and after["w8a8"] == before["w8a8"]
    assert flex.memory_report().dropped == {"w4a16": freed}
    flex.set_step(pinned, StepInfo(0, 1))  # still runs: layer 0 never needs w4a16
    with pytest.raises(PolicyError, match="drop_unused"):
        flex.check_policy(fixed_policy("w4a16"))


def test_bf16_sharded_checkpoint_computes_in_fp32_and_counts_stored_bytes(tmp_path):
    """A bf16 checkpoint in several shards (the project's synthetic writer) loads for fp32 compute,
    while the memory report still counts the bytes as stored."""
    synthetic = pytest.importorskip("workbench.quant.synthetic")
    from workbench.runtime.flexmodel import FlexModel

    ckpt = synthetic.make_synthetic_checkpoint(tmp_path / "syn", max_shard_bytes=64 * 1024)
    assert len(list(ckpt.glob("*.safetensors"))) > 1
    flex = FlexModel.load(ckpt)
    assert {p.dtype for p in flex.model.parameters()} == {torch.float32}
    assert flex.weight_bytes() == checkpoint_bytes(ckpt, VARIANTS)
    for variant in VARIANTS:
        flex.use_variant(variant)
        with torch.no_grad():
            logits = flex.model(torch.tensor([[1, 2, 3]])).logits
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
