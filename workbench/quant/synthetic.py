"""Checkpoints with real shapes and random weights, in the exact merged (or single) layout.

Speed does not depend on weight values, so GPU speed runs use e.g. a Llama-3-8B-shaped checkpoint
written here instead of a real 8B model. Each linear gets one random bf16 weight, quantized to every
variant with compressed-tensors' own compressors (the variants of a layer are versions of the same
matrix, as in a real checkpoint); the variant configs come from `variant_quant_config`, the function
the real quantize path is checked against, so the two layouts cannot drift. Written layer by layer
through `ShardWriter`: an 8B checkpoint needs about one 2 GB shard of memory, not the whole model.

Also here: `make_tiny_source_model`, a tiny random bf16 Llama with a real (tiny) BPE tokenizer,
the input that fast tests of the quantize path use.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.quant.ckpt_io import (
    ShardWriter,
    copy_tokenizer_files,
    publishing,
    tool_versions,
    write_manifest,
)
from workbench.quant.merge import flexquant_config, validate_or_raise
from workbench.quant.recipe import (
    VARIANT_SPECS,
    choose_group_size,
    linear_shapes,
    variant_quant_config,
    variant_scheme,
)

__all__ = [
    "SHAPES",
    "ShapeSpec",
    "make_synthetic_checkpoint",
    "make_tiny_source_model",
    "write_tiny_tokenizer",
]

log = logging.getLogger(__name__)

WEIGHT_STD = 0.02  # typical init scale of LLM linears; keeps activations finite through many layers
QMAX = {"w8a8": 127.0, "w4a16": 7.0, "fp8": 448.0}


@dataclass(frozen=True)
class ShapeSpec:
    architecture: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    max_positions: int = 4096
    rms_eps: float = 1e-5

    def hf_config(self) -> dict:
        """A real transformers config dict for this shape (so loaders read it as they would a hub one)."""
        return self.hf_config_object().to_dict()

    def hf_config_object(self):  # -> transformers.PretrainedConfig
        from transformers import LlamaConfig, Qwen2Config

        common = dict(
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tie_embeddings,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_eps,
            architectures=[self.architecture],
            dtype="bfloat16",
            bos_token_id=0,
            eos_token_id=0,
        )
        if self.architecture == "Qwen2ForCausalLM":
            return Qwen2Config(**common)
        return LlamaConfig(**common, attention_bias=self.qkv_bias)


SHAPES: dict[str, ShapeSpec] = {
    "tiny-llama": ShapeSpec("LlamaForCausalLM", 64, 128, 2, 4, 2, 256),
    "smollm2-135m": ShapeSpec(
        "LlamaForCausalLM",
        576,
        1536,
        30,
        9,
        3,
        49152,
        tie_embeddings=True,
        rope_theta=100000.0,
        max_positions=8192,
    ),
    "llama3-8b": ShapeSpec(
        "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0, max_positions=8192
    ),
    "qwen2-7b": ShapeSpec(
        "Qwen2ForCausalLM",
        3584,
        18944,
        28,
        28,
        4,
        152064,
        qkv_bias=True,
        rope_theta=1000000.0,
        max_positions=32768,
        rms_eps=1e-6,
    ),
}


def _quantize(weight: torch.Tensor, variant: str, group_size: int | None) -> dict[str, torch.Tensor]:
    """Round-to-nearest min-max quantization of one bf16 weight into `variant`'s stored tensors."""
    from compressed_tensors.compressors import BaseCompressor

    scheme = variant_scheme(variant, group_size)
    w = weight.float()
    if VARIANT_SPECS[variant].grouped:
        absmax = w.reshape(w.shape[0], -1, group_size).abs().amax(-1)
    else:
        absmax = w.abs().amax(-1, keepdim=True)
    scale = (absmax / QMAX[variant]).clamp_min(1e-8).to(weight.dtype)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.compress({"weight": weight, "weight_scale": scale}, scheme)


