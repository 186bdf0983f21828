"""`vllm serve` with FlexQuant, end to end: launch command, health, bad/good live policy edits, telemetry.

Called by `flexquant_proof.py all` on the GPU machine; standalone:
    python scripts/gpu/serve_check.py CKPT_DIR WORK_DIR OUT_DIR
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from workbench.policy import fixed_policy, policy_from_dict  # noqa: E402
from workbench.runtime.vllm_launch import build_vllm_command, diagnose_vllm_log, graph_compilation  # noqa: E402

PORT = 8123
# PROOF_PREFILL_GRAPHS=1 (as in flexquant_proof.py): the settings of `flexquant serve --prefill-graphs`
COMPILATION = graph_compilation(os.environ.get("PROOF_PREFILL_GRAPHS") == "1", max_batch=16)


def http(method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else {})
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, {"raw": raw.decode(errors="replace")[:500]}


def telemetry_rows(path: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    except (OSError, ValueError):
        return []


def serve_check(ckpt: Path, work: Path, outdir: Path) -> dict:
    tel, pol = work / "serve-steps.jsonl", work / "serve-policy.json"
    for p in (tel, pol):
        p.unlink(missing_ok=True)
    switching = policy_from_dict({"name": "serve-switch", "prefill": "w8a8",
                                  "decode": [{"max_batch": 3, "variant": "w4a16", "kernel": "marlin"},
                                             {"variant": "w8a8"}]})
    # No explicit `kernels`: the starting policy's hint must choose Marlin (vLLM picks Machete on Hopper)
    cfg = SimpleNamespace(checkpoint=ckpt, policy=switching, port=PORT, host="127.0.0.1",
                          gpu_memory_utilization=0.3, tensor_parallel_size=1, max_model_len=1024, max_num_seqs=16,
                          policy_file=pol, telemetry_file=tel, compilation_config=COMPILATION,
                          served_model_name="flex")
    argv, env = build_vllm_command(cfg, sys.executable)
    res: dict = {"argv": argv[2:], "env": {k: v for k, v in env.items() if "POLICY_JSON" not in k}}
    logf = outdir / "serve.log"
    started = time.time()
    with open(logf, "w") as fh:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        while time.time() - started < 300:
            if proc.poll() is not None:
                res["failed"] = diagnose_vllm_log(logf.read_text()) or "exited; see serve.log"
                return res
            try:
                if http("GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        res["start_s"] = round(time.time() - started, 1)
        body = {"model": "flex", "prompt": "t5 t6 t7 t8 t9", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        code, out = http("POST", "/v1/completions", body)
        res["completion"] = {"status": code, "text": (out.get("choices") or [{}])[0].get("text", out)}
        res["bad_policy"] = http("PUT", "/flexquant/policy",
                                 {"policy": {"name": "bad", "prefill": "w9", "decode": [{"variant": "w8a8"}]}})
        res["bad_layers"] = http("PUT", "/flexquant/policy", {"policy": {
            "name": "bad2", "prefill": "w8a8", "decode": [{"variant": "w8a8"}],
            "layers": [{"first": 0, "last": 99, "variant": "w4a16"}]}})
        res["policy_after_bad"] = http("GET", "/flexquant/policy")[1].get("policy", {}).get("name")

        stop = threading.Event()

        def load() -> None:  # keep the engine stepping while the policy changes
            while not stop.is_set():
                http("POST", "/v1/completions", {**body, "max_tokens": 64}, timeout=60)

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(2)
        for policy in (fixed_policy("w4a16"), policy_from_dict({
                "name": "serve-pinned", "prefill": "w8a8", "decode": [{"variant": "w4a16"}],
                "layers": [{"first": 0, "last": 9, "variant": "w8a8"}]})):
            t_put = time.time()
            code, out = http("PUT", "/flexquant/policy", {"policy": policy.model_dump(exclude_none=True)})
            put_s = time.time() - t_put
            first = None
            while time.time() - t_put < 15 and first is None:
                first = next((r for r in telemetry_rows(tel) if r["policy_name"] == policy.name), None)
                time.sleep(0.05)
            res[f"live_{policy.name}"] = {
                "status": code, "response": out, "put_s": round(put_s, 3),
                "first_step": first and first["step"], "first_step_ts_minus_put_s": first and round(first["ts"] - t_put, 3),
                "first_row": first}
        stop.set()
        for t in threads:
            t.join(timeout=70)
        res["stats"] = http("GET", "/flexquant/stats")[1]
        steps = telemetry_rows(tel)
        prefills = [r for r in steps if r["num_prefill_tokens"]]
        res["prefill_steps"] = {"graph": sum(r["cudagraph"] for r in prefills),
                                "eager": sum(not r["cudagraph"] for r in prefills)}
        res["log_kernels"] = sorted({w for line in logf.read_text().splitlines() for w in line.split()
                                     if w.endswith("LinearKernel")})
        # vLLM first logs its own pick (Machete on Hopper); the plugin then logs its override
        res["kernel_overrides"] = [line.split("FlexQuant: ", 1)[1] for line in logf.read_text().splitlines()
                                   if "FlexQuant: variant" in line]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        if tel.exists():
            (outdir / "serve-steps.jsonl").write_text(tel.read_text())
    return res


if __name__ == "__main__":
    print(json.dumps(serve_check(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])), indent=1))  # noqa: T201
