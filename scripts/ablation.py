"""The paper's comparison in one command: queue the arms as DVC experiments, run them, print a table.

1. ``dvc repro`` in the workspace: the shared upstream stages (prepare ... fallback, evaluate_base),
   once; a no-op when up to date.
2. Each arm is queued: ``dvc exp run --queue -n <arm> -S train.data=... -S train.loss=...``. A queued
   experiment snapshots the workspace (uncommitted changes included) and runs in its own temporary
   directory, so the workspace is never touched.
3. ``dvc exp run --run-all --jobs N`` runs the queue (N=1 by default: on a 2-core CPU the arms would
   only slow each other down). Every stage upstream of ``train`` comes from the DVC cache, so per
   arm only ``train`` and ``evaluate`` run; the script prints, for each arm, the stages its log
   shows running.
4. The table is read back from ``dvc exp show --json``: avg@k per benchmark and on average, with
   the base model as the reference row, plus the rewrite tier shares. ``--plots DIR`` also renders
   ``dvc plots diff <arms>`` (accuracy per benchmark per arm, loss curves, tier composition) to DIR.

    python scripts/ablation.py                     # the four arms
    python scripts/ablation.py --with-is           # plus rewritten+is and rewritten+is_dft
    python scripts/ablation.py --table-only        # only print the table of existing experiments
    python scripts/ablation.py --plots ablation_plots
    python scripts/ablation.py --set train.lr=1e-4 --tag lr1e-4   # the arms at another setting:
                                                   # -S for every arm, names sft-lr1e-4, ...
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import click

ARMS = [
    ("sft", "expert", "sft"),
    ("dft", "expert", "dft"),
    ("dr-sft", "rewritten", "sft"),
    ("dr-dft", "rewritten", "dft"),
]
IS_ARMS = [("dr-is", "rewritten", "is"), ("dr-is-dft", "rewritten", "is_dft")]


def _dvc(*args: str, capture: bool = True) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=capture, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"dvc {' '.join(args)} failed:\n{(proc.stdout or '')[-3000:]}{(proc.stderr or '')[-3000:]}")
    return (proc.stdout or "") + (proc.stderr or "")


def _walk(node, found: dict) -> None:
    """Collect {experiment name: data} from `dvc exp show --json`, whatever its nesting."""
    if isinstance(node, dict):
        if "data" in node and isinstance(node.get("data"), dict) and node.get("name"):
            found.setdefault(node["name"], node["data"])
        if node.get("rev") == "workspace" and isinstance(node.get("data"), dict):
            found.setdefault("workspace", node["data"])
        for v in node.values():
            _walk(v, found)
    elif isinstance(node, list):
        for v in node:
            _walk(v, found)


def _metric(data: dict, file: str) -> dict:
    return ((data.get("metrics") or {}).get(file) or {}).get("data") or {}


def _params(data: dict) -> dict:
    return ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}


def table(arm_names: list[str]) -> str:
    found: dict = {}
    _walk(json.loads(_dvc("exp", "show", "--json")), found)
    rows = []
    base = _metric(found.get("workspace", {}), "metrics/evaluate_base.json")
    benches = sorted((base.get("benchmarks") or {}).keys())
    for name in arm_names:
        if name not in found:
            continue
        data = found[name]
        ev = _metric(data, "metrics/evaluate.json")
        benches = benches or sorted((ev.get("benchmarks") or {}).keys())
        p = _params(data).get("train", {})
        rows.append((name, p.get("data"), p.get("loss"), ev))
    tiers = _metric(found.get("workspace", {}), "metrics/rewrite.json").get("tiers", {})
    head = "| arm | train.data | train.loss | " + " | ".join(benches) + " | average |"
    sep = "|" + "---|" * (4 + len(benches))
    lines = [head, sep]

    def cells(ev):
        b = ev.get("benchmarks") or {}
        vals = [b.get(x, {}).get("avg_at_k") for x in benches] + [(ev.get("average") or {}).get("avg_at_k")]
        return " | ".join("—" if v is None else f"{100 * v:.1f}" for v in vals)

    if base:
        lines.append(f"| base model | — | — | {cells(base)} |")
    for name, d, loss, ev in rows:
        lines.append(f"| {name} | {d} | {loss} | {cells(ev)} |")
    k = next((v.get("k") for _, _, _, ev in rows for v in (ev.get("benchmarks") or {}).values()), None)
    note = f"\navg@{k} accuracy (%) per benchmark."
    if tiers:
        note += " Rewritten set: " + ", ".join(f"{t} {100 * v.get('share', 0):.1f}%" for t, v in tiers.items()) + "."
    return "\n".join(lines) + note


def _ran_per_arm(name: str) -> list[str]:
    """The stages an experiment's queue log shows running (``dvc queue logs``)."""
    proc = subprocess.run(["dvc", "queue", "logs", name], capture_output=True, text=True)
    return re.findall(r"Running stage '([^']+)'", (proc.stdout or "") + (proc.stderr or ""))


