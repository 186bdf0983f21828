"""Start-up side of the vLLM runtime: find a serving Python, build `vllm serve`, explain failed starts.

The serving environment is a separate Python (vLLM 0.26 pins compressed-tensors 0.17 and torch 2.11,
llmcompressor pins others), so everything here works on a *path to a python*, never on an import.
`workbench.runtime.serve_config` calls `vllm_available(python)` (and `probe_vllm` for the reason it
fails); `workbench.runtime.serve` (H4) calls `build_vllm_command(cfg, python)` and, when the process dies
or never gets healthy, `diagnose_vllm_log(log_text)`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from workbench.ckpt_format import QUANT_METHOD, read_config
from workbench.policy import check_policy_for, kernel_hints, policy_to_json
from workbench.runtime import vllm_plugin

logger = logging.getLogger(__name__)

DEFAULT_COMPILATION = {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
MIDDLEWARE = "workbench.runtime.vllm_plugin.PolicyMiddleware"
PLUGIN_NAME = "flexquant"
DECODE_CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256]
# Token counts of prefill and mixed steps captured with prefill graphs: a step pads up to the next size
# (at most 64 tokens up to 2048, 512 above), a step beyond the last runs op by op.
PREFILL_CAPTURE_SIZES = [*range(320, 2048 + 1, 64), *range(2560, 8192 + 1, 512)]


def graph_compilation(prefill_graphs: bool, max_batch: int = 256) -> dict:
    """vLLM compilation settings FlexQuant can run: no torch.compile (the variant is chosen in Python each
    step), decode in full CUDA graphs up to `max_batch`, prefill and mixed steps op by op or, with
    `prefill_graphs`, in vLLM's breakable graphs (everything but attention replayed; +1.3 GiB and ~25 s
    of capture per variant for Llama-3-8B on an H100, docs/benchmarks/README.md run 8)."""
    if not prefill_graphs:
        sizes = [s for s in DECODE_CAPTURE_SIZES if s <= max(max_batch, 1)] or [1]
        return {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes": sizes}
    sizes = sorted({*DECODE_CAPTURE_SIZES, *PREFILL_CAPTURE_SIZES})
    return {"mode": 0, "cudagraph_mode": "FULL_AND_PIECEWISE", "cudagraph_capture_sizes": sizes}


_PROBE = r"""
import importlib.metadata as md, importlib.util, json, sys
out = {"python": sys.version.split()[0], "vllm": None, "gpus": [], "plugin": False, "error": None}
try:
    out["vllm"] = md.version("vllm") if importlib.util.find_spec("vllm") else None
    out["plugin"] = any(ep.name == "flexquant" for ep in md.entry_points(group="vllm.general_plugins"))
    import torch
    out["torch"] = torch.__version__
    out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except Exception as exc:
    out["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


@dataclass(frozen=True)
class VllmProbe:
    """What a serving Python offers: `ok` only if vLLM, a CUDA GPU and our plugin are all there."""

    ok: bool
    reason: str | None
    vllm_version: str | None = None
    gpus: tuple[str, ...] = ()


def probe_vllm(python: str, timeout_s: float = 120.0) -> VllmProbe:
    """Ask `python` (in a subprocess) whether it can serve FlexQuant with vLLM on a GPU."""
    try:
        proc = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        return VllmProbe(False, f"serving python {python!r} does not exist; set FLEXQUANT_VLLM_PYTHON")
    except subprocess.TimeoutExpired:
        return VllmProbe(False, f"{python} did not answer within {timeout_s:.0f} s (import torch hung?)")
    try:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return VllmProbe(False, f"{python} could not run the probe: {proc.stderr.strip()[-300:]}")
    gpus = tuple(info.get("gpus") or ())
    if not info.get("vllm"):
        return VllmProbe(False, f"vLLM is not installed in {python}; see README 'Two environments'")
    if info.get("error"):
        return VllmProbe(False, f"{python}: {info['error']}", info["vllm"])
    if not gpus:
        return VllmProbe(False, f"{python} sees no CUDA GPU (vLLM {info['vllm']} needs one); "
                                "use the CPU runtime instead", info["vllm"])
    if not info.get("plugin"):
        return VllmProbe(False, f"the FlexQuant vLLM plugin is not installed in {python}; run "
                                f"`{python} -m pip install --no-deps -e .` in the workbench folder",
                         info["vllm"], gpus)
    return VllmProbe(True, None, info["vllm"], gpus)


@functools.lru_cache(maxsize=8)
def vllm_available(python: str) -> bool:
    """True if `python` has vLLM, a CUDA GPU and the FlexQuant plugin (cached per python path)."""
    probe = probe_vllm(python)
    if not probe.ok:
        logger.info("vLLM runtime unavailable: %s", probe.reason)
    return probe.ok


def build_vllm_command(cfg, python: str) -> tuple[list[str], dict[str, str]]:
    """argv and extra environment for `vllm serve` of `cfg` (a `serve_config.ServeConfig`).

    Optional attributes read from `cfg` when present: `policy_file`, `telemetry_file` (default: a
    folder per port under the temp dir), `compilation_config`, `max_model_len`, `max_num_seqs`,
    `kernels` ({variant: "marlin"|"machete"}; default: the policy's kernel hints), `served_model_name`,
    `stock` (plain checkpoint, plugin and middleware off: a baseline), `extra_args` (more `vllm serve`
    flags), `extra_env`. Raises ValueError on settings that could never start, so the user hears it
    before a 60 s engine start.
    """
    ckpt = Path(cfg.checkpoint).resolve()
    if not (ckpt / "config.json").is_file():
        raise ValueError(f"checkpoint {ckpt} has no config.json; pick a checkpoint folder")
    if not 1 <= int(cfg.port) <= 65535:
        raise ValueError(f"port {cfg.port} is outside 1..65535")
    if not 0.05 <= float(cfg.gpu_memory_utilization) <= 1.0:
        raise ValueError(f"gpu_memory_utilization {cfg.gpu_memory_utilization} must be within 0.05..1.0")
    if int(cfg.tensor_parallel_size) < 1:
        raise ValueError(f"tensor_parallel_size {cfg.tensor_parallel_size} must be >= 1")
    compilation = dict(getattr(cfg, "compilation_config", None) or DEFAULT_COMPILATION)
    stock = bool(getattr(cfg, "stock", False))
    if not stock and compilation.get("mode", 0) not in (0, "NONE", "none"):
        raise ValueError("FlexQuant needs compilation mode 0 (torch.compile would freeze the per-step "
                         f"variant choice); got {compilation}")
    qcfg = read_config(ckpt).get("quantization_config") or {}
    is_flex = qcfg.get("quant_method") == QUANT_METHOD
    if is_flex:
        num_layers = read_config(ckpt).get("num_hidden_layers")
        check_policy_for(cfg.policy, list(qcfg.get("variants") or {}), num_layers)

    run_dir = Path(tempfile.gettempdir()) / f"flexquant-vllm-{cfg.port}"
    policy_file = Path(getattr(cfg, "policy_file", None) or run_dir / "policy.json")
    telemetry_file = Path(getattr(cfg, "telemetry_file", None) or run_dir / "steps.jsonl")
    argv = [python, "-m", "vllm.entrypoints.cli.main", "serve", str(ckpt),
            "--host", str(cfg.host), "--port", str(int(cfg.port)),
            "--served-model-name", getattr(cfg, "served_model_name", None) or ckpt.name,
            "--gpu-memory-utilization", f"{float(cfg.gpu_memory_utilization):g}",
            "--tensor-parallel-size", str(int(cfg.tensor_parallel_size)),
            "--compilation-config", json.dumps(compilation, separators=(",", ":"))]
    if stock and is_flex:
        raise ValueError(f"{ckpt} is a merged FlexQuant checkpoint: stock vLLM cannot load it; export a "
                         "single variant (flexquant export) for a stock baseline")
    if not stock:
        argv += ["--middleware", MIDDLEWARE]
    for flag, attr in (("--max-model-len", "max_model_len"), ("--max-num-seqs", "max_num_seqs")):
        if getattr(cfg, attr, None):
            argv += [flag, str(int(getattr(cfg, attr)))]
    argv += list(getattr(cfg, "extra_args", None) or ())
    env = {"VLLM_PLUGINS": "" if stock else PLUGIN_NAME, "VLLM_USE_FLASHINFER_SAMPLER": "0",
           "VLLM_USE_V2_MODEL_RUNNER": "1",
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           vllm_plugin.ENV_POLICY_FILE: str(policy_file), vllm_plugin.ENV_TELEMETRY: str(telemetry_file),
           vllm_plugin.ENV_CHECKPOINT: str(ckpt)}
    if is_flex:
        env[vllm_plugin.ENV_POLICY_JSON] = policy_to_json(cfg.policy)
    # Explicit kernels win; else the kernel hints of the policy the engine starts with.
    kernels = getattr(cfg, "kernels", None) or (kernel_hints(cfg.policy) if is_flex else None)
    if kernels:
        env[vllm_plugin.ENV_KERNELS] = ",".join(f"{v}={k}" for v, k in sorted(kernels.items()))
    if "PIECEWISE" in str(compilation.get("cudagraph_mode", "")).upper():
        # without torch.compile vLLM has piecewise graphs only as breakable graphs; lacking this switch
        # it would silently turn every CUDA graph off, decode's included
        env["VLLM_USE_BREAKABLE_CUDAGRAPH"] = "1"
    env.update(getattr(cfg, "extra_env", None) or {})
    return argv, env


# (pattern, user-facing reason). First match wins, so the specific ones come first.
_DIAGNOSES: list[tuple[re.Pattern, str]] = [(re.compile(p, re.I | re.M), msg) for p, msg in [
    (r"address already in use|errno 98\b",
     "the port is already in use by another process; pick another port or stop that server"),
    (r"no cuda gpus are available|found no nvidia driver|cuda driver version is insufficient|"
     r"failed to infer device type|no nvidia gpu|nvml.*(not found|error)",
     "no usable NVIDIA GPU/driver in the serving environment; use the CPU runtime or fix the driver"),
    (r"no module named ['\"]?vllm",
     "vLLM is not installed in the serving python; set FLEXQUANT_VLLM_PYTHON to the vLLM environment"),
    (r"invalid quantization method: flexquant|unknown quantization method.*flexquant|"
     r"quantization method.*flexquant.*not supported",
     "vLLM did not load the FlexQuant plugin; install the workbench into the serving environment "
     "(pip install --no-deps -e .) and keep VLLM_PLUGINS=flexquant"),
    (r"PolicyError: (?P<detail>[^\n]*)", "the policy does not fit this checkpoint: {0}"),
    (r"FlexQuantError: (?P<detail>[^\n]*)", "FlexQuant refused the checkpoint or settings: {0}"),
    (r"cuda out of memory|outofmemoryerror|out of memory",
     "the GPU ran out of memory; lower gpu_memory_utilization or max_model_len, or free the GPU "
     "(another process may hold memory)"),
    (r"no available memory for the cache blocks|not enough (kv )?cache|insufficient memory|"
     r"free memory on device[^\n]*less than desired",
     "not enough free GPU memory for the KV cache; raise gpu_memory_utilization, lower max_model_len, "
     "or free the GPU"),
    (r"safetensor\w*error[^\n]*|header too (large|small)|incomplete metadata",
     "a safetensors file of the checkpoint is damaged or incomplete ({0}); re-run the quantize job"),
    (r"there is no module or parameter named[^\n]*|attempted to load nested weight[^\n]*",
     "the checkpoint's tensor names do not match the model ({0}); re-export the checkpoint"),
    (r"(no such file or directory|does not appear to have a file named)[^\n]*config\.json|"
     r"can't load the configuration[^\n]*|unrecognized model[^\n]*",
     "the checkpoint folder is not a loadable model ({0}); check the path and its config.json"),
    (r"compute capability[^\n]*(not supported|too low|requires)[^\n]*|minimum capability[^\n]*",
     "this GPU is too old for the quantized kernels ({0})"),
]]


def diagnose_vllm_log(text: str) -> str | None:
    """A user-facing reason for a failed vLLM start, read from its log; None if nothing known matched."""
    for pattern, message in _DIAGNOSES:
        match = pattern.search(text or "")
        if match:
            found = match.groupdict().get("detail") or match.group(0)
            return message.format(found.strip()[:300])
    return None
