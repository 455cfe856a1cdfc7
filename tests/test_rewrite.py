import math

import pytest

from drsft.io import DataError
from drsft.rewrite import (copied_ngram, dropped_rows, ess_fraction, join_verdicts, leak_reason, nll_histogram,
                           policy_gap, rewrite_metrics, select, self_align)


def _sample(pid, i, response, ids=None, logprobs=None, finish="stop"):
    ids = ids if ids is not None else list(range(len(response.split()) + 1))
    return {"problem_id": pid, "sample_index": i, "prompt": f"P[{pid}]", "response": response,
            "response_ids": ids, "logprobs": logprobs if logprobs is not None else [-1.0] * len(ids),
            "finish_reason": finish}


def _verdict(pid, i, correct):
    return {"problem_id": pid, "sample_index": i, "correct": correct, "reason": "ok" if correct else "wrong",
            "extracted": None}


# ---------------------------------------------------------------- selection rules
def test_shortest_picks_fewest_tokens_and_breaks_ties_by_index():
    c = [_sample("p", 0, "a b c"), _sample("p", 1, "a"), _sample("p", 2, "b"), _sample("p", 3, "a b")]
    assert [r["sample_index"] for r in select(c, "shortest", 2, 0, "p")] == [1, 2]


def test_highest_logprob_uses_mean_not_sum():
    long_good = _sample("p", 0, "x y z w", ids=[1, 2, 3, 4, 5], logprobs=[-0.1] * 5)   # sum -0.5, mean -0.1
    short_bad = _sample("p", 1, "x", ids=[1, 2], logprobs=[-0.2, -0.2])                # sum -0.4, mean -0.2
    assert select([long_good, short_bad], "highest_logprob", 1, 0, "p")[0]["sample_index"] == 0


def test_random_is_seeded_per_problem_and_varies_with_seed():
    c = [_sample("p", i, f"answer {i}") for i in range(8)]
    first = [r["sample_index"] for r in select(c, "random", 3, 7, "p")]
    assert first == [r["sample_index"] for r in select(list(reversed(c)), "random", 3, 7, "p")]
    draws = {tuple(r["sample_index"] for r in select(c, "random", 3, s, "p")) for s in range(10)}
    assert len(draws) > 1


def test_duplicate_responses_count_once():
    c = [_sample("p", 0, "same"), _sample("p", 1, "same"), _sample("p", 2, "other")]
    assert len(select(c, "random", 5, 0, "p")) == 2


def test_keep_all_keeps_every_distinct_correct_finished_sample_and_the_tiers_count_problems():
    c = [_sample("p", i, f"answer {i % 3}") for i in range(5)]          # 3 distinct texts
    for rule in ("random", "shortest", "highest_logprob"):
        kept = select(c, rule, "all", 0, "p")
        assert sorted(r["sample_index"] for r in kept) == [0, 1, 2]
    samples = [_sample("a", 0, "s0"), _sample("a", 1, "s1"), _sample("a", 2, "s1"), _sample("a", 3, "s3", finish="length"),
               _sample("b", 0, "t0"), _sample("b", 1, "t1")]
    verdicts = [_verdict("a", i, True) for i in range(4)] + [_verdict("b", 0, False), _verdict("b", 1, True)]
    rows, unsolved, stats = self_align(["a", "b", "c"], samples, verdicts, "all", "random", 0)
    # a: samples 0 and 1 (2 repeats 1's text, 3 was cut at max_new_tokens); b: sample 1; c: unsolved
    assert sorted((r["problem_id"], r["response"]) for r in rows) == [("a", "s0"), ("a", "s1"), ("b", "t1")]
    assert unsolved == ["c"] and stats["kept"] == 3 and stats["solved"] == 2
    expert = [{**r, "tier": "expert"} for r in rows]
    fallback = [{"problem_id": "c", "tier": "fallback", "plain_logprobs": [-1.0], "behaviour_logprobs": None,
                 "response_ids": [1]}]
    m = rewrite_metrics(rows + fallback, expert)
    assert m["tiers"]["self"] == {"count": 2, "share": pytest.approx(2 / 3), "rows": 3}
    assert m["tiers"]["fallback"] == {"count": 1, "share": pytest.approx(1 / 3), "rows": 1}
    assert (m["problems"], m["rows"]) == (3, 4)


def test_unknown_rule_and_bad_k_are_errors():
    with pytest.raises(ValueError, match="unknown selection rule"):
        select([_sample("p", 0, "a")], "longest", 1, 0, "p")
    for bad in (0, "some", True, 1.5):
        with pytest.raises(ValueError, match="keep_per_problem"):
            select([_sample("p", 0, "a")], "random", bad, 0, "p")


