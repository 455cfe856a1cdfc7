"""The paper's comparison in one command: run the arms as DVC experiments, print a markdown table.

Each arm is ``dvc exp run -n <arm> -S train.data=... -S train.loss=...``; every stage upstream of
``train`` is shared from the DVC cache, so per arm only ``train`` and ``evaluate`` run (the script
prints which stages ran for each arm). The table is read back from ``dvc exp show --json``:
avg@k per benchmark and on average, plus the rewrite tier shares, with the base model as the
reference row.

    python scripts/ablation.py                 # the four arms
    python scripts/ablation.py --with-is       # plus rewritten+is and rewritten+is_dft
    python scripts/ablation.py --table-only    # only print the table of existing experiments
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


@click.command()
@click.option("--with-is", is_flag=True, help="also run the importance-sampling arms")
@click.option("--table-only", is_flag=True, help="do not run, only print the table")
def main(with_is: bool, table_only: bool):
    arms = ARMS + (IS_ARMS if with_is else [])
    if not table_only:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        if dirty:
            raise click.ClickException("the git workspace has uncommitted changes: commit them first (each arm is a "
                                       "`dvc exp run` from the current commit, and the workspace is restored after)\n"
                                       + dirty)
        _dvc("repro")  # the shared upstream stages, once (a no-op when up to date)
        for name, data, loss in arms:
            existing = _dvc("exp", "list", "--name-only")
            if name in existing.split():
                _dvc("exp", "remove", name)
            out = _dvc("exp", "run", "-n", name, "-S", f"train.data={data}", "-S", f"train.loss={loss}")
            ran = re.findall(r"Running stage '([^']+)'", out)
            click.echo(f"{name}: ran {', '.join(ran) or 'nothing (all cached)'}", err=True)
        # `dvc exp run` leaves the last arm in the workspace: go back to the committed baseline.
        subprocess.run(["git", "checkout", "HEAD", "--", "."], check=True)
        _dvc("checkout", "--force")
    click.echo(table([a[0] for a in arms]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
