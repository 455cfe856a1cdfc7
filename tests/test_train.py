"""Tests of the train stage: pure helpers in-process, real DeepSpeed runs in subprocesses.

The DeepSpeed runs (CPU accelerator, gloo) use the ``stages/train.py`` entry point exactly as DVC
does, on a 40-row training file built from the ``tiny_model_dir`` fixture:
  * one process, ZeRO-2, ``is`` loss -> the reference run;
  * two processes (torchrun --nproc_per_node 2), same global batch -> same losses and weights;
  * a run stopped by ``--max-steps`` after a checkpoint, then rerun -> resumes, bitwise-equal weights;
  * the other losses and ZeRO stages 0/1/3 in one process sharing a checkpoint folder (each run
    must discard the previous run's checkpoints: its fingerprint differs).
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from drsft.io import DataError, read_json, write_jsonl
from drsft.params import ParamsError
from drsft.train import (Example, accumulation_steps, batch_plan, check_packing, collate, collate_packed,
                         deepspeed_config, forward_logprobs, load_examples, lr_factor, micro_batch_tokens,
                         micro_slots, run_fingerprint, skip_shm_comm_build, token_slots, validate_config,
                         warmup_steps_for)

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "train.py"

TRAIN_CFG = {
    "data": "rewritten", "loss": "is", "loss_norm": "global_token_mean", "prompt_format": "sampling",
    "response_end": "end_of_turn", "weight_decay_1d": False, "drop_last": False, "lr_schedule": "drsft", "is_clip": [0.0, 2.0], "is_level": "token", "zero_stage": 2,
    "lr": 3.0e-3, "epochs": 1, "micro_batch_size": 3, "global_batch_size": 12, "max_length": 96,
    "warmup_ratio": 0.25, "weight_decay": 0.01, "adam_betas": [0.9, 0.999], "grad_clip": 1.0, "lora": {"r": 0, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}, "save_every": 2,
    "seed": 0, "gradient_checkpointing": False, "packing": False, "logprob_chunk": 1024, "attn_implementation": "auto", "batching": "rows",
    "max_tokens_per_micro_batch": 4096,
}
N_ROWS = 40          # 4 optimizer steps of 12, 12, 12, 4 rows: the last global batch is short


# ----------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def train_file(tiny_model_dir, prompt_cfg, tmp_path_factory):
    """40 training rows: self/guided rows with (perturbed) behaviour log-probs from scoring,
    fallback/expert rows with null; two rows long enough to be truncated at max_length=96."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drsft.prompts import encode_response, render_prompt
    from drsft.scoring import score_responses

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tiers = ["self", "guided", "fallback", "expert"]
    prompts, responses, ids = [], [], []
    for i in range(N_ROWS):
        a, b = i % 12, (5 * i + 3) % 12
        prompts.append(render_prompt(tok, f"Compute ${a} + {b}$.", prompt_cfg))
        text = f"We add: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        if i in (7, 20):
            text = " ".join([f"We add: {a} + {b} = {a + b}."] * 4) + f" The answer is \\boxed{{{a + b}}}."
        responses.append(text)
        ids.append(encode_response(tok, text))
    scored = score_responses(model, tok, prompts, ids)
    rows = []
    for i in range(N_ROWS):
        tier = tiers[i % 4]
        if tier == "self":       # ratio e^{+-0.8} alternating: some tokens clipped at 2
            beh = [min(0.0, lp + (0.8 if j % 2 else -0.8)) for j, lp in enumerate(scored[i])]
        elif tier == "guided":
            beh = [lp - 0.3 for lp in scored[i]]
        else:
            beh = None
        rows.append({"problem_id": f"p{i:03d}", "tier": tier, "prompt": prompts[i], "response": responses[i],
                     "response_ids": ids[i], "behaviour_logprobs": beh, "plain_logprobs": scored[i],
                     "behaviour": {"self": "sampled", "guided": "guided"}.get(tier, "unknown")})
    path = tmp_path_factory.mktemp("train_data") / "rewritten.jsonl"
    write_jsonl(path, rows)
    return path


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _write_params(path: Path, **overrides) -> Path:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())   # stages validate the whole file
    params["train"].update({**TRAIN_CFG, **overrides})
    path.write_text(yaml.safe_dump(params))
    return path


