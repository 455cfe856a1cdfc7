import pytest

from drsft.evaluate import average_over, summarize


def _p(pid, mode, i, correct, reason="ok", finish="stop"):
    return {"problem_id": pid, "mode": mode, "sample_index": i, "correct": correct, "reason": reason,
            "finish_reason": finish}


def test_summarize_avg_at_k_pass_at_k_greedy_and_rates():
    preds = [_p("a", "sample", 0, True), _p("a", "sample", 1, False, "wrong"),
             _p("a", "sample", 2, True), _p("a", "sample", 3, True),
             _p("b", "sample", 0, False, "no_answer", "length"), _p("b", "sample", 1, False, "wrong"),
             _p("b", "sample", 2, False, "wrong"), _p("b", "sample", 3, False, "wrong"),
             _p("a", "greedy", 0, True), _p("b", "greedy", 0, False)]
    m = summarize(preds, 4)
    assert m["avg_at_k"] == pytest.approx((3 / 4 + 0) / 2)
    assert m["pass_at_k"] == pytest.approx(0.5)
    assert m["greedy"] == pytest.approx(0.5)
    assert m["no_answer_rate"] == pytest.approx(1 / 8)
    assert m["truncated_rate"] == pytest.approx(1 / 8)
    assert m["problems"] == 2 and m["k"] == 4


def test_average_over_benchmarks_skips_missing_keys():
    avg = average_over({"x": {"avg_at_k": 0.2, "greedy": 0.5}, "y": {"avg_at_k": 0.4}})
    assert avg == {"avg_at_k": pytest.approx(0.3), "greedy": pytest.approx(0.5)}
