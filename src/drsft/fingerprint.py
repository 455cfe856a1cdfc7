"""Content fingerprints: what identifies a stage's inputs, so resumable work is reused only
when it was produced from the same params, data and model (sample shards, train checkpoints)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from drsft.io import dumps


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys)."""
    return hashlib.sha256(dumps(obj).encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


_BIG_FILE = 256 << 20


def model_fingerprint(model_dir: str | os.PathLike) -> dict:
    """What identifies a model folder written by ``prepare`` (or a hub id / other path).

    Files up to 256 MiB are hashed in full; bigger ones (real-scale weights) by name, size and
    the sha256 of their first and last MiB, which identifies a checkpoint without reading tens of
    GB. ``models/base`` at real scale holds only ``reference.json``, hashed in full.
    """
    path = Path(model_dir)
    if not path.exists():
        return {"reference": str(model_dir)}
    if path.is_file():
        return {"file": file_sha256(path)}
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if any(part.startswith(".") for part in f.relative_to(path).parts):
            continue
        size = f.stat().st_size
        if size <= _BIG_FILE:
            files[rel] = file_sha256(f)
        else:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
            files[rel] = f"size={size};ends={h.hexdigest()}"
    return {"files": files}
