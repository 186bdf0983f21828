"""Imports flow one way: storage <- jobs <- workbench core <- ui. Light modules stay light."""

import subprocess
import sys

import pytest

LIGHT_MODULES = [
    "storage.models",
    "storage.db",
    "jobs.progress",
    "workbench.policy",
    "workbench.ckpt_format",
    "workbench.quant.ckpt_read",
    "workbench.bench.weights",
    "workbench.runtime.serve_config",
]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_do_not_import_heavy_frameworks(module):
    code = (
        f"import sys, {module}\n"
        "heavy = sorted(m for m in ('torch', 'vllm', 'gradio', 'transformers') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"
