"""Text for calibration and evaluation: built-in corpora that need no download, and user files.

Defaults come from the gensim wheel's Lee news corpus (read by path: importing gensim is slow and
pulls scipy): 300 background documents for calibration and the 50 held-out `lee.cor` documents
for evaluation, so calibration never sees the evaluation text. Where gensim is absent we fall back
to Python's own documentation text (`pydoc_data.topics`), split the same disjoint way.

User files: `.txt` (documents separated by blank lines) or `.jsonl` (one `{"text": ...}` per line).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CALIBRATION_NAME",
    "DEFAULT_EVAL_NAME",
    "MAX_TEXT_FILE_BYTES",
    "TextDataError",
    "calibration_texts",
    "dataset_name",
    "eval_texts",
    "lee_corpus_dir",
    "read_text_file",
]

DEFAULT_CALIBRATION_NAME = "lee-background"
DEFAULT_EVAL_NAME = "lee-eval"
FALLBACK_CALIBRATION_NAME = "pydoc-topics-calib"
FALLBACK_EVAL_NAME = "pydoc-topics-eval"
MAX_TEXT_FILE_BYTES = 64 * 1024 * 1024


class TextDataError(ValueError):
    """A text file that cannot be used; the message names the file (and line) and the fix."""


def lee_corpus_dir() -> Path | None:
    """The gensim wheel's test_data folder holding the Lee corpus, or None if gensim is absent."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if not (folder / "lee_background.cor").is_file() or not (folder / "lee.cor").is_file():
        return None
    return folder


def _lee_docs(file_name: str) -> list[str]:
    folder = lee_corpus_dir()
    assert folder is not None
    # The corpus is Latin-1 with one document per line.
    lines = (folder / file_name).read_text(encoding="latin-1").splitlines()
    return [line.strip() for line in lines if line.strip()]


def _pydoc_docs(purpose: str) -> list[str]:
    from pydoc_data.topics import topics

    # Several keys share one text (e.g. operator names); dict.fromkeys dedupes and keeps the order.
    docs = list(dict.fromkeys(topics[key].strip() for key in sorted(topics) if topics[key].strip()))
    # Every 6th topic is held out for evaluation so the two sets never overlap.
    if purpose == "eval":
        return [d for i, d in enumerate(docs) if i % 6 == 5]
    return [d for i, d in enumerate(docs) if i % 6 != 5]


def _decode(data: bytes, path: Path) -> str:
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise TextDataError(
            f"{path} line {line}: contains NUL bytes, so it looks binary; give a UTF-8 text file"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TextDataError(
            f"{path} line {line}: byte {data[exc.start]:#04x} is not UTF-8; save the file as UTF-8 text"
        ) from None


def _parse_jsonl(text: str, path: Path) -> list[str]:
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextDataError(f"{path} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise TextDataError(f'{path} line {number}: expected an object with a "text" field')
        if not isinstance(record["text"], str):
            raise TextDataError(f'{path} line {number}: "text" must be a string')
        if record["text"].strip():
            docs.append(record["text"].strip())
    return docs


def _parse_txt(text: str) -> list[str]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line.rstrip())
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def read_text_file(path: Path) -> list[str]:
    """Documents of a user `.txt` or `.jsonl` file; `TextDataError` naming the file and line if unusable."""
    path = Path(path)
    if not path.exists():
        raise TextDataError(f"{path} does not exist")
    if not path.is_file():
        raise TextDataError(f"{path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise TextDataError(
            f"{path}: unsupported file type {suffix or '(none)'}; use .txt (documents separated by blank "
            'lines) or .jsonl (one {"text": ...} object per line)'
        )
    size = path.stat().st_size
    if size > MAX_TEXT_FILE_BYTES:
        raise TextDataError(
            f"{path} is {size / 2**20:.1f} MiB; the limit is {MAX_TEXT_FILE_BYTES // 2**20} MiB "
            "(a few hundred documents are plenty for calibration or evaluation)"
        )
    text = _decode(path.read_bytes(), path)
    docs = _parse_jsonl(text, path) if suffix == ".jsonl" else _parse_txt(text)
    if not docs:
        raise TextDataError(f"{path} holds no text; add at least one document")
    return docs


def calibration_texts(path: Path | None = None, num_samples: int = 64) -> list[str]:
    """Up to `num_samples` calibration documents from `path`, or the built-in calibration corpus."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if path is not None:
        docs = read_text_file(path)
    elif lee_corpus_dir() is not None:
        docs = _lee_docs("lee_background.cor")
    else:
        log.warning("gensim is not installed; calibrating on Python documentation text instead")
        docs = _pydoc_docs("calibration")
    if len(docs) < num_samples:
        log.info("asked for %d calibration samples, %d documents available", num_samples, len(docs))
    return docs[:num_samples]


def eval_texts(path: Path | None = None, max_docs: int = 50) -> list[str]:
    """Up to `max_docs` evaluation documents from `path`, or the built-in held-out corpus."""
    if max_docs < 1:
        raise ValueError(f"max_docs must be at least 1, got {max_docs}")
    if path is not None:
        docs = read_text_file(path)
    elif lee_corpus_dir() is not None:
        docs = _lee_docs("lee.cor")
    else:
        log.warning("gensim is not installed; evaluating on Python documentation text instead")
        docs = _pydoc_docs("eval")
    return docs[:max_docs]


def dataset_name(path: Path | None, *, purpose: str) -> str:
    """The name to record for this text (EvalResult.dataset, manifests): file name or built-in name."""
    if path is not None:
        return Path(path).name
    if lee_corpus_dir() is not None:
        return DEFAULT_EVAL_NAME if purpose == "eval" else DEFAULT_CALIBRATION_NAME
    return FALLBACK_EVAL_NAME if purpose == "eval" else FALLBACK_CALIBRATION_NAME
