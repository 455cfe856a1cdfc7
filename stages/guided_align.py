"""guided_align: re-solve unsolved problems with the expert solution as a hint; keep standalone re-solves.

``guided_align.n: 0`` skips re-solving (the tier ablation "DR without guided re-solving"): no
generation, empty ``resolves``/``selected`` files, and every unsolved problem is passed on to
``fallback``.

Writes ``<out>/resolves.<records.format>`` (every re-solve with its verdict and filter status),
``<out>/selected.<records.format>`` (training rows, docs/records.md) and ``<out>/unsolved.jsonl``.

A kept re-solve becomes a training example on the *plain* prompt (no hint). It carries two
log-prob vectors, each from one forward pass of the base model: under the guided prompt (the
behaviour policy that actually produced it; recorded at sampling time) and under the plain prompt
(what training conditions on).

Generation is resumable, as in ``sample``: the guided re-solves are written in shards of
``guided_align.shard_size`` problems (Sample records, docs/records.md) under ``<out>/shards``
(``persist: true`` in dvc.yaml) by :func:`drsft.shards.run_sharded`, with a fingerprint of what
determines them (the generation params, ``rollout``, ``prompt``, the problems and hints, the
model) in ``<out>/shards/manifest.json``. A killed run reuses its finished shards; shards of
other params/inputs are deleted, never reused. Verification, the leak filter and selection are
cheap and rerun on every run, so a change of ``verify``, of the verifier's code or of the
filter/selection params (``max_shared_ngram``, ``leak_phrases``, ``rule``, ...) reuses the
generation. The plain-prompt scoring of the chosen re-solves is resumable too
(drsft.scoring.score_sharded, shards of ``guided_align.score_shard_size`` under
``<out>/score_shards``), fingerprinted by the chosen responses and the model.
"""

import gc
from collections import Counter
from pathlib import Path

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.fingerprint import fingerprint, model_fingerprint
from drsft.io import read_problem_ids, read_records, record_file, write_json, write_jsonl, write_records, write_run_info
from drsft.models import compute_device, load_model, load_tokenizer, resolve_model
from drsft.params import load_params, section
from drsft.prompts import render_prompt
from drsft.rewrite import group_by_problem, leak_reason, select, training_row
from drsft.rollout import (SamplingParams, check_sample_records, make_backend, policy_identity,
                           sample_records)
from drsft.shards import items_in, run_sharded
from drsft.scoring import score_sharded
from drsft.stage import (clear_errors, count_records, log, preflight, problems_by_id,
                         sequences_bytes)
from drsft.verify import verify_batch

# The guided_align params that determine the generated re-solves (the shard fingerprint); the
# others (filter, selection, scoring) act after generation and do not invalidate shards.
GENERATION_KEYS = ("n", "temperature", "top_p", "max_new_tokens", "seed")


def _scoring_model(state, model_path, dtype, trust):
    """The HF model for teacher-forced scoring: the hf backend's own (``state["backend"]``, None
    when every shard was resumed), else a fresh load after dropping the (vLLM) backend."""
    backend = state.pop("backend", None)
    model = getattr(backend, "model", None)
    if model is not None and hasattr(model, "forward"):
        return model
    del backend  # the last reference: state no longer holds it
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    return load_model(model_path, dtype=dtype, trust_remote_code=trust)


def dropped_counts(status: Counter) -> dict:
    """Correct re-solves the filters removed: ``truncated`` (cut at max_new_tokens) and ``leak``
    (phrase or copy), with ``leak_share`` the share of the correct, finished re-solves it removed."""
    leak = status.get("leak_phrase", 0) + status.get("leak_copy", 0)
    finished_correct = leak + status.get("kept", 0)
    return {"truncated": status.get("truncated", 0), "leak": leak,
            "leak_share": leak / finished_correct if finished_correct else 0.0}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True)
