"""Shared plumbing for the thin stage scripts in ``stages/``.

* :func:`clear_errors`: bad input (:class:`~drsft.io.DataError`), bad params
  (:class:`~drsft.params.ParamsError`) and outputs that cannot be written
  (:class:`~drsft.io.WriteError`) end the stage with one clear line, no traceback.
* :func:`preflight`: called by the long stages right after their params are read, before any
  model is loaded: every output's folder can be created and written (a probe file is created and
  deleted), and the file system has room for the stage's outputs (an estimate, below).

Space estimates (deliberately simple, upper-bound-ish; DVC's cache copy of the outputs is not
included -- it needs as much again unless the cache uses reflinks/hardlinks):

* generated sequences (sample, guided_align, evaluate): :func:`sequences_bytes` =
  sequences x (``max_new_tokens`` x :data:`BYTES_PER_TOKEN` + :data:`PROMPT_BYTES`); a sample record
  holds per token an id, a log-prob and its text: 32 bytes/token measured on the toy pipeline's
  shards, 40 allows for 6-digit ids and longer text.
* train: :data:`TRAIN_WEIGHT_FACTOR` x the base model's weight files (final model ~1x; a ZeRO
  checkpoint holds the weights plus fp32 master weights and two Adam moments, up to 7x for bf16
  weights, and two checkpoints exist while the newer one is written).
* prepare: :data:`TOY_PREPARE_BYTES` for the embedded toy world, else 4 x the input files' size.

``DRSFT_SKIP_SPACE_CHECK=1`` skips the free-space part (the writability probe always runs).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterable
from pathlib import Path

import click

from drsft.io import DataError, WriteError, free_bytes, human_bytes, read_problems
from drsft.params import ParamsError

log = logging.getLogger("drsft")

BYTES_PER_TOKEN = 40
PROMPT_BYTES = 2048
TRAIN_WEIGHT_FACTOR = 16
TOY_PREPARE_BYTES = 64 << 20
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("DRSFT_LOG", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)


def clear_errors(func):
    """Turn bad-input and unwritable-output errors into one clear line and exit status 1, no traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return func(*args, **kwargs)
        except (DataError, ParamsError, WriteError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def problems_by_id(path: str | os.PathLike) -> dict[str, dict]:
    """The problem records of ``path`` (checked by :func:`drsft.io.read_problems`) by id."""
    return {p["id"]: p for p in read_problems(path)}


# --------------------------------------------------------------------------------------------------
# Preflight: can the outputs be written, is there room?

def _probe_dir(out: Path) -> Path:
    """The folder a stage writes ``out`` into: ``out`` itself if it is an existing folder, else its parent."""
    return out if out.is_dir() else out.parent


def preflight(outs: Iterable[str | os.PathLike], need_bytes: int = 0) -> None:
    """Fail fast, before hours of work, if the outputs cannot be written.

    For each output path: its folder (the path itself when it is an existing folder, else its
    parent) is created if missing, and a probe file is created in it and deleted. Then each file
    system holding an output must have at least ``need_bytes`` free (counted once per file system).
    Raises :class:`~drsft.io.WriteError` naming the path, and for space the free and needed bytes.
    """
    devices: dict[int, Path] = {}
    for out in outs:
        out = Path(out)
        folder = _probe_dir(out)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WriteError(out, f"cannot create its folder {folder}: {exc.strerror or exc}", exc.errno) from None
        probe = folder / f".drsft-preflight-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(probe, "wb") as fh:
                fh.write(b"drsft preflight\n")
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise WriteError(out, f"cannot write into {folder}: {exc.strerror or exc}", exc.errno) from None
        finally:
            try:
                probe.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise WriteError(probe, f"cannot delete the probe file: {exc.strerror or exc}", exc.errno) from None
        devices.setdefault(os.stat(folder).st_dev, out)
    if need_bytes <= 0 or os.environ.get("DRSFT_SKIP_SPACE_CHECK") == "1":
        return
    for out in devices.values():
        free = free_bytes(_probe_dir(out))
        if free is not None and free < need_bytes:
            raise WriteError(out, f"not enough free space: {free} bytes ({human_bytes(free)}) free on its file "
                                  f"system, the stage needs about {need_bytes} bytes ({human_bytes(need_bytes)}) "
                                  "(estimate: see drsft.stage; DRSFT_SKIP_SPACE_CHECK=1 skips this check)",
                             errno.ENOSPC)


def count_records(path: str | os.PathLike) -> int:
    """Non-blank lines of a jsonl file (0 when it does not exist: its reader reports that later)."""
    try:
        with open(path, "rb") as fh:
            return sum(1 for raw in fh if raw.strip())
    except OSError:
        return 0


def sequences_bytes(n_sequences: int, max_new_tokens: int, prompt_bytes: int = PROMPT_BYTES) -> int:
    """Upper-bound-ish size of ``n_sequences`` generated records of up to ``max_new_tokens`` tokens."""
    return max(0, int(n_sequences)) * (max(0, int(max_new_tokens)) * BYTES_PER_TOKEN + prompt_bytes)


def weights_bytes(model_dir: str | os.PathLike) -> int:
    """Size of the weight files of a local model folder, following ``models/base/reference.json`` to
    the local folder it names (as :func:`drsft.models.resolve_model` does); 0 when the weights are not
    local (a hub id: its size is unknown offline)."""
    target = Path(model_dir)
    ref = target / "reference.json"
    if ref.is_file():
        try:
            target = Path(str(json.loads(ref.read_text(encoding="utf-8"))["model"]))
        except (OSError, ValueError, KeyError, TypeError):
            return 0
    if not target.is_dir():
        return 0
    return sum(f.stat().st_size for f in target.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def files_bytes(paths: Iterable[str | os.PathLike | None]) -> int:
    """Total size of the paths that are existing files (others -- datasets ids, missing -- count 0)."""
    total = 0
    for p in paths:
        if p is not None and Path(p).is_file():
            total += Path(p).stat().st_size
    return total


def prepare_bytes(prep: dict) -> int:
    """prepare's estimate: :data:`TOY_PREPARE_BYTES` for the toy world, else 4 x the input files."""
    if prep.get("source") != "files":
        return TOY_PREPARE_BYTES
    files = prep.get("files") or {}
    paths = [(files.get("train") or {}).get("path")]
    paths += [b.get("path") for b in files.get("benchmarks") or [] if isinstance(b, dict)]
    return 4 * files_bytes(str(p) for p in paths if p)