def _run_stage(workdir: Path, params: Path, data: Path, model: Path, name: str, nproc: int = 1,
               extra: tuple = ()) -> subprocess.CompletedProcess:
    args = ["--params", str(params), "--data", str(data), "--model", str(model),
            "--out", str(workdir / f"{name}_model"), "--checkpoints", str(workdir / f"{name}_ckpt"),
            "--metrics", str(workdir / f"{name}_metrics.json"), "--live-dir", str(workdir / f"{name}_live"), *extra]
    if nproc == 1:
        cmd = [sys.executable, str(STAGE), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(STAGE), *args]
    proc = subprocess.run(cmd, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-6000:]}"
    return proc


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, train_file):
    """Reference single-process run (kept for several tests)."""
    work = tmp_path_factory.mktemp("train_runs")
    params = _write_params(work / "params.yaml")
    proc = _run_stage(work, params, train_file, tiny_model_dir, "single")
    return {"work": work, "params": params, "single": proc}


# ----------------------------------------------------------------------------------------------
# Pure helpers


def test_validate_config_schema_errors():
    cfg = validate_config({**TRAIN_CFG, "loss": "dft", "lr": 1, "launcher": "deepspeed --num_gpus 8"})
    assert cfg["loss"] == "dft" and cfg["lr"] == 1.0 and isinstance(cfg["lr"], float) and "launcher" not in cfg
    with pytest.raises(ParamsError, match=r"train\.seed: missing required key"):
        validate_config({k: v for k, v in TRAIN_CFG.items() if k != "seed"})
    for bad, key in [({"loss": "ppo"}, "train.loss"), ({"zero_stage": 4}, "train.zero_stage"),
                     ({"is_clip": [3, 1]}, "train.is_clip"), ({"micro_batch_size": 0}, "train.micro_batch_size"),
                     ({"lr": -1.0}, "train.lr"), ({"data": "other"}, "train.data"), ({"epochs": 1.5}, "train.epochs"),
                     ({"typo_key": 1}, "train.typo_key"), ({"is_level": "batch"}, "train.is_level"),
                     ({"adam_betas": [0.9, 1.0]}, "train.adam_betas"), ({"adam_betas": [0.9]}, "train.adam_betas"),
                     ({"adam_betas": "0.9,0.95"}, "train.adam_betas")]:
        with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
            validate_config({**TRAIN_CFG, **bad})


