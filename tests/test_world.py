"""The embedded toy world (drsft.toy.world), the tiny model's pretraining and the prepare stage."""

import hashlib
import json
import random
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from drsft.toy import world as W
from drsft.toy.world import FAMILIES, expert_solution, make_world, math_key, model_solution, pretraining_examples

ROOT = Path(__file__).resolve().parents[1]
BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def last_boxed(text):
    found = BOXED.findall(text)
    return found[-1] if found else None


def parse_answer(s):
    """Exact value of an answer string (integer, decimal or \\frac), for checking the world itself."""
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        return Fraction(int(m.group(2)), int(m.group(3))) * (-1 if m.group(1) else 1)
    assert re.fullmatch(r"-?\d+(\.\d+)?", s), s
    return Fraction(s)


@pytest.fixture(scope="module")
def world():
    return make_world(seed=0, n_train=200, n_bench=50, n_corpus=1000)


def all_problems(w):
    return w.train + [r for recs in w.benchmarks.values() for r in recs]


def test_records_have_the_documented_fields(world):
    assert sorted(world.benchmarks) == [f"toy_{f}" for f in sorted(FAMILIES)]
    for recs in world.benchmarks.values():
        assert len(recs) == 50
    assert len(world.train) == 200 and len(world.corpus) == 1000
    ids = set()
    for rec in all_problems(world):
        assert set(rec) == {"id", "problem", "solution", "answer", "source"}
        assert all(isinstance(v, str) and v for v in rec.values())
        assert rec["id"] not in ids
        ids.add(rec["id"])
        assert rec["source"] in FAMILIES
    assert {r["source"] for r in world.train} == set(FAMILIES)
    assert re.fullmatch(r"(arith|linear|fraction|decimal|precedence)-\d{5}", world.train[0]["id"])


def test_expert_answers_are_correct(world):
    """The boxed value equals the answer, and the answer is the true value of the problem."""
    for rec in all_problems(world):
        assert last_boxed(rec["solution"]) == rec["answer"]
        assert rec["solution"].rstrip().endswith(f"\\boxed{{{rec['answer']}}}$.")
        nums = [Fraction(x) for x in re.findall(r"-?\d+(?:\.\d+)?", rec["problem"].replace("$x$", ""))]
        value = parse_answer(rec["answer"])
        if rec["source"] == "arith":
            a, b, c, d = nums
            assert value == (a + b) * c - d
        elif rec["source"] == "linear":
            a, b, c = nums  # "Solve for $x$: $ax - b = c$": the sign of b is in the text
            b = -abs(b) if re.search(r"x - \d", rec["problem"]) else b
            assert a * value + b == c
        elif rec["source"] == "fraction":
            a, b, c, d = nums
            op = 1 if " + \\frac" in rec["problem"] else -1
            assert value == Fraction(int(a), int(b)) + op * Fraction(int(c), int(d))
        elif rec["source"] == "decimal":
            p, c, q = nums
            op = 1 if " + " in rec["problem"] else -1
            assert value == p * c + op * abs(q)
        else:  # precedence: multiplication first
            a, b, c = nums
            assert value == a + b * c


def test_answers_cover_fractions_negatives_decimals(world):
    answers = [r["answer"] for r in all_problems(world)]
    fracs = [a for a in answers if "\\frac" in a]
    assert fracs and any(a.startswith("-\\frac") for a in fracs)
    for a in fracs:  # simplified, sign outside, denominator > 1
        m = re.fullmatch(r"-?\\frac\{(\d+)\}\{(\d+)\}", a)
        assert m, a
        num, den = int(m.group(1)), int(m.group(2))
        assert den > 1 and Fraction(num, den).denominator == den
    assert any(re.fullmatch(r"-\d+", a) for a in answers)
    decimals = [a for a in answers if re.fullmatch(r"-?\d+\.\d+", a)]
    assert decimals and all(not a.endswith("0") for a in decimals)
    assert W.fmt_frac(Fraction(-2, 4)) == "-\\frac{1}{2}" and W.fmt_frac(Fraction(14, 7)) == "2"
    assert W.fmt_dec(W.Decimal("3.750")) == "3.75" and W.fmt_dec(W.Decimal("4.0")) == "4"


