"""The tensor half of `check_checkpoint`: does every tensor match the layout its config declares?

Groups the safetensors header entries by quantized linear and variant, then checks each variant's
tensors against `recipe.expected_layout` (dtypes, shapes, the stored `weight_shape`) and the shared
tensors (embeddings, norms, lm_head, q/k/v biases) against the model config. Reads headers and the
small `weight_shape` tensors only. Problems go to the `CheckReport` passed in.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from workbench import ckpt_format as fmt
from workbench.quant.ckpt_read import INDEX_NAME, read_safetensors_header, weight_files
from workbench.quant.recipe import expected_layout, linear_shapes

if TYPE_CHECKING:  # annotations only: `check` imports this module, so importing it back would be circular
    from workbench.quant.check import CheckReport

__all__ = ["check_tensors", "load_headers"]


def _read_weight_shape(path: Path, start: int, entry: dict) -> list[int]:
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        raw = f.read(end - begin)
    return list(struct.unpack("<2q" if entry["dtype"] == "I64" else "<2i", raw))


def load_headers(folder: Path, report: CheckReport) -> dict[str, tuple[Path, int, dict]] | None:
    """key -> (file, data start, header entry) over all weight files; None if a file is unreadable."""
    try:
        files = weight_files(folder)
    except (FileNotFoundError, json.JSONDecodeError, KeyError) as exc:
        report.add(f"weights: {exc}")
        return None
    index_map = {}
    if (folder / INDEX_NAME).is_file():
        index_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
    entries: dict[str, tuple[Path, int, dict]] = {}
    broken = False
    for file in files:
        if not file.is_file():
            report.add(f"{file.name}: named in {INDEX_NAME} but missing")
            broken = True
            continue
        try:
            header, start = read_safetensors_header(file)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            report.add(f"{file.name}: unreadable safetensors file: {exc}")
            broken = True
            continue
        for key, entry in header.items():
            if index_map and index_map.get(key) != file.name:
                report.add(f"{file.name}: tensor {key} is not mapped to this file in {INDEX_NAME}")
            entries[key] = (file, start, entry)
    for key, name in index_map.items():
        if key not in entries and not broken:
            report.add(f"{INDEX_NAME}: tensor {key} is mapped to {name} but that file does not hold it")
    return None if broken else entries


def _group_by_linear(entries: dict, variants: list[str], merged: bool) -> tuple[dict, set[str]]:
    """({linear prefix: {variant: {tensor: key}}}, shared keys)."""
    linears: dict[str, dict[str, dict[str, str]]] = {}
    if merged:
        for key in entries:
            parts = fmt.split_variant_key(key, variants)
            if parts:
                prefix, variant, tensor = parts
                linears.setdefault(prefix, {}).setdefault(variant, {})[tensor] = key
    else:
        for prefix in (k[: -len(".weight_scale")] for k in entries if k.endswith(".weight_scale")):
            linears[prefix] = {"single": {}}
        for key in entries:
            prefix, _, tensor = key.rpartition(".")
            if prefix in linears and tensor != "bias":
                linears[prefix]["single"][tensor] = key
    owned = {k for per_v in linears.values() for tensors in per_v.values() for k in tensors.values()}
    return linears, set(entries) - owned


def check_tensors(folder: Path, config: dict, variant_cfgs: dict[str, dict], report: CheckReport) -> None:
    """Check every tensor against the layout `config` and `variant_cfgs` (variant -> its valid
    quantization_config) imply; also fills `report.weight_bytes` (per variant and "shared")."""
    entries = load_headers(folder, report)
    if entries is None or not variant_cfgs:
        return
    variants = list(variant_cfgs)
    linears, shared = _group_by_linear(entries, variants, report.kind == "merged")
    shapes = linear_shapes(config)
    layers = config.get("num_hidden_layers") or 0
    nbytes = lambda key: entries[key][2]["data_offsets"][1] - entries[key][2]["data_offsets"][0]  # noqa: E731
    if shapes:
        expected = {f"model.layers.{i}.{name}" for i in range(layers) for name in shapes}
        for prefix in sorted(expected - set(linears)):
            report.add(f"quantized linear {prefix} is missing (no tensors of any variant)")
        for prefix in sorted(set(linears) - expected):
            report.warnings.append(f"{prefix} is quantized but is not one of the model's decoder linears")
    for prefix, per_variant in sorted(linears.items()):
        out_in = shapes.get(prefix.split(".", 3)[-1]) if prefix.startswith("model.layers.") else None
        for variant in variants:
            have = per_variant.get(variant, {})
            if not have:
                report.add(f"{prefix}: variant {variant} has no tensors")
                continue
            dims = out_in or _infer_out_in(have, entries)
            if dims is None:
                report.add(f"{prefix}.{variant}: cannot tell the layer's shape from its tensors")
                continue
            layout = expected_layout(variant_cfgs[variant], *dims)
            for tensor, (dtypes, shape) in layout.items():
                key = have.get(tensor)
                if key is None:
                    report.add(f"{prefix}: variant {variant} lacks tensor {tensor!r}")
                    continue
                file, start, entry = entries[key]
                if entry["dtype"] not in dtypes:
                    report.add(f"{key}: dtype {entry['dtype']}, expected one of {sorted(dtypes)}")
                if shape is not None and list(entry["shape"]) != shape:
                    report.add(f"{key}: shape {entry['shape']}, expected {shape}")
                elif tensor == "weight_shape" and _read_weight_shape(file, start, entry) != list(dims):
                    report.add(f"{key}: says {_read_weight_shape(file, start, entry)}, expected {list(dims)}")
            for tensor in sorted(set(have) - set(layout)):
                report.add(f"{have[tensor]}: unexpected tensor for variant {variant}")
            report.weight_bytes[variant] = report.weight_bytes.get(variant, 0) + sum(
                map(nbytes, have.values())
            )
    report.weight_bytes["shared"] = sum(nbytes(k) for k in shared)
    _check_shared(config, shared, entries, report)


def _infer_out_in(have: dict[str, str], entries: dict) -> tuple[int, int] | None:
    if "weight" in have:
        shape = entries[have["weight"]][2]["shape"]
        return (shape[0], shape[1]) if len(shape) == 2 else None
    if "weight_shape" in have:
        file, start, entry = entries[have["weight_shape"]]
        return tuple(_read_weight_shape(file, start, entry))  # type: ignore[return-value]
    return None


def _check_shared(config: dict, shared: set[str], entries: dict, report: CheckReport) -> None:
    shapes = linear_shapes(config)
    if not shapes:
        return
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    want = {"model.embed_tokens.weight": [vocab, hidden], "model.norm.weight": [hidden]}
    if not config.get("tie_word_embeddings", False):
        want["lm_head.weight"] = [vocab, hidden]
    # Qwen2 always has q/k/v biases; Llama only with attention_bias. They stay unquantized (shared).
    qkv_bias = "Qwen2ForCausalLM" in (config.get("architectures") or []) or config.get("attention_bias")
    for i in range(config.get("num_hidden_layers") or 0):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            want[f"model.layers.{i}.{norm}.weight"] = [hidden]
        for proj in ("q_proj", "k_proj", "v_proj") if qkv_bias else ():
            want[f"model.layers.{i}.self_attn.{proj}.bias"] = [shapes[f"self_attn.{proj}"][0]]
    for key, shape in want.items():
        if key not in shared:
            report.add(f"shared tensor {key} is missing")
        elif list(entries[key][2]["shape"]) != shape:
            report.add(f"{key}: shape {entries[key][2]['shape']}, expected {shape}")
