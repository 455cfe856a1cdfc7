"""The verifier: equivalence, time bounds, batches, the verify stage, and agreement with real reference
solutions (MATH500, GSM8K) when ../shared is present. Model-output garbage, untrusted text and worker
death/hangs are in tests/reliability/ (test_model_output.py, test_untrusted.py, test_verifier_faults.py)."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from drsft import verify as V
from drsft.verify import extract_boxed, verify_answer, verify_batch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
T = 1.0  # timeout_s used for slow inputs in these tests


# ------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("response, reference, correct", [
    (r"The answer is \boxed{0.5}.", r"\frac{1}{2}", True),
    (r"\boxed{\frac{1}{2}}", "0.5", True),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", True),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", True),
    (r"\boxed{x = 3}", "3", True),
    (r"\boxed{3}", "x=3", True),
    (r"\boxed{(3, \frac{\pi}{2})}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", True),
    (r"\boxed{1,000}", "1000", True),
    (r"\boxed{\$18}", "18", True),
    (r"\boxed{\dfrac{14}{3}}", r"\frac{14}{3}", True),
    (r"\boxed{[2, 5)}", r"[2,5)", True),
    (r"\boxed{\text{Evelyn}}", r"\text{Evelyn}", True),
    (r"\boxed{4}", "5", False),
    (r"\boxed{\frac{1}{3}}", "0.5", False),
    (r"\boxed{3\sqrt{2}}", r"\sqrt{8}", False),
    (r"\boxed{\left( 3, \frac{\pi}{3} \right)}", r"\left( 3, \frac{\pi}{2} \right)", False),
    (r"\boxed{\text{Bob}}", r"\text{Evelyn}", False),
])
def test_equivalent_forms(response, reference, correct):
    v = verify_answer(response, reference)
    assert v.correct is correct, v
    assert v.reason == ("ok" if correct else "wrong")


# ------------------------------------------------------------------------------- verify.mode: paper
@pytest.mark.parametrize("response, extracted", [
    (r"so \boxed{7} and later 9", "7"),                           # the last box first
    ("The answer is 5", "5"),                                        # no box: "the answer is"
    ("Therefore, the answer is $\\frac{1}{2}$.", r"\frac{1}{2}"),
    ("so the final answer is: 12.", "12"),
    ("We get 3 apples, then 4.5 more", "4.5"),                       # else the last number
    ("a total of 1,234 coins", "1234"),
    ("no number at all", None),
    (r"cut off \boxed{12", "12"),                                    # an unclosed box: the last number
])
def test_paper_mode_extraction_order(response, extracted):
    assert V.extract_answer(response, "paper") == extracted
    assert V.extract_answer(response, "boxed") == extract_boxed(response)


@pytest.mark.parametrize("response, reference, boxed, paper", [
    ("The answer is 5", "5", False, True),                           # boxed mode needs a box
    (r"\boxed{0.33333}", "0.333333", False, True),                   # numeric tolerance rel 1e-4
    (r"\boxed{0.3}", "0.333333", False, False),
    (r"\boxed{50}", "0.5", False, True),                             # the toolkit's percent forms: x100
    (r"\boxed{0.5}", "50", False, True),                             # and /100
    (r"\boxed{1,000.0}", "1000", True, True),
    ("The answer is $\\frac{1}{2}$.", "0.5", False, True),          # math-verify after the numeric rule
    (r"\boxed{x + 1}", "1 + x", True, True),
    ("I think it is 4", "5", False, False),
])
def test_paper_mode_grades_as_the_paper_toolkit(response, reference, boxed, paper):
    assert verify_answer(response, reference, timeout_s=T).correct is boxed
    assert verify_answer(response, reference, timeout_s=T, mode="paper").correct is paper
    assert [v.correct for v in verify_batch([(response, reference)] * 2, workers=1, timeout_s=T, mode="paper")] == [paper] * 2


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="verify.mode"):
        V.extract_answer("x", "lenient")


def test_percent_as_math_verify_decides():
    # math-verify: an integer percentage equals the bare integer (compared without the percent) and
    # 10% equals 0.1 numerically; a trailing \% is moved outside the math (see module docstring).
    assert verify_answer(r"\boxed{10\%}", "10").correct
    assert verify_answer(r"\boxed{10}", r"10\%").correct
    assert verify_answer(r"\boxed{10\%}", r"10\%").correct
    assert verify_answer(r"\boxed{0.1}", r"10\%").correct
    assert verify_answer(r"\boxed{10\%}", "0.1").correct
    assert not verify_answer(r"\boxed{20\%}", "10").correct


def test_quick_integer_path_agrees_with_math_verify():
    rng = random.Random(0)
    pairs = [("1,000", "1000"), ("-7", "-7"), ("007", "7"), ("12", "21"), ("1,200", "1200"), ("0", "-0")]
    pairs += [(str(rng.randint(-50, 50)), str(rng.randint(-50, 50))) for _ in range(30)]
    for a, b in pairs:
        quick = V._quick(a, b)
        assert quick is not None
        assert quick.reason == V._compare(a, b), (a, b)


def test_numeric_shortcut_agrees_with_math_verify():
    """The 'clearly different numbers' shortcut never changes math-verify's verdict."""
    _, mv_verify, _ = V._math_verify()
    rng = random.Random(1)
    forms = [r"\frac{1}{3}", "0.333333", "0.3333", r"\sqrt{2}", "1.414214", r"2\sqrt{2}", r"\sqrt{8}", r"\pi",
             "3.14159", r"\frac{22}{7}", "1e-8", "2e-8", r"10^{20}", r"10^{20}+1", r"\frac{\sqrt{3}}{2}", "0.866025",
             r"\sin(\frac{\pi}{3})", "x+1", r"x = 2", "5"]
    pairs = [(rng.choice(forms), rng.choice(forms)) for _ in range(60)] + [(f, f) for f in forms]
    for a, b in pairs:
        gold, pred = V._parsed(b), V._parsed(a)
        expected = bool(mv_verify(list(gold), list(pred), timeout_seconds=None))
        if V._clearly_different(gold, pred):
            assert expected is False, (a, b)