def test_deterministic_from_seed():
    a = make_world(seed=3, n_train=40, n_bench=10, n_corpus=100)
    b = make_world(seed=3, n_train=40, n_bench=10, n_corpus=100)
    c = make_world(seed=4, n_train=40, n_bench=10, n_corpus=100)
    assert a.train == b.train and a.benchmarks == b.benchmarks
    assert [t.problem for t in a.corpus] == [t.problem for t in b.corpus]
    assert pretraining_examples(a.corpus, 1) == pretraining_examples(b.corpus, 1)
    assert a.train != c.train


def test_corpus_disjoint_from_train_and_benchmarks(world):
    held = [math_key(r["problem"]) for r in all_problems(world)]
    assert len(held) == len(set(held))
    corpus = {math_key(t.problem) for t in world.corpus}
    assert len(corpus) >= 200  # many distinct problems; repeats are allowed (small families)
    assert not corpus & set(held)


def test_model_style_differs_from_expert_style(world):
    rng = random.Random(0)
    for tp in world.corpus[:200]:
        expert = expert_solution(tp)
        text, ok = model_solution(tp, rng, mistake_rate=0.0)
        assert ok and last_boxed(text) == tp.answer
        assert "$" not in text and "Therefore" not in text and "hint" not in text.lower()
        words_e, words_m = expert.split(), text.split()
        grams = {tuple(words_e[i:i + 6]) for i in range(len(words_e) - 5)}
        assert not any(tuple(words_m[i:i + 6]) in grams for i in range(len(words_m) - 5))
        assert text.split()[0] != expert.split()[0]


def test_precedence_misconception_is_a_wrong_method_never_a_right_answer(world):
    """The model-style corpus solution of a precedence problem evaluates left to right at
    misconception_rate: a different method (its first step combines a and b), always a wrong answer;
    the guided and expert solutions multiply first."""
    rng = random.Random(4)
    probs = [tp for tp in world.corpus if tp.family == "precedence"]
    assert len(probs) > 100
    for tp in probs:
        a, b, c = tp.params["a"], tp.params["b"], tp.params["c"]
        wrong, ok = model_solution(tp, rng, mistake_rate=0.0, misconception_rate=1.0)
        assert not ok and f"{a}+{b} is " in wrong
        left_to_right = (a + b) * c
        assert last_boxed(wrong) == str(left_to_right) != tp.answer
        right, ok = model_solution(tp, rng, mistake_rate=0.0, misconception_rate=0.0)
        assert ok and f"{b}*{c} is {b * c}" in right and last_boxed(right) == tp.answer
        assert f"{b} \\times {c} = {b * c}" in expert_solution(tp)
    for fam in ("arith", "linear", "fraction", "decimal"):  # no misconception elsewhere
        tp = next(t for t in world.corpus if t.family == fam)
        assert model_solution(tp, random.Random(0), 0.0, misconception_rate=1.0) == (W.family(fam).model(tp.params, tp.values), True)
    ex = pretraining_examples(world.corpus, seed=0, mistake_rate=0.0, guided_frac=0.3, guided_mistake_rate=0.0,
                              misconception_rate=1.0)
    prec = [(e, tp) for e, tp in zip(ex, world.corpus) if tp.family == "precedence"]
    assert all(e.correct == (e.hint is not None) for e, _ in prec)   # plain: misconceived; guided: the hint's method


