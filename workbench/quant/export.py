"""Take one variant out of a merged FlexQuant checkpoint as a plain compressed-tensors checkpoint.

The result has the original key names (`P.weight_packed`, not `P.w4a16.weight_packed`) and that
variant's `quantization_config`, so stock vLLM and transformers load it: the single-variant GPU
baselines run on exactly the bytes the merged checkpoint holds.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from safetensors import safe_open

from workbench import ckpt_format as fmt
from workbench.quant.ckpt_io import (
    ShardWriter,
    copy_tokenizer_files,
    natural_key,
    publishing,
    write_manifest,
)
from workbench.quant.ckpt_read import tensor_index
from workbench.quant.merge import validate_or_raise

__all__ = ["export_variant"]

log = logging.getLogger(__name__)


def export_variant(
    merged_dir: Path, variant: str, out_dir: Path, *, max_shard_bytes: int | None = None
) -> Path:
    """Write `variant` of the merged checkpoint at `merged_dir` to `out_dir` (published atomically)."""
    merged_dir, out_dir = Path(merged_dir), Path(out_dir)
    qcfg = fmt.read_flexquant_config(merged_dir)
    variants = list(qcfg["variants"])
    if variant not in variants:
        raise ValueError(f"{merged_dir} has variants {variants}, not {variant!r}")
    config = fmt.read_config(merged_dir)
    config["quantization_config"] = qcfg["variants"][variant]
    index = tensor_index(merged_dir)
    handles: dict[Path, object] = {}
    with publishing(out_dir) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes=max_shard_bytes)
        for key in sorted(index, key=natural_key):
            parts = fmt.split_variant_key(key, variants)
            if parts is None:
                out_key = key  # shared tensor
            elif parts[1] == variant:
                out_key = f"{parts[0]}.{parts[2]}"
            else:
                continue  # another variant's tensor
            path = index[key]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt")
            writer.add(out_key, handles[path].get_tensor(key))
        writer.finish()
        handles.clear()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if (merged_dir / "generation_config.json").is_file():
            shutil.copy2(merged_dir / "generation_config.json", tmp / "generation_config.json")
        copy_tokenizer_files(merged_dir, tmp)
        source_manifest = _read_manifest(merged_dir)
        write_manifest(
            tmp,
            {
                "kind": "single",
                "variant": variant,
                "exported_from": {
                    "path": str(merged_dir.resolve()),
                    "created_at": source_manifest.get("created_at"),
                },
                "variants": {variant: source_manifest.get("variants", {}).get(variant, {})},
                "source": source_manifest.get("source"),
                "recipe": source_manifest.get("recipe"),
                "versions": source_manifest.get("versions"),
            },
        )
        validate_or_raise(tmp, verify_hashes=False)
    log.info("exported variant %s of %s to %s", variant, merged_dir, out_dir)
    return out_dir


def _read_manifest(folder: Path) -> dict:
    path = folder / fmt.MANIFEST_NAME
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
