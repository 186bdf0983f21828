"""Security: dangerous calls in the source, path confinement, exposure of the app, and property-based
tests of the two parsers that take untrusted input (policies and checkpoint folders)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench.paths import PathNotAllowed, resolve_user_path
from workbench.policy import DecodeRule, LayerRule, Policy, PolicyError, StepInfo, decide, parse_policy
from workbench.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("storage", "jobs", "workbench", "scripts")
SOURCE_FILES = ("app.py",)

# Pattern -> why it is dangerous on user input. `(?<![.\w])` skips method calls such as
# `session.exec(select(...))` (SQLModel) and `model.eval()` (torch), which are not the builtins.
DANGEROUS = {
    "eval(": (re.compile(r"(?<![.\w])eval\("), "runs arbitrary code"),
    "exec(": (re.compile(r"(?<![.\w])exec\("), "runs arbitrary code"),
    "pickle": (re.compile(r"\bpickle\b|\bcloudpickle\b|\bdill\b"), "unpickling runs arbitrary code"),
    "torch.load": (re.compile(r"\btorch\.load\("), "unpickles (weights_only aside)"),
    "trust_remote_code=True": (re.compile(r"trust_remote_code\s*=\s*True"), "runs a model folder's code"),
    "yaml.load": (re.compile(r"\byaml\.(unsafe_)?load\("), "constructs arbitrary objects"),
    "shell=True": (re.compile(r"shell\s*=\s*True"), "shell injection"),
    "os.system": (re.compile(r"\bos\.system\("), "shell injection"),
}
# (file, pattern) -> the reason this hit is acceptable. Keep it short and justified.
ALLOWED = {
    ("workbench/models.py", "pickle"): "the refusal of pickle-only model folders (a message, no unpickling)",
}


def _source_files() -> list[Path]:
    files = [ROOT / f for f in SOURCE_FILES]
    for folder in SOURCE_DIRS:
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if f.is_file()]


def test_no_dangerous_calls_in_the_source(reliability):
    files = _source_files()
    hits, allowed_hits = [], []
    for file in files:
        rel = file.relative_to(ROOT).as_posix()
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("#"):
                continue
            for name, (pattern, why) in DANGEROUS.items():
                if pattern.search(line):
                    entry = f"{rel}:{number}: {name} ({why}): {line.strip()}"
                    (allowed_hits if (rel, name) in ALLOWED else hits).append(entry)
    with reliability.case(
        "security",
        "grep of the source for dangerous calls",
        fault=f"{len(DANGEROUS)} patterns over {len(files)} files",
    ) as row:
        row.detail = f"{len(hits)} unexplained hits, {len(allowed_hits)} allow-listed: " + "; ".join(
            f"{f} {p}: {why}" for (f, p), why in ALLOWED.items()
        )
        assert hits == [], "dangerous calls in the source:\n" + "\n".join(hits)
    assert len(files) > 50  # the walk found the project, not an empty folder


def test_model_loading_never_runs_code_from_a_model_folder(tmp_path, tiny_source, reliability):
    """A valid Llama folder that also carries remote code (`auto_map` + modeling_*.py) and a malicious
    pickle: registering it and loading it the way the quantize job does runs neither."""
    from transformers import AutoTokenizer

    from workbench.models import inspect_model_dir
    from workbench.quant.stages import _load

    folder, marker = tmp_path / "evil", tmp_path / "pwned"
    shutil.copytree(tiny_source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.Evil",
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'a').write('import ran\\n')\n")
    # A protocol-0 pickle that calls os.system when unpickled (never is: safetensors win, and .bin is
    # never loaded with pickle by the workbench).
    (folder / "pytorch_model.bin").write_bytes(f"cos\nsystem\n(S'echo pickle ran >> {marker}'\ntR.".encode())
    with reliability.case(
        "security",
        "valid Llama folder with remote code (auto_map) and a malicious pickle",
        fault="modeling_evil.py + pytorch_model.bin that write a marker file",
    ) as row:
        info = inspect_model_dir(folder)
        model = _load(folder)  # what the quantize job calls
        AutoTokenizer.from_pretrained(str(folder))
        row.detail = (
            f"registered as {info.architecture} ({info.weight_files}); loaded "
            f"{type(model).__name__} and its tokenizer; marker file written: {marker.exists()}"
        )
        assert not marker.exists()
        assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("kind", ["absolute outside", "dot-dot escape", "symlink escape", "symlinked root"])
def test_user_paths_are_confined_to_the_allowed_roots(tmp_path, kind, reliability):
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "models").mkdir(parents=True)
    outside.mkdir()
    settings = Settings(data_dir=data)
    if kind == "absolute outside":
        path = outside
    elif kind == "dot-dot escape":
        path = data / "models" / ".." / ".." / "outside"
    elif kind == "symlink escape":
        path = data / "models" / "link"
        path.symlink_to(outside)
    else:  # an allowed root reached through a link is still the same root: allowed
        link = tmp_path / "data-link"
        link.symlink_to(data)
        path = link / "models"
    with reliability.case("security", f"user path confinement: {kind}", fault=str(path)) as row:
        if kind == "symlinked root":
            assert resolve_user_path(path, settings=settings) == (data / "models").resolve()
            row.detail = "allowed (resolves inside the data dir)"
        else:
            with pytest.raises(PathNotAllowed, match="outside the folders the workbench may read") as err:
                resolve_user_path(path, settings=settings)
            row.detail = str(err.value)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXQUANT_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


APP_CASES = {
    # case -> (argv, extra env, expected exit code, text the output must hold). Each case is a real
    # `python app.py` (which imports Gradio before it checks, ~10 s on 2 cores), so only these two, at once.
    "app.py --host 0.0.0.0 without FLEXQUANT_USERNAME/PASSWORD": (
        ["app.py", "--host", "0.0.0.0"],
        {},
        2,
        "FLEXQUANT_PASSWORD",
    ),
    "app.py --share with a username but no password": (
        ["app.py", "--share"],
        {"FLEXQUANT_USERNAME": "admin"},
        2,
        "FLEXQUANT_PASSWORD",
    ),
}


def test_app_refuses_to_be_exposed_without_credentials(tmp_path, reliability):
    """`app.py` as a user runs it (each case its own process, all at once: each imports Gradio)."""
    procs = {}
    for i, (case, (argv, env, _, _)) in enumerate(APP_CASES.items()):
        extra = (
            ["--data-dir", str(tmp_path / f"data-{i}")]
            if argv[0] == "app.py" and "--help" not in argv
            else []
        )
        procs[case] = subprocess.Popen(
            [sys.executable, *argv, *extra],
            cwd=ROOT,
            env=_clean_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for case, proc in procs.items():
        _, _, code, needle = APP_CASES[case]
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        with reliability.case("security", case, fault="exposed bind" if code else "") as row:
            text = (out + err).strip()
            shown = next((line for line in text.splitlines() if needle in line), text.splitlines()[-1:])
            row.detail = f"exit {proc.returncode}: {shown}"
            assert proc.returncode == code and needle in text, text[-2000:]
    assert not any(
        (tmp_path / f"data-{i}").exists() for i in range(len(APP_CASES))
    )  # refused before any write


def test_servers_bind_loopback_by_default(monkeypatch, reliability):
    import ast

    from workbench.runtime.serve_config import ServeConfig

    monkeypatch.delenv("FLEXQUANT_HOST", raising=False)

    def host_default(rel: str) -> str:
        """The `default=` of the `--host` option in a module's argparse setup, as source text."""
        tree = ast.parse((ROOT / rel).read_text())
        return next(
            ast.unparse(kw.value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == "--host"
            for kw in node.keywords
            if kw.arg == "default"
        )

    with reliability.case("security", "default bind of the app, the model servers and settings") as row:
        found = {
            "Settings().host": Settings().host,
            "ServeConfig.host": ServeConfig.__dataclass_fields__["host"].default,
            "cpu_server --host": host_default("workbench/runtime/cpu_server.py").strip("'"),
            "app.py --host": host_default("workbench/ui/app.py"),
        }
        row.detail = ", ".join(f"{k} = {v}" for k, v in found.items())
        assert found["app.py --host"] == "defaults.host"  # the app's default is Settings().host
        assert {v for k, v in found.items() if k != "app.py --host"} == {"127.0.0.1"}


# --- property-based: the policy parser ------------------------------------------------------------
JSONISH = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=25,
)
VARIANT = st.sampled_from(["w8a8", "w4a16", "fp8", "W8A8", "", "x" * 40, "w 8"])
POLICYISH = st.fixed_dictionaries(
    {"name": st.one_of(st.just("p"), st.text(max_size=70)), "prefill": VARIANT},
    optional={
        "decode": st.lists(
            st.fixed_dictionaries(
                {"variant": VARIANT},
                optional={
                    "max_batch": st.one_of(st.integers(-5, 2**20), st.none(), st.text(max_size=3)),
                    "kernel": st.sampled_from(["marlin", "machete", "cutlass", None]),
                },
            ),
            max_size=5,
        ),
        "layers": st.lists(
            st.fixed_dictionaries(
                {"first": st.integers(-3, 5000), "last": st.integers(-3, 5000), "variant": VARIANT}
            ),
            max_size=4,
        ),
        "extra": JSONISH,
    },
)