def test_textbook_answers_are_expert_solutions_at_the_configured_share(world):
    """textbook_frac of the plain examples of families without a misconception are answered in the
    expert's style; precedence never is (its plain answers stay misconceived)."""
    ex = pretraining_examples(world.corpus, seed=0, mistake_rate=0.0, guided_frac=0.2, guided_mistake_rate=0.0,
                              misconception_rate=1.0, textbook_frac=0.4)
    plain = [(e, tp) for e, tp in zip(ex, world.corpus) if e.hint is None]
    textbook = [(e, tp) for e, tp in plain if e.response == expert_solution(tp)]
    others = [(e, tp) for e, tp in plain if tp.family != "precedence"]
    assert 0.33 < len(textbook) / len(others) < 0.47
    assert all(tp.family != "precedence" and e.correct for e, tp in textbook)
    none = pretraining_examples(world.corpus, seed=0, textbook_frac=0.0)
    assert not any(e.response == expert_solution(tp) for e, tp in zip(none, world.corpus))
    with pytest.raises(ValueError):
        pretraining_examples(world.corpus, textbook_frac=1.5)
    with pytest.raises(ValueError, match="misconceived_textbook_frac"):
        pretraining_examples(world.corpus, misconceived_textbook_frac=-0.1)


def test_misconceived_textbook_answers_show_the_right_method_and_change_nothing_else(world):
    """misconceived_textbook_frac of precedence's plain examples are its expert solutions (the right
    method); every other example is the one drawn without them."""
    kw = dict(seed=0, mistake_rate=0.05, guided_frac=0.3, guided_mistake_rate=0.0, misconception_rate=1.0,
              textbook_frac=0.2)
    base = pretraining_examples(world.corpus, **kw)
    ex = pretraining_examples(world.corpus, **kw, misconceived_textbook_frac=0.3)
    plain = [(e, b, tp) for e, b, tp in zip(ex, base, world.corpus) if tp.family == "precedence" and e.hint is None]
    read = [(e, tp) for e, _, tp in plain if e.response == expert_solution(tp)]
    assert 0.22 < len(read) / len(plain) < 0.38 and all(e.correct for e, _ in read)
    assert all(not b.correct for _, b, _ in plain)                     # without them: every one misconceived
    changed = [tp for e, b, tp in zip(ex, base, world.corpus) if e != b]
    assert changed and all(tp.family == "precedence" for tp in changed)


def test_expert_model_style_frac_restyles_train_demonstrations_and_nothing_else():
    """The data-side gap knob: a share of the train demonstrations in the model's own style (correct,
    same answer, the right method), nested as the share grows; benchmarks and corpus unchanged."""
    kw = dict(seed=3, n_train=200, n_bench=10, n_corpus=300)
    expert = make_world(**kw)
    assert make_world(**kw, expert_model_style_frac=0.0) == expert
    by_share = {f: make_world(**kw, expert_model_style_frac=f) for f in (0.3, 0.6, 1.0)}
    own = {}
    for f, w in by_share.items():
        assert w.benchmarks == expert.benchmarks and w.corpus == expert.corpus
        assert [{k: v for k, v in r.items() if k != "solution"} for r in w.train] == \
               [{k: v for k, v in r.items() if k != "solution"} for r in expert.train]
        own[f] = {r["id"] for r, e in zip(w.train, expert.train) if r["solution"] != e["solution"]}
        assert abs(len(own[f]) / len(w.train) - f) < 0.1
        for r in w.train:
            assert last_boxed(r["solution"]) == r["answer"]
            assert ("$" not in r["solution"]) == (r["id"] in own[f])      # the model's plain-text style
    assert own[0.3] <= own[0.6] <= own[1.0] and len(own[1.0]) == len(expert.train)
    prec = next(r for r in by_share[1.0].train if r["source"] == "precedence")
    tp_values = [int(x) for x in re.findall(r"\d+", prec["problem"])]
    a, b, c = tp_values[-3:]
    assert f"{b}*{c} is {b * c}" in prec["solution"]                   # multiplication first: the right method
    with pytest.raises(ValueError, match="expert_model_style_frac"):
        make_world(**kw, expert_model_style_frac=1.5)


