"""Weight bytes a decode step must read, from a checkpoint's safetensors headers (no tensor is loaded).

At batch 1 a decode step is bound by reading every weight it uses once from HBM: the linears of
the variant that runs, the norms and the LM head. The input embedding is a lookup of one row per
token, so it does not count unless it is tied to the LM head (then the head reads it). The HBM
roofline of a step is these bytes / the memory bandwidth (3.35 TB/s on an H100 SXM).
"""

from __future__ import annotations

from pathlib import Path

from workbench import ckpt_format as fmt
from workbench.quant.ckpt_read import read_safetensors_header, weight_files

__all__ = [
    "H100_HBM_TB_S",
    "bf16_bytes",
    "hbm_tb_s",
    "decode_bytes_per_step",
    "roofline_fraction",
    "tensor_bytes",
]

H100_HBM_TB_S = 3.35
# Peak HBM bandwidth by GPU name (vendor data sheets); the first match wins, so specific names first.
HBM_TB_S_BY_NAME = (("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35), ("H200", 4.8), ("A100", 2.0))
EMBED_KEY = "model.embed_tokens.weight"


def tensor_bytes(ckpt_dir: Path) -> dict[str, int]:
    """Stored size of every tensor of the checkpoint, by key."""
    sizes: dict[str, int] = {}
    for path in weight_files(Path(ckpt_dir)):
        header, _ = read_safetensors_header(path)
        for key, entry in header.items():
            start, end = entry["data_offsets"]
            sizes[key] = end - start
    return sizes


def decode_bytes_per_step(ckpt_dir: Path, variant: str | None = None) -> int:
    """Bytes one decode step reads: a merged checkpoint's shared tensors plus `variant`'s linears;
    a single-variant or BF16 checkpoint's whole weights (`variant` is then ignored)."""
    ckpt_dir = Path(ckpt_dir)
    config = fmt.read_config(ckpt_dir)
    sizes = tensor_bytes(ckpt_dir)
    tied = bool(config.get("tie_word_embeddings"))
    qcfg = config.get("quantization_config") or {}
    variants = list(qcfg.get("variants") or {}) if qcfg.get("quant_method") == fmt.QUANT_METHOD else []
    if variants and variant not in variants:
        raise ValueError(
            f"{ckpt_dir.name} is a merged checkpoint with variants {variants}; name one of them, "
            f"not {variant!r}"
        )
    total = 0
    for key, nbytes in sizes.items():
        if key == EMBED_KEY and not tied:
            continue
        split = fmt.split_variant_key(key, variants) if variants else None
        if split is not None and split[1] != variant:
            continue  # another variant's copy of this linear: resident, but not read by this step
        total += nbytes
    return total


def bf16_bytes(ckpt_dir: Path) -> int:
    """What the same model takes in BF16: 2 bytes per parameter. A merged checkpoint's linears are
    counted once, from a variant whose stored weight has one element per parameter (int8 W8A8,
    FP8); its shared tensors (embeddings, norms, LM head) are BF16 already and count as stored."""
    ckpt_dir = Path(ckpt_dir)
    qcfg = fmt.read_config(ckpt_dir).get("quantization_config") or {}
    variants = list(qcfg.get("variants") or {}) if qcfg.get("quant_method") == fmt.QUANT_METHOD else []
    if not variants:
        raise ValueError(f"{ckpt_dir.name} is not a merged checkpoint; its BF16 size is its own size")
    dense = next((v for v in ("w8a8", "fp8") if v in variants), None)
    if dense is None:
        raise ValueError(f"{ckpt_dir.name} has no one-byte-per-weight variant (w8a8 or fp8) to count from")
    total = 0
    for key, nbytes in tensor_bytes(ckpt_dir).items():
        split = fmt.split_variant_key(key, variants)
        if split is None:
            total += nbytes
        elif split[1] == dense and split[2] == "weight":
            total += 2 * nbytes  # int8/fp8 -> bf16
    return total


def hbm_tb_s(machine: dict) -> float | None:
    """Memory bandwidth for the roofline: from the GPU's name where we know it, else as recorded."""
    name = machine.get("gpu") or ""
    for key, tb_s in HBM_TB_S_BY_NAME:
        if key in name:
            return tb_s
    return machine.get("hbm_tb_s")


def roofline_fraction(weight_bytes: int, step_ms: float, hbm_tb_s: float = H100_HBM_TB_S) -> float:
    """Share of the HBM roofline a decode step reaches: the ideal time to read its weights / the step time."""
    if step_ms <= 0:
        raise ValueError(f"step time must be > 0 ms, got {step_ms}")
    return (weight_bytes / (hbm_tb_s * 1e12)) / (step_ms / 1000)
