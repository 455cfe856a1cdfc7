"""GPU throughput at a real model's shape: rollout tokens/s (hf backend, and vLLM where installed)
and training tokens/s of ``drsft.train.train`` (DeepSpeed ZeRO-2/3, bf16) on one CUDA device.

Weights are random (nothing is downloaded): a model with the architecture and sizes of the named
shape (e.g. Qwen2.5-1.5B: 28 layers, hidden 1536, GQA 12/2 heads, MLP 8960, vocabulary 151,936)
is built in bf16 and saved with a small BPE tokenizer (drsft.toy.tinylm). Throughput does not depend
on the values of the weights, only on shapes and sequence lengths, which are fixed here: every
training row has ``--seq-len`` tokens, and a generated sequence runs to ``--max-new-tokens``
unless the random model samples EOS (about 1 in 150k per step; tokens are counted as generated).

What the figures are: rollout = generated tokens / wall seconds of ``generate`` over all prompts x
n after one warm-up call (hf: our batched decode loop, ``rollout.batch_size`` sequences per
forward batch). Training = input tokens / ``train_time_s`` (the training loop only: model load,
DeepSpeed init and saving excluded), i.e. what ``metrics/train.json`` reports as
``tokens_per_s``; also the model FLOP utilisation, 6 N (x 4/3 with gradient checkpointing) FLOPs
per token over the GPU's bf16 dense peak (``--peak-tflops``).

Run on a CUDA machine (see README "Running at scale"); on CPU only ``--shape tiny`` is sensible
(a dry run of the code path). Writes JSON to ``--out``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import drsft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402

# Architecture sizes from the models' published config.json files.
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-math-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                            num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
PROMPT_CFG = {"system": "", "instruction": "Please reason step by step, and put your final answer within \\boxed{}."}


def _problem(rng: random.Random) -> str:
    return f"Compute ${rng.randint(1, 999)} + {rng.randint(1, 999)}$."


def _peak_gib() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if torch.cuda.is_available() else None


def build(shape: str, folder: Path, seed: int = 0) -> tuple[Path, int]:
    """A random bf16 Qwen2 of ``shape`` and a small tokenizer in ``folder``; returns (folder, params)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from drsft.toy.tinylm import build_tokenizer

    rng = random.Random(seed)
    texts = [f"{_problem(rng)} The answer is \\boxed{{7}}." for _ in range(300)] + [PROMPT_CFG["instruction"]]
    tok = build_tokenizer(texts, vocab_size=512)
    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, rope_theta=10000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)     # build in bf16: a 7B model never exists in fp32
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder, n_params


def rollout(backend_name: str, model_dir: Path, n_prompts: int, n: int, max_new: int, batch_size: int) -> dict:
    import torch

    from drsft.prompts import render_prompt
    from drsft.rollout import SamplingParams, make_backend

    opts = {"dtype": "bfloat16"}
    if backend_name == "vllm":
        opts.update(gpu_memory_utilization=0.6, max_model_len=2048)
    t0 = time.perf_counter()
    be = make_backend(backend_name, str(model_dir), **opts)
    load_s = time.perf_counter() - t0
    rng = random.Random(1)
    prompts = [render_prompt(be.tokenizer, _problem(rng), PROMPT_CFG) for _ in range(n_prompts)]
    sp = SamplingParams(n=n, temperature=1.0, max_new_tokens=max_new, seed=0, batch_size=batch_size)
    be.generate(prompts[:2], SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=0, batch_size=batch_size))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = be.generate(prompts, sp)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for cs in out for c in cs)
    res = {"backend": backend_name, "sequences": n_prompts * n, "max_new_tokens": max_new, "batch_size": batch_size,
           "tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1), "load_s": round(load_s, 1),
           "peak_gpu_gib": _peak_gib()}
    if hasattr(be, "close"):
        be.close()
    del be
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return res


def training_rows(model_dir: Path, path: Path, rows: int, seq_len: int, seed: int = 0) -> None:
    from drsft.io import write_jsonl
    from drsft.models import load_tokenizer
    from drsft.prompts import encode_prompt, render_prompt
    from drsft.rewrite import training_row

    tok = load_tokenizer(model_dir)
    rng = random.Random(seed)
    special = {int(i) for i in tok.all_special_ids}
    vocab = [i for i in range(len(tok)) if i not in special]
    out = []
    for i in range(rows):
        prompt = render_prompt(tok, _problem(rng), PROMPT_CFG)
        ids = [rng.choice(vocab) for _ in range(seq_len - len(encode_prompt(tok, prompt)))]
        known = i % 3 != 2   # two rows in three with behaviour log-probs (self tier), one fallback
        out.append(training_row(f"bench-{i:05d}", "self" if known else "fallback", prompt, "", ids,
                                [-rng.random() for _ in ids] if known else None, [-rng.random() for _ in ids],
                                "sampled" if known else "unknown"))
    write_jsonl(path, out)


