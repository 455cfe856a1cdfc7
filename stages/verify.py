"""verify: judge every sampled response against its problem's reference answer (math-verify).

Reads the problems (``id``, ``answer``) and the sample shards; writes one verdict per sample
(docs/records.md) and the stage metrics.
"""


import time
from collections import Counter

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.io import read_problems, read_samples, write_json, write_jsonl, write_run_info
from drsft.params import load_params, section
from drsft.stage import clear_errors, log
from drsft.verify import REASONS, verify_batch


def summarize(rows: list[dict]) -> dict:
    """Stage metrics from verdict rows (pure)."""
    per_problem: dict[str, list[bool]] = {}
    for r in rows:
        per_problem.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    counts = Counter(r["reason"] for r in rows)
    n_prob = len(per_problem)
    return {
        "samples": len(rows),
        "problems": n_prob,
        "mean_solve_rate": sum(sum(v) / len(v) for v in per_problem.values()) / n_prob if n_prob else 0.0,
        "pass_at_n": sum(any(v) for v in per_problem.values()) / n_prob if n_prob else 0.0,
        "reasons": {k: counts.get(k, 0) for k in REASONS},
    }


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True)
@click.option("--samples", default="data/sample", show_default=True)
@click.option("--out", default="data/verify/verdicts.jsonl", show_default=True)
@click.option("--metrics", default="metrics/verify.json", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@clear_errors
def main(params_path, problems, samples, out, metrics, progress):
    """Grade every sample's final answer against its problem's reference answer."""
    cfg = section(load_params(params_path), "verify")
    answers = {p["id"]: p["answer"] for p in read_problems(problems)}
    todo = read_samples(samples, answers, fields=("problem_id", "sample_index", "response"))
    t0 = time.perf_counter()
    verdicts = verify_batch([(s["response"], answers[s["problem_id"]]) for s in todo],
                            workers=int(cfg["workers"]), timeout_s=float(cfg["timeout_s"]), mode=cfg["mode"],
                            progress=progress)
    seconds = time.perf_counter() - t0
    rows = [{"problem_id": s["problem_id"], "sample_index": s["sample_index"], "correct": v.correct,
             "reason": v.reason, "extracted": v.extracted} for s, v in zip(todo, verdicts)]
    write_jsonl(out, rows)
    stats = summarize(rows)
    write_json(metrics, stats)
    rate = len(rows) / seconds if seconds > 0 else 0.0
    write_run_info(metrics, {"seconds": seconds, "verdicts_per_s": rate})
    log.info("verify: %d samples of %d problems, pass@n %.3f, mean solve rate %.3f, %s, %.0f verdicts/s",
             stats["samples"], stats["problems"], stats["pass_at_n"], stats["mean_solve_rate"],
             stats["reasons"], rate)


if __name__ == "__main__":
    main()
