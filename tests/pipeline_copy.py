"""Helpers for tests that run the whole DAG with DVC in a scaled-down copy of the repository
(tests/test_pipeline.py, tests/reliability/test_determinism.py)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DVC = str(Path(sys.executable).parent / "dvc")

# Small enough for CI: the stages do their real work on a smaller world and a shorter pretraining.
SMALL = {
    "prepare.toy.n_train": 48,
    "prepare.toy.n_bench": 12,
    "prepare.toy.n_corpus": 400,
    "prepare.pretrain.steps": 40,
    "prepare.probe.n_problems": 16,
    "sample.n": 2,
    "sample.shard_size": 16,
    "guided_align.n": 2,
    "evaluate.k": 2,
    "train.micro_batch_size": 4,
    "train.global_batch_size": 8,
    "train.save_every": 4,
}


def set_param(params: dict, dotted: str, value: Any) -> None:
    node = params
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    assert last in node, f"params.yaml has no {dotted}"
    node[last] = value


def run(cmd, cwd, env) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def expand_stages(dvc_yaml: Mapping, params: Mapping | None = None) -> dict[str, dict]:
    """Every stage of a parsed dvc.yaml by its DVC name: a ``foreach`` entry becomes ``name@key``
    with its ``${item.*}`` filled in (as ``dvc stage list`` names them); with ``params`` (a parsed
    params.yaml) every ``${dotted.key}`` too, as DVC interpolates them."""
    def fill(text: str) -> str:
        if params is None:
            return text

        def value(m):
            node = params
            for part in m.group(1).split("."):
                node = node[part]
            return str(node)

        return re.sub(r"\$\{([A-Za-z_][\w.]*)\}", lambda m: m.group(0) if m.group(1).startswith("item.")
                      else value(m), text)

    out = {}
    for name, stage in dvc_yaml["stages"].items():
        if "foreach" not in stage:
            out[name] = yaml.safe_load(fill(yaml.safe_dump(stage)))
            continue
        for key, item in stage["foreach"].items():
            text = yaml.safe_dump(stage["do"])
            for field, value in item.items():
                text = text.replace("${item.%s}" % field, str(value))
            out[f"{name}@{key}"] = yaml.safe_load(fill(text))
    return out


def stages_of(root: Path) -> dict[str, dict]:
    """:func:`expand_stages` of the dvc.yaml and params.yaml in ``root``."""
    return expand_stages(yaml.safe_load((root / "dvc.yaml").read_text()),
                         yaml.safe_load((root / "params.yaml").read_text()))


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def copy_repo(dst: Path, overrides: Mapping[str, Any] = SMALL) -> dict[str, str]:
    """Copy the repo's tracked and untracked-not-ignored files into ``dst`` (no dvc.lock, no
    metrics), set the dotted ``overrides`` in its params.yaml, make it a git repo with one
    commit; returns the environment to run ``dvc`` in it with."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)
    for stale in ("dvc.lock",):
        (dst / stale).unlink(missing_ok=True)
    shutil.rmtree(dst / "metrics", ignore_errors=True)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    for key, value in overrides.items():
        set_param(params, key, value)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DRSFT_LOG": "WARNING"}
    run(["git", "init", "-q"], dst, env)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dst, env)
    run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], dst, env)
    return env