def test_mistakes_happen_at_the_configured_rate(world):
    rng = random.Random(1)
    for rate in (0.0, 0.3, 1.0):
        results = [model_solution(tp, rng, mistake_rate=rate) for tp in world.corpus]
        wrong = [(tp, text) for tp, (text, ok) in zip(world.corpus, results) if not ok]
        assert abs(len(wrong) / len(results) - rate) < 0.05
        for tp, text in wrong:  # the error propagates to the boxed answer
            assert last_boxed(text) is not None and last_boxed(text) != tp.answer
    for tp, (text, ok) in zip(world.corpus, [model_solution(tp, rng, 0.0) for tp in world.corpus]):
        assert ok and last_boxed(text) == tp.answer


def test_pretraining_examples_mix_plain_and_guided(world):
    ex = pretraining_examples(world.corpus, seed=0, mistake_rate=0.3, guided_frac=0.4, guided_mistake_rate=0.0)
    guided = [e for e in ex if e.hint is not None]
    assert 0.3 < len(guided) / len(ex) < 0.5
    assert all(e.correct for e in guided)
    plain = [e for e in ex if e.hint is None]
    assert 0.2 < sum(not e.correct for e in plain) / len(plain) < 0.4
    with pytest.raises(ValueError):
        pretraining_examples(world.corpus, mistake_rate=1.5)


def test_fact_drills_are_correct_facts_in_the_model_wording(world):
    drills = W.fact_drills(world.corpus, n_drills=50, facts_per_drill=6, seed=0)
    assert len(drills) == 50 and drills == W.fact_drills(world.corpus, n_drills=50, facts_per_drill=6, seed=0)
    assert drills != W.fact_drills(world.corpus, n_drills=50, facts_per_drill=6, seed=1)
    solutions = " ".join(W.family(tp.family).model(tp.params, tp.values) + " "
                         + (W.family(tp.family).misconceived(tp.params) or "") for tp in world.corpus)
    for d in drills:
        facts = d.rstrip(".").split(". ")
        assert len(facts) == 6
        for f in facts:
            assert f + "." in solutions or f + "," in solutions, f  # same wording as the solutions
            lhs, rhs = f.replace(" reduces to ", " is ").split(" is ")
            m = re.fullmatch(r"(-?[\d.]+)([-+*/])(-?[\d.]+)", lhs)
            x, op, y = Fraction(m.group(1)), m.group(2), Fraction(m.group(3))
            want = {"+": x + y, "-": x - y, "*": x * y, "/": x / y if y else None}[op]
            assert want == Fraction(rhs), f  # every drilled fact is true
    held_out = {math_key(r["problem"]) for r in all_problems(world)}
    assert all(math_key(tp.problem) not in held_out for tp in world.corpus)  # facts come from the corpus only
    with pytest.raises(ValueError):
        W.fact_drills(world.corpus, n_drills=1, facts_per_drill=0)


def test_pretrain_saves_a_loadable_deterministic_model(tmp_path, prompt_cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drsft.prompts import render_prompt
    from drsft.toy.tinylm import pretrain

    w = make_world(seed=0, n_train=0, n_bench=0, n_corpus=40)
    ex = pretraining_examples(w.corpus, seed=0, guided_frac=0.5)
    kw = dict(seed=0, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=4,
              batch_size=8, threads=1, log=lambda *_: None)
    kw["drills"], kw["drill_frac"] = W.fact_drills(w.corpus, n_drills=20, facts_per_drill=4), 0.5
    s1 = pretrain(tmp_path / "a", ex, prompt_cfg, **kw)
    pretrain(tmp_path / "b", ex, prompt_cfg, **kw)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert s1["steps"] == 4 and s1["params"] > 0 and s1["loss_final"] > 0 and s1["drill_steps"] == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "a")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert tok.chat_template and model.config.vocab_size == len(tok)
    assert render_prompt(tok, "1+1?", prompt_cfg).endswith("<|assistant|>\n")



