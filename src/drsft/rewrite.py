"""Data rewriting: the three tiers (self-align, guided-align, fallback) and the policy-gap diagnostics.

Per problem, in order:

1. **self**: correct samples of the model itself (on-policy) are kept;
2. **guided**: problems with no correct sample are re-solved with the expert solution as a hint;
   a correct re-solve that stands alone (does not lean on the hint) is kept, paired with the
   *plain* prompt;
3. **fallback**: problems still unsolved keep the expert demonstration.

The functions here are pure (records in, records out); the stages do the I/O, the rollouts and
the scoring.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

SELECTION_RULES = ("random", "shortest", "highest_logprob")
TIERS = ("self", "guided", "fallback")


# --------------------------------------------------------------------------- selection
def _problem_rng(seed: int, problem_id: str) -> random.Random:
    """An RNG per problem, so a problem's choice does not depend on which other problems exist."""
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def mean_logprob(rec: Mapping) -> float:
    lp = rec.get("logprobs") or []
    return sum(lp) / len(lp) if lp else -math.inf


def select(candidates: Sequence[Mapping], rule: str, k: int | str, seed: int, problem_id: str) -> list[Mapping]:
    """Choose up to ``k`` of a problem's correct candidates; ``k = "all"`` keeps every one (in the
    rule's order).

    Candidates with identical response text count once (keeping duplicates would weight a
    solution twice). Rules:

    * ``random``: a uniform draw without replacement, seeded by ``(seed, problem_id)``;
    * ``shortest``: fewest response tokens, ties broken by sample index;
    * ``highest_logprob``: highest *mean* per-token log-probability under the model (the sum
      would simply prefer short responses), ties broken by sample index.
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {', '.join(SELECTION_RULES)}")
    if k == "all":
        k = len(candidates)
    elif isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"keep_per_problem must be an integer >= 1 or 'all', got {k!r}")
    seen: set[str] = set()
    unique = []
    for cand in sorted(candidates, key=lambda r: r["sample_index"]):
        if cand["response"] not in seen:
            seen.add(cand["response"])
            unique.append(cand)
    if rule == "random":
        rng = _problem_rng(seed, problem_id)
        return rng.sample(unique, min(k, len(unique)))
    if rule == "shortest":
        return sorted(unique, key=lambda r: (len(r["response_ids"]), r["sample_index"]))[:k]
    return sorted(unique, key=lambda r: (-mean_logprob(r), r["sample_index"]))[:k]


def group_by_problem(records: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    out: dict[str, list[Mapping]] = {}
    for rec in records:
        out.setdefault(rec["problem_id"], []).append(rec)
    return out


def join_verdicts(samples: Sequence[Mapping], verdicts: Sequence[Mapping]) -> list[dict]:
    """Attach each verdict to its sample; every sample must have exactly one verdict."""
    index = {(v["problem_id"], v["sample_index"]): v for v in verdicts}
    if len(index) != len(verdicts):
        raise ValueError("verdicts contain duplicate (problem_id, sample_index) pairs")
    joined = []
    for s in samples:
        key = (s["problem_id"], s["sample_index"])
        if key not in index:
            raise ValueError(f"no verdict for sample {key}: rerun verify")
        v = index.pop(key)
        joined.append({**s, "correct": bool(v["correct"]), "reason": v["reason"]})
    if index:
        raise ValueError(f"{len(index)} verdicts have no sample, e.g. {next(iter(index))}: rerun verify")
    return joined


def training_row(problem_id: str, tier: str, prompt: str, response: str, response_ids: Sequence[int],
                 behaviour_logprobs: Sequence[float] | None, plain_logprobs: Sequence[float], behaviour: str) -> dict:
    if behaviour_logprobs is not None and len(behaviour_logprobs) != len(response_ids):
        raise ValueError(f"{problem_id}: {len(behaviour_logprobs)} behaviour log-probs for {len(response_ids)} tokens")
    if len(plain_logprobs) != len(response_ids):
        raise ValueError(f"{problem_id}: {len(plain_logprobs)} plain log-probs for {len(response_ids)} tokens")
    return {
        "problem_id": problem_id,
        "tier": tier,
        "prompt": prompt,
        "response": response,
        "response_ids": list(response_ids),
        "behaviour_logprobs": None if behaviour_logprobs is None else list(behaviour_logprobs),
        "plain_logprobs": list(plain_logprobs),
        "behaviour": behaviour,
    }


def self_align(problem_ids: Sequence[str], samples: Sequence[Mapping], verdicts: Sequence[Mapping],
               keep_per_problem: int | str, rule: str, seed: int) -> tuple[list[dict], list[str], dict]:
    """Keep correct, finished model samples. Returns (training rows, unsolved problem ids, stats).

    A correct sample whose ``finish_reason`` is ``length`` (cut at ``max_new_tokens``) is dropped
    and counted in ``stats["dropped"]["truncated"]``; a problem whose correct samples were all
    truncated is unsolved (it goes on to guided re-solving).

    A self-aligned response was sampled from the base model under the plain prompt, so its
    behaviour log-probs are the recorded sampling log-probs and its plain log-probs are the same.
    """
    joined = group_by_problem(join_verdicts(samples, verdicts))
    unknown = set(joined) - set(problem_ids)
    if unknown:
        raise ValueError(f"samples for unknown problems, e.g. {sorted(unknown)[0]!r}: rerun sample")
    rows, unsolved = [], []
    n_correct = n_truncated = 0
    for pid in problem_ids:
        correct = [r for r in joined.get(pid, []) if r["correct"]]
        n_correct += len(correct)
        # A sample cut at max_new_tokens never becomes a training row, even with a correct box.
        finished = [r for r in correct if r["finish_reason"] == "stop"]
        n_truncated += len(correct) - len(finished)
        correct = finished
        if not correct:
            unsolved.append(pid)
            continue
        for rec in select(correct, rule, keep_per_problem, seed, pid):
            rows.append(training_row(pid, "self", rec["prompt"], rec["response"], rec["response_ids"],
                                     rec["logprobs"], rec["logprobs"], "sampled"))
    stats = {"problems": len(problem_ids), "solved": len(problem_ids) - len(unsolved), "unsolved": len(unsolved),
             "correct_samples": n_correct, "kept": len(rows), "dropped": {"truncated": n_truncated}}
    return rows, unsolved, stats


# --------------------------------------------------------------------------- hint leakage
_WORD = re.compile(r"\S+")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copied_ngram(response: str, hint: str, n: int, problem: str = "") -> tuple[str, ...] | None:
    """A run of ``n`` consecutive words (case-insensitive) that ``response`` shares with ``hint``
    and that does not occur in ``problem``, or None. Restating the problem (which the expert
    solution also restates) is not copying; a longer run that goes beyond the problem's words is."""
    if n <= 0:
        return None
    from_hint = _ngrams(_words(hint), n) - _ngrams(_words(problem), n)
    if not from_hint:
        return None
    words = _words(response)
    return next((g for i in range(len(words) - n + 1) if (g := tuple(words[i:i + n])) in from_hint), None)


