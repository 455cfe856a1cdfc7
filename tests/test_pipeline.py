"""Integration: the whole DAG with `dvc repro`, on a scaled-down world, in a copy of the repo.

Checks that every stage writes its outputs and metrics, that a second `dvc repro` runs nothing,
that changing a param reruns exactly the stages it affects (a train param: `train` and
`evaluate@trained`); `make ablation`'s script queues arms x seeds and writes metrics/ablation.json,
and with a base model per seed (--worlds) runs each world's shared stages once.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_copy import DVC, copy_repo, ran_stages as _ran_stages, stages_of, run as _run  # noqa: E402
from drsft.experiments import _walk  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    dst = tmp_path_factory.mktemp("pipeline") / "repo"
    return dst, copy_repo(dst)


@pytest.fixture(scope="module")
def first_repro(repo):
    dst, env = repo
    out = _run([DVC, "repro"], dst, env)
    return out


def test_repro_runs_every_stage_and_writes_outputs(repo, first_repro):
    dst, _ = repo
    stages = stages_of(dst)
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
    assert sum(t["count"] for t in rewrite["tiers"].values()) == rewrite["problems"]
    assert sum(t["rows"] for t in rewrite["tiers"].values()) == rewrite["rows"]
    families = {json.loads(line)["source"] for line in open(dst / "data/prepare/train.jsonl")}
    assert set(rewrite["gap_by_family"]) == families
    assert sum(f["rewritten"]["rows"] for f in rewrite["gap_by_family"].values()) == rewrite["rows"]
    probe = json.loads((dst / "metrics/probe.json").read_text())["world"]
    assert all({"nll_guided_correct", "guided_correct_samples", "nll_expert_guided_problems"} <= set(f)
               for f in probe["families"].values())
    assert sum(f["guided_correct_samples"] for f in probe["families"].values()) == probe["guided_correct_samples"]
    evaluation = json.loads((dst / "metrics/evaluate.json").read_text())
    assert set(evaluation["benchmarks"]) == set(yaml.safe_load((dst / "params.yaml").read_text())["evaluate"]["benchmarks"])


def test_second_repro_runs_nothing(repo, first_repro):
    dst, env = repo
    out = _run([DVC, "repro"], dst, env)
    assert _ran_stages(out) == set()
    status = _run([DVC, "status"], dst, env)
    assert "up to date" in status


def test_guided_align_param_change_reruns_only_downstream(repo, first_repro):
    dst, env = repo
    params = yaml.safe_load((dst / "params.yaml").read_text())
    params["guided_align"]["max_shared_ngram"] = params["guided_align"]["max_shared_ngram"] + 1
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run([DVC, "repro"], dst, env)
    ran = _ran_stages(out)
    assert {"guided_align"} <= ran <= {"guided_align", "fallback", "train", "evaluate@trained"}, ran


def test_exp_run_with_a_loss_reruns_only_train_and_evaluate(repo, first_repro):
    """A train param changed (the README's arm command) reruns train and evaluate@trained only."""
    dst, env = repo
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "params", "--allow-empty"], dst, env)
    out = _run([DVC, "exp", "run", "-S", "train.loss=dft"], dst, env)
    assert _ran_stages(out) == {"train", "evaluate@trained"}
    metrics = json.loads((dst / "metrics/train.json").read_text())
    assert metrics["loss"] == "dft"


def test_ablation_queues_arms_and_seeds_runs_only_train_and_evaluate_and_writes_intervals(repo, first_repro):
    """`make ablation`'s script with --no-worlds: one of the arms (--arms; the four differ only in
    train.data and train.loss, composed by experiment_groups, unit-tested) x two training seeds on the
    workspace's base model as queued `dvc exp run`s, the workspace left as it was, metrics/ablation.json with intervals and the paired
    comparison of that arm with the base model, the table printed."""
    dst, env = repo
    # as a user's checkout: metrics/ and dvclive/ (cache: false outputs) are in git, which is all
    # that a queued experiment's snapshot holds
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "outputs"], dst, env)
    params_before = (dst / "params.yaml").read_text()
    arms = ("dr-dft",)
    proc = subprocess.run([sys.executable, "-m", "drsft", "ablation", "--no-worlds", "--seeds", "2", "--n-boot", "300",
                           *[a for arm in arms for a in ("--arms", arm)], "--plots", "abl_plots"],
                          cwd=dst, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ran = dict(re.findall(r"^(\S+): ran (.*)$", proc.stderr, re.M))
    assert set(ran) == {f"{a}-s{s}" for a in arms for s in (0, 1)}, proc.stderr[-3000:]
    for name, stages in ran.items():   # upstream stages always come from the cache
        assert stages == "nothing (all cached)" or set(stages.split(", ")) <= {"train", "evaluate@trained"}, \
            (name, stages)
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows[1:3]] == ["base model", *arms], proc.stdout
    assert all(" ± " in r for r in rows[1:3])
    summary = json.loads((dst / "metrics/ablation.json").read_text())
    assert summary["seeds"] == [0, 1]
    assert summary["arms"]["base"]["seeds"] == 1 and summary["arms"]["dr-dft"]["seeds"] == 2
    # each seed is its own training run: the experiments' train metrics differ between seeds
    show = subprocess.run([DVC, "exp", "show", "--json"], cwd=dst, env=env, capture_output=True, text=True,
                          timeout=300)
    found = {}
    _walk(json.loads(show.stdout), found)
    loss = {n: found[n][1]["metrics"]["metrics/train.json"]["data"]["final_loss"] for n in ("dr-dft-s0", "dr-dft-s1")}
    assert loss["dr-dft-s0"] != loss["dr-dft-s1"], loss
    assert summary["world"] and set(summary["world"]) <= {"nll_expert", "nll_own_correct", "nll_ratio_expert_to_own",
                                                          "solve_rate", "headroom_families"}
    assert len(summary["arms"]["dr-dft"]["per_seed"]) == 2
    for a in summary["arms"].values():
        assert a["avg_at_k_ci"][0] <= a["avg_at_k"] <= a["avg_at_k_ci"][1]
    assert set(summary["comparisons"]) == {"dr-dft_vs_base"}   # the paper's pairs whose arms both ran
    # the base row is the workspace's evaluate_base
    base = json.loads((dst / "metrics/evaluate_base.json").read_text())
    assert summary["arms"]["base"]["avg_at_k"] == pytest.approx(base["average"]["avg_at_k"])
    shown = _run([DVC, "metrics", "show", "metrics/ablation.json"], dst, env)
    assert "ablation.json" in shown
    assert (dst / "abl_plots" / "index.html").exists()
    assert (dst / "params.yaml").read_text() == params_before   # queued runs do not touch the workspace


