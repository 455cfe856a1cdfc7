"""Shared plumbing for the thin stage scripts in ``stages/``."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import click

from drsft.io import DataError, read_jsonl
from drsft.params import ParamsError

log = logging.getLogger("drsft")


def setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("DRSFT_LOG", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)


def clear_errors(func):
    """Turn bad-input errors into one clear line and exit status 2 instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return func(*args, **kwargs)
        except (DataError, ParamsError) as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def read_shards(folder: str | os.PathLike, pattern: str = "shard-*.jsonl") -> list[dict]:
    """All records of a sharded output folder, in shard order."""
    folder = Path(folder)
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(folder, None, f"no {pattern} files: run the upstream stage first")
    rows: list[dict] = []
    for f in files:
        rows.extend(read_jsonl(f))
    return rows


def problems_by_id(path: str | os.PathLike) -> dict[str, dict]:
    return {p["id"]: p for p in read_jsonl(path)}
