"""Beyond the paper: how the benefit of rewriting changes with the policy gap.

Two knobs of the embedded world move the gap (``--knob``):

* ``textbook_frac`` (``prepare.toy.textbook_frac``): the share of the base model's plain pretraining
  examples answered in the expert's textbook style (drsft.toy.world.pretraining_examples). It moves
  the *model* towards the expert: each setting pretrains another base model, so the base model's
  own accuracy moves with the gap.
* ``expert_model_style_frac`` (``prepare.toy.expert_model_style_frac``): the share of the training
  set's demonstrations written in the model's own style (correct, the right method;
  drsft.toy.world.make_world). It moves the *data* towards the model: pretraining does not read it,
  so every setting has the same base model (prepare reruns and pretrains it again, byte-identical
  on one machine) and only the expert data differs.

Each setting pretrains one base model (the ablation's ``--worlds`` is not applied: it would
pretrain one per seed and setting), so a setting's intervals count training seeds and evaluation,
not the model-to-model variation. For each setting this runs the ablation (:mod:`drsft.experiments`:
the stages the arms share -- prepare, the probe, sampling, rewriting, the base model's evaluation --
once in the workspace, then the four arms x ``--seeds`` training seeds as queued ``dvc exp run``s
that each run only ``train`` and ``evaluate@trained``), reads the *measured* gap -- the probe's mean
per-token NLL of the expert demonstrations under that base model and its ratio to the NLL of the
model's own correct solutions, ``metrics/probe.json`` world.nll_expert and nll_ratio_expert_to_own
-- and writes (``<name>``: ``gap_sweep`` for textbook_frac, ``gap_sweep_style`` for the other):

* ``metrics/<name>.json``: per setting the measured gap and every arm's mean avg@k with its 95 %
  interval and the paired differences (as ``metrics/ablation.json``);
* ``metrics/plots/<name>.csv``: one row per setting (``dvc plots show`` draws each arm's accuracy
  against the measured NLL ratio, the plots of dvc.yaml);
* ``docs/<name>.png``: the same with interval bars, and the paired differences (matplotlib).

    drsft gap-sweep                         # textbook_frac 0, 0.2 (the default), 0.4 (3 seeds; make gap-sweep)
    drsft gap-sweep --knob expert_model_style_frac --values 0,0.5,1
    drsft gap-sweep --values 0,0.05,0.2,0.5 --seeds 2 --skip-existing
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import click

from drsft.ablation import ARMS
from drsft.experiments import ablation, exp_name, experiments
from drsft.io import write_csv, write_json
from drsft.params import load_params

class Knob(NamedTuple):
    key: str                       # its params key
    prefix: str                    # the experiments' tag prefix
    name: str                      # the outputs' name (metrics/<name>.json, ...)
    values: str                    # its settings by default
    x: str                         # the plots' x: the measured NLL ratio, or the knob itself
    absent: float | None = None    # its value in an ablation.json made before the knob existed


KNOBS = {
    "textbook_frac": Knob("prepare.toy.textbook_frac", "tb", "gap_sweep", "0,0.2,0.4", "nll_ratio"),
    # the mean NLL does not follow this knob (docs/results.md), so its plots are drawn against it
    "expert_model_style_frac": Knob("prepare.toy.expert_model_style_frac", "ms", "gap_sweep_style", "0,0.5,1",
                                    "expert_model_style_frac", absent=0.0),
}


def tag_for(value: float, default: float, prefix: str = "tb") -> str:
    """The experiments' tag: none for the workspace's own setting (its arms are `make ablation`'s)."""
    return "" if value == default else f"{prefix}{value:g}"


LABELS = {"base": "base model", "sft": "SFT", "dft": "DFT", "dr-sft": "DR+SFT", "dr-dft": "DR+DFT"}
DIFFS = {"dr-dft_vs_dft": "DR+DFT − DFT", "dr-sft_vs_sft": "DR+SFT − SFT", "dr-dft_vs_base": "DR+DFT − base"}


def plot_png(rows: list[dict], arms: list[str], comparisons: dict, path: str, knob: str = "textbook_frac") -> None:
    """Two panels, each arm's accuracy and the paired differences with their 95 % intervals, against
    the knob's x (:data:`KNOBS`): the measured gap (expert / own-solution NLL ratio, log scale), or
    the knob's value with the measured ratio in the tick labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = KNOBS[knob].x
    xs = [r[x_key] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for arm in arms:
        ys = [100 * r[arm] for r in rows]
        err = [[100 * (r[arm] - r[f"{arm}_low"]) for r in rows], [100 * (r[f"{arm}_high"] - r[arm]) for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=LABELS.get(arm, arm))
    for name, label in DIFFS.items():
        cs = [comparisons[r[knob]][name] for r in rows]
        ys = [100 * c["diff"] for c in cs]
        err = [[100 * (c["diff"] - c["diff_ci"][0]) for c in cs], [100 * (c["diff_ci"][1] - c["diff"]) for c in cs]]
        bx.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    bx.axhline(0, color="grey", lw=0.8)
    from matplotlib.ticker import NullFormatter

    by_ratio = x_key == "nll_ratio"
    labels = [f"×{r['nll_ratio']:.1f}\n({r[knob]:g})" if by_ratio else f"{r[knob]:g}\n(×{r['nll_ratio']:.1f})"
              for r in rows]
    for a in (ax, bx):
        if by_ratio:
            a.set_xscale("log")   # before the ticks: setting the scale resets them
        a.set_xticks(xs)
        a.set_xticklabels(labels, fontsize=8)
        a.set_xlabel(f"expert / own-solution NLL under the base model (measured; log scale)\n({knob})" if by_ratio
                     else f"{knob}\n(×: expert / own-solution NLL, measured)")
        a.xaxis.set_minor_formatter(NullFormatter())
        a.grid(alpha=0.3)
    ax.set_ylabel("avg@k accuracy (%): mean over seeds, 95 % interval")
    ax.set_title("each arm")
    bx.set_ylabel("difference (points), paired, 95 % interval")
    bx.set_title("the paper's comparisons")
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    fig.suptitle(f"drsft embedded world: the policy-gap sweep ({KNOBS[knob].key})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _current_ablation(seeds: list[int], knobs: dict[str, float]) -> dict | None:
    """metrics/ablation.json (`make ablation`) when it holds the four arms at these knob values
    (``{name: value}``; a knob absent from the file reads as its :attr:`Knob.absent`) and seeds."""
    path = Path("metrics/ablation.json")
    if not path.exists():
        return None
    a = json.loads(path.read_text())
    made = {k: a.get(k, spec.absent) for k, spec in KNOBS.items()}
    same = (a.get("seeds") == seeds and all(made[k] == v for k, v in knobs.items()) and not a.get("overrides")
            and not a.get("vary_world") and all(arm in a.get("arms", {}) for arm, _, _ in ARMS))
    return a if same else None


@click.command("gap-sweep")
@click.option("--knob", type=click.Choice(list(KNOBS)), default="textbook_frac", show_default=True,
              help="textbook_frac: pretraining text in the expert's style (moves the model); "
                   "expert_model_style_frac: train demonstrations in the model's style (moves the data)")
@click.option("--values", default=None, help="comma-separated settings of the knob  [default: textbook_frac "
              "0,0.2,0.4; expert_model_style_frac 0,0.5,1]")
@click.option("--seeds", "n_seeds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--n-boot", type=click.IntRange(min=100), default=2000, show_default=True)
@click.option("--skip-existing", is_flag=True, help="experiments that exist on this commit are kept, not rerun")
@click.option("--png", default=None, help="the figure  [default: docs/gap_sweep.png, docs/gap_sweep_style.png]")
def gap_sweep_command(knob, values, n_seeds, jobs, n_boot, skip_existing, png):
    """Beyond the paper: the four arms at several settings of a policy-gap knob of the world,
    accuracy against the measured expert NLL."""
    key, prefix, name, default_values, x_key, _ = KNOBS[knob]
    settings = [float(v) for v in (values or default_values).split(",") if v.strip()]
    png = png or f"docs/{name}.png"
    params = load_params("params.yaml")
    toy = params["prepare"]["toy"]
    current = {k: float(toy[k]) for k in KNOBS}
    default = current[knob]
    seeds = [int(params["train"]["seed"]) + i for i in range(n_seeds)]
    results = {}
    for v in settings:
        tag = tag_for(v, default, prefix)
        found_ablation = None if tag else _current_ablation(seeds, current)
        if found_ablation is not None:
            click.echo(f"== {key}={v:g} (the workspace's setting: metrics/ablation.json) ==", err=True)
            results[v] = found_ablation
            continue
        # The workspace's own setting is `make ablation`'s: reuse its experiments when they exist.
        found = experiments() if skip_existing or not tag else {}
        done = bool(found) and all(exp_name(a, tag, s) in found for a, _, _ in ARMS for s in seeds)
        click.echo(f"== {key}={v:g} ({'summarize existing' if done else 'run'}) ==", err=True)
        results[v] = ablation(ARMS, seeds, tag, (f"{key}={v:g}",) if tag else (), jobs, done, n_boot,
                              f"metrics/ablation-{tag}.json" if tag else "metrics/ablation.json", skip_existing)
    arms = ["base"] + [a for a, _, _ in ARMS]
    rows = []
    for v in settings:
        r = results[v]
        row = {knob: v, "nll_expert": r["world"].get("nll_expert"),
               "nll_ratio": r["world"].get("nll_ratio_expert_to_own")}
        for arm in arms:
            a = r["arms"][arm]
            row[arm], (row[f"{arm}_low"], row[f"{arm}_high"]) = a["avg_at_k"], a["avg_at_k_ci"]
        for cname, c in r["comparisons"].items():
            row[cname] = c["diff"]
        rows.append(row)
    rows.sort(key=lambda r: r[x_key])
    write_json(f"metrics/{name}.json", {"knob": key, "seeds": seeds, "settings": rows,
                                        "per_setting": {f"{v:g}": {k: r[k] for k in ("world", "arms", "comparisons")}
                                                        for v, r in results.items()}})
    columns = list(rows[0])
    write_csv(f"metrics/plots/{name}.csv", rows, columns)
    plot_png(rows, arms, {v: results[v]["comparisons"] for v in settings}, png, knob)
    click.echo(f"| {knob} | expert NLL | ratio to own | " + " | ".join(arms) + " | DR+DFT − DFT | DR+SFT − SFT |")
    click.echo("|" + "---|" * (5 + len(arms)))
    for r in rows:
        cells = " | ".join(f"{100 * r[a]:.1f} [{100 * r[a + '_low']:.1f}, {100 * r[a + '_high']:.1f}]" for a in arms)
        comp = results[r[knob]]["comparisons"]
        diffs = " | ".join(f"{100 * comp[c]['diff']:+.1f} [{100 * comp[c]['diff_ci'][0]:+.1f}, {100 * comp[c]['diff_ci'][1]:+.1f}]"
                           for c in ("dr-dft_vs_dft", "dr-sft_vs_sft"))
        click.echo(f"| {r[knob]:g} | {r['nll_expert']:.3f} | {r['nll_ratio']:.1f} | {cells} | {diffs} |")
    click.echo(f"wrote metrics/{name}.json, metrics/plots/{name}.csv, {png}", err=True)
