"""The real-scale plumbing that can be checked without a GPU (issue #8).

* ``prepare.files.train.subsample`` on GSM8K ("a 50k-problem subset of the first 100k");
* the vLLM data-parallel path: the pure parts (split, reassembly, GPU slices) and the process
  orchestration with a stand-in ``vllm`` package in spawned workers (real vLLM cannot run here);
* ``configs/*.yaml``: overlays of params.yaml (only differing or source-pinned keys) that compose
  into schema-valid params with the paper's values;
* ``train.launcher`` interpolated by DVC into the train stage's command;
* ``drsft use`` / ``make use`` (drsft.config) and ``scripts/gpu_smoke.sh`` (syntax only: unrun here).
"""

import os
import shutil
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from drsft.data import load_benchmark, load_problems, subsample
from drsft.params import ParamsError
from drsft.rollout import (
    SamplingParams,
    dp_gpu_slices,
    dp_reassemble,
    dp_split,
    make_backend,
    visible_gpus,
)

ROOT = Path(__file__).resolve().parents[1]
GSM8K = ROOT.parent / "shared" / "datasets" / "gsm8k_train.jsonl"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
needs_gsm8k = pytest.mark.skipif(not GSM8K.exists(), reason="../shared/datasets/gsm8k_train.jsonl not present")


# ---------------------------------------------------------------------------------------------
# subsample


@needs_gsm8k
def test_subsample_of_the_first_rows_of_gsm8k():
    first = load_problems(GSM8K, problem="question", solution="answer", limit=1000)
    assert len(first) == 1000
    sub = subsample(first, 100, seed=0)
    assert len(sub) == 100 and len({r["id"] for r in sub}) == 100
    positions = [first.index(r) for r in sub]
    assert positions == sorted(positions), "file order is kept"
    assert sub == subsample(first, 100, seed=0), "deterministic for a seed"
    assert sub != subsample(first, 100, seed=1), "another seed, another subset"
    # The subset depends on (row count, k, seed) only, not on the rows' contents.
    renamed = [{**r, "id": f"x{i}"} for i, r in enumerate(first)]
    assert [r["id"] for r in subsample(renamed, 100, seed=0)] == [f"x{p}" for p in positions]
    assert subsample(first, None, seed=0) == first and subsample(first, 1000, seed=3) == first
    for bad in (0, -1, True, 2.5, "50"):
        with pytest.raises(ValueError, match="positive integer"):
            subsample(first, bad, seed=0)
    with pytest.raises(ValueError, match="only 1000 rows"):
        subsample(first, 1001, seed=0)


@needs_gsm8k
def test_prepare_applies_limit_then_subsample(tmp_path, load_stage):
    prepare = load_stage("prepare")
    prep = {"seed": 7, "files": {"train": {"path": str(GSM8K), "problem": "question", "solution": "answer",
                                           "answer": None, "limit": 300, "source": None, "subsample": 40},
                                 "benchmarks": []}}
    train, benchmarks = prepare.file_problems(prep)
    first = load_problems(GSM8K, problem="question", solution="answer", limit=300)
    assert train == subsample(first, 40, seed=7) and benchmarks == {}
    prep["files"]["train"]["subsample"] = None
    assert prepare.file_problems(prep)[0] == first
    prep["files"]["train"]["subsample"] = 301
    with pytest.raises(ParamsError, match=r"prepare\.files\.train\.subsample: subsample=301 but only 300 rows"):
        prepare.file_problems(prep)


# ---------------------------------------------------------------------------------------------
# vLLM data parallel: pure parts


def test_dp_split_and_reassemble_round_trip():
    for n in (0, 1, 5, 16, 17):
        for dp in (1, 2, 3, 8):
            splits = dp_split(n, dp)
            assert len(splits) == dp and sorted(i for s in splits for i in s) == list(range(n))
            assert max(map(len, splits)) - min(map(len, splits)) <= 1, "balanced"
            parts = [[f"r{i}" for i in s] for s in splits]
            assert dp_reassemble(parts, splits, n) == [f"r{i}" for i in range(n)]
    assert dp_split(5, 2) == [[0, 2, 4], [1, 3]]  # round-robin: sorted inputs spread evenly
    with pytest.raises(ValueError, match="data_parallel_size"):
        dp_split(4, 0)
    splits = dp_split(5, 2)
    with pytest.raises(ValueError, match="rank 1 returned 1 results for 2 prompts"):
        dp_reassemble([["a", "b", "c"], ["d"]], splits, 5)
    with pytest.raises(ValueError, match="assigned twice"):
        dp_reassemble([["a", "b"], ["c", "d"]], [[0, 1], [1, 2]], 3)
    with pytest.raises(ValueError, match="exactly once"):
        dp_reassemble([["a"], ["b"]], [[0], [1]], 3)


