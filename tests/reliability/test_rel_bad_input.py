"""Bad input, one case at a time, through the entry points users have: the `flexquant` CLI (in process),
the library calls the UI makes, and HTTP requests to the running CPU server.

Each case must fail with a clear message (the fragment it must contain is listed with the case) and
change nothing: every DB table's rows and every file of the data dir are compared before and after
(the CPU server's own access log excepted: a line per request is what a log is for).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from workbench.cli import app

BILLION_LAUGHS = (
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    + "\n".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]" for p, c in zip("bcdefgh", "cdefghi", strict=True))
)
GOOD_POLICY = "name: ok\nprefill: w8a8\ndecode:\n  - {max_batch: 4, variant: w4a16}\n  - {variant: w8a8}\n"


@dataclass
class Env:
    root: Path
    data: Path
    inputs: Path  # an extra allowed root holding the user's files
    outside: Path  # not allowed
    ckpt: Path  # a valid merged checkpoint inside `inputs`
    base_url: str = ""
    spare_port: int = 0  # free, for start attempts that must be refused before binding


def cli(env: Env, *args: str) -> str:
    """Run `flexquant` in process; the error line it printed (the CLI exits 2 on user errors)."""
    result = CliRunner().invoke(app, ["--data-dir", str(env.data), "--allow-root", str(env.inputs), *args])
    assert "Traceback" not in result.output, result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output[-800:]}"
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    message = lines[-1][len("error:") :].strip() if lines else result.output.strip()
    problems = [
        line[len("problem:") :].strip() for line in result.output.splitlines() if line.startswith("problem:")
    ]
    return "; ".join([message, *problems])


def refused(fn: Callable[[], object], exc_type: type[BaseException] = ValueError) -> str:
    """Call a library function that must refuse; its message."""
    with pytest.raises(exc_type) as err:
        fn()
    return str(err.value)


def http_error(method: str, env: Env, path: str, *, status: int, **kwargs) -> str:
    resp = httpx.request(method, f"{env.base_url}{path}", timeout=60, **kwargs)
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    err = body.get("error", body)
    return f"HTTP {status}: {err.get('message', err) if isinstance(err, dict) else err}"


def snapshot(env: Env) -> dict:
    """Rows of every table (hashed) and every file (size, mtime) of the data dir."""
    tables = {}
    with sqlite3.connect(f"file:{env.data / 'workbench.db'}?mode=ro", uri=True) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for name in names:
            rows = conn.execute(f"SELECT * FROM {name} ORDER BY 1").fetchall()  # noqa: S608 - our table names
            tables[name] = (len(rows), hashlib.sha256(repr(rows).encode()).hexdigest()[:16])
    files = {}
    for path in sorted(p for p in env.data.rglob("*") if p.is_file()):
        rel = path.relative_to(env.data).as_posix()
        if rel.startswith("workbench.db") or (rel.startswith("logs/run-") and rel.endswith(".log")):
            continue
        files[rel] = (path.stat().st_size, path.stat().st_mtime_ns)
    return {"tables": tables, "files": files}


# --- input builders ---------------------------------------------------------------------------------
def model_dir(
    env: Env,
    name: str,
    *,
    config: dict | str | None = None,
    tensors: str | None = "BF16",
    extra: dict[str, bytes] | None = None,
) -> Path:
    """A small HF-like model folder under inputs/ with a hand-written safetensors header."""
    folder = env.inputs / "models" / name
    folder.mkdir(parents=True)
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "config.json").write_text(text)
    if tensors:
        width = {"BF16": 2, "I8": 1, "F32": 4}[tensors]
        header = json.dumps(
            {"w": {"dtype": tensors, "shape": [8, 8], "data_offsets": [0, 64 * width]}}
        ).encode()
        (folder / "model.safetensors").write_bytes(
            struct.pack("<Q", len(header)) + header + b"\0" * 64 * width
        )
    for file, data in (extra or {}).items():
        (folder / file).write_bytes(data)
    return folder


LLAMA = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64}


def write_input(env: Env, name: str, data: bytes | str) -> Path:
    path = env.inputs / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def damaged_ckpt(env: Env, name: str, damage: Callable[[Path], None]) -> Path:
    folder = env.inputs / "ckpts" / name
    shutil.copytree(env.ckpt, folder)
    damage(folder)
    return folder


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def flip_a_weight_byte(folder: Path) -> None:
    weights = folder / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x01
    weights.write_bytes(bytes(raw))


def foreign_method(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))


def policy_file(env: Env, name: str, text: str) -> str:
    return str(write_input(env, f"{name}.yaml", text))


def serve_refused(env: Env, folder: Path) -> str:
    from storage.db import open_db
    from workbench.policy import DEFAULT_POLICY
    from workbench.runtime.serve import start_server
    from workbench.runtime.serve_config import ServeConfig, ServeError
    from workbench.settings import Settings

    engine = open_db(env.data / "workbench.db")
    try:
        cfg = ServeConfig(checkpoint=folder, policy=DEFAULT_POLICY, port=env.spare_port, runtime="cpu")
        return refused(
            lambda: start_server(cfg, engine=engine, settings=Settings(data_dir=env.data)), ServeError
        )
    finally:
        engine.dispose()


def chat(env: Env, status: int = 400, **body) -> str:
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **body}
    return http_error("POST", env, "/v1/chat/completions", status=status, json=payload)


def quantize(env: Env, *args: str) -> str:
    return cli(env, "quantize", "tiny", "--name", "new-ckpt", "--num-samples", "4", "--seq-len", "16", *args)


# --- the cases: (category, input, action(env) -> message, fragment the message must contain) ---------
def _symlink_out(env: Env) -> Path:
    link = env.inputs / "models" / "escape"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(env.outside)
    return link


CASES: list[tuple[str, str, Callable[[Env], str], str]] = [
    # paths
    (
        "path",
        "models add: path does not exist",
        lambda e: cli(e, "models", "add", "m", str(e.inputs / "nope")),
        "does not exist",
    ),
    (
        "path",
        "models add: a file, not a folder",
        lambda e: cli(e, "models", "add", "m", str(write_input(e, "plain.txt", "x"))),
        "is a file",
    ),
    (
        "path",
        "models add: folder outside the allowed roots",
        lambda e: cli(e, "models", "add", "m", str(e.outside)),
        "outside the folders the workbench may read",
    ),
    (
        "path",
        "models add: symlink inside an allowed root pointing outside",
        lambda e: cli(e, "models", "add", "m", str(_symlink_out(e))),
        "outside the folders",
    ),
    (
        "path",
        "models add: ../ traversal out of the allowed root",
        lambda e: cli(e, "models", "add", "m", str(e.inputs / ".." / "outside")),
        "outside the folders",
    ),
    (
        "path",
        "quantize --calibration: a folder",
        lambda e: quantize(e, "--calibration", str(e.inputs)),
        "is not a regular file",
    ),
    (
        "path",
        "serve: checkpoint folder outside the allowed roots",
        lambda e: cli(e, "serve", str(e.outside), "--runtime", "cpu"),
        "outside the folders",
    ),
    # model folders
    (
        "model folder",
        "no config.json",
        lambda e: cli(e, "models", "add", "m", str(model_dir(e, "noconfig"))),
        "has no config.json",
    ),
    (
        "model folder",
        "unsupported architecture (BertForMaskedLM)",
        lambda e: cli(
            e,
            "models",
            "add",
            "m",
            str(model_dir(e, "bert", config={**LLAMA, "architectures": ["BertForMaskedLM"]})),
        ),
        "is not supported",
    ),
    (
        "model folder",
        "wrong dtype (int8 weights, no quantization_config)",
        lambda e: cli(e, "models", "add", "m", str(model_dir(e, "int8", config=LLAMA, tensors="I8"))),
        "weights are mostly I8",
    ),
    (
        "model folder",
        "pickle weights only (pytorch_model.bin)",
        lambda e: cli(
            e,
            "models",
            "add",
            "m",
            str(
                model_dir(e, "pickle", config=LLAMA, tensors=None, extra={"pytorch_model.bin": b"\x80\x04."})
            ),
        ),
        "only pickle weights",
    ),
    (
        "model folder",
        "already quantized (quantization_config present)",
        lambda e: cli(
            e,
            "models",
            "add",
            "m",
            str(model_dir(e, "gptq", config={**LLAMA, "quantization_config": {"quant_method": "gptq"}})),
        ),
        "already quantized",
    ),
    (
        "model folder",
        "config.json is not JSON",
        lambda e: cli(e, "models", "add", "m", str(model_dir(e, "badjson", config="{not json"))),
        "not valid JSON",
    ),
    (
        "model folder",
        "truncated safetensors weights",
        lambda e: cli(
            e,
            "models",
            "add",
            "m",
            str(
                model_dir(
                    e,
                    "trunc",
                    config=LLAMA,
                    tensors=None,
                    extra={"model.safetensors": struct.pack("<Q", 500) + b'{"w": '},
                )
            ),
        ),
        "not a readable safetensors file",
    ),
    (
        "model folder",
        "model name with spaces and a slash",
        lambda e: cli(e, "models", "add", "bad name/x", str(e.inputs)),
        "is not allowed",
    ),
    (
        "model folder",
        "model name already taken",
        lambda e: cli(e, "models", "add", "tiny", str(e.inputs / "tiny")),
        "already exists",
    ),
    # recipes
    (
        "recipe",
        "unknown scheme (--variants w2a2)",
        lambda e: quantize(e, "--variants", "w2a2"),
        "unknown variant",
    ),
    (
        "recipe",
        "group size 96 (not a power of two, does not divide 128)",
        lambda e: quantize(e, "--group-size", "96"),
        "must be a power of two",
    ),
    (
        "recipe",
        "group size 8 (below the minimum)",
        lambda e: quantize(e, "--group-size", "8"),
        "greater than or equal to 16",
    ),
    (
        "recipe",
        "zero calibration samples",
        lambda e: quantize(e, "--num-samples", "0"),
        "num_samples: Input should be greater than or equal to 1",
    ),
    ("recipe", "SmoothQuant strength 1.5", lambda e: quantize(e, "--smoothquant", "1.5"), "less than 1"),
    (
        "recipe",
        "the same variant twice",
        lambda e: quantize(e, "--variants", "w8a8,w8a8"),
        "name one variant twice",
    ),
    (
        "recipe",
        "checkpoint name '../evil'",
        lambda e: cli(e, "quantize", "tiny", "--name", "../evil"),
        "is not usable",
    ),
    (
        "recipe",
        "unknown source model",
        lambda e: cli(e, "quantize", "nosuch", "--name", "x"),
        "no model named",
    ),
    # policies
    (
        "policy",
        "overlapping layer ranges",
        lambda e: cli(
            e,
            "policy",
            "save",
            policy_file(
                e,
                "overlap",
                GOOD_POLICY + "layers:\n  - {first: 0, last: 5, variant: w8a8}\n"
                "  - {first: 3, last: 9, variant: w4a16}\n",
            ),
        ),
        "overlap",
    ),
    (
        "policy",
        "negative batch threshold (max_batch: -1)",
        lambda e: cli(
            e, "policy", "save", policy_file(e, "neg", GOOD_POLICY.replace("max_batch: 4", "max_batch: -1"))
        ),
        "greater than or equal to 1",
    ),
    (
        "policy",
        "huge batch threshold (max_batch: 10^12)",
        lambda e: cli(
            e,
            "policy",
            "save",
            policy_file(e, "huge", GOOD_POLICY.replace("max_batch: 4", "max_batch: 1000000000000")),
        ),
        "less than or equal to 65536",
    ),
    (
        "policy",
        "unknown variant for the served checkpoint (PUT /flexquant/policy)",
        lambda e: http_error(
            "PUT",
            e,
            "/flexquant/policy",
            status=400,
            json={"policy": {"name": "x", "prefill": "fp8", "decode": [{"variant": "fp8"}]}},
        ),
        "uses variant(s) ['fp8']",
    ),
    (
        "policy",
        "YAML bomb (billion laughs)",
        lambda e: cli(e, "policy", "save", policy_file(e, "bomb", BILLION_LAUGHS)),
        "anchors/aliases",
    ),
    (
        "policy",
        "30,000-deep nesting under the size limit",
        lambda e: cli(e, "policy", "save", policy_file(e, "deep", "decode: " + "[" * 30000 + "]" * 30000)),
        "nests deeper than 8 levels",
    ),
    (
        "policy",
        "python object tag (!!python/object/apply:os.system)",
        lambda e: cli(
            e,
            "policy",
            "save",
            policy_file(e, "tag", "name: !!python/object/apply:os.system ['touch /tmp/flexquant-pwned']\n"),
        ),
        "not valid YAML",
    ),
    (
        "policy",
        "policy file larger than 64 KiB",
        lambda e: cli(e, "policy", "save", policy_file(e, "big", GOOD_POLICY + "#" * 70_000)),
        "larger than 65536 bytes",
    ),
    # calibration files
    (
        "calibration",
        "empty .txt",
        lambda e: quantize(e, "--calibration", str(write_input(e, "empty.txt", ""))),
        "holds no text",
    ),
    (
        "calibration",
        "binary file named .txt",
        lambda e: quantize(e, "--calibration", str(write_input(e, "binary.txt", b"\x00\x01\x02ELF" * 100))),
        "looks binary",
    ),
    (
        "calibration",
        "1 GiB file (sparse)",
        lambda e: quantize(e, "--calibration", str(_sparse(e))),
        "the limit is 64 MiB",
    ),
    (
        "calibration",
        ".csv instead of .txt/.jsonl",
        lambda e: quantize(e, "--calibration", str(write_input(e, "data.csv", "a,b\n"))),
        "unsupported file type",
    ),
    (
        "calibration",
        ".jsonl with a broken second line",
        lambda e: quantize(
            e, "--calibration", str(write_input(e, "broken.jsonl", '{"text": "ok"}\n{"text": \n'))
        ),
        "line 2: not valid JSON",
    ),
    # checkpoints
    (
        "checkpoint",
        "truncated safetensors",
        lambda e: cli(e, "check", str(damaged_ckpt(e, "trunc", truncate_weights))),
        "(truncated file)",
    ),
    (
        "checkpoint",
        "sha256 mismatch (one weight byte changed)",
        lambda e: cli(e, "check", str(damaged_ckpt(e, "flip", flip_a_weight_byte))),
        "model.safetensors: sha256 does not match the manifest (changed tensor(s): ",
    ),
    (
        "checkpoint",
        "export of a variant the checkpoint lacks (fp8)",
        lambda e: refused(lambda: _export(e.ckpt, "fp8", e.data / "checkpoints" / "fp8-only")),
        "not 'fp8'",
    ),
    (
        "checkpoint",
        "foreign quant_method (gptq) refused by serve",
        lambda e: serve_refused(e, damaged_ckpt(e, "gptq", foreign_method)),
        "quant_method is 'gptq'",
    ),
    (
        "checkpoint",
        "truncated safetensors refused by serve",
        lambda e: serve_refused(e, damaged_ckpt(e, "trunc-serve", truncate_weights)),
        "truncated file",
    ),
    # API requests to the CPU server
    (
        "api",
        "over-long prompt (~24k tokens, context 4096)",
        lambda e: chat(e, messages=[{"role": "user", "content": "hello world " * 3000}]),
        "this model takes at most",
    ),
    ("api", "temperature 5", lambda e: chat(e, temperature=5), "temperature"),
    ("api", "top_p 0", lambda e: chat(e, top_p=0), "top_p"),
    ("api", "max_tokens 0", lambda e: chat(e, max_tokens=0), "max_tokens"),
    (
        "api",
        "max_tokens beyond the context",
        lambda e: chat(e, max_tokens=4096),
        "exceeds the model's context",
    ),
    ("api", "n = 2", lambda e: chat(e, n=2), "n: "),
    ("api", "no messages", lambda e: chat(e, messages=[]), "messages"),
    ("api", "unknown role 'tool'", lambda e: chat(e, messages=[{"role": "tool", "content": "x"}]), "role"),
    ("api", "unknown model name", lambda e: chat(e, status=404, model="gpt-9"), "is not served here"),
    (
        "api",
        "malformed JSON body",
        lambda e: http_error(
            "POST",
            e,
            "/v1/chat/completions",
            status=400,
            content=b'{"messages": [',
            headers={"content-type": "application/json"},
        ),
        "JSON",
    ),
    (
        "api",
        "100,000-deep JSON body",
        lambda e: http_error(
            "POST",
            e,
            "/v1/chat/completions",
            status=400,
            content=b"[" * 100_000 + b"]" * 100_000,
            headers={"content-type": "application/json"},
        ),
        "error parsing the body",
    ),
    (
        "api",
        "100,000-deep JSON to PUT /flexquant/policy",
        lambda e: http_error(
            "PUT",
            e,
            "/flexquant/policy",
            status=400,
            content=b'{"policy": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            headers={"content-type": "application/json"},
        ),
        "policy rejected",
    ),
    (
        "api",
        "malformed JSON to PUT /flexquant/policy",
        lambda e: http_error(
            "PUT",
            e,
            "/flexquant/policy",
            status=400,
            content=b"{oops",
            headers={"content-type": "application/json"},
        ),
        "policy rejected",
    ),
]


def _sparse(env: Env) -> Path:
    path = env.inputs / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(2**30)  # 1 GiB apparent size, no blocks written
    return path


def _export(merged: Path, variant: str, out: Path):
    from workbench.quant.export import export_variant

    return export_variant(merged, variant, out)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_source, chat_checkpoint, cpu_server, free_port):
    """The shared CPU server's data dir, with a registered model and a saved policy, and user files."""
    root = tmp_path_factory.mktemp("bad-input")
    e = Env(
        root=root,
        data=cpu_server.data,
        inputs=root / "inputs",
        outside=root / "outside",
        ckpt=root / "inputs" / "ckpt",
        base_url=cpu_server.handle.base_url,
        spare_port=free_port(),
    )
    e.inputs.mkdir()
    (e.outside / "model").mkdir(parents=True)
    shutil.copytree(tiny_source, e.inputs / "tiny")
    shutil.copytree(chat_checkpoint, e.ckpt)
    runner = CliRunner()
    base = ["--data-dir", str(e.data), "--allow-root", str(e.inputs)]
    for args in (
        ["init", "--no-model"],
        ["models", "add", "tiny", str(e.inputs / "tiny")],
        ["policy", "save", policy_file(e, "good", GOOD_POLICY)],
    ):
        result = runner.invoke(app, base + args)
        assert result.exit_code == 0, result.output
    return e