# ---------------------------------------------------------------- self-align accounting
def test_self_align_keeps_correct_and_lists_unsolved():
    samples = [_sample("a", 0, "s0"), _sample("a", 1, "s1"), _sample("b", 0, "t0"), _sample("c", 0, "u0"),
               _sample("c", 1, "u1")]
    verdicts = [_verdict("a", 0, False), _verdict("a", 1, True), _verdict("b", 0, False), _verdict("c", 0, True),
                _verdict("c", 1, True)]
    rows, unsolved, stats = self_align(["a", "b", "c"], samples, verdicts, 1, "random", 0)
    assert unsolved == ["b"]
    assert sorted(r["problem_id"] for r in rows) == ["a", "c"]
    a = next(r for r in rows if r["problem_id"] == "a")
    assert a["response"] == "s1" and a["tier"] == "self" and a["behaviour"] == "sampled"
    assert a["behaviour_logprobs"] == a["plain_logprobs"] == samples[1]["logprobs"]
    assert stats == {"problems": 3, "solved": 2, "unsolved": 1, "correct_samples": 3, "kept": 2,
                     "dropped": {"truncated": 0}}
    rows2, _, _ = self_align(["a", "b", "c"], samples, verdicts, 2, "random", 0)
    assert sorted(r["problem_id"] for r in rows2) == ["a", "c", "c"]


def test_a_truncated_correct_sample_never_reaches_the_self_tier():
    """A sample cut at max_new_tokens can hold a correct box; it is dropped and counted, and a
    problem with no other correct sample stays unsolved (guided re-solving gets it)."""
    samples = [_sample("a", 0, "cut", finish="length"), _sample("a", 1, "done"),
               _sample("b", 0, "cut too", finish="length"), _sample("b", 1, "wrong")]
    verdicts = [_verdict("a", 0, True), _verdict("a", 1, True), _verdict("b", 0, True), _verdict("b", 1, False)]
    for k in (1, 4):
        rows, unsolved, stats = self_align(["a", "b"], samples, verdicts, k, "shortest", 0)
        assert [r["response"] for r in rows] == ["done"]
        assert unsolved == ["b"]
        assert stats["dropped"] == {"truncated": 2} and stats["correct_samples"] == 3


def test_dropped_rows_reads_both_stages_metrics_and_names_a_bad_file(tmp_path):
    import json

    s, g = tmp_path / "self.json", tmp_path / "guided.json"
    s.write_text(json.dumps({"dropped": {"truncated": 3}}))
    g.write_text(json.dumps({"dropped": {"truncated": 1, "leak": 2, "leak_share": 0.25}}))
    assert dropped_rows(s, g) == {"truncated": {"self": 3, "guided": 1}, "leak": {"guided": 2, "share": 0.25}}
    g.write_text(json.dumps({"dropped": {"truncated": 1}}))
    with pytest.raises(DataError, match=r"guided\.json.*dropped\.leak"):
        dropped_rows(s, g)
    s.write_text(json.dumps({"kept": 1}))
    with pytest.raises(DataError, match=r"self\.json.*'dropped'.*missing"):
        dropped_rows(s, g)


def test_self_align_refuses_missing_or_extra_verdicts():
    samples = [_sample("a", 0, "s0"), _sample("a", 1, "s1")]
    with pytest.raises(ValueError, match="no verdict"):
        self_align(["a"], samples, [_verdict("a", 0, True)], 1, "random", 0)
    with pytest.raises(ValueError, match="have no sample"):
        join_verdicts(samples[:1], [_verdict("a", 0, True), _verdict("a", 1, True)])


# ---------------------------------------------------------------- hint-leak filter
def test_copied_ngram():
    assert copied_ngram("a b c d e", "x b c d y", 3) == ("b", "c", "d")
    assert copied_ngram("a b c d e", "x b c d y", 4) is None
    assert copied_ngram("", "a", 1) is None and copied_ngram("a", "a", 0) is None
    assert copied_ngram("A B", "a b", 2) == ("a", "b")  # case-insensitive
    # a run that is also in the problem is a restatement, not a copy ...
    assert copied_ngram("so p q r s t", "we have p q r s t", 3, problem="p q r s t") is None
    # ... unless it goes on past the problem's words into the hint's
    assert copied_ngram("p q r s t u", "p q r s t u", 3, problem="p q r s t") == ("s", "t", "u")