def leak_reason(response: str, hint: str, leak_phrases: Sequence[str], max_shared_ngram: int,
                problem: str = "") -> str | None:
    """Why a guided re-solve leans on its hint, or None if it stands alone.

    ``phrase``: it mentions one of ``leak_phrases`` (case-insensitive, whole words), e.g.
    "the hint", "the reference solution"; ``copy``: it shares a run of ``max_shared_ngram``
    consecutive words with the hint that is not in the problem's text (:func:`copied_ngram`).
    """
    lower = response.lower()
    for phrase in leak_phrases:
        if re.search(r"\b" + re.escape(phrase.lower()) + r"\b", lower):
            return "phrase"
    if copied_ngram(response, hint, max_shared_ngram, problem) is not None:
        return "copy"
    return None


def dropped_rows(self_metrics: str | Path, guided_metrics: str | Path) -> dict:
    """What the filters removed before the tiers were assembled, from the two stages' metrics
    files: correct samples ``truncated`` at max_new_tokens per tier, and guided re-solves dropped
    as hint ``leak``s with their share of the correct, finished re-solves."""
    from drsft.io import DataError, read_json, require

    s, g = read_json(self_metrics), read_json(guided_metrics)
    ds = require(s, "dropped", self_metrics, None, dict, nonempty=False)
    dg = require(g, "dropped", guided_metrics, None, dict, nonempty=False)
    for d, path, keys in ((ds, self_metrics, ("truncated",)), (dg, guided_metrics, ("truncated", "leak", "leak_share"))):
        for k in keys:
            if not isinstance(d.get(k), (int, float)):
                raise DataError(path, None, f"dropped.{k} is missing or not a number: rerun the stage", "dropped")
    return {"truncated": {"self": ds["truncated"], "guided": dg["truncated"]},
            "leak": {"guided": dg["leak"], "share": dg["leak_share"]}}


# --------------------------------------------------------------------------- diagnostics
def _moments(xs: Sequence[float]) -> dict:
    if not xs:
        return {"count": 0}
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / n
    return {"count": n, "mean": mean, "var": var, "min": min(xs), "max": max(xs)}


def ess_fraction(log_weights: Sequence[float]) -> float | None:
    """Effective sample size of the normalised weights, as a fraction of their number.

    ESS = (Σw)² / Σw², computed stably in log space; 1.0 means uniform weights.
    """
    if not log_weights:
        return None
    m = max(log_weights)
    w = [math.exp(x - m) for x in log_weights]
    s1, s2 = sum(w), sum(x * x for x in w)
    return (s1 * s1 / s2) / len(w)


