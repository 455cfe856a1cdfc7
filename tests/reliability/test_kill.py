"""Faults: a real ``kill -9`` of ``sample``, ``guided_align``, ``train`` and ``evaluate``, then a rerun.

Each stage script runs as a subprocess (in its own process group) on tiny inputs built here with
the ``tiny_model_dir`` fixture, with ``--params`` pointing to a tmp params file and every path
given explicitly, so nothing in the repository is touched. The test polls the output folder and
sends SIGKILL to the group as soon as the first finished shard / checkpoint is on disk, then
checks that

* every shard file present after the kill is complete (atomic writes: a killed write leaves at
  most a dot-prefixed ``.tmp`` file that the shard pattern does not match);
* the rerun reuses the finished work (same inode and mtime of each shard that existed at the
  kill, the "resuming: N of M" log line; for train the checkpoint step in ``resumed_from_steps``);
* the final outputs and metrics are byte-identical to an uninterrupted run's with the same params
  and seed (what each invocation did and how long it took is written beside the metrics);
* no temporary file is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = ROOT / "stages"
sys.path.insert(0, str(ROOT / "src"))

from drsft.io import read_json, read_jsonl, write_jsonl  # noqa: E402
from drsft.evaluate import check_generation_rows  # noqa: E402
from drsft.rollout import check_sample_records  # noqa: E402

N_PROBLEMS = 16      # shard_size 1: 16 shards, ~1 s of generation, so a kill lands mid-run
N_SAMPLES = 2
TRAIN_ROWS = 32      # global batch 4, 2 epochs: 16 optimizer steps, a checkpoint after each



# ----------------------------------------------------------------------------------------------
# Inputs


def _problems():
    rows = []
    for i in range(N_PROBLEMS):
        a, b = i % 12, (5 * i + 3) % 12
        rows.append({"id": f"p{i:02d}", "problem": f"Compute ${a} + {b}$.",
                     "solution": f"We add: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}.",
                     "answer": str(a + b), "source": "arith"})
    return rows


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, prompt_cfg):
    """Params (the repo's params.yaml, scaled down), problems, unsolved ids and a train file."""
    from transformers import AutoTokenizer

    from drsft.prompts import encode_response, render_prompt

    work = tmp_path_factory.mktemp("kill_inputs")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prompt"].update(prompt_cfg)
    params["sample"].update(n=N_SAMPLES, max_new_tokens=32, shard_size=1, seed=0)
    params["guided_align"].update(n=N_SAMPLES, max_new_tokens=32, shard_size=1, seed=0)
    params["verify"].update(workers=1)
    params["rollout"].update(backend="hf", batch_size=16, dtype="auto")
    params["train"].update(data="rewritten", loss="is", zero_stage=2, epochs=2, micro_batch_size=2,
                           global_batch_size=4, max_length=96, save_every=1, seed=0)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    problems = _problems()
    write_jsonl(work / "problems.jsonl", problems)
    write_jsonl(work / "unsolved.jsonl", ({"problem_id": p["id"]} for p in problems))

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for i in range(TRAIN_ROWS):
        p = problems[i % N_PROBLEMS]
        ids = encode_response(tok, p["solution"])
        beh = [-0.5 - 0.1 * (j % 3) for j in range(len(ids))] if i % 2 == 0 else None
        rows.append({"problem_id": f"{p['id']}-{i}", "tier": "self" if beh else "fallback",
                     "prompt": render_prompt(tok, p["problem"], prompt_cfg), "response": p["solution"],
                     "response_ids": ids, "behaviour_logprobs": beh, "plain_logprobs": [-1.0] * len(ids),
                     "behaviour": "sampled" if beh else "unknown"})
    write_jsonl(work / "train.jsonl", rows)
    return {"dir": work, "params": work / "params.yaml", "problems": work / "problems.jsonl",
            "unsolved": work / "unsolved.jsonl", "train": work / "train.jsonl", "model": tiny_model_dir}


# ----------------------------------------------------------------------------------------------
# Running and killing a stage


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               DRSFT_LOG="INFO", PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _cmd(script: str, args: list) -> list[str]:
    return [sys.executable, str(STAGES / script), *map(str, args)]


def _run(script: str, args: list, cwd: Path) -> str:
    proc = subprocess.run(_cmd(script, args), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stderr[-6000:]}"
    return proc.stderr


def _kill_when(script: str, args: list, cwd: Path, ready: Callable[[], bool], timeout: float = 240) -> None:
    """Start the stage, SIGKILL its process group as soon as ``ready()`` (polled every 5 ms)."""
    with open(cwd / f"{script}.killed.log", "w") as log:
        proc = subprocess.Popen(_cmd(script, args), cwd=cwd, env=_env(), stdout=log, stderr=log,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                if ready():
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    tail = (cwd / f"{script}.killed.log").read_text()[-3000:]
    assert proc.returncode == -signal.SIGKILL, (
        f"{script} was not killed mid-run (exit {proc.returncode}): it finished before the first shard/"
        f"checkpoint was seen, or failed:\n{tail}")


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _run_info(metrics_path: Path) -> dict:
    """What one invocation did (resumed / generated work, timings): beside its metrics (drsft.io)."""
    return read_json(metrics_path.parent / "runs" / metrics_path.name)


def _shard_ids(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("shard-*.jsonl")}


def _check_complete_shards(folder: Path, problems: list[dict], shard_size: int, n: int) -> list[str]:
    """Every ``shard-*.jsonl`` present is a whole shard: parses and holds exactly its problems' samples."""
    names = sorted(p.name for p in folder.glob("shard-*.jsonl"))
    for name in names:
        i = int(name[len("shard-"):-len(".jsonl")])
        ids = [p["id"] for p in problems[i * shard_size:(i + 1) * shard_size]]
        check_sample_records(ids, n, read_jsonl(folder / name))
    return names


def _sharded_kill_and_resume(script: str, work: Path, args_for: Callable[[str], list], shard_dir_for,
                             metrics_for, outputs_for, inputs) -> None:
    """Uninterrupted run; killed run; rerun. Shared by sample and guided_align."""
    problems = read_jsonl(inputs["problems"])
    _run(script, args_for("ref"), work)

    shards = shard_dir_for("run")
    _kill_when(script, args_for("run"), work, lambda: any(shards.glob("shard-*.jsonl")))
    done = _check_complete_shards(shards, problems, 1, N_SAMPLES)
    assert done and len(done) < N_PROBLEMS, f"killed after {len(done)} of {N_PROBLEMS} shards"
    before = _shard_ids(shards)

    log = _run(script, args_for("run"), work)
    assert f"resuming: {len(done)} of {N_PROBLEMS} shards already done" in log, log[-3000:]
    after = _shard_ids(shards)
    assert all(after[name] == before[name] for name in before), "a finished shard was rewritten"
    run = _run_info(metrics_for("run"))
    assert run["resumed_shards"] == len(done) and run["generated_shards"] == N_PROBLEMS - len(done)

    for ref, run in zip(outputs_for("ref"), outputs_for("run")):
        assert _tree(run) == _tree(ref), f"{run} differs from the uninterrupted run's {ref}"
        assert _temp_files(run) == []
    assert read_json(metrics_for("run")) == read_json(metrics_for("ref"))


# ----------------------------------------------------------------------------------------------
# The stages


def test_sample_killed_resumes_and_equals_uninterrupted_run(tmp_path, inputs):
    def args(name):
        return ["--params", inputs["params"], "--problems", inputs["problems"], "--model", inputs["model"],
                "--out", tmp_path / name, "--metrics", tmp_path / f"{name}.json", "--no-progress"]

    _sharded_kill_and_resume("sample.py", tmp_path, args, lambda name: tmp_path / name,
                             lambda name: tmp_path / f"{name}.json", lambda name: [tmp_path / name], inputs)


def test_guided_align_killed_resumes_and_equals_uninterrupted_run(tmp_path, inputs):
    def args(name):
        return ["--params", inputs["params"], "--problems", inputs["problems"], "--unsolved", inputs["unsolved"],
                "--model", inputs["model"], "--out", tmp_path / name, "--metrics", tmp_path / f"{name}.json",
                "--no-progress"]

    _sharded_kill_and_resume("guided_align.py", tmp_path, args, lambda name: tmp_path / name / "shards",
                             lambda name: tmp_path / f"{name}.json", lambda name: [tmp_path / name], inputs)
    # the outputs fallback reads are there, and resolves.jsonl holds every re-solve with its status
    resolves = read_jsonl(tmp_path / "run" / "resolves.jsonl")
    assert len(resolves) == N_PROBLEMS * N_SAMPLES and all("status" in r and "correct" in r for r in resolves)
    assert (tmp_path / "run" / "selected.jsonl").exists() and (tmp_path / "run" / "unsolved.jsonl").exists()


def test_train_killed_resumes_from_checkpoint_and_equals_uninterrupted_run(tmp_path, inputs):
    def args(name):
        return ["--params", inputs["params"], "--data", inputs["train"], "--model", inputs["model"],
                "--out", tmp_path / f"{name}_model", "--checkpoints", tmp_path / f"{name}_ckpt",
                "--metrics", tmp_path / f"{name}.json", "--live-dir", tmp_path / f"{name}_live"]

    _run("train.py", args("ref"), tmp_path)
    ref = read_json(tmp_path / "ref.json")
    total = ref["steps"]
    assert total == TRAIN_ROWS // 4 * 2

    ckpt = tmp_path / "run_ckpt"
    # DeepSpeed writes `latest` after the tag's files: its presence means one whole checkpoint.
    _kill_when("train.py", args("run"), tmp_path, lambda: (ckpt / "latest").exists())
    latest = (ckpt / "latest").read_text().strip()
    step = int(latest.split("-")[1])
    assert 1 <= step < total, f"killed at checkpoint {latest} of {total} steps"
    assert (ckpt / latest).is_dir()
    assert not (tmp_path / "run_model").exists() and not (tmp_path / "run.json").exists()

    log = _run("train.py", args("run"), tmp_path)
    assert f"at optimizer step {step}/{total}" in log, log[-3000:]
    assert _run_info(tmp_path / "run.json")["resumed_from_steps"] == [step]
    # The trained model, byte for byte (weights, config, tokenizer), the metrics and the loss history.
    assert _tree(tmp_path / "run_model") == _tree(tmp_path / "ref_model")
    assert read_json(tmp_path / "run.json") == ref

    def losses(live):
        rows = (live / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
        head = rows[0].split("\t")
        return [(r.split("\t")[head.index("step")], r.split("\t")[head.index("loss")]) for r in rows[1:]]

    assert losses(tmp_path / "run_live") == losses(tmp_path / "ref_live")
    # Only the last checkpoint is left, and no temporary file anywhere.
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == [f"step-{total:06d}"]
    assert _temp_files(tmp_path) == []


def test_evaluate_killed_resumes_and_equals_uninterrupted_run(tmp_path, inputs):
    """evaluate generates and verifies each benchmark in fingerprinted shards: a kill after the first
    shard loses only the unfinished ones, and predictions and metrics equal an uninterrupted run's."""
    params = yaml.safe_load(inputs["params"].read_text())
    params["evaluate"].update(benchmarks=["toy_arith"], k=N_SAMPLES, max_new_tokens=32, shard_size=1, greedy=True,
                              n_boot=200)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bench = tmp_path / "benchmarks"
    bench.mkdir()
    (bench / "toy_arith.jsonl").write_bytes(inputs["problems"].read_bytes())
    problems = read_jsonl(inputs["problems"])

    def args(name):
        return ["--params", tmp_path / "params.yaml", "--model", inputs["model"], "--benchmarks-dir", bench,
                "--out", tmp_path / name, "--metrics", tmp_path / f"{name}.json", "--no-progress"]

    _run("evaluate.py", args("ref"), tmp_path)
    shards = tmp_path / "run" / "shards" / "toy_arith"
    _kill_when("evaluate.py", args("run"), tmp_path, lambda: any(shards.glob("shard-*.jsonl")))
    done = sorted(p.name for p in shards.glob("shard-*.jsonl"))
    assert done and len(done) < N_PROBLEMS, f"killed after {len(done)} of {N_PROBLEMS} shards"
    for name in done:   # each is a whole shard: its problem's k samples and greedy row
        i = int(name[len("shard-"):-len(".jsonl")])
        check_generation_rows([problems[i]["id"]], N_SAMPLES, True, read_jsonl(shards / name))
    assert not (tmp_path / "run.json").exists()
    before = _shard_ids(shards)

    log = _run("evaluate.py", args("run"), tmp_path)
    assert f"resuming: {len(done)} of {N_PROBLEMS} shards already done" in log, log[-3000:]
    after = _shard_ids(shards)
    assert all(after[name] == before[name] for name in before), "a finished shard was rewritten"
    assert _tree(tmp_path / "run") == _tree(tmp_path / "ref")
    assert read_json(tmp_path / "run.json") == read_json(tmp_path / "ref.json")
    assert _temp_files(tmp_path / "run") == []
    preds = read_jsonl(tmp_path / "run" / "toy_arith.jsonl")
    assert len(preds) == N_PROBLEMS * (N_SAMPLES + 1)
