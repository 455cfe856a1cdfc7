"""evaluate: avg@k and greedy accuracy of a model on the configured benchmarks.

Used twice in dvc.yaml: ``evaluate`` (the trained model) and ``evaluate_base`` (the base model,
the reference row of every table).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import click  # noqa: E402

from drsft.data import load_benchmark  # noqa: E402
from drsft.evaluate import add_intervals, average_over, evaluate_benchmark  # noqa: E402
from drsft.io import DataError, write_csv, write_json, write_jsonl  # noqa: E402
from drsft.models import resolve_model  # noqa: E402
from drsft.params import load_params, section  # noqa: E402
from drsft.rollout import make_backend  # noqa: E402
from drsft.stage import clear_errors, count_records, log, preflight, sequences_bytes  # noqa: E402
from drsft.stats import problem_scores  # noqa: E402


PLOT_COLUMNS = ("avg_at_k", "avg_at_k_low", "avg_at_k_high", "greedy", "pass_at_k", "no_answer_rate")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--model", "model_dir", default="models/trained", show_default=True)
@click.option("--benchmarks-dir", default="data/prepare/benchmarks", show_default=True)
@click.option("--out", default="data/evaluate", show_default=True)
@click.option("--metrics", default="metrics/evaluate.json", show_default=True)
@click.option("--plot-csv", default=None,
              help="also write the accuracy per benchmark (and the average) as a CSV for `dvc plots`")
@clear_errors
def main(params_path, model_dir, benchmarks_dir, out, metrics, plot_csv):
    params = load_params(params_path)
    cfg, prompt_cfg, roll = section(params, "evaluate"), section(params, "prompt"), section(params, "rollout")
    verify_cfg = section(params, "verify")
    trust = section(params, "model")["trust_remote_code"]
    n_seq = sum(count_records(Path(benchmarks_dir) / f"{n}.jsonl") for n in cfg["benchmarks"]) * (int(cfg["k"]) + 1)
    preflight([out, metrics] + ([plot_csv] if plot_csv else []), need_bytes=sequences_bytes(n_seq, int(cfg["max_new_tokens"])))
    names = list(cfg["benchmarks"])
    if not names:
        raise DataError(params_path, None, "must list at least one benchmark", "evaluate.benchmarks")
    # Load every benchmark before any generation, so a bad file fails in seconds, not after hours.
    sets = {}
    for name in names:
        path = Path(benchmarks_dir) / f"{name}.jsonl"
        if not path.exists():
            raise DataError(path, None, f"benchmark '{name}' not found; prepare writes the benchmarks listed in "
                                        "prepare.toy / prepare.files.benchmarks", "evaluate.benchmarks")
        sets[name] = load_benchmark(name, str(path))
    backend = make_backend(roll["backend"], resolve_model(model_dir), dtype=roll["dtype"],
                           trust_remote_code=trust, tensor_parallel_size=roll["tensor_parallel_size"],
                           gpu_memory_utilization=roll["gpu_memory_utilization"],
                           data_parallel_size=roll["data_parallel_size"], stop_token_ids=roll["stop_token_ids"])
    results, scores = {}, {}
    for name, problems in sets.items():
        m, preds = evaluate_benchmark(backend, problems, prompt_cfg, cfg, verify_cfg, int(roll["batch_size"]))
        write_jsonl(Path(out) / f"{name}.jsonl", preds)
        results[name] = m
        scores[name] = list(problem_scores(preds).values())
        log.info("%s: avg@%d %.3f greedy %s", name, m["k"], m.get("avg_at_k", float("nan")), m.get("greedy"))
    average = average_over(results)
    add_intervals(results, average, scores, n_boot=int(cfg["n_boot"]))
    log.info("average avg@%d %.3f, 95%% CI [%.3f, %.3f]", int(cfg["k"]), average.get("avg_at_k", float("nan")),
             *average.get("avg_at_k_ci", [float("nan")] * 2))
    write_json(metrics, {"benchmarks": results, "average": average})
    if plot_csv:
        rows = [{"benchmark": n, **{c: m.get(c) for c in PLOT_COLUMNS},
                 **dict(zip(("avg_at_k_low", "avg_at_k_high"), m.get("avg_at_k_ci", [None, None])))}
                for n, m in [*results.items(), ("average", average)]]
        write_csv(plot_csv, rows, ["benchmark", *PLOT_COLUMNS])


if __name__ == "__main__":
    main()