def policy_gap(rows: Sequence[Mapping]) -> dict:
    """Policy-gap statistics of a set of training rows under the base model π₀.

    * ``nll``: mean per-token NLL under π₀ and the plain prompt (token-weighted);
    * ``seq_nll``: per-sequence mean NLL moments;
    * where π_β is known (self, guided): token- and sequence-level log importance ratio
      log π₀(y|x) − log π_β(y|x'), with its mean, variance and ESS of the normalised weights;
    * where it is not (fallback, expert): the moments of π₀'s token probabilities.
    """
    tok_lp: list[float] = []
    seq_nll: list[float] = []
    tok_ratio: list[float] = []
    seq_ratio: list[float] = []
    unknown_probs: list[float] = []
    for r in rows:
        lp = r["plain_logprobs"]
        if not lp:
            continue
        tok_lp.extend(lp)
        seq_nll.append(-sum(lp) / len(lp))
        b = r.get("behaviour_logprobs")
        if b is not None:
            ratios = [p - q for p, q in zip(lp, b)]
            tok_ratio.extend(ratios)
            seq_ratio.append(sum(ratios))
        else:
            unknown_probs.extend(math.exp(x) for x in lp)
    out: dict = {
        "rows": len(rows),
        "tokens": len(tok_lp),
        "nll": (-sum(tok_lp) / len(tok_lp)) if tok_lp else None,
        "seq_nll": _moments(seq_nll),
    }
    if tok_ratio:
        out["log_ratio_token"] = {**_moments(tok_ratio), "ess_fraction": ess_fraction(tok_ratio)}
        out["log_ratio_seq"] = {**_moments(seq_ratio), "ess_fraction": ess_fraction(seq_ratio)}
    if unknown_probs:
        out["base_token_prob"] = _moments(unknown_probs)
    return out


def gap_by_family(rewritten: Sequence[Mapping], expert: Sequence[Mapping], families: Mapping[str, str]) -> dict:
    """``{family: {tier | "rewritten" | "expert": {"rows", "nll"}}}``: the mean per-token NLL under the
    base model (plain prompt) of each tier, of the rewritten set and of the expert set, per problem
    family (``families``: problem id -> the problem's ``source``), so that one family's tier cannot
    hide behind the mean of the others."""
    out: dict = {}
    for fam in sorted(set(families.values())):
        def mine(rows):
            return [r for r in rows if families.get(r["problem_id"]) == fam]

        sets = {t: [r for r in mine(rewritten) if r["tier"] == t] for t in TIERS}
        sets["rewritten"], sets["expert"] = mine(rewritten), mine(expert)
        out[fam] = {name: {"rows": len(rows), "nll": policy_gap(rows)["nll"]} for name, rows in sets.items()}
    return out


def rewrite_metrics(rewritten: Sequence[Mapping], expert: Sequence[Mapping],
                    families: Mapping[str, str] | None = None) -> dict:
    """metrics/rewrite.json: per tier the problems it holds (``count``, ``share`` of the problems) and
    its training rows (``rows``: more than its problems where ``keep_per_problem`` keeps several),
    NLL per tier / set, policy-gap statistics; with ``families`` (problem id -> family) the NLL per
    tier and family (:func:`gap_by_family`)."""
    problems = {t: {r["problem_id"] for r in rewritten if r["tier"] == t} for t in TIERS}
    rows = Counter(r["tier"] for r in rewritten)
    total = len({r["problem_id"] for r in rewritten})
    by_tier = {t: [r for r in rewritten if r["tier"] == t] for t in TIERS}
    gap = {t: policy_gap(by_tier[t]) for t in TIERS}
    gap["rewritten"] = policy_gap(rewritten)
    gap["expert"] = policy_gap(expert)
    return {
        "tiers": {t: {"count": len(problems[t]), "share": len(problems[t]) / total if total else 0.0,
                      "rows": rows.get(t, 0)} for t in TIERS},
        "rows": len(rewritten),
        "problems": total,
        "nll": {name: g["nll"] for name, g in gap.items()},
        "gap": gap,
        **({"gap_by_family": gap_by_family(rewritten, expert, families)} if families is not None else {}),
    }


def nll_histogram(rewritten: Sequence[Mapping], expert: Sequence[Mapping], bins: int = 30) -> list[dict]:
    """Histogram of per-sequence mean NLL under π₀, expert vs rewritten, as shares of rows per bin.

    Rows ``{"nll": bin centre, "expert": share, "rewritten": share}`` for ``dvc plots``.
    """
    def seq_nll(rows):
        return [-sum(r["plain_logprobs"]) / len(r["plain_logprobs"]) for r in rows if r["plain_logprobs"]]

    sets = {"expert": seq_nll(expert), "rewritten": seq_nll(rewritten)}
    values = [v for vs in sets.values() for v in vs]
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = (hi - lo) / bins or 1.0
    out = [{"nll": round(lo + (i + 0.5) * width, 6), "expert": 0.0, "rewritten": 0.0} for i in range(bins)]
    for name, vs in sets.items():
        for v in vs:
            out[min(int((v - lo) / width), bins - 1)][name] += 1 / len(vs)
    return out
