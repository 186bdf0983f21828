"""Calibration data for llmcompressor passes, and per-layer progress while they run.

`calibration_dataset` tokenizes the recipe's calibration text (built-in Lee corpus or the user's
file) into the dataset `oneshot` takes, with a provenance record for the manifest. `LayerProgress`
turns llmcompressor's layer-by-layer pipeline into job progress and cancel points.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from workbench.quant.recipe import QuantRecipe

__all__ = ["LayerProgress", "calibration_dataset"]


def calibration_dataset(tokenizer, recipe: QuantRecipe):
    """(datasets.Dataset of token ids, provenance dict) from the recipe's calibration text."""
    from datasets import Dataset

    from workbench.textdata import calibration_texts, dataset_name

    path = Path(recipe.calibration_path) if recipe.calibration_path else None
    texts = calibration_texts(path, recipe.num_samples)
    rows = [tokenizer(t, truncation=True, max_length=recipe.seq_len)["input_ids"] for t in texts]
    rows = [r for r in rows if len(r) >= 2]
    if not rows:
        raise ValueError(
            f"calibration text {path or 'built-in'} gave no usable samples; use a file with text"
        )
    digest = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
    info = {
        "source": dataset_name(path, purpose="calibration"),
        "path": str(path) if path else None,
        "num_samples": len(rows),
        "requested_samples": recipe.num_samples,
        "seq_len": recipe.seq_len,
        "num_tokens": sum(map(len, rows)),
        "sha256": digest,
    }
    data = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    return data, info


class LayerProgress:
    """Forward pre-hooks on the decoder layers: llmcompressor's sequential pipeline calibrates and
    quantizes one layer at a time, so the first call into layer i means layers < i are done."""

    def __init__(self, model: torch.nn.Module, reporter, stage: str, lo: float, hi: float):
        layers = getattr(getattr(model, "model", None), "layers", None) or []
        self.total, self.seen = max(len(layers), 1), set()
        self.reporter, self.stage, self.lo, self.hi = reporter, stage, lo, hi
        self.handles = [layer.register_forward_pre_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(_module, _args):
            if index not in self.seen:
                self.seen.add(index)
                pct = self.lo + (self.hi - self.lo) * index / self.total
                self.reporter.update(self.stage, pct, f"layer {index + 1}/{self.total}")
                self.reporter.check_cancelled()  # Cancelled propagates out of oneshot

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
