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


def _g(pid, mode, i, response="\\boxed{1}", finish="stop"):
    return {"problem_id": pid, "mode": mode, "sample_index": i, "response": response, "tokens": 3,
            "finish_reason": finish}


def test_check_generation_rows_accepts_exactly_a_shards_rows():
    from drsft.evaluate import check_generation_rows

    rows = [_g("a", "sample", 0), _g("a", "sample", 1), _g("b", "sample", 0), _g("b", "sample", 1),
            _g("a", "greedy", 0), _g("b", "greedy", 0)]
    check_generation_rows(["a", "b"], 2, True, rows)
    check_generation_rows(["a", "b"], 2, False, rows[:4])
    with pytest.raises(ValueError, match="in order"):
        check_generation_rows(["a", "b"], 2, True, rows[:5])           # a greedy row missing
    with pytest.raises(ValueError, match="in order"):
        check_generation_rows(["a", "b"], 2, True, [rows[1], rows[0], *rows[2:]])
    with pytest.raises(ValueError, match=r"lacks field\(s\) \['response'\]"):
        check_generation_rows(["a"], 1, False, [{k: v for k, v in rows[0].items() if k != "response"}])
    with pytest.raises(ValueError, match="finish_reason"):
        check_generation_rows(["a"], 1, False, [_g("a", "sample", 0, finish="abort")])


def test_verify_rows_grades_each_generation_against_its_problem():
    from drsft.evaluate import PREDICTION_FIELDS, verify_rows

    rows = [_g("a", "sample", 0, "so \\boxed{2}"), _g("a", "sample", 1, "\\boxed{3}"), _g("b", "greedy", 0, "none")]
    out = verify_rows(rows, {"a": "2", "b": "5"}, {"workers": 1, "timeout_s": 5, "mode": "boxed"})
    assert [tuple(r) for r in out] == [PREDICTION_FIELDS] * 3
    assert [(r["correct"], r["reason"], r["extracted"], r["answer"]) for r in out] == [
        (True, "ok", "2", "2"), (False, "wrong", "3", "2"), (False, "no_answer", None, "5")]
