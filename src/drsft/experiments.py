"""The paper's comparison in one command: queue the arms x training seeds as DVC experiments, run them,
write ``metrics/ablation.json`` and print the table with 95 % intervals.

1. ``dvc repro`` in the workspace: the shared upstream stages, once; a no-op when up to date. With
   ``--set``, they run once at those settings as the workspace experiment ``shared-<tag>``, the arms
   are queued on top of its dvc.lock, and the workspace is restored from HEAD.
   With ``--worlds`` (the default for the embedded toy model) each seed is also its own world: seed i
   > 0 pretrains its own base model (``prepare.pretrain.seed`` + i: the same problems, another
   pretraining run, as another machine's float path gives) and runs its shared stages once as
   ``shared[-<tag>]-w<seed>``; its arms are queued on that, named ``<arm>-w<seed>``. The base model
   then has a row per seed, and every interval counts the model-to-model variation.
2. Each arm and seed is queued: ``dvc exp run --queue -n <arm>-s<seed> -S train.data=...
   -S train.loss=... -S train.seed=<seed>``. A queued experiment snapshots the workspace and runs in
   its own temporary directory, so the workspace is never touched.
3. ``dvc exp run --run-all --jobs N`` runs the queue. Every stage upstream of ``train`` comes from the
   DVC cache, so per experiment only ``train`` and ``evaluate@trained`` run (the tier ablation's arm,
   ``--with-noguided``, also reruns ``guided_align`` with ``n`` 0 and ``fallback``); the script
   prints, for each, the stages its log shows running.
4. The per-problem scores of every experiment (``data/evaluate/<benchmark>.jsonl`` at the
   experiment's commit, read from the DVC cache through ``dvc.api.DVCFileSystem``) and of the base
   model go to :func:`drsft.ablation.summarize`: mean avg@k per arm over seeds and problems, a 95 %
   interval that counts seed (training run, and with ``--worlds`` pretrained model) and evaluation
   noise, and the paired differences between the paper's arms (DR+DFT − DFT, DR+SFT − SFT, DR+DFT −
   base, DFT − SFT; and the other relations of its table). Written to ``metrics/ablation.json``
   (``metrics/ablation-<tag>.json`` with ``--tag``) and printed as ``mean ± half-width``.

    drsft ablation                      # four arms x 3 seeds (make ablation; toy: 3 worlds)
    drsft ablation --no-worlds          # toy: every seed on the workspace's one pretrained model
    drsft ablation --seeds 5 --with-is  # more seeds, plus rewritten+is and rewritten+is_dft
    drsft ablation --with-noguided      # plus DR+DFT without guided re-solving (DR+DFT vs it)
    drsft ablation --with-tiers         # plus rft, DR without guided re-solving (both losses), keep-all
    drsft ablation --with-parity --arms dr-dft --arms dr-dft-mbnorm   # a parity option's effect (docs/parity.md)
    drsft ablation --arms dft --arms dr-dft   # a subset of the arms
    drsft ablation --table-only         # recompute the summary from existing experiments
    drsft ablation --seeds 6 --skip-existing   # three more seeds (worlds), the first three kept
    drsft ablation --plots ablation_plots
    drsft ablation --set train.lr=1e-4 --tag lr1e-4   # the arms at another setting
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import click

from drsft.ablation import (ARM_OVERRIDES, ARMS, EXTRA_PAIRS, IS_ARMS, LORA_ARMS, NOGUIDED_ARMS, PAIRS,
                            PARITY_ARMS, TIER_ARMS, format_tables, summarize)
from drsft.io import iter_jsonl_stream, write_json
from drsft.params import load_params, pretraining_seed
from drsft.stats import problem_scores


def _dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"dvc {' '.join(args)} failed:\n{(proc.stdout or '')[-3000:]}{(proc.stderr or '')[-3000:]}")
    return (proc.stdout or "") + (proc.stderr or "")


def exp_name(arm: str, tag: str, seed: int, worlds: bool = False) -> str:
    """``<arm>[-<tag>]-s<seed>``; ``-w<seed>`` when each seed is also its own world (``--worlds``)."""
    unit = f"w{seed}" if worlds else f"s{seed}"
    return f"{arm}-{tag}-{unit}" if tag else f"{arm}-{unit}"


def _walk(node, found: dict, state: str | None = None) -> None:
    """Collect {experiment name: (rev, data)} of the finished experiments in `dvc exp show --json`,
    whatever its nesting: a queued, running or failed one (its executor's state) is left out."""
    if isinstance(node, dict):
        if "executor" in node:
            state = (node.get("executor") or {}).get("state")
        if (isinstance(node.get("data"), dict) and node.get("name") and node.get("rev") and not node.get("error")
                and state in (None, "success")):
            found.setdefault(node["name"], (node["rev"], node["data"]))
        for v in node.values():
            _walk(v, found, state)
    elif isinstance(node, list):
        for v in node:
            _walk(v, found, state)


def experiments() -> dict[str, tuple[str, dict]]:
    found: dict = {}
    _walk(json.loads(_dvc("exp", "show", "--json")), found)
    return found


def _ran(name: str) -> list[str]:
    """The stages an experiment's queue log shows running (``dvc queue logs``)."""
    proc = subprocess.run(["dvc", "queue", "logs", name], capture_output=True, text=True)
    return re.findall(r"Running stage '([^']+)'", (proc.stdout or "") + (proc.stderr or ""))


OWN_OUTPUTS = r"metrics/(ablation|gap_sweep)[^/]*\.json|metrics/plots/gap_sweep\.csv"  # written by this script


def _stage_written(path: str) -> bool:
    """A git-tracked file a stage run can change: params.yaml (``-S``), dvc.lock, or a ``cache: false``
    stage output (metrics/ and dvclive/, the project's convention), not this script's own summaries."""
    return (path in ("params.yaml", "dvc.lock") or path.startswith(("metrics/", "dvclive/"))) and \
        not re.fullmatch(OWN_OUTPUTS, path)


def untracked_outputs() -> list[str]:
    """Untracked files among the git-tracked (``cache: false``) stage outputs: metrics/ and dvclive/."""
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "metrics", "dvclive"],
                         capture_output=True, text=True).stdout.split()
    return [f for f in out if not re.fullmatch(OWN_OUTPUTS, f)]


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"git {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


