"""self_align: keep the model's own correct solutions (the on-policy tier).

Reads the sample shards (``data/sample``), their verdicts and the problems; params ``self_align``
and ``records``. Writes ``data/self_align/selected.<records.format>`` (training rows, docs/records.md)
and ``data/self_align/unsolved.jsonl``. Only the correct samples are held whole in memory.
"""

from pathlib import Path

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.io import read_problems, read_samples, read_verdicts, record_file, write_json, write_jsonl, write_records
from drsft.params import load_params, section
from drsft.rewrite import self_align
from drsft.stage import clear_errors, log


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True)
@click.option("--samples", default="data/sample", show_default=True)
@click.option("--verdicts", default="data/verify/verdicts.jsonl", show_default=True)
@click.option("--out", default="data/self_align", show_default=True)
@click.option("--metrics", default="metrics/self_align.json", show_default=True)
@clear_errors
def main(params_path, problems, samples, verdicts, out, metrics):
    """Keep the model's own correct solutions (tier self) and list the problems without one."""
    params = load_params(params_path)
    cfg, records = section(params, "self_align"), section(params, "records")
    fmt = records["format"]
    problem_ids = [p["id"] for p in read_problems(problems)]
    correct = {(v["problem_id"], v["sample_index"]) for v in read_verdicts(verdicts) if v["correct"]}
    shards = read_samples(samples, problem_ids, full=lambda r: (r["problem_id"], r["sample_index"]) in correct)
    # read again, now checking that the verdicts are exactly those of these samples
    checked = read_verdicts(verdicts, samples=((s["problem_id"], s["sample_index"]) for s in shards))
    rows, unsolved, stats = self_align(problem_ids, shards, checked,
                                       cfg["keep_per_problem"], cfg["rule"], int(cfg["seed"]))
    write_records(record_file(out, "selected", fmt), rows, records["logprob_dtype"])
    write_jsonl(Path(out) / "unsolved.jsonl", ({"problem_id": pid} for pid in unsolved))
    stats["solved_share"] = stats["solved"] / stats["problems"] if stats["problems"] else 0.0
    write_json(metrics, stats)
    log.info("self_align: %d/%d problems solved, %d rows kept", stats["solved"], stats["problems"], stats["kept"])


if __name__ == "__main__":
    main()
