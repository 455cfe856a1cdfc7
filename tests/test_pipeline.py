"""Integration: the whole DAG with `dvc repro`, on a scaled-down world, in a copy of the repo.

Checks that every stage writes its outputs and metrics, that a second `dvc repro` runs nothing,
and that changing a train parameter reruns exactly `train` and `evaluate`.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

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


def _set(params: dict, dotted: str, value) -> None:
    node = params
    *parents, last = dotted.split(".")
    for p in parents:
        node = node[p]
    assert last in node, f"params.yaml has no {dotted}"
    node[last] = value


def _run(cmd, cwd, env):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout + proc.stderr


def _ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("pipeline") / "repo"
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
    for key, value in SMALL.items():
        _set(params, key, value)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DRSFT_LOG": "WARNING"}
    _run(["git", "init", "-q"], dst, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], dst, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy"], dst, env)
    return dst, env


@pytest.fixture(scope="module")
def first_repro(repo):
    dst, env = repo
    out = _run([str(Path(sys.executable).parent / "dvc"), "repro"], dst, env)
    return out


def test_repro_runs_every_stage_and_writes_outputs(repo, first_repro):
    dst, _ = repo
    stages = yaml.safe_load((dst / "dvc.yaml").read_text())["stages"]
    assert _ran_stages(first_repro) == set(stages)
    for name, stage in stages.items():
        for entry in stage.get("outs", []) + stage.get("metrics", []) + stage.get("plots", []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            assert (dst / path).exists(), f"stage {name} did not write {path}"
    for m in (dst / "metrics").glob("*.json"):
        json.loads(m.read_text())
    rewrite = json.loads((dst / "metrics/rewrite.json").read_text())
    train_rows = sum(1 for _ in open(dst / "data/prepare/train.jsonl"))
    assert rewrite["problems"] == train_rows
    assert sum(t["count"] for t in rewrite["tiers"].values()) == rewrite["rows"]
    evaluation = json.loads((dst / "metrics/evaluate.json").read_text())
    assert set(evaluation["benchmarks"]) == set(yaml.safe_load((dst / "params.yaml").read_text())["evaluate"]["benchmarks"])


def test_second_repro_runs_nothing(repo, first_repro):
    dst, env = repo
    out = _run([str(Path(sys.executable).parent / "dvc"), "repro"], dst, env)
    assert _ran_stages(out) == set()
    status = _run([str(Path(sys.executable).parent / "dvc"), "status"], dst, env)
    assert "up to date" in status


def test_train_param_change_reruns_only_train_and_evaluate(repo, first_repro):
    dst, env = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["train"]["lr"] = params["train"]["lr"] * 2
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([str(Path(sys.executable).parent / "dvc"), "repro"], dst, env)
    assert _ran_stages(out) == {"train", "evaluate"}


def test_guided_align_param_change_reruns_only_downstream(repo, first_repro):
    dst, env = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["guided_align"]["max_shared_ngram"] = params["guided_align"]["max_shared_ngram"] + 1
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([str(Path(sys.executable).parent / "dvc"), "repro"], dst, env)
    ran = _ran_stages(out)
    assert {"guided_align"} <= ran <= {"guided_align", "fallback", "train", "evaluate"}, ran


def test_exp_run_with_a_loss_reruns_only_train_and_evaluate(repo, first_repro):
    dst, env = repo
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "params"], dst, env)
    out = _run([str(Path(sys.executable).parent / "dvc"), "exp", "run", "-S", "train.loss=dft"], dst, env)
    assert _ran_stages(out) == {"train", "evaluate"}
    metrics = json.loads((dst / "metrics/train.json").read_text())
    assert metrics["loss"] == "dft"
