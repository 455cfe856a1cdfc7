r"""Real-scale loaders: training problems and evaluation benchmarks as problem records.

Problem records (docs/records.md): ``id``, ``problem``, ``solution``, ``answer``, ``source``.

* :func:`load_problems` reads a training set (jsonl, parquet, or a ``datasets`` id) whose field names
  are given, derives the answer from the solution when no answer field is named (GSM8K ``#### x``, else
  the last ``\boxed{}``), and normalises GSM8K solutions (calculator annotations removed, the ``####``
  line replaced by a closing ``The answer is \boxed{x}``).
* :func:`load_benchmark` knows the five published benchmark files in ``../shared/benchmarks`` and files
  already in the record format.

Every bad row raises :class:`drsft.io.DataError` naming the file, the 1-based line (parquet: row) and
the field.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from drsft.fingerprint import file_sha256
from drsft.hubspec import HubSpec, parse_hub_spec
from drsft.io import DataError, check_unique_ids, iter_jsonl
from drsft.verify import extract_boxed

KNOWN_BENCHMARKS = ("math500", "minerva_math", "olympiadbench", "aime24", "amc23")

_GSM8K_FINAL = re.compile(r"\n?####\s*(?P<answer>[^\n]*)\s*$")
_CALC = re.compile(r"<<[^<>\n]*>>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


# --------------------------------------------------------------------------------------------------
# Row sources
# --------------------------------------------------------------------------------------------------

def _iter_rows(path: str, default_split: str = "train", provenance: dict | None = None) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` from a jsonl/parquet file, or from a pinned ``datasets`` id (:func:`parse_hub_spec`).

    ``provenance``, when given, is filled with what names the input exactly: a file's path, size and
    sha256, or a hub dataset's id, config, split, requested revision and resolved commit.
    """
    p = Path(path)
    if p.is_file():
        if provenance is not None:
            provenance.update({"path": path, "bytes": p.stat().st_size, "sha256": file_sha256(p)})
        if p.suffix == ".parquet":
            yield from _iter_parquet(p)
        else:
            yield from iter_jsonl(p)
        return
    spec = None if p.exists() else parse_hub_spec(path, default_split)
    if spec is None:
        raise DataError(path, None, "file not found (nor a datasets id owner/name[:config]@revision[#split])")
    if not spec.revision:
        raise DataError(path, None, "a datasets id needs a pinned revision: owner/name[:config]@<commit>[#split] "
                                    "(DVC reruns prepare when params change, not when a hub dataset does)")
    yield from _iter_hub(spec, path, provenance)


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds
        raise DataError(path, None, f"not a readable parquet file: {exc}") from None
    for i, row in enumerate(frame.to_dict(orient="records"), start=1):
        yield i, {k: _plain(v) for k, v in row.items()}


def _plain(v: Any) -> Any:
    if hasattr(v, "tolist"):  # numpy arrays / scalars from parquet
        return v.tolist()
    return v


def _iter_hub(spec: HubSpec, name: str, provenance: dict | None) -> Iterator[tuple[int, dict]]:
    """Rows of a pinned hub dataset through ``datasets`` (its cache, or the network where there is one).

    Real-scale path: needs the dataset in the local HF cache or network access; tested with a stand-in
    ``datasets.load_dataset_builder`` (tests/test_data.py).
    """
    import datasets

    try:
        builder = datasets.load_dataset_builder(spec.repo, spec.config, revision=spec.revision)
        builder.download_and_prepare()
        ds = builder.as_dataset(split=spec.split)
    except Exception as exc:  # noqa: BLE001 - hub, cache and builder errors of every kind
        raise DataError(name, None, f"not a file, and loading it with datasets failed: {exc}") from None
    if provenance is not None:
        # For a hub dataset the builder's hash is the commit its files were read at.
        provenance.update({"hub": spec.repo, "config": spec.config, "split": spec.split,
                           "revision": spec.revision, "resolved_revision": getattr(builder, "hash", None)})
    for i, row in enumerate(ds, start=1):
        yield i, dict(row)


# --------------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------------

def _text(value: Any, path, line, field: str, join: str = "\n\n") -> str:
    if value is None:
        raise DataError(path, line, "is missing", field)
    if isinstance(value, list):
        if not all(isinstance(x, str) for x in value):
            raise DataError(path, line, "must be a string or a list of strings", field)
        value = join.join(x.strip() for x in value)
    if not isinstance(value, str):
        raise DataError(path, line, f"must be a string, got {type(value).__name__}", field)
    return value