def test_pretrain_over_two_processes_matches_one_process(tmp_path, prompt_cfg):
    """Two data-parallel processes (each on half of every batch, gradients summed over gloo) make the
    same updates as one process, up to float rounding; a failure inside a rank reaches the caller."""
    import torch
    from safetensors.torch import load_file

    from drsft.toy.tinylm import pretrain

    w = make_world(seed=0, n_train=0, n_bench=0, n_corpus=40)
    ex = pretraining_examples(w.corpus, seed=0, guided_frac=0.5)
    kw = dict(seed=0, vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, steps=6,
              batch_size=7, threads=1, log=lambda *_: None)  # odd batch: the ranks get unequal shares
    kw["drills"], kw["drill_frac"] = W.fact_drills(w.corpus, n_drills=20, facts_per_drill=4), 0.5
    one = pretrain(tmp_path / "one", ex, prompt_cfg, processes=1, **kw)
    two = pretrain(tmp_path / "two", ex, prompt_cfg, processes=2, **kw)
    assert two["processes"] == 2 and two["response_tokens"] == one["response_tokens"]
    assert two["loss_first"] == pytest.approx(one["loss_first"], rel=1e-5)
    assert two["loss_final"] == pytest.approx(one["loss_final"], rel=1e-4)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name
    with pytest.raises(Exception, match="could not convert string to float"):
        pretrain(tmp_path / "bad", ex, prompt_cfg, processes=2, **{**kw, "lr": "fast"})

PROBE = {"solve_rate_min": 0.2, "solve_rate_max": 0.7, "unsolved_min": 0.15, "headroom_solve_max": 0.1,
         "headroom_margin": 0.2, "gap_ratio_min": 3.0, "gap_ratio_max": 30.0, "gap_nll_max": 3.0}


def _summary(**over):
    w = {"solve_rate": 0.3, "unsolved_share": 0.4, "unsolved": 40, "guided_solved_problems_on_unsolved": 10,
         "guided_solve_rate_on_unsolved": 0.2, "unguided_solve_rate_on_unsolved_fresh": 0.05,
         "nll_expert": 1.0, "nll_own_correct": 0.1, "nll_ratio_expert_to_own": 10.0,
         "families": {"a": {"solve_rate": 0.5, "guided_solve_rate": 0.6},
                      "b": {"solve_rate": 0.0, "guided_solve_rate": 0.5}}}
    return {**w, **over}


@pytest.mark.parametrize("over, failing", [
    ({}, set()),
    ({"solve_rate": 0.75}, {"solve_rate_in_range"}),
    ({"unsolved_share": 0.1}, {"guidance_helps_on_unsolved"}),
    ({"guided_solved_problems_on_unsolved": 40}, {"guidance_helps_on_unsolved"}),  # every tier must be non-empty
    ({"guided_solve_rate_on_unsolved": 0.05}, {"guidance_helps_on_unsolved"}),
    ({"nll_expert": 0.05, "nll_ratio_expert_to_own": 0.5}, {"expert_nll_higher", "realistic_gap"}),
    ({"nll_ratio_expert_to_own": 31.0}, {"realistic_gap"}),                          # a foreign language
    ({"nll_expert": 3.5, "nll_ratio_expert_to_own": 20.0}, {"realistic_gap"}),
    ({"families": {"b": {"solve_rate": 0.12, "guided_solve_rate": 0.9}}}, {"headroom"}),  # solved often enough
    ({"families": {"b": {"solve_rate": 0.0, "guided_solve_rate": 0.15}}}, {"headroom"}),  # the hint does not help
])
def test_world_checks_flag_each_property_at_its_threshold(over, failing):
    from drsft.toy.probe import world_checks

    checks = world_checks(_summary(**over), PROBE)
    assert {k for k, ok in checks.items() if not ok} == failing


def _fam(solve, guided, own, g, expert_same):
    return {"solve_rate": solve, "guided_solve_rate": guided, "nll_own_correct": own, "nll_guided_correct": g,
            "nll_expert_guided_problems": expert_same}


