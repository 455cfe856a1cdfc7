"""Beyond the paper: how the benefit of rewriting changes with the policy gap.

The embedded world's gap knob is ``prepare.toy.textbook_frac``, the share of the base model's plain
pretraining examples answered in the expert's textbook style (drsft.toy.world.pretraining_examples). It
changes the base model as well as the gap: each setting is its own world. Each setting pretrains one
base model (the ablation's ``--worlds`` is not applied: it would pretrain one per seed and setting),
so a setting's intervals count training seeds and evaluation, not the model-to-model variation.
For each setting this runs the ablation (:mod:`drsft.experiments`: the stages the arms share --
pretraining that setting's base model, the probe, sampling, rewriting, the base model's evaluation --
once in the workspace, then the four arms x ``--seeds`` training seeds as queued ``dvc exp run``s
that each run only ``train`` and ``evaluate@trained``), reads the *measured* gap -- the probe's mean per-token NLL of
the expert demonstrations under that base model and its ratio to the NLL of the model's own correct
solutions, ``metrics/probe.json`` world.nll_expert and nll_ratio_expert_to_own -- and writes:

* ``metrics/gap_sweep.json``: per setting the measured gap and every arm's mean avg@k with its 95 %
  interval and the paired differences (as ``metrics/ablation.json``);
* ``metrics/plots/gap_sweep.csv``: one row per setting (``dvc plots show`` draws each arm's accuracy
  against the measured NLL ratio, the ``gap_sweep`` plot of dvc.yaml);
* ``docs/gap_sweep.png``: the same with interval bars, and the paired differences (matplotlib).

    drsft gap-sweep                         # textbook_frac 0, 0.2 (the default), 0.4 (3 seeds; make gap-sweep)
    drsft gap-sweep --values 0,0.05,0.2,0.5 --seeds 2 --skip-existing
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from drsft.ablation import ARMS
from drsft.experiments import ablation, exp_name, experiments
from drsft.io import write_csv, write_json
from drsft.params import load_params

KNOB = "prepare.toy.textbook_frac"


def tag_for(value: float, default: float) -> str:
    """The experiments' tag: none for the workspace's own setting (its arms are `make ablation`'s)."""
    return "" if value == default else f"tb{value:g}"


LABELS = {"base": "base model", "sft": "SFT", "dft": "DFT", "dr-sft": "DR+SFT", "dr-dft": "DR+DFT"}
DIFFS = {"dr-dft_vs_dft": "DR+DFT − DFT", "dr-sft_vs_sft": "DR+SFT − SFT", "dr-dft_vs_base": "DR+DFT − base"}


def plot_png(rows: list[dict], arms: list[str], comparisons: dict, path: str) -> None:
    """Two panels against the measured gap (expert / own-solution NLL ratio, log scale): each arm's
    accuracy, and the paired differences, with their 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["nll_ratio"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for arm in arms:
        ys = [100 * r[arm] for r in rows]
        err = [[100 * (r[arm] - r[f"{arm}_low"]) for r in rows], [100 * (r[f"{arm}_high"] - r[arm]) for r in rows]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=LABELS.get(arm, arm))
    for name, label in DIFFS.items():
        cs = [comparisons[r["textbook_frac"]][name] for r in rows]
        ys = [100 * c["diff"] for c in cs]
        err = [[100 * (c["diff"] - c["diff_ci"][0]) for c in cs], [100 * (c["diff_ci"][1] - c["diff"]) for c in cs]]
        bx.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    bx.axhline(0, color="grey", lw=0.8)
    from matplotlib.ticker import NullFormatter

    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xticks(xs)
        a.set_xticklabels([f"×{r['nll_ratio']:.0f}\n({r['textbook_frac']:g})" for r in rows], fontsize=8)
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xlabel("expert / own-solution NLL under the base model (measured; log scale)\n(textbook_frac)")
        a.grid(alpha=0.3)
    ax.set_ylabel("avg@k accuracy (%): mean over seeds, 95 % interval")
    ax.set_title("each arm")
    bx.set_ylabel("difference (points), paired, 95 % interval")
    bx.set_title("the paper's comparisons")
    ax.legend(fontsize=8)
    bx.legend(fontsize=8)
    fig.suptitle("drsft embedded world: the policy-gap sweep (prepare.toy.textbook_frac)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _current_ablation(seeds: list[int], value: float) -> dict | None:
    """metrics/ablation.json (`make ablation`) when it holds the four arms at this setting and seeds."""
    path = Path("metrics/ablation.json")
    if not path.exists():
        return None
    a = json.loads(path.read_text())
    same = (a.get("seeds") == seeds and a.get("textbook_frac") == value and not a.get("overrides")
            and not a.get("vary_world") and all(arm in a.get("arms", {}) for arm, _, _ in ARMS))
    return a if same else None


@click.command("gap-sweep")
@click.option("--values", default="0,0.2,0.4", show_default=True, help=f"comma-separated settings of {KNOB}")
@click.option("--seeds", "n_seeds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--n-boot", type=click.IntRange(min=100), default=2000, show_default=True)
@click.option("--skip-existing", is_flag=True, help="experiments that exist on this commit are kept, not rerun")
@click.option("--png", default="docs/gap_sweep.png", show_default=True)
def gap_sweep_command(values, n_seeds, jobs, n_boot, skip_existing, png):
    """Beyond the paper: the four arms at several settings of the world's policy-gap knob
    (prepare.toy.textbook_frac), accuracy against the measured expert NLL."""
    settings = [float(v) for v in values.split(",") if v.strip()]
    params = load_params("params.yaml")
    default = float(params["prepare"]["toy"]["textbook_frac"])
    seeds = [int(params["train"]["seed"]) + i for i in range(n_seeds)]
    results = {}
    for v in settings:
        tag = tag_for(v, default)
        current = None if tag else _current_ablation(seeds, v)
        if current is not None:
            click.echo(f"== {KNOB}={v:g} (the workspace's setting: metrics/ablation.json) ==", err=True)
            results[v] = current
            continue
        # The workspace's own setting is `make ablation`'s: reuse its experiments when they exist.
        found = experiments() if skip_existing or not tag else {}
        done = bool(found) and all(exp_name(a, tag, s) in found for a, _, _ in ARMS for s in seeds)
        click.echo(f"== {KNOB}={v:g} ({'summarize existing' if done else 'run'}) ==", err=True)
        results[v] = ablation(ARMS, seeds, tag, (f"{KNOB}={v:g}",) if tag else (), jobs, done, n_boot,
                              f"metrics/ablation-{tag}.json" if tag else "metrics/ablation.json", skip_existing)
    arms = ["base"] + [a for a, _, _ in ARMS]
    rows = []
    for v in settings:
        r = results[v]
        row = {"textbook_frac": v, "nll_expert": r["world"].get("nll_expert"),
               "nll_ratio": r["world"].get("nll_ratio_expert_to_own")}
        for arm in arms:
            a = r["arms"][arm]
            row[arm], (row[f"{arm}_low"], row[f"{arm}_high"]) = a["avg_at_k"], a["avg_at_k_ci"]
        for name, c in r["comparisons"].items():
            row[name] = c["diff"]
        rows.append(row)
    rows.sort(key=lambda r: r["nll_ratio"])
    write_json("metrics/gap_sweep.json", {"knob": KNOB, "seeds": seeds, "settings": rows,
                                          "per_setting": {f"{v:g}": {k: r[k] for k in ("world", "arms", "comparisons")}
                                                          for v, r in results.items()}})
    columns = list(rows[0])
    write_csv("metrics/plots/gap_sweep.csv", rows, columns)
    plot_png(rows, arms, {v: results[v]["comparisons"] for v in settings}, png)
    click.echo("| textbook_frac | expert NLL | ratio to own | " + " | ".join(arms) + " | DR+DFT − DFT | DR+SFT − SFT |")
    click.echo("|" + "---|" * (5 + len(arms)))
    for r in rows:
        cells = " | ".join(f"{100 * r[a]:.1f} [{100 * r[a + '_low']:.1f}, {100 * r[a + '_high']:.1f}]" for a in arms)
        comp = results[r["textbook_frac"]]["comparisons"]
        diffs = " | ".join(f"{100 * comp[c]['diff']:+.1f} [{100 * comp[c]['diff_ci'][0]:+.1f}, {100 * comp[c]['diff_ci'][1]:+.1f}]"
                           for c in ("dr-dft_vs_dft", "dr-sft_vs_sft"))
        click.echo(f"| {r['textbook_frac']:g} | {r['nll_expert']:.3f} | {r['nll_ratio']:.1f} | {cells} | {diffs} |")
    click.echo(f"wrote metrics/gap_sweep.json, metrics/plots/gap_sweep.csv, {png}", err=True)

