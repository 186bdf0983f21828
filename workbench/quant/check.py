"""`check_checkpoint`: is a checkpoint folder complete, consistent and unmodified?

Works on merged FlexQuant checkpoints and on single-variant compressed-tensors ones. It reads only
JSON, safetensors headers and (for the manifest hashes) the raw bytes, so it is fast and needs no
model instance. Every problem names the file, tensor or field at fault. This module checks the
config, the quantization_config and the manifest; `check_layout` checks the tensors themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from workbench import ckpt_format as fmt
from workbench.quant.check_layout import check_tensors
from workbench.quant.ckpt_read import hash_file
from workbench.quant.recipe import expected_layout

__all__ = ["CheckReport", "CheckpointError", "check_checkpoint"]

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
    check_tensors(folder, config, layouts, report)
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