def test_reference_parsed_once_per_process(monkeypatch):
    calls = []
    real = V._parse
    monkeypatch.setattr(V, "_parse", lambda s: calls.append(s) or real(s))
    ref = r"\frac{7}{13}"
    for k in range(6):
        verify_answer(rf"\boxed{{\frac{{{k}}}{{13}}}}", ref)
    assert sum(1 for c in calls if "7" in c and "13" in c) == 1


# ------------------------------------------------------------------------------- time bounds
def test_timer_restores_previous_alarm_state():
    fired = []
    old = signal.signal(signal.SIGALRM, lambda s, f: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        verify_answer(r"\boxed{9^{9^{9^{9}}}}", "3", timeout_s=0.3)
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 25.0 < remaining <= 30.0
        assert signal.getsignal(signal.SIGALRM) is not signal.SIG_DFL
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not fired


def test_verify_answer_in_a_thread_is_bounded():
    out = []

    def work():
        out.append(verify_answer(r"\boxed{0.5}", r"\frac{1}{2}", timeout_s=T))
        out.append(verify_answer(r"\boxed{9^{9^{9^{9}}}}", "3", timeout_s=T))

    th = threading.Thread(target=work)
    th.start()
    th.join(timeout=120)
    assert not th.is_alive()
    assert out[0].reason == "ok"
    assert out[1].reason == "timeout"


def test_math_verify_own_timeout_fails_in_threads():
    """Why we never use math-verify's signal timeout: in a thread its parse raises."""
    from math_verify import LatexExtractionConfig, parse

    errors = []

    def work():
        try:
            parse("$1$", extraction_config=[LatexExtractionConfig()], parsing_timeout=5)
        except ValueError as exc:
            errors.append(exc)

    th = threading.Thread(target=work)
    th.start()
    th.join()
    assert errors and "thread" in str(errors[0])


# ------------------------------------------------------------------------------- batches and workers
def _pairs():
    base = [(r"\boxed{0.5}", r"\frac{1}{2}"), (r"\boxed{4}", "5"), ("no box", "5"), (r"\boxed{x = 3}", "3"),
            (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"), (r"\boxed{}", "1"), (r"\boxed{9^{9^{9^{9}}}}", "3")]
    return base + [(rf"\boxed{{\frac{{{2 * k}}}{{2}}}}", str(k + (k % 3 == 0))) for k in range(40)]


def test_batch_matches_in_process_and_keeps_order():
    pairs = _pairs()
    seq = verify_batch(pairs, workers=1, timeout_s=T)
    par = verify_batch(pairs, workers=2, timeout_s=T)
    assert seq == par
    assert [v.reason for v in par[:7]] == ["ok", "wrong", "no_answer", "ok", "ok", "parse_error", "timeout"]
    assert [v.correct for v in par[7:]] == [k % 3 != 0 for k in range(40)]
    assert verify_batch([], workers=2) == []


# ------------------------------------------------------------------------------- the stage
def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _sample(pid, i, response):
    return {"problem_id": pid, "sample_index": i, "prompt": "P", "response": response, "response_ids": [1, 2],
            "logprobs": [-0.1, -0.2], "finish_reason": "stop"}


def _run_stage(tmp_path, *extra):
    params = tmp_path / "params.yaml"
    import yaml

    full = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))   # stages validate the whole file
    full["verify"].update(timeout_s=2, workers=2)
    params.write_text(yaml.safe_dump(full), encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "stages" / "verify.py"), "--params", str(params),
           "--problems", str(tmp_path / "prepare" / "train.jsonl"), "--samples", str(tmp_path / "sample"),
           "--out", str(tmp_path / "verify" / "verdicts.jsonl"), "--metrics", str(tmp_path / "metrics.json"), *extra]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


