"""Reading a checkpoint folder without loading its tensors: weight files, safetensors headers, hashes.

The checker, merge and export, the synthetic checkpoints and the bench's weight-byte count find
tensors through these helpers; `hash_file` makes the per-file records that a manifest stores and
the checker compares.
Standard library only (no torch), so light modules may import it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "hash_file",
    "hash_files",
    "read_safetensors_header",
    "tensor_index",
    "weight_files",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_HASH_CHUNK = 16 * 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else `model.safetensors`."""
    folder = Path(folder)
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_NAME).is_file():
        return [folder / SINGLE_NAME]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    return found


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """(header dict without `__metadata__`, offset where tensor data starts); ValueError if unreadable."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name}: file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path.name}: header length {header_len} does not fit the {size}-byte file")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path.name}: safetensors header is not valid JSON ({exc})") from None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    for key, entry in header.items():
        end = data_start + entry["data_offsets"][1]
        if end > size:
            raise ValueError(
                f"{path.name}: tensor {key} ends at byte {end} but the file has {size} bytes (truncated file)"
            )
    return header, data_start


def tensor_index(folder: Path) -> dict[str, Path]:
    """Map every tensor key of a checkpoint folder to the file that holds it (reads headers only)."""
    index: dict[str, Path] = {}
    for path in weight_files(folder):
        header, _ = read_safetensors_header(path)
        for key in header:
            index[key] = path
    return index


def _feed(f, limit: int | None, *hashers) -> int:
    """Read up to `limit` bytes (None: to the end) into every hasher; returns bytes read."""
    done = 0
    while limit is None or done < limit:
        chunk = f.read(_HASH_CHUNK if limit is None else min(_HASH_CHUNK, limit - done))
        if not chunk:
            break
        for h in hashers:
            h.update(chunk)
        done += len(chunk)
    return done


def hash_file(path: Path) -> dict:
    """{"size", "sha256"} of a file, plus per-tensor digests for a safetensors file.

    The per-tensor digests let the checker name the tensor whose bytes changed, not only the file;
    they are computed in the same single read as the file hash.
    """
    path = Path(path)
    file_hash = hashlib.sha256()
    record: dict = {"size": path.stat().st_size}
    spans: list[tuple[int, int, str]] = []
    if path.suffix == ".safetensors":
        header, start = read_safetensors_header(path)
        spans = sorted(
            (start + e["data_offsets"][0], start + e["data_offsets"][1], k) for k, e in header.items()
        )
    tensors: dict[str, str] = {}
    with open(path, "rb") as f:
        pos = 0
        for begin, end, key in spans:
            pos += _feed(f, begin - pos, file_hash)  # header or padding before this tensor
            tensor_hash = hashlib.blake2b(digest_size=8)
            pos += _feed(f, end - begin, file_hash, tensor_hash)
            tensors[key] = tensor_hash.hexdigest()
        _feed(f, None, file_hash)
    record["sha256"] = file_hash.hexdigest()
    if spans:
        record["tensors"] = tensors
    return record


def hash_files(paths: Iterable[Path], *, max_workers: int | None = None) -> dict[str, dict]:
    """`hash_file` of each path, keyed by file name, hashed in parallel threads."""
    paths = list(paths)
    workers = min(len(paths), max_workers or os.cpu_count() or 1)
    if workers <= 1:
        return {p.name: hash_file(p) for p in paths}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hash") as pool:
        return dict(zip((p.name for p in paths), pool.map(hash_file, paths), strict=True))