def test_dp_gpu_slices(monkeypatch):
    assert dp_gpu_slices(4, 2, [str(i) for i in range(8)]) == [["0", "1"], ["2", "3"], ["4", "5"], ["6", "7"]]
    assert dp_gpu_slices(2, 1, ["3", "5", "7"]) == [["3"], ["5"]]  # ids as the parent sees them
    with pytest.raises(ValueError, match=r"3 x 2 = 6 GPUs, but only 4 are visible"):
        dp_gpu_slices(3, 2, ["0", "1", "2", "3"])
    with pytest.raises(ValueError, match=">= 1"):
        dp_gpu_slices(1, 0, ["0"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,GPU-abc")
    assert visible_gpus() == ["2", "3", "GPU-abc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


# ---------------------------------------------------------------------------------------------
# vLLM data parallel: orchestration with a stand-in vllm package in spawned workers

FAKE_VLLM = '''
"""Stand-in for vllm (tests only): outputs are a pure function of (prompt ids, seed), like seeded
vLLM requests up to kernel numerics; n > 1 samples use seed + j (vLLM's ParentRequest)."""
import json, os


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class LLM:
    def __init__(self, **kw):
        gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
        if gpus == os.environ.get("FAKE_VLLM_FAIL_GPUS"):
            raise RuntimeError("CUDA out of memory (fake)")
        log = os.environ.get("FAKE_VLLM_LOG")
        if log:
            with open(os.path.join(log, f"{os.getpid()}.json"), "w") as f:
                json.dump({"gpus": gpus, "kw": kw}, f)

    def generate(self, inputs, sampling_params, use_tqdm=False):
        # progress as vLLM's LLM._run_engine reports it to a tqdm-like factory: the request list may be
        # wrapped, then per finished request the elapsed time is read (format_dict), the postfix set,
        # update(<samples of the request>) called and n compared with the number of requests
        pbar = None
        if callable(use_tqdm):
            inputs = list(use_tqdm(inputs, desc="Adding requests"))
            pbar = use_tqdm(total=len(inputs), desc="Processed prompts", dynamic_ncols=True, postfix="0 toks/s")
        outs = []
        for inp, sp in zip(inputs, sampling_params):
            comps = []
            for j in range(sp.n):
                s = sp.seed + j + sum(inp["prompt_token_ids"])
                length = 1 + s % sp.max_tokens
                ids = [3 + (s >> k) % 40 for k in range(length)]
                lps = [{t: _Obj(logprob=-((s + k) % 7) / 7 - 0.01)} for k, t in enumerate(ids)]
                comps.append(_Obj(index=j, token_ids=ids, logprobs=lps,
                                  finish_reason="length" if length == sp.max_tokens else "stop"))
            outs.append(_Obj(outputs=comps[::-1]))
            if pbar is not None:
                speed = sum(len(c.token_ids) for c in comps) / pbar.format_dict["elapsed"]
                pbar.postfix = f"est. speed output: {speed:.2f} toks/s"
                pbar.update(len(comps))
                if pbar.n == len(inputs):
                    pbar.refresh()
        if pbar is not None:
            pbar.close()
        return outs
'''


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    pkg = tmp_path / "fakevllm" / "vllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VLLM)
    monkeypatch.syspath_prepend(str(pkg.parent))  # spawned workers get the parent's sys.path
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    log = tmp_path / "vllm-log"
    log.mkdir()
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5")
    yield log
    sys.modules.pop("vllm", None)


class _Bar:
    """A progress bar that records its updates."""

    def __init__(self):
        self.updates = []

    def update(self, n):
        self.updates.append(n)

    def set_postfix(self, **kwargs):
        pass


def test_vllm_data_parallel_workers_match_one_engine(fake_vllm, tiny_model_dir, prompt_cfg):
    from drsft.models import load_tokenizer
    from drsft.prompts import render_prompt

    tok = load_tokenizer(tiny_model_dir)
    problems = [f"Compute ${a} + {b}$." for a in range(4) for b in range(3)] + ["Compute $1 + 1$."] * 3
    prompts = [render_prompt(tok, p, prompt_cfg) for p in problems]  # repeats: distinct seeds per occurrence
    sp = SamplingParams(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=11)

    one = make_backend("vllm", str(tiny_model_dir), tensor_parallel_size=1, data_parallel_size=1)
    bar = _Bar()
    ref = one.generate(prompts, sp, progress=bar)
    assert sum(bar.updates) == len(prompts) * sp.n and bar.updates[-1] == 0   # counted inside vLLM's loop
    bar = _Bar()   # greedy: one decode per prompt, copied n times; the bar counts the n copies
    one.generate(prompts, SamplingParams(n=3, temperature=0.0, max_new_tokens=6, seed=11), progress=bar)
    assert sum(bar.updates) == len(prompts) * 3 and bar.updates[-1] == 0
    assert [len(cs) for cs in ref] == [3] * len(prompts)
    assert len({tuple(c.token_ids) for c in ref[-3]}) > 1 or ref[-3][0].token_ids != ref[-2][0].token_ids
    assert [c.token_ids for c in ref[-1]] != [c.token_ids for c in ref[-2]], "repeated prompt, other seeds"

    for dp, tp in ((2, 1), (3, 2)):
        for f in fake_vllm.iterdir():
            f.unlink()
        be = make_backend("vllm", str(tiny_model_dir), tensor_parallel_size=tp, data_parallel_size=dp)
        procs = list(be.pool.procs)
        assert len(procs) == dp and all(p.is_alive() for p in procs), "one persistent worker per rank"
        try:
            bar = _Bar()
            got = be.generate(prompts, sp, progress=bar)
            assert got == ref, f"dp={dp}: results must not depend on the data-parallel size"
            # the workers' finished requests reach the caller's bar while they run (at least one message
            # per rank: the 0.5 s throttle flushes when a rank's call ends), nothing is left after them
            assert sum(bar.updates) == len(prompts) * sp.n and bar.updates[-1] == 0 and len(bar.updates) > dp
            few = be.generate(prompts[:1], sp)  # fewer prompts than ranks: idle ranks are skipped
            assert few == ref[:1]
        finally:
            be.close()
        seen = [yaml.safe_load(f.read_text()) for f in sorted(fake_vllm.iterdir())]
        assert sorted(s["gpus"] for s in seen) == [",".join(str(g) for g in range(r * tp, (r + 1) * tp))
                                                    for r in range(dp)]
        assert all(s["kw"]["logprobs_mode"] == "raw_logprobs" and s["kw"]["tensor_parallel_size"] == tp
                   for s in seen)
        assert not any(p.is_alive() for p in procs) and all(p.exitcode == 0 for p in procs), "close() stops them"


def test_vllm_data_parallel_reports_a_worker_that_fails_to_start(fake_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("FAKE_VLLM_FAIL_GPUS", "2,3")
    with pytest.raises(RuntimeError, match=r"failed to start:\nrank 1 \(GPUs 2,3\): RuntimeError: CUDA out of memory"):
        make_backend("vllm", str(tiny_model_dir), tensor_parallel_size=2, data_parallel_size=2)
    with pytest.raises(ValueError, match="only 6 are visible"):
        make_backend("vllm", str(tiny_model_dir), tensor_parallel_size=4, data_parallel_size=2)


# ---------------------------------------------------------------------------------------------
# configs/*.yaml


def _key_paths(node, prefix=""):
    out = set()
    if isinstance(node, dict):
        for k, v in node.items():
            p = f"{prefix}.{k}" if prefix else str(k)
            out |= {p} | _key_paths(v, p)
    return out


def _composed(name):
    from drsft.config import load_composed

    return load_composed(ROOT / "configs" / name, ROOT / "params.yaml")


def _leaves(node, prefix=""):
    """{dotted key: (value, line)} of a ruamel round-trip mapping's non-mapping values."""
    out = {}
    for k, v in node.items():
        p = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_leaves(v, p))
        else:
            out[p] = (v, node.lc.key(k)[0])
    return out


def test_configs_are_overlays_that_compose_into_valid_params():
    """Each config lists only keys of params.yaml whose values differ, or that pin a published value
    (a [paper]/[code]/[verl]/[qwen-eval] tag on the key's line), and composes into valid params."""
    import re

    from ruamel.yaml import YAML

    assert {c.name for c in CONFIGS} >= {"qwen2.5-math-7b.yaml", "llama-3.1-8b-instruct.yaml"}
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    ref = _key_paths(base)
    tag = re.compile(r"#.*\[(paper|code|verl|qwen-eval)\]")
    for path in CONFIGS:
        text = path.read_text()
        assert _key_paths(yaml.safe_load(text)) <= ref
        for key, (value, line) in _leaves(YAML().load(text)).items():
            node = base
            for part in key.split("."):
                node = node[part]
            plain = list(value) if isinstance(value, list) else value
            assert plain != node or tag.search(text.splitlines()[line]), \
                f"{path.name}: {key} repeats params.yaml's value without a published source"
    res = subprocess.run([sys.executable, "-m", "drsft", "check", *map(str, CONFIGS)],
                         capture_output=True, text=True, cwd=ROOT, check=False)
    assert res.returncode == 0, res.stderr + res.stdout
    assert res.stdout.count(": ok") == len(CONFIGS)


def test_compose_merges_mappings_replaces_values_and_names_unknown_keys():
    from drsft.config import compose

    base = {"a": {"x": 1, "y": [1, 2]}, "b": "s"}
    assert compose(base, {"a": {"y": [3]}}) == {"a": {"x": 1, "y": [3]}, "b": "s"}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": "s"}        # unchanged
    with pytest.raises(ParamsError) as err:
        compose(base, {"a": {"z": 1, "x": {"deep": 1}}, "c": 2})
    assert str(err.value).splitlines() == [
        "a.z: not a key of the params it overlays (a typo, or a key params.yaml lacks)",
        "a.x: a single value in the params it overlays, a mapping here",
        "c: not a key of the params it overlays (a typo, or a key params.yaml lacks)"]


@pytest.mark.parametrize("name,model", [("qwen2.5-math-7b.yaml", "Qwen/Qwen2.5-Math-7B"),
                                        ("llama-3.1-8b-instruct.yaml", "meta-llama/Llama-3.1-8B-Instruct")])
def test_configs_carry_the_papers_settings(name, model):
    cfg = _composed(name)
    assert cfg["model"]["base"] == model
    t = cfg["train"]
    assert (t["lr"], t["epochs"], t["global_batch_size"], t["micro_batch_size"], t["max_length"], t["zero_stage"]) \
        == (5.0e-5, 1, 256, 4, 2048, 3)
    assert t["launcher"].startswith("deepspeed --hostfile hostfile")
    tr = cfg["prepare"]["files"]["train"]
    assert cfg["prepare"]["source"] == "files" and (tr["limit"], tr["subsample"]) == (100000, 50000)
    assert (t["warmup_ratio"], t["grad_clip"], t["weight_decay"], t["adam_betas"]) == (0.1, 1.0, 0.01, [0.9, 0.95])
    # the paper code's trainer and dataset (docs/parity.md): each option at its behaviour, set in the
    # overlay itself (not inherited from a default that may change), and its two GPUs
    own = yaml.safe_load((ROOT / "configs" / name).read_text())["train"]
    paper = {"loss_norm": "micro_batch_token_mean_sum", "prompt_format": "question", "response_end": "eos",
             "weight_decay_1d": True, "drop_last": True, "lr_schedule": "verl"}
    assert {k: own.get(k) for k in paper} == paper
    assert "--num_gpus 2" in t["launcher"] and t["global_batch_size"] == 2 * t["micro_batch_size"] * 32
    ev = cfg["evaluate"]
    assert (ev["k"], ev["temperature"], ev["top_p"], ev["max_new_tokens"]) == (16, 1.0, 1.0, 4096)
    assert cfg["verify"]["mode"] == "paper" and cfg["prepare"]["files"]["train"]["answer"] is None
    names = ["math500", "minerva_math", "olympiadbench", "aime24", "amc23"]
    assert ev["benchmarks"] == names and [b["name"] for b in cfg["prepare"]["files"]["benchmarks"]] == names
    assert cfg["rollout"]["backend"] == "vllm" and cfg["rollout"]["data_parallel_size"] * \
        cfg["rollout"]["tensor_parallel_size"] == 8
    # Every input lies in the declared inputs folder, and the benchmark files the config names are the
    # five published ones (here in ../shared/benchmarks; a user copies them into data/external/benchmarks).
    root = cfg["prepare"]["files"]["root"]
    assert root == "data/external" and cfg["prepare"]["files"]["train"]["path"].startswith(root + "/")
    for b in cfg["prepare"]["files"]["benchmarks"]:
        assert b["path"] == f"{root}/benchmarks/{b['name']}.jsonl"
        published = ROOT.parent / "shared" / "benchmarks" / f"{b['name']}.jsonl"
        if published.exists():
            assert load_benchmark(b["name"], str(published))


def test_config_prompts_render_the_papers_user_turns():
    from drsft.prompts import user_message

    assert "instruction" in yaml.safe_load((ROOT / "configs" / "qwen2.5-math-7b.yaml").read_text())["prompt"]
    qwen = _composed("qwen2.5-math-7b.yaml")["prompt"]
    llama = _composed("llama-3.1-8b-instruct.yaml")["prompt"]
    # qwen-boxed: system "You are a helpful assistant.", user "{input}\nPlease reason step by step, ..."
    assert qwen["system"] == "You are a helpful assistant."
    assert user_message("1+1?", qwen) == "1+1?\nPlease reason step by step, and put your final answer within \\boxed{}."
    # the paper's Llama-3.1-8B-Instruct prompt: no system message, "{question}\nLet's think step by step ..."
    assert not llama["system"]
    assert user_message("1+1?", llama) == "1+1?\nLet's think step by step and output the final answer within \\boxed{}."


# ---------------------------------------------------------------------------------------------
# train.launcher in dvc.yaml


def test_dvc_interpolates_the_launcher_into_the_train_command(tmp_path, monkeypatch):
    from dvc.repo import Repo

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["train"]["cmd"] == "PYTHONPATH=src ${train.launcher} stages/train.py"
    for params, expected in ((ROOT / "params.yaml", "PYTHONPATH=src python stages/train.py"),
                             (ROOT / "configs" / "qwen2.5-math-7b.yaml",
                              "PYTHONPATH=src deepspeed --hostfile hostfile --num_gpus 2 stages/train.py")):
        work = tmp_path / params.stem
        work.mkdir()
        Repo.init(str(work), no_scm=True).close()
        shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
        composed = _composed(params.name) if params.parent.name == "configs" else yaml.safe_load(params.read_text())
        (work / "params.yaml").write_text(yaml.safe_dump(composed, sort_keys=False))
        monkeypatch.chdir(work)  # DVC reads the default params file from the working directory
        with Repo(str(work)) as repo:
            assert repo.stage.collect("train")[0].cmd == expected


# ---------------------------------------------------------------------------------------------
# make use


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True)


def test_use_composes_validates_and_refuses_dirty_or_composed_params(tmp_path):
    work = tmp_path / "repo"
    (work / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    for c in CONFIGS:
        shutil.copy(c, work / "configs" / c.name)
    _git(work, "init", "-q")
    _git(work, "add", "-A")
    _git(work, "commit", "-qm", "base")
    script = [sys.executable, "-m", "drsft", "use"]

    def use(cfg):
        return subprocess.run([*script, cfg], cwd=work, capture_output=True, text=True, check=False)

    (work / "bad.yaml").write_text(yaml.safe_dump({"train": {"lrr": 1e-5, "lr": -1.0}}))
    res = use("bad.yaml")
    assert res.returncode == 1 and "bad.yaml: train.lrr: not a key of the params it overlays" in res.stderr
    (work / "bad.yaml").write_text(yaml.safe_dump({"train": {"lr": -1.0}}))
    res = use("bad.yaml")
    assert res.returncode == 1 and "bad.yaml: train.lr:" in res.stderr, res.stderr
    assert (work / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()

    (work / "params.yaml").write_text((work / "params.yaml").read_text() + "\n# local edit\n")
    res = use("configs/qwen2.5-math-7b.yaml")
    assert res.returncode == 1 and "uncommitted changes" in res.stderr
    _git(work, "checkout", "params.yaml")

    res = use("configs/qwen2.5-math-7b.yaml")
    assert res.returncode == 0, res.stderr
    from drsft.params import load_params

    assert load_params(work / "params.yaml") == _composed("qwen2.5-math-7b.yaml")
    _git(work, "add", "params.yaml")
    _git(work, "commit", "-qm", "qwen")        # even committed, a composition is not a base for another overlay
    res = use("configs/llama-3.1-8b-instruct.yaml")
    assert res.returncode == 1 and "already composed from configs/qwen2.5-math-7b.yaml" in res.stderr
    _git(work, "checkout", "HEAD~1", "--", "params.yaml")  # back to the embedded world
    assert (work / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_gpu_smoke_script_parses():
    script = ROOT / "scripts" / "gpu_smoke.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text and "UNRUN" in text


@pytest.mark.parametrize("model", ["toy", "files"])
def test_gpu_smoke_params_pass_the_schema(model, tmp_path):
    """The smoke script rewrites params.yaml for its tiny run: that file must pass the schema, for
    the toy model and for a small real one (GSM8K + MATH500 from ../shared), so a params change
    cannot break the script unnoticed until the next GPU session."""
    env = {**os.environ, "DRSFT_SMOKE_CPU": "1", "DRSFT_SMOKE_PARAMS_ONLY": "1", "PY": sys.executable,
           "TMPDIR": str(tmp_path), "DRSFT_SMOKE_MODEL": "toy" if model == "toy" else str(tmp_path / "model")}
    out = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "smoke params: OK" in out.stdout
    assert not list(tmp_path.glob("drsft-gpu-smoke.*")), "the throw-away copy was not removed"


def test_local_inputs_must_lie_in_the_declared_inputs_folder():
    """prepare depends on prepare.files.root (dvc.yaml), so a local input elsewhere could change
    without prepare rerunning: the schema refuses it, naming the key; a pinned hub id is exempt."""
    from drsft.schema import check

    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    files = data["prepare"]["files"]
    data["prepare"]["source"], data["model"]["base"] = "files", "some/model"
    data["evaluate"]["benchmarks"] = ["math500"]
    files["benchmarks"] = [{"name": "math500", "path": "data/external/benchmarks/math500.jsonl"}]
    assert check(data) == []
    files["benchmarks"][0]["path"] = "../shared/benchmarks/math500.jsonl"
    files["train"]["path"] = "data/external/../../elsewhere.jsonl"
    problems = dict(check(data))
    assert set(problems) == {"prepare.files.train.path", "prepare.files.benchmarks[0].path"}
    assert "is outside prepare.files.root ('data/external')" in problems["prepare.files.train.path"]
    files["train"]["path"] = "AI-MO/NuminaMath-CoT@0123abc#train"
    files["root"] = "../shared"
    assert check(data) == []
    files["root"] = "data"
    assert "contains prepare's own output data/prepare" in dict(check(data))["prepare.files.root"]
    data["prepare"]["source"], data["model"]["base"] = "toy", "toy"  # unused by the embedded world
    data["evaluate"]["benchmarks"] = ["toy_arith"]
    assert check(data) == []


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_scale_sim_runs_the_cpu_stages_on_well_formed_records(tmp_path, fmt):
    """bench/scale_sim.py at a tiny size: its synthetic records pass every reader's checks, each
    stage runs, and every problem reaches the training set (self_align or fallback)."""
    out = tmp_path / "sim.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale_sim.py"), "--problems", "40", "--n", "3",
                           "--tokens", "30", "--shard-size", "15", "--max-length", "256", "--budget", "600",
                           "--format", fmt, "--workdir", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dtype = "float16" if fmt == "parquet" else "in full"      # parquet: the paper configs' float16 log-probs
    assert proc.stdout.strip().splitlines()[-1].startswith(f"records on disk ({fmt}, log-probs {dtype}): ")
    assert {f.suffix for f in (tmp_path / "w" / "data" / "sample").iterdir()} == {f".{fmt}"}
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        for f in ("sample/shard-00000", "self_align/selected", "train/rewritten", "train/expert"):
            schema = pq.read_schema(tmp_path / "w" / "data" / f"{f}.parquet")
            assert {schema.field(c).type.value_type for c in schema.names if c.endswith("logprobs")} == {pa.float16()}
    assert (tmp_path / "w" / "data" / "train" / f"rewritten.{fmt}").exists()
    res = json.loads(out.read_text())
    assert res["samples"] == 120 and res["verify"]["samples"] == 120
    assert set(res["stages"]) == {"generate", "verify", "self_align", "fallback", "train_load"}
    assert res["self_align"]["solved"] + res["self_align"]["unsolved"] == 40
    assert res["train_load"]["rows"] == 40 and res["train_load"]["padding_share"] == 0.0
    assert 0 < res["records_gib"] < 0.01 and all(v["seconds"] >= 0 for v in res["stages"].values())
