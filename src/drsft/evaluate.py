"""Benchmark evaluation: avg@k at a sampling temperature (the paper's protocol) and greedy accuracy.

Uses the same rollout engine and verifier as the training-time stages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from drsft.prompts import render_prompt
from drsft.rollout import SamplingParams
from drsft.stats import bootstrap, interval
from drsft.verify import verify_batch


def generate_and_verify(backend, problems: Sequence[Mapping], prompts: Sequence[str], sp: SamplingParams,
                        verify_cfg: Mapping) -> list[tuple]:
    """Sample ``sp.n`` completions per prompt and verify each against its problem's answer.

    Returns ``(problem, sample_index, completion, verdict)`` tuples in problem order; shared by
    evaluation and the world probe of ``prepare`` (``guided_align`` generates through resumable
    shards and verifies the shards' records).
    """
    completions = backend.generate(list(prompts), sp, progress=True) if prompts else []
    flat = [(p, i, c) for p, comps in zip(problems, completions) for i, c in enumerate(comps)]
    verdicts = verify_batch([(c.text, p["answer"]) for p, _, c in flat], workers=int(verify_cfg["workers"]),
                            timeout_s=float(verify_cfg["timeout_s"]), mode=verify_cfg["mode"])
    return [(p, i, c, v) for (p, i, c), v in zip(flat, verdicts)]


def _prediction_rows(backend, problems, prompts, sp: SamplingParams, mode: str, verify_cfg: Mapping) -> list[dict]:
    return [{"problem_id": p["id"], "mode": mode, "sample_index": i, "response": c.text,
             "tokens": len(c.token_ids), "finish_reason": c.finish_reason, "extracted": v.extracted,
             "correct": v.correct, "reason": v.reason, "answer": p["answer"]}
            for p, i, c, v in generate_and_verify(backend, problems, prompts, sp, verify_cfg)]


def summarize(predictions: Sequence[Mapping], k: int) -> dict:
    """Per-benchmark metrics from prediction rows (pure; tested on its own)."""
    sampled = [r for r in predictions if r["mode"] == "sample"]
    greedy = [r for r in predictions if r["mode"] == "greedy"]
    per_problem: dict[str, list[bool]] = {}
    for r in sampled:
        per_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    out: dict = {"problems": len(per_problem) or len(greedy), "k": k}
    if per_problem:
        out["avg_at_k"] = sum(sum(v) / len(v) for v in per_problem.values()) / len(per_problem)
        out["pass_at_k"] = sum(any(v) for v in per_problem.values()) / len(per_problem)
        out["no_answer_rate"] = sum(r["reason"] == "no_answer" for r in sampled) / len(sampled)
        out["truncated_rate"] = sum(r["finish_reason"] == "length" for r in sampled) / len(sampled)
    if greedy:
        out["greedy"] = sum(bool(r["correct"]) for r in greedy) / len(greedy)
    return out


def evaluate_benchmark(backend, problems: Sequence[Mapping], prompt_cfg: Mapping, cfg: Mapping,
                       verify_cfg: Mapping, batch_size: int) -> tuple[dict, list[dict]]:
    prompts = [render_prompt(backend.tokenizer, p["problem"], prompt_cfg) for p in problems]
    k = int(cfg["k"])
    preds: list[dict] = []
    if k > 0:
        sp = SamplingParams(n=k, temperature=float(cfg["temperature"]), top_p=float(cfg["top_p"]),
                            max_new_tokens=int(cfg["max_new_tokens"]), seed=int(cfg["seed"]), batch_size=batch_size)
        preds += _prediction_rows(backend, problems, prompts, sp, "sample", verify_cfg)
    if cfg.get("greedy", True):
        sp = SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=int(cfg["max_new_tokens"]),
                            seed=int(cfg["seed"]), batch_size=batch_size)
        preds += _prediction_rows(backend, problems, prompts, sp, "greedy", verify_cfg)
    return summarize(preds, k), preds


def average_over(benchmarks: Mapping[str, Mapping]) -> dict:
    keys = ("avg_at_k", "pass_at_k", "greedy", "no_answer_rate", "truncated_rate")
    out = {}
    for key in keys:
        vals = [m[key] for m in benchmarks.values() if key in m]
        if vals:
            out[key] = sum(vals) / len(vals)
    return out


def add_intervals(results: dict[str, dict], average: dict, scores: Mapping[str, Sequence[float]],
                  n_boot: int, seed: int = 0) -> None:
    """Add ``avg_at_k_ci`` (95 %, ``[low, high]``) to each benchmark's metrics and to the average, from a
    bootstrap over problems (drsft.stats: a problem's k samples move together; the average's
    interval resamples within each benchmark). In place; no-op without sampled scores."""
    scores = {b: s for b, s in scores.items() if len(s)}
    if not scores:
        return
    reps = bootstrap({"arm": scores}, n_boot=n_boot, seed=seed)["arm"]
    for b in scores:
        results[b]["avg_at_k_ci"] = interval(reps[b])
    if set(scores) == set(results):
        average["avg_at_k_ci"] = interval(reps["average"])
