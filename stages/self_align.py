"""self_align: keep the model's own correct solutions (the on-policy tier)."""

from pathlib import Path

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.io import read_problems, read_samples, read_verdicts, write_json, write_jsonl
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
    cfg = section(load_params(params_path), "self_align")
    problem_ids = [p["id"] for p in read_problems(problems)]
    shards = read_samples(samples, problem_ids)
    checked = read_verdicts(verdicts, samples=((s["problem_id"], s["sample_index"]) for s in shards))
    rows, unsolved, stats = self_align(problem_ids, shards, checked,
                                       int(cfg["keep_per_problem"]), cfg["rule"], int(cfg["seed"]))
    write_jsonl(Path(out) / "selected.jsonl", rows)
    write_jsonl(Path(out) / "unsolved.jsonl", ({"problem_id": pid} for pid in unsolved))
    stats["solved_share"] = stats["solved"] / stats["problems"] if stats["problems"] else 0.0
    write_json(metrics, stats)
    log.info("self_align: %d/%d problems solved, %d rows kept", stats["solved"], stats["problems"], stats["kept"])


if __name__ == "__main__":
    main()
