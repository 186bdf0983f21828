"""QuantFactory: one job turns a bf16 model into a merged multi-variant FlexQuant checkpoint.

- `recipe`: `QuantRecipe` and the per-variant compressed-tensors configs.
- `factory`: `quantize_and_merge` (SmoothQuant once, then GPTQ per variant with llmcompressor).
- `merge` / `export`: the merged layout and taking one variant back out as plain compressed-tensors.
- `check`: `check_checkpoint`, the validator (its tensor checks in `check_layout`).
- `synthetic`: real-shape random checkpoints.
- `jobs`: the "quantize" job kind.

Submodules are imported on demand (torch and llmcompressor are heavy).
"""