@click.option("--unsolved", default="data/self_align/unsolved.jsonl", show_default=True)
@click.option("--model", "model_dir", default="models/base", show_default=True)
@click.option("--out", default="data/guided_align", show_default=True)
@click.option("--shards", default=None, help="resumable generation shards  [default: <out>/shards]")
@click.option("--score-shards", default=None, help="resumable scoring shards  [default: <out>/score_shards]")
@click.option("--metrics", default="metrics/guided_align.json", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@clear_errors
def main(params_path, problems, unsolved, model_dir, out, shards, score_shards, metrics, progress):
    """Re-solve the unsolved problems with the expert solution as a hint; keep correct, standalone
    re-solves as training rows on the plain prompt."""
    params = load_params(params_path)
    cfg, prompt_cfg, roll = section(params, "guided_align"), section(params, "prompt"), section(params, "rollout")
    verify_cfg, records = section(params, "verify"), section(params, "records")
    fmt, dtype = records["format"], records["logprob_dtype"]
    trust = section(params, "model")["trust_remote_code"]
    preflight([out, shards or Path(out) / "shards", metrics],  # resolves + selected rows: 2x the sequences
              need_bytes=2 * sequences_bytes(count_records(unsolved) * int(cfg["n"]), int(cfg["max_new_tokens"])))
    by_id = problems_by_id(problems)
    todo = [by_id[pid] for pid in read_problem_ids(unsolved, by_id)]  # checked: unique, known ids
    model_path = resolve_model(model_dir)
    seed, keep, rule = int(cfg["seed"]), cfg["keep_per_problem"], cfg["rule"]

    shard_size = int(cfg["shard_size"])

    tok = load_tokenizer(model_dir, trust_remote_code=trust)
    guided_prompt = {p["id"]: render_prompt(tok, p["problem"], prompt_cfg, hint=p["solution"]) for p in todo}
    # guided_align.n 0 is the tier ablation: no re-solving, every unsolved problem falls back.
    generate = int(cfg["n"]) > 0
    sp = SamplingParams.from_params(cfg, roll["batch_size"]) if generate else None  # used only when generating
    # What determines the shards' content (run_sharded deletes shards of any other fingerprint).
    inputs = {"guided_align": {k: cfg[k] for k in GENERATION_KEYS}, "rollout": policy_identity(roll), "prompt": prompt_cfg,
              "trust_remote_code": trust, "model": model_fingerprint(model_dir), "device": compute_device(),
              "problems_sha256": fingerprint([[p["id"], p["problem"], p["solution"]] for p in todo])}

    state = {"backend": None, "bar": None}

    def on_start(resumed, todo_shards):
        if not todo_shards:
            return  # every shard resumed: no generation model needed
        state["backend"] = make_backend(
            roll["backend"], model_path, dtype=roll["dtype"], trust_remote_code=trust,
            tensor_parallel_size=roll["tensor_parallel_size"],
            gpu_memory_utilization=roll["gpu_memory_utilization"],
            data_parallel_size=roll["data_parallel_size"], stop_token_ids=roll["stop_token_ids"])
        if progress:
            from tqdm.auto import tqdm

            n_seq = items_in(todo_shards, len(todo), shard_size) * sp.n
            state["bar"] = tqdm(total=n_seq, desc="guided_align", unit="seq", dynamic_ncols=True)

    def process(chunk):
        ids = [p["id"] for p in chunk]
        prompts = [guided_prompt[i] for i in ids]
        comps = state["backend"].generate(prompts, sp, progress=state["bar"] if state["bar"] is not None else False)
        return sample_records(ids, prompts, comps)

    def validate(chunk, records):
        check_sample_records([p["id"] for p in chunk], sp.n, records)

    out = Path(out)
    try:  # without re-solving (n 0): no shards, and as for any other fingerprint, old shards are deleted
        run = run_sharded(todo if generate else [], Path(shards) if shards else out / "shards", shard_size, inputs,
                          process, validate=validate, on_start=on_start, fmt=fmt, logprob_dtype=dtype)
    finally:
        if state["bar"] is not None:
            state["bar"].close()
    samples = [rec for path in run.paths for rec in read_records(path)]
    verdicts = verify_batch([(r["response"], by_id[r["problem_id"]]["answer"]) for r in samples],
                            workers=int(verify_cfg["workers"]), timeout_s=float(verify_cfg["timeout_s"]),
                            mode=verify_cfg["mode"], progress=progress)
    resolves, status_counts = [], Counter()
    for rec, v in zip(samples, verdicts):
        p = by_id[rec["problem_id"]]
        truncated = rec["finish_reason"] == "length"  # cut at max_new_tokens: never a training row
        leak = leak_reason(rec["response"], p["solution"], cfg["leak_phrases"], int(cfg["max_shared_ngram"]),
                           problem=p["problem"]) if v.correct and not truncated else None
        status = "wrong" if not v.correct else "truncated" if truncated else (f"leak_{leak}" if leak else "kept")
        status_counts[status] += 1
        resolves.append({**rec, "correct": v.correct, "reason": v.reason, "status": status})

    kept = group_by_problem(r for r in resolves if r["status"] == "kept")
    chosen, still_unsolved = [], []
    for p in todo:
        if p["id"] not in kept:
            still_unsolved.append(p["id"])
            continue
        chosen.extend((p, rec) for rec in select(kept[p["id"]], rule, keep, seed, p["id"]))

    plain_prompts = [render_prompt(tok, p["problem"], prompt_cfg) for p, _ in chosen]
    plain_lp = score_sharded(Path(score_shards) if score_shards else out / "score_shards", int(cfg["score_shard_size"]),
                             [f"{p['id']}#{rec['sample_index']}" for p, rec in chosen], plain_prompts,
                             [rec["response_ids"] for _, rec in chosen],
                             {"model": model_fingerprint(model_dir), "dtype": roll["dtype"], "device": compute_device(),
                              "trust_remote_code": trust},
                             lambda: (_scoring_model(state, model_path, roll["dtype"], trust), tok),
                             batch_size=int(cfg["score_batch_size"]), progress=progress, desc="guided_align: score",
                             fmt=fmt, logprob_dtype=dtype)
    rows = [training_row(p["id"], "guided", pp, rec["response"], rec["response_ids"], rec["logprobs"], lp, "guided")
            for (p, rec), pp, lp in zip(chosen, plain_prompts, plain_lp)]

    write_records(record_file(out, "resolves", fmt), resolves, dtype)
    write_records(record_file(out, "selected", fmt), rows, dtype)
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
        "status": {k: status_counts.get(k, 0) for k in ("kept", "wrong", "truncated", "leak_phrase", "leak_copy")},
        "dropped": dropped_counts(status_counts),
        "shards": len(run.paths),
    })
    write_run_info(metrics, {"resumed_shards": len(run.resumed), "generated_shards": len(run.generated)})
    if not generate:
        log.info("guided_align: n 0, no re-solving: %d unsolved problems fall back", attempted)
        return
    log.info("guided_align: %d/%d unsolved problems re-solved (%s), %d/%d shards resumed", solved, attempted,
             dict(status_counts), len(run.resumed), len(run.paths))


if __name__ == "__main__":
    main()
