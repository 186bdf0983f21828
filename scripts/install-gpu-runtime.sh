#!/usr/bin/env bash
# Create ./.venv-serve: the SERVING environment (vLLM 0.26.0 + the FlexQuant plugin) on a CUDA machine.
# Separate from ./.venv because llmcompressor (quantization) and vLLM pin different
# compressed-tensors releases; see README "Two environments". The plugin needs only what vLLM brings
# (torch, pydantic, PyYAML), so this package goes in with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-serve/bin/python ] || python3 -m venv .venv-serve
.venv-serve/bin/python -m pip install -q vllm==0.26.0
.venv-serve/bin/python -m pip install -q --no-deps --no-build-isolation .
echo "serving env ready: export FLEXQUANT_VLLM_PYTHON=$PWD/.venv-serve/bin/python"
