"""prepare: the training problems, the held-out benchmarks and the base model.

Reads params ``prepare`` (all but ``prepare.probe``), ``model`` and ``prompt``. Writes
``data/prepare/train.jsonl``, ``data/prepare/benchmarks/<name>.jsonl`` (problem records per
docs/records.md), ``models/base/`` and ``metrics/prepare.json``.

* ``prepare.source: toy`` -- the embedded synthetic world (drsft.toy.world): ``prepare.toy`` sizes and
  style rates. ``files`` -- training problems from a local jsonl/parquet through the field mapping
  in ``prepare.files.train`` and benchmarks from ``prepare.files.benchmarks`` (a list of
  ``{name, path}``), both through drsft.data; every local file lies in ``prepare.files.root``
  (a dvc.yaml dep) and ``metrics/prepare.json`` ``inputs`` records each one's sha256 (a hub
  dataset: its pinned and resolved revision).
* ``model.base: toy`` -- pretrain the embedded tiny Llama on the toy corpus into ``models/base``
  (``prepare.pretrain``; needs ``prepare.source: toy``): chat examples (drsft.toy.world.pretraining_examples)
  plus ``prepare.toy.n_drills`` arithmetic-table drills (drsft.toy.world.fact_drills) on a
  ``prepare.pretrain.drill_frac`` share of the steps. Any other value (hub id or local path) --
  write ``models/base/reference.json`` = ``{"model": ...}`` (referenced, not copied).
* The world's properties are measured by the next stage, ``probe`` (stages/probe.py).
"""

import shutil
import time
from pathlib import Path

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.io import DataError, write_json, write_jsonl, write_run_info
from drsft.params import ParamsError, load_params, pretraining_seed, section
from drsft.stage import clear_errors, log, preflight, prepare_bytes

# Every key of the sections read here is guaranteed (present, typed, in range) by load_params,
# which validates params.yaml against drsft.schema: params.yaml holds the only defaults.


def toy_problems(prep: dict):
    from drsft.toy.world import make_world

    toy = prep["toy"]
    try:
        return make_world(seed=int(prep["seed"]), n_train=int(toy["n_train"]), n_bench=int(toy["n_bench"]),
                          n_corpus=int(toy["n_corpus"]), families=toy["families"],
                          expert_model_style_frac=float(toy["expert_model_style_frac"])), toy
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"params.yaml: prepare.toy: {exc}") from None


