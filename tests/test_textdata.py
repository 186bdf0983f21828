"""Built-in text (Lee corpus, pydoc fallback) and user text files with their error messages."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from workbench import textdata
from workbench.textdata import (
    DEFAULT_CALIBRATION_NAME,
    DEFAULT_EVAL_NAME,
    TextDataError,
    calibration_texts,
    dataset_name,
    eval_texts,
    read_text_file,
)


def lee_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name


def test_defaults_are_the_lee_corpus_and_disjoint() -> None:
    calib = calibration_texts(num_samples=1000)
    evals = eval_texts(max_docs=1000)
    background = lee_file("lee_background.cor").read_text(encoding="latin-1").splitlines()
    held_out = lee_file("lee.cor").read_text(encoding="latin-1").splitlines()
    assert calib == [line.strip() for line in background if line.strip()]
    assert evals == [line.strip() for line in held_out if line.strip()]
    assert (len(calib), len(evals)) == (300, 50)
    assert not set(calib) & set(evals)
    assert calibration_texts(num_samples=8) == calib[:8]
    assert eval_texts(max_docs=5) == evals[:5]
    assert dataset_name(None, purpose="calibration") == DEFAULT_CALIBRATION_NAME
    assert dataset_name(None, purpose="eval") == DEFAULT_EVAL_NAME


def test_pydoc_fallback_without_gensim(monkeypatch) -> None:
    monkeypatch.setattr(textdata, "lee_corpus_dir", lambda: None)
    calib = calibration_texts(num_samples=10_000)
    evals = eval_texts(max_docs=10_000)
    assert len(calib) > 20 and len(evals) > 5
    assert not set(calib) & set(evals)
    assert sum(len(d.split()) for d in evals) > 2000  # enough text for a perplexity number
    assert dataset_name(None, purpose="eval") != DEFAULT_EVAL_NAME


def test_txt_and_jsonl_files(tmp_path: Path) -> None:
    txt = tmp_path / "docs.txt"
    txt.write_text("first doc\nstill first\n\n\nsecond doc\n  \nthird é\n", encoding="utf-8")
    assert read_text_file(txt) == ["first doc\nstill first", "second doc", "third é"]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(["a b", "c"])) + "\n\n")
    assert read_text_file(jsonl) == ["a b", "c"]
    assert calibration_texts(jsonl, num_samples=1) == ["a b"]
    assert eval_texts(txt) == read_text_file(txt)
    assert dataset_name(jsonl, purpose="eval") == "docs.jsonl"


@pytest.mark.parametrize(
    "name,content,pattern",
    [
        ("empty.txt", b"\n\n  \n", r"empty\.txt holds no text"),
        ("bin.txt", b"hello\nwor\x00ld", r"bin\.txt line 2: contains NUL bytes"),
        ("latin.txt", b"ok\ncaf\xe9\n", r"latin\.txt line 2: byte 0xe9 is not UTF-8"),
        ("nofield.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"nofield\.jsonl line 2: expected an object"),
        ("badjson.jsonl", b'{"text": "a"}\n\n{oops\n', r"badjson\.jsonl line 3: not valid JSON"),
        ("nonstr.jsonl", b'{"text": 5}\n', r'nonstr\.jsonl line 1: "text" must be a string'),
        ("data.csv", b"a,b\n", r"data\.csv: unsupported file type \.csv"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TextDataError, match=pattern):
        read_text_file(path)


def test_missing_and_too_large(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(TextDataError, match="does not exist"):
        calibration_texts(tmp_path / "missing.txt")
    with pytest.raises(TextDataError, match="is not a file"):
        read_text_file(tmp_path)
    big = tmp_path / "big.txt"
    big.write_text("word " * 300)
    monkeypatch.setattr(textdata, "MAX_TEXT_FILE_BYTES", 1024)
    with pytest.raises(TextDataError, match=r"big\.txt is .* MiB; the limit"):
        read_text_file(big)


def test_sample_counts_are_validated() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        calibration_texts(num_samples=0)
    with pytest.raises(ValueError, match="max_docs"):
        eval_texts(max_docs=0)
