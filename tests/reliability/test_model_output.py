r"""Model output garbage is a verdict, never a crash or a hang.

Empty response, no ``\boxed{}``, unbalanced braces, 100 kB of garbage, gigantic expressions
(``\boxed{9^{9^{9^{9}}}}``) and nested boxes: each gets one of the verdict reasons, within the time
bound, alone (verify_answer), in a worker pool (verify_batch) and through the verify stage.
"""

import json
import random
import time
from pathlib import Path

import pytest

from drsft import verify as V
from drsft.verify import Verdict, extract_boxed, verify_answer, verify_batch

ROOT = Path(__file__).resolve().parents[2]
T = 1.0  # timeout_s used for slow inputs in these tests

_rng = random.Random(0)
GARBAGE = "".join(_rng.choice("{}\\^_$abc123()[]!%&boxed ") for _ in range(100_000))

# (label, response): every kind of bad output the issue lists, against the reference "5"
BAD_OUTPUTS = [
    ("empty", ""),
    ("whitespace", " \n\t "),
    ("no box", "I think the answer is five."),
    ("unbalanced open", r"so \boxed{5"),
    ("unbalanced last box", r"\boxed{1} and then \boxed{5"),
    ("stray closing braces", r"}}}} \boxed{4}}}}"),
    ("100 kB garbage", GARBAGE),
    ("100 kB garbage in a box", r"\boxed{" + GARBAGE.replace("}", "") + "}"),
    ("gigantic power tower", r"\boxed{9^{9^{9^{9}}}}"),
    ("gigantic power", r"\boxed{10^{10^{10}}}"),
    ("gigantic factorial", r"\boxed{(10^{100})!}"),
    ("deep braces", r"\boxed{" + "{" * 3000 + "}" * 3000 + "}"),
    ("deep parentheses", r"\boxed{" + "(" * 800 + "1" + ")" * 800 + "}"),
    ("deep fractions", r"\boxed{" + r"\frac{1}{" * 300 + "2" + "}" * 300 + "}"),
    ("nested boxes, wrong", r"\boxed{\boxed{\boxed{4}}}"),
    ("empty box", r"\boxed{}"),
    ("binary junk", "\x00\x01\ufffd\udcff" * 100),
    ("lone surrogate in a box", "\\boxed{\udcff\x00}"),   # not encodable as UTF-8: still written
]


# ------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{42}.", "42"),
    (r"\boxed{1} then \boxed{2}", "2"),
    (r"\fbox{7}", "7"),
    (r"\boxed {x = 3}", "x = 3"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\boxed{3}}", "3"),
    (r"\boxed{a + \boxed{b}} and", "a + b"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{}", ""),
    ("no box here", None),
    ("", None),
    (r"\boxed{3", None),
    (r"\boxed{1} and \boxed{2", None),           # the last box is unbalanced
    (r"\boxed 5", None),                          # braceless: not an answer
    (r"\boxedfoo{5}", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_extract_boxed_is_linear_on_big_garbage():
    junk = ("{" * 50_000) + r"\boxed{" + ("}" * 50_000)
    t0 = time.perf_counter()
    assert extract_boxed(junk) == ""
    assert extract_boxed(r"\boxed{" * 20_000) is None
    assert time.perf_counter() - t0 < 2.0


# ------------------------------------------------------------------------------- verdicts
@pytest.mark.parametrize("response, reason, extracted", [
    ("I give up.", "no_answer", None),
    ("", "no_answer", None),
    (r"\boxed{3", "no_answer", None),
    (r"\boxed{}", "parse_error", ""),
    (r"\boxed{   }", "parse_error", ""),
    (r"\boxed{@@@ ### !!!}", "parse_error", "@@@ ### !!!"),
])
def test_reasons(response, reason, extracted):
    # the reason, not the time bound (tested on its own): a generous bound keeps a loaded machine's
    # first parse (math-verify's grammar loads then) from reading as a timeout
    v = verify_answer(response, "5", timeout_s=60.0)
    assert v == Verdict(False, reason, extracted)


def test_nested_boxes_take_the_innermost_answer():
    assert verify_answer(r"\boxed{\boxed{5}}", "5") == Verdict(True, "ok", "5")
    assert verify_answer(r"first \boxed{4}, finally \boxed{\boxed{\boxed{5}}}", "5").correct


@pytest.mark.parametrize("answer", [r"9^{9^{9^{9}}}", r"10^{10^{10}}", r"(10^{100})!"])
def test_gigantic_expression_is_a_timeout_verdict(answer):
    t0 = time.perf_counter()
    v = verify_answer(rf"\boxed{{{answer}}}", "3", timeout_s=T)
    assert v.reason in ("timeout", "wrong", "parse_error") and not v.correct
    assert time.perf_counter() - t0 < T + 2.0


def test_garbage_and_huge_inputs_are_verdicts():
    for label, resp in BAD_OUTPUTS:
        t0 = time.perf_counter()
        v = verify_answer(resp, "5", timeout_s=T)
        assert isinstance(v, Verdict) and v.reason in V.REASONS and not v.correct, (label, v)
        assert time.perf_counter() - t0 < T + 3.0, label


def test_bad_outputs_in_a_worker_pool_keep_order_and_bound():
    """All at once through verify_batch's worker pool, between good items: one verdict each, in order."""
    pairs = []
    for _, resp in BAD_OUTPUTS:
        pairs += [(r"\boxed{\frac{10}{2}}", "5"), (resp, "5")]
    t0 = time.perf_counter()
    out = verify_batch(pairs, workers=2, timeout_s=T)
    assert time.perf_counter() - t0 < 60
    assert len(out) == len(pairs)
    assert all(v.reason == "ok" for v in out[0::2])
    assert all(v.reason in V.REASONS and not v.correct for v in out[1::2]), \
        [(label, v) for (label, _), v in zip(BAD_OUTPUTS, out[1::2]) if v.correct]


def test_verify_stage_gives_every_bad_output_a_verdict(tmp_path, run_verify_stage):
    problem = {"id": "p", "problem": "2+3?", "solution": r"\boxed{5}", "answer": "5", "source": "t"}
    rows = [{"problem_id": "p", "sample_index": i, "prompt": "P", "response": resp, "response_ids": [1],
             "logprobs": [-0.5], "finish_reason": "length"} for i, (_, resp) in enumerate(BAD_OUTPUTS)]
    result = run_verify_stage(tmp_path, [problem], rows)
    assert result.exit_code == 0, (result.output, result.exception)
    verdicts = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [v["sample_index"] for v in verdicts] == list(range(len(BAD_OUTPUTS)))
    assert not any(v["correct"] for v in verdicts)
    m = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert m["samples"] == len(BAD_OUTPUTS) and sum(m["reasons"].values()) == len(BAD_OUTPUTS)
