"""Record I/O shared by every stage.

Stage outputs are JSON Lines (one record per line, UTF-8), JSON documents, or, for the records
that carry per-token arrays when ``records.format`` is ``parquet``, Parquet files
(:func:`write_records` / :func:`iter_records` choose by the file's suffix). Every file is written
atomically: the content goes to a temporary file in the same folder, is fsynced, and is then
renamed over the target, so a killed process never leaves a half-written file that DVC could
cache. A write that fails (disk full, read-only or unwritable folder) removes its temporary file and
raises :class:`WriteError` naming the target. Reading errors name the file, the 1-based line (or
Parquet row) and, where it applies, the field.

The checked readers of the pipeline's own records (docs/records.md) live here too, one per record
kind, so every stage that reads a kind checks it the same way: :func:`read_problems`,
:func:`read_samples` (the sample shards), :func:`read_verdicts`, :func:`read_problem_ids` (the
unsolved lists) and :func:`check_training_row` / :func:`read_training_rows`. Each checks every field
it returns and rejects duplicate keys, naming the file, the line and the field.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any


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


class WriteError(OSError):
    """An output could not be written (disk full, unwritable folder, ...): the message names the path.

    Raised by the atomic writers when a write fails and by :func:`drsft.stage.preflight` before a
    stage starts; ``errno`` is the underlying error's (e.g. ``errno.ENOSPC``).
    """

    def __init__(self, path: str | os.PathLike, message: str, err: int | None = None):
        super().__init__(err, message, str(path))
        self.path = str(path)
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor); None if unknown."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _write_error(path: Path, exc: OSError) -> WriteError:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path.parent)
        why += f" ({human_bytes(free)} free on its file system)" if free is not None else ""
        why += "; nothing was written (no partial file left), free some space and rerun"
    return WriteError(path, f"cannot write: {why}", exc.errno)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", errors: str | None = None):
    """Open a temporary sibling of ``path``; rename it over ``path`` only if the block succeeds.

    On any failure the temporary file is removed and ``path`` is left as it was. An ``OSError`` of
    the write itself (no file name attached, e.g. ENOSPC from ``write``/``flush``/``fsync``) or of
    creating the folder, the temporary file or the rename becomes a :class:`WriteError` naming
    ``path``; other errors raised inside the block propagate unchanged.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None,
                       errors=errors if "b" not in mode else None) as fh:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the mode open() would
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, WriteError) and exc.filename in (None, tmp, str(path)):
            raise _write_error(path, exc) from None
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
    # A lone surrogate (crafted or broken model output, e.g. "\udcff") cannot be encoded as UTF-8;
    # backslashreplace writes it as the JSON escape \udcff, which reads back as the same string.
    with atomic_path(path, errors="backslashreplace") as fh:
        for rec in records:
            fh.write(dumps(rec))
            fh.write("\n")
            n += 1
    return n


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path, errors="backslashreplace") as fh:  # see write_jsonl
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
        yield from iter_jsonl_stream(fh, path)