def _answer_text(value: Any, path, line, field: str) -> str:
    """A reference answer from a field: str, number (27.0 -> "27"), or list of str (joined with ", ")."""
    if value is None:
        raise DataError(path, line, "is missing", field)
    if isinstance(value, bool):
        raise DataError(path, line, "must be a string or a number, got bool", field)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise DataError(path, line, f"is not a finite number: {value}", field)
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, list):
        parts = [_strip_math_delims(x) if isinstance(x, str) else _answer_text(x, path, line, field) for x in value]
        text = ", ".join(p for p in parts if p)
    elif isinstance(value, str):
        text = value.strip()
    else:
        raise DataError(path, line, f"must be a string, a number or a list, got {type(value).__name__}", field)
    if not text:
        raise DataError(path, line, "is empty: no usable reference answer", field)
    return text


def _strip_math_delims(s: str) -> str:
    """``$69$,$84$`` -> ``69,84``: inline-math dollars carry no meaning in an answer field."""
    return _UNESCAPED_DOLLAR.sub("", s).strip()


def gsm8k_split(solution: str) -> tuple[str, str] | None:
    """``(body, answer)`` of a GSM8K solution ending in ``#### x``; None when it has no such line.

    The body has calculator annotations ``<<48/2=24>>`` removed; thousands separators are removed from
    the answer (``1,000`` -> ``1000``).
    """
    m = _GSM8K_FINAL.search(solution)
    if m is None:
        return None
    answer = _THOUSANDS.sub("", m.group("answer").strip())
    body = _CALC.sub("", solution[:m.start()]).rstrip()
    return body, answer


def _gsm8k_solution(body: str, answer: str) -> str:
    closing = f"The answer is \\boxed{{{answer}}}"
    return f"{body}\n{closing}" if body else closing


# --------------------------------------------------------------------------------------------------
# Training problems
# --------------------------------------------------------------------------------------------------

def load_problems(path: str | os.PathLike, problem: str, solution: str, answer: str | None = None,
                  limit: int | None = None, source: str | None = None, provenance: dict | None = None) -> list[dict]:
    r"""Problem records from a jsonl / parquet file (or a pinned ``datasets`` id, :func:`parse_hub_spec`).

    ``problem`` / ``solution`` / ``answer`` name the fields. ``answer=None``: the answer comes from the
    solution -- a GSM8K ``#### x`` line (then the solution is cleaned and ends in ``\boxed{x}``), else the
    solution's last ``\boxed{}``. ``limit`` keeps the first rows. ``source`` defaults to the file stem
    (a hub dataset: its name).
    ids: the file's ``id`` field when present (as a string), else ``<source>-<row index:05d>``.
    ``provenance``: filled as :func:`_iter_rows` does (file sha256, or the hub commit read).
    """
    path = str(path)
    hub = None if Path(path).exists() else parse_hub_spec(path)
    src = source or (hub.repo.split("/")[-1] if hub else Path(path).stem) or path.replace("/", "_")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    rows: list[tuple[int, dict]] = []
    for index, (line, rec) in enumerate(_iter_rows(path, "train", provenance)):
        if limit is not None and index >= limit:
            break
        prob = rec.get(problem)
        if prob is None:
            raise DataError(path, line, "is missing", problem)
        prob = _text(prob, path, line, problem)
        if not prob.strip():
            raise DataError(path, line, "is empty", problem)
        sol = _text(rec.get(solution, ""), path, line, solution) if rec.get(solution) is not None else ""
        split = gsm8k_split(sol) if sol else None
        if answer is not None:
            ans = _answer_text(rec.get(answer), path, line, answer)
            if split is not None:
                sol = _gsm8k_solution(split[0], ans)
        elif split is not None:
            ans = split[1]
            sol = _gsm8k_solution(split[0], ans)
        else:
            ans = extract_boxed(sol) if sol else None
            if ans is None:
                raise DataError(path, line, "has no answer: no '#### x' line and no complete \\boxed{} "
                                            "(name an answer field?)", solution)
        if not ans:
            raise DataError(path, line, "is empty", answer or solution)
        rid = str(rec["id"]) if rec.get("id") is not None else f"{src}-{index:05d}"
        rows.append((line, {"id": rid, "problem": prob, "solution": sol, "answer": ans, "source": src}))
    check_unique_ids(rows, path)
    return [r for _, r in rows]


# --------------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------------