@pytest.mark.parametrize("families, closer", [
    # a: self 0.01 < guided 0.05 < expert 0.2; b (headroom): no own samples, guided 0.3 < expert 0.4
    ({"a": _fam(0.5, 0.6, 0.01, 0.05, 0.2), "b": _fam(0.0, 0.5, None, 0.3, 0.4)}, True),
    ({"a": _fam(0.5, 0.6, 0.01, 0.05, 0.2), "b": _fam(0.0, 0.5, None, 1.2, 0.4)}, False),    # headroom: guided > expert
    ({"a": _fam(0.5, 0.6, 0.06, 0.05, 0.2), "b": _fam(0.0, 0.5, None, 0.3, 0.4)}, False),    # guided closer than self
    ({"a": _fam(0.5, 0.6, 0.01, 0.25, 0.2), "b": _fam(0.0, 0.5, None, 0.3, 0.4)}, False),    # guided beyond expert
    ({"a": _fam(0.5, 0.6, 0.01, 0.05, 0.2), "b": _fam(0.0, 0.5, 0.9, 0.3, 0.4)}, True),      # headroom: self not judged
    ({"a": _fam(0.5, 0.6, 0.01, None, 0.2), "b": _fam(0.0, 0.5, None, 0.3, 0.4)}, True),     # no re-solve: not judged
])
def test_rewriting_closer_is_self_guided_expert_per_family(families, closer):
    from drsft.toy.probe import world_checks

    checks = world_checks(_summary(families=families), PROBE)
    assert checks["rewriting_closer"] is closer
    assert "rewriting_closer" not in world_checks(_summary(), PROBE)    # a summary from before the measure


def test_committed_world_summary_follows_its_checks_under_params():
    """metrics/probe.json (what `make repro` measured on the committed machine's base model)
    re-checked against params.yaml's thresholds: the recorded flags are what they imply. Whether
    every property holds is a property of one pretraining run (another machine's float path draws
    another base model); the committed ablation's worlds say how often (test below)."""
    from drsft.toy.probe import headroom_families, world_checks

    w = json.loads((ROOT / "metrics" / "probe.json").read_text())["world"]
    probe = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]["probe"]
    assert world_checks(w, probe) == w["checks"]
    assert headroom_families(w["families"], probe) == w["headroom_families"]
    assert w["probe_problems"] == probe["n_problems"]


def test_committed_ablation_worlds_follow_their_checks_under_params():
    """metrics/ablation.json, when each seed pretrained its own base model (`--worlds`): every
    world's probe is recorded and its check flags are what params.yaml's thresholds imply."""
    from drsft.toy.probe import world_checks

    a = json.loads((ROOT / "metrics" / "ablation.json").read_text())
    if not a.get("vary_world"):
        pytest.skip("metrics/ablation.json was run on one base model (--no-worlds)")
    probe = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]["probe"]
    assert [w["seed"] for w in a["worlds"]] == a["seeds"]
    assert len({w["pretrain_seed"] for w in a["worlds"]}) == len(a["seeds"])
    for w in a["worlds"]:
        assert world_checks(w["probe"], probe) == w["checks"], w["seed"]


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def default_world(tmp_path_factory):
    """The real default ``prepare`` (minutes) and ``probe``, run once for the tests below."""
    out = tmp_path_factory.mktemp("default_world")
    cmd = [sys.executable, str(ROOT / "stages" / "prepare.py"), "--params", str(ROOT / "params.yaml"),
           "--data", str(out / "data"), "--model", str(out / "model"), "--metrics", str(out / "prepare.json")]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900)
    cmd = [sys.executable, str(ROOT / "stages" / "probe.py"), "--params", str(ROOT / "params.yaml"),
           "--problems", str(out / "data" / "train.jsonl"), "--model", str(out / "model"),
           "--metrics", str(out / "probe.json")]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=900)
    return out