# everything upstream of train, the base model's evaluation and the probe of the world (its metrics
# are the world's checks; nothing depends on it, so an arm would otherwise run it)
SHARED_TARGETS = ("fallback", "evaluate@base", "probe")


def _changed_from_head() -> set[str]:
    """The git-tracked files that differ from HEAD."""
    return set(_git("diff", "--name-only", "HEAD").split())


def _refuse_dirty(changed: set[str]) -> None:
    if changed & {"params.yaml", "dvc.lock"}:
        raise click.ClickException("params.yaml or dvc.lock has uncommitted changes: the arms at another setting "
                                   "run their shared stages in the workspace and restore both from HEAD afterwards; "
                                   "commit or stash them first")


def _shared_in_workspace(overrides: tuple[str, ...], name: str) -> list[str]:
    """Run the stages every arm shares (:data:`SHARED_TARGETS`) once, in the workspace, at ``overrides``,
    as the experiment ``name``; return the git-tracked files that run changed (to restore afterwards):
    stage-written files only (:func:`_stage_written`), so that files a user edits meanwhile (code,
    docs) are never reverted.

    The queued arms then snapshot this dvc.lock and take those stages from the cache. Without it an
    arm at a non-default upstream setting would rerun sample, guided_align and fallback itself: DVC
    keeps stages with persisted outputs out of its run cache."""
    def changed_from_head() -> set[str]:
        return {p for p in _changed_from_head() if _stage_written(p)}

    dirty = changed_from_head()
    _refuse_dirty(dirty)
    if name in set(_dvc("exp", "list", "--name-only").split()):
        _dvc("exp", "remove", name)
    try:
        out = _dvc("exp", "run", "-n", name, *[a for s in overrides for a in ("-S", s)], *SHARED_TARGETS)
        ran = re.findall(r"Running stage '([^']+)'", out)
        click.echo(f"{name} (the shared stages, in the workspace): ran {', '.join(ran) or 'nothing (all cached)'}",
                   err=True)
    except BaseException:
        _restore_workspace(sorted(changed_from_head() - dirty))
        raise
    return sorted(changed_from_head() - dirty)


