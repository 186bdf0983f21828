"""`check_checkpoint`: is a checkpoint folder complete, consistent and unmodified?

Works on merged FlexQuant checkpoints and on single-variant compressed-tensors ones. It reads only
JSON, safetensors headers and (for the manifest hashes) the raw bytes, so it is fast and needs no
model instance. Every problem names the file, tensor or field at fault.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

from workbench import ckpt_format as fmt
from workbench.quant.ckpt_read import INDEX_NAME, hash_file, read_safetensors_header, weight_files
from workbench.quant.recipe import expected_layout, linear_shapes

__all__ = ["CheckReport", "CheckpointError", "check_checkpoint", "load_headers"]

log = logging.getLogger(__name__)

MAX_PROBLEMS = 40


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message lists what is wrong with it."""


@dataclass
class CheckReport:
    path: Path
    kind: str = "unknown"  # "merged" | "single" | "unknown"
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    weight_bytes: dict[str, int] = field(default_factory=dict)  # variant (or "shared") -> bytes
    num_layers: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append("... more problems not listed")

    def raise_if_bad(self) -> CheckReport:
        if self.problems:
            raise CheckpointError(f"checkpoint {self.path} is not usable: " + "; ".join(self.problems))
        return self


def _read_weight_shape(path: Path, start: int, entry: dict) -> list[int]:
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        raw = f.read(end - begin)
    return list(struct.unpack("<2q" if entry["dtype"] == "I64" else "<2i", raw))


def _check_manifest(folder: Path, report: CheckReport, verify_hashes: bool) -> None:
    path = folder / fmt.MANIFEST_NAME
    if not path.is_file():
        msg = f"{fmt.MANIFEST_NAME} is missing: provenance and file hashes cannot be checked"
        report.add(msg) if report.kind == "merged" else report.warnings.append(msg)
        return
    try:
        manifest = json.loads(path.read_text())
        listed = manifest["files"]
        if not isinstance(listed, dict) or not all(isinstance(w, dict) for w in listed.values()):
            raise TypeError("'files' must map file names to {size, sha256}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        report.add(f"{fmt.MANIFEST_NAME} is not a valid manifest ({exc})")
        return
    for name, want in sorted(listed.items()):
        file = folder / name
        if not file.is_file():
            report.add(f"{name}: listed in the manifest but missing")
            continue
        size = file.stat().st_size
        if size != want.get("size"):
            report.add(f"{name}: {size} bytes, the manifest says {want.get('size')} (truncated or replaced)")
            continue
        if verify_hashes:
            try:
                got = hash_file(file)
            except (ValueError, KeyError, TypeError) as exc:  # a damaged safetensors header
                report.add(str(exc) if name in str(exc) else f"{name}: {exc}")
                continue
            if got["sha256"] != want.get("sha256"):
                changed = [
                    k for k, d in got.get("tensors", {}).items() if want.get("tensors", {}).get(k) != d
                ]
                where = f" (changed tensor(s): {', '.join(changed[:5])})" if changed else ""
                report.add(f"{name}: sha256 does not match the manifest{where}")
    for file in sorted(folder.iterdir()):
        if file.suffix in (".safetensors", ".json") and file.name not in listed and file.name != path.name:
            report.add(f"{file.name}: present but not listed in the manifest")


def check_checkpoint(path: Path, *, verify_hashes: bool = True) -> CheckReport:
    """Check a merged or single-variant checkpoint folder; never raises for a bad checkpoint."""
    folder = Path(path)
    report = CheckReport(path=folder)
    if not (folder / "config.json").is_file():
        report.add(f"{folder}: no config.json (not a checkpoint folder)")
        return report
    try:
        config = fmt.read_config(folder)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        report.add(f"config.json does not parse: {exc}")
        return report
    if not isinstance(config, dict):
        report.add(f"config.json holds a JSON {type(config).__name__}, not the model's config object")
        return report
    try:
        if not _check_config_and_tensors(folder, config, report):
            return report
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as exc:
        # The checks above read config fields as a valid HF config has them; a damaged config.json
        # must still give a report, never an exception (this function's contract).
        report.add(
            f"config.json or a weights header has a missing or wrongly typed field ({type(exc).__name__}: "
            f"{exc}); the layout could not be fully checked"
        )
    _check_manifest(folder, report, verify_hashes)
    return report


def _check_config_and_tensors(folder: Path, config: dict, report: CheckReport) -> bool:
    """The config and tensor checks; False if the quant method is foreign (nothing more to check)."""
    report.num_layers = config.get("num_hidden_layers")
    report.files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    qcfg = config.get("quantization_config") or {}
    method = qcfg.get("quant_method")
    if method == fmt.QUANT_METHOD:
        report.kind = "merged"
        if qcfg.get("format_version") != fmt.FORMAT_VERSION:
            report.add(
                f"config.json: FlexQuant format_version {qcfg.get('format_version')!r}, "
                f"this build reads {fmt.FORMAT_VERSION}"
            )
        variant_cfgs = qcfg.get("variants") or {}
        _check_policy(qcfg.get("policy"), list(variant_cfgs), report)
    elif method == "compressed-tensors":
        report.kind = "single"
        variant_cfgs = {"single": qcfg}
    else:
        report.add(
            f"config.json: quant_method is {method!r}; expected {fmt.QUANT_METHOD!r} (merged) "
            "or 'compressed-tensors' (single variant)"
        )
        return False
    if not variant_cfgs:
        report.add("config.json: quantization_config.variants is empty")
    report.variants = list(variant_cfgs) if report.kind == "merged" else []
    layouts = {}
    for name, vcfg in variant_cfgs.items():
        try:
            expected_layout(vcfg, 64, 64)
            layouts[name] = vcfg
        except Exception as exc:  # pydantic ValidationError, unknown format, missing fields
            report.add(f"config.json: variant {name!r} quantization_config is invalid: {exc}")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        msg = "no tokenizer files (tokenizer.json / tokenizer.model / vocab.json)"
        if _declared_tokenizer_less(folder):
            report.warnings.append(msg + "; a synthetic checkpoint written without one")
        else:
            report.add(msg)
    _check_tensors(folder, config, layouts, report)
    return True


def _declared_tokenizer_less(folder: Path) -> bool:
    """A synthetic checkpoint written on purpose without a tokenizer (speed runs only)."""
    try:
        manifest = json.loads((folder / fmt.MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return bool(manifest.get("synthetic")) and not manifest.get("tokenizer_files")


def _check_policy(policy: dict | None, variants: list[str], report: CheckReport) -> None:
    from workbench.policy import PolicyError, check_policy_for, policy_from_dict

    if policy is None:
        report.add("config.json: the merged quantization_config has no default policy")
        return
    try:
        check_policy_for(policy_from_dict(policy), variants, report.num_layers)
    except PolicyError as exc:
        report.add(f"config.json: default policy: {exc}")


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


def _check_tensors(folder: Path, config: dict, variant_cfgs: dict[str, dict], report: CheckReport) -> None:
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