def test_leak_reason_phrase_copy_and_clean():
    hint = "First, add 3 and 4 to get 7. Next, multiply 7 by 2 to get 14. Therefore the answer is 14."
    assert leak_reason("As the hint says, 14. \\boxed{14}", hint, ["hint"], 8) == "phrase"
    assert leak_reason("Using the Reference Solution: \\boxed{14}", hint, ["reference solution"], 8) == "phrase"
    assert leak_reason("Hinterland 3+4=7, 7*2=14 \\boxed{14}", hint, ["hint"], 8) is None  # whole words only
    copied = "First, add 3 and 4 to get 7. Next, multiply 7 by 2 to get 14. \\boxed{14}"
    assert leak_reason(copied, hint, [], 8) == "copy"
    assert leak_reason("3+4 is 7, doubled is 14. \\boxed{14}", hint, ["hint"], 8) is None


def test_a_resolve_that_restates_the_problem_is_kept_and_one_that_copies_the_steps_is_dropped():
    problem = "A train travels at 60 miles per hour for 3 hours and then at 40 miles per hour for 2 hours. How far does it go?"
    hint = ("A train travels at 60 miles per hour for 3 hours and then at 40 miles per hour for 2 hours. "
            "The first leg covers 60 times 3 which is 180 miles and the second leg covers 40 times 2 which is "
            "80 miles so the total distance is 260 miles. \\boxed{260}")
    restates = ("We know a train travels at 60 miles per hour for 3 hours and then at 40 miles per hour for 2 hours. "
                "Distance is speed times time: 180 + 80 = 260. \\boxed{260}")
    copies = ("The first leg covers 60 times 3 which is 180 miles and the second leg covers 40 times 2 which is "
              "80 miles. \\boxed{260}")
    assert leak_reason(restates, hint, [], 8) == "copy"                    # without the problem: a false alarm
    assert leak_reason(restates, hint, [], 8, problem=problem) is None
    assert leak_reason(copies, hint, [], 8, problem=problem) == "copy"


# ---------------------------------------------------------------- diagnostics
def test_ess_fraction_bounds():
    assert ess_fraction([0.0, 0.0, 0.0]) == pytest.approx(1.0)
    assert ess_fraction([0.0, -50.0, -50.0]) == pytest.approx(1 / 3, rel=1e-6)
    assert ess_fraction([]) is None


def _row(pid, tier, plain, behaviour=None):
    return {"problem_id": pid, "tier": tier, "plain_logprobs": plain, "behaviour_logprobs": behaviour,
            "response_ids": list(range(len(plain)))}


def test_policy_gap_and_rewrite_metrics_by_hand():
    rewritten = [_row("a", "self", [-1.0, -1.0], [-1.0, -1.0]),
                 _row("b", "guided", [-2.0, -2.0], [-1.0, -1.5]),
                 _row("c", "fallback", [-3.0, -3.0, -3.0])]
    expert = [_row(p, "expert", [-4.0, -4.0]) for p in "abc"]
    m = rewrite_metrics(rewritten, expert)
    assert m["tiers"]["self"] == {"count": 1, "share": pytest.approx(1 / 3), "rows": 1}
    assert m["nll"]["self"] == pytest.approx(1.0)
    assert m["nll"]["guided"] == pytest.approx(2.0)
    assert m["nll"]["rewritten"] == pytest.approx((2 + 4 + 9) / 7)
    assert m["nll"]["expert"] == pytest.approx(4.0)
    g = m["gap"]["guided"]["log_ratio_token"]
    assert g["mean"] == pytest.approx(((-2 + 1) + (-2 + 1.5)) / 2)
    assert m["gap"]["self"]["log_ratio_seq"]["mean"] == 0.0
    assert m["gap"]["fallback"]["base_token_prob"]["mean"] == pytest.approx(math.exp(-3))
    hist = nll_histogram(rewritten, expert, bins=4)
    assert sum(h["expert"] for h in hist) == pytest.approx(1.0)
    assert sum(h["rewritten"] for h in hist) == pytest.approx(1.0)
    assert policy_gap([])["nll"] is None
    fam = rewrite_metrics(rewritten, expert, {"a": "x", "b": "x", "c": "y"})["gap_by_family"]
    assert fam["x"]["self"] == {"rows": 1, "nll": pytest.approx(1.0)} and fam["x"]["guided"]["nll"] == pytest.approx(2.0)
    assert fam["x"]["rewritten"]["nll"] == pytest.approx(1.5) and fam["x"]["expert"] == {"rows": 2, "nll": pytest.approx(4.0)}
    assert fam["y"]["fallback"]["nll"] == pytest.approx(3.0) and fam["y"]["self"] == {"rows": 0, "nll": None}
    assert "gap_by_family" not in m