def test_optimizer_takes_lr_betas_and_decays_matrices_only(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from drsft.train import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = build_optimizer(model, validate_config({**TRAIN_CFG, "adam_betas": [0.9, 0.95]}))
    decay, no_decay = opt.param_groups
    assert decay["betas"] == no_decay["betas"] == (0.9, 0.95) and decay["lr"] == TRAIN_CFG["lr"]
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_accumulation_steps_and_deepspeed_config():
    assert accumulation_steps(32, 8, 1) == 4 and accumulation_steps(32, 8, 2) == 2
    with pytest.raises(ParamsError, match=r"global_batch_size \(32\) must be a multiple of .*micro_batch_size \(8\) "
                                          r"x world size \(3\) = 24"):
        accumulation_steps(32, 8, 3)
    cfg = validate_config({**TRAIN_CFG, "zero_stage": 3, "micro_batch_size": 2, "global_batch_size": 8,
                           "grad_clip": 0.5})
    ds = deepspeed_config(cfg, world_size=2, on_gpu=False)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert ds["bf16"]["enabled"] is False and ds["zero_force_ds_cpu_optimizer"] is False
    assert deepspeed_config(cfg, 1, on_gpu=True)["bf16"]["enabled"] is True
    # ZeRO-2 partitions gradients over ranks: on one rank it runs as ZeRO-1; other stages run as set
    runs = {(stage, world): deepspeed_config({**cfg, "zero_stage": stage}, world, on_gpu=False)["zero_optimization"]["stage"]
            for stage in range(4) for world in (1, 2)}
    assert runs == {(0, 1): 0, (0, 2): 0, (1, 1): 1, (1, 2): 1, (2, 1): 1, (2, 2): 2, (3, 1): 3, (3, 2): 3}


def test_cpu_runs_skip_deepspeeds_shared_memory_op_build():
    """DeepSpeed's CPU backend would JIT-compile its inference-only shm all-reduce op (~45 s per
    new venv path); after skip_shm_comm_build its own builder hook hands back no op."""
    import deepspeed
    from deepspeed.comm.torch import build_shm_op

    assert skip_shm_comm_build(deepspeed) is True
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False
    assert build_shm_op() is None


def test_lr_schedule_warmup_then_cosine():
    total, warm = 10, warmup_steps_for(10, 0.2)
    f = [lr_factor(s, total, warm) for s in range(total)]
    assert warm == 2 and f[:3] == [0.5, 1.0, 1.0]
    assert all(a > b for a, b in zip(f[2:], f[3:])) and 0 < f[-1] < 0.05
    assert f[2 + 4] == pytest.approx(0.5)          # half-way through the cosine
    assert lr_factor(0, 5, 0) == 1.0


def test_batch_plan_is_deterministic_and_covers_every_row_each_epoch():
    plan = batch_plan(10, 4, 2, seed=3, drop_last=False)
    assert plan == batch_plan(10, 4, 2, seed=3, drop_last=False) and plan != batch_plan(10, 4, 2, seed=4, drop_last=False)
    assert [len(b) for b in plan] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(plan[:3], [])) == list(range(10)) and sorted(sum(plan[3:], [])) == list(range(10))
    assert sum(plan[:3], []) != sum(plan[3:], [])            # a new order each epoch


def test_micro_slots_partition_global_batch_over_ranks():
    g = list(range(100, 112))
    r0 = micro_slots(g, 3, 2, 2, 0)
    r1 = micro_slots(g, 3, 2, 2, 1)
    assert r0 == [[100, 101, 102], [106, 107, 108]] and r1 == [[103, 104, 105], [109, 110, 111]]
    short = [1, 2, 3, 4]
    assert micro_slots(short, 3, 2, 2, 0) == [[1, 2, 3], []] and micro_slots(short, 3, 2, 2, 1) == [[4], []]
    assert sum(micro_slots(g, 3, 4, 1, 0), []) == g


def test_collate_aligns_targets_mask_and_behaviour():
    a = Example("a", "self", [1, 2, 3, 10, 11], 3, [-0.5, -0.25])
    b = Example("b", "expert", [1, 2, 20, 21, 22, 23], 2, None)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 10, 11, 0], [1, 2, 20, 21, 22, 23]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert batch["labels"].tolist() == [[2, 3, 10, 11, 0], [2, 20, 21, 22, 23]]
    # column t predicts labels[t]; the mask marks exactly the response tokens
    assert batch["mask"].tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]
    assert batch["behaviour"][0].tolist() == [0, 0, -0.5, -0.25, 0]
    assert batch["known"].tolist() == [True, False]
    assert batch["input_tokens"] == 11
    dummy = collate([a], pad_id=0, dummy=True)
    assert dummy["mask"].sum() == 0 and dummy["input_tokens"] == 0


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_token_slots_cover_every_row_once_within_the_budget(packed, world):
    import random

    rnd = random.Random(world)
    lengths = [rnd.randint(5, 90) for _ in range(64)]
    gidx = list(range(3, 51))
    plan = token_slots(gidx, lengths, 120, world, packed)
    assert plan == token_slots(gidx, lengths, 120, world, packed) and len(plan) == world
    assert len({len(p) for p in plan}) == 1                      # ranks pair their backward passes
    rows = [i for p in plan for slot in p for i in slot]
    assert sorted(rows) == gidx                                   # each row exactly once
    assert all(micro_batch_tokens([lengths[i] for i in slot], packed) <= 120 for p in plan for slot in p)
    loads = [sum(lengths[i] for slot in p for i in slot) for p in plan]
    assert max(loads) - min(loads) <= max(lengths[i] for i in gidx)   # balanced (greedy, longest first)
    assert micro_batch_tokens([3, 5], True) == 8 and micro_batch_tokens([3, 5], False) == 10
    assert token_slots([7], lengths, 120, 2, packed) == [[[7]], [[]]]


