"""train.lora: peft LoRA adapters instead of full fine-tuning (drsft.train.with_lora, merged_lora).

At initialisation the LoRA model computes the base model's log-probs; the merged model computes what
the adapters did; a run trains the adapters only (every weight outside the adapted layers is the
base model's), under ZeRO 1, 2 (two processes, packed) and 3, resumes bit-identically and writes a
plain model folder."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from drsft.io import read_json, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "train.py"
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def _ids(tok, text):
    return torch.tensor([tok(text)["input_ids"]])


def test_lora_starts_as_the_base_model_and_merges_into_what_it_computes(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drsft.train import merged_lora, with_lora

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = _ids(tok, "Compute $3 + 4$. We add: 3 + 4 = 7.")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        ref = base(ids).logits
    model = with_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LORA)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)                  # B = 0: the base model's outputs
        for n, p in model.named_parameters():                       # as if trained: every adapter moves
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
        adapted = model(ids).logits
    assert (adapted - ref).abs().max() > 1e-3
    merged = merged_lora(str(tiny_model_dir), model.state_dict(), LORA, torch.float32)
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
    with pytest.raises(RuntimeError, match="does not fit the LoRA model"):
        merged_lora(str(tiny_model_dir), base.state_dict(), LORA, torch.float32)


@pytest.fixture(scope="module")
def rows(tiny_model_dir, prompt_cfg, tmp_path_factory):
    from transformers import AutoTokenizer

    from drsft.prompts import encode_response, render_prompt

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = []
    for i in range(24):
        a, b = i % 12, (5 * i + 1) % 12
        text = f"We add: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
        ids = encode_response(tok, text)
        out.append({"problem_id": f"p{i:03d}", "tier": "self", "prompt": render_prompt(tok, f"Compute ${a} + {b}$.", prompt_cfg),
                    "response": text, "response_ids": ids, "behaviour_logprobs": None,
                    "plain_logprobs": [-1.0] * len(ids), "behaviour": "unknown"})
    path = tmp_path_factory.mktemp("lora_rows") / "rewritten.jsonl"
    write_jsonl(path, out)
    return path


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _train(work, data, model, name, nproc=1, extra=(), **train):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update({"loss": "dft", "lr": 3e-3, "epochs": 1, "micro_batch_size": 2, "global_batch_size": 8,
                            "max_length": 96, "save_every": 1, "lora": LORA, **train})
    (work / f"{name}.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(work / f"{name}.yaml"), "--data", str(data), "--model", str(model),
            "--out", str(work / name), "--checkpoints", str(work / f"{name}_ckpt"),
            "--metrics", str(work / f"{name}.json"), "--live-dir", str(work / f"{name}_live"), *extra]
    if nproc == 1:
        cmd = [sys.executable, str(STAGE), *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(STAGE), *args]
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


@pytest.mark.slow
def test_lora_runs_train_the_adapters_only_resume_exactly_and_agree_across_zero_stages(tiny_model_dir, rows, tmp_path):
    base = _weights(tiny_model_dir)
    _train(tmp_path, rows, tiny_model_dir, "z2", zero_stage=2)
    w = _weights(tmp_path / "z2")
    assert w.keys() == base.keys()                                  # a plain model: no adapter left
    adapted = [k for k in w if any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"))]
    assert adapted and all(not torch.equal(w[k], base[k]) for k in adapted)
    assert all(torch.equal(w[k], base[k]) for k in w if k not in adapted)     # embeddings, norms: frozen
    # killed after 2 steps (checkpoints every step), rerun: the same weights as the uninterrupted run
    first = _train(tmp_path, rows, tiny_model_dir, "resume", zero_stage=2, extra=("--max-steps", "2"))
    assert "stopped at max_steps=2" in first.stderr
    second = _train(tmp_path, rows, tiny_model_dir, "resume", zero_stage=2)
    assert "resumed from" in second.stderr
    r = _weights(tmp_path / "resume")
    assert all(torch.equal(r[k], w[k]) for k in w)
    # ZeRO-3 (consolidated, then merged) and ZeRO-2 over two processes with packed micro-batches
    _train(tmp_path, rows, tiny_model_dir, "z3", zero_stage=3)
    _train(tmp_path, rows, tiny_model_dir, "packed", nproc=2, zero_stage=2, packing=True)
    for name in ("z3", "packed"):
        other = _weights(tmp_path / name)
        assert max((other[k] - w[k]).abs().max().item() for k in w) < 1e-4, name
    m = read_json(tmp_path / "z2.json")
    assert m["steps"] == 3 and m["world_size"] == 1
