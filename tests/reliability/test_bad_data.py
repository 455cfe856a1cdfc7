"""Bad input data: a clear error naming file, line and field; no traceback; nothing computed is lost.

Every jsonl reader of the pipeline -- training problems (drsft.data.load_problems), benchmarks
(load_benchmark), prepared problems, sample shards, verdicts, unsolved lists, training rows (the
checked readers in drsft.io and drsft.train.load_examples) -- is fed the same faults: non-UTF-8
bytes, a truncated last line, a duplicate key, a missing field, plus reader-specific ones.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drsft import io as dio
from drsft.data import load_benchmark, load_problems
from drsft.io import DataError

ROOT = Path(__file__).resolve().parents[2]
BASE_PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _params(tmp_path: Path, **sections) -> Path:
    data = json.loads(json.dumps(BASE_PARAMS))
    for name, values in sections.items():
        data[name].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- load_problems
@pytest.mark.parametrize("content, message", [
    (b'{"q": "p", "s": "no answer here"}\n', r"x.jsonl:1: field 's' has no answer"),
    (b'{"q": "ok", "s": "#### 1"}\n{"q": "  ", "s": "#### 2"}\n', r"x.jsonl:2: field 'q' is empty"),
    (b'{"s": "#### 2"}\n', r"x.jsonl:1: field 'q' is missing"),
    (b'{"q": "p", "s": "#### 1"}\n{"q": "p\xff", "s": "#### 2"}\n', r"x.jsonl:2:.*UTF-8"),
    (b'{"q": "p", "s": "#### 1"}\n{"q": "p", "s": "##', r"x.jsonl:2:.*truncated"),
    (b'{"id": "a", "q": "p", "s": "#### 1"}\n{"id": "a", "q": "p", "s": "#### 2"}\n',
     r"x.jsonl:2: field 'id' duplicate"),
    (b'{"q": "p", "s": "#### "}\n', r"x.jsonl:1: field 's' is empty"),
])
def test_bad_rows_name_file_line_field(tmp_path, content, message):
    path = tmp_path / "x.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_problems(path, "q", "s")


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_problems(tmp_path / "nope.jsonl", "q", "s")


# ------------------------------------------------------------------------------- load_benchmark
GOOD = {"math500": {"problem": "P", "solution": r"\boxed{1}", "answer": "1"},
        "minerva_math": {"problem": "P", "solution": r"\boxed{1}"},
        "olympiadbench": {"question": "Q", "final_answer": ["$1$"], "solution": ["s"]},
        "amc23": {"problem": "P", "answer": 1.0}}


@pytest.mark.parametrize("name, row, where", [
    ("minerva_math", {"problem": "P", "solution": "no box"}, "field 'solution' has no complete"),
    ("math500", {"problem": "P", "solution": "S"}, "field 'answer' is missing"),
    ("math500", {"problem": "P", "solution": "S", "answer": "  "}, "field 'answer' is empty"),
    ("olympiadbench", {"question": "Q", "final_answer": [], "solution": []}, "field 'final_answer' is empty"),
    ("olympiadbench", {"question": "Q", "final_answer": ["$ $"], "solution": []}, "field 'final_answer' is empty"),
    ("olympiadbench", {"question": "Q", "solution": []}, "field 'final_answer' is missing"),
    ("amc23", {"problem": "P", "answer": None}, "field 'answer' is missing"),
    ("amc23", {"problem": "P", "answer": float("nan")}, "field 'answer' is not a finite number"),
    ("amc23", {"problem": "", "answer": 3}, "field 'problem' is empty"),
])
def test_benchmark_row_without_usable_answer(tmp_path, name, row, where):
    """A benchmark row without a usable reference answer is an error (never a silent skip)."""
    path = _jsonl(tmp_path / "b.jsonl", [GOOD[name], row])
    with pytest.raises(DataError) as e:
        load_benchmark(name, path)
    assert "b.jsonl:2:" in str(e.value) and where in str(e.value), str(e.value)


def test_unknown_benchmark_schema(tmp_path):
    with pytest.raises(DataError, match=r"b.jsonl:1: unknown benchmark 'whatever'"):
        load_benchmark("whatever", _jsonl(tmp_path / "b.jsonl", [{"question": "Q"}]))


# ------------------------------------------------------------------------------- every reader, every fault
def _problem(i):
    return {"id": f"p{i}", "problem": f"{i}+1?", "solution": rf"\boxed{{{i + 1}}}", "answer": str(i + 1), "source": "t"}


def _sample(pid="p0", i=0, response=r"\boxed{1}"):
    return {"problem_id": pid, "sample_index": i, "prompt": "P", "response": response, "response_ids": [5, 6],
            "logprobs": [-0.1, -0.2], "finish_reason": "stop"}


def _verdict(pid="p0", i=0):
    return {"problem_id": pid, "sample_index": i, "correct": True, "reason": "ok", "extracted": "1"}


def _row(pid="p0", ids=(5, 6)):
    return {"problem_id": pid, "tier": "self", "prompt": "P", "response": "r", "response_ids": list(ids),
            "behaviour_logprobs": [-0.1] * len(ids), "plain_logprobs": [-0.1] * len(ids), "behaviour": "sampled"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from drsft.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


# reader name -> (file name, two distinct good rows, the field named on a duplicate, a required field,
#                 read(path, tokenizer))
READERS = {
    "prepared problems": ("train.jsonl", [_problem(0), _problem(1)], "id", "answer",
                          lambda p, tok: dio.read_problems(p)),
    # a row without problem/answer is not in the record format; "toy" names no published schema either
    "benchmark (record format)": ("toy.jsonl", [_problem(0), _problem(1)], "id", "problem",
                                  lambda p, tok: load_benchmark("toy", p)),
    "training problems (load_problems)": ("gsm.jsonl", [{"id": "a", "q": "x", "s": "#### 1"},
                                                        {"id": "b", "q": "y", "s": "#### 2"}], "id", "q",
                                          lambda p, tok: load_problems(p, "q", "s")),
    "sample shards": ("sample/shard-00000.jsonl", [_sample("p0", 0), _sample("p0", 1)], "sample_index",
                      "response_ids", lambda p, tok: dio.read_samples(p.parent, ["p0", "p1"])),
    "verdicts": ("verdicts.jsonl", [_verdict("p0", 0), _verdict("p0", 1)], "sample_index", "correct",
                 lambda p, tok: dio.read_verdicts(p)),
    "unsolved list": ("unsolved.jsonl", [{"problem_id": "p0"}, {"problem_id": "p1"}], "problem_id", "problem_id",
                      lambda p, tok: dio.read_problem_ids(p)),
    "training rows (fallback)": ("selected.jsonl", [_row("p0"), _row("p1")], "response_ids", "plain_logprobs",
                                 lambda p, tok: dio.read_training_rows(p)),
    "training rows (train)": ("rewritten.jsonl", [_row("p0"), _row("p1")], "response_ids", "prompt",
                              lambda p, tok: __import__("drsft.train", fromlist=["x"]).load_examples(p, tok, 64, 320)),
}


def _fault_bytes(fault: str, rows: list[dict], dup_field: str, required: str) -> tuple[bytes, str]:
    """File content with a good first line and the fault on line 2; the expected message regex."""
    first = json.dumps(rows[0]).encode() + b"\n"
    second = json.dumps(rows[1]).encode()
    if fault == "non-UTF-8 bytes":
        return first + second.replace(b'"', b'"\xff', 1) + b"\n", r":2:.*not valid UTF-8"
    if fault == "truncated last line":
        return first + second[: len(second) // 2], r":2:.*not valid JSON \(truncated last line\?\)"
    if fault == "duplicate id":
        return first + first, rf":2: field '{dup_field}' .*duplicate"
    if fault == "missing field":
        broken = {k: v for k, v in rows[1].items() if k != required}
        if dup_field == "id" and required == "problem":
            return first + json.dumps(broken).encode() + b"\n", r":2: unknown benchmark 'toy': rows need id/problem"
        return first + json.dumps(broken).encode() + b"\n", rf":2: field '{required}' is missing"
    raise AssertionError(fault)


@pytest.mark.parametrize("fault", ["non-UTF-8 bytes", "truncated last line", "duplicate id", "missing field"])
@pytest.mark.parametrize("reader", list(READERS))
def test_every_reader_names_file_line_field(tmp_path, tokenizer, reader, fault):
    name, rows, dup_field, required, read = READERS[reader]
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    read(path, tokenizer)  # the good file reads
    content, message = _fault_bytes(fault, rows, dup_field, required)
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as e:
        read(path, tokenizer)
    assert str(e.value).startswith(str(path) + ":2:"), str(e.value)


@pytest.mark.parametrize("rec, message", [
    ({**_problem(1), "problem": "   "}, "train.jsonl:2: field 'problem' is empty"),
    ({**_problem(1), "answer": ""}, "train.jsonl:2: field 'answer' is empty"),
    ({**_problem(1), "id": 7}, "train.jsonl:2: field 'id' must be str"),
    ([1, 2], "train.jsonl:2: expected a JSON object"),
])
def test_prepared_problem_fields(tmp_path, rec, message):
    path = _jsonl(tmp_path / "train.jsonl", [_problem(0), rec])
    with pytest.raises(DataError, match=message):
        dio.read_problems(path)
    with pytest.raises(DataError, match="has no problems"):
        dio.read_problems(_jsonl(tmp_path / "empty.jsonl", []))


@pytest.mark.parametrize("change, message", [
    ({"sample_index": -1}, "field 'sample_index' must be an integer >= 0"),
    ({"sample_index": True}, "field 'sample_index' must be"),
    ({"response": None}, "field 'response' is missing"),
    ({"response_ids": [1, "x"]}, "field 'response_ids' item 1 = 'x' is not a token id"),
    ({"logprobs": [-0.1]}, "field 'logprobs' must be a list of 2 log-probs"),
    ({"logprobs": [-0.1, 3.0]}, "field 'logprobs' item 1 = 3.0 is not a finite log-probability"),
    ({"finish_reason": "eos"}, "field 'finish_reason' must be one of stop, length"),
    ({"problem_id": "zz"}, "field 'problem_id' unknown problem 'zz'"),
])
def test_sample_fields(tmp_path, change, message):
    _jsonl(tmp_path / "s" / "shard-00000.jsonl", [_sample("p0", 0), {**_sample("p0", 1), **change}])
    with pytest.raises(DataError, match=r"shard-00000.jsonl:2:") as e:
        dio.read_samples(tmp_path / "s", ["p0"])
    assert message in str(e.value)
    _jsonl(tmp_path / "s" / "shard-00000.jsonl", [_sample("p0", 0), {**_sample("p0", 1), "response": ""}])
    assert len(dio.read_samples(tmp_path / "s", ["p0"])) == 2  # an empty response is a sample (a verdict later)


def test_samples_duplicate_across_shards_and_manifest(tmp_path):
    folder = tmp_path / "s"
    _jsonl(folder / "shard-00000.jsonl", [_sample("p0", 0)])
    _jsonl(folder / "shard-00001.jsonl", [_sample("p1", 0), _sample("p0", 0)])
    with pytest.raises(DataError, match=r"shard-00001.jsonl:2: field 'sample_index' duplicate sample "
                                        r"\('p0', 0\) \(first at shard-00000.jsonl:1\)"):
        dio.read_samples(folder)
    _jsonl(folder / "shard-00001.jsonl", [_sample("p1", 0)])
    assert [r["problem_id"] for r in dio.read_samples(folder, fields=("problem_id",))] == ["p0", "p1"]
    # a run that did not finish: the manifest lists a shard that is not there
    (folder / "manifest.json").write_text(json.dumps({"shards": ["shard-00000.jsonl", "shard-00001.jsonl",
                                                                 "shard-00002.jsonl"]}))
    with pytest.raises(DataError, match=r"manifest.json: field 'shards' lists 1 shard\(s\) that are missing, "
                                        r"e.g. shard-00002.jsonl"):
        dio.read_samples(folder)
    (folder / "manifest.json").write_text(json.dumps({"shards": ["shard-00000.jsonl"]}))
    with pytest.raises(DataError, match=r"shard-00001.jsonl: is not in manifest.json"):
        dio.read_samples(folder)
    with pytest.raises(DataError, match=r"empty: not found"):
        dio.read_samples(tmp_path / "empty")


def test_verdicts_must_match_the_samples(tmp_path):
    path = _jsonl(tmp_path / "v.jsonl", [_verdict("p0", 0), {**_verdict("p0", 1), "reason": "wrong"}])
    with pytest.raises(DataError, match=r"v.jsonl:2: field 'correct' correct=True contradicts reason 'wrong'"):
        dio.read_verdicts(path)
    path = _jsonl(tmp_path / "v.jsonl", [_verdict("p0", 0), {**_verdict("p0", 1), "reason": "maybe"}])
    with pytest.raises(DataError, match=r"v.jsonl:2: field 'reason' must be one of"):
        dio.read_verdicts(path)
    path = _jsonl(tmp_path / "v.jsonl", [_verdict("p0", 0), _verdict("p0", 1)])
    assert len(dio.read_verdicts(path, samples=[("p0", 0), ("p0", 1)])) == 2
    with pytest.raises(DataError, match=r"v.jsonl:2: field 'sample_index' verdict for \('p0', 1\), which is not a"):
        dio.read_verdicts(path, samples=[("p0", 0)])
    with pytest.raises(DataError, match=r"v.jsonl: 1 sample\(s\) have no verdict, e.g. \('p1', 0\)"):
        dio.read_verdicts(path, samples=[("p0", 0), ("p0", 1), ("p1", 0)])


def test_verdict_reasons_match_the_verifier():
    from drsft.verify import REASONS

    assert dio.VERDICT_REASONS == REASONS


# ------------------------------------------------------------------------------- the stages
def test_verify_stage_rejects_unknown_problem_without_traceback(tmp_path):
    """The real entry point: one 'Error: file:line: field ...' line, exit status 1, no traceback."""
    _jsonl(tmp_path / "prepare" / "train.jsonl", [_problem(0)])
    _jsonl(tmp_path / "sample" / "shard-00000.jsonl", [_sample("p0", 0), _sample("zz", 0, "x")])
    out = tmp_path / "verify" / "verdicts.jsonl"
    cmd = [sys.executable, str(ROOT / "stages" / "verify.py"), "--params", str(_params(tmp_path)),
           "--problems", str(tmp_path / "prepare" / "train.jsonl"), "--samples", str(tmp_path / "sample"),
           "--out", str(out), "--metrics", str(tmp_path / "metrics.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    expected = (f"Error: {tmp_path / 'sample' / 'shard-00000.jsonl'}:2: field 'problem_id' unknown problem "
                "'zz' (not in the problems file)")
    assert errors == [expected], proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("stage, bad, message", [
    ("verify", ("sample/shard-00000.jsonl", b'{"problem_id": "p0", "sample_index": 0, "prompt": "P", "response'),
     "shard-00000.jsonl:1:"),
    ("verify", ("prepare/train.jsonl", json.dumps(_problem(0)).encode() + b"\n" + json.dumps(_problem(0)).encode()),
     "train.jsonl:2: field 'id' duplicate id 'p0'"),
    ("self_align", ("verify/verdicts.jsonl", json.dumps(_verdict("p0", 0)).encode() + b"\n"),
     "verdicts.jsonl: 2 sample(s) have no verdict, e.g. ('p0', 1)"),
    ("self_align", ("sample/shard-00000.jsonl", json.dumps({**_sample("p0", 0), "logprobs": [0.5, -1]}).encode()),
     "shard-00000.jsonl:1: field 'logprobs' item 0 = 0.5"),
])
def test_stage_fails_cleanly_and_keeps_earlier_outputs(tmp_path, load_stage, stage, bad, message):
    """A bad input ends the stage with one clear line; the outputs of an earlier good run stay as they were."""
    from click.testing import CliRunner

    _jsonl(tmp_path / "prepare" / "train.jsonl", [_problem(0), _problem(1)])
    _jsonl(tmp_path / "sample" / "shard-00000.jsonl", [_sample("p0", 0), _sample("p0", 1, "no"), _sample("p1", 0)])
    _jsonl(tmp_path / "verify" / "verdicts.jsonl", [_verdict("p0", 0), {**_verdict("p0", 1), "correct": False,
                                                    "reason": "no_answer", "extracted": None}, _verdict("p1", 0)])
    t = str(tmp_path)
    args = {"verify": ["--problems", f"{t}/prepare/train.jsonl", "--samples", f"{t}/sample",
                       "--out", f"{t}/out/verdicts.jsonl", "--metrics", f"{t}/out/metrics.json"],
            "self_align": ["--problems", f"{t}/prepare/train.jsonl", "--samples", f"{t}/sample",
                           "--verdicts", f"{t}/verify/verdicts.jsonl", "--out", f"{t}/out",
                           "--metrics", f"{t}/out/metrics.json"]}[stage]
    main = load_stage(stage).main
    runner = CliRunner()
    params = str(_params(tmp_path, verify={"workers": 1}))
    good = runner.invoke(main, ["--params", params, *args])
    assert good.exit_code == 0, good.output
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert before
    (tmp_path / bad[0]).write_bytes(bad[1])
    result = runner.invoke(main, ["--params", params, *args])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert message in result.output, result.output
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