def _restore_workspace(changed: list[str]) -> None:
    """Undo :func:`_shared_in_workspace`: the tracked files it changed from HEAD, and the DVC outputs."""
    paths = sorted(set(changed) | {"params.yaml", "dvc.lock"})
    _git("checkout", "HEAD", "--", *paths)
    _dvc("checkout", "--force")


Group = tuple[tuple[str, ...], dict[str, list[str]], str]
"""(overrides every experiment of the group shares, ``{experiment name: its -S overrides}``, the name of
the workspace experiment that runs the shared stages at those overrides)."""


def run_experiments(groups: list[Group], jobs: int, keep_existing: bool = False) -> None:
    """Queue every group's experiments, run the queue, report what each ran. An experiment of that
    name on this commit is replaced, or kept (not rerun) with ``keep_existing``.

    A group without shared overrides is queued on the workspace as it is (after ``dvc repro``: the
    shared upstream stages, once). A group with them first runs the stages its arms share once at
    them in the workspace (:func:`_shared_in_workspace`); the workspace is restored once the group is
    queued, so each group's experiments snapshot their own shared stages."""
    restores = any(shared for shared, _, _ in groups)
    if restores:
        _refuse_dirty(_changed_from_head())  # before anything runs
    if any(not shared for shared, _, _ in groups):
        _dvc("repro")  # the shared upstream stages, once (a no-op when up to date)
        if restores and "dvc.lock" in _changed_from_head():
            raise click.ClickException("`dvc repro` changed dvc.lock (the workspace was not up to date): commit it "
                                       "(`git add dvc.lock metrics dvclive && git commit`) and rerun; the groups "
                                       "run at other settings restore dvc.lock from HEAD")
    missing = untracked_outputs()
    if missing:
        raise click.ClickException(
            f"{len(missing)} untracked file(s) among the git-tracked outputs, e.g. {missing[0]}: a queued "
            "experiment starts from a git snapshot, so its stages would rerun in every arm and its metrics would "
            "be missing from the table: commit them first (`git add metrics dvclive && git commit`)")
    existing = set(_dvc("exp", "list", "--all-commits", "--name-only").split())
    kept = set(experiments()) if keep_existing else set()
    queued: list[str] = []
    for shared, names, shared_name in groups:
        for name in sorted(kept & set(names)):
            click.echo(f"{name}: kept (exists on this commit)", err=True)
        names = {n: sets for n, sets in names.items() if n not in kept}
        if not names:
            continue
        changed = _shared_in_workspace(shared, shared_name) if shared else None
        try:
            for name, sets in names.items():
                if name in existing:
                    _dvc("exp", "remove", name)
                _dvc("exp", "run", "--queue", "-n", name, *[a for s in sets for a in ("-S", s)])
                queued.append(name)
                click.echo(f"queued {name}: {' '.join(sets)}", err=True)
        finally:
            if changed is not None:
                _restore_workspace(changed)
    if not queued:
        return
    proc = subprocess.run(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], capture_output=True, text=True)
    for name in queued:
        click.echo(f"{name}: ran {', '.join(_ran(name)) or 'nothing (all cached)'}", err=True)
    shown = set(_dvc("exp", "list", "--name-only").split())
    failed = [name for name in queued if name not in shown]
    if proc.returncode != 0 or failed:
        raise click.ClickException(
            f"experiment(s) {', '.join(failed) or '?'} failed (see `dvc queue logs <name>` and `dvc queue status`):\n"
            f"{(proc.stdout or '')[-3000:]}{(proc.stderr or '')[-3000:]}")