def test_token_budget_must_hold_the_longest_row():
    with pytest.raises(ParamsError, match=r"max_tokens_per_micro_batch: must be >= train\.max_length \(96\)"):
        validate_config({**TRAIN_CFG, "batching": "tokens", "max_tokens_per_micro_batch": 95})
    validate_config({**TRAIN_CFG, "batching": "rows", "max_tokens_per_micro_batch": 95})


def test_collate_packed_concatenates_rows_and_maps_targets_back():
    a = Example("a", "self", [1, 2, 3, 10, 11], 3, [-0.5, -0.25])
    b = Example("b", "expert", [1, 2, 20, 21, 22, 23], 2, None)
    batch = collate_packed([a, b], pad_id=0)
    assert batch["packed_ids"].tolist() == [[1, 2, 3, 10, 11, 1, 2, 20, 21, 22, 23]]
    assert batch["packed_positions"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]]
    assert batch["packed_labels"].tolist() == [[2, 3, 10, 11, 1, 2, 20, 21, 22, 23]]
    # padded target (i, t) -> packed target; a's last token (which would predict b's first) is never used
    assert batch["unpack"].tolist() == [[0, 1, 2, 3, 0], [5, 6, 7, 8, 9]]
    labels = batch["packed_labels"][0][batch["unpack"]]
    m = batch["mask"].bool()
    assert torch.equal(labels[m], collate([a, b], pad_id=0)["labels"][m])
    assert batch["input_tokens"] == 11 and batch["tiers"] == ["self", "expert"]


def _train_rows(path: Path, tok, n: int) -> list:
    from drsft.train import load_examples

    examples, _ = load_examples(path, tok, 96, len(tok))
    return examples[:n]


@pytest.mark.parametrize("kind,level", [("sft", "token"), ("dft", "token"), ("is", "token"), ("is", "sequence"),
                                        ("is_dft", "token"), ("is_dft", "sequence")])