@pytest.mark.parametrize(
    "category, case, action, fragment", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_input_is_refused_clearly_and_changes_nothing(env, category, case, action, fragment, reliability):
    before = snapshot(env)
    policy_before = httpx.get(f"{env.base_url}/flexquant/policy", timeout=30).json()["policy"]
    with reliability.case("bad_input", case, category=category, fault="bad input") as row:
        message = action(env)
        row.detail = (
            message.replace(str(env.inputs), "<inputs>")
            .replace(str(env.outside), "<outside>")
            .replace(str(env.data), "<data>")
        )
        assert fragment in message, f"expected {fragment!r} in the message: {message!r}"
        after = snapshot(env)
        assert after == before, _diff(before, after)
        assert httpx.get(f"{env.base_url}/health", timeout=30).status_code == 200
        assert httpx.get(f"{env.base_url}/flexquant/policy", timeout=30).json()["policy"] == policy_before
    assert not Path("/tmp/flexquant-pwned").exists()


def _diff(before: dict, after: dict) -> str:
    changed = [t for t in before["tables"] if before["tables"][t] != after["tables"].get(t)]
    files = sorted(set(before["files"]) ^ set(after["files"])) + sorted(
        f for f in before["files"] if f in after["files"] and before["files"][f] != after["files"][f]
    )
    return f"state changed: tables {changed}, files {files[:10]}"


def test_bad_input_case_count(reliability):
    reliability.figure("bad_input", "cases", len(CASES))
    reliability.figure("bad_input", "categories", ", ".join(sorted({c[0] for c in CASES})))
    assert len(CASES) >= 30
