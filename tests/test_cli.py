"""The `flexquant` CLI through typer's CliRunner (in process) and as a real subprocess."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

import storage.db
from jobs import queue
from storage.db import open_db
from tests.test_models import make_model_dir
from workbench.cli import app

ROOT = Path(__file__).resolve().parents[1]
POLICY_YAML = """name: pd-test
prefill: w8a8
decode:
  - {max_batch: 8, variant: w4a16}
  - {variant: w8a8}
layers:
  - {first: 0, last: 1, variant: w8a8}
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("FLEXQUANT_DATA_DIR", "FLEXQUANT_ALLOWED_ROOTS"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def cli(data_dir: Path, *args: str):
    result = CliRunner().invoke(app, ["--data-dir", str(data_dir), *args])
    assert "Traceback" not in result.output, result.output
    return result


def table_count(db: Path, table: str) -> int:
    return sqlite3.connect(db).execute(f"select count(*) from {table}").fetchone()[0]


def test_init_without_model_and_empty_lists(data_dir: Path) -> None:
    r = cli(data_dir, "init", "--no-model")
    assert r.exit_code == 0 and (data_dir / "workbench.db").is_file()
    assert all((data_dir / d).is_dir() for d in ("models", "checkpoints", "work", "logs"))
    assert "no models yet" in cli(data_dir, "models", "list").output
    assert "no jobs" in cli(data_dir, "jobs", "list").output
    assert "no saved policies" in cli(data_dir, "policy", "list").output


def test_models_add_list_show_and_refusals(data_dir: Path, tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path / "outside" / "tiny")
    r = cli(data_dir, "models", "add", "tiny", str(folder))
    assert r.exit_code == 2 and "--allow-root" in r.stderr and "FLEXQUANT_ALLOWED_ROOTS" in r.stderr
    assert table_count(data_dir / "workbench.db", "sourcemodel") == 0
    allow = ["--allow-root", str(tmp_path / "outside")]
    r = cli(data_dir, *allow, "models", "add", "tiny", str(folder))
    assert r.exit_code == 0, r.output
    assert "added tiny" in r.stdout and "LlamaForCausalLM" in r.stdout
    refusals = [
        (["tiny", str(folder)], "already exists"),
        (["bad name", str(folder)], "not allowed"),
        (["nomodel", str(tmp_path / "outside")], "no config.json"),
        (["gpt2", str(make_model_dir(tmp_path / "outside" / "g", arch="GPT2LMHeadModel"))], "not supported"),
        (["ghost", str(tmp_path / "outside" / "missing")], "does not exist"),
    ]
    for args, message in refusals:
        r = cli(data_dir, *allow, "models", "add", *args)
        assert r.exit_code == 2 and message in r.stderr, (args, r.output)
    assert table_count(data_dir / "workbench.db", "sourcemodel") == 1
    listing = cli(data_dir, "models", "list").stdout
    assert "tiny" in listing and "2" in listing
    shown = cli(data_dir, "models", "show", "tiny")
    assert shown.exit_code == 0 and str(folder) in shown.stdout and "ok: model-00000-of-00001" in shown.stdout
    missing = cli(data_dir, "models", "show", "nope")
    assert missing.exit_code == 2 and "no model named 'nope'" in missing.stderr


def test_allowed_roots_from_env(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    folder = make_model_dir(tmp_path / "env-root" / "m")
    monkeypatch.setenv("FLEXQUANT_ALLOWED_ROOTS", json.dumps([str(tmp_path / "env-root")]))
    assert cli(data_dir, "models", "add", "m", str(folder)).exit_code == 0


def test_unreadable_db_is_a_clear_error_and_untouched(data_dir: Path) -> None:
    data_dir.mkdir()
    db = data_dir / "workbench.db"
    db.write_bytes(b"this is not sqlite" * 100)
    before = db.read_bytes()
    for args in (["models", "list"], ["jobs", "list"], ["init", "--no-model"]):
        r = cli(data_dir, *args)
        assert r.exit_code == 2 and "workbench database" in r.stderr, r.output
    assert db.read_bytes() == before


def test_locked_db_is_a_clear_error(data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(storage.db, "BUSY_TIMEOUT_MS", 200)
    cli(data_dir, "init", "--no-model")
    folder = make_model_dir(data_dir / "models" / "m")
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None);"
         "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(30)",
         str(data_dir / "workbench.db")],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = cli(data_dir, "models", "add", "m", str(folder))
        assert r.exit_code == 2 and "locked" in r.stderr, r.output
    finally:
        holder.kill()
        holder.wait()
    assert table_count(data_dir / "workbench.db", "sourcemodel") == 0


def test_jobs_for_missing_model_or_checkpoint_queue_nothing(data_dir: Path) -> None:
    cli(data_dir, "init", "--no-model")
    r = cli(data_dir, "quantize", "nosuch", "--name", "ck")
    assert r.exit_code == 2 and "no model named 'nosuch'" in r.stderr
    r = cli(data_dir, "evaluate", "nosuch")
    assert r.exit_code == 2 and "no checkpoint named 'nosuch'" in r.stderr
    assert table_count(data_dir / "workbench.db", "job") == 0


def test_jobs_list_show_cancel_retry(data_dir: Path) -> None:
    import tests.jobkinds_for_tests  # noqa: F401 - registers the "sleep" kind

    cli(data_dir, "init", "--no-model")
    engine = open_db(data_dir / "workbench.db")
    first = queue.submit(engine, "sleep", {"seconds": 0.1}, title="nap one")
    second = queue.submit(engine, "sleep", {"seconds": 0.1}, title="nap two")
    queue.append_log(engine, first.id, ["line one", "line two", "line three"])
    engine.dispose()
    listing = cli(data_dir, "jobs", "list").stdout
    assert "nap one" in listing and "nap two" in listing and "queued" in listing
    shown = cli(data_dir, "jobs", "show", str(first.id), "--lines", "2").stdout
    assert "nap one" in shown and "line three" in shown and "line two" in shown and "line one" not in shown
    r = cli(data_dir, "jobs", "cancel", str(first.id))
    assert r.exit_code == 0 and "cancelled" in r.stdout
    assert "nap two" not in cli(data_dir, "jobs", "list", "--status", "cancelled").stdout
    r = cli(data_dir, "jobs", "retry", str(second.id))
    assert r.exit_code == 2 and "queued" in r.stderr  # a queued job cannot be retried
    r = cli(data_dir, "jobs", "retry", str(first.id))
    assert r.exit_code == 0 and "queued" in r.stdout
    r = cli(data_dir, "jobs", "show", "999")
    assert r.exit_code == 2 and "no job with id 999" in r.stderr
    r = cli(data_dir, "jobs", "list", "--status", "bogus")
    assert r.exit_code == 2 and "unknown status" in r.stderr


def test_jobs_worker_once_runs_queued_jobs(data_dir: Path, tmp_path: Path) -> None:
    import tests.jobkinds_for_tests  # noqa: F401

    cli(data_dir, "init", "--no-model")
    engine = open_db(data_dir / "workbench.db")
    job = queue.submit(engine, "record", {"path": str(tmp_path / "ran.txt")})
    r = cli(data_dir, "jobs", "worker", "--modules", "tests.jobkinds_for_tests", "--once")
    assert r.exit_code == 0, r.output
    assert queue.get_job(engine, job.id).status == "done"
    assert (tmp_path / "ran.txt").read_text().split()[0] == str(job.id)
    engine.dispose()


def test_wait_for_job_follows_a_real_worker(data_dir: Path) -> None:
    import tests.jobkinds_for_tests  # noqa: F401
    from jobs.worker import start_worker
    from workbench.cli_common import wait_for_job

    engine = open_db(data_dir / "workbench.db")
    job = queue.submit(engine, "sleep", {"seconds": 1.0, "steps": 4})
    worker = start_worker(data_dir / "workbench.db", data_dir, ["tests.jobkinds_for_tests"], once=True)
    try:
        finished = wait_for_job(engine, job.id, poll_s=0.1)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert finished.status == "done" and json.loads(finished.result_json) == {"steps": 4}
    engine.dispose()


def write_policy(tmp_path: Path, text: str = POLICY_YAML, name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def fake_checkpoint(folder: Path, variants=("w8a8", "w4a16"), num_layers: int = 2) -> Path:
    folder.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": num_layers,
           "quantization_config": {"quant_method": "flexquant", "format_version": 1,
                                   "variants": {v: {} for v in variants}}}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_policy_validate(data_dir: Path, tmp_path: Path) -> None:
    good = write_policy(tmp_path)
    r = cli(data_dir, "policy", "validate", str(good))
    assert r.exit_code == 0 and "pd-test is valid" in r.stdout and "0 prefill/64 decode -> w8a8" in r.stdout
    assert cli(data_dir, "policy", "validate", str(good), "--checkpoint",
               str(fake_checkpoint(tmp_path / "ck"))).exit_code == 0
    r = cli(data_dir, "policy", "validate", str(good), "--checkpoint",
            str(fake_checkpoint(tmp_path / "ck8", variants=("w8a8", "fp8"))))
    assert r.exit_code == 2 and "w4a16" in r.stderr
    r = cli(data_dir, "policy", "validate", str(good), "--checkpoint",
            str(fake_checkpoint(tmp_path / "ck1", num_layers=1)))
    assert r.exit_code == 2 and "past the model's last layer 0" in r.stderr
    r = cli(data_dir, "policy", "validate", str(write_policy(tmp_path, "name: x\n", "bad.yaml")))
    assert r.exit_code == 2 and "bad.yaml" in r.stderr and "prefill" in r.stderr
    r = cli(data_dir, "policy", "validate", str(write_policy(tmp_path, "a: &x [1]\nb: *x\n", "bomb.yaml")))
    assert r.exit_code == 2 and "aliases" in r.stderr
    r = cli(data_dir, "policy", "validate", str(tmp_path / "none.yaml"))
    assert r.exit_code == 2 and "is not a file" in r.stderr


def test_policy_save_list_show_replace(data_dir: Path, tmp_path: Path) -> None:
    path = write_policy(tmp_path)
    assert cli(data_dir, "policy", "save", str(path)).exit_code == 0
    assert "pd-test" in cli(data_dir, "policy", "list").stdout
    assert cli(data_dir, "policy", "show", "pd-test").stdout.strip() == POLICY_YAML.strip()
    edited = POLICY_YAML.replace("max_batch: 8", "max_batch: 4")
    assert cli(data_dir, "policy", "save", str(write_policy(tmp_path, edited))).exit_code == 0
    assert "max_batch: 4" in cli(data_dir, "policy", "show", "pd-test").stdout
    assert table_count(data_dir / "workbench.db", "policyrecord") == 1
    r = cli(data_dir, "policy", "show", "nope")
    assert r.exit_code == 2 and "no saved policy named 'nope'" in r.stderr
    r = cli(data_dir, "policy", "save", str(write_policy(tmp_path, "name: x\n", "bad.yaml")))
    assert r.exit_code == 2 and table_count(data_dir / "workbench.db", "policyrecord") == 1


class PolicyEndpoint(BaseHTTPRequestHandler):
    """Stands in for a runtime's PUT /flexquant/policy: 200 for w8a8/w4a16 policies, 400 otherwise."""

    received: list = []

    def do_PUT(self):  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        PolicyEndpoint.received.append((self.path, body))
        ok = {body["policy"]["prefill"]} <= {"w8a8", "w4a16"}
        reply = {"applied_at_step": 7} if ok else {"error": "variant fp8 is not in this checkpoint"}
        data = json.dumps(reply).encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_policy_apply_puts_the_policy(data_dir: Path, tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), PolicyEndpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        cli(data_dir, "policy", "save", str(write_policy(tmp_path)))
        r = cli(data_dir, "policy", "apply", "pd-test", "--url", url)
        assert r.exit_code == 0 and "applied" in r.stdout and "step 7" in r.stdout, r.output
        path, body = PolicyEndpoint.received[-1]
        assert path == "/flexquant/policy" and body["policy"]["name"] == "pd-test"
        assert body["policy"]["decode"][0] == {"max_batch": 8, "variant": "w4a16"}
        fp8 = write_policy(tmp_path, POLICY_YAML.replace("prefill: w8a8", "prefill: fp8"), "fp8.yaml")
        r = cli(data_dir, "policy", "apply", str(fp8), "--url", url)
        assert r.exit_code == 2 and "fp8 is not in this checkpoint" in r.stderr
    finally:
        server.shutdown()
        server.server_close()
    r = cli(data_dir, "policy", "apply", "pd-test", "--url", url)
    assert r.exit_code == 2 and "cannot reach" in r.stderr


@pytest.mark.slow
def test_init_registers_default_model(data_dir: Path, default_model_dir: Path) -> None:
    from tests.test_default_model import link_copy
    from workbench.default_model import DEFAULT_MODEL_NAME

    link_copy(default_model_dir, data_dir / "models" / DEFAULT_MODEL_NAME)
    r = cli(data_dir, "init")
    assert r.exit_code == 0, r.output
    assert f"default model {DEFAULT_MODEL_NAME}" in r.stdout and "30 layers" in r.stdout
    assert cli(data_dir, "init").exit_code == 0  # idempotent
    listing = cli(data_dir, "models", "list").stdout
    assert DEFAULT_MODEL_NAME in listing and "yes" in listing


def run_cli_process(*args: str, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXQUANT_")}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    # cwd is a scratch folder: without --data-dir the default ./data must not land in the repo.
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def test_real_process_exit_codes_and_no_traceback(data_dir: Path, tmp_path: Path) -> None:
    folder = make_model_dir(tmp_path / "models-here" / "tiny")
    ok = run_cli_process("--data-dir", str(data_dir), "--allow-root", str(tmp_path / "models-here"),
                         "models", "add", "tiny", str(folder), cwd=tmp_path)
    assert ok.returncode == 0 and "added tiny" in ok.stdout, ok.stderr
    listed = run_cli_process("models", "list", cwd=tmp_path, env_extra={"FLEXQUANT_DATA_DIR": str(data_dir)})
    assert listed.returncode == 0 and "tiny" in listed.stdout
    bad = run_cli_process("--data-dir", str(data_dir), "models", "add", "tiny", str(folder), cwd=tmp_path)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    usage = run_cli_process("models", "frobnicate", cwd=tmp_path)
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_console_script_if_installed(data_dir: Path) -> None:
    exe = shutil.which("flexquant") or (Path(sys.executable).parent / "flexquant")
    if not Path(exe).exists():
        pytest.skip("the package is not pip-installed here (no `flexquant` console script)")
    r = subprocess.run([str(exe), "--data-dir", str(data_dir), "init", "--no-model"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and (data_dir / "workbench.db").is_file(), r.stderr


@pytest.mark.slow
def test_quantize_wait_check_evaluate_end_to_end(data_dir: Path, tmp_path: Path) -> None:
    """Real backends: a worker started by `flexquant jobs worker`, a tiny random Llama, GPTQ."""
    from workbench.quant.shapes import make_tiny_source_model

    cli(data_dir, "init", "--no-model")
    make_tiny_source_model(data_dir / "models" / "tiny")
    assert cli(data_dir, "models", "add", "tiny", str(data_dir / "models" / "tiny")).exit_code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXQUANT_")}
    env.update(PYTHONPATH=str(ROOT), FLEXQUANT_HEARTBEAT_S="0.5")
    cmd = [sys.executable, "-m", "workbench.cli", "--data-dir", str(data_dir), "jobs", "worker"]
    worker = subprocess.Popen(cmd,
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=open(tmp_path / "worker.log", "wb"))  # noqa: SIM115
    try:
        r = cli(data_dir, "quantize", "tiny", "--name", "tiny-fq", "--num-samples", "8", "--seq-len", "64",
                "--wait")
        assert r.exit_code == 0, r.output + (tmp_path / "worker.log").read_text()
        assert "job 1 done" in r.stdout
        checked = cli(data_dir, "check", "tiny-fq")
        assert checked.exit_code == 0 and "checkpoint ok" in checked.stdout
        assert "w8a8, w4a16" in checked.stdout
        policy = write_policy(tmp_path)
        ck_dir = data_dir / "checkpoints" / "tiny-fq"
        assert cli(data_dir, "policy", "validate", str(policy), "--checkpoint", str(ck_dir)).exit_code == 0
        cli(data_dir, "policy", "save", str(policy))
        r = cli(data_dir, "evaluate", "tiny-fq", "--policy", "pd-test", "--wait")
        assert r.exit_code == 0, r.output + (tmp_path / "worker.log").read_text()
        evals = sqlite3.connect(data_dir / "workbench.db").execute("select target from evalresult").fetchall()
        assert {"all-w8a8", "all-w4a16", "pd-test"} <= {t for (t,) in evals}
        r = cli(data_dir, "quantize", "tiny", "--name", "tiny-fq")
        assert r.exit_code == 2 and "tiny-fq" in r.stderr  # checkpoint name taken: refused at submit
        assert table_count(data_dir / "workbench.db", "job") == 2
    finally:
        worker.terminate()
        worker.wait(timeout=60)


@pytest.mark.slow
def test_serve_apply_bench_with_the_cpu_runtime(data_dir: Path, tmp_path: Path) -> None:
    """`flexquant serve` as a real process (CPU runtime), driven by `policy apply` and `bench`,
    stopped by Ctrl-C."""
    import signal
    import socket
    import time

    import httpx
    from sqlmodel import Session, select

    from storage.models import Run
    from tests.test_flexmodel import build_tiny_checkpoints

    merged, _ = build_tiny_checkpoints(data_dir / "checkpoints")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXQUANT_")}
    env.update(PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "workbench.cli", "--data-dir", str(data_dir), "serve", str(merged),
           "--runtime", "cpu", "--port", str(port), "--timeout", "180"]
    server = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert server.poll() is None, server.communicate()
        cli(data_dir, "policy", "save", str(write_policy(tmp_path)))
        r = cli(data_dir, "policy", "apply", "pd-test", "--url", url)
        assert r.exit_code == 0 and "pd-test applied" in r.stdout, r.output
        assert httpx.get(f"{url}/flexquant/policy", timeout=5).json()["policy"]["name"] == "pd-test"
        out = tmp_path / "bench.csv"
        r = cli(data_dir, "bench", "--url", url, "--requests", "2", "--max-tokens", "4",
                "--prompt-words", "8", "--rate", "0", "--out", str(out))
        assert r.exit_code == 0, r.output
        lines = out.read_text().splitlines()
        assert lines[0].startswith("policy,rate,requests,errors") and len(lines) == 2
        assert lines[1].split(",")[2:4] == ["2", "0"]  # 2 requests, 0 errors
    finally:
        server.send_signal(signal.SIGINT)
        stdout, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr
    assert "serving" in stdout and "stopping" in stdout and "Traceback" not in stderr
    engine = open_db(data_dir / "workbench.db")
    with Session(engine) as session:
        runs = session.exec(select(Run)).all()
    assert len(runs) == 1 and runs[0].status == "ended"
    engine.dispose()


def test_bench_control_needs_a_baseline_to_repeat(data_dir: Path, tmp_path: Path) -> None:
    merged = tmp_path / "merged"
    merged.mkdir()
    r = cli(data_dir, "bench", "--checkpoint", str(merged), "--control", "--runtime", "cpu")
    assert r.exit_code != 0 and "--control repeats the first --baseline" in r.output


def test_serve_prefill_graphs_reaches_the_vllm_command(tmp_path, monkeypatch):
    """`serve --prefill-graphs` gives vLLM breakable prefill graphs; without it decode-only graphs. The
    server start is intercepted after the real `vllm serve` command is built (no GPU here; the engine
    side runs in tests/test_vllm_gpu.py)."""
    from tests.test_flexmodel import build_tiny_checkpoints
    from workbench.runtime import serve as serve_mod
    from workbench.runtime.vllm_launch import build_vllm_command

    data_dir = tmp_path / "data"
    merged, _ = build_tiny_checkpoints(data_dir / "checkpoints")
    commands = []

    def build_then_stop(cfg, **_):
        commands.append(build_vllm_command(cfg, "python3"))
        raise RuntimeError("stopped after building the command")

    monkeypatch.setattr(serve_mod, "start_server", build_then_stop)
    for flags in ([], ["--prefill-graphs"]):
        r = cli(data_dir, "serve", str(merged), "--runtime", "vllm", *flags)
        assert r.exit_code != 0 and "stopped after building the command" in str(r.exception)
    (plain_argv, plain_env), (graph_argv, graph_env) = commands
    modes = [json.loads(argv[argv.index("--compilation-config") + 1])["cudagraph_mode"]
             for argv in (plain_argv, graph_argv)]
    assert modes == ["FULL_DECODE_ONLY", "FULL_AND_PIECEWISE"]
    assert "VLLM_USE_BREAKABLE_CUDAGRAPH" not in plain_env
    assert graph_env["VLLM_USE_BREAKABLE_CUDAGRAPH"] == "1"
