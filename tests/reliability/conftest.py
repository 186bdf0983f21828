"""Reliability suite plumbing: a session recorder whose figures become `docs/reliability.md`.

Every test of this folder records what it did through the `reliability` fixture: the fault it
injected, what survived, the error message a bad input got, measured numbers. At the end of the
session the recorder writes the report from those records (temp file, then rename), so every figure
in the document was produced by this run. A partial run (some reliability tests deselected or not
collected) writes its report next to the temp dir instead, so it never overwrites the full one.
Shared fixtures: a tiny chat-capable merged checkpoint and a free loopback port.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
REPORT_PATH = ROOT / "docs" / "reliability.md"
TEST_FILES = sorted(p.name for p in HERE.glob("test_*.py"))

SECTIONS = {
    "faults": "1. Faults: killed processes and a full disk",
    "concurrency": "2. Concurrency: many submitters, one UI-like poller",
    "bad_input": "3. Bad input: each case, its message, and nothing changed",
    "security": "4. Security",
    "load": "5. Load: the CPU reference runtime under concurrent streaming chats",
}
# How each section's cases are produced (method, not results: the results are the rows below it).
METHODS = {
    "faults": "Six workers each take a real `quantize` job (tiny random Llama, W8A8+W4A16) and are held at "
    "one stage by `tests/reliability/stage_hold.py` (a hook in the job's progress reporting) until the "
    "Job row shows it; then the worker's process group gets SIGKILL. A fresh worker recovers and runs "
    "everything; the checks use the DB file, the data dir and a separate process. The CPU server is "
    "killed the same way mid-stream; the full disk is a 64 KiB tmpfs.",
    "concurrency": "Separate processes: 4 submitters (released together), 2 workers, 1 poller reading "
    "what the UI's jobs tab reads, all on one SQLite file.",
    "bad_input": "Through the `flexquant` CLI (in process), the library calls the UI makes, and HTTP to a "
    "running CPU server. Before/after each case: every table's rows (hashed) and every file of the "
    "data dir must be identical, and the server healthy with its policy unchanged.",
    "security": "Source grep with an allow-list, path confinement, `app.py` run as a user runs it, and "
    "hypothesis property tests of the two parsers of untrusted input.",
    "load": "16 closed-loop users stream chats from a tiny random merged checkpoint on loopback; the "
    "server's RSS is sampled every second; TTFT is measured by the client.",
}
# A simple Jinja chat template for the tiny test tokenizer (the CPU server needs one).
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@dataclass
class Row:
    """One recorded case: what was tried, whether the system held, and what it said."""

    section: str
    case: str
    ok: bool = True
    fault: str = ""  # the fault injected ("" for a plain check)
    detail: str = ""  # what was observed (numbers, the message a user saw)
    category: str = ""


@dataclass
class Recorder:
    """Collects rows, figures and test outcomes during the session; renders the report at the end."""

    rows: list[Row] = field(default_factory=list)
    figures: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    deselected: int = 0
    started: float = field(default_factory=time.time)

    @contextlib.contextmanager
    def case(self, section: str, case: str, *, fault: str = "", category: str = "") -> Iterator[Row]:
        """Record one case: ok if the block completes, not ok (with the error) if it raises."""
        row = Row(section, case, fault=fault, category=category)
        try:
            yield row
        except BaseException as exc:
            row.ok = False
            row.detail = (row.detail + " | " if row.detail else "") + f"{type(exc).__name__}: {exc}"[:400]
            raise
        finally:
            self.rows.append(row)

    def figure(self, section: str, name: str, value: object) -> None:
        """A measured number (or short fact) shown in the section's figure list."""
        self.figures.setdefault(section, []).append((name, str(value)))

    # --- report -----------------------------------------------------------------------------------
    def complete(self) -> bool:
        ran_files = {nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid in self.outcomes}
        return self.deselected == 0 and set(TEST_FILES) <= ran_files

    def render(self) -> str:
        elapsed = time.time() - self.started
        passed = sum(1 for o in self.outcomes.values() if o == "passed")
        lines = [
            "# Reliability and security report",
            "",
            "Generated by the test suite (`tests/reliability/conftest.py`) - do not edit by hand; rerun",
            "`.venv/bin/python -m pytest tests/reliability` to refresh it. Every figure below was measured",
            "by that run.",
            "",
            f"- generated: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
            f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
            f"- tests: {len(self.outcomes)} run, {passed} passed, "
            f"{sum(1 for o in self.outcomes.values() if o == 'failed')} failed, "
            f"{sum(1 for o in self.outcomes.values() if o == 'skipped')} skipped; wall time {elapsed:.0f} s",
            "",
            "## Summary",
            "",
            "| area | cases tried | faults injected | held | did not hold |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, title in SECTIONS.items():
            rows = [r for r in self.rows if r.section == key]
            faults = sum(1 for r in rows if r.fault)
            held = sum(1 for r in rows if r.ok)
            lines.append(f"| {title.split(':')[0]} | {len(rows)} | {faults} | {held} | {len(rows) - held} |")
        for key, title in SECTIONS.items():
            lines += ["", f"## {title}", "", METHODS[key], ""]
            rows = [r for r in self.rows if r.section == key]
            if key == "bad_input" and rows:
                lines += [
                    "| # | category | input | error message the user gets | held |",
                    "|---:|---|---|---|---|",
                ]
                for i, r in enumerate(rows, 1):
                    lines.append(
                        f"| {i} | {r.category} | {_cell(r.case)} | {_cell(r.detail)} | {_mark(r.ok)} |"
                    )
            elif rows:
                lines += ["| case | fault injected | observed | held |", "|---|---|---|---|"]
                for r in rows:
                    lines.append(
                        f"| {_cell(r.case)} | {_cell(r.fault) or '-'} | {_cell(r.detail)} | {_mark(r.ok)} |"
                    )
            if self.figures.get(key):
                lines += ["", "| figure | value |", "|---|---|"]
                lines += [f"| {_cell(name)} | {_cell(value)} |" for name, value in self.figures[key]]
            if not rows and not self.figures.get(key):
                lines.append("_no case of this section ran_")
        lines += ["", "## Test outcomes", ""]
        lines += [f"- `{nodeid}`: {outcome}" for nodeid, outcome in sorted(self.outcomes.items())]
        return "\n".join(lines) + "\n"

    def write(self) -> Path:
        """Write the report atomically: docs/reliability.md for a full run, a temp file otherwise."""
        target = REPORT_PATH if self.complete() else Path(tempfile.gettempdir()) / "reliability-partial.md"
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".reliability-", suffix=".md", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            f.write(self.render())
        os.replace(tmp, target)
        return target


_TMP_ROOT = re.compile(re.escape(tempfile.gettempdir()) + r"/pytest-of-[^/]+/pytest-\d+/")


def _cell(text: object) -> str:
    # One table cell: no line breaks or pipes, pytest's temp root shortened, bounded length.
    value = _TMP_ROOT.sub("<tmp>/", " ".join(str(text).split())).replace("|", "\\|")
    return value if len(value) <= 300 else value[:297] + "..."


def _mark(ok: bool) -> str:
    return "yes" if ok else "**NO**"


RECORDER = Recorder()


def _ours(nodeid: str) -> bool:
    return nodeid.startswith("tests/reliability/")


def pytest_deselected(items) -> None:  # noqa: ANN001 - pytest hook
    RECORDER.deselected += sum(1 for item in items if _ours(item.nodeid))


def pytest_runtest_logreport(report) -> None:  # noqa: ANN001 - pytest hook
    if not _ours(report.nodeid):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        RECORDER.outcomes[report.nodeid] = report.outcome
    elif report.when == "teardown" and report.outcome == "failed":
        RECORDER.outcomes[report.nodeid] = "failed"


def pytest_sessionfinish(session, exitstatus) -> None:  # noqa: ANN001 - pytest hook
    if not RECORDER.outcomes:
        return
    path = RECORDER.write()
    sys.stderr.write(f"\nreliability report written to {path}\n")


@pytest.fixture(scope="session")
def reliability() -> Recorder:
    """The session recorder (see `Recorder.case` and `Recorder.figure`)."""
    return RECORDER


def free_port() -> int:
    """A TCP port nothing listens on now (loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session", name="free_port")
def free_port_fixture():
    """`free_port` as a fixture (test modules cannot import conftest without a second recorder)."""
    return free_port


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory) -> Path:
    """A tiny random merged W8A8+W4A16 checkpoint (tiny-llama shapes) with a BPE tokenizer and a chat
    template: what the CPU server needs to answer chats, in milliseconds per token."""
    from transformers import AutoTokenizer

    from workbench.quant.shapes import write_tiny_tokenizer
    from workbench.quant.synthetic import make_synthetic_checkpoint

    root = tmp_path_factory.mktemp("chat-ckpt")
    tok_dir = write_tiny_tokenizer(root / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(tok_dir))
    return make_synthetic_checkpoint(root / "tiny-chat", tokenizer_dir=tok_dir)


@pytest.fixture(scope="session")
def tiny_source(tmp_path_factory) -> Path:
    """A tiny random bf16 Llama HF folder with a real tiny tokenizer (the quantize input)."""
    from workbench.quant.shapes import make_tiny_source_model

    return make_tiny_source_model(tmp_path_factory.mktemp("source") / "tiny")


@dataclass
class SharedServer:
    """The CPU reference server the bad-input and load tests share (one start-up, ~15 s, not two)."""

    handle: object  # workbench.runtime.serve.ServerHandle
    data: Path  # its data dir (DB, logs)


@pytest.fixture(scope="session")
def cpu_server(tmp_path_factory, chat_checkpoint) -> Iterator[SharedServer]:
    """A CPU server on loopback serving `chat_checkpoint` with the default policy, its DB in a fresh
    data dir. Tests must leave its policy as they found it."""
    from storage.db import open_db
    from workbench.policy import DEFAULT_POLICY
    from workbench.runtime.serve import start_server
    from workbench.runtime.serve_config import ServeConfig
    from workbench.settings import Settings

    data = tmp_path_factory.mktemp("served") / "data"
    settings = Settings(data_dir=data)
    settings.ensure_dirs()
    engine = open_db(settings.db_path)
    cfg = ServeConfig(
        checkpoint=chat_checkpoint, policy=DEFAULT_POLICY, port=free_port(), host="127.0.0.1", cpu_threads=1
    )
    handle = start_server(cfg, engine=engine, settings=settings)
    try:
        handle.wait_healthy(300)
        yield SharedServer(handle=handle, data=data)
    finally:
        handle.stop()
        engine.dispose()