def _parse_or_policy_error(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyError:
        pass  # the only exception a caller has to expect


EXAMPLES = 300
PROPERTY = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


# Deep nesting in flow and block style; past ~1000 levels PyYAML's recursive composer overflowed
# before the fix (the 30,000-level case near the 64 KiB limit is a bad-input case).
DEEP = st.builds(
    lambda n, form: form[0] * n + form[1] + form[2] * n,
    st.integers(9, 2_500),
    st.sampled_from([("[", "", "]"), ("{a: ", "1", "}"), ("- ", "x", ""), ("a: [", "", "]")]),
)


@PROPERTY
@given(st.one_of(st.text(max_size=400), DEEP))
def _text_never_raises_but_policy_error(text):
    _parse_or_policy_error(text)


@PROPERTY
@given(st.one_of(JSONISH, POLICYISH), st.sampled_from(["yaml", "json", "yaml-flow"]))
def _structures_never_raise_but_policy_error(data, form):
    if form == "json":
        text = json.dumps(data)
    else:
        text = yaml.safe_dump(data, default_flow_style=form == "yaml-flow", allow_unicode=True)
    _parse_or_policy_error(text)


@st.composite
def valid_policies(draw) -> Policy:
    variants = st.sampled_from(["w8a8", "w4a16", "fp8"])
    bounds = sorted(draw(st.sets(st.integers(1, 1 << 16), max_size=4)))
    decode = [DecodeRule(max_batch=b, variant=draw(variants)) for b in bounds] + [
        DecodeRule(variant=draw(variants))
    ]
    cuts = sorted(draw(st.sets(st.integers(0, 4096), max_size=6)))
    layers = [
        LayerRule(first=a, last=b, variant=draw(variants))
        for a, b in zip(cuts[::2], cuts[1::2], strict=False)
    ]
    return Policy(name="fuzz", prefill=draw(variants), decode=decode, layers=layers)


@PROPERTY
@given(valid_policies(), st.integers(0, 1 << 20), st.integers(0, 1 << 20), st.none() | st.integers(0, 5000))
def _decide_is_total(policy, prefill, decode, layer):
    step = StepInfo(num_prefill_tokens=prefill, num_decode_reqs=decode, layer=layer)
    variant = decide(policy, step)
    assert variant in policy.variants and variant == decide(policy, step)
    pinned = [r for r in policy.layers if layer is not None and r.first <= layer <= r.last]
    if pinned:
        assert variant == pinned[0].variant
    elif prefill > 0:
        assert variant == policy.prefill
    else:
        bound = next(r for r in policy.decode if r.max_batch is None or decode <= r.max_batch)
        assert variant == bound.variant
    # the text form parses back to a policy that decides the same
    assert decide(parse_policy(json.dumps(policy.model_dump(exclude_none=True))), step) == variant


@pytest.mark.parametrize(
    "case, prop",
    [
        ("parse_policy on arbitrary text: only PolicyError", _text_never_raises_but_policy_error),
        (
            "parse_policy on arbitrary YAML/JSON structures and near-policies: only PolicyError",
            _structures_never_raise_but_policy_error,
        ),
        ("decide() on valid policies: total, deterministic, rules honoured", _decide_is_total),
    ],
    ids=["text", "structures", "decide"],
)
def test_policy_properties(case, prop, reliability):
    with reliability.case("security", f"hypothesis: {case}", fault=f"{EXAMPLES} generated inputs") as row:
        prop()
        row.detail = "property held on every generated input"


# --- property-based: the checkpoint validator -----------------------------------------------------
@pytest.fixture(scope="module")
def pristine_checkpoint(chat_checkpoint) -> Path:
    return chat_checkpoint


def _corrupt(folder: Path, data: st.DataObject) -> str:
    """Apply one random corruption to one file of `folder`; returns the corrupted file's name."""
    from workbench import ckpt_format as fmt

    names = sorted(p.name for p in folder.iterdir())
    name = data.draw(st.sampled_from(names), label="file")
    path = folder / name
    raw = path.read_bytes()
    ops = ["truncate", "delete", "flip", "garbage-json"]
    if name == "config.json":
        ops.append("mutate-field")
    if name == fmt.MANIFEST_NAME:
        ops = ["truncate", "delete", "garbage-json"]  # the manifest does not hash itself
    op = data.draw(st.sampled_from(ops), label="op")
    if op == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="keep")])
    elif op == "delete":
        path.unlink()
    elif op == "flip":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        width = data.draw(st.integers(1, 16), label="width")
        junk = data.draw(st.binary(min_size=width, max_size=width), label="junk")
        new = raw[:at] + junk + raw[at + width :]
        if new == raw:  # the junk happened to equal the bytes it replaced
            new = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
        path.write_bytes(new)
    elif op == "garbage-json":
        value = data.draw(JSONISH.filter(lambda v: not isinstance(v, dict) or "files" not in v), label="json")
        path.write_text(json.dumps(value))
    else:  # replace one field of the real config with a random JSON value
        config = json.loads(raw)
        key = data.draw(st.sampled_from(sorted(config)), label="key")
        config[key] = data.draw(JSONISH.filter(lambda v: v != config[key]), label="value")
        path.write_text(json.dumps(config))
    return f"{name} ({op})"


def test_check_checkpoint_on_corrupted_copies_never_crashes_and_names_the_file(
    pristine_checkpoint, reliability
):
    from workbench.quant.check import check_checkpoint

    seen: dict[str, int] = {}

    @settings(
        max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(data=st.data())
    def prop(data):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "ckpt"
            shutil.copytree(pristine_checkpoint, folder)
            what = _corrupt(folder, data)
            name = what.split(" ")[0]
            report = check_checkpoint(folder)  # must not raise, whatever the bytes
            assert not report.ok, f"corruption {what} not detected"
            assert any(name in problem for problem in report.problems), (what, report.problems)
        op = what.split("(")[1].rstrip(")")
        seen[op] = seen.get(op, 0) + 1

    with reliability.case(
        "security",
        "hypothesis: check_checkpoint on randomly corrupted checkpoints",
        fault=f"{EXAMPLES} corrupted copies",
    ) as row:
        assert check_checkpoint(pristine_checkpoint).ok  # the pristine one passes
        prop()
        row.detail = "never raised; every report named the corrupted file; corruptions: " + ", ".join(
            f"{op} {n}" for op, n in sorted(seen.items())
        )
