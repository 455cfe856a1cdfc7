"""Disk full or an unwritable out path: a clear error naming the path, before hours of work.

* :func:`drsft.stage.preflight` (called by prepare, sample, guided_align, train and evaluate right
  after their params are read, before any model is loaded) probes every output folder with a real
  file and checks the free space against the stage's estimate.
* A write that fails anyway (ENOSPC mid-stage) leaves no partial file and names the file.

Tests run as root, so ``chmod`` cannot make a folder unwritable: an unwritable path here is one
under a regular file, or under ``/proc``; the full disk is ``/dev/full`` (real ENOSPC from the kernel).
"""

import errno
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from drsft import io as dio
from drsft import stage as S
from drsft.io import WriteError

ROOT = Path(__file__).resolve().parents[2]
needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")


# ------------------------------------------------------------------------------- preflight
def test_preflight_creates_folders_and_leaves_no_probe(tmp_path):
    outs = [tmp_path / "data" / "sample", tmp_path / "metrics" / "sample.json", tmp_path / "existing"]
    (tmp_path / "existing").mkdir()
    S.preflight(outs, need_bytes=1)
    assert (tmp_path / "data").is_dir() and (tmp_path / "metrics").is_dir()
    assert not (tmp_path / "metrics" / "sample.json").exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_preflight_out_under_a_regular_file(tmp_path):
    (tmp_path / "blocker").write_text("a file, not a folder")
    out = tmp_path / "blocker" / "sample" / "shard-00000.jsonl"
    with pytest.raises(WriteError) as e:
        S.preflight([tmp_path / "ok.json", out])
    msg = str(e.value)
    assert msg.startswith(str(out) + ": cannot create its folder")
    assert "Not a directory" in msg or "File exists" in msg
    assert e.value.errno in (errno.ENOTDIR, errno.EEXIST)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")
@pytest.mark.parametrize("out", ["/proc/drsft-out/metrics.json", "/proc/drsft-out.json"])
def test_preflight_out_under_proc(out):
    with pytest.raises(WriteError) as e:
        S.preflight([out])
    assert str(e.value).startswith(out + ": cannot ")


def test_preflight_not_enough_space_names_path_free_and_needed(tmp_path, monkeypatch):
    out = tmp_path / "data" / "sample"
    need = 10 ** 18  # an exabyte: more than any disk this runs on
    with pytest.raises(WriteError) as e:
        S.preflight([out, tmp_path / "metrics.json"], need_bytes=need)
    msg = str(e.value)
    assert re.match(rf"{re.escape(str(out))}: not enough free space: \d+ bytes \([\d.]+ [KMGT]?i?B\) free", msg), msg
    assert f"the stage needs about {need} bytes" in msg
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setenv("DRSFT_SKIP_SPACE_CHECK", "1")
    S.preflight([out], need_bytes=need)  # the documented escape hatch


def test_space_estimates():
    assert S.sequences_bytes(10, 100) == 10 * (100 * S.BYTES_PER_TOKEN + S.PROMPT_BYTES)
    assert S.sequences_bytes(0, 100) == 0
    assert S.prepare_bytes({"source": "toy"}) == S.TOY_PREPARE_BYTES
    assert S.count_records("/nonexistent/file.jsonl") == 0


def test_estimates_of_real_files(tmp_path, tiny_model_dir):
    (tmp_path / "a.jsonl").write_text('{"x": 1}\n\n{"x": 2}\n', encoding="utf-8")
    assert S.count_records(tmp_path / "a.jsonl") == 2
    weights = sum(f.stat().st_size for f in Path(tiny_model_dir).iterdir() if f.suffix in (".safetensors", ".bin"))
    assert weights > 0 and S.weights_bytes(tiny_model_dir) == weights
    ref = tmp_path / "base"
    ref.mkdir()
    (ref / "reference.json").write_text(json.dumps({"model": str(tiny_model_dir)}), encoding="utf-8")
    assert S.weights_bytes(ref) == weights  # followed, as resolve_model does
    (ref / "reference.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-Math-7B"}), encoding="utf-8")
    assert S.weights_bytes(ref) == 0  # a hub id: unknown offline
    prep = {"source": "files", "files": {"train": {"path": str(tmp_path / "a.jsonl")},
                                         "benchmarks": [{"name": "b", "path": str(tmp_path / "a.jsonl")}]}}
    assert S.prepare_bytes(prep) == 4 * 2 * (tmp_path / "a.jsonl").stat().st_size


# ------------------------------------------------------------------------------- a write that fails
def _full_disk(monkeypatch, tmp_path):
    """Make drsft.io's atomic writer write to /dev/full (ENOSPC from the kernel) through its own code path:
    its temporary file is a real placeholder in the target folder whose descriptor is /dev/full."""
    made = []

    def mkstemp(dir=None, prefix="", suffix=""):
        tmp = Path(dir) / f"{prefix}fullplaceholder{suffix}"
        tmp.write_bytes(b"")
        made.append(tmp)
        return os.open("/dev/full", os.O_WRONLY), str(tmp)

    monkeypatch.setattr(dio.tempfile, "mkstemp", mkstemp)
    return made