def untracked_outputs() -> list[str]:
    """Untracked files under the git-tracked (``cache: false``) outputs: metrics/ and dvclive/."""
    out = subprocess.run(["git", "ls-files", "--others", "--exclude-standard", "--", "metrics", "dvclive"],
                         capture_output=True, text=True).stdout
    return out.split()


def run_arms(arms: list[tuple[str, str, str]], jobs: int, overrides: tuple[str, ...] = ()) -> None:
    _dvc("repro")  # the shared upstream stages, once (a no-op when up to date)
    missing = untracked_outputs()
    if missing:
        raise click.ClickException(
            f"{len(missing)} untracked file(s) among the git-tracked outputs, e.g. {missing[0]}: a queued "
            "experiment starts from a git snapshot, so its stages would rerun in every arm and its metrics would "
            "be missing from the table: commit them first (`git add metrics dvclive && git commit`)")
    existing = set(_dvc("exp", "list", "--all-commits", "--name-only").split())
    for name, data, loss in arms:
        if name in existing:
            _dvc("exp", "remove", name)
        extra = [a for o in overrides for a in ("-S", o)]
        _dvc("exp", "run", "--queue", "-n", name, "-S", f"train.data={data}", "-S", f"train.loss={loss}", *extra)
        click.echo(f"queued {name}: train.data={data} train.loss={loss} {' '.join(overrides)}".rstrip(), err=True)
    proc = subprocess.run(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], capture_output=True, text=True)
    for name, _, _ in arms:
        ran = _ran_per_arm(name)
        click.echo(f"{name}: ran {', '.join(ran) or 'nothing (all cached)'}", err=True)
    shown = set(_dvc("exp", "list", "--name-only").split())
    failed = [name for name, _, _ in arms if name not in shown]
    if proc.returncode != 0 or failed:
        raise click.ClickException(
            f"arm(s) {', '.join(failed) or '?'} failed (see `dvc queue logs <arm>` and `dvc queue status`):\n"
            f"{(proc.stdout or '')[-3000:]}{(proc.stderr or '')[-3000:]}")


@click.command()
@click.option("--with-is", is_flag=True, help="also run the importance-sampling arms")
@click.option("--table-only", is_flag=True, help="do not run, only print the table")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="queued arms run at once (dvc exp run --run-all --jobs)")
@click.option("--plots", "plots_dir", default=None, help="also render `dvc plots diff <arms>` into this folder")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="a params override applied to every arm (dvc exp run -S), e.g. train.lr=1e-4; repeatable")
@click.option("--tag", default="", help="suffix of the arm names (sft-<tag>, ...), to keep several settings apart")
def main(with_is: bool, table_only: bool, jobs: int, plots_dir: str | None, overrides: tuple[str, ...], tag: str):
    if overrides and not tag:
        raise click.UsageError("--set needs a --tag, so that these arms do not replace the default ones")
    arms = [(f"{name}-{tag}" if tag else name, data, loss) for name, data, loss in ARMS + (IS_ARMS if with_is else [])]
    if not table_only:
        run_arms(arms, jobs, overrides)
    click.echo(table([a[0] for a in arms]))
    if plots_dir:
        _dvc("plots", "diff", *[a[0] for a in arms], "--out", plots_dir)
        click.echo(f"plots: {Path(plots_dir) / 'index.html'}", err=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