def file_problems(prep: dict, inputs: dict | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Training problems and benchmarks from ``prepare.files``; ``inputs`` (when given) receives each
    input's provenance: ``{"train": {...}, "benchmarks": {name: {...}}}`` (file sha256 or hub commit)."""
    from drsft.data import load_benchmark, load_problems, subsample

    files = prep["files"]
    tr = files["train"]
    inputs = {} if inputs is None else inputs
    inputs["train"], inputs["benchmarks"] = {}, {}
    train = load_problems(tr["path"], problem=tr["problem"], solution=tr["solution"], answer=tr["answer"],
                          limit=tr["limit"], source=tr["source"], provenance=inputs["train"])
    try:  # "a 50k-problem subset of the first 100k": limit first, then a seeded subset (file order kept)
        train = subsample(train, tr["subsample"], seed=int(prep["seed"]))
    except ValueError as exc:
        raise ParamsError(f"params.yaml: prepare.files.train.subsample: {exc} ({tr['path']})") from None
    benchmarks: dict[str, list[dict]] = {}
    for b in files["benchmarks"]:  # mappings {name, path}, unique names (drsft.schema)
        prov = inputs["benchmarks"][str(b["name"])] = {}
        benchmarks[str(b["name"])] = load_benchmark(str(b["name"]), str(b["path"]), provenance=prov)
    if not train:
        raise DataError(tr["path"], None, "no training problems")
    return train, benchmarks


def _fresh_dir(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)


def run_prepare(prep: dict, model_cfg: dict, prompt_cfg: dict, data_dir="data/prepare", model_dir="models/base",
                metrics_path="metrics/prepare.json", log=print) -> dict:
    from drsft.toy.world import expert_solution, fact_drills, pretraining_examples

    t0 = time.time()
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    source = prep["source"]
    base = str(model_cfg["base"])  # "toy" needs prepare.source: toy (checked by drsft.schema)
    metrics: dict = {"source": source, "model": {"base": base}}
    world = None
    if source == "toy":
        world, toy = toy_problems(prep)
        train, benchmarks = world.train, world.benchmarks
        metrics["toy"] = {k: toy[k] for k in sorted(toy)}
    elif source == "files":
        metrics["inputs"] = {}
        train, benchmarks = file_problems(prep, metrics["inputs"])
    else:
        raise ParamsError(f"params.yaml: prepare.source must be 'toy' or 'files', got {source!r}")

    write_jsonl(data_dir / "train.jsonl", train)
    _fresh_dir(data_dir / "benchmarks")
    for name, recs in benchmarks.items():
        write_jsonl(data_dir / "benchmarks" / f"{name}.jsonl", recs)
    counts = {"train": len(train), "benchmarks": {k: len(v) for k, v in benchmarks.items()}, "train_by_source": {}}
    for r in train:
        counts["train_by_source"][r["source"]] = counts["train_by_source"].get(r["source"], 0) + 1
    if world is not None:
        counts["corpus"] = len(world.corpus)
    metrics["counts"] = counts
    log(f"prepare: {len(train)} train problems, benchmarks {counts['benchmarks']}")

    _fresh_dir(model_dir)
    if base == "toy":
        from drsft.toy.tinylm import pretrain

        pcfg = prep["pretrain"]  # exactly drsft.toy.tinylm.pretrain's keyword arguments (drsft.schema)
        try:
            examples = pretraining_examples(world.corpus, seed=int(prep["seed"]), mistake_rate=float(toy["mistake_rate"]),
                                            guided_frac=float(toy["guided_frac"]),
                                            guided_mistake_rate=float(toy["guided_mistake_rate"]),
                                            misconception_rate=float(toy["misconception_rate"]),
                                            textbook_frac=float(toy["textbook_frac"]),
                                            misconceived_textbook_frac=float(toy["misconceived_textbook_frac"]))
            drills = fact_drills(world.corpus, int(toy["n_drills"]), int(toy["drill_facts"]), seed=int(prep["seed"]))
        except ValueError as exc:
            raise ParamsError(f"params.yaml: prepare.toy: {exc}") from None
        summary = pretrain(model_dir, examples, prompt_cfg, log=log, drills=drills,
                           **{**pcfg, "seed": pretraining_seed(prep)})
        summary["guided_examples"] = sum(e.hint is not None for e in examples)
        summary["wrong_examples"] = sum(not e.correct for e in examples)
        summary["textbook_examples"] = sum(e.hint is None and e.response == expert_solution(tp)
                                           for e, tp in zip(examples, world.corpus))
        metrics["model"]["pretrain"] = summary
    else:
        write_json(model_dir / "reference.json", {"model": base})
        log(f"prepare: models/base references {base!r} (not copied)")

    timings = {"seconds": round(time.time() - t0, 1)}
    if "pretrain" in metrics["model"]:
        timings["pretrain_seconds"] = metrics["model"]["pretrain"].pop("seconds")
    write_json(metrics_path, metrics)
    write_run_info(metrics_path, timings)
    return {**metrics, **timings}


@click.command()
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--data", "data_dir", default="data/prepare", show_default=True)
@click.option("--model", "model_dir", default="models/base", show_default=True)
@click.option("--metrics", default="metrics/prepare.json", show_default=True)
@clear_errors
def main(params_path, data_dir, model_dir, metrics):
    """Write the training problems and benchmarks, and pretrain (toy) or reference the base model."""
    params = load_params(params_path)
    preflight([data_dir, model_dir, metrics], need_bytes=prepare_bytes(section(params, "prepare")))
    summary = run_prepare(section(params, "prepare"), section(params, "model"), section(params, "prompt"),
                          data_dir=data_dir, model_dir=model_dir, metrics_path=metrics, log=log.info)
    log.info("prepare done in %.1fs", summary["seconds"])


if __name__ == "__main__":
    main()