def iter_jsonl_stream(fh: IO[bytes], name: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """:func:`iter_jsonl` over an open binary stream (e.g. a file at another git revision through
    ``dvc.api.DVCFileSystem``); ``name`` is what errors call it."""
    for lineno, raw in enumerate(fh, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(name, lineno, f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r})") from None
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (truncated last line?)" if not raw.endswith(b"\n") else ""
            raise DataError(name, lineno, f"not valid JSON{hint}: {exc.msg} at column {exc.colno}") from None
        if not isinstance(rec, dict):
            raise DataError(name, lineno, f"expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)]


# --------------------------------------------------------------------------------------------------
# Record files: JSON lines or Parquet, chosen by the file's suffix (params ``records.format``)

RECORD_FORMATS = ("jsonl", "parquet")
# Per-token arrays, stored in Parquet as list<int32> / list<float32 or float16> (docs/records.md).
TOKEN_ID_FIELDS = ("response_ids",)
LOGPROB_FIELDS = ("logprobs", "behaviour_logprobs", "plain_logprobs")
LOGPROB_DTYPES = ("float32", "float16")   # params records.logprob_dtype


def record_file(folder: str | os.PathLike, stem: str, fmt: str) -> Path:
    """``folder/stem.<fmt>`` for a records format (``jsonl`` or ``parquet``)."""
    if fmt not in RECORD_FORMATS:
        raise ValueError(f"records format must be one of {', '.join(RECORD_FORMATS)}, got {fmt!r}")
    return Path(folder) / f"{stem}.{fmt}"


def write_records(path: str | os.PathLike, records: Iterable[dict], logprob_dtype: str = "float32") -> int:
    """Write records atomically as JSON lines, or as Parquet when ``path`` ends in ``.parquet``
    (log-probs as ``logprob_dtype``, float32 or float16; JSON lines keep them in full); returns the
    number written. A file of the same name in the other records format is then removed, so that a
    folder never holds two versions of one output."""
    path = Path(path)
    if logprob_dtype not in LOGPROB_DTYPES:
        raise ValueError(f"log-prob dtype must be one of {', '.join(LOGPROB_DTYPES)}, got {logprob_dtype!r}")
    n = (_write_parquet(path, records, logprob_dtype) if path.suffix == ".parquet"
         else write_jsonl(path, records))
    if path.suffix[1:] in RECORD_FORMATS:
        for fmt in RECORD_FORMATS:
            if fmt != path.suffix[1:]:
                path.with_suffix(f".{fmt}").unlink(missing_ok=True)
    return n


def _write_parquet(path: Path, records: Iterable[dict], logprob_dtype: str = "float32") -> int:
    """One Parquet file (zstd), a column per field (sorted, as JSON lines sort keys); the per-token
    fields as list<int32> / list<``logprob_dtype``>, every other column typed by pyarrow from its values. A
    field absent from a row is null there. Hand-written rather than ``Table.from_pylist``, which
    takes the columns from the first row only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = list(records)
    names = sorted({k for rec in rows for k in rec})
    arrays = []
    floats = pa.float16() if logprob_dtype == "float16" else pa.float32()
    for name in names:
        kind = (pa.list_(pa.int32()) if name in TOKEN_ID_FIELDS
                else pa.list_(floats) if name in LOGPROB_FIELDS else None)
        values = [rec.get(name) for rec in rows]
        try:
            try:
                arrays.append(pa.array(values, type=kind))
            except UnicodeEncodeError:  # a lone surrogate (broken model output) is not UTF-8
                arrays.append(pa.array(_escape_surrogates(values), type=kind))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise ValueError(f"{path}: field '{name}' cannot be stored as one Parquet column: {exc}") from None
    table = pa.Table.from_arrays(arrays, names=names) if names else pa.table({})
    # Per-token arrays byte-stream-split (zstd then sees the sign/exponent and high bytes apart
    # from the noisy low ones; on the scale bench's ids and log-probs 2.25 and 3.32 bytes/token
    # against 2.60 and 4.14 with the default dictionary encoding, which would take precedence).
    leaves = [f"{n}.list.element" for n in names if n in TOKEN_ID_FIELDS + LOGPROB_FIELDS]
    with atomic_path(path, mode="wb") as fh:
        pq.write_table(table, fh, compression="zstd", use_dictionary=False, use_byte_stream_split=leaves or False)
    return len(rows)


def _escape_surrogates(value: Any) -> Any:
    """Strings with lone surrogates written as their escapes (``"\\udcff"``, the text a JSON-lines
    file holds for them); Parquet strings must be valid UTF-8."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, list):
        return [_escape_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape_surrogates(v) for k, v in value.items()}
    return value


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, record)`` (1-based) of a JSON-lines file (:func:`iter_jsonl`) or, for a
    ``.parquet`` file, of its rows in order, read a batch at a time. Errors name the file (and the
    line or row)."""
    path = Path(path)
    if path.suffix != ".parquet":
        yield from iter_jsonl(path)
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(path, None, "file not found")
    row = 0
    try:
        reader = pq.ParquetFile(path)
        for batch in reader.iter_batches(batch_size=4096):
            for rec in batch.to_pylist():
                row += 1
                yield row, rec
    except (pa.ArrowException, OSError) as exc:
        raise DataError(path, row + 1 if row else None, f"not a readable Parquet file: {exc}") from None


def read_records(path: str | os.PathLike) -> list[dict]:
    return [rec for _, rec in iter_records(path)]


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


# --------------------------------------------------------------------------------------------------
# Checked readers of the pipeline's records (docs/records.md)

FINISH_REASONS = ("stop", "length")
VERDICT_REASONS = ("ok", "wrong", "no_answer", "timeout", "parse_error")  # == drsft.verify.REASONS (tested)
TRAINING_TIERS = ("self", "guided", "fallback", "expert")
_SAMPLE_KEYS = ("problem_id", "sample_index", "finish_reason")  # what read_samples keeps of a sample not wanted whole


def _index(rec: dict, path, line) -> int:
    value = require(rec, "sample_index", path, line, kind=int)
    if isinstance(value, bool) or value < 0:
        raise DataError(path, line, f"must be an integer >= 0, got {value!r}", "sample_index")
    return value


def _token_ids(value: Any, path, line, field: str) -> list[int]:
    if value is None:
        raise DataError(path, line, "is missing", field)
    if not isinstance(value, list):
        raise DataError(path, line, f"must be a list of token ids, got {type(value).__name__}", field)
    for j, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise DataError(path, line, f"item {j} = {t!r} is not a token id (an integer >= 0)", field)
    return value


def _logprobs(value: Any, n: int, path, line, field: str) -> list[float]:
    if value is None:
        raise DataError(path, line, "is missing", field)
    if not isinstance(value, list) or len(value) != n:
        got = len(value) if isinstance(value, list) else type(value).__name__
        raise DataError(path, line, f"must be a list of {n} log-probs (one per response token), got {got}", field)
    for j, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 1e-3:
            raise DataError(path, line, f"item {j} = {v!r} is not a finite log-probability <= 0", field)
    return value


def _unique(seen: dict, key, path, line, field: str, what: str) -> None:
    if key in seen:
        raise DataError(path, line, f"duplicate {what} {key!r} (first at {seen[key]})", field)
    seen[key] = f"{Path(path).name}:{line}"


def read_problems(path: str | os.PathLike) -> list[dict]:
    """Problem records (``id``, ``problem``, ``answer`` non-empty strings; ``solution``/``source``
    strings when present), ids unique, at least one row."""
    rows, seen = [], {}
    for line, rec in iter_records(path):
        pid = require(rec, "id", path, line)
        require(rec, "problem", path, line)
        require(rec, "answer", path, line)
        for field in ("solution", "source"):
            if rec.get(field) is not None:
                require(rec, field, path, line, nonempty=False)
        _unique(seen, pid, path, line, "id", "id")
        rows.append(rec)
    if not rows:
        raise DataError(path, None, "has no problems")
    return rows


def shard_files(folder: Path) -> list[Path]:
    """The files ``shard-*.jsonl`` / ``shard-*.parquet`` in ``folder``, sorted (drsft.shards writes them)."""
    return sorted(f for f in folder.glob("shard-*.*") if f.suffix[1:] in RECORD_FORMATS)


def _shard_files(folder: Path) -> list[Path]:
    """The shard files of a sharded output folder; with a ``manifest.json`` (drsft.shards.run_sharded),
    exactly the shards it lists, so a run that did not finish is never read as complete."""
    if not folder.is_dir():
        raise DataError(folder, None, "not found (a folder of shard files): run the sample stage first")
    files = shard_files(folder)
    manifest = folder / "manifest.json"
    if manifest.exists():
        doc = read_json(manifest)
        listed = doc.get("shards") if isinstance(doc, dict) else None
        if not isinstance(listed, list) or not all(isinstance(x, str) for x in listed):
            raise DataError(manifest, None, "must list the shard files", "shards")
        names = {f.name for f in files}
        missing = [x for x in listed if x not in names]
        if missing:
            raise DataError(manifest, None, f"lists {len(missing)} shard(s) that are missing, e.g. {missing[0]}: "
                                            "the sample stage did not finish; rerun it", "shards")
        extra = sorted(names - set(listed))
        if extra:
            raise DataError(folder / extra[0], None, "is not in manifest.json: a stale shard of another run; "
                                                     "rerun the sample stage")
    if not files:
        raise DataError(folder, None, "no shard-*.jsonl or shard-*.parquet files: run the sample stage first")
    return files


def read_samples(folder: str | os.PathLike, problem_ids: Iterable[str] | None = None,
                 fields: Sequence[str] | None = None, full: Callable[[dict], bool] | None = None) -> list[dict]:
    """Sample records of every shard of ``folder`` in shard order, each field checked.

    ``problem_id``, ``prompt`` strings; ``sample_index`` an integer >= 0; ``response`` a string (may be
    empty); ``response_ids`` token ids; ``logprobs`` one finite log-prob per token; ``finish_reason``
    ``stop``/``length``. ``(problem_id, sample_index)`` is unique over all shards; with
    ``problem_ids``, every ``problem_id`` must be one of them. ``fields`` keeps only those fields of
    each returned record (all are still checked). ``full``: records for which it is false keep only
    ``problem_id``, ``sample_index`` and ``finish_reason`` (e.g. the incorrect samples, whose token
    arrays self_align never uses: at scale they would not fit in memory).
    """
    folder = Path(folder)
    known = set(problem_ids) if problem_ids is not None else None
    out, seen = [], {}
    for f in _shard_files(folder):
        for line, rec in iter_records(f):
            pid = require(rec, "problem_id", f, line)
            idx = _index(rec, f, line)
            require(rec, "prompt", f, line)
            require(rec, "response", f, line, nonempty=False)
            ids = _token_ids(rec.get("response_ids"), f, line, "response_ids")
            _logprobs(rec.get("logprobs"), len(ids), f, line, "logprobs")
            if rec.get("finish_reason") not in FINISH_REASONS:
                raise DataError(f, line, f"must be one of {', '.join(FINISH_REASONS)}, got "
                                         f"{rec.get('finish_reason')!r}", "finish_reason")
            if known is not None and pid not in known:
                raise DataError(f, line, f"unknown problem {pid!r} (not in the problems file)", "problem_id")
            _unique(seen, (pid, idx), f, line, "sample_index", "sample")
            if full is not None and not full(rec):
                rec = {k: rec[k] for k in _SAMPLE_KEYS}
            elif fields is not None:
                rec = {k: rec[k] for k in fields}
            out.append(rec)
    return out


def read_verdicts(path: str | os.PathLike, samples: Iterable[tuple[str, int]] | None = None) -> list[dict]:
    """Verdict records: ``problem_id``, ``sample_index``, ``correct`` (bool), ``reason`` (one of
    :data:`VERDICT_REASONS`, ``ok`` exactly when correct), ``extracted`` (string or null); one per
    ``(problem_id, sample_index)``. With ``samples`` (their keys), every sample has exactly one verdict."""
    rows, seen, lines = [], {}, {}
    for line, rec in iter_records(path):
        pid = require(rec, "problem_id", path, line)
        idx = _index(rec, path, line)
        lines[(pid, idx)] = line
        correct = require(rec, "correct", path, line, kind=bool)
        reason = rec.get("reason")
        if reason not in VERDICT_REASONS:
            raise DataError(path, line, f"must be one of {', '.join(VERDICT_REASONS)}, got {reason!r}", "reason")
        if correct != (reason == "ok"):
            raise DataError(path, line, f"correct={correct} contradicts reason {reason!r}", "correct")
        if rec.get("extracted") is not None and not isinstance(rec["extracted"], str):
            raise DataError(path, line, "must be a string or null", "extracted")
        _unique(seen, (pid, idx), path, line, "sample_index", "verdict for")
        rows.append(rec)
    if samples is not None:
        keys = list(samples)
        wanted = set(keys)
        for key, line in lines.items():
            if key not in wanted:
                raise DataError(path, line, f"verdict for {key!r}, which is not a sample: the verdicts are "
                                            "out of date; rerun verify", "sample_index")
        missing = [k for k in keys if k not in lines]
        if missing:
            raise DataError(path, None, f"{len(missing)} sample(s) have no verdict, e.g. {missing[0]!r}: the "
                                        "verdicts are out of date; rerun verify")
    return rows


def read_problem_ids(path: str | os.PathLike, known: Iterable[str] | None = None) -> list[str]:
    """The ``problem_id`` of each row (an unsolved list), unique; with ``known``, each one of them."""
    known = set(known) if known is not None else None
    ids, seen = [], {}
    for line, rec in iter_records(path):
        pid = require(rec, "problem_id", path, line)
        if known is not None and pid not in known:
            raise DataError(path, line, f"unknown problem {pid!r} (not in the problems file)", "problem_id")
        _unique(seen, pid, path, line, "problem_id", "problem_id")
        ids.append(pid)
    return ids


def check_training_row(rec: dict, path: str | os.PathLike, line: int, seen: dict | None = None) -> dict:
    """Check one training example (docs/records.md); with ``seen`` (a dict kept across rows), reject a
    row repeating an earlier one's ``(problem_id, tier, response_ids)``."""
    pid = require(rec, "problem_id", path, line)
    tier = require(rec, "tier", path, line)
    if tier not in TRAINING_TIERS:
        raise DataError(path, line, f"unknown tier {tier!r} (expected one of {', '.join(TRAINING_TIERS)})", "tier")
    require(rec, "prompt", path, line)
    require(rec, "response", path, line, nonempty=False)
    ids = _token_ids(rec.get("response_ids"), path, line, "response_ids")
    if rec.get("behaviour_logprobs") is not None:
        _logprobs(rec["behaviour_logprobs"], len(ids), path, line, "behaviour_logprobs")
    _logprobs(rec.get("plain_logprobs"), len(ids), path, line, "plain_logprobs")
    require(rec, "behaviour", path, line)
    if seen is not None:
        check_duplicate_row(seen, pid, tier, ids, path, line)
    return rec


def check_duplicate_row(seen: dict, problem_id: str, tier: str, response_ids: Sequence[int],
                        path: str | os.PathLike, line: int) -> None:
    """Reject a training row with the same ``(problem_id, tier, response_ids)`` as an earlier one
    (``seen`` is kept across the rows of a file; it holds a 128-bit digest per row, not the ids)."""
    digest = hashlib.blake2b(repr(list(response_ids)).encode(), digest_size=16).digest()
    key = (problem_id, tier, digest)
    if key in seen:
        raise DataError(path, line, f"duplicate row: same problem_id {problem_id!r}, tier {tier!r} and response "
                                    f"as line {seen[key]}", "response_ids")
    seen[key] = line


def read_training_rows(path: str | os.PathLike, known: Iterable[str] | None = None) -> list[dict]:
    """Training examples, each checked by :func:`check_training_row`; with ``known``, every
    ``problem_id`` must be one of them."""
    known = set(known) if known is not None else None
    rows, seen = [], {}
    for line, rec in iter_records(path):
        check_training_row(rec, path, line, seen)
        if known is not None and rec["problem_id"] not in known:
            raise DataError(path, line, f"unknown problem {rec['problem_id']!r} (not in the problems file)",
                            "problem_id")
        rows.append(rec)
    return rows


def finite_or_none(x: float) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def run_info_path(metrics_path: str | os.PathLike) -> Path:
    """Where :func:`write_run_info` puts the run record of ``metrics_path``: ``<folder>/runs/<name>``."""
    m = Path(metrics_path)
    return m.parent / "runs" / m.name


def write_run_info(metrics_path: str | os.PathLike, info: dict) -> Path:
    """Write what this invocation did and how long it took (wall time, throughput, resumed work) to
    :func:`run_info_path`. These vary between identical runs, so they stay out of the declared
    metrics: ``dvc metrics diff`` shows results only and a rerun on the same machine changes no
    tracked file (``metrics/runs/`` is git-ignored)."""
    path = run_info_path(metrics_path)
    write_json(path, info)
    return path
