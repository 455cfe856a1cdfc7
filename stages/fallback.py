"""fallback: problems still unsolved keep the expert demonstration; writes both training sets.

Outputs ``data/train/rewritten.<records.format>`` (self + guided + fallback rows) and
``data/train/expert.<records.format>`` (every problem with its expert demonstration: the
vanilla-SFT set), training rows both (docs/records.md), plus the policy-gap diagnostics in ``metrics/rewrite.json``. Expert responses
get their plain-prompt log-probs under the base model; their behaviour policy (the expert's) is
unknown, so ``behaviour_logprobs`` is null and ``behaviour`` is ``unknown``.

The scoring (a forward pass of the base model over every expert demonstration: hours at the paper's
scale) runs in resumable shards of ``fallback.shard_size`` problems under ``data/fallback/shards``
(``persist: true``; drsft.scoring.score_sharded): a killed run keeps its finished shards.
"""

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.fingerprint import model_fingerprint
from drsft.io import (read_problem_ids, read_problems, read_training_rows, record_file, write_csv, write_json,
                      write_records)
from drsft.models import compute_device, load_model, load_tokenizer
from drsft.params import load_params, section
from drsft.prompts import encode_response, render_prompt
from drsft.rewrite import dropped_rows, nll_histogram, rewrite_metrics, training_row
from drsft.scoring import score_sharded
from drsft.stage import clear_errors, log


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True)
@click.option("--self-rows", default=None, help="[default: data/self_align/selected.<records.format>]")
@click.option("--guided-rows", default=None, help="[default: data/guided_align/selected.<records.format>]")
@click.option("--unsolved", default="data/guided_align/unsolved.jsonl", show_default=True)
@click.option("--self-metrics", default="metrics/self_align.json", show_default=True)
@click.option("--guided-metrics", default="metrics/guided_align.json", show_default=True)
@click.option("--model", "model_dir", default="models/base", show_default=True)
@click.option("--out", default="data/train", show_default=True)
@click.option("--shards", default="data/fallback/shards", show_default=True,
              help="resumable scoring shards (persisted by DVC)")
@click.option("--metrics", default="metrics/rewrite.json", show_default=True)
@click.option("--plot-csv", default="metrics/plots/nll_hist.csv", show_default=True)
@click.option("--tiers-csv", default="metrics/plots/tiers.csv", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@clear_errors
def main(params_path, problems, self_rows, guided_rows, unsolved, self_metrics, guided_metrics, model_dir, out, shards,
         metrics, plot_csv, tiers_csv, progress):
    """Assemble the rewritten training set (self + guided + expert fallback) and the expert set."""
    params = load_params(params_path)
    cfg, prompt_cfg, records = section(params, "fallback"), section(params, "prompt"), section(params, "records")
    fmt, dtype = records["format"], records["logprob_dtype"]
    self_rows = self_rows or record_file("data/self_align", "selected", fmt)
    guided_rows = guided_rows or record_file("data/guided_align", "selected", fmt)
    trust = section(params, "model")["trust_remote_code"]
    problem_list = read_problems(problems)
    known = [p["id"] for p in problem_list]
    # every input is read and checked before the model is loaded
    still_unsolved = set(read_problem_ids(unsolved, known))
    tiers = read_training_rows(self_rows, known) + read_training_rows(guided_rows, known)
    dropped = dropped_rows(self_metrics, guided_metrics)
    tok = load_tokenizer(model_dir, trust_remote_code=trust)

    prompts = [render_prompt(tok, p["problem"], prompt_cfg) for p in problem_list]
    response_ids = [encode_response(tok, p["solution"]) for p in problem_list]
    logprobs = score_sharded(shards, int(cfg["shard_size"]), known, prompts, response_ids,
                             {"model": model_fingerprint(model_dir), "trust_remote_code": trust,
                              "device": compute_device()},
                             lambda: (load_model(model_dir, trust_remote_code=trust), tok),
                             batch_size=int(cfg["score_batch_size"]), progress=progress, desc="fallback: score",
                             fmt=fmt, logprob_dtype=dtype)
    expert = [training_row(p["id"], "expert", pr, p["solution"], ids, None, lp, "unknown")
              for p, pr, ids, lp in zip(problem_list, prompts, response_ids, logprobs)]

    fallback = [{**r, "tier": "fallback"} for r in expert if r["problem_id"] in still_unsolved]
    order = {p["id"]: i for i, p in enumerate(problem_list)}
    rewritten = tiers + fallback
    missing = set(order) - {r["problem_id"] for r in rewritten}
    if missing:
        raise click.ClickException(f"{len(missing)} train problems have no rewritten row, e.g. {sorted(missing)[0]!r}: "
                                   "the upstream stages are out of step; run `dvc repro`")
    rewritten.sort(key=lambda r: (order[r["problem_id"]], r["tier"]))

    write_records(record_file(out, "rewritten", fmt), rewritten, dtype)
    write_records(record_file(out, "expert", fmt), expert, dtype)
    write_csv(plot_csv, nll_histogram(rewritten, expert), ["nll", "expert", "rewritten"])
    m = {**rewrite_metrics(rewritten, expert, {p["id"]: p.get("source", "") for p in problem_list}), "dropped": dropped}
    write_json(metrics, m)
    write_csv(tiers_csv, [{"tier": t, "problems": v["count"], "share": v["share"]} for t, v in m["tiers"].items()],
              ["tier", "problems", "share"])
    log.info("rewritten set: %s; NLL rewritten %.3f vs expert %.3f",
             {t: v["count"] for t, v in m["tiers"].items()}, m["nll"]["rewritten"], m["nll"]["expert"])


if __name__ == "__main__":
    main()
