"""guided_align: re-solve unsolved problems with the expert solution as a hint; keep standalone re-solves.

A kept re-solve becomes a training example on the *plain* prompt (no hint). It carries two
log-prob vectors, each from one forward pass of the base model: under the guided prompt (the
behaviour policy that actually produced it; recorded at sampling time) and under the plain prompt
(what training conditions on).
"""

import gc
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import click  # noqa: E402

from drsft.evaluate import generate_and_verify  # noqa: E402
from drsft.io import read_jsonl, write_json, write_jsonl  # noqa: E402
from drsft.models import load_model, resolve_model  # noqa: E402
from drsft.params import load_params, section  # noqa: E402
from drsft.prompts import render_prompt  # noqa: E402
from drsft.rewrite import group_by_problem, leak_reason, select, training_row  # noqa: E402
from drsft.rollout import SamplingParams, make_backend  # noqa: E402
from drsft.scoring import score_responses  # noqa: E402
from drsft.stage import clear_errors, log, problems_by_id  # noqa: E402


def _scoring_model(backend, model_path, dtype, trust):
    """The HF model for teacher-forced scoring: the hf backend's own, else a fresh load after freeing vLLM."""
    model = getattr(backend, "model", None)
    if model is not None and hasattr(model, "forward"):
        return model
    del backend
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return load_model(model_path, dtype=dtype, trust_remote_code=trust)


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True)
@click.option("--unsolved", default="data/self_align/unsolved.jsonl", show_default=True)
@click.option("--model", "model_dir", default="models/base", show_default=True)
@click.option("--out", default="data/guided_align", show_default=True)
@click.option("--metrics", default="metrics/guided_align.json", show_default=True)
@clear_errors
def main(params_path, problems, unsolved, model_dir, out, metrics):
    params = load_params(params_path)
    cfg, prompt_cfg, roll = section(params, "guided_align"), section(params, "prompt"), section(params, "rollout")
    verify_cfg = section(params, "verify")
    trust = bool(section(params, "model").get("trust_remote_code", False))
    by_id = problems_by_id(problems)
    todo = [by_id[r["problem_id"]] for r in read_jsonl(unsolved)]
    model_path = resolve_model(model_dir)
    seed, keep, rule = int(cfg["seed"]), int(cfg["keep_per_problem"]), cfg["rule"]

    backend = make_backend(roll["backend"], model_path, dtype=roll.get("dtype", "auto"), trust_remote_code=trust,
                           tensor_parallel_size=roll.get("tensor_parallel_size", 1),
                           gpu_memory_utilization=roll.get("gpu_memory_utilization", 0.9))
    tok = backend.tokenizer
    guided_prompt = {p["id"]: render_prompt(tok, p["problem"], prompt_cfg, hint=p["solution"]) for p in todo}
    sp = SamplingParams(n=int(cfg["n"]), temperature=float(cfg["temperature"]), top_p=float(cfg["top_p"]),
                        max_new_tokens=int(cfg["max_new_tokens"]), seed=seed, batch_size=int(roll["batch_size"]))
    attempts = generate_and_verify(backend, todo, [guided_prompt[p["id"]] for p in todo], sp, verify_cfg)
    resolves, status_counts = [], Counter()
    for p, i, c, v in attempts:
        leak = leak_reason(c.text, p["solution"], cfg["leak_phrases"], int(cfg["max_shared_ngram"])) if v.correct else None
        status = "wrong" if not v.correct else (f"leak_{leak}" if leak else "kept")
        status_counts[status] += 1
        resolves.append({"problem_id": p["id"], "sample_index": i, "prompt": guided_prompt[p["id"]],
                         "response": c.text, "response_ids": c.token_ids, "logprobs": c.logprobs,
                         "finish_reason": c.finish_reason, "correct": v.correct, "reason": v.reason,
                         "status": status})

    kept = group_by_problem(r for r in resolves if r["status"] == "kept")
    chosen, still_unsolved = [], []
    for p in todo:
        if p["id"] not in kept:
            still_unsolved.append(p["id"])
            continue
        chosen.extend((p, rec) for rec in select(kept[p["id"]], rule, keep, seed, p["id"]))

    scorer = _scoring_model(backend, model_path, roll.get("dtype", "auto"), trust)
    plain_prompts = [render_prompt(tok, p["problem"], prompt_cfg) for p, _ in chosen]
    plain_lp = score_responses(scorer, tok, plain_prompts, [rec["response_ids"] for _, rec in chosen],
                               batch_size=int(cfg["score_batch_size"])) if chosen else []
    rows = [training_row(p["id"], "guided", pp, rec["response"], rec["response_ids"], rec["logprobs"], lp, "guided")
            for (p, rec), pp, lp in zip(chosen, plain_prompts, plain_lp)]

    out = Path(out)
    write_jsonl(out / "resolves.jsonl", resolves)
    write_jsonl(out / "selected.jsonl", rows)
    write_jsonl(out / "unsolved.jsonl", ({"problem_id": pid} for pid in still_unsolved))
    attempted = len(todo)
    solved = attempted - len(still_unsolved)
    write_json(metrics, {
        "attempted": attempted,
        "solved": solved,
        "solved_share": solved / attempted if attempted else 0.0,
        "still_unsolved": len(still_unsolved),
        "samples": len(resolves),
        "kept_rows": len(rows),
        "status": {k: status_counts.get(k, 0) for k in ("kept", "wrong", "leak_phrase", "leak_copy")},
    })
    log.info("guided_align: %d/%d unsolved problems re-solved (%s)", solved, attempted, dict(status_counts))


if __name__ == "__main__":
    main()
