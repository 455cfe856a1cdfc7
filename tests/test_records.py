"""Record files in either format (params ``records.format``): JSON lines and Parquet written and
read by the same functions, the Parquet columns typed (int32 token ids, float32 log-probs), bad
files named with their row and field, and the rewriting stages giving the same training rows in
both formats (log-probs equal to float32 precision)."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from conftest import ROOT
from drsft.io import (DataError, iter_records, read_records, read_samples, read_training_rows, record_file,
                      write_records)
from drsft.rollout import Completion

ROWS = [
    {"problem_id": "p0", "tier": "self", "prompt": "P0", "response": "a \\boxed{1}", "response_ids": [5, 6, 7],
     "behaviour_logprobs": [-0.1234567891, -2.5, -1e-9], "plain_logprobs": [-0.1234567891, -2.5, -1e-9],
     "behaviour": "sampled"},
    {"problem_id": "p1", "tier": "fallback", "prompt": "P1", "response": "b", "response_ids": [151935],
     "behaviour_logprobs": None, "plain_logprobs": [-7.25], "behaviour": "unknown", "note": "only here"},
]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_records_round_trip_with_every_field(tmp_path, fmt):
    path = record_file(tmp_path, "rows", fmt)
    assert write_records(path, ROWS) == 2 and path.suffix == f".{fmt}"
    back = read_records(path)
    assert [r["problem_id"] for r in back] == ["p0", "p1"]
    assert back[0]["response_ids"] == [5, 6, 7] and back[1]["response_ids"] == [151935]
    assert back[1]["behaviour_logprobs"] is None and back[1]["note"] == "only here"  # a key of the 2nd row only
    for got, want in zip(back[0]["plain_logprobs"], ROWS[0]["plain_logprobs"]):
        assert got == want if fmt == "jsonl" else math.isclose(got, want, rel_tol=1e-7)
    assert back[0].get("note") is None            # absent in JSON lines, null in Parquet
    assert [line for line, _ in iter_records(path)] == [1, 2]
    read_training_rows(path)                      # the checked reader accepts both


def test_parquet_columns_are_compact_typed_and_readable_by_pandas(tmp_path):
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = record_file(tmp_path, "rows", "parquet")
    write_records(path, ROWS)
    schema = pq.read_schema(path)
    assert schema.field("response_ids").type == pa.list_(pa.int32())
    assert schema.field("plain_logprobs").type == pa.list_(pa.float32())
    assert schema.field("behaviour_logprobs").type == pa.list_(pa.float32())
    meta = pq.ParquetFile(path).metadata.row_group(0)
    encodings = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    for leaf in ("response_ids.list.element", "plain_logprobs.list.element", "behaviour_logprobs.list.element"):
        assert "BYTE_STREAM_SPLIT" in encodings[leaf], (leaf, encodings[leaf])
    df = pd.read_parquet(path)
    assert list(df["problem_id"]) == ["p0", "p1"] and list(df["response_ids"][0]) == [5, 6, 7]
    # the same records give the same bytes (DVC's md5 of an output must not change on a rerun)
    again = tmp_path / "again.parquet"
    write_records(again, ROWS)
    assert again.read_bytes() == path.read_bytes()


def test_writing_one_format_removes_the_other(tmp_path):
    write_records(tmp_path / "selected.jsonl", ROWS)
    write_records(tmp_path / "selected.parquet", ROWS)
    assert not (tmp_path / "selected.jsonl").exists()
    write_records(tmp_path / "selected.jsonl", ROWS)
    assert not (tmp_path / "selected.parquet").exists()


def test_records_that_parquet_cannot_hold_are_refused_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="field 'response_ids'"):
        write_records(tmp_path / "x.parquet", [{**ROWS[0], "response_ids": [1, 2 ** 40, 3]}])
    assert not (tmp_path / "x.parquet").exists()


def test_parquet_stores_a_lone_surrogate_as_its_escape_and_empty_outputs(tmp_path):
    path = tmp_path / "resolves.parquet"
    write_records(path, [{**ROWS[0], "response": "x \udcff y"}])   # broken model output
    assert read_records(path)[0]["response"] == "x \\udcff y"
    write_records(path, [])                                        # guided_align.n 0: empty outputs
    assert read_records(path) == [] and read_training_rows(path) == []


def test_a_bad_parquet_row_is_named_by_file_row_and_field(tmp_path):
    path = tmp_path / "rewritten.parquet"
    write_records(path, [ROWS[0], {**ROWS[1], "plain_logprobs": [-1.0, -2.0]}])
    with pytest.raises(DataError) as err:
        read_training_rows(path)
    assert err.value.path == str(path) and err.value.line == 2 and err.value.field == "plain_logprobs"


def test_a_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "shard-00000.parquet"
    write_records(path, ROWS)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="shard-00000.parquet.*not a readable Parquet file"):
        read_records(path)


def test_float16_log_probs_need_parquet():
    from drsft.schema import check

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    data["records"].update(format="parquet", logprob_dtype="float16")
    assert check(data) == []
    data["records"]["format"] = "jsonl"
    problems = dict(check(data))
    assert list(problems) == ["records.logprob_dtype"] and "needs records.format parquet" in problems[
        "records.logprob_dtype"]


def test_run_sharded_in_parquet_and_a_format_change_starts_over(tmp_path):
    from drsft.shards import run_sharded

    calls = []

    def process(chunk):
        calls.append(list(chunk))
        return [{"key": str(i), "logprobs": [-0.5 * i]} for i in chunk]

    run = run_sharded(list(range(5)), tmp_path, 2, {"x": 1}, process, fmt="parquet")
    assert [p.name for p in run.paths] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    again = run_sharded(list(range(5)), tmp_path, 2, {"x": 1}, process, fmt="parquet")
    assert again.resumed == [0, 1, 2] and len(calls) == 3
    as_json = run_sharded(list(range(5)), tmp_path, 2, {"x": 1}, process, fmt="jsonl")
    assert as_json.generated == [0, 1, 2] and not list(tmp_path.glob("*.parquet"))
    assert [r["key"] for p in as_json.paths for r in read_records(p)] == ["0", "1", "2", "3", "4"]


def test_float16_log_probs_round_once_and_a_dtype_change_starts_the_shards_over(tmp_path):
    from drsft.shards import MANIFEST, run_sharded

    path = tmp_path / "rows.parquet"
    write_records(path, ROWS, "float16")
    assert pq.read_schema(path).field("plain_logprobs").type == pa.list_(pa.float16())
    back = read_records(path)
    assert back[0]["plain_logprobs"] == [float(np.float16(x)) for x in ROWS[0]["plain_logprobs"]]
    assert back[0]["plain_logprobs"] != ROWS[0]["plain_logprobs"]        # rounded: -0.1234567891 is not a half
    assert back[1]["plain_logprobs"] == [-7.25] and back[1]["behaviour_logprobs"] is None
    assert pq.read_schema(path).field("response_ids").type == pa.list_(pa.int32())
    with pytest.raises(ValueError, match="float64"):
        write_records(path, ROWS, "float64")

    calls = []

    def process(chunk):
        calls.append(list(chunk))
        return [{"key": str(i), "logprobs": [-0.1 * (i + 1)]} for i in chunk]

    out = tmp_path / "shards"
    run_sharded(list(range(4)), out, 2, {"x": 1}, process, fmt="parquet")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["logprob_dtype"] == "float32"
    # a manifest from before the dtype was recorded was written at float32: its shards resume
    (out / MANIFEST).write_text(json.dumps({k: v for k, v in manifest.items() if k != "logprob_dtype"}))
    assert run_sharded(list(range(4)), out, 2, {"x": 1}, process, fmt="parquet").resumed == [0, 1]
    half = run_sharded(list(range(4)), out, 2, {"x": 1}, process, fmt="parquet", logprob_dtype="float16")
    assert half.generated == [0, 1] and len(calls) == 4
    assert [r["logprobs"] for p in half.paths for r in read_records(p)] == \
           [[float(np.float16(-0.1 * (i + 1)))] for i in range(4)]
    assert run_sharded(list(range(4)), out, 2, {"x": 1}, process, fmt="parquet", logprob_dtype="float16").resumed \
           == [0, 1]


def test_read_samples_keeps_only_keys_of_the_records_not_wanted_whole(tmp_path):
    samples = [{"problem_id": "p0", "sample_index": j, "prompt": "P", "response": f"r{j}", "response_ids": [1, 2],
                "logprobs": [-0.5, -0.25], "finish_reason": "stop"} for j in range(3)]
    write_records(tmp_path / "shard-00000.parquet", samples)
    got = read_samples(tmp_path, ["p0"], full=lambda r: r["sample_index"] == 1)
    assert got[0] == {"problem_id": "p0", "sample_index": 0, "finish_reason": "stop"}
    assert got[1]["response_ids"] == [1, 2] and got[1]["response"] == "r1"


# --------------------------------------------------------------------------------------------------
# The rewriting stages in both formats

PROBLEMS = [
    {"id": "p0", "problem": "Compute $3 + 4$.", "solution": "3 + 4 = 7. \\boxed{7}", "answer": "7", "source": "arith"},
    {"id": "p1", "problem": "Compute $1 + 1$.", "solution": "1 + 1 = 2. \\boxed{2}", "answer": "2", "source": "arith"},
    {"id": "p2", "problem": "Compute $2 + 3$.", "solution": "2 + 3 = 5. \\boxed{5}", "answer": "5", "source": "arith"},
]


class Scripted:
    """Plain prompts: p0's sample 0 is right, every other sample wrong. Guided prompts: p1 re-solved
    (standalone), p2 wrong. So the tiers are p0 self, p1 guided, p2 fallback."""

    def __init__(self, tok):
        self.tok = tok

    def generate(self, prompts, sp, progress=False):
        out = []
        for prompt in prompts:
            pid = next(p["id"] for p in PROBLEMS if p["problem"] in prompt)
            guided = "Hint" in prompt
            row = []
            for j in range(sp.n):
                right = (pid == "p0" and j == 0 and not guided) or (pid == "p1" and guided)
                answer = next(p["answer"] for p in PROBLEMS if p["id"] == pid) if right else "0"
                text = f"We compute it. \\boxed{{{answer}}}"
                ids = self.tok(text, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                row.append(Completion(text, ids, [-0.1234567 * (k + 1) / len(ids) for k in range(len(ids))], "stop"))
            out.append(row)
        return out


def _chain(work, fmt, tiny_model_dir, prompt_cfg, load_stage, monkeypatch, dtype="float32"):
    from drsft.models import load_tokenizer

    work.mkdir()
    (work / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prompt"].update(prompt_cfg)
    params["records"].update(format=fmt, logprob_dtype=dtype)
    params["sample"].update(n=2, shard_size=2)
    params["guided_align"].update(n=2, shard_size=1, score_shard_size=1)
    params["fallback"].update(shard_size=2)
    params["verify"].update(workers=1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    backend = Scripted(load_tokenizer(tiny_model_dir))
    p, m = ["--params", str(work / "params.yaml")], work / "metrics"
    steps = [
        ("sample", ["--problems", work / "train.jsonl", "--model", tiny_model_dir, "--out", work / "sample",
                    "--metrics", m / "sample.json", "--no-progress"]),
        ("verify", ["--problems", work / "train.jsonl", "--samples", work / "sample",
                    "--out", work / "verify" / "verdicts.jsonl", "--metrics", m / "verify.json"]),
        ("self_align", ["--problems", work / "train.jsonl", "--samples", work / "sample",
                        "--verdicts", work / "verify" / "verdicts.jsonl", "--out", work / "self_align",
                        "--metrics", m / "self.json"]),
        ("guided_align", ["--problems", work / "train.jsonl", "--unsolved", work / "self_align" / "unsolved.jsonl",
                          "--model", tiny_model_dir, "--out", work / "guided", "--metrics", m / "guided.json",
                          "--no-progress"]),
        ("fallback", ["--problems", work / "train.jsonl",
                      "--self-rows", record_file(work / "self_align", "selected", fmt),
                      "--guided-rows", record_file(work / "guided", "selected", fmt),
                      "--unsolved", work / "guided" / "unsolved.jsonl", "--self-metrics", m / "self.json",
                      "--guided-metrics", m / "guided.json", "--model", tiny_model_dir, "--out", work / "train",
                      "--shards", work / "fallback_shards", "--metrics", m / "rewrite.json",
                      "--plot-csv", m / "nll.csv", "--tiers-csv", m / "tiers.csv", "--no-progress"]),
    ]
    for name, args in steps:
        stage = load_stage(name)
        if hasattr(stage, "make_backend"):
            monkeypatch.setattr(stage, "make_backend", lambda *a, **k: backend)
        result = CliRunner().invoke(stage.main, p + [str(a) for a in args])
        assert result.exit_code == 0, f"{name} ({fmt}): {result.output} {result.exception!r}"
    return work


def test_the_rewriting_stages_give_the_same_rows_in_parquet_as_in_json_lines(tmp_path, tiny_model_dir, prompt_cfg,
                                                                                load_stage, monkeypatch):
    from drsft.models import load_tokenizer
    from drsft.train import load_examples

    runs = {fmt: _chain(tmp_path / fmt, fmt, tiny_model_dir, prompt_cfg, load_stage, monkeypatch)
            for fmt in ("jsonl", "parquet")}
    half = _chain(tmp_path / "half", "parquet", tiny_model_dir, prompt_cfg, load_stage, monkeypatch, "float16")
    pq_run = runs["parquet"]
    for folder in ("sample", "guided/shards", "guided/score_shards", "fallback_shards"):
        names = sorted(f.suffix for f in (pq_run / folder).glob("shard-*"))
        assert names and set(names) == {".parquet"}, (folder, names)
    for f in ("self_align/selected", "guided/selected", "guided/resolves", "train/rewritten", "train/expert"):
        assert (pq_run / f"{f}.parquet").exists() and not (pq_run / f"{f}.jsonl").exists(), f
    assert (json.loads((runs["jsonl"] / "metrics" / "rewrite.json").read_text())["tiers"]
            == json.loads((pq_run / "metrics" / "rewrite.json").read_text())["tiers"])

    tok = load_tokenizer(tiny_model_dir)
    for kind in ("rewritten", "expert"):
        rows = {fmt: read_training_rows(record_file(runs[fmt] / "train", kind, fmt)) for fmt in runs}
        assert [r["tier"] for r in rows["jsonl"]] == [r["tier"] for r in rows["parquet"]]
        if kind == "rewritten":
            assert [r["tier"] for r in rows["jsonl"]] == ["self", "guided", "fallback"]
        for a, b in zip(rows["jsonl"], rows["parquet"]):
            assert {k: v for k, v in a.items() if not k.endswith("logprobs")} == \
                   {k: v for k, v in b.items() if not k.endswith("logprobs")}
            for key in ("behaviour_logprobs", "plain_logprobs"):
                if a[key] is None:
                    assert b[key] is None
                else:
                    assert len(a[key]) == len(b[key])
                    assert all(math.isclose(x, y, rel_tol=2e-7, abs_tol=1e-12) for x, y in zip(a[key], b[key]))
        ex = {fmt: load_examples(record_file(runs[fmt] / "train", kind, fmt), tok, 256, len(tok))[0] for fmt in runs}
        assert [e.input_ids for e in ex["jsonl"]] == [e.input_ids for e in ex["parquet"]]
        # records.logprob_dtype float16: the same rows, every log-prob the float16 rounding of the full one
        halves = read_training_rows(record_file(half / "train", kind, "parquet"))
        assert len(halves) == len(rows["jsonl"])
        for a, b in zip(rows["jsonl"], halves):
            assert {k: v for k, v in a.items() if not k.endswith("logprobs")} == \
                   {k: v for k, v in b.items() if not k.endswith("logprobs")}
            for key in ("behaviour_logprobs", "plain_logprobs"):
                assert (b[key] is None if a[key] is None else b[key] == [float(np.float16(x)) for x in a[key]]), key
    for f in ("sample/shard-00000", "guided/score_shards/shard-00000", "fallback_shards/shard-00000",
              "self_align/selected", "train/rewritten", "train/expert"):
        schema = pq.read_schema(half / f"{f}.parquet")
        for name in ("logprobs", "behaviour_logprobs", "plain_logprobs"):
            if name in schema.names:
                assert schema.field(name).type == pa.list_(pa.float16()), (f, name)


def test_items_in_counts_the_items_of_given_shards():
    from drsft.shards import items_in

    for n in range(12):
        for size in (1, 3, 5):
            items, count = list(range(n)), (n + size - 1) // size
            for shards in ([], list(range(count)), list(range(0, count, 2)), [count - 1] if count else []):
                assert items_in(shards, n, size) == sum(len(items[i * size:(i + 1) * size]) for i in shards)
