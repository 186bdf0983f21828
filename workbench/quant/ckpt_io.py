"""Writing checkpoint folders: atomic publish, sharded safetensors, manifest, tokenizer files.

Every checkpoint QuantFactory publishes (merged, exported single-variant, synthetic) goes through
these helpers, so all of them are atomic, sharded the same way and carry the same kind of manifest.
Reading a folder back (weight files, safetensors headers, file hashes) is `ckpt_read`'s job.
Hashing for the manifest (`ckpt_read.hash_file`: sha256 + a per-tensor digest, about 2 ns a byte on
one core) is the slow part of writing a big checkpoint; hashlib releases the GIL, so `write_manifest`
hashes files in parallel threads, and a `ShardWriter` given an executor hashes each shard in the
background right after writing it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from concurrent.futures import Executor, Future
from pathlib import Path

import torch
from safetensors.torch import save_file

from workbench import ckpt_format as fmt
from workbench.quant.ckpt_read import INDEX_NAME, SINGLE_NAME, hash_file, hash_files

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "ShardWriter",
    "copy_tokenizer_files",
    "natural_key",
    "publishing",
    "remove_stale_temp_dirs",
    "tool_versions",
    "write_manifest",
]

# HF-style sharding: big models are split so no single file is unwieldy to copy or mmap.
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# Shards of one writer being saved in the background at once: bounds memory to (1 + this) shards.
_MAX_PENDING_SHARDS = 2


def natural_key(key: str) -> list:
    """Sort key putting `layers.2` before `layers.10`."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


@contextlib.contextmanager
def publishing(out_dir: Path) -> Iterator[Path]:
    """Yield a temp folder next to `out_dir`; rename it to `out_dir` only if the block succeeds.

    Same parent folder, so the rename is atomic: readers see no checkpoint or a complete one.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; pick another checkpoint name or delete that folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir.parent)
    owner = f"{socket.gethostname()}-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{owner}-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():  # someone published the same name while we were writing
            raise FileExistsError(f"{out_dir} appeared while writing it; not overwriting it")
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temp_dirs(folder: Path) -> list[Path]:
    """Delete temp folders that `publishing` left in `folder` when its process was killed (SIGKILL,
    OOM, power loss: its `finally` never ran). Only folders of dead processes on this host go; a
    publish in progress (live pid) or another host's (shared data dir) is never touched."""
    removed = []
    host = socket.gethostname()
    for path in Path(folder).glob(".*.tmp-*"):
        match = re.search(r"\.tmp-(.+)-(\d+)-[^-]+$", path.name)
        if not match or match.group(1) != host or not path.is_dir():
            continue
        pid = int(match.group(2))
        try:
            os.kill(pid, 0)
            continue  # alive (or not ours to signal): still publishing
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class ShardWriter:
    """Streams tensors into `model-0000i-of-0000N.safetensors` shards of at most `max_shard_bytes`.

    Only the current shard is held in memory, which is what lets an 8B checkpoint be written
    layer by layer on a small machine. One shard -> `model.safetensors` and no index.
    With an `executor`, full shards are saved and hashed there while the caller keeps adding
    tensors (at most `_MAX_PENDING_SHARDS` per writer wait in memory); after `finish()`,
    `file_records` holds their `hash_file` records for `write_manifest(..., known=...)`.
    Tensors handed to `add` must not be modified afterwards (a background save may read them).
    """

    def __init__(self, folder: Path, *, max_shard_bytes: int | None = None, executor: Executor | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        self._current: dict[str, torch.Tensor] = {}
        self._current_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self._executor = executor
        self._pending: list[tuple[int, Future]] = []
        self._records: dict[int, dict] = {}  # shard index -> hash record
        self.file_records: dict[str, dict] = {}

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.nbytes
        if self._current and self._current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if key in self._current or any(key in shard for shard in self._shards[-1:]):
            raise ValueError(f"tensor {key} written twice")
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.untyped_storage().nbytes() != nbytes:
            tensor = tensor.clone()  # a view into a bigger buffer: safetensors would refuse (or bloat) it
        self._current[key] = tensor
        self._current_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Close the current shard now (with an executor: start saving it), e.g. so that the last
        shards of several writers are saved in parallel before `finish()` waits for each."""
        if self._current:
            self._flush()

    def _flush(self) -> None:
        index = len(self._shards)
        path = self.folder / f".shard-{index:05d}.safetensors"
        tensors, self._current, self._current_bytes = self._current, {}, 0
        self._shards.append(list(tensors))
        if self._executor is None:
            _save_shard(tensors, path)
            return
        self._wait_pending(_MAX_PENDING_SHARDS - 1)
        self._pending.append((index, self._executor.submit(_save_and_hash_shard, tensors, path)))

    def _wait_pending(self, keep: int) -> None:
        """Wait for the oldest background saves until at most `keep` remain; re-raises their errors."""
        while len(self._pending) > keep:
            index, future = self._pending.pop(0)
            self._records[index] = future.result()

    def finish(self) -> list[str]:
        """Write the last shard, give the shards their final names (+ index); returns file names."""
        if self._current or not self._shards:
            self._flush()
        self._wait_pending(0)
        count = len(self._shards)
        if count == 1:
            os.replace(self.folder / ".shard-00000.safetensors", self.folder / SINGLE_NAME)
            self._name_records([SINGLE_NAME])
            return [SINGLE_NAME]
        names, weight_map = [], {}
        for i, keys in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f".shard-{i:05d}.safetensors", self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))
        self._name_records(names)
        return [*names, INDEX_NAME]

    def _name_records(self, names: list[str]) -> None:
        self.file_records = {names[i]: record for i, record in self._records.items()}


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})


def _save_and_hash_shard(tensors: dict[str, torch.Tensor], path: Path) -> dict:
    _save_shard(tensors, path)
    return hash_file(path)  # the file was just written: it is read back from the page cache


def write_manifest(folder: Path, info: dict, *, known: dict[str, dict] | None = None) -> dict:
    """Write `flexquant_manifest.json`: `info` plus size/sha256 of every other file in `folder`.

    `known` maps file names to records `hash_file` already made (e.g. `ShardWriter.file_records`);
    a known file whose size still matches is not read again, the others are hashed in parallel.
    """
    folder = Path(folder)
    known = known or {}
    paths = [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != fmt.MANIFEST_NAME and not p.name.startswith(".")
    ]
    reused = {p.name: known[p.name] for p in paths if known.get(p.name, {}).get("size") == p.stat().st_size}
    hashed = hash_files(p for p in paths if p.name not in reused)
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **info,
        "files": {p.name: reused.get(p.name) or hashed[p.name] for p in paths},
    }
    (folder / fmt.MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def tool_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint's bytes, for the manifest."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "safetensors"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def copy_tokenizer_files(src: Path | None, dst: Path) -> list[str]:
    """Copy the tokenizer files found in `src` (if any) into `dst`; returns their names."""
    if src is None:
        return []
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