def read_scores(rev: str, folder: str, benchmarks: list[str]) -> dict[str, list[float]]:
    """Per-problem avg@k scores of one evaluation (``<folder>/<benchmark>.jsonl``) at a git revision,
    in the benchmark file's problem order (the same in every experiment: the pairing)."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(".", rev=rev)
    out = {}
    for b in benchmarks:
        path = f"{folder}/{b}.jsonl"
        with fs.open(path, "rb") as fh:
            rows = [rec for _, rec in iter_jsonl_stream(fh, f"{path}@{rev[:7]}")]
        out[b] = list(problem_scores(rows).values())
    return out


WORLD_KEYS = ("nll_expert", "nll_own_correct", "nll_ratio_expert_to_own", "solve_rate", "headroom_families")


def _world_of(data: dict) -> dict:
    """The world's probe figures and checks, and the rewrite's tiers, from an experiment's metrics."""
    metrics = data.get("metrics") or {}
    world = ((metrics.get("metrics/probe.json") or {}).get("data") or {}).get("world") or {}
    rewrite = ((metrics.get("metrics/rewrite.json") or {}).get("data") or {})
    return {"world": {k: world.get(k) for k in WORLD_KEYS if k in world}, "probe": world,
            "rewrite_tiers": {t: v.get("count") for t, v in (rewrite.get("tiers") or {}).items()}}


def collect(arms: list[tuple[str, str, str]], seeds: list[int], tag: str,
            worlds: bool = False) -> tuple[dict, dict, dict]:
    """Scores ``{arm: {benchmark: [seed rows]}}`` (with ``base``), arm info and the world's metrics,
    from the experiments of this baseline. With ``worlds`` the base model has a row per seed too
    (each seed's own pretrained model) and the context lists every world."""
    found = experiments()
    names = {(a, s): exp_name(a, tag, s, worlds) for a, _, _ in arms for s in seeds}
    missing = [n for n in names.values() if n not in found]
    if missing:
        raise click.ClickException(f"no experiment(s) {', '.join(missing)} on this commit: run without --table-only")
    first_rev, first = found[names[(arms[0][0], seeds[0])]]
    params = ((first.get("params") or {}).get("params.yaml") or {}).get("data") or {}
    benchmarks = list(params["evaluate"]["benchmarks"])
    base_rows = [read_scores(found[names[(arms[0][0], s)]][0], "data/evaluate_base", benchmarks)
                 for s in (seeds if worlds else seeds[:1])]
    scores: dict[str, dict[str, list]] = {"base": {b: [r[b] for r in base_rows] for b in benchmarks}}
    for arm, _, _ in arms:
        rows = [read_scores(found[names[(arm, s)]][0], "data/evaluate", benchmarks) for s in seeds]
        scores[arm] = {b: [r[b] for r in rows] for b in benchmarks}
    first_world = _world_of(first)
    context = {"k": params["evaluate"]["k"], "evaluate_seed": params["evaluate"]["seed"],
               "problems": {b: len(v[0]) for b, v in scores["base"].items()},
               "world": first_world["world"], "checks": first_world["probe"].get("checks"),
               "rewrite_tiers": first_world["rewrite_tiers"],
               "textbook_frac": params["prepare"]["toy"]["textbook_frac"] if params["prepare"]["source"] == "toy" else None,
               # absent from the params of experiments made before the knob existed: expert style throughout
               "expert_model_style_frac": params["prepare"]["toy"].get("expert_model_style_frac", 0.0)
               if params["prepare"]["source"] == "toy" else None,
               "vary_world": worlds}
    if worlds:
        per_world = []
        for s in seeds:
            data = found[names[(arms[0][0], s)]][1]
            p = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            w = _world_of(data)
            per_world.append({"seed": s, "pretrain_seed": pretraining_seed(p["prepare"]),
                              "checks": w["probe"].get("checks"), "probe": w["probe"],
                              "rewrite_tiers": w["rewrite_tiers"]})
        context["worlds"] = per_world
    return scores, {a: (d, loss) for a, d, loss in arms}, context