def training(model_dir: Path, data: Path, work: Path, zero_stage: int, micro: int, global_batch: int,
             seq_len: int, checkpointing: bool, loss: str) -> dict:
    """One epoch of ``data`` with params.yaml's ``train`` section; loss, sizes and the configs' lr set."""
    import torch

    from drsft.params import load_params, section
    from drsft.train import train

    cfg = {**section(load_params(ROOT / "params.yaml"), "train"), "loss": loss, "zero_stage": zero_stage,
           "lr": 5e-5, "epochs": 1, "micro_batch_size": micro, "global_batch_size": global_batch, "max_length": seq_len,
           "gradient_checkpointing": checkpointing, "save_every": 10 ** 6}
    run = Path(tempfile.mkdtemp(prefix=f"zero{zero_stage}-", dir=work))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        m = train(cfg, data, model_dir, run / "model", run / "ckpt", None)
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return {"zero_stage": zero_stage, "loss": loss, "micro_batch_size": micro, "global_batch_size": global_batch,
            "seq_len": seq_len, "gradient_checkpointing": checkpointing, "steps": m["steps"],
            "input_tokens": m["input_tokens"], "train_time_s": round(m["train_time_s"], 2),
            "tokens_per_s": round(m["input_tokens"] / m["train_time_s"], 1),
            "stage_wall_s": round(time.perf_counter() - t0, 1),
            "peak_gpu_gib": _peak_gib()}


@click.command()
@click.option("--shape", type=click.Choice(sorted(SHAPES)), default="qwen2.5-1.5b", show_default=True)
@click.option("--backends", default="hf,vllm", show_default=True, help="rollout backends (vllm skipped if not installed)")
@click.option("--prompts", "n_prompts", default=64, show_default=True)
@click.option("--n", default=4, show_default=True)
@click.option("--max-new-tokens", default=256, show_default=True)
@click.option("--batch-size", default=256, show_default=True, help="hf: sequences per forward batch")
@click.option("--train-rows", default=128, show_default=True, help="0: skip training")
@click.option("--seq-len", default=1024, show_default=True)
@click.option("--micro-batch", default=4, show_default=True)
@click.option("--global-batch", default=32, show_default=True)
@click.option("--zero-stages", default="2,3", show_default=True)
@click.option("--loss", default="is_dft", show_default=True)
@click.option("--checkpointing/--no-checkpointing", default=True, show_default=True)
@click.option("--peak-tflops", default=989.0, show_default=True, help="bf16 dense peak of the GPU (H100/H200 SXM: 989)")
@click.option("--out", "out_path", default=None)
def main(shape, backends, n_prompts, n, max_new_tokens, batch_size, train_rows, seq_len, micro_batch, global_batch,
         zero_stages, loss, checkpointing, peak_tflops, out_path):
    import logging

    import torch
    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.utils.logging.set_verbosity_error()
    work = Path(tempfile.mkdtemp(prefix="gpu_bench-"))
    res: dict = {"shape": shape, "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                 "torch": torch.__version__, "transformers": transformers.__version__,
                 "date": time.strftime("%Y-%m-%d"), "rollout": [], "train": []}

    def dump():
        text = json.dumps(res, indent=1)
        print(text, flush=True)
        if out_path:
            Path(out_path).write_text(text + "\n", encoding="utf-8")

    try:
        t0 = time.perf_counter()
        model_dir, n_params = build(shape, work / "model")
        res.update(params=n_params, build_s=round(time.perf_counter() - t0, 1))
        for name in [b for b in backends.split(",") if b]:
            if name == "vllm":
                try:
                    import vllm  # noqa: F401
                except ImportError:
                    res["rollout"].append({"backend": "vllm", "skipped": "vllm is not installed"})
                    continue
            res["rollout"].append(rollout(name, model_dir, n_prompts, n, max_new_tokens, batch_size))
            dump()
        if train_rows:
            data = work / "rows.jsonl"
            training_rows(model_dir, data, train_rows, seq_len)
            flops_per_token = 6 * n_params * (4 / 3 if checkpointing else 1)
            for z in [int(s) for s in zero_stages.split(",") if s]:
                r = training(model_dir, data, work, z, micro_batch, global_batch, seq_len, checkpointing, loss)
                r["mfu"] = round(r["tokens_per_s"] * flops_per_token / (peak_tflops * 1e12), 3)
                res["train"].append(r)
                dump()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dump()


if __name__ == "__main__":
    main()
