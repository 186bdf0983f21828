"""The merged FlexQuant checkpoint format (DESIGN.md), as constants and tiny helpers.

Shared by QuantFactory (writes it), the validator (checks it) and both runtimes (read it), so the
format lives in exactly one place. No torch import here: the vLLM plugin and the UI read this too.

Layout of a merged checkpoint folder:
  config.json              HF config with quantization_config = {"quant_method": "flexquant",
                           "format_version": 1, "variants": {name: <compressed-tensors config>},
                           "policy": <default policy dict>}
  model*.safetensors       shared tensors once; each quantized linear P stores P.<variant>.<tensor>
  tokenizer files          once
  flexquant_manifest.json  source, recipe, calibration, versions, per-file sha256 and sizes
"""

from __future__ import annotations

import json
from pathlib import Path

QUANT_METHOD = "flexquant"
FORMAT_VERSION = 1
MANIFEST_NAME = "flexquant_manifest.json"

# Canonical variant names and the compressed-tensors tensors each one stores per linear.
VARIANT_TENSORS: dict[str, tuple[str, ...]] = {
    "w8a8": ("weight", "weight_scale"),
    "w4a16": ("weight_packed", "weight_scale", "weight_shape"),
    "fp8": ("weight", "weight_scale"),
}
SCHEME_OF_VARIANT = {"w8a8": "W8A8-INT8", "w4a16": "W4A16", "fp8": "FP8-DYNAMIC"}


def variant_key(linear_prefix: str, variant: str, tensor: str) -> str:
    """`model.layers.0.self_attn.q_proj` + `w4a16` + `weight_packed` -> the merged key."""
    return f"{linear_prefix}.{variant}.{tensor}"


def split_variant_key(key: str, variants: set[str] | list[str]) -> tuple[str, str, str] | None:
    """Inverse of `variant_key`: (linear_prefix, variant, tensor) or None for a shared tensor."""
    parts = key.split(".")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i] in variants:
            return ".".join(parts[:i]), parts[i], ".".join(parts[i + 1 :])
    return None


def read_config(ckpt_dir: Path) -> dict:
    return json.loads((Path(ckpt_dir) / "config.json").read_text())


def read_flexquant_config(ckpt_dir: Path) -> dict:
    """The `quantization_config` of a merged checkpoint; ValueError if it is not one."""
    cfg = read_config(ckpt_dir).get("quantization_config") or {}
    if cfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{ckpt_dir}/config.json: quant_method is {cfg.get('quant_method')!r}, not {QUANT_METHOD!r}; "
            "this is not a merged FlexQuant checkpoint"
        )
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{ckpt_dir}/config.json: FlexQuant format_version {cfg.get('format_version')!r}, "
            f"this build reads {FORMAT_VERSION}"
        )
    return cfg


def variant_names(ckpt_dir: Path) -> list[str]:
    return list(read_flexquant_config(ckpt_dir)["variants"])
