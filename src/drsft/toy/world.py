"""The embedded toy world: synthetic math problems, deterministic from a seed.

Five families, each with answers that exercise a real verifier:

* ``arith``      -- ``(a + b) \\times c - d``: integers, sometimes negative;
* ``linear``     -- ``a x + b = c`` in one unknown: integers or simplified fractions, either sign;
* ``fraction``   -- ``\\frac{a}{b} \\pm \\frac{c}{d}``: simplified fractions, integers, negatives;
* ``decimal``    -- ``p \\times c \\pm q``: decimals such as ``3.75`` (and their negatives);
* ``precedence`` -- ``a + b \\times c``: the family whose *method* the base model lacks (below).

Every problem has two kinds of worked solution:

* the **expert** demonstration (:func:`expert_solution`): one fixed, textbook-like style in LaTeX,
  always correct, ending in ``$\\boxed{answer}$.``;
* the **model style** (:func:`model_solution`): other wording, plain-text arithmetic, a different
  method or step order where the family allows one (cross-multiplication instead of a common
  denominator, the addend before the product, ...), and -- with a configurable probability -- a
  deliberate mistake: one intermediate result is wrong and the error propagates to a wrong boxed
  answer.

The tiny base model is pretrained on chat examples with model-style responses (plus *guided*
examples, whose prompt shows the expert solution as a hint and whose response follows it in the
model's style), so expert demonstrations are off-policy for it. Two more kinds of pretraining text
shape the world:

* *fact drills* (:func:`fact_drills`): short texts of the corpus problems' arithmetic facts in the
  model's wording ("7*2 is 14. 14-6 is 8."), a pretraining on arithmetic tables; they hold the
  facts of either method of a family, so the model *can* execute the expert's steps;
* *textbook answers* (``textbook_frac``): a share of the plain chat examples is answered in the
  expert's own style, as real base models have read textbook solutions beside their own. This is
  the policy-gap knob: without them the expert style is a language the model has never seen
  (expert NLL ~9 nats/token); with more of them the expert demonstrations come closer to the
  model's policy.

The other gap knob moves the data instead of the model: ``expert_model_style_frac``
(:func:`make_world`) writes a share of the *training* demonstrations in the model's own style
(correct, with the right method), leaving the corpus, hence the base model, unchanged.

**Headroom.** In ``precedence`` the model's own (plain-prompt) corpus solutions carry a
misconception at ``misconception_rate``: they evaluate left to right, ``(a + b) \\times c``
(:meth:`Precedence.misconceived`), a wrong method, not an arithmetic slip. Its guided examples
follow the hint's correct method (multiplication first), and the expert demonstrations show it.
So the base model gets the family wrong on its own, can solve it when shown the expert solution,
and the expert data carries knowledge the model lacks: the paper's situation, which rewriting is
meant to exploit (guided re-solves keep the method in the model's own style). A small share
``misconceived_textbook_frac`` of its plain examples are its textbook solutions: the right method,
read but not practised; without them the expert's precedence text is unread (~4 nats/token) and
the gap far above a real base model's. The rest of its plain model-style answers (``1 -
misconception_rate``) use the right method: rare enough that the model rarely solves the family on
its own, present enough that its own right-method text is not foreign to it. With none (a rate of
1) the model's hint-guided re-solves, in its own style, are *farther* from it under the plain
prompt than the expert's textbook text (the probe's ``rewriting_closer`` fails in precedence), the
reverse of the paper's premise; and no training arm learned the family.

Splits (:func:`make_world`): ``train`` problems (mixed families), one held-out benchmark per family
named ``toy_<family>``, and a pretraining corpus whose problems are disjoint (by problem text) from
both. Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

FAMILIES = ("arith", "linear", "fraction", "decimal", "precedence")

# ---------------------------------------------------------------------------------------------
# Number formatting
# ---------------------------------------------------------------------------------------------


def fmt_frac(x: Fraction) -> str:
    """LaTeX for a rational in lowest terms: ``7``, ``-3``, ``\\frac{7}{3}``, ``-\\frac{1}{2}``."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    sign = "-" if x < 0 else ""
    return f"{sign}\\frac{{{abs(x.numerator)}}}{{{x.denominator}}}"


