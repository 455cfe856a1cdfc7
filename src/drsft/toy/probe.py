"""Probing the world's properties: does the base model leave something to rewrite, and to learn?

The data-rewriting pipeline needs these from a (model, problems) pair, and ``prepare`` measures
them on a subset of the training problems with the shared engines (drsft.rollout, drsft.verify,
drsft.scoring), before any fine-tuning, so they hold for the same sampler and verifier the
pipeline uses:

1. the base model solves some problems but not all: the mean per-problem solve rate at the
   sampling temperature (``n`` samples per problem) lies in ``[solve_rate_min, solve_rate_max]``;
2. a good share of problems has 0 of ``n`` correct (``unsolved_share >= unsolved_min``), and on those
   the guided prompt (the expert solution as hint) raises the solve rate above a fresh unguided
   estimate on the same problems, without solving every one of them (so the ``self``, ``guided`` and
   ``fallback`` tiers are all non-empty downstream);
3. expert demonstrations are off-policy: their mean per-token NLL under the base model (plain
   prompt) is higher than that of the model's own correct solutions;
4. **headroom the expert data carries**: at least one family (the record's ``source``) whose
   unguided solve rate is below ``headroom_solve_max`` while its guided solve rate (hint on every
   problem of the family) is at least ``headroom_margin`` above it: the model lacks the method,
   the expert demonstrations show it, and the model can follow them;
5. **a realistic gap**: the expert NLL is between ``gap_ratio_min`` and ``gap_ratio_max`` times that
   of the model's own correct solutions and below ``gap_nll_max`` nats/token: off-policy, but not a
   foreign language;
6. **rewriting brings the data closer** (the paper's premise), per family: as the guided tier holds
   them, the correct, finished hint-guided re-solves of the problems the model did not solve,
   scored under the plain prompt it trains them under, are closer to the model than the expert's
   solutions of the same problems, and farther than its own correct samples (self < guided <
   expert, per-token NLL); in a headroom family, where the model has (almost) no correct sample of
   its own, guided < expert alone.

The unguided solve rate on the unsolved problems is 0 by construction on the probe's own samples,
so a fresh set of samples (another seed) gives the unbiased comparison for property 2.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _token_nll(logprob_lists: Sequence[Sequence[float]]) -> float | None:
    """Mean per-token NLL over all tokens of all responses (token-weighted)."""
    total = sum(len(lp) for lp in logprob_lists)
    if not total:
        return None
    return -sum(sum(lp) for lp in logprob_lists) / total


def headroom_families(families: Mapping[str, Mapping], c: Mapping) -> list[str]:
    """The families with headroom (property 4), from the per-family rates of :func:`probe_world`."""
    return [f for f, m in families.items()
            if m["solve_rate"] < c["headroom_solve_max"]
            and m["guided_solve_rate"] - m["solve_rate"] >= c["headroom_margin"]]


def rewriting_closer(families: Mapping[str, Mapping], headroom: Sequence[str]) -> bool | None:
    """Property 6 from the per-family NLLs (:func:`probe_world`): in every family with correct guided
    re-solves, guided < expert on the same problems, and self < guided outside the headroom
    families. None when the summary predates the guided NLLs (nothing to check)."""
    if not families or any("nll_guided_correct" not in m for m in families.values()):
        return None
    judged = [f for f, m in families.items() if m["nll_guided_correct"] is not None]
    if not judged:
        return False
    for f in judged:
        m = families[f]
        if not m["nll_guided_correct"] < m["nll_expert_guided_problems"]:
            return False
        if f not in headroom and (m["nll_own_correct"] is None or not m["nll_own_correct"] < m["nll_guided_correct"]):
            return False
    return True


def world_checks(w: Mapping, c: Mapping) -> dict[str, bool]:
    """The properties as flags, from a ``world`` summary (``metrics/probe.json``) and the
    ``prepare.probe`` thresholds: a pure function, so a recorded summary can be re-checked. A summary
    without the guided re-solves' NLLs (recorded before they were measured) has no
    ``rewriting_closer`` flag."""
    g, f, ne, no, ratio = (w["guided_solve_rate_on_unsolved"], w["unguided_solve_rate_on_unsolved_fresh"],
                           w["nll_expert"], w["nll_own_correct"], w["nll_ratio_expert_to_own"])
    closer = rewriting_closer(w["families"], headroom_families(w["families"], c))
    return {
        **({} if closer is None else {"rewriting_closer": closer}),
        "solve_rate_in_range": bool(w["solve_rate"] is not None
                                    and c["solve_rate_min"] <= w["solve_rate"] <= c["solve_rate_max"]),
        "guidance_helps_on_unsolved": bool(
            w["unsolved_share"] >= c["unsolved_min"] and g is not None and f is not None
            and g > f and w["guided_solved_problems_on_unsolved"] < w["unsolved"]),
        "expert_nll_higher": bool(ne is not None and no is not None and ne > no),
        "headroom": bool(headroom_families(w["families"], c)),
        "realistic_gap": bool(ratio is not None and c["gap_ratio_min"] <= ratio <= c["gap_ratio_max"]
                              and ne < c["gap_nll_max"]),
    }


def probe_world(model_dir: str, problems: Sequence[Mapping], prompt_cfg: Mapping, cfg: Mapping,
                verify_workers: int, verify_timeout_s: float, trust_remote_code: bool = False,
                log: Callable[[str], Any] = print, verify_mode: str = "boxed") -> dict:
    """Measure the five properties on the first ``cfg['n_problems']`` of ``problems``.

    ``cfg``: the ``prepare.probe`` params (validated by drsft.schema; params.yaml holds the
    defaults) less ``enabled`` and the verifier settings, which come as arguments (``verify_mode``:
    the pipeline's ``verify.mode``, so the probe grades as the stages do).
    ``problems``: problem records (``id``, ``problem``, ``solution``, ``answer``). Returns the
    ``world`` section of ``metrics/prepare.json`` (rates, counts, NLLs and ``checks``).
    """
    from drsft.evaluate import generate_and_verify
    from drsft.models import load_model, load_tokenizer
    from drsft.prompts import render_prompt
    from drsft.rollout import SamplingParams, make_backend
    from drsft.scoring import score_responses

    c = dict(cfg)
    verify_cfg = {"workers": int(verify_workers), "timeout_s": float(verify_timeout_s), "mode": verify_mode}
    t0 = time.time()
    probs = [p for p in problems if p.get("solution")][: int(c["n_problems"])]
    if not probs:
        raise ValueError("probe: no problems with an expert solution")
    n = int(c["n"])
    tok = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    backend = make_backend(str(c["backend"]), str(model_dir), trust_remote_code=trust_remote_code,
                           data_parallel_size=int(c["data_parallel_size"]))

    def sampling(seed: int) -> SamplingParams:
        return SamplingParams.from_params(c, int(c["batch_size"]), seed=seed)

    def run(prompts: list[str], items: list[Mapping], seed: int):
        """The completions and verdicts per prompt, through the pipeline's one generate-and-verify path."""
        rows = generate_and_verify(backend, items, prompts, sampling(seed), verify_cfg)
        comps = [[c for _, _, c, _ in rows[i * n:(i + 1) * n]] for i in range(len(prompts))]
        ok = [[v.correct for _, _, _, v in rows[i * n:(i + 1) * n]] for i in range(len(prompts))]
        return comps, ok

    plain = [render_prompt(tok, p["problem"], prompt_cfg) for p in probs]
    comps, ok = run(plain, probs, int(c["seed"]))
    rates = [sum(o) / n for o in ok]
    unsolved = [i for i, o in enumerate(ok) if not any(o)]
    finished = sum(comp.finish_reason == "stop" for row in comps for comp in row) / (n * len(probs))
    log(f"probe: solve rate {_mean(rates):.3f}, {len(unsolved)}/{len(probs)} unsolved ({time.time() - t0:.0f}s)")

    # Guided re-solves (the expert solution as hint) on every probe problem: per family for
    # property 4, restricted to the unsolved problems for property 2.
    guided_prompts = [render_prompt(tok, p["problem"], prompt_cfg, hint=p["solution"]) for p in probs]
    g_comps, g_all = run(guided_prompts, probs, int(c["seed"]))
    g_rates = [sum(o) / n for o in g_all]
    _, f_ok = run([plain[i] for i in unsolved], [probs[i] for i in unsolved], int(c["seed"]) + 1)
    guided_rate = _mean([g_rates[i] for i in unsolved])
    fresh_rate = _mean([sum(o) / n for o in f_ok])
    guided_any = sum(any(g_all[i]) for i in unsolved)
    log(f"probe: on unsolved, guided {guided_rate}, fresh unguided {fresh_rate}, "
        f"guided solved {guided_any}/{len(unsolved)} ({time.time() - t0:.0f}s)")

    # Property 3 and 5: NLL of the expert demonstrations vs the model's own correct solutions.
    model = load_model(model_dir, trust_remote_code=trust_remote_code)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    expert_ids = [tok(p["solution"], add_special_tokens=False)["input_ids"] + eos for p in probs]
    own = [(i, plain[i], comp.token_ids) for i, row in enumerate(comps) for comp, good in zip(row, ok[i]) if good]
    lp_expert = score_responses(model, tok, plain, expert_ids)
    lp_own = score_responses(model, tok, [a for _, a, _ in own], [b for _, _, b in own]) if own else []
    # Property 6: as the guided tier holds them, the correct, finished guided re-solves of the problems
    # the model did not solve itself, scored under the plain prompt it trains them under.
    guided = [(i, plain[i], comp.token_ids) for i in unsolved
              for comp, good in zip(g_comps[i], g_all[i]) if good and comp.finish_reason == "stop"]
    lp_guided = score_responses(model, tok, [a for _, a, _ in guided], [b for _, _, b in guided]) if guided else []
    nll_expert, nll_own = _token_nll(lp_expert), _token_nll(lp_own)
    log(f"probe: NLL expert {nll_expert}, own correct {nll_own}, guided correct {_token_nll(lp_guided)} "
        f"({time.time() - t0:.0f}s)")

    families: dict[str, dict] = {}
    for fam in sorted({p.get("source", "?") for p in probs}):
        idx = [i for i, p in enumerate(probs) if p.get("source", "?") == fam]
        own_f = [lp for (i, _, _), lp in zip(own, lp_own) if probs[i].get("source", "?") == fam]
        guided_f = [(i, lp) for (i, _, _), lp in zip(guided, lp_guided) if probs[i].get("source", "?") == fam]
        guided_problems = sorted({i for i, _ in guided_f})
        families[fam] = {"problems": len(idx), "solve_rate": _mean([rates[i] for i in idx]),
                         "guided_solve_rate": _mean([g_rates[i] for i in idx]),
                         "nll_expert": _token_nll([lp_expert[i] for i in idx]), "nll_own_correct": _token_nll(own_f),
                         "own_correct_samples": len(own_f),
                         "nll_guided_correct": _token_nll([lp for _, lp in guided_f]),
                         "guided_correct_samples": len(guided_f),
                         "nll_expert_guided_problems": _token_nll([lp_expert[i] for i in guided_problems])}
    headroom = headroom_families(families, c)
    gap_ratio = nll_expert / nll_own if nll_expert is not None and nll_own else None
    log(f"probe: headroom families {headroom}; expert/own NLL ratio {gap_ratio} ({time.time() - t0:.0f}s)")

    world = {
        "probe_problems": len(probs),
        "n": n,
        "temperature": float(c["temperature"]),
        "solve_rate": _mean(rates),
        "solve_rate_by_family": {f: m["solve_rate"] for f, m in families.items()},
        "families": families,
        "headroom_families": headroom,
        "finished_share": finished,
        "unsolved": len(unsolved),
        "unsolved_share": len(unsolved) / len(probs),
        "all_solved_share": sum(all(o) for o in ok) / len(probs),
        "guided_solve_rate_on_unsolved": guided_rate,
        "guided_solved_problems_on_unsolved": guided_any,
        "unguided_solve_rate_on_unsolved": 0.0 if unsolved else None,
        "unguided_solve_rate_on_unsolved_fresh": fresh_rate,
        "nll_expert": nll_expert,
        "nll_own_correct": nll_own,
        "nll_ratio_expert_to_own": gap_ratio,
        "nll_guided_correct": _token_nll(lp_guided),
        "own_correct_samples": len(own),
        "guided_correct_samples": len(guided),
    }
    world["checks"] = world_checks(world, c)
    world["seconds"] = round(time.time() - t0, 1)
    return world