def pretrain_seeds(params: dict, seeds: list[int]) -> dict[int, int | None]:
    """``{seed: prepare.pretrain.seed of its world}`` for ``--worlds``: the first seed keeps the
    workspace's world (None: no override, so its stages stay cached); seed ``base + i`` pretrains
    with the workspace's pretraining seed + i."""
    p0 = pretraining_seed(params["prepare"])
    return {s: None if i == 0 else p0 + i for i, s in enumerate(seeds)}


def experiment_groups(arms, seeds: list[int], tag: str, overrides: tuple[str, ...],
                      worlds: dict[int, int | None] | None = None) -> list[Group]:
    """The experiments to queue, grouped by the upstream overrides they share: each arm's data, loss
    and seed, the arm's own upstream overrides (drsft.ablation.ARM_OVERRIDES), then the ones every
    arm shares. ``worlds`` (``{seed: pretraining seed or None}``, :func:`pretrain_seeds`): one group
    per seed, whose arms share that seed's pretrained model."""
    def sets(a, d, loss, s, shared):
        return [f"train.data={d}", f"train.loss={loss}", f"train.seed={s}", *ARM_OVERRIDES.get(a, ()), *shared]

    shared_name = f"shared-{tag}" if tag else "shared"
    if worlds is None:
        return [(overrides, {exp_name(a, tag, s): sets(a, d, loss, s, overrides) for a, d, loss in arms
                             for s in seeds}, shared_name)]
    groups = []
    for s in seeds:
        shared = overrides + (() if worlds[s] is None else (f"prepare.pretrain.seed={worlds[s]}",))
        groups.append((shared, {exp_name(a, tag, s, True): sets(a, d, loss, s, shared) for a, d, loss in arms},
                       f"{shared_name}-w{s}"))
    return groups


def ablation(arms, seeds: list[int], tag: str, overrides: tuple[str, ...], jobs: int, table_only: bool,
             n_boot: int, out: str, keep_existing: bool = False, worlds: bool = False) -> dict:
    if not table_only:
        plan = pretrain_seeds(load_params("params.yaml"), seeds) if worlds else None
        run_experiments(experiment_groups(arms, seeds, tag, overrides, plan), jobs, keep_existing)
    scores, info, context = collect(arms, seeds, tag, worlds)
    # pairs naming an absent arm are skipped; with worlds, seed i of every arm (and of the base
    # model) shares one pretrained model, so the seed rows are paired
    summary = summarize(scores, PAIRS + EXTRA_PAIRS, n_boot=n_boot, paired_seeds=worlds)
    result = {"seeds": seeds, "n_boot": n_boot, "level": 0.95, "overrides": list(overrides), **context, **summary}
    write_json(out, result)
    click.echo(format_tables(summary, info))
    unit = "seed(s), each its own pretrained model and training run," if worlds else "training seed(s) and"
    how = ("the union of the bootstrap over problems and worlds and the t interval over the worlds" if worlds
           else "problems and seeds resampled")
    click.echo(f"\navg@{context['k']} accuracy (%), mean over {len(seeds)} {unit} "
               f"{sum(context['problems'].values())} problems ± the half-width of the 95 % interval "
               f"({how}); written to {out}", err=True)
    return result


@click.command("ablation")
@click.option("--seeds", "n_seeds", type=click.IntRange(min=1), default=3, show_default=True,
              help="training seeds per arm: train.seed = params.yaml's train.seed + 0 .. N-1")
@click.option("--with-is", is_flag=True, help="also run the importance-sampling arms (drsft's extensions)")
@click.option("--with-noguided", is_flag=True,
              help="also run the tier ablation dr-noguided-dft (guided_align.n=0: no guided re-solving)")
@click.option("--with-tiers", is_flag=True,
              help="also run the arms that attribute the benefit of rewriting: rft (the self tier alone), "
                   "dr-noguided-sft, dr-noguided-dft, dr-sft-keepall, dr-dft-keepall")