def _is_record(rec: dict) -> bool:
    """Already a problem record (prepared / toy files): string id, problem and string answer."""
    return isinstance(rec.get("id"), str) and "problem" in rec and isinstance(rec.get("answer"), str)


def _benchmark_row(name: str, path: str, line: int, rec: dict) -> tuple[str, str, str]:
    """``(problem, solution, answer)`` of a published benchmark row."""
    def field(key: str) -> str:
        return _text(rec.get(key), path, line, key)

    def optional(key: str) -> str:
        return _text(rec[key], path, line, key) if rec.get(key) is not None else ""

    def answer(key: str) -> str:
        return _answer_text(rec.get(key), path, line, key)

    if name in ("math500", "aime24"):
        return field("problem"), optional("solution"), answer("answer")
    if name == "minerva_math":
        sol = field("solution")
        ans = extract_boxed(sol)
        if not ans:
            raise DataError(path, line, "has no complete \\boxed{} to take the reference answer from", "solution")
        return field("problem"), sol, ans
    if name == "olympiadbench":
        # final_answer is a list; several answers are joined with ", " (every row of the published file
        # has exactly one; multi-part answers live inside that one string, e.g. "$69$,$84$" -> "69,84").
        return field("question"), optional("solution"), answer("final_answer")
    if name == "amc23":
        return field("problem"), "", answer("answer")
    raise DataError(path, line, f"unknown benchmark '{name}': rows need id/problem/answer "
                                f"(record format) or the name must be one of {', '.join(KNOWN_BENCHMARKS)}")


def load_benchmark(name: str, path: str | os.PathLike, provenance: dict | None = None) -> list[dict]:
    r"""Problem records of a benchmark file.

    A file already in the record format (rows with a string ``id``, ``problem`` and string ``answer``:
    toy benchmarks and the files ``prepare`` writes) is read as is. Otherwise ``name`` picks the published
    schema: math500 (``problem``/``answer``/``solution``), minerva_math (answer = last ``\boxed{}`` of
    ``solution``), olympiadbench (``question``/``final_answer`` list joined with ", ", dollars
    stripped/``solution`` list joined with blank lines), aime24 (``problem``/``answer``), amc23
    (``problem``/``answer`` float, 27.0 -> "27"). ids are ``<name>-<row index:04d>``. A row without a usable
    reference answer raises DataError naming file and line. A hub id reads split ``test`` unless it
    names one; ``provenance`` as in :func:`load_problems`.
    """
    path = str(path)
    out: list[tuple[int, dict]] = []
    for index, (line, rec) in enumerate(_iter_rows(path, "test", provenance)):
        if _is_record(rec):
            prob = _text(rec.get("problem"), path, line, "problem")
            ans = _answer_text(rec.get("answer"), path, line, "answer")
            sol = _text(rec["solution"], path, line, "solution") if rec.get("solution") is not None else ""
            row = {"id": rec["id"], "problem": prob, "solution": sol, "answer": ans,
                   "source": str(rec.get("source") or name)}
        else:
            prob, sol, ans = _benchmark_row(name, path, line, rec)
            row = {"id": f"{name}-{index:04d}", "problem": prob, "solution": sol, "answer": ans, "source": name}
        if not row["problem"].strip():
            raise DataError(path, line, "is empty", "problem" if name != "olympiadbench" else "question")
        if not row["answer"]:
            raise DataError(path, line, "is empty: no usable reference answer", "answer")
        out.append((line, row))
    if not out:
        raise DataError(path, None, "has no rows")
    check_unique_ids(out, path)
    return [r for _, r in out]


# --------------------------------------------------------------------------------------------------
# Subsampling
# --------------------------------------------------------------------------------------------------

def subsample(records: list[dict], k: int | None, seed: int) -> list[dict]:
    """A seeded random subset of ``k`` of ``records``, in their original order (``k=None``: all).

    The paper's setting "a 50k-problem subset of the first 100k" is ``limit: 100000`` (the first
    rows, :func:`load_problems`) then ``subsample(..., 50000, seed)``. The subset is a function of
    ``(len(records), k, seed)`` only: ``random.Random(seed).sample`` of the row positions, sorted.
    Raises ValueError when ``k`` is not a positive integer or exceeds the number of records.
    """
    import random

    if k is None:
        return list(records)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"subsample must be a positive integer or null, got {k!r}")
    if k > len(records):
        raise ValueError(f"subsample={k} but only {len(records)} rows are available (after limit)")
    keep = sorted(random.Random(int(seed)).sample(range(len(records)), k))
    return [records[i] for i in keep]