def test_packed_batch_gives_the_padded_batch_loss_and_gradients(kind, level, tiny_model_dir, train_file):
    """Rows of different lengths (two truncated at max_length) as one packed sequence: the loss and
    every parameter's gradient equal the right-padded batch's (float32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drsft.losses import weighted_nll

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = _train_rows(train_file, tok, 9)
    assert len({len(e.input_ids) for e in rows}) > 3 and any(e.behaviour is not None for e in rows)
    results = []
    for packed in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        batch = (collate_packed if packed else collate)(rows, tok.pad_token_id)
        logp = forward_logprobs(model, batch, "cpu", packed)
        out = weighted_nll(logp, batch["mask"], kind, batch["behaviour"], batch["known"], is_clip=[0.0, 2.0],
                           is_level=level, normaliser=123.0)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5, atol=1e-6)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], rtol=1e-4, atol=1e-6), name


def test_check_packing_catches_a_model_whose_rows_see_each_other(tiny_model_dir, train_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    rows = _train_rows(train_file, tok, 2)
    assert check_packing(model, rows, tok.pad_token_id, "cpu", tol=1e-3) < 1e-4

    class IgnoresPositions(torch.nn.Module):   # modelling code that builds its own plain causal mask
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    with pytest.raises(RuntimeError, match="does not confine packed rows"):
        check_packing(IgnoresPositions(model), rows, tok.pad_token_id, "cpu", tol=1e-3)


def test_fingerprint_tracks_params_data_model_and_world_size(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n')
    cfg = validate_config(TRAIN_CFG)
    base = run_fingerprint(cfg, data, tiny_model_dir, str(tiny_model_dir), 1)["hash"]
    assert run_fingerprint(cfg, data, tiny_model_dir, str(tiny_model_dir), 1)["hash"] == base
    assert run_fingerprint({**cfg, "save_every": 7}, data, tiny_model_dir, str(tiny_model_dir), 1)["hash"] == base
    assert run_fingerprint({**cfg, "lr": 1e-5}, data, tiny_model_dir, str(tiny_model_dir), 1)["hash"] != base
    for key, value in (("adam_betas", [0.9, 0.95]), ("loss", "sft"), ("weight_decay", 0.0), ("is_clip", [0.0, 3.0]),
                       ("max_length", 64), ("seed", 1), ("epochs", 2), ("global_batch_size", 24)):
        assert run_fingerprint({**cfg, key: value}, data, tiny_model_dir, str(tiny_model_dir), 1)["hash"] != base, key
    assert run_fingerprint(cfg, data, tiny_model_dir, str(tiny_model_dir), 2)["hash"] != base
    assert run_fingerprint(cfg, data, tmp_path / "hub-id", "org/model", 1)["hash"] != base
    data.write_text('{"a": 2}\n')
    assert run_fingerprint(cfg, data, tiny_model_dir, str(tiny_model_dir), 1)["hash"] != base


def test_load_examples_truncates_drops_and_names_bad_fields(tmp_path, tiny_model_dir, prompt_cfg):
    from transformers import AutoTokenizer

    from drsft.prompts import encode_prompt, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = render_prompt(tok, "Compute $1 + 2$.", prompt_cfg)
    plen = len(encode_prompt(tok, prompt))
    good = {"problem_id": "p", "tier": "self", "prompt": prompt, "response": "x", "response_ids": [5, 6, 7, 8],
            "behaviour_logprobs": [-1.0, -2.0, -3.0, -4.0]}
    path = tmp_path / "t.jsonl"
    write_jsonl(path, [good, {**good, "tier": "expert", "behaviour_logprobs": None}])
    ex, st = load_examples(path, tok, plen + 2, len(tok))
    assert [e.n_response for e in ex] == [2, 2] and st.truncated == 2 and st.known_behaviour == 1
    assert ex[0].input_ids == encode_prompt(tok, prompt) + [5, 6] and ex[0].behaviour == [-1.0, -2.0]
    assert ex[1].behaviour is None
    with pytest.raises(DataError, match="no usable training rows"):
        load_examples(path, tok, plen, len(tok))
    for bad, field in [({"tier": "teacher"}, "tier"), ({"response_ids": [5, 10 ** 6]}, "response_ids"),
                       ({"response_ids": []}, "response_ids"), ({"behaviour_logprobs": [-1.0]}, "behaviour_logprobs"),
                       ({"behaviour_logprobs": [-1.0, 0.5, -1, -1]}, "behaviour_logprobs"),
                       ({"prompt": None}, "prompt")]:
        write_jsonl(path, [good, {**good, **bad}])
        with pytest.raises(DataError, match=rf"t\.jsonl:2: field '{field}'"):
            load_examples(path, tok, 512, len(tok))


def test_train_data_self_reads_the_self_tier_of_the_rewritten_set(train_file, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from drsft.train import data_file, data_tiers

    assert data_file(tmp_path, "self", "parquet") == data_file(tmp_path, "rewritten", "parquet")
    assert data_tiers("self") == {"self"} and data_tiers("rewritten") is None and data_tiers("expert") is None
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    every, _ = load_examples(train_file, tok, 96, len(tok))
    own, st = load_examples(train_file, tok, 96, len(tok), tiers=data_tiers("self"))
    assert {e.tier for e in own} == {"self"} and len(own) == N_ROWS // 4 == st.rows - st.other_tiers
    assert [e.input_ids for e in own] == [e.input_ids for e in every if e.tier == "self"]


# ----------------------------------------------------------------------------------------------
# DeepSpeed runs


def test_single_process_run_outputs(runs, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = runs["work"]
    m = read_json(work / "single_metrics.json")
    assert m["steps"] == 4 and m["examples"] == N_ROWS and m["truncated"] == 2 and m["world_size"] == 1
    assert (m["zero_stage"], m["zero_stage_run"]) == (2, 1)
    run = read_json(work / "runs" / "single_metrics.json")   # timings beside the metrics, not in them
    assert m["gradient_accumulation_steps"] == 4 and run["resumed_from_steps"] == []
    assert math.isfinite(m["final_loss"]) and math.isfinite(m["mean_loss"]) and run["tokens_per_s"] > 0
    assert not {"train_time_s", "tokens_per_s", "resumed_from_steps"} & set(m)
    w = m["weights"]
    assert set(w) == {"all", "self", "guided", "fallback", "expert"}
    assert 0 < w["self"]["clip_frac"] < 1 and w["self"]["weight_max"] <= 2.0 + 1e-6
    assert w["guided"]["weight_mean"] > 1.0 and w["guided"]["weight_max"] <= 2.0 + 1e-6   # ratio >= e^0.3 at start
    assert w["expert"]["clip_frac"] is None and w["expert"]["weight_max"] < 1.0   # DFT fallback weight p
    assert sum(w[t]["rows"] for t in ("self", "guided", "fallback", "expert")) == N_ROWS
    # per-step dvclive logs (4 steps) with per-tier weight statistics
    live = work / "single_live" / "plots" / "metrics"
    assert len((live / "train" / "loss.tsv").read_text().splitlines()) == 1 + 4
    for name in ("lr", "grad_norm", "nll"):
        assert (live / "train" / f"{name}.tsv").exists()
    assert (live / "weights" / "self" / "clip_frac.tsv").exists()
    assert not (work / "dvc.yaml").exists()
    # checkpoint folder: only the latest tag, plus the fingerprint
    ckpt = work / "single_ckpt"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000004"]
    assert (ckpt / "fingerprint.json").exists() and (ckpt / "latest").read_text().strip() == "step-000004"
    # (3) the final folder loads like any HF model, and training changed it
    model = AutoModelForCausalLM.from_pretrained(work / "single_model")
    tok = AutoTokenizer.from_pretrained(work / "single_model")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([tok("Compute $1 + 2$.")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    diff = max((p - q).abs().max().item() for p, q in zip(model.parameters(), base.parameters()))
    assert diff > 1e-4


def test_two_processes_match_single_process(runs, tiny_model_dir, train_file):
    """(1) ZeRO-2 in two CPU processes (gloo) with the same global batch = the 1-process run (ZeRO-2
    set, run as ZeRO-1 on its single rank)."""
    work = runs["work"]
    _run_stage(work, runs["params"], train_file, tiny_model_dir, "dual", nproc=2)
    one = read_json(work / "single_metrics.json")
    two = read_json(work / "dual_metrics.json")
    assert two["world_size"] == 2 and two["gradient_accumulation_steps"] == 2 and two["zero_stage_run"] == 2
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
    assert two["mean_loss"] == pytest.approx(one["mean_loss"], rel=1e-5)
    assert two["response_tokens"] == one["response_tokens"] and two["input_tokens"] == one["input_tokens"]
    assert two["weights"]["self"]["clip_frac"] == pytest.approx(one["weights"]["self"]["clip_frac"])
    loss1 = (work / "single_live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    loss2 = (work / "dual_live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    assert [float(r.split("\t")[1]) for r in loss2] == pytest.approx([float(r.split("\t")[1]) for r in loss1], rel=1e-5)
    a, b = _weights(work / "single_model"), _weights(work / "dual_model")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert len(list((work / "dual_ckpt" / "step-000004").glob("zero_pp_rank_*_optim_states.pt"))) == 2


def test_loss_is_the_token_mean_over_the_global_batch_whatever_the_micro_batches(runs, tiny_model_dir, train_file):
    """The same global batch of 12 rows in 4 micro-batches of 3 (the reference run) or in 1 of 12
    gives the same training: normalising per micro-batch instead would weigh the rows of short
    micro-batches more."""
    work = runs["work"]
    params = _write_params(work / "params_micro12.yaml", micro_batch_size=12)
    _run_stage(work, params, train_file, tiny_model_dir, "micro12")
    one, ref = read_json(work / "micro12_metrics.json"), read_json(work / "single_metrics.json")
    assert one["gradient_accumulation_steps"] == 1 and ref["gradient_accumulation_steps"] == 4
    assert one["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)
    a, b = _weights(work / "single_model"), _weights(work / "micro12_model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_packed_two_process_run_matches_the_padded_run(runs, tiny_model_dir, train_file):
    """train.packing: ZeRO-2 over two processes with packed micro-batches trains as the padded
    single-process reference run (same global batches), and the stage checks the packing first."""
    work = runs["work"]
    params = _write_params(work / "params_packed.yaml", packing=True)
    proc = _run_stage(work, params, train_file, tiny_model_dir, "packed", nproc=2)
    assert "packing: packed rows match rows alone" in proc.stderr
    one, packed = read_json(work / "single_metrics.json"), read_json(work / "packed_metrics.json")
    assert packed["world_size"] == 2 and packed["input_tokens"] == one["input_tokens"]
    assert packed["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    assert packed["weights"]["self"]["clip_frac"] == pytest.approx(one["weights"]["self"]["clip_frac"], abs=1e-3)
    a, b = _weights(work / "single_model"), _weights(work / "packed_model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


# Padded token batches share everything but the collate with these (the collates are compared above).
@pytest.mark.parametrize("packing,zero,nproc", [(True, 2, 2), (True, 3, 1)])
def test_token_budget_batches_train_as_the_row_batches(packing, zero, nproc, runs, tiny_model_dir, train_file):
    """batching: tokens (micro-batches of at most 100 tokens: a varying number per rank and step,
    empty ones where a rank has fewer; ZeRO-2 over two processes, ZeRO-3 in one) trains on the same
    global batches as the reference run, with the same result."""
    work = runs["work"]
    name = f"tokens{int(packing)}z{zero}"
    params = _write_params(work / f"params_{name}.yaml", packing=packing, batching="tokens",
                           max_tokens_per_micro_batch=100, zero_stage=zero)
    _run_stage(work, params, train_file, tiny_model_dir, name, nproc=nproc)
    one, tok = read_json(work / "single_metrics.json"), read_json(work / f"{name}_metrics.json")
    assert tok["batching"] == "tokens" and tok["micro_batches_per_step"] > 2
    assert tok["response_tokens"] == one["response_tokens"] and tok["input_tokens"] == one["input_tokens"]
    assert tok["final_loss"] == pytest.approx(one["final_loss"], rel=1e-4)
    assert tok["mean_loss"] == pytest.approx(one["mean_loss"], rel=1e-4)
    assert tok["padding_share"] < one["padding_share"] or packing is False
    a, b = _weights(work / "single_model"), _weights(work / f"{name}_model")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_kill_and_resume_replays_remaining_batches_exactly(runs, tiny_model_dir, train_file):
    """(2) Stop after 3 steps (checkpoint at step 2), rerun: resumes at step 2, equal weights."""
    work = runs["work"]
    first = _run_stage(work, runs["params"], train_file, tiny_model_dir, "resume", extra=("--max-steps", "3"))
    assert "stopped at max_steps=3" in first.stderr
    assert not (work / "resume_model").exists() and not (work / "resume_metrics.json").exists()
    assert (work / "resume_ckpt" / "latest").read_text().strip() == "step-000002"
    # A kill while the next checkpoint was being saved: a tag folder that `latest` does not name.
    partial = work / "resume_ckpt" / "step-000003"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half-written")
    second = _run_stage(work, runs["params"], train_file, tiny_model_dir, "resume")
    assert "interrupted while being saved" in second.stderr and not partial.exists()
    assert "resumed from" in second.stderr and "at optimizer step 2/4" in second.stderr
    m = read_json(work / "resume_metrics.json")
    ref = read_json(work / "single_metrics.json")
    assert read_json(work / "runs" / "resume_metrics.json")["resumed_from_steps"] == [2]
    assert m["final_loss"] == ref["final_loss"] and m["mean_loss"] == ref["mean_loss"]
    a, b = _weights(work / "single_model"), _weights(work / "resume_model")
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    # the dvclive history holds each step once (rows logged after the checkpoint were replaced)
    steps = [r.split("\t")[0] for r in (work / "resume_live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]]
    assert steps == ["0", "1", "2", "3"]


def test_all_loss_kinds_and_zero_stages_run(runs, tiny_model_dir, train_file):
    """(4) sft (with gradient checkpointing)/dft/is_dft (+ sequence level) with ZeRO 0, 1 and 3, one process calling train()
    three times with one checkpoint folder: each run discards the previous run's checkpoints."""
    work = runs["work"]
    script = f"""
import json, logging, sys
logging.basicConfig(level=logging.INFO)
from drsft.train import train
cfg = json.loads(sys.argv[1])
out = {{}}
for kind, stage, level in [("sft", 0, "token"), ("dft", 1, "token"), ("is_dft", 3, "sequence")]:
    m = train({{**cfg, "loss": kind, "zero_stage": stage, "is_level": level, "gradient_checkpointing": stage == 0}}, {str(train_file)!r},
              {str(tiny_model_dir)!r}, {str(work)!r} + "/kinds_" + kind, {str(work)!r} + "/kinds_ckpt",
              None, live_dir=None)
    out[kind] = m
print("RESULT" + json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(TRAIN_CFG)], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert proc.stderr.count("checkpoints are from a different run") == 2
    for kind, m in res.items():
        assert m["steps"] == 4 and math.isfinite(m["final_loss"]) and m["resumed_from_steps"] == []
        assert (work / f"kinds_{kind}" / "model.safetensors").exists()
    assert res["sft"]["weights"]["all"]["weight_mean"] == pytest.approx(1.0)
    assert res["sft"]["final_loss"] == pytest.approx(res["sft"]["final_nll"])
    assert 0 < res["dft"]["weights"]["all"]["weight_max"] < 1.0
    assert res["dft"]["final_loss"] < res["dft"]["final_nll"]
    w = res["is_dft"]["weights"]
    assert w["self"]["weight_max"] <= 2.0 + 1e-6 and w["expert"]["clip_frac"] is None
    assert w["self"]["clip_frac"] is not None and w["self"]["rows"] == N_ROWS // 4


def test_attention_implementation_auto_picks_flash_attention_for_packed_gpu_runs(monkeypatch):
    import importlib.util

    from drsft.params import ParamsError
    from drsft.train import attention_implementation

    real = importlib.util.find_spec

    def spec(has_fa):
        return lambda name, *a: (object() if has_fa else None) if name == "flash_attn" else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", spec(True))
    assert attention_implementation("auto", True, True) == "flash_attention_2"
    assert attention_implementation("auto", True, False) is None       # padded rows: SDPA
    assert attention_implementation("auto", False, True) is None       # CPU
    assert attention_implementation("flash_attention_2", True, False) == "flash_attention_2"
    assert attention_implementation("sdpa", True, True) == "sdpa" and attention_implementation("eager", False, True) == "eager"
    monkeypatch.setattr(importlib.util, "find_spec", spec(False))
    assert attention_implementation("auto", True, True) is None
    with pytest.raises(ParamsError, match="flash-attn package"):
        attention_implementation("flash_attention_2", True, True)
    with pytest.raises(ParamsError, match="CUDA GPU"):
        attention_implementation("flash_attention_2", False, True)


def test_the_engine_loads_the_model_with_the_chosen_attention(monkeypatch, tiny_model_dir):
    import transformers

    from drsft import train as T

    seen = {}

    class Loaded(Exception):
        pass

    def fake(path, **kwargs):
        seen.clear()
        seen.update(kwargs)
        raise Loaded

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", staticmethod(fake))
    cfg = T.validate_config(yaml.safe_load((ROOT / "params.yaml").read_text())["train"])
    for choice, expected in (("eager", "eager"), ("sdpa", "sdpa"), ("auto", None)):
        run_cfg = {**cfg, "attn_implementation": choice, "packing": True}
        attn = T.attention_implementation(choice, False, True)
        with pytest.raises(Loaded):
            T._build_engine(run_cfg, {}, str(tiny_model_dir), False, 10, attn=attn)
        assert seen.get("attn_implementation") == expected
