"""Probe candidate worlds: `prepare` + `probe` (no training) at a params override, over pretraining seeds.

How the embedded world's defaults are chosen: by the probe's checks alone (metrics/probe.json
``world.checks``), on several pretraining runs, never by the results of training arms. Each run
pretrains the toy model at the overrides (``--set KEY=VALUE``, repeatable) with
``prepare.pretrain.seed`` = each of ``--pretrain-seeds``, probes it, and appends one JSON line (the
overrides, the seed, the checks, the per-family figures) to ``--out``; the table printed at the end
counts in how many runs each check holds.

    python scripts/probe_worlds.py --set prepare.toy.misconception_rate=0.95 --pretrain-seeds 0,1,2

Each run takes a `prepare` (~5 min here) and a `probe` (~20 s); runs go one after another.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from drsft.params import load_params  # noqa: E402


def _set(params: dict, dotted: str, raw: str) -> None:
    node = params
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    if last not in node:
        raise click.BadParameter(f"params.yaml has no {dotted}")
    node[last] = yaml.safe_load(raw)


@click.command()
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="a params override (repeatable)")
@click.option("--pretrain-seeds", default="0,1,2", show_default=True, help="prepare.pretrain.seed of each run")
@click.option("--out", default="probe_worlds.jsonl", show_default=True, help="JSON lines, one per run (appended)")
def main(overrides: tuple[str, ...], pretrain_seeds: str, out: str) -> None:
    """Pretrain and probe the toy world at OVERRIDES for each pretraining seed."""
    seeds = [int(s) for s in pretrain_seeds.split(",") if s.strip()]
    rows = []
    for seed in seeds:
        params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
        for o in overrides:
            key, _, value = o.partition("=")
            _set(params, key, value)
        params["prepare"]["pretrain"]["seed"] = seed
        with tempfile.TemporaryDirectory(prefix="probe-world-") as tmp:
            work = Path(tmp)
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
            load_params(work / "params.yaml")   # a bad override fails here, before minutes of pretraining
            t0 = time.time()
            py = [sys.executable]
            subprocess.run(py + [str(ROOT / "stages" / "prepare.py"), "--params", str(work / "params.yaml"),
                                 "--data", str(work / "data"), "--model", str(work / "model"),
                                 "--metrics", str(work / "prepare.json")], check=True, cwd=ROOT)
            subprocess.run(py + [str(ROOT / "stages" / "probe.py"), "--params", str(work / "params.yaml"),
                                 "--problems", str(work / "data" / "train.jsonl"), "--model", str(work / "model"),
                                 "--metrics", str(work / "probe.json")], check=True, cwd=ROOT)
            world = json.loads((work / "probe.json").read_text(encoding="utf-8"))["world"]
        row = {"overrides": list(overrides), "pretrain_seed": seed, "seconds": round(time.time() - t0),
               "checks": world["checks"], "world": world}
        rows.append(row)
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        fam = world["families"]
        click.echo(f"seed {seed}: {sum(world['checks'].values())}/{len(world['checks'])} checks; failing "
                   f"{[k for k, v in world['checks'].items() if not v]}; solve {world['solve_rate']:.3f}; "
                   + "; ".join(f"{f} self/guided/expert {m.get('nll_own_correct')}/{m.get('nll_guided_correct')}/"
                               f"{m.get('nll_expert_guided_problems')} solve {m['solve_rate']:.3f}"
                               for f, m in fam.items()), err=True)
    names = sorted({k for r in rows for k in r["checks"]})
    click.echo(" ".join(overrides) or "(params.yaml)")
    for k in names:
        click.echo(f"  {k}: {sum(bool(r['checks'].get(k)) for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()
