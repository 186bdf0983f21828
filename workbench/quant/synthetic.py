"""Checkpoints with real shapes and random weights: plain BF16, single-variant and merged layouts.

Speed does not depend on weight values, so GPU speed runs use e.g. a Llama-3-8B-shaped set written
here instead of a real 8B model. `make_synthetic_set` makes ONE pass over the layers: each linear's
random bf16 weight is drawn once on `device` (e.g. "cuda"), quantized there once per variant with
compressed-tensors' own compressors (in 0.17 and 0.19 they are plain torch ops on the input's
device; 0.19 even has a Triton kernel for CUDA), moved to the CPU once and handed to every layout
that holds it. The variants of a layer are versions of the same matrix, as in a real checkpoint;
the variant configs come from `variant_quant_config`, the function the real quantize path is
checked against, so the layouts cannot drift. Shards are written and hashed in background threads
(`ShardWriter` with an executor) while the next layers are generated; memory stays at a few
shards per layout, not the whole model. `make_synthetic_checkpoint` writes one layout through the
same code. Each layout's key names, config.json, manifest and layout check are in
`workbench.quant.synthetic_layouts`; the shapes themselves, and the tiny source model of fast tests,
are in `workbench.quant.shapes`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from workbench.quant.ckpt_io import ShardWriter, publishing
from workbench.quant.recipe import VARIANT_SPECS, choose_group_size, linear_shapes, variant_scheme
from workbench.quant.shapes import SHAPES, write_wordlevel_tokenizer
from workbench.quant.synthetic_layouts import CheckpointTarget, finish_checkpoint

__all__ = [
    "SET_LAYOUTS",
    "make_synthetic_checkpoint",
    "make_synthetic_set",
]

log = logging.getLogger(__name__)

WEIGHT_STD = 0.02  # typical init scale of LLM linears; keeps activations finite through many layers
QMAX = {"w8a8": 127.0, "w4a16": 7.0, "fp8": 448.0}


# What `make_synthetic_set` can write: plain bf16, one variant alone (any of VARIANT_SPECS), merged.
SET_LAYOUTS = ("bf16", "w8a8", "w4a16", "merged")
MERGED_VARIANTS = ("w8a8", "w4a16")
ROW_CHUNK = 8192  # rows drawn at once: a 128256 x 4096 fp32 draw in one piece would cost 2 GiB extra
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json")


def _quantize(weight: torch.Tensor, variant: str, scheme) -> dict[str, torch.Tensor]:
    """Round-to-nearest min-max quantization of one bf16 weight into `variant`'s stored tensors,
    on the weight's device (the compressors are torch ops on their input's device)."""
    from compressed_tensors.compressors import BaseCompressor

    # abs and max are exact in bf16: the same absmax as in fp32, without an fp32 copy of the weight
    if VARIANT_SPECS[variant].grouped:
        absmax = weight.reshape(weight.shape[0], -1, scheme.weights.group_size).abs().amax(-1)
    else:
        absmax = weight.abs().amax(-1, keepdim=True)
    scale = (absmax.float() / QMAX[variant]).clamp_min(1e-8).to(weight.dtype)
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    return compressor.compress({"weight": weight, "weight_scale": scale}, scheme)


def _random_bf16(gen: torch.Generator, *shape: int) -> torch.Tensor:
    out = torch.empty(*shape, dtype=torch.bfloat16, device=gen.device)
    for rows in out.split(ROW_CHUNK):
        rows.copy_(torch.randn(*rows.shape, generator=gen, device=gen.device).mul_(WEIGHT_STD))
    return out


def _check_shapes_and_device(shapes: str, device: str) -> torch.device:
    if shapes not in SHAPES:
        raise ValueError(f"unknown shapes {shapes!r}; choose from {sorted(SHAPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda'") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: synthetic checkpoints are drawn on 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "is a CPU-only build" if torch.version.cuda is None else "sees no CUDA GPU"
        raise ValueError(
            f"device {device!r} asked, but this torch {torch.__version__} {why}; "
            "run on the GPU machine (with a CUDA torch) or use device 'cpu'"
        )
    return dev


def _tokenizer_source(tokenizer: str | Path | None, vocab: int, stack: contextlib.ExitStack) -> Path | None:
    """The folder whose tokenizer files every checkpoint gets (a word-level one is written once)."""
    if tokenizer is None:
        return None
    if isinstance(tokenizer, str) and tokenizer == "wordlevel":
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flexquant-tokenizer-")))
        return write_wordlevel_tokenizer(tmp, vocab)
    folder = Path(tokenizer)
    if not any((folder / name).is_file() for name in TOKENIZER_MARKERS):
        raise ValueError(
            f"tokenizer folder {folder} holds none of {', '.join(TOKENIZER_MARKERS)}; "
            "pass a folder with tokenizer files, 'wordlevel' or none"
        )
    return folder


def make_synthetic_set(
    out_root: Path,
    *,
    shapes: str,
    layouts: tuple[str, ...] | list[str] = SET_LAYOUTS,
    device: str = "cpu",
    seed: int = 0,
    tokenizer: str | Path | None = "wordlevel",
    w4a16_group_size: int = 128,
    max_shard_bytes: int | None = None,
    reporter=None,
) -> dict[str, Path]:
    """Write one checkpoint per layout, each at `<out_root>/<shapes>-<layout>`, in ONE pass.

    Layouts: "bf16" is a plain HF checkpoint (bf16 `.weight` linears, no quantization_config);
    a variant name ("w8a8", "w4a16", "fp8") is that variant alone in compressed-tensors layout
    (what `make_synthetic_checkpoint(layout="single")` writes); "merged" is w8a8 + w4a16 in the
    FlexQuant layout. All hold the same random weights, drawn on `device` from `seed` (a CUDA draw
    differs from a CPU one). `tokenizer`: "wordlevel" (one word per id, so a server can decode every
    id of the vocab), a folder whose tokenizer files are copied, or None. None of the folders may
    exist yet; each is published atomically after its layout check. Returns {layout: folder}.
    """
    layouts = list(layouts)
    known = ["bf16", "merged", *VARIANT_SPECS]
    if not layouts or len(set(layouts)) != len(layouts) or set(layouts) - set(known):
        raise ValueError(f"layouts {layouts}: name one or more of {known}, each once")
    targets = {
        name: CheckpointTarget(
            Path(out_root) / f"{shapes}-{name}",
            "single" if name in VARIANT_SPECS else name,
            (name,) if name in VARIANT_SPECS else MERGED_VARIANTS if name == "merged" else (),
        )
        for name in layouts
    }
    _write_checkpoints(
        list(targets.values()),
        shapes=shapes,
        device=device,
        seed=seed,
        tokenizer=tokenizer,
        w4a16_group_size=w4a16_group_size,
        max_shard_bytes=max_shard_bytes,
        reporter=reporter,
    )
    return {name: target.out_dir for name, target in targets.items()}


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
    device: str = "cpu",
    reporter=None,
) -> Path:
    """Write a random checkpoint with `shapes`' real dimensions; published atomically at `out_dir`.

    `layout="merged"`: FlexQuant keys `P.<variant>.<tensor>`; `"single"`: exactly one variant in
    plain compressed-tensors layout (what `export_variant` produces). The tokenizer is copied from
    `tokenizer_dir` if given (its ids must fit the shape's vocab), else there is none.
    """
    if layout not in ("merged", "single"):
        raise ValueError(f"layout must be 'merged' or 'single', not {layout!r}")
    variants = tuple(variants)
    unknown = [v for v in variants if v not in VARIANT_SPECS]
    if unknown or not variants:
        raise ValueError(f"variants {list(variants)}: choose one or more of {sorted(VARIANT_SPECS)}")
    if layout == "single" and len(variants) != 1:
        raise ValueError(f"layout 'single' holds exactly one variant, got {list(variants)}")
    _write_checkpoints(
        [CheckpointTarget(Path(out_dir), layout, variants)],
        shapes=shapes,
        device=device,
        seed=seed,
        tokenizer=tokenizer_dir,
        w4a16_group_size=w4a16_group_size,
        max_shard_bytes=max_shard_bytes,
        reporter=reporter,
    )
    return Path(out_dir)


def _write_checkpoints(
    targets: list[CheckpointTarget],
    *,
    shapes: str,
    device: str,
    seed: int,
    tokenizer: str | Path | None,
    w4a16_group_size: int,
    max_shard_bytes: int | None,
    reporter,
) -> None:
    """The one generation pass behind both public writers (see the module docstring)."""
    gen = torch.Generator(device=_check_shapes_and_device(shapes, device)).manual_seed(seed)
    spec = SHAPES[shapes]
    hf_config = spec.hf_config()
    linears = linear_shapes(hf_config)
    group = choose_group_size(w4a16_group_size, [i for _, i in linears.values()])
    variants = [v for v in VARIANT_SPECS if any(v in t.variants for t in targets)]
    group_sizes = {v: (group if VARIANT_SPECS[v].grouped else None) for v in variants}
    schemes = {v: variant_scheme(v, group_sizes[v]) for v in variants}
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(publishing(t.out_dir)) for t in targets]  # fails first if one exists
        tokenizer_dir = _tokenizer_source(tokenizer, spec.vocab, stack)
        # Shards are saved and hashed here while the next layers are drawn; shut down (cancelling
        # queued saves) before `publishing` removes the temp folders of a failed run.
        pool = ThreadPoolExecutor(max_workers=min(2 * len(targets), os.cpu_count() or 1))
        stack.callback(pool.shutdown, wait=True, cancel_futures=True)
        writers = [ShardWriter(tmp, max_shard_bytes=max_shard_bytes, executor=pool) for tmp in tmps]

        def add_shared(key: str, tensor: torch.Tensor) -> None:
            tensor = tensor.cpu()  # one host copy, shared by every layout's shard
            for writer in writers:
                writer.add(key, tensor)

        def ones() -> torch.Tensor:  # a fresh tensor per key: safetensors refuses shared storage
            return torch.ones(spec.hidden, dtype=torch.bfloat16)

        add_shared("model.embed_tokens.weight", _random_bf16(gen, spec.vocab, spec.hidden))
        for layer in range(spec.layers):
            prefix = f"model.layers.{layer}"
            for norm in ("input_layernorm", "post_attention_layernorm"):
                add_shared(f"{prefix}.{norm}.weight", ones())
            for name, (out_f, in_f) in linears.items():
                weight = _random_bf16(gen, out_f, in_f)
                if spec.qkv_bias and name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
                    add_shared(f"{prefix}.{name}.bias", _random_bf16(gen, out_f))
                stored = {v: _quantize(weight, v, schemes[v]) for v in variants}
                stored = {v: {t: x.cpu() for t, x in tensors.items()} for v, tensors in stored.items()}
                for target, writer in zip(targets, writers, strict=True):
                    if target.kind == "bf16":
                        writer.add(f"{prefix}.{name}.weight", weight.cpu())
                    for v in target.variants:
                        for tensor, value in stored[v].items():
                            writer.add(target.key(f"{prefix}.{name}", v, tensor), value)
            if reporter is not None:
                reporter.update(
                    "synthetic", 100.0 * (layer + 1) / spec.layers, f"layer {layer + 1}/{spec.layers}"
                )
                reporter.check_cancelled()
        add_shared("model.norm.weight", ones())
        if not spec.tie_embeddings:
            add_shared("lm_head.weight", _random_bf16(gen, spec.vocab, spec.hidden))
        info = {"shapes": shapes, "seed": seed, "device": str(gen.device)}
        for writer in writers:
            writer.flush()  # every layout's last shard is saved in parallel, not one after the other
        for target, tmp, writer in zip(targets, tmps, writers, strict=True):
            if reporter is not None:
                reporter.update("publish", 100.0, f"hashing and checking {target.out_dir.name}")
            writer.finish()
            finish_checkpoint(target, tmp, writer.file_records, spec, group_sizes, info, tokenizer_dir)
    log.info("wrote synthetic %s checkpoints %s", shapes, [str(t.out_dir) for t in targets])
