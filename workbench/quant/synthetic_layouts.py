"""The layouts synthetic checkpoints are written in, and finishing one written checkpoint.

A `CheckpointTarget` is one folder being written: plain bf16, one variant alone in compressed-tensors
layout ("single") or several in the FlexQuant layout ("merged"), each kind with its own tensor key
names. Once its shards are saved, `finish_checkpoint` adds config.json (the quantization_config comes
from `variant_quant_config`, as on the real quantize path), the tokenizer files and the manifest, then
checks the layout: `validate_or_raise` for the quantized kinds, `check_bf16_layout` (against
transformers' own model of the shapes) for plain bf16. The weights are drawn in
`workbench.quant.synthetic`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench.quant.ckpt_io import copy_tokenizer_files, tool_versions, write_manifest
from workbench.quant.ckpt_read import read_safetensors_header, weight_files
from workbench.quant.merge import flexquant_config, validate_or_raise
from workbench.quant.recipe import VARIANT_SPECS, variant_quant_config
from workbench.quant.shapes import ShapeSpec

__all__ = ["CheckpointTarget", "check_bf16_layout", "finish_checkpoint"]


@dataclass(frozen=True)
class CheckpointTarget:
    """One checkpoint being written: its folder, its kind and the variants it holds."""

    out_dir: Path
    kind: str  # "bf16" (plain HF), "single" (one compressed-tensors variant) or "merged"
    variants: tuple[str, ...] = ()

    def key(self, linear: str, variant: str, tensor: str) -> str:
        return f"{linear}.{variant}.{tensor}" if self.kind == "merged" else f"{linear}.{tensor}"


def finish_checkpoint(
    target: CheckpointTarget,
    tmp: Path,
    shard_records: dict[str, dict],
    spec: ShapeSpec,
    group_sizes: dict[str, int | None],
    synthetic: dict,
    tokenizer_dir: Path | None,
) -> None:
    """config.json, tokenizer, manifest and the layout check of one written checkpoint."""
    config = spec.hf_config()
    if target.kind != "bf16":
        configs = {v: variant_quant_config(v, group_sizes[v]) for v in target.variants}
        merged = target.kind == "merged"
        config["quantization_config"] = flexquant_config(configs) if merged else configs[target.variants[0]]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    manifest = {
        "kind": target.kind,
        "synthetic": synthetic,
        "variants": {
            v: {"scheme": VARIANT_SPECS[v].preset, "group_size": group_sizes[v]} for v in target.variants
        },
        "group_sizes": {v: group_sizes[v] for v in target.variants},
        "tokenizer_files": copy_tokenizer_files(tokenizer_dir, tmp),
        "versions": tool_versions(),
    }
    write_manifest(tmp, manifest, known=shard_records)
    if target.kind == "bf16":
        check_bf16_layout(tmp, spec)
    else:
        validate_or_raise(tmp, verify_hashes=False)  # just written and hashed: layout check only


def check_bf16_layout(folder: Path, spec: ShapeSpec) -> None:
    """The plain checkpoint holds exactly the tensors transformers' model of `spec` has, all bf16."""
    from transformers import AutoModelForCausalLM

    from workbench.quant.check import CheckpointError

    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(spec.hf_config_object())
    want = {key: list(t.shape) for key, t in model.state_dict().items()}
    if spec.tie_embeddings:
        want.pop("lm_head.weight", None)
    have: dict[str, dict] = {}
    for path in weight_files(folder):
        have.update(read_safetensors_header(path)[0])
    problems = [f"{key} is missing" for key in sorted(set(want) - set(have))]
    problems += [f"{key} is not a tensor of the model" for key in sorted(set(have) - set(want))]
    problems += [
        f"{key}: {entry['dtype']} {entry['shape']}, expected BF16 {want[key]}"
        for key, entry in sorted(have.items())
        if key in want and (entry["dtype"], entry["shape"]) != ("BF16", want[key])
    ]
    if problems:
        raise CheckpointError(
            f"the bf16 checkpoint written to {folder} fails its check: " + "; ".join(problems[:20])
        )
