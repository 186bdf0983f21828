"""Start, watch and stop a model server: vLLM on a GPU machine, the CPU reference server otherwise.

`start_server(cfg, engine=..., settings=...)` checks what it can before spending a minute on a start
(checkpoint layout, policy, port, GPU/vLLM), creates the `Run` row, starts the server as a
subprocess in its own process group with its log under `settings.logs_dir`, and returns a
`ServerHandle`. Every failure a user can fix is a `ServeError` that says what to do; the config, that
error and the checks before a start live in `serve_config`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from storage.models import Checkpoint
from workbench.policy import Policy, PolicyError, policy_to_yaml
from workbench.runtime.serve_config import (
    ServeConfig,
    ServeError,
    check_checkpoint_for,
    choose_runtime,
    port_in_use,
)
from workbench.runtime.telemetry import TelemetryWriter, create_run, end_run
from workbench.settings import Settings, is_loopback_host

log = logging.getLogger(__name__)

__all__ = ["ServerHandle", "start_server"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def start_server(cfg: ServeConfig, *, engine: Engine, settings: Settings,
                 live_steps: bool = True) -> ServerHandle:
    """Check, create the Run row, start the server subprocess; call `.wait_healthy()` next.

    `live_steps=False` (vLLM runtime): copy the plugin's step telemetry into the DB only at `stop()`,
    not every 0.5 s while serving: for a benchmark, which times requests from this process and whose
    stock engines write no steps, so that only FlexQuant's measurements would share it with the copy."""
    if not is_loopback_host(cfg.host):
        # The model API has no login of its own: binding it beyond this machine would expose it.
        raise ServeError(f"refusing to serve on host {cfg.host!r}: the model API has no login. "
                         "Bind 127.0.0.1 (the default) and reach it through an SSH tunnel or the app")
    check_checkpoint_for(cfg)
    if port_in_use(cfg.host, cfg.port):
        raise ServeError(f"port {cfg.port} on {cfg.host} is already in use; choose another port or stop "
                         "the program that holds it")
    runtime = choose_runtime(cfg, settings)
    ckpt = Path(cfg.checkpoint).resolve()
    with Session(engine) as session:
        row = session.exec(select(Checkpoint).where(Checkpoint.path == str(ckpt))).first()
    run_id = create_run(engine, runtime=runtime, checkpoint_path=str(ckpt), policy_name=cfg.policy.name,
                        checkpoint_id=row.id if row else None,
                        config={"port": cfg.port, "host": cfg.host, "runtime": runtime,
                                "gpu_memory_utilization": cfg.gpu_memory_utilization,
                                "tensor_parallel_size": cfg.tensor_parallel_size})
    logs = Path(settings.logs_dir)
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"run-{run_id}-{runtime}.log"
    policy_file = logs / f"run-{run_id}-policy.yaml"
    policy_file.write_text(policy_to_yaml(cfg.policy))
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    steps_file = None
    try:
        if runtime == "cpu":
            argv = [sys.executable, "-m", "workbench.runtime.cpu_server", "--checkpoint", str(ckpt),
                    "--policy", str(policy_file), "--port", str(cfg.port), "--host", cfg.host,
                    "--db", str(engine.url.database), "--run-id", str(run_id),
                    "--threads", str(cfg.cpu_threads)]
            if cfg.served_model_name:
                argv += ["--served-model-name", cfg.served_model_name]
        else:
            from workbench.runtime.vllm_launch import build_vllm_command

            steps_file = logs / f"run-{run_id}-steps.jsonl"
            vcfg = dataclasses.replace(cfg, checkpoint=ckpt, policy_file=logs / f"run-{run_id}-policy.json",
                                       telemetry_file=steps_file)
            argv, extra = build_vllm_command(vcfg, str(settings.vllm_python or sys.executable))
            env.update(extra)
        with open(log_path, "ab") as log_file:
            # Own session = own process group, so stop() reaches vLLM's worker processes too.
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    cwd=str(REPO_ROOT), start_new_session=True)
    except (OSError, ValueError, PolicyError) as exc:
        end_run(engine, run_id, status="failed", result={"error": str(exc)})
        raise ServeError(f"could not start the {runtime} server: {exc}") from None
    log.info("started %s server pid %d on port %d (run %d, log %s)",
             runtime, proc.pid, cfg.port, run_id, log_path)
    return ServerHandle(cfg, runtime, proc, run_id, log_path, engine, steps_file, live_steps=live_steps)