def make_synthetic_checkpoint(
    out_dir: Path,
    *,
    shapes: str = "tiny-llama",
    variants: tuple[str, ...] | list[str] = ("w8a8", "w4a16"),
    layout: str = "merged",
    seed: int = 0,
    tokenizer_dir: Path | None = None,
    w4a16_group_size: int = 128,
    max_shard_bytes: int | None = None,
    reporter=None,
) -> Path:
    """Write a random checkpoint with `shapes`' real dimensions; published atomically at `out_dir`.

    `layout="merged"`: FlexQuant keys `P.<variant>.<tensor>`; `"single"`: exactly one variant in
    plain compressed-tensors layout (what `export_variant` produces). The tokenizer is copied from
    `tokenizer_dir` if given (its ids must fit the shape's vocab), else there is none.
    """
    if shapes not in SHAPES:
        raise ValueError(f"unknown shapes {shapes!r}; choose from {sorted(SHAPES)}")
    if layout not in ("merged", "single"):
        raise ValueError(f"layout must be 'merged' or 'single', not {layout!r}")
    variants = list(variants)
    unknown = [v for v in variants if v not in VARIANT_SPECS]
    if unknown or not variants:
        raise ValueError(f"variants {variants}: choose one or more of {sorted(VARIANT_SPECS)}")
    if layout == "single" and len(variants) != 1:
        raise ValueError(f"layout 'single' holds exactly one variant, got {variants}")
    spec = SHAPES[shapes]
    hf_config = spec.hf_config()
    linears = linear_shapes(hf_config)
    group = choose_group_size(w4a16_group_size, [i for _, i in linears.values()])
    group_sizes = {v: (group if VARIANT_SPECS[v].grouped else None) for v in variants}
    configs = {v: variant_quant_config(v, group_sizes[v]) for v in variants}
    hf_config["quantization_config"] = (
        flexquant_config(configs) if layout == "merged" else configs[variants[0]]
    )
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        # Row chunks: an fp32 128256 x 4096 embedding in one piece would cost 2 GiB extra RAM.
        out = torch.empty(*shape, dtype=torch.bfloat16)
        for rows in out.split(8192):
            rows.copy_(torch.randn(*rows.shape, generator=gen) * WEIGHT_STD)
        return out

    with publishing(Path(out_dir)) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=max_shard_bytes)
        writer.add("model.embed_tokens.weight", randn(spec.vocab, spec.hidden))
        for layer in range(spec.layers):
            prefix = f"model.layers.{layer}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                writer.add(f"{prefix}.{norm}.weight", torch.ones(spec.hidden, dtype=torch.bfloat16))
            for name, (out_f, in_f) in linears.items():
                weight = randn(out_f, in_f)
                if spec.qkv_bias and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
                    writer.add(f"{prefix}.{name}.bias", randn(out_f))
                for v in variants:
                    for tensor, value in _quantize(weight, v, group_sizes[v]).items():
                        key = (
                            f"{prefix}.{name}.{v}.{tensor}"
                            if layout == "merged"
                            else f"{prefix}.{name}.{tensor}"
                        )
                        writer.add(key, value)
            if reporter is not None:
                reporter.update(
                    "synthetic", 100.0 * (layer + 1) / spec.layers, f"layer {layer + 1}/{spec.layers}"
                )
                reporter.check_cancelled()
        writer.add("model.norm.weight", torch.ones(spec.hidden, dtype=torch.bfloat16))
        if not spec.tie_embeddings:
            writer.add("lm_head.weight", randn(spec.vocab, spec.hidden))
        writer.finish()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        tokenizer_files = copy_tokenizer_files(tokenizer_dir, tmp)
        write_manifest(
            tmp,
            {
                "kind": layout,
                "synthetic": {"shapes": shapes, "seed": seed},
                "variants": {
                    v: {"scheme": VARIANT_SPECS[v].preset, "group_size": group_sizes[v]} for v in variants
                },
                "group_sizes": group_sizes,
                "tokenizer_files": tokenizer_files,
                "versions": tool_versions(),
            },
        )
        validate_or_raise(tmp, verify_hashes=False)  # just written and hashed: layout check only
    log.info("wrote synthetic %s checkpoint (%s, %s) to %s", shapes, layout, variants, out_dir)
    return Path(out_dir)


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 256) -> Path:
    """Train a tiny BPE tokenizer (ids < `vocab_size`) on Python's own docs text and save it.

    Real tokenizer files (tokenizer.json + config) for tiny test models, with no download.
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace keeps spaces as a symbol so decode() gives readable text back.
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<unk>"],
        limit_alphabet=100,
        show_progress=False,
    )
    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_tiny_source_model(out_dir: Path, *, seed: int = 0, shapes: str = "tiny-llama") -> Path:
    """A random bf16 HF model folder (config, safetensors, tokenizer) with `shapes`' dimensions."""
    from transformers import AutoModelForCausalLM

    config = SHAPES[shapes].hf_config_object()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    write_tiny_tokenizer(out_dir, vocab_size=min(config.vocab_size, 256))
    return out_dir
