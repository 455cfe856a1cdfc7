"""sample: n model solutions per training problem, with behaviour log-probs, in resumable shards.

Reads ``data/prepare/train.jsonl`` and ``models/base``; params ``sample``, ``rollout``, ``prompt``
``model`` and ``records``. Writes ``data/sample/shard-00000.jsonl``, ... (``.parquet`` with
``records.format: parquet``; ``sample.shard_size`` problems per shard, records per docs/records.md
"Sample"), ``data/sample/manifest.json`` and
``metrics/sample.json``. A killed run resumes from its finished shards (the folder is
``persist: true`` in dvc.yaml); shards of other params/inputs are deleted, never reused.
"""

import time

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.io import DataError, check_unique_ids, iter_jsonl, iter_records, require, write_json, write_run_info
from drsft.models import compute_device, load_tokenizer
from drsft.params import ParamsError, load_params, section
from drsft.prompts import render_prompt
from drsft.fingerprint import file_sha256, model_fingerprint
from drsft.rollout import (SamplingParams, check_sample_records, make_backend, policy_identity,
                           sample_records)
from drsft.shards import items_in, run_sharded
from drsft.stage import clear_errors, count_records, log, preflight, sequences_bytes


def load_problems(path) -> list[dict]:
    rows = list(iter_jsonl(path))
    for line, rec in rows:
        require(rec, "id", path, line)
        require(rec, "problem", path, line)
    check_unique_ids(rows, path)
    if not rows:
        raise DataError(path, None, "no problems")
    return [rec for _, rec in rows]


def sampling_params(cfg: dict, roll: dict) -> SamplingParams:
    try:
        sp = SamplingParams.from_params(cfg, roll["batch_size"])
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: sample/rollout: {exc}") from None
    return sp


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True)
@click.option("--model", "model_dir", default="models/base", show_default=True)
@click.option("--out", default="data/sample", show_default=True)
@click.option("--metrics", default="metrics/sample.json", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@clear_errors
def main(params_path, problems, model_dir, out, metrics, progress):
    """Sample sample.n solutions per training problem from the base model, with the behaviour log-prob
    of every token, in resumable shards."""
    params = load_params(params_path)
    cfg, roll, prompt_cfg = section(params, "sample"), section(params, "rollout"), section(params, "prompt")
    records = section(params, "records")
    trust = section(params, "model")["trust_remote_code"]
    preflight([out, metrics], need_bytes=sequences_bytes(count_records(problems) * int(cfg["n"]), int(cfg["max_new_tokens"])))
    sp = sampling_params(cfg, roll)
    shard_size = int(cfg["shard_size"])
    items = load_problems(problems)
    tok = load_tokenizer(model_dir, trust_remote_code=trust)
    prompts = {p["id"]: render_prompt(tok, p["problem"], prompt_cfg) for p in items}
    inputs = {"sample": cfg, "rollout": policy_identity(roll), "prompt": prompt_cfg, "trust_remote_code": trust,
              "problems_sha256": file_sha256(problems), "model": model_fingerprint(model_dir),
              "device": compute_device()}

    state = {"backend": None, "bar": None, "tokens": 0}

    def on_start(resumed, todo):
        if not todo:
            return  # everything resumed: the model is not even loaded
        state["backend"] = make_backend(
            roll["backend"], model_dir, dtype=roll["dtype"], trust_remote_code=trust,
            tensor_parallel_size=int(roll["tensor_parallel_size"]),
            gpu_memory_utilization=float(roll["gpu_memory_utilization"]),
            data_parallel_size=int(roll["data_parallel_size"]), stop_token_ids=roll["stop_token_ids"])
        if progress:
            from tqdm.auto import tqdm

            n_seq = items_in(todo, len(items), shard_size) * sp.n
            state["bar"] = tqdm(total=n_seq, desc="sample", unit="seq", dynamic_ncols=True)

    def process(chunk):
        ids = [p["id"] for p in chunk]
        comps = state["backend"].generate([prompts[i] for i in ids], sp,
                                               progress=state["bar"] if state["bar"] is not None else False)
        state["tokens"] += sum(len(c.token_ids) for cs in comps for c in cs)
        return sample_records(ids, [prompts[i] for i in ids], comps)

    def validate(chunk, records):
        check_sample_records([p["id"] for p in chunk], sp.n, records)

    t0 = time.perf_counter()
    try:
        run = run_sharded(items, out, shard_size, inputs, process, validate=validate, on_start=on_start,
                          fmt=records["format"], logprob_dtype=records["logprob_dtype"])
    finally:
        if state["bar"] is not None:
            state["bar"].close()
    n_samples = tokens = truncated = 0
    for path in run.paths:  # streamed: at scale the samples need not fit in memory
        for _, rec in iter_records(path):
            n_samples += 1
            tokens += len(rec["response_ids"])
            truncated += rec["finish_reason"] == "length"
    result = {
        "problems": len(items),
        "samples": n_samples,
        "tokens": tokens,
        "truncated_fraction": truncated / n_samples if n_samples else 0.0,
        "shards": len(run.paths),
    }
    run_info = {
        "tokens_generated": state["tokens"],
        "tokens_per_s": round(state["tokens"] / run.seconds, 1) if run.seconds > 0 else 0.0,
        "resumed_shards": len(run.resumed),
        "generated_shards": len(run.generated),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(metrics, result)
    write_run_info(metrics, run_info)
    log.info("sample: %d problems x %d = %d samples, %d tokens (%d generated now, %.0f tok/s), "
             "%d/%d shards resumed, truncated %.1f%%", len(items), sp.n, n_samples, tokens, state["tokens"],
             run_info["tokens_per_s"], len(run.resumed), len(run.paths), 100 * result["truncated_fraction"])


if __name__ == "__main__":
    main()
