"""Merge N single-variant compressed-tensors checkpoints into one FlexQuant checkpoint (DESIGN.md).

Shared tensors (embeddings, norms, biases, lm_head) are written once and must be bit-identical in
every variant: they are, when all variants were quantized from the same smoothed weights, and a
difference means they were not (so the merge refuses). Each quantized linear `P` stores the
variant's tensors under `P.<variant>.<tensor>`. Writing goes through `ckpt_io` (atomic publish,
sharded writer, manifest), as in `export.py` and `synthetic.py`, so every checkpoint we publish is
built the same way.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from workbench import ckpt_format as fmt
from workbench.policy import DEFAULT_POLICY, DecodeRule, Policy, fixed_policy
from workbench.quant.ckpt_io import (
    ShardWriter,
    copy_tokenizer_files,
    natural_key,
    publishing,
    write_manifest,
)
from workbench.quant.ckpt_read import tensor_index
from workbench.quant.recipe import VARIANT_SPECS

__all__ = ["merge_variants", "flexquant_config", "default_policy_for", "quantized_prefixes"]

log = logging.getLogger(__name__)

# Files besides weights and tokenizer that a variant folder holds and the merged one keeps once.
EXTRA_FILES = ("generation_config.json",)


def default_policy_for(variants: Iterable[str]) -> dict:
    """The default policy (DESIGN.md's pd-batch-aware) adapted to the variants a checkpoint has.

    Prefill is compute-bound and takes the int8/fp8 variant; small-batch decode is memory-bound and
    takes w4a16. With only one kind present the policy is the fixed one.
    """
    present = list(variants)
    if {"w8a8", "w4a16"} <= set(present):
        return DEFAULT_POLICY.model_dump(exclude_none=True)
    compute = next((v for v in ("w8a8", "fp8", "w4a16") if v in present), present[0])
    memory = "w4a16" if "w4a16" in present else compute
    if memory == compute:
        return fixed_policy(compute).model_dump(exclude_none=True)
    max_batch = DEFAULT_POLICY.decode[0].max_batch
    policy = Policy(
        name=DEFAULT_POLICY.name,
        prefill=compute,
        decode=[DecodeRule(max_batch=max_batch, variant=memory), DecodeRule(variant=compute)],
    )
    return policy.model_dump(exclude_none=True)


def flexquant_config(variant_configs: dict[str, dict], policy: dict | None = None) -> dict:
    """The merged checkpoint's `quantization_config`."""
    return {
        "quant_method": fmt.QUANT_METHOD,
        "format_version": fmt.FORMAT_VERSION,
        "variants": variant_configs,
        "policy": policy if policy is not None else default_policy_for(variant_configs),
    }


def quantized_prefixes(keys: Iterable[str], variant: str) -> set[str]:
    """Linear prefixes that carry `variant`'s tensors in a single-variant checkpoint.

    Every compressed-tensors format we write stores a `weight_scale` next to the quantized weight;
    an unquantized linear (lm_head) has only `weight`.
    """
    del variant  # all formats share the marker; kept for call-site clarity
    return {k[: -len(".weight_scale")] for k in keys if k.endswith(".weight_scale")}


def _variant_parts(index: dict[str, Path], variant: str, folder: Path) -> tuple[set[str], set[str]]:
    """(quantized linear prefixes, shared keys) of one variant folder; ValueError if incomplete."""
    prefixes = quantized_prefixes(index, variant)
    if not prefixes:
        raise ValueError(
            f"{folder}: no quantized linear found (no '*.weight_scale' tensor); "
            f"is this a compressed-tensors {variant} checkpoint?"
        )
    owned = set()
    for prefix in prefixes:
        for tensor in fmt.VARIANT_TENSORS[variant]:
            key = f"{prefix}.{tensor}"
            if key not in index:
                raise ValueError(f"{folder}: quantized linear {prefix} has no {tensor!r} tensor")
            owned.add(key)
    return prefixes, set(index) - owned


def merge_variants(
    variant_dirs: dict[str, Path],
    out_dir: Path,
    *,
    tokenizer_dir: Path | None = None,
    manifest: dict | None = None,
    policy: dict | None = None,
    max_shard_bytes: int | None = None,
    validate: bool = True,
    reporter=None,
) -> Path:
    """Merge single-variant compressed-tensors folders (`{"w8a8": dir, ...}`) into `out_dir`.

    Published atomically: written to a temp folder next to `out_dir`, checked with
    `check_checkpoint` (if `validate`), then renamed. `manifest` holds the caller's provenance
    (source, recipe, calibration...); per-variant weight bytes and per-file hashes are added here.
    """
    out_dir = Path(out_dir)
    variants = list(variant_dirs)
    for v in variants:
        if v not in VARIANT_SPECS:
            raise ValueError(f"unknown variant {v!r}; known: {sorted(VARIANT_SPECS)}")
    indexes = {v: tensor_index(Path(d)) for v, d in variant_dirs.items()}
    parts = {v: _variant_parts(indexes[v], v, Path(variant_dirs[v])) for v in variants}
    first = variants[0]
    prefixes, shared = parts[first]
    for v in variants[1:]:
        if parts[v][0] != prefixes or parts[v][1] != shared:
            diff = sorted((parts[v][0] ^ prefixes) | (parts[v][1] ^ shared))[:5]
            raise ValueError(
                f"variants {first} and {v} quantized different modules (e.g. {diff}); "
                "they must come from the same model and ignore list"
            )
    configs = {v: fmt.read_config(Path(d))["quantization_config"] for v, d in variant_dirs.items()}
    base_config = fmt.read_config(Path(variant_dirs[first]))
    base_config.pop("quantization_config", None)
    base_config["quantization_config"] = flexquant_config(configs, policy)

    weight_bytes = dict.fromkeys(variants, 0)
    shared_bytes = 0
    handles: dict[Path, object] = {}

    def load(v: str, key: str) -> torch.Tensor:
        path = indexes[v][key]
        if path not in handles:
            handles[path] = safe_open(str(path), framework="pt")
        return handles[path].get_tensor(key)

    with publishing(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=max_shard_bytes)
        all_keys = sorted(shared | prefixes, key=natural_key)
        for i, key in enumerate(all_keys):
            if key in shared:
                tensor = load(first, key)
                for v in variants[1:]:
                    if not torch.equal(tensor, load(v, key)):
                        raise ValueError(
                            f"shared tensor {key} differs between variants {first} and {v}: the variants "
                            "were not quantized from the same (smoothed) weights, so they cannot share it"
                        )
                writer.add(key, tensor)
                shared_bytes += tensor.nbytes
            else:
                for v in variants:
                    for name in fmt.VARIANT_TENSORS[v]:
                        tensor = load(v, f"{key}.{name}")
                        writer.add(fmt.variant_key(key, v, name), tensor)
                        weight_bytes[v] += tensor.nbytes
            if reporter is not None and i % 16 == 0:
                reporter.update("merge", 100.0 * i / len(all_keys), f"merging {key}")
        writer.finish()
        handles.clear()
        (tmp / "config.json").write_text(json.dumps(base_config, indent=2))
        for name in EXTRA_FILES:
            src = Path(variant_dirs[first]) / name
            if src.is_file():
                shutil.copy2(src, tmp / name)
        tokenizer_files = copy_tokenizer_files(tokenizer_dir, tmp) if tokenizer_dir else []
        info = dict(manifest or {})
        info.update(
            kind="merged",
            variants={
                v: {**info.get("variants", {}).get(v, {}), "weight_bytes": weight_bytes[v]} for v in variants
            },
            shared_bytes=shared_bytes,
            tokenizer_files=tokenizer_files,
        )
        write_manifest(tmp, info)
        if validate:
            if reporter is not None:
                reporter.update("validate", 100.0, "checking the merged checkpoint before publishing it")
            validate_or_raise(tmp)
    log.info("merged %s into %s", variants, out_dir)
    return out_dir


def validate_or_raise(folder: Path, *, verify_hashes: bool = True) -> None:
    """Run `check_checkpoint` on a folder about to be published; `CheckpointError` if it fails."""
    from workbench.quant.check import CheckpointError, check_checkpoint  # check imports this module's deps

    report = check_checkpoint(folder, verify_hashes=verify_hashes)
    if not report.ok:
        raise CheckpointError(
            f"the checkpoint written to {folder} fails its check: " + "; ".join(report.problems)
        )


def strip_variant_suffix(key: str, variant: str) -> str | None:
    """`P.<variant>.<tensor>` -> `P.<tensor>`; None if `key` is not one of `variant`'s tensors."""
    m = re.match(rf"^(.*)\.{re.escape(variant)}\.([^.]+)$", key)
    return f"{m.group(1)}.{m.group(2)}" if m else None
