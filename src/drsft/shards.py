"""Resumable sharded runs: turn a list of items into records, a shard at a time, so that a killed
stage loses at most the shard it was writing.

Used by every long stage: the generations of ``sample``, ``guided_align`` and ``evaluate``, and the
teacher-forced scoring of ``guided_align`` and ``fallback`` (drsft.scoring.score_sharded). A
shard's records are written atomically; a manifest fingerprints what determines them (params,
inputs, model), so a rerun reuses exactly the shards of the same inputs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drsft.fingerprint import fingerprint
from drsft.io import DataError, read_json, read_records, record_file, shard_files, write_json, write_records

log = logging.getLogger("drsft.shards")


@dataclass
class ShardRun:
    """What :func:`run_sharded` did."""

    paths: list[Path]
    resumed: list[int]      # shard indices reused from an earlier run
    generated: list[int]    # shard indices written by this run
    records_written: int    # records written by this run
    seconds: float          # time spent in ``process`` by this run


MANIFEST = "manifest.json"


def shard_name(index: int, fmt: str = "jsonl") -> str:
    """``shard-00000.jsonl`` (or ``.parquet``): the file of shard ``index`` in records format ``fmt``."""
    return record_file("", f"shard-{index:05d}", fmt).name


def items_in(shards: Sequence[int], n_items: int, shard_size: int) -> int:
    """How many of ``n_items`` items the shards ``shards`` hold (e.g. the work left, for a progress bar)."""
    return sum(max(0, min(n_items, (i + 1) * shard_size) - i * shard_size) for i in shards)


def _clean(out: Path, keep: int | None) -> None:
    """Delete shard files (all, or those with index >= keep) and temp files of killed writes."""
    for f in shard_files(out):
        try:
            idx = int(f.stem.split("-", 1)[1])
        except ValueError:
            idx = -1
        if keep is None or idx < 0 or idx >= keep:
            f.unlink()
    for f in out.glob(".shard-*.tmp"):
        f.unlink()


def _chunk(items: Sequence[Any], index: int, shard_size: int) -> list[Any]:
    return list(items[index * shard_size:(index + 1) * shard_size])


def run_sharded(items: Sequence[Any], out_dir: str | os.PathLike, shard_size: int, inputs: Any,
                process: Callable[[list[Any]], list[dict]],
                validate: Callable[[list[Any], list[dict]], None] | None = None,
                on_start: Callable[[list[int], list[int]], None] | None = None, fmt: str = "jsonl",
                logprob_dtype: str = "float32") -> ShardRun:
    """Turn ``items`` into records in ``out_dir/shard-00000.jsonl``, ..., resumably (``.parquet``
    files with ``fmt="parquet"``, log-probs as ``logprob_dtype``: :func:`drsft.io.write_records`).

    Shard ``i`` holds ``process(items[i*shard_size:(i+1)*shard_size])``, written atomically.
    ``inputs`` is anything JSON-serialisable that determines the output (params, input file
    hashes, model fingerprint, ...). Its hash, the shard layout and the log-prob dtype go to
    ``out_dir/manifest.json`` (a manifest without a dtype was written at float32).
    On start, if the manifest is missing or differs, every old shard is deleted (stale results of
    other params/inputs are never reused); otherwise shards that exist and pass ``validate(items,
    records)`` (which raises :class:`DataError` or ``ValueError`` to reject) are kept and only the
    missing or rejected ones are generated. Temp files of killed writes are removed. ``process``
    must be deterministic for resumed output to equal a fresh run's. ``on_start(resumed, todo)``
    (shard indices) is called once before any ``process`` call, e.g. to size a progress bar.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_shards = (len(items) + shard_size - 1) // shard_size
    manifest = {"fingerprint": fingerprint(inputs), "inputs": inputs, "shard_size": int(shard_size),
                "n_items": len(items), "n_shards": n_shards, "shards": [shard_name(i, fmt) for i in range(n_shards)],
                "logprob_dtype": logprob_dtype}
    manifest_path = out / MANIFEST
    old = None
    if manifest_path.exists():
        with contextlib.suppress(DataError):
            old = read_json(manifest_path)
    same = (isinstance(old, dict) and all(old.get(k) == manifest[k]
                                          for k in ("fingerprint", "shard_size", "n_items", "shards"))
            and old.get("logprob_dtype", "float32") == logprob_dtype)
    if not same:
        if shard_files(out):
            log.info("%s: inputs changed since the last run (or no manifest): deleting old shards", out)
        _clean(out, keep=None)
    else:
        _clean(out, keep=n_shards)
    write_json(manifest_path, manifest)

    paths, resumed, todo = [], [], []
    for i in range(n_shards):
        path = out / shard_name(i, fmt)
        paths.append(path)
        chunk = _chunk(items, i, shard_size)
        if path.exists():
            try:
                records = read_records(path)
                if validate is not None:
                    validate(chunk, records)
                resumed.append(i)
                continue
            except (DataError, ValueError) as exc:
                log.warning("%s: rejected, regenerating (%s)", path, exc)
                path.unlink()
        todo.append(i)
    if resumed:
        log.info("%s: resuming: %d of %d shards already done", out, len(resumed), n_shards)
    if on_start is not None:
        on_start(list(resumed), list(todo))

    written, seconds = 0, 0.0
    for i in todo:
        chunk = _chunk(items, i, shard_size)
        t0 = time.perf_counter()
        records = process(chunk)
        seconds += time.perf_counter() - t0
        if validate is not None:
            try:
                validate(chunk, records)
            except ValueError as exc:
                raise RuntimeError(f"{paths[i]}: process() returned invalid records: {exc}") from exc
        written += write_records(paths[i], records, logprob_dtype)
        log.info("%s: wrote %s (%d records)", out, paths[i].name, len(records))
    return ShardRun(paths=paths, resumed=resumed, generated=todo, records_written=written, seconds=seconds)