def fmt_plain_frac(x: Fraction) -> str:
    """Plain-text rational for the model style: ``7``, ``-7/3``."""
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def fmt_dec(x: Decimal) -> str:
    """A decimal without exponent or trailing zeros: ``3.75``, ``4``, ``-0.5``."""
    x = Decimal(x)
    if x == x.to_integral_value():
        return str(int(x))
    s = format(x.normalize(), "f")
    return s


def _signed_term(n: int) -> str:
    """``+ 5`` or ``- 5`` for writing ``a x + b`` with b of either sign."""
    return f"+ {n}" if n >= 0 else f"- {-n}"


# ---------------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------------


@dataclass
class ToyProblem:
    """A generated problem: its family, the drawn parameters and the rendered statement."""

    family: str
    params: dict[str, Any]
    problem: str
    answer: str = ""
    values: dict[str, Any] = field(default_factory=dict)  # correct intermediate values


def _perturb_int(n: int, rng: random.Random) -> int:
    return n + rng.choice([-10, -2, -1, 1, 2, 10] if abs(n) >= 10 else [-2, -1, 1, 2])


def _perturb_frac(x: Fraction, rng: random.Random) -> Fraction:
    # An arithmetic slip in the numerator (before any reduction).
    return Fraction(x.numerator + rng.choice([-2, -1, 1, 2]), x.denominator)


def _perturb_dec(x: Decimal, rng: random.Random) -> Decimal:
    exp = x.normalize().as_tuple().exponent
    unit = Decimal(1).scaleb(min(int(exp), 0)) if isinstance(exp, int) else Decimal(1)
    return x + rng.choice([-1, 1]) * rng.choice([unit, Decimal(1)])


