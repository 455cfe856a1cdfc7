"""Determinism: the same params and seed on CPU give byte-identical outputs of every stage.

The scaled-down pipeline (tests/pipeline_copy.py, smaller still than tests/test_pipeline.py's) runs
with ``dvc repro`` in a copy of the repository; then everything a stage could resume from is
deleted (the ``persist: true`` outputs: sample and guided_align shards, the dvclive history; the
train checkpoints) and ``dvc repro -f`` runs every stage again from scratch (``-f`` also bypasses
DVC's run cache). Every cached output must have the same md5 in dvc.lock, and every metrics /
plots file must be byte-identical: wall-clock timings are written beside the metrics
(``metrics/runs/``, drsft.io.write_run_info), never in a declared output. So DVC's cache means what
it says: a cached output is *the* output of its params and inputs, and a rerun leaves git clean.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline_copy import DVC, SMALL, copy_repo, ran_stages, run, stages_of  # noqa: E402

pytestmark = pytest.mark.slow

# As small as the stages allow while each still does its real work (~1 min per repro here).
TINY = {
    **SMALL,
    "prepare.toy.n_train": 24,
    "prepare.toy.n_bench": 6,
    "prepare.toy.n_corpus": 200,
    "prepare.toy.n_drills": 200,
    "prepare.pretrain.steps": 20,
    "prepare.probe.n_problems": 8,
    "prepare.probe.max_new_tokens": 64,
    "sample.max_new_tokens": 64,
    "sample.shard_size": 8,
    "guided_align.max_new_tokens": 64,
    "guided_align.shard_size": 8,
    "evaluate.k": 1,
    "evaluate.max_new_tokens": 64,
    "train.save_every": 2,
}



def _cached_md5s(lock: dict, uncached: list[str]) -> dict[str, str]:
    """{stage:path: md5} of every cached output in a dvc.lock (``cache: false`` ones excluded)."""
    return {f"{name}:{o['path']}": o["md5"] for name, stage in lock["stages"].items()
            for o in stage.get("outs", []) if o["path"] not in uncached}


def _uncached(dvc_yaml: dict) -> list[str]:
    """Paths of the ``cache: false`` outputs, metrics and plots (files or folders)."""
    paths = []
    for stage in dvc_yaml["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                if isinstance(entry, dict):
                    (path, opts), = entry.items()
                    if opts and opts.get("cache") is False:
                        paths.append(path)
    return paths


def _persisted(dvc_yaml: dict) -> list[str]:
    return [next(iter(e)) for s in dvc_yaml["stages"].values() for kind in ("outs", "metrics", "plots")
            for e in s.get(kind, []) if isinstance(e, dict) and (next(iter(e.values())) or {}).get("persist")]


def _files(root: Path, path: str) -> dict[str, bytes]:
    p = root / path
    if p.is_file():
        return {path: p.read_bytes()}
    return {f.relative_to(root).as_posix(): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def _json_diff(a, b, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ (for the failure message)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _json_diff(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _explain(rel: str, a: bytes, b: bytes) -> str:
    try:
        return f"{rel}: {_json_diff(json.loads(a), json.loads(b))}"
    except ValueError:
        return rel


def test_two_runs_from_scratch_are_byte_identical(tmp_path):
    dst = tmp_path / "repo"
    env = copy_repo(dst, TINY)
    dvc_yaml = {"stages": stages_of(dst)}
    uncached = _uncached(dvc_yaml)

    first = run([DVC, "repro"], dst, env)
    assert ran_stages(first) == set(dvc_yaml["stages"])
    lock1 = yaml.safe_load((dst / "dvc.lock").read_text())
    files1 = {k: v for path in uncached for k, v in _files(dst, path).items()}

    for path in [*_persisted(dvc_yaml), "models/checkpoints"]:
        shutil.rmtree(dst / path, ignore_errors=True)
    second = run([DVC, "repro", "-f"], dst, env)
    assert ran_stages(second) == set(dvc_yaml["stages"])
    # really from scratch: nothing was resumed
    for stage in ("sample", "guided_align"):
        assert json.loads((dst / f"metrics/runs/{stage}.json").read_text())["resumed_shards"] == 0
    assert json.loads((dst / "metrics/runs/train.json").read_text())["resumed_from_steps"] == []
    lock2 = yaml.safe_load((dst / "dvc.lock").read_text())
    files2 = {k: v for path in uncached for k, v in _files(dst, path).items()}

    md5_1, md5_2 = _cached_md5s(lock1, uncached), _cached_md5s(lock2, uncached)
    assert md5_1.keys() == md5_2.keys() and len(md5_1) >= len(dvc_yaml["stages"])
    differ = sorted(k for k in md5_1 if md5_1[k] != md5_2[k])
    assert not differ, f"cached outputs differ between two runs with the same params and seed: {differ}"

    assert files1.keys() == files2.keys()
    differ = sorted(rel for rel in files1 if files1[rel] != files2[rel])
    assert not differ, "metrics/plots differ between two runs: " + "; ".join(
        _explain(rel, files1[rel], files2[rel]) for rel in differ)
