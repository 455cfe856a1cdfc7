"""Real-scale loaders: training problems (jsonl/parquet, GSM8K normalisation) and benchmarks."""

import json
from pathlib import Path

import pytest

from drsft.data import gsm8k_split, load_benchmark, load_problems
from drsft.io import DataError
from drsft.verify import extract_boxed

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "benchmarks"
GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k_train.jsonl"


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GSM_ROW = {"question": "Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
           "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                     "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72"}


# ------------------------------------------------------------------------------- load_problems
def test_gsm8k_answer_and_solution_are_consistent(tmp_path):
    big = {"question": "How much?", "answer": "It costs 1,000 + 200 = <<1000+200=1200>>1,200 dollars.\n#### 1,200"}
    rows = load_problems(_jsonl(tmp_path / "g.jsonl", [GSM_ROW, big]), "question", "answer", source="gsm8k")
    a, b = rows
    assert a["id"] == "gsm8k-00000" and b["id"] == "gsm8k-00001"
    assert a["answer"] == "72" and b["answer"] == "1200"
    assert "<<" not in a["solution"] and "####" not in a["solution"]
    assert a["solution"].startswith("Natalia sold 48/2 = 24 clips in May.")
    assert a["solution"].endswith(r"\boxed{72}")
    assert extract_boxed(b["solution"]) == b["answer"]
    assert set(a) == {"id", "problem", "solution", "answer", "source"} and a["source"] == "gsm8k"


def test_gsm8k_split():
    assert gsm8k_split("a <<1+1=2>>2\n#### -3,000.5") == ("a 2", "-3000.5")
    assert gsm8k_split(r"no marker \boxed{3}") is None


def test_answer_from_last_boxed_or_from_a_field(tmp_path):
    rows = [{"q": "p1", "s": r"first \boxed{1}, finally \boxed{\frac{1}{2}}."},
            {"q": "p2", "s": r"so \boxed{x = 3}", "a": 3}]
    path = _jsonl(tmp_path / "m.jsonl", rows)
    assert [r["answer"] for r in load_problems(path, "q", "s", limit=1)] == [r"\frac{1}{2}"]
    with pytest.raises(DataError) as e:
        load_problems(path, "q", "s", answer="a")  # row 1 has no 'a'
    assert "m.jsonl:1" in str(e.value) and "'a'" in str(e.value)
    got = load_problems(_jsonl(tmp_path / "m2.jsonl", rows[1:]), "q", "s", answer="a")
    assert got[0]["answer"] == "3" and got[0]["id"] == "m2-00000"


def test_limit_and_id_field(tmp_path):
    rows = [{"id": f"x{i}", "q": f"p{i}", "s": rf"\boxed{{{i}}}"} for i in range(5)]
    got = load_problems(_jsonl(tmp_path / "f.jsonl", rows), "q", "s", limit=3)
    assert [r["id"] for r in got] == ["x0", "x1", "x2"]
    assert [r["answer"] for r in got] == ["0", "1", "2"]


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "t.parquet"
    pd.DataFrame([GSM_ROW, {"question": "Q2", "answer": "x\n#### 5"}]).to_parquet(path)
    rows = load_problems(path, "question", "answer")
    assert [r["answer"] for r in rows] == ["72", "5"] and rows[1]["id"] == "t-00001"
    pd.DataFrame([{"question": "", "answer": "#### 1"}]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad.parquet:1: field 'question' is empty"):
        load_problems(tmp_path / "bad.parquet", "question", "answer")


# ------------------------------------------------------------------------------- load_benchmark
def test_record_format_files_are_read_as_is(tmp_path):
    rows = [{"id": "toy_arith-0000", "problem": "1+1?", "solution": r"\boxed{2}", "answer": "2", "source": "toy_arith"},
            {"id": "toy_arith-0001", "problem": "2+2?", "answer": "4"}]
    got = load_benchmark("toy_arith", _jsonl(tmp_path / "toy_arith.jsonl", rows))
    assert got[0] == rows[0]
    assert got[1] == {"id": "toy_arith-0001", "problem": "2+2?", "solution": "", "answer": "4", "source": "toy_arith"}
    # a prepared file keeps its ids whatever its name
    assert load_benchmark("math500", tmp_path / "toy_arith.jsonl")[0]["id"] == "toy_arith-0000"


def test_published_schemas_on_small_files(tmp_path):
    d = tmp_path
    got = load_benchmark("amc23", _jsonl(d / "a.jsonl", [{"id": 0, "problem": "P", "answer": 27.0},
                                                        {"id": 1, "problem": "Q", "answer": 2.5}]))
    assert [(r["id"], r["answer"], r["solution"]) for r in got] == [("amc23-0000", "27", ""), ("amc23-0001", "2.5", "")]
    got = load_benchmark("olympiadbench", _jsonl(d / "o.jsonl", [
        {"id": 7, "question": "Q", "final_answer": ["$69$,$84$"], "solution": ["s1", "s2"]},
        {"id": 8, "question": "Q2", "final_answer": ["$3$", "$x=2$"], "solution": ["s"]}]))
    assert got[0]["answer"] == "69,84" and got[0]["solution"] == "s1\n\ns2" and got[0]["problem"] == "Q"
    assert got[1]["answer"] == "3, x=2"
    got = load_benchmark("minerva_math", _jsonl(d / "m.jsonl", [{"problem": "P", "solution": r"so $\boxed{1.6}$ cm"}]))
    assert got[0]["answer"] == "1.6"
    got = load_benchmark("aime24", _jsonl(d / "i.jsonl", [{"id": 60, "problem": "P", "solution": "S",
                                                         "answer": "204"}]))
    assert got[0] == {"id": "aime24-0000", "problem": "P", "solution": "S", "answer": "204", "source": "aime24"}


@pytest.mark.skipif(not BENCH.exists(), reason="../shared/benchmarks not present")
@pytest.mark.parametrize("name, n", [("math500", 500), ("minerva_math", 272), ("olympiadbench", 675),
                                     ("aime24", 30), ("amc23", 40)])
def test_real_benchmarks_load(name, n):
    rows = load_benchmark(name, BENCH / f"{name}.jsonl")
    assert len(rows) == n and len({r["id"] for r in rows}) == n
    assert all(r["problem"].strip() and r["answer"] and r["source"] == name for r in rows)
    assert rows[0]["id"] == f"{name}-0000"
    if name == "math500":
        assert rows[0]["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    if name == "amc23":
        assert rows[0]["answer"] == "27"
    if name == "olympiadbench":
        assert all("$" not in r["answer"] for r in rows)


@pytest.mark.skipif(not GSM8K.exists(), reason="../shared/datasets not present")
def test_real_gsm8k_loads():
    rows = load_problems(GSM8K, "question", "answer", source="gsm8k")
    assert len(rows) == 7473 and rows[0]["id"] == "gsm8k-00000" and rows[0]["answer"] == "72"
    assert all(extract_boxed(r["solution"]) == r["answer"] and "<<" not in r["solution"] for r in rows)
    assert all("," not in r["answer"] for r in rows)


# ------------------------------------------------------------------------------- input provenance
def test_file_provenance_records_size_and_sha256(tmp_path):
    import hashlib

    path = _jsonl(tmp_path / "g.jsonl", [GSM_ROW])
    prov: dict = {}
    load_problems(path, "question", "answer", provenance=prov)
    assert prov == {"path": str(path), "bytes": path.stat().st_size,
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    bench: dict = {}
    load_benchmark("mine", _jsonl(tmp_path / "b.jsonl", [{"id": "b-1", "problem": "1+1?", "answer": "2"}]),
                   provenance=bench)
    assert bench["sha256"] == hashlib.sha256((tmp_path / "b.jsonl").read_bytes()).hexdigest()


@pytest.mark.parametrize("spec,want", [
    ("AI-MO/NuminaMath-CoT@9d8d210#train", ("AI-MO/NuminaMath-CoT", None, "9d8d210", "train")),
    ("owner/name:main@v1.0", ("owner/name", "main", "v1.0", "train")),
    ("owner/name@refs/pr/1#test[:100]", ("owner/name", None, "refs/pr/1", "test[:100]")),
    ("owner/name", ("owner/name", None, None, "train")),
    ("data/x.jsonl", None), ("../shared/x.jsonl", None), ("a b/c", None), ("owner/name:cfg.parquet", None),
])
def test_parse_hub_spec(spec, want):
    from drsft.hubspec import parse_hub_spec

    got = parse_hub_spec(spec)
    assert (got if got is None else (got.repo, got.config, got.revision, got.split)) == want


class _StandInBuilder:
    """What drsft.data needs of datasets.DatasetBuilder: ``hash`` (the commit read), prepare, as_dataset."""

    calls: list = []

    def __init__(self, repo, config, revision):
        self.hash = "0123456789abcdef0123456789abcdef01234567"
        _StandInBuilder.calls.append((repo, config, revision))

    def download_and_prepare(self):
        pass

    def as_dataset(self, split):
        _StandInBuilder.calls.append(split)
        return [{"problem": "What is 2+3?", "solution": "2+3=5, so \\boxed{5}.", "answer": "5"}]


def test_hub_dataset_is_read_at_a_pinned_revision_and_its_commit_recorded(monkeypatch):
    import datasets

    _StandInBuilder.calls = []
    monkeypatch.setattr(datasets, "load_dataset_builder",
                        lambda repo, config=None, revision=None: _StandInBuilder(repo, config, revision))
    prov: dict = {}
    rows = load_problems("owner/numina:cot@main#train[:10]", "problem", "solution", provenance=prov)
    assert rows[0]["answer"] == "5" and rows[0]["source"] == "numina"
    assert _StandInBuilder.calls == [("owner/numina", "cot", "main"), "train[:10]"]
    assert prov == {"hub": "owner/numina", "config": "cot", "split": "train[:10]", "revision": "main",
                    "resolved_revision": "0123456789abcdef0123456789abcdef01234567"}
    _StandInBuilder.calls = []
    load_benchmark("math500", "owner/bench@0123abc", provenance={})
    assert _StandInBuilder.calls[-1] == "test"  # a benchmark reads split test unless it names one


def test_hub_dataset_without_a_revision_or_failing_is_a_clear_error(monkeypatch):
    import datasets

    def boom(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset_builder", boom)
    with pytest.raises(DataError, match="needs a pinned revision"):
        load_problems("owner/name", "problem", "solution")
    with pytest.raises(DataError, match="loading it with datasets failed: no network"):
        load_problems("owner/name@abc123", "problem", "solution")
    with pytest.raises(DataError, match="file not found"):
        load_problems("missing/file.jsonl", "problem", "solution")
