#!/usr/bin/env bash
# Create ./.venv and install the locked workbench environment (CPU; quantization + app).
#   scripts/bootstrap.sh          the app
#   scripts/bootstrap.sh --test   the app plus test tools and Debian chromium for browser tests
# Safe to re-run. torch comes from `torch==2.13.0` in requirements/cpu.lock (a CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_TESTS=0
[ "${1:-}" = "--test" ] && WITH_TESTS=1
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
"${PIP[@]}" -r requirements/cpu.lock
"${PIP[@]}" --no-deps -r requirements/nodeps.txt
"${PIP[@]}" --no-deps --no-build-isolation -e .
if [ "$WITH_TESTS" = 1 ]; then
  "${PIP[@]}" -r requirements/test.lock
  if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "bootstrap: could not install chromium; browser tests will be skipped" >&2
    else
      echo "bootstrap: /usr/bin/chromium missing (sudo apt-get install chromium); browser tests will be skipped" >&2
    fi
  fi
fi
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
