#!/usr/bin/env bash
# On the GPU machine, after the vLLM bundle is staged (see docs/gpu-runs/README.md): install this
# package (with its vLLM plugin entry point) into /tmp/gpu-site, and from the carried .gpu-wheels/
# only those workbench dependencies the machine lacks (never shadowing what vLLM brought).
# Usage: source /tmp/gpu-env.sh; bash scripts/gpu/setup.sh   (idempotent; prints what it installed)
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/gpu-site . 2>&1 | grep -v "WARNING: Target directory" || true
declare -A MODULE=([sqlmodel]=sqlmodel [sqlalchemy]=sqlalchemy [typer]=typer [rich]=rich [click]=click
  [shellingham]=shellingham [markdown_it_py]=markdown_it [mdurl]=mdurl [pygments]=pygments
  [annotated_doc]=annotated_doc [httpx]=httpx [httpcore]=httpcore [h11]=h11 [greenlet]=greenlet)
missing=()
for whl in .gpu-wheels/*.whl; do
  [ -e "$whl" ] || continue
  dist=$(basename "$whl" | cut -d- -f1 | tr 'A-Z' 'a-z')
  mod=${MODULE[$dist]:-$dist}
  python3 -c "import $mod" 2>/dev/null || missing+=("$whl")
done
if [ ${#missing[@]} -gt 0 ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/gpu-site "${missing[@]}" 2>&1 | grep -v "WARNING: Target directory" || true
fi
echo "setup: installed workbench + ${#missing[@]} missing wheel(s): ${missing[*]:-none}"
python3 -c "import workbench.cli, workbench.bench.runner, sqlmodel; import importlib.metadata as md; print('setup ok: vllm', md.version('vllm'), 'compressed-tensors', md.version('compressed-tensors'), 'torch', md.version('torch'))"