@pytest.mark.world
def test_default_prepare_world_properties(default_world):
    out = default_world
    m = json.loads((out / "prepare.json").read_text())
    w = json.loads((out / "probe.json").read_text())["world"]
    assert 0.2 <= w["solve_rate"] <= 0.7
    assert w["unsolved_share"] >= 0.15
    assert w["guided_solve_rate_on_unsolved"] > w["unguided_solve_rate_on_unsolved_fresh"]
    assert w["guided_solved_problems_on_unsolved"] < w["unsolved"]
    assert w["nll_expert"] > w["nll_own_correct"]
    # headroom: a family the model gets wrong on its own and solves when shown the expert solution
    pr = yaml.safe_load((ROOT / "params.yaml").read_text())["prepare"]["probe"]
    head = w["headroom_families"]
    assert head and all(w["families"][f]["solve_rate"] < pr["headroom_solve_max"] for f in head)
    assert all(w["families"][f]["guided_solve_rate"] - w["families"][f]["solve_rate"] >= pr["headroom_margin"]
               for f in head)
    # a realistic gap: off-policy, not a foreign language
    assert pr["gap_ratio_min"] <= w["nll_expert"] / w["nll_own_correct"] <= pr["gap_ratio_max"]
    assert w["nll_expert"] < pr["gap_nll_max"]
    assert all(w["checks"].values()), w["checks"]
    assert (out / "model" / "config.json").exists()
    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == m["counts"]["train"]


@pytest.mark.world
def test_default_world_rewrite_has_all_tiers_and_closes_the_gap(default_world):
    """The rewriting stages on the default world: every tier non-empty, every train problem
    exactly once (keep_per_problem 1), and the rewritten set closer to the base model than the
    expert set (the paper's premise, measured)."""
    out = default_world
    data, model, m = out / "data", out / "model", out / "metrics"
    stages = [
        ["sample.py", "--problems", data / "train.jsonl", "--model", model, "--out", out / "sample",
         "--metrics", m / "sample.json", "--no-progress"],
        ["verify.py", "--problems", data / "train.jsonl", "--samples", out / "sample",
         "--out", out / "verify" / "verdicts.jsonl", "--metrics", m / "verify.json"],
        ["self_align.py", "--problems", data / "train.jsonl", "--samples", out / "sample",
         "--verdicts", out / "verify" / "verdicts.jsonl", "--out", out / "self_align", "--metrics", m / "self.json"],
        ["guided_align.py", "--problems", data / "train.jsonl", "--unsolved", out / "self_align" / "unsolved.jsonl",
         "--model", model, "--out", out / "guided", "--metrics", m / "guided.json"],
        ["fallback.py", "--problems", data / "train.jsonl", "--self-rows", out / "self_align" / "selected.jsonl",
         "--guided-rows", out / "guided" / "selected.jsonl", "--unsolved", out / "guided" / "unsolved.jsonl",
         "--self-metrics", m / "self.json", "--guided-metrics", m / "guided.json",
         "--model", model, "--out", out / "train", "--metrics", m / "rewrite.json", "--plot-csv", m / "nll.csv"],
    ]
    for script, *args in stages:
        subprocess.run([sys.executable, str(ROOT / "stages" / script), "--params", str(ROOT / "params.yaml"),
                        *map(str, args)], check=True, cwd=ROOT, timeout=900)
    r = json.loads((m / "rewrite.json").read_text())
    assert all(r["tiers"][t]["count"] > 0 for t in ("self", "guided", "fallback")), r["tiers"]
    n_train = len((data / "train.jsonl").read_text().splitlines())
    rows = [json.loads(line) for line in (out / "train" / "rewritten.jsonl").read_text().splitlines()]
    assert sorted(r["problem_id"] for r in rows) == sorted({r["problem_id"] for r in rows})
    assert len(rows) == n_train == r["problems"]
    assert r["nll"]["rewritten"] < r["nll"]["expert"]
    assert r["nll"]["self"] < r["nll"]["expert"] and r["nll"]["guided"] < r["nll"]["expert"]