@click.option("--with-lora", is_flag=True, help="also run dr-dft-lora (train.lora.r 8: LoRA adapters instead of "
                                               "full fine-tuning)")
@click.option("--with-parity", is_flag=True,
              help="also run DR+DFT at the paper code's choices (docs/parity.md): dr-dft-mbnorm, dr-dft-question, "
                   "dr-dft-keepall, dr-dft-paper")
@click.option("--arms", "only", multiple=True, metavar="ARM",
              help="run only these arms (repeatable; default: all of the selected set), e.g. --arms sft --arms dr-dft")
@click.option("--table-only", is_flag=True, help="do not run; summarize the existing experiments")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="queued experiments run at once (dvc exp run --run-all --jobs)")
@click.option("--plots", "plots_dir", default=None, help="also render `dvc plots diff` of the seed-0 arms into this folder")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="a params override applied to every arm (dvc exp run -S), e.g. train.lr=1e-4; repeatable")
@click.option("--tag", default="", help="part of the experiment names (sft-<tag>-s0, ...) and of the output file")
@click.option("--n-boot", type=click.IntRange(min=100), default=2000, show_default=True, help="bootstrap resamples")
@click.option("--out", default=None, help="summary file [default: metrics/ablation.json, or metrics/ablation-<tag>.json]")
@click.option("--skip-existing", is_flag=True,
              help="experiments of these names on this commit are kept, not rerun (e.g. to add seeds: --seeds 6)")
@click.option("--worlds/--no-worlds", default=None,
              help="each seed also pretrains its own base model (prepare.pretrain.seed), so the intervals count "
                   "the model-to-model variation another machine's float path brings [default: on for the "
                   "embedded toy model]")
def ablation_command(n_seeds, with_is, with_noguided, with_tiers, with_lora, with_parity, only, table_only, jobs, plots_dir, overrides, tag, n_boot, out,
                     skip_existing, worlds):
    """The paper's comparison: the arms x seeds as queued `dvc exp run`s, then
    metrics/ablation.json (means, 95 % intervals, paired differences) and the table."""
    if overrides and not tag:
        raise click.UsageError("--set needs a --tag, so that these arms do not replace the default ones")
    params = load_params("params.yaml")
    toy = params["model"]["base"] == "toy"
    if worlds is None:
        worlds = toy
    elif worlds and not toy:
        raise click.UsageError("--worlds redraws the embedded model's pretraining (prepare.pretrain.seed): "
                               f"model.base is {params['model']['base']!r}, not toy")
    arms = ARMS + (IS_ARMS if with_is else []) + (NOGUIDED_ARMS if with_noguided else []) + \
        (TIER_ARMS if with_tiers else []) + (LORA_ARMS if with_lora else []) + (PARITY_ARMS if with_parity else [])
    arms = list({a[0]: a for a in arms}.values())    # an arm two options both add runs once
    if only:
        unknown = sorted(set(only) - {a for a, _, _ in arms})
        if unknown:
            raise click.UsageError(f"--arms: unknown arm(s) {', '.join(unknown)}; the selected set is "
                                   f"{', '.join(a for a, _, _ in arms)} (--with-is / --with-noguided / --with-tiers / "
                                   f"--with-lora / --with-parity add more)")
        arms = [arm for arm in arms if arm[0] in only]
    base_seed = int(params["train"]["seed"])
    seeds = [base_seed + i for i in range(n_seeds)]
    ablation(arms, seeds, tag, overrides, jobs, table_only, n_boot,
             out or (f"metrics/ablation-{tag}.json" if tag else "metrics/ablation.json"), skip_existing, worlds)
    if plots_dir:
        _dvc("plots", "diff", *[exp_name(a, tag, seeds[0], worlds) for a, _, _ in arms], "--out", plots_dir)
        click.echo(f"plots: {Path(plots_dir) / 'index.html'}", err=True)

