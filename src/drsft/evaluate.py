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

    Returns ``(problem, sample_index, completion, verdict)`` tuples in problem order: the world
    probe's (the stages generate through resumable shards and verify the shards' records).
    """
    completions = backend.generate(list(prompts), sp, progress=True) if prompts else []
    flat = [(p, i, c) for p, comps in zip(problems, completions) for i, c in enumerate(comps)]
    verdicts = verify_batch([(c.text, p["answer"]) for p, _, c in flat], workers=int(verify_cfg["workers"]),
                            timeout_s=float(verify_cfg["timeout_s"]), mode=verify_cfg["mode"])
    return [(p, i, c, v) for (p, i, c), v in zip(flat, verdicts)]


GENERATION_FIELDS = ("problem_id", "mode", "sample_index", "response", "tokens", "finish_reason")
PREDICTION_FIELDS = (*GENERATION_FIELDS, "extracted", "correct", "reason", "answer")

# The evaluate params that determine the generations (the shard fingerprint); ``benchmarks``,
# ``shard_size`` and ``n_boot`` change none.
GENERATION_KEYS = ("k", "temperature", "top_p", "max_new_tokens", "greedy", "seed")


def generation_rows(backend, problems: Sequence[Mapping], prompt_cfg: Mapping, cfg: Mapping, batch_size: int,
                    progress=True) -> list[dict]:
    """Generations for ``problems``: ``evaluate.k`` samples of every problem (problem by problem),
    then one greedy row per problem when ``evaluate.greedy`` (fields :data:`GENERATION_FIELDS`)."""
    prompts = [render_prompt(backend.tokenizer, p["problem"], prompt_cfg) for p in problems]
    k = int(cfg["k"])
    runs = []
    if k > 0:
        runs.append(("sample", SamplingParams.from_params(cfg, batch_size, n=k)))
    if cfg.get("greedy", True):
        runs.append(("greedy", SamplingParams(n=1, temperature=0.0, top_p=1.0, max_new_tokens=int(cfg["max_new_tokens"]),
                                              seed=int(cfg["seed"]), batch_size=batch_size)))
    rows: list[dict] = []
    for mode, sp in runs:
        completions = backend.generate(prompts, sp, progress=progress) if prompts else []
        rows += [{"problem_id": p["id"], "mode": mode, "sample_index": i, "response": c.text,
                  "tokens": len(c.token_ids), "finish_reason": c.finish_reason}
                 for p, comps in zip(problems, completions) for i, c in enumerate(comps)]
    return rows


def check_generation_rows(problem_ids: Sequence[str], k: int, greedy: bool, rows: Sequence[Mapping]) -> None:
    """Raise ValueError unless ``rows`` are exactly what :func:`generation_rows` writes for these
    problems (samples 0..k-1 of each, then the greedy rows), each with every field."""
    expected = [(pid, "sample", j) for pid in problem_ids for j in range(k)]
    expected += [(pid, "greedy", 0) for pid in problem_ids] if greedy else []
    got = []
    for n, row in enumerate(rows):
        missing = [f for f in GENERATION_FIELDS if f not in row]
        if missing:
            raise ValueError(f"row {n + 1} lacks field(s) {missing}")
        if row["finish_reason"] not in ("stop", "length") or not isinstance(row["response"], str):
            raise ValueError(f"row {n + 1}: finish_reason {row['finish_reason']!r} or a response that is no string")
        got.append((row["problem_id"], row["mode"], row["sample_index"]))
    if got != expected:
        raise ValueError(f"expected {k} sample(s){' and a greedy row' if greedy else ''} for each of "
                         f"{len(problem_ids)} problems in order, got {len(got)} rows")


def verify_rows(rows: Sequence[Mapping], answers: Mapping[str, str], verify_cfg: Mapping,
                progress: bool = False) -> list[dict]:
    """Prediction rows (fields :data:`PREDICTION_FIELDS`): each generation verified against its
    problem's answer. Run on every evaluation, so a change of ``verify`` reuses the generations."""
    verdicts = verify_batch([(r["response"], answers[r["problem_id"]]) for r in rows],
                            workers=int(verify_cfg["workers"]), timeout_s=float(verify_cfg["timeout_s"]),
                            mode=verify_cfg["mode"], progress=progress)
    return [{**{f: r[f] for f in GENERATION_FIELDS}, "extracted": v.extracted, "correct": v.correct,
             "reason": v.reason, "answer": answers[r["problem_id"]]} for r, v in zip(rows, verdicts)]


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