@needs_dev_full
@pytest.mark.parametrize("writer", ["jsonl", "json", "csv"])
def test_disk_full_mid_write_leaves_no_partial_file(tmp_path, monkeypatch, writer):
    target = tmp_path / "out" / f"result.{writer}"
    target.parent.mkdir()
    target.write_text("the previous, complete result\n", encoding="utf-8")
    made = _full_disk(monkeypatch, tmp_path)
    rows = [{"i": i, "text": "x" * 100} for i in range(2000)]
    with pytest.raises(WriteError) as e:
        if writer == "jsonl":
            dio.write_jsonl(target, rows)
        elif writer == "json":
            dio.write_json(target, rows)
        else:
            dio.write_csv(target, rows, ["i", "text"])
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).startswith(f"{target}: cannot write: No space left on device")
    assert "no partial file left" in str(e.value)
    assert made and not any(p.exists() for p in made)  # the temporary file is gone
    assert sorted(p.name for p in target.parent.iterdir()) == ["result." + writer]
    assert target.read_text(encoding="utf-8") == "the previous, complete result\n"  # untouched


def test_write_into_a_regular_file_names_the_target(tmp_path):
    (tmp_path / "blocker").write_text("x")
    target = tmp_path / "blocker" / "verdicts.jsonl"
    with pytest.raises(WriteError, match=r"blocker/verdicts.jsonl: cannot write: "):
        dio.write_jsonl(target, [{"a": 1}])


def test_other_errors_inside_the_block_pass_through(tmp_path):
    """Only the write's own OSErrors become WriteError; a bad record is still its own error."""
    def rows():
        yield {"a": 1}
        raise FileNotFoundError(2, "No such file or directory", "/some/input.jsonl")

    with pytest.raises(FileNotFoundError):
        dio.write_jsonl(tmp_path / "x.jsonl", rows())
    with pytest.raises(ValueError):
        dio.write_jsonl(tmp_path / "x.jsonl", [{"a": float("nan")}])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------- the stages

def _inputs(tmp_path: Path, model_dir: Path) -> dict[str, list[str]]:
    """Small inputs for each long stage and its command line; the model path does not exist unless the
    stage needs its size (train), so a stage that loaded a model before its preflight would fail otherwise."""
    problem = {"id": "p0", "problem": "1+1?", "solution": r"\boxed{2}", "answer": "2", "source": "t"}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "train.jsonl").write_text(json.dumps(problem) + "\n", encoding="utf-8")
    (tmp_path / "in" / "unsolved.jsonl").write_text('{"problem_id": "p0"}\n', encoding="utf-8")
    (tmp_path / "in" / "bench").mkdir()
    (tmp_path / "in" / "bench" / "toy_arith.jsonl").write_text(json.dumps(problem) + "\n", encoding="utf-8")
    i, o, nomodel = tmp_path / "in", "{out}", str(tmp_path / "no-model")
    return {
        "prepare": ["--data", f"{o}/data", "--model", f"{o}/models/base", "--metrics", f"{o}/metrics/prepare.json"],
        "sample": ["--problems", f"{i}/train.jsonl", "--model", nomodel, "--out", f"{o}/data/sample",
                   "--metrics", f"{o}/metrics/sample.json"],
        "guided_align": ["--problems", f"{i}/train.jsonl", "--unsolved", f"{i}/unsolved.jsonl", "--model", nomodel,
                         "--out", f"{o}/data/guided_align", "--metrics", f"{o}/metrics/guided_align.json"],
        "train": ["--data-dir", str(tmp_path / "no-data"), "--model", str(model_dir), "--out", f"{o}/models/trained",
                  "--checkpoints", f"{o}/models/checkpoints", "--metrics", f"{o}/metrics/train.json",
                  "--live-dir", f"{o}/dvclive/train"],
        "evaluate": ["--model", nomodel, "--benchmarks-dir", f"{i}/bench", "--out", f"{o}/data/evaluate",
                     "--metrics", f"{o}/metrics/evaluate.json"],
    }


def _forbid_work(monkeypatch):
    """Loading a model, building the toy world or training before the preflight fails the test at once."""
    import drsft.models
    import drsft.rollout
    import drsft.train
    import drsft.toy.world

    def boom(*args, **kwargs):
        raise AssertionError("work started before the preflight check")

    for mod, name in [(drsft.models, "load_model"), (drsft.models, "load_tokenizer"), (drsft.rollout, "make_backend"),
                      (drsft.toy.world, "make_world"), (drsft.train, "train")]:
        monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("fault", ["unwritable", "disk full"])
@pytest.mark.parametrize("stage", ["prepare", "sample", "guided_align", "train", "evaluate"])
def test_long_stages_fail_before_any_work(tmp_path, monkeypatch, tiny_model_dir, load_stage, stage, fault):
    from click.testing import CliRunner

    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["evaluate"]["benchmarks"] = ["toy_arith"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    args = _inputs(tmp_path, Path(tiny_model_dir))[stage]
    if fault == "unwritable":
        (tmp_path / "blocker").write_text("a regular file")
        out = tmp_path / "blocker"
    else:
        out = tmp_path / "out"
        monkeypatch.setattr(S, "free_bytes", lambda path: 1000)  # the file system has 1000 bytes free
    args = [a.replace("{out}", str(out)) for a in args]
    _forbid_work(monkeypatch)  # before the stage module binds these names
    result = CliRunner().invoke(load_stage(stage).main, ["--params", str(tmp_path / "params.yaml"), *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), (result.output, result.exception)
    line = result.output.strip().splitlines()[-1]
    if fault == "unwritable":
        assert line.startswith(f"Error: {out}/") and ": cannot create its folder" in line, line
    else:
        assert line.startswith(f"Error: {out}/") and "not enough free space: 1000 bytes" in line, line
        assert "the stage needs about" in line
    if fault == "disk full":  # nothing was written but empty folders
        assert [p for p in out.rglob("*") if p.is_file()] == []
