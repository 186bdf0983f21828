"""What a model server start is asked for (`ServeConfig`), the error it fails with (`ServeError`), and
the checks `serve.start_server` runs before spending a minute on a start.

`check_checkpoint_for` (checkpoint layout and policy), `port_in_use` and `choose_runtime` (CPU or
vLLM, and whether vLLM can run here) raise a `ServeError` that says what to do. No sqlmodel or httpx
here: the bench's engine list builds `ServeConfig`s without the server machinery.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from workbench.ckpt_format import read_config, read_flexquant_config
from workbench.policy import Policy, PolicyError, check_policy_for
from workbench.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["ServeConfig", "ServeError", "check_checkpoint_for", "choose_runtime", "port_in_use"]


class ServeError(RuntimeError):
    """The server cannot start or stopped; the message says why and what to do."""


@dataclass(frozen=True)
class ServeConfig:
    checkpoint: Path
    policy: Policy
    port: int = 8000
    host: str = "127.0.0.1"
    gpu_memory_utilization: float = 0.85
    tensor_parallel_size: int = 1
    runtime: Literal["auto", "cpu", "vllm"] = "auto"
    served_model_name: str | None = None
    cpu_threads: int = 2
    # Set by start_server for the vLLM runtime (read by vllm_launch.build_vllm_command).
    policy_file: Path | None = None
    telemetry_file: Path | None = None
    # Engine settings for benchmarks (read by build_vllm_command; None = vLLM's own defaults).
    stock: bool = False  # serve a plain (single-variant / BF16) checkpoint with stock vLLM, plugin off
    kernels: dict[str, str] | None = None
    compilation_config: dict | None = None
    max_num_seqs: int | None = None
    max_model_len: int | None = None
    extra_args: tuple[str, ...] = ()
    extra_env: dict[str, str] | None = None


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on host:port (binding as uvicorn/vLLM would fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_checkpoint_for(cfg: ServeConfig) -> list[str]:
    """Variants of a servable merged checkpoint; ServeError listing the problems otherwise.
    A `stock` config serves any HF checkpoint folder as it is (its variants are not ours: [])."""
    path = Path(cfg.checkpoint)
    if not (path / "config.json").is_file():
        raise ServeError(f"checkpoint folder {path} has no config.json; pick a published checkpoint")
    if cfg.stock:
        return []
    if importlib.util.find_spec("workbench.quant.check") is not None:
        from workbench.quant.check import check_checkpoint

        # Layout only: hashing every shard of an 8B checkpoint on each start would cost a minute.
        report = check_checkpoint(path, verify_hashes=False)
        if not report.ok:
            raise ServeError(f"checkpoint {path} is not servable: " + "; ".join(report.problems[:5]))
    try:
        fq = read_flexquant_config(path)
    except ValueError as exc:
        raise ServeError(str(exc)) from None
    try:
        check_policy_for(cfg.policy, list(fq["variants"]), read_config(path).get("num_hidden_layers"))
    except PolicyError as exc:
        raise ServeError(str(exc)) from None
    return list(fq["variants"])


def choose_runtime(cfg: ServeConfig, settings: Settings) -> str:
    """"cpu" or "vllm"; ServeError when vLLM was asked for and cannot run here."""
    if cfg.runtime == "cpu":
        if cfg.stock:
            raise ServeError("stock vLLM baselines need the vLLM runtime; on the CPU runtime pin a "
                             "variant of the merged checkpoint instead (policy all-<variant>)")
        return "cpu"
    has_gpu = shutil.which("nvidia-smi") is not None
    if cfg.runtime == "auto" and not has_gpu and not cfg.stock:
        return "cpu"
    if not has_gpu:
        raise ServeError("no NVIDIA GPU on this machine (nvidia-smi not found): the vLLM runtime needs one; "
                         "choose the CPU runtime")
    if importlib.util.find_spec("workbench.runtime.vllm_launch") is None:
        raise ServeError("this build has no vLLM launcher (workbench.runtime.vllm_launch); "
                         "use the CPU runtime")
    from workbench.runtime.vllm_launch import probe_vllm, vllm_available

    python = str(settings.vllm_python or sys.executable)
    if vllm_available(python):
        return "vllm"
    if cfg.runtime == "auto" and not cfg.stock:
        log.info("vLLM not usable from %s; falling back to the CPU reference runtime", python)
        return "cpu"
    raise ServeError(f"vLLM cannot serve here: {probe_vllm(python).reason}")