class ServerHandle:
    """A started server subprocess: health, live policy, stop. Owns the Run row's end."""

    def __init__(self, cfg: ServeConfig, runtime: str, proc: subprocess.Popen, run_id: int, log_path: Path,
                 engine: Engine, steps_file: Path | None = None, *, live_steps: bool = True):
        self.cfg, self.runtime, self.proc, self.run_id, self.log_path = cfg, runtime, proc, run_id, log_path
        self.live_steps = live_steps
        self.engine = engine
        self.base_url = f"http://{cfg.host}:{cfg.port}"
        self._importer = _StepsImporter(steps_file, TelemetryWriter(engine, run_id)) if steps_file else None

    @property
    def steps_file(self) -> Path | None:
        """The vLLM plugin's step telemetry (JSONL), None for the CPU runtime (it writes the DB)."""
        return self._importer.path if self._importer is not None else None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, max_bytes: int = 8000) -> str:
        try:
            data = self.log_path.read_bytes()[-max_bytes:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def _why_dead(self) -> str:
        text = self.log_tail(64_000)
        reason = None
        if self.runtime == "vllm":
            from workbench.runtime.vllm_launch import diagnose_vllm_log

            reason = diagnose_vllm_log(text)
        if reason is None and ("MemoryError" in text or self.proc.returncode == -signal.SIGKILL):
            reason = "the server ran out of memory (or was killed); free memory or use a smaller checkpoint"
        last = [line for line in text.strip().splitlines() if line.strip()][-3:]
        return reason or ("; ".join(last) if last else f"exit code {self.proc.returncode}")

    def wait_healthy(self, timeout: float = 600.0) -> None:
        """Block until GET /health answers 200; ServeError (server stopped) if it dies or times out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                reason = self._why_dead()
                end_run(self.engine, self.run_id, status="failed", result={"error": reason})
                raise ServeError(f"the {self.runtime} server exited during start-up: {reason} "
                                 f"(log: {self.log_path})")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2.0).status_code == 200:
                    if self._importer is not None and self.live_steps:
                        self._importer.start()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop(status="failed")
        raise ServeError(f"the {self.runtime} server did not become healthy within {timeout:.0f} s; it was "
                         f"stopped. See {self.log_path}")

    def import_new_steps(self) -> None:
        """Hand the step telemetry written since the last copy to the DB writer now, which commits it
        within its 0.5 s interval (the live importer's work, done by the caller when it started the
        server with `live_steps=False`)."""
        if self._importer is not None:
            self._importer.read_new()

    def set_policy(self, policy: Policy) -> dict:
        """PUT /flexquant/policy; returns {"applied_at_step": N, ...}. PolicyError if the server refuses."""
        try:
            resp = httpx.put(f"{self.base_url}/flexquant/policy",
                             json={"policy": policy.model_dump(exclude_none=True)}, timeout=15.0)
        except httpx.HTTPError as exc:
            raise ServeError(f"cannot reach the server at {self.base_url}: {exc}") from None
        if resp.status_code == 400:
            raise PolicyError(str(resp.json().get("error", resp.text)))
        if resp.status_code != 200:
            raise ServeError(f"the server answered HTTP {resp.status_code} to the policy change: "
                             f"{resp.text[:300]}")
        return resp.json()

    def stop(self, timeout: float = 10.0, *, status: str = "ended") -> None:
        """SIGTERM the server's process group, SIGKILL after `timeout`; mark the Run ended."""
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    log.warning("server pid %d ignored %s", self.proc.pid, sig.name)
        if self._importer is not None:
            self._importer.stop()
        end_run(self.engine, self.run_id, status=status)


class _StepsImporter:
    """Copies vLLM's step telemetry (JSONL lines from the plugin) into StepRecord rows."""

    FIELDS = ("step", "ts", "duration_ms", "num_prefill_tokens", "num_decode_reqs", "variant", "policy_name")

    def __init__(self, path: Path, writer: TelemetryWriter):
        self.path, self.writer, self._offset = path, writer, 0
        self._lock = threading.Lock()  # the thread and an explicit `read_new()` must not read twice
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vllm-steps-import", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()

    def read_new(self) -> None:
        with self._lock:
            self._read_new()

    def _read_new(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return
        complete = data[: data.rfind(b"\n") + 1]  # a half-written last line waits for the next poll
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                rec = json.loads(line)
                self.writer.step(**{k: rec[k] for k in self.FIELDS})
            except (ValueError, KeyError, TypeError):
                log.warning("skipping a bad telemetry line in %s", self.path)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.read_new()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.read_new()
        self.writer.close()