def test_ablation_with_worlds_pretrains_a_model_per_seed_once_and_restores_the_workspace(repo, first_repro):
    """`--worlds` (the default for the toy model): seed 0 keeps the workspace's base model, seed 1
    pretrains its own (prepare.pretrain.seed) and runs the stages its arms share once, in the
    workspace; the queued arms then run only train and evaluate@trained (stages with persisted outputs
    are outside DVC's run cache: without this each arm would rerun sample, guided_align and
    fallback); the workspace is left as it was. The base model has a row per world, the worlds'
    checks are in the summary. A dirty params.yaml, which the restore would lose, is refused before
    anything runs."""
    dst, env = repo
    _run(["git", "add", "-A"], dst, env)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "outputs", "--allow-empty"], dst, env)
    params = (dst / "params.yaml").read_text()
    cmd = [sys.executable, "-m", "drsft", "ablation", "--arms", "dr-dft", "--seeds", "2", "--n-boot", "200",
           "--tag", "w"]
    (dst / "params.yaml").write_text(params + "\n# an uncommitted edit\n")
    proc = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "uncommitted changes" in proc.stderr, proc.stderr[-3000:]
    assert "queued" not in proc.stderr
    (dst / "params.yaml").write_text(params)

    proc = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ran = dict(re.findall(r"^(\S+)(?: \(the shared stages, in the workspace\))?: ran (.*)$", proc.stderr, re.M))
    assert set(ran) == {"shared-w-w1", "dr-dft-w-w0", "dr-dft-w-w1"}, proc.stderr[-3000:]
    assert {"prepare", "sample", "evaluate@base"} <= set(ran["shared-w-w1"].split(", ")), ran
    for name in ("dr-dft-w-w0", "dr-dft-w-w1"):
        assert ran[name] == "nothing (all cached)" or set(ran[name].split(", ")) <= {"train", "evaluate@trained"}, ran
    assert (dst / "params.yaml").read_text() == params
    status = _run(["git", "status", "--porcelain"], dst, env)
    assert status.split() == ["??", "metrics/ablation-w.json"], status
    assert "up to date" in _run([DVC, "status"], dst, env)
    summary = json.loads((dst / "metrics/ablation-w.json").read_text())
    assert summary["vary_world"] is True and summary["seeds"] == [0, 1]
    assert summary["arms"]["base"]["seeds"] == 2 and summary["arms"]["dr-dft"]["seeds"] == 2
    c = summary["comparisons"]["dr-dft_vs_base"]
    assert len(c["per_world"]) == 2 and c["world_ci"] and c["ci"][0] <= min(c["diff_ci"][0], c["world_ci"][0])
    seed0 = yaml.safe_load(params)["prepare"]["seed"]
    assert [w["pretrain_seed"] for w in summary["worlds"]] == [seed0, seed0 + 1]
    assert all(isinstance(w["checks"], dict) and w["probe"]["solve_rate"] is not None and w["rewrite_tiers"]
               for w in summary["worlds"])
    show = subprocess.run([DVC, "exp", "show", "--json"], cwd=dst, env=env, capture_output=True, text=True, timeout=300)
    found = {}
    _walk(json.loads(show.stdout), found)
    assert found["dr-dft-w-w1"][1]["params"]["params.yaml"]["data"]["prepare"]["pretrain"]["seed"] == seed0 + 1
    loss = [found[n][1]["metrics"]["metrics/prepare.json"]["data"]["model"]["pretrain"]["loss_final"]
            for n in ("dr-dft-w-w0", "dr-dft-w-w1")]
    assert loss[0] != loss[1], loss   # two pretraining runs, two base models
