"""evaluate: avg@k and greedy accuracy of a model on the configured benchmarks.

One ``foreach`` stage in dvc.yaml: ``evaluate@trained`` (the trained model) and ``evaluate@base``
(the base model, the reference row of every table).

Resumable, as ``sample``: each benchmark's generations are written in shards of
``evaluate.shard_size`` problems under ``<out>/shards/<benchmark>/`` (``persist: true`` in
dvc.yaml) by :func:`drsft.shards.run_sharded`, fingerprinted by what determines them (the
sampling params, rollout backend and dtype, prompt, benchmark file, model and compute device). A killed run keeps
its finished shards and the rerun generates only the rest. Verification runs on every evaluation
(minutes at most), so a change of ``verify`` rescoring the same generations regenerates nothing.
The predictions ``<out>/<benchmark>.jsonl`` and the metrics equal an uninterrupted run's.
"""

from pathlib import Path

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.data import load_benchmark
from drsft.evaluate import (GENERATION_KEYS, add_intervals, average_over, check_generation_rows,
                            generation_rows, summarize, verify_rows)
from drsft.fingerprint import file_sha256, model_fingerprint
from drsft.io import DataError, read_jsonl, write_csv, write_json, write_jsonl
from drsft.models import compute_device, resolve_model
from drsft.params import load_params, section
from drsft.rollout import make_backend, policy_identity
from drsft.shards import items_in, run_sharded
from drsft.stage import clear_errors, count_records, log, preflight, sequences_bytes
from drsft.stats import problem_scores


PLOT_COLUMNS = ("avg_at_k", "avg_at_k_low", "avg_at_k_high", "greedy", "pass_at_k", "no_answer_rate")


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--model", "model_dir", default="models/trained", show_default=True)
@click.option("--benchmarks-dir", default="data/prepare/benchmarks", show_default=True)
@click.option("--out", default="data/evaluate", show_default=True)
@click.option("--metrics", default="metrics/evaluate.json", show_default=True)
@click.option("--plot-csv", default=None,
              help="also write the accuracy per benchmark (and the average) as a CSV for `dvc plots`")
@click.option("--progress/--no-progress", default=True, show_default=True)
@clear_errors
def main(params_path, model_dir, benchmarks_dir, out, metrics, plot_csv, progress):
    """Sample evaluate.k solutions (and a greedy one) per benchmark problem, verify them, and write
    avg@k with its 95 % bootstrap interval per benchmark and on average."""
    params = load_params(params_path)
    cfg, prompt_cfg, roll = section(params, "evaluate"), section(params, "prompt"), section(params, "rollout")
    verify_cfg = section(params, "verify")
    trust = section(params, "model")["trust_remote_code"]
    n_seq = sum(count_records(Path(benchmarks_dir) / f"{n}.jsonl") for n in cfg["benchmarks"]) * (int(cfg["k"]) + 1)
    # the rows twice: in their shards and in the assembled <benchmark>.jsonl
    preflight([out, metrics] + ([plot_csv] if plot_csv else []),
              need_bytes=2 * sequences_bytes(n_seq, int(cfg["max_new_tokens"])))
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
    _drop_stale(Path(out), names)
    shard_size, k, greedy = int(cfg["shard_size"]), int(cfg["k"]), bool(cfg["greedy"])
    common = {"evaluate": {key: cfg[key] for key in GENERATION_KEYS}, "rollout": policy_identity(roll),
              "prompt": prompt_cfg, "trust_remote_code": trust, "model": model_fingerprint(model_dir),
              "device": compute_device()}
    state = {"backend": None, "bar": None}

    def backend():
        if state["backend"] is None:  # loaded only when some shard is left to generate
            state["backend"] = make_backend(
                roll["backend"], resolve_model(model_dir), dtype=roll["dtype"], trust_remote_code=trust,
                tensor_parallel_size=roll["tensor_parallel_size"],
                gpu_memory_utilization=roll["gpu_memory_utilization"],
                data_parallel_size=roll["data_parallel_size"], stop_token_ids=roll["stop_token_ids"])
        return state["backend"]

    results, scores = {}, {}
    for name, problems in sets.items():
        def on_start(resumed, todo, name=name, problems=problems):
            if todo:
                backend()
            if todo and progress:
                from tqdm.auto import tqdm

                n_seq = items_in(todo, len(problems), shard_size) * (k + greedy)
                state["bar"] = tqdm(total=n_seq, desc=f"evaluate {name}", unit="seq", dynamic_ncols=True)

        def process(chunk):
            return generation_rows(backend(), chunk, prompt_cfg, cfg, int(roll["batch_size"]),
                                   progress=state["bar"] if state["bar"] is not None else False)

        def validate(chunk, rows):
            check_generation_rows([p["id"] for p in chunk], k, greedy, rows)

        inputs = {**common, "benchmark": {"name": name, "sha256": file_sha256(Path(benchmarks_dir) / f"{name}.jsonl")}}
        try:
            run = run_sharded(problems, Path(out) / "shards" / name, shard_size, inputs, process,
                              validate=validate, on_start=on_start)
        finally:
            if state["bar"] is not None:
                state["bar"].close()
                state["bar"] = None
        preds = verify_rows([row for path in run.paths for row in read_jsonl(path)],
                            {p["id"]: p["answer"] for p in problems}, verify_cfg, progress=progress)
        write_jsonl(Path(out) / f"{name}.jsonl", preds)
        m = summarize(preds, k)
        results[name] = m
        scores[name] = list(problem_scores(preds).values())
        log.info("%s: avg@%d %.3f greedy %s (%d/%d shards resumed)", name, m["k"], m.get("avg_at_k", float("nan")),
                 m.get("greedy"), len(run.resumed), len(run.paths))
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


def _drop_stale(out: Path, names: list[str]) -> None:
    """Remove the predictions of benchmarks no longer listed (the folder persists). Their shards
    stay: they are fingerprinted by the benchmark file, so listing the benchmark again reuses them."""
    for f in out.glob("*.jsonl"):
        if f.stem not in names:
            f.unlink()


if __name__ == "__main__":
    main()