def test_stage_writes_verdicts_and_metrics(tmp_path):
    _write(tmp_path / "prepare" / "train.jsonl", [
        {"id": "a", "problem": "1/2?", "solution": r"\boxed{\frac{1}{2}}", "answer": r"\frac{1}{2}", "source": "t"},
        {"id": "b", "problem": "2+2?", "solution": r"\boxed{4}", "answer": "4", "source": "t"},
        {"id": "c", "problem": "x?", "solution": r"\boxed{3}", "answer": "3", "source": "t"}])
    _write(tmp_path / "sample" / "shard-00000.jsonl", [
        _sample("a", 0, r"so \boxed{0.5}"), _sample("a", 1, r"\boxed{1/3}"),
        _sample("b", 0, "dunno"), _sample("b", 1, r"\boxed{5}")])
    _write(tmp_path / "sample" / "shard-00001.jsonl", [_sample("c", 0, r"\boxed{x=3}"), _sample("c", 1, r"\boxed{3}")])
    proc = _run_stage(tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "verify" / "verdicts.jsonl").read_text().splitlines()]
    assert [(r["problem_id"], r["sample_index"], r["correct"], r["reason"]) for r in rows] == [
        ("a", 0, True, "ok"), ("a", 1, False, "wrong"), ("b", 0, False, "no_answer"), ("b", 1, False, "wrong"),
        ("c", 0, True, "ok"), ("c", 1, True, "ok")]
    assert rows[0]["extracted"] == "0.5" and rows[2]["extracted"] is None
    assert set(rows[0]) == {"problem_id", "sample_index", "correct", "reason", "extracted"}
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["samples"] == 6 and m["problems"] == 3
    assert m["pass_at_n"] == pytest.approx(2 / 3)
    assert m["mean_solve_rate"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert m["reasons"] == {"ok": 3, "wrong": 2, "no_answer": 1, "timeout": 0, "parse_error": 0}
    assert json.loads((tmp_path / "runs" / "metrics.json").read_text())["verdicts_per_s"] > 0


# ------------------------------------------------------------------------------- real data
needs_shared = pytest.mark.skipif(not (SHARED / "benchmarks" / "math500.jsonl").exists()
                                  or not (SHARED / "datasets" / "gsm8k_train.jsonl").exists(),
                                  reason="../shared benchmarks/datasets not present (real-data agreement)")


@needs_shared
def test_math500_reference_solutions_verify():
    from drsft.data import load_benchmark

    rows = load_benchmark("math500", str(SHARED / "benchmarks" / "math500.jsonl"))
    assert len(rows) == 500
    verdicts = verify_batch([(r["solution"], r["answer"]) for r in rows], workers=2, timeout_s=5)
    agree = sum(v.correct for v in verdicts) / len(rows)
    assert agree >= 0.99, [(r["id"], v) for r, v in zip(rows, verdicts) if not v.correct]
    # math-verify alone (no string shortcut), on a deterministic subset
    subset = rows[::5]
    mv = [V._compare(extract_boxed(r["solution"]), r["answer"]) for r in subset]
    assert sum(r == "ok" for r in mv) / len(subset) >= 0.99
    assert all(V._has_expr(V._parsed(r["answer"])) for r in subset)
    # negative control: solution i against answer i+1 is almost never accepted
    cross = verify_batch([(rows[i]["solution"], rows[(i + 1) % 100]["answer"]) for i in range(100)], workers=2,
                         timeout_s=5)
    assert sum(v.correct for v in cross) <= 3


@needs_shared
def test_gsm8k_solutions_verify_against_their_answers():
    from drsft.data import gsm8k_split, load_problems

    path = SHARED / "datasets" / "gsm8k_train.jsonl"
    rows = load_problems(str(path), "question", "answer")
    verdicts = verify_batch([(r["solution"], r["answer"]) for r in rows], workers=2, timeout_s=5)
    agree = sum(v.correct for v in verdicts) / len(rows)
    assert agree >= 0.999, [(r["id"], v) for r, v in zip(rows, verdicts) if not v.correct][:20]
    # the raw '#### x' text (thousands separators kept) against the loaded answer, through math-verify
    raw = [json.loads(line)["answer"] for line in path.read_text(encoding="utf-8").splitlines()]
    picked = [i for i, a in enumerate(raw) if "," in a.rsplit("####", 1)[1]] + list(range(0, len(raw), 50))
    for i in picked:
        text = raw[i].rsplit("####", 1)[1].strip()
        assert V._compare(text, rows[i]["answer"]) == "ok", (i, text, rows[i]["answer"])
        assert gsm8k_split(raw[i])[1] == rows[i]["answer"]