class Family:
    name: str = ""
    steps: tuple[str, ...] = ()  # names of computed intermediate values, in model-style order

    def draw(self, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def statement(self, p: dict[str, Any]) -> str:
        raise NotImplementedError

    def compute(self, p: dict[str, Any], slip: tuple[str, Any] | None = None) -> dict[str, Any]:
        """Intermediate values; ``slip=(step, wrong_value)`` overrides one step, later ones follow."""
        raise NotImplementedError

    def perturb(self, step: str, value: Any, rng: random.Random) -> Any:
        raise NotImplementedError

    def answer(self, v: dict[str, Any]) -> str:
        raise NotImplementedError

    def expert(self, p: dict[str, Any], v: dict[str, Any]) -> str:
        raise NotImplementedError

    def model(self, p: dict[str, Any], v: dict[str, Any]) -> str:
        raise NotImplementedError

    def facts(self, p: dict[str, Any], v: dict[str, Any]) -> list[str]:
        """The arithmetic facts of the model-style solution, in its wording (``4+3 is 7``)."""
        raise NotImplementedError

    def misconceived(self, p: dict[str, Any]) -> str | None:
        """A model-style solution by a wrong *method* (a misconception), or None where the family
        has none. Its answer is always wrong."""
        return None


class _Steps(dict):
    """A family's intermediate values as ``compute`` fills them in order: ``put(step, value)``
    stores the value, or the slip's wrong one for the slipped step, so later steps follow it."""

    def __init__(self, slip: tuple[str, Any] | None):
        super().__init__()
        self.slip = slip

    def put(self, key: str, value: Any) -> None:
        self[key] = self.slip[1] if self.slip and self.slip[0] == key else value


def _verb(rng: random.Random) -> str:
    return rng.choice(["Compute", "Evaluate", "Find the value of"])


class Arith(Family):
    name = "arith"
    steps = ("s", "p", "r")

    def draw(self, rng):
        return {"a": rng.randint(1, 6), "b": rng.randint(1, 6), "c": rng.randint(2, 3),
                "d": rng.randint(1, 9), "verb": _verb(rng)}

    def statement(self, p):
        return f"{p['verb']} $({p['a']} + {p['b']}) \\times {p['c']} - {p['d']}$."

    def compute(self, p, slip=None):
        v = _Steps(slip)
        v.put("s", p["a"] + p["b"])
        v.put("p", v["s"] * p["c"])
        v.put("r", v["p"] - p["d"])
        return dict(v)

    def perturb(self, step, value, rng):
        return _perturb_int(value, rng)

    def answer(self, v):
        return str(v["r"])

    def expert(self, p, v):
        return (f"First, evaluate the parentheses: ${p['a']} + {p['b']} = {v['s']}$. "
                f"Next, multiply: ${v['s']} \\times {p['c']} = {v['p']}$. "
                f"Finally, subtract: ${v['p']} - {p['d']} = {v['r']}$. "
                f"Therefore, the answer is $\\boxed{{{v['r']}}}$.")

    def model(self, p, v):
        return (f"We want ({p['a']}+{p['b']})*{p['c']}-{p['d']}. "
                f"{p['a']}+{p['b']} is {v['s']}. "
                f"{v['s']}*{p['c']} is {v['p']}. "
                f"{v['p']}-{p['d']} is {v['r']}. "
                f"So \\boxed{{{v['r']}}}")

    def facts(self, p, v):
        return [f"{p['a']}+{p['b']} is {v['s']}", f"{v['s']}*{p['c']} is {v['p']}", f"{v['p']}-{p['d']} is {v['r']}"]


class Linear(Family):
    name = "linear"
    steps = ("m", "x")

    def draw(self, rng):
        a = rng.randint(2, 4)
        b = rng.choice([i for i in range(-6, 7) if i != 0])
        if rng.random() < 0.7:  # mostly integer solutions, sometimes a fraction
            x = rng.randint(-5, 5)
            c = a * x + b
        else:
            c = rng.randint(-9, 9)
        return {"a": a, "b": b, "c": c}

    def statement(self, p):
        return f"Solve for $x$: ${p['a']}x {_signed_term(p['b'])} = {p['c']}$."

    def compute(self, p, slip=None):
        v = _Steps(slip)
        v.put("m", p["c"] - p["b"])
        v.put("x", Fraction(v["m"], p["a"]))
        return dict(v)

    def perturb(self, step, value, rng):
        if step == "m":
            return _perturb_int(value, rng)
        return value + rng.choice([-1, 1])

    def answer(self, v):
        return fmt_frac(v["x"])

    def expert(self, p, v):
        a, b, c, m, x = p["a"], p["b"], p["c"], v["m"], v["x"]
        move = f"Subtract ${b}$ from both sides" if b > 0 else f"Add ${-b}$ to both sides"
        rhs = f"{c} - {b}" if b > 0 else f"{c} + {-b}"
        div = f"x = \\frac{{{m}}}{{{a}}}"
        if fmt_frac(x) != f"\\frac{{{m}}}{{{a}}}":
            div += f" = {fmt_frac(x)}"
        return (f"{move}: ${a}x = {rhs} = {m}$. "
                f"Divide both sides by ${a}$: ${div}$. "
                f"Therefore, the answer is $\\boxed{{{fmt_frac(x)}}}$.")

    def model(self, p, v):
        a, b, c, m, x = p["a"], p["b"], p["c"], v["m"], v["x"]
        rhs = f"{c}-{b}" if b > 0 else f"{c}+{-b}"
        return (f"We need x with {a}x{'+' if b > 0 else '-'}{abs(b)}={c}. "
                f"{rhs} is {m}, so {a}x is {m}. "
                f"{m}/{a} is {fmt_plain_frac(x)}. "
                f"So \\boxed{{{fmt_frac(x)}}}")

    def facts(self, p, v):
        b = p["b"]
        rhs = f"{p['c']}-{b}" if b > 0 else f"{p['c']}+{-b}"
        return [f"{rhs} is {v['m']}", f"{v['m']}/{p['a']} is {fmt_plain_frac(v['x'])}"]


class FractionFamily(Family):
    name = "fraction"
    steps = ("n1", "n2", "n", "r")  # model style: cross-multiplication

    def draw(self, rng):
        b = rng.randint(2, 5)
        d = rng.choice([k for k in range(2, 6) if k != b])
        # numerators that do not make a whole number
        return {"a": rng.choice([k for k in range(1, 8) if k % b]), "b": b,
                "c": rng.choice([k for k in range(1, 8) if k % d]), "d": d,
                "op": rng.choice(["+", "-"]), "verb": _verb(rng)}

    def statement(self, p):
        return (f"{p['verb']} $\\frac{{{p['a']}}}{{{p['b']}}} {p['op']} "
                f"\\frac{{{p['c']}}}{{{p['d']}}}$.")

    def compute(self, p, slip=None):
        v = _Steps(slip)
        sign = 1 if p["op"] == "+" else -1
        v.put("n1", p["a"] * p["d"])
        v.put("n2", p["c"] * p["b"])
        v.put("n", v["n1"] + sign * v["n2"])
        v.put("r", Fraction(v["n"], p["b"] * p["d"]))
        # The expert's common-denominator route (always computed from the true values).
        lcm = p["b"] * p["d"] // math.gcd(p["b"], p["d"])
        v["L"], v["e1"], v["e2"] = lcm, p["a"] * (lcm // p["b"]), p["c"] * (lcm // p["d"])
        v["en"] = v["e1"] + sign * v["e2"]
        return dict(v)

    def perturb(self, step, value, rng):
        if step == "r":
            return _perturb_frac(value, rng)
        return _perturb_int(value, rng)

    def answer(self, v):
        return fmt_frac(v["r"])

    def expert(self, p, v):
        a, b, c, d, op = p["a"], p["b"], p["c"], p["d"], p["op"]
        L, e1, e2, en = v["L"], v["e1"], v["e2"], v["en"]
        res = Fraction(en, L)
        text = (f"The common denominator of ${b}$ and ${d}$ is ${L}$. "
                f"Rewrite each fraction: $\\frac{{{a}}}{{{b}}} = \\frac{{{e1}}}{{{L}}}$ and "
                f"$\\frac{{{c}}}{{{d}}} = \\frac{{{e2}}}{{{L}}}$. "
                f"Combine the numerators: $\\frac{{{e1}}}{{{L}}} {op} \\frac{{{e2}}}{{{L}}} = "
                f"\\frac{{{en}}}{{{L}}}$. ")
        if fmt_frac(res) != f"\\frac{{{en}}}{{{L}}}":
            text += f"Simplify: $\\frac{{{en}}}{{{L}}} = {fmt_frac(res)}$. "
        return text + f"Therefore, the answer is $\\boxed{{{fmt_frac(res)}}}$."

    def model(self, p, v):
        a, b, c, d, op = p["a"], p["b"], p["c"], p["d"], p["op"]
        return (f"Cross multiply {a}/{b} {op} {c}/{d}. "
                f"{a}*{d} is {v['n1']} and {c}*{b} is {v['n2']}. "
                f"{v['n1']}{op}{v['n2']} is {v['n']}, over {b}*{d}={b * d}. "
                f"{v['n']}/{b * d} reduces to {fmt_plain_frac(v['r'])}. "
                f"So \\boxed{{{fmt_frac(v['r'])}}}")

    def facts(self, p, v):
        a, b, c, d, op = p["a"], p["b"], p["c"], p["d"], p["op"]
        return [f"{a}*{d} is {v['n1']}", f"{c}*{b} is {v['n2']}", f"{v['n1']}{op}{v['n2']} is {v['n']}",
                f"{v['n']}/{b * d} reduces to {fmt_plain_frac(v['r'])}"]


class DecimalFamily(Family):
    name = "decimal"
    steps = ("m", "r")

    def draw(self, rng):
        places = 2 if rng.random() < 0.2 else 1
        p = Decimal(rng.randint(1, 2 * 10 ** places - 1)).scaleb(-places)
        q = Decimal(rng.randint(1, 20)).scaleb(-1)
        if p == p.to_integral_value() or q == q.to_integral_value():
            # keep both operands genuinely decimal
            p += Decimal("0.5") if p == p.to_integral_value() else 0
            q += Decimal("0.5") if q == q.to_integral_value() else 0
        return {"p": fmt_dec(p), "c": rng.randint(2, 3), "q": fmt_dec(q),
                "op": rng.choice(["+", "-"]), "verb": _verb(rng)}

    def statement(self, p):
        return f"{p['verb']} ${p['p']} \\times {p['c']} {p['op']} {p['q']}$."

    def compute(self, p, slip=None):
        v = _Steps(slip)
        v.put("m", Decimal(p["p"]) * p["c"])
        q = Decimal(p["q"])
        v.put("r", v["m"] + q if p["op"] == "+" else v["m"] - q)
        return dict(v)

    def perturb(self, step, value, rng):
        return _perturb_dec(value, rng)

    def answer(self, v):
        return fmt_dec(v["r"])

    def expert(self, p, v):
        verb = "add" if p["op"] == "+" else "subtract"
        return (f"First, multiply: ${p['p']} \\times {p['c']} = {fmt_dec(v['m'])}$. "
                f"Then {verb}: ${fmt_dec(v['m'])} {p['op']} {p['q']} = {fmt_dec(v['r'])}$. "
                f"Therefore, the answer is $\\boxed{{{fmt_dec(v['r'])}}}$.")

    def model(self, p, v):
        return (f"We want {p['p']}*{p['c']}{p['op']}{p['q']}. "
                f"{p['p']}*{p['c']} is {fmt_dec(v['m'])}. "
                f"{fmt_dec(v['m'])}{p['op']}{p['q']} is {fmt_dec(v['r'])}. "
                f"So \\boxed{{{fmt_dec(v['r'])}}}")

    def facts(self, p, v):
        return [f"{p['p']}*{p['c']} is {fmt_dec(v['m'])}", f"{fmt_dec(v['m'])}{p['op']}{p['q']} is {fmt_dec(v['r'])}"]


class Precedence(Family):
    """``a + b \\times c``. The correct method multiplies first; the misconception evaluates left to
    right, ``(a + b) \\times c``, which is never the right answer: the two agree only when
    ``a c = a``, and the draw keeps ``a >= 1``, ``c >= 2``."""

    name = "precedence"
    steps = ("p", "r")

    def draw(self, rng):
        return {"a": rng.randint(1, 20), "b": rng.randint(2, 9), "c": rng.randint(2, 5), "verb": _verb(rng)}

    def statement(self, p):
        return f"{p['verb']} ${p['a']} + {p['b']} \\times {p['c']}$."

    def compute(self, p, slip=None):
        v = _Steps(slip)
        v.put("p", p["b"] * p["c"])
        v.put("r", p["a"] + v["p"])
        return dict(v)

    def perturb(self, step, value, rng):
        return _perturb_int(value, rng)

    def answer(self, v):
        return str(v["r"])

    def expert(self, p, v):
        return (f"Multiplication comes before addition: ${p['b']} \\times {p['c']} = {v['p']}$. "
                f"Then add: ${p['a']} + {v['p']} = {v['r']}$. "
                f"Therefore, the answer is $\\boxed{{{v['r']}}}$.")

    def model(self, p, v):
        return (f"We want {p['a']}+{p['b']}*{p['c']}. "
                f"{p['b']}*{p['c']} is {v['p']}. "
                f"{p['a']}+{v['p']} is {v['r']}. "
                f"So \\boxed{{{v['r']}}}")

    def misconceived(self, p):
        s = p["a"] + p["b"]
        return (f"We want {p['a']}+{p['b']}*{p['c']}. "
                f"{p['a']}+{p['b']} is {s}. "
                f"{s}*{p['c']} is {s * p['c']}. "
                f"So \\boxed{{{s * p['c']}}}")

    def facts(self, p, v):
        # Both methods' arithmetic: the model knows its tables; what it lacks is the method.
        s = p["a"] + p["b"]
        return [f"{p['b']}*{p['c']} is {v['p']}", f"{p['a']}+{v['p']} is {v['r']}",
                f"{p['a']}+{p['b']} is {s}", f"{s}*{p['c']} is {s * p['c']}"]


FAMILY_IMPL: dict[str, Family] = {f.name: f for f in (Arith(), Linear(), FractionFamily(), DecimalFamily(),
                                                      Precedence())}


def family(name: str) -> Family:
    try:
        return FAMILY_IMPL[name]
    except KeyError:
        raise ValueError(f"unknown toy family {name!r}; known: {', '.join(FAMILIES)}") from None


# ---------------------------------------------------------------------------------------------
# Problems and solutions
# ---------------------------------------------------------------------------------------------


def draw_problem(family_name: str, rng: random.Random) -> ToyProblem:
    fam = family(family_name)
    p = fam.draw(rng)
    v = fam.compute(p)
    return ToyProblem(family_name, p, fam.statement(p), fam.answer(v), v)


def expert_solution(tp: ToyProblem) -> str:
    """The expert demonstration: fixed textbook style, always correct."""
    return family(tp.family).expert(tp.params, tp.values)


def model_solution(tp: ToyProblem, rng: random.Random, mistake_rate: float = 0.0,
                   misconception_rate: float = 0.0) -> tuple[str, bool]:
    """A solution in the model's own style. In a family with a misconception
    (:meth:`Family.misconceived`), with probability ``misconception_rate`` it uses the wrong
    method; otherwise, with probability ``mistake_rate`` one intermediate result is wrong and the
    error propagates to the boxed answer. Returns ``(text, correct)``."""
    fam = family(tp.family)
    if misconception_rate and rng.random() < misconception_rate:
        wrong = fam.misconceived(tp.params)
        if wrong is not None:
            return wrong, False
    if rng.random() >= mistake_rate:
        return fam.model(tp.params, tp.values), True
    step = rng.choice(fam.steps)
    for _ in range(20):
        wrong = fam.perturb(step, tp.values[step], rng)
        v = fam.compute(tp.params, slip=(step, wrong))
        if fam.answer(v) != tp.answer:
            return fam.model(tp.params, v), False
    raise RuntimeError(f"could not make a wrong solution for {tp.problem!r}")  # pragma: no cover


def to_record(tp: ToyProblem, pid: str, model_style: bool = False) -> dict:
    """A problem record per docs/records.md; ``model_style``: the demonstration is written in the
    model's own style (correct, the right method) instead of the expert's."""
    solution = family(tp.family).model(tp.params, tp.values) if model_style else expert_solution(tp)
    return {"id": pid, "problem": tp.problem, "solution": solution, "answer": tp.answer, "source": tp.family}


@dataclass
class World:
    train: list[dict]
    benchmarks: dict[str, list[dict]]
    corpus: list[ToyProblem]  # pretraining problems (disjoint by text from train and benchmarks)


def math_key(problem: str) -> str:
    """The mathematical content of a statement (the wording variant such as "Compute" dropped):
    splits are disjoint on this key, so no split holds a reworded copy of another's problem."""
    return problem[problem.find("$"):]


def _unique_problems(fams: list[str], rng: random.Random, seen: set[str]) -> list[ToyProblem]:
    out = []
    for fam in fams:
        for _ in range(10_000):
            tp = draw_problem(fam, rng)
            if math_key(tp.problem) not in seen:
                break
        else:  # pragma: no cover - the spaces are far larger than the splits
            raise RuntimeError(f"toy family {fam!r} ran out of distinct problems")
        seen.add(math_key(tp.problem))
        out.append(tp)
    return out


def make_world(seed: int = 0, n_train: int = 400, n_bench: int = 100, n_corpus: int = 4000,
               families: tuple[str, ...] | list[str] = FAMILIES, expert_model_style_frac: float = 0.0) -> World:
    """All splits from one seed. ``train`` mixes the families in a shuffled balanced order;
    benchmarks hold ``n_bench`` problems per family; the corpus ``n_corpus`` mixed problems.
    No problem occurs twice (by :func:`math_key`) in or across train and the benchmarks, and no
    corpus problem is one of them (the corpus may repeat its own problems).

    ``expert_model_style_frac``: the share of the ``train`` demonstrations written in the model's own
    style (correct, with the right method) instead of the expert's: a policy-gap knob that moves the
    demonstrations towards the model and leaves the model alone (the corpus, hence pretraining, and
    the benchmarks do not depend on it). Each problem draws its number whatever the share, so a
    larger share restyles a superset of a smaller one's problems, and 0 gives the expert set."""
    families = tuple(families)
    for f in families:
        family(f)
    if n_train < 0 or n_bench < 0 or n_corpus < 0:
        raise ValueError("toy world sizes must be >= 0")
    if not 0.0 <= expert_model_style_frac <= 1.0:
        raise ValueError(f"expert_model_style_frac must be in [0, 1], got {expert_model_style_frac}")
    seen: set[str] = set()
    # Benchmarks first, then train, then the corpus: each later split avoids the earlier ones.
    benchmarks: dict[str, list[dict]] = {}
    for k, fam in enumerate(families):
        rng = random.Random(seed * 1_000_003 + 101 + k)
        probs = _unique_problems([fam] * n_bench, rng, seen)
        benchmarks[f"toy_{fam}"] = [to_record(tp, f"toy_{fam}-{i:05d}") for i, tp in enumerate(probs)]

    rng = random.Random(seed * 1_000_003 + 1)
    fams = [families[i % len(families)] for i in range(n_train)]
    rng.shuffle(fams)
    counters = dict.fromkeys(families, 0)
    train = []
    style_rng = random.Random(seed * 1_000_003 + 5)   # its own stream: the splits do not depend on the share
    for tp in _unique_problems(fams, rng, seen):
        own = style_rng.random() < expert_model_style_frac
        train.append(to_record(tp, f"{tp.family}-{counters[tp.family]:05d}", model_style=own))
        counters[tp.family] += 1

    # The corpus avoids every held-out problem; it may repeat its own (the families are small).
    rng = random.Random(seed * 1_000_003 + 2)
    cf = [families[i % len(families)] for i in range(n_corpus)]
    rng.shuffle(cf)
    corpus = []
    for fam in cf:
        for _ in range(10_000):
            tp = draw_problem(fam, rng)
            if math_key(tp.problem) not in seen:
                break
        else:  # pragma: no cover
            raise RuntimeError(f"toy family {fam!r}: every problem is held out")
        corpus.append(tp)
    return World(train=train, benchmarks=benchmarks, corpus=corpus)


@dataclass(frozen=True)
class PretrainExample:
    """One chat example for pretraining: the prompt is rendered from ``problem`` (and ``hint``,
    the expert solution, for a guided example); ``response`` is a model-style solution."""

    problem: str
    hint: str | None
    response: str
    correct: bool


def pretraining_examples(corpus: list[ToyProblem], seed: int = 0, mistake_rate: float = 0.25,
                         guided_frac: float = 0.3, guided_mistake_rate: float = 0.05,
                         misconception_rate: float = 0.0, textbook_frac: float = 0.0,
                         misconceived_textbook_frac: float = 0.0) -> list[PretrainExample]:
    """One example per corpus problem, deterministic from ``seed``: with probability
    ``guided_frac`` a guided example (the expert solution as hint, a model-style answer that
    follows the hint's method, with slips at ``guided_mistake_rate``), else a plain one. A plain
    example is, with probability ``textbook_frac`` (``misconceived_textbook_frac`` in a family with
    a misconception: how much of the textbook the model read covered that family), answered in the
    expert's textbook style (the expert solution, correct); otherwise in the model's style with
    slips at ``mistake_rate`` and, in a family with a misconception, the wrong method at
    ``misconception_rate``. The model-style answer is drawn for every plain example, so that
    changing either share changes which examples are textbook answers and nothing else."""
    for name, x in (("mistake_rate", mistake_rate), ("guided_frac", guided_frac),
                    ("guided_mistake_rate", guided_mistake_rate), ("misconception_rate", misconception_rate),
                    ("textbook_frac", textbook_frac), ("misconceived_textbook_frac", misconceived_textbook_frac)):
        if not 0.0 <= x <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {x}")
    rng = random.Random(seed * 1_000_003 + 3)
    out = []
    for tp in corpus:
        guided = rng.random() < guided_frac
        u = rng.random()
        misconceived = family(tp.family).misconceived(tp.params) is not None
        if guided:
            text, ok = model_solution(tp, rng, guided_mistake_rate)
        else:
            # drawn even when replaced, so that the shares change no other example
            text, ok = model_solution(tp, rng, mistake_rate, misconception_rate)
            if u < (misconceived_textbook_frac if misconceived else textbook_frac):
                text, ok = expert_solution(tp), True
        out.append(PretrainExample(tp.problem, expert_solution(tp) if guided else None, text, ok))
    return out


def fact_drills(corpus: list[ToyProblem], n_drills: int, facts_per_drill: int = 8, seed: int = 0) -> list[str]:
    """Arithmetic-table drills for pretraining: ``n_drills`` short texts, each ``facts_per_drill``
    correct facts of the corpus problems, in the model-style solutions' wording
    (``"4+3 is 7. 7*2 is 14. ..."``), for both methods where a family has a misconception. The pool
    holds each corpus problem's facts (held-out problems contribute none), so a fact is drilled as
    often as the corpus uses it; it is shuffled and cycled deterministically from ``seed``."""
    if n_drills < 0 or facts_per_drill < 1:
        raise ValueError("fact drills need n_drills >= 0 and facts_per_drill >= 1")
    pool = [f for tp in corpus for f in family(tp.family).facts(tp.params, tp.values)]
    if n_drills and not pool:
        raise ValueError("fact drills: the corpus is empty")
    rng = random.Random(seed * 1_000_003 + 4)
    order: list[str] = []
    out = []
    for _ in range(n_drills):
        facts = []
        while len(facts) < facts_per_drill:
            if not order:
                order = pool[:]
                rng.shuffle(order)
            facts.append(order.pop())
        out.append(". ".join(facts) + ".")
    return out
