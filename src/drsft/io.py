"""Record I/O shared by every stage.

All stage outputs are JSON Lines (one record per line, UTF-8) or JSON documents, written
atomically: the content goes to a temporary file in the same folder, is fsynced, and is then
renamed over the target, so a killed process never leaves a half-written file that DVC could
cache. Reading errors name the file, the 1-based line and, where it applies, the field.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any


_UMASK = os.umask(0)
os.umask(_UMASK)


class DataError(ValueError):
    """Bad input data: the message names the file, the line and the field."""

    def __init__(self, path: str | os.PathLike, line: int | None, message: str, field: str | None = None):
        self.path = str(path)
        self.line = line
        self.field = field
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}'" if field else ""
        super().__init__(f"{where}:{what} {message}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8"):
    """Open a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _json_default(obj: Any):
    # numpy / torch scalars and arrays without importing either here
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(record: Any) -> str:
    """Canonical JSON for records: stable key order, no NaN (it is not JSON)."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False, default=_json_default)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> int:
    """Write records atomically; returns the number written."""
    n = 0
    with atomic_path(path) as fh:
        for rec in records:
            fh.write(dumps(rec))
            fh.write("\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as fh:
        fh.write(json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True, allow_nan=False, default=_json_default))
        fh.write("\n")


def write_csv(path: str | os.PathLike, rows: Iterable[dict], columns: Sequence[str]) -> None:
    """Write rows as CSV (for ``dvc plots``), atomically."""
    import csv

    with atomic_path(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row[c] for c in columns})


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, record)``; blank lines are skipped.

    Raises :class:`DataError` for non-UTF-8 bytes, a line that is not JSON (a truncated last
    line included) or a line that is not a JSON object.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(path, lineno, f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as exc:
                hint = " (truncated last line?)" if not raw.endswith(b"\n") else ""
                raise DataError(path, lineno, f"not valid JSON{hint}: {exc.msg} at column {exc.colno}") from None
            if not isinstance(rec, dict):
                raise DataError(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(path, None, f"not valid JSON: {exc}") from None


def require(rec: dict, field: str, path: str | os.PathLike, line: int | None, kind: type | tuple[type, ...] = str,
            nonempty: bool = True) -> Any:
    """Return ``rec[field]``, checking presence, type and (for strings/lists) non-emptiness."""
    if field not in rec or rec[field] is None:
        raise DataError(path, line, "is missing", field)
    value = rec[field]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise DataError(path, line, f"must be {names}, got {type(value).__name__}", field)
    if nonempty and isinstance(value, (str, list)) and not (value.strip() if isinstance(value, str) else value):
        raise DataError(path, line, "is empty", field)
    return value


def check_unique_ids(records: Sequence[tuple[int, dict]], path: str | os.PathLike, field: str = "id") -> None:
    seen: dict[str, int] = {}
    for lineno, rec in records:
        key = rec[field]
        if key in seen:
            raise DataError(path, lineno, f"duplicate id {key!r} (first at line {seen[key]})", field)
        seen[key] = lineno


def finite_or_none(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None
