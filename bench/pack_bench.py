"""Padding-free training: the same rows trained padded and packed (``train.packing``), one run each.

Rows: real problems and their reference solutions from ``../shared`` (GSM8K train and MATH500),
tokenized with a small byte-level BPE trained here on those texts (drsft.toy.tinylm.build_tokenizer,
vocabulary ``--vocab``), so row lengths follow real solutions in tokens of a small vocabulary (a
real model's tokenizer gives shorter rows for the same text; the spread, which is what padding
costs, is the solutions' own). Rows longer than ``--max-length`` are truncated by the trainer, as in
a real run. The model is a random Llama of ``--hidden``/``--layers`` (throughput depends on shapes,
not weights).

Each mode runs :func:`drsft.train.train` (DeepSpeed, one CPU process, the stage's own loop) on the
same rows and global batches: ``padded`` (``packing: false``, rows batching: the trainer's default),
``packed`` (``packing: true``, same micro-batches) and ``packed+tokens`` (``packing: true``,
``batching: tokens`` with ``--budget`` tokens per micro-batch). Useful tokens/s = the rows' real
tokens / ``train_time_s`` (the training loop; load, init and save excluded), i.e. ``tokens_per_s``
of ``metrics/train.json``. The padding share is the trainer's ``padding_share`` of the padded run
(padding / computed tokens).

On CPU the packed micro-batch runs SDPA with a block-diagonal mask over the whole pack (attention is
computed for every pair in the pack and masked), so packing saves the padded tokens' linear and MLP
work but pays attention over the pack; on GPU with flash-attention the packed path is
variable-length (no cross-row work). The last line is ``packed/padded useful tokens/s: X``.

    python bench/pack_bench.py [--rows 256] [--max-length 1024] [--threads 2] [--out pack.json]
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import drsft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # see bench/train_bench.py

import click  # noqa: E402

from drsft.io import iter_jsonl, write_json, write_jsonl  # noqa: E402

SHARED = ROOT.parent / "shared"
SOURCES = [(SHARED / "datasets" / "gsm8k_train.jsonl", "question", "answer"),
           (SHARED / "benchmarks" / "math500.jsonl", "problem", "solution")]


def real_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (problem, solution) pairs drawn from GSM8K train and MATH500, half from each."""
    pairs: list[list[tuple[str, str]]] = []
    for path, q, a in SOURCES:
        if not path.exists():
            raise click.ClickException(f"{path} not found: the bench reads real solutions from ../shared")
        pairs.append([(str(r[q]), str(r[a])) for _, r in iter_jsonl(path) if r.get(q) and r.get(a)])
    rng = random.Random(seed)
    out = rng.sample(pairs[0], n - n // 2) + rng.sample(pairs[1], n // 2)
    rng.shuffle(out)
    return out


def build_inputs(work: Path, n_rows: int, vocab: int, hidden: int, layers: int, seed: int) -> tuple[Path, Path, list[int]]:
    from drsft.params import load_params, section
    from drsft.prompts import encode_prompt, encode_response, render_prompt
    from drsft.rewrite import training_row
    from drsft.toy.tinylm import build_model, build_tokenizer

    prompt_cfg = section(load_params(ROOT / "params.yaml"), "prompt")
    pairs = real_pairs(n_rows, seed)
    tok = build_tokenizer([t for p in pairs for t in p] + [prompt_cfg["system"], prompt_cfg["instruction"]],
                          vocab_size=vocab)
    model = build_model(tok, hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
                        intermediate_size=hidden * 8 // 3, max_position_embeddings=4096, seed=seed)
    model_dir = work / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows, lengths = [], []
    for i, (problem, solution) in enumerate(pairs):
        prompt = render_prompt(tok, problem, prompt_cfg)
        ids = encode_response(tok, solution)
        lengths.append(len(encode_prompt(tok, prompt)) + len(ids))
        # plain log-probs are not read by the trainer: zeros of the right length keep the row well-formed
        rows.append(training_row(f"real-{i:05d}", "expert", prompt, solution, ids, None, [0.0] * len(ids), "unknown"))
    data = work / "expert.jsonl"
    write_jsonl(data, rows)
    return model_dir, data, lengths


def run_mode(name: str, cfg: dict, data: Path, model_dir: Path, work: Path) -> dict:
    from drsft.train import train

    with contextlib.redirect_stdout(io.StringIO()):
        m = train(cfg, data, model_dir, work / f"out_{name}", work / f"ckpt_{name}", None, live_dir=None)
    shutil.rmtree(work / f"ckpt_{name}", ignore_errors=True)
    shutil.rmtree(work / f"out_{name}", ignore_errors=True)
    return {"tokens_per_s": m["tokens_per_s"], "train_time_s": m["train_time_s"], "input_tokens": m["input_tokens"],
            "computed_tokens": m["computed_tokens"], "padding_share": m["padding_share"],
            "micro_batches_per_step": m["micro_batches_per_step"], "final_loss": m["final_loss"]}


@click.command()
@click.option("--rows", default=256, show_default=True, help="training rows (real solutions)")
@click.option("--max-length", default=1024, show_default=True, help="train.max_length (longer rows truncated)")
@click.option("--micro-batch", default=8, show_default=True)
@click.option("--global-batch", default=32, show_default=True)
@click.option("--budget", default=4096, show_default=True, help="tokens per micro-batch for packed+tokens")
@click.option("--vocab", default=2048, show_default=True)
@click.option("--hidden", default=256, show_default=True)
@click.option("--layers", default=4, show_default=True)
@click.option("--threads", default=2, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the figures as JSON")
def main(rows, max_length, micro_batch, global_batch, budget, vocab, hidden, layers, threads, seed, out):
    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("drsft.train").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="drsft-pack-bench-"))
    try:
        model_dir, data, lengths = build_inputs(work, rows, vocab, hidden, layers, seed)
        clipped = [min(n, max_length) for n in lengths]
        print(f"rows: {rows} real solutions (GSM8K train + MATH500), tokens per row (prompt + solution, "
              f"clipped at {max_length}): median {statistics.median(clipped):.0f}, min {min(clipped)}, "
              f"max {max(clipped)}; model hidden {hidden} x {layers} layers; {threads} threads", flush=True)
        base = {"data": "expert", "loss": "dft", "is_clip": [0.0, 5.0], "is_level": "token", "zero_stage": 2,
                "lr": 1e-4, "epochs": 1, "micro_batch_size": micro_batch, "global_batch_size": global_batch,
                "max_length": max_length, "warmup_ratio": 0.1, "weight_decay": 0.0, "adam_betas": [0.9, 0.999],
                "grad_clip": 1.0, "gradient_checkpointing": False, "save_every": 10 ** 6, "seed": seed,
                "packing": False, "attn_implementation": "auto", "batching": "rows", "max_tokens_per_micro_batch": max(budget, max_length)}
        modes = {"padded": base, "packed": {**base, "packing": True},
                 "packed+tokens": {**base, "packing": True, "batching": "tokens"}}
        res = {}
        for name, cfg in modes.items():
            res[name] = run_mode(name, cfg, data, model_dir, work)
            r = res[name]
            print(f"{name:>14}: {r['tokens_per_s']:8.0f} useful tokens/s, {r['train_time_s']:6.1f} s, padding "
                  f"{100 * r['padding_share']:4.1f} % of {r['computed_tokens']} computed tokens, "
                  f"{r['micro_batches_per_step']:.1f} micro-batches/step, final loss {r['final_loss']:.4f}", flush=True)
        ratio = res["packed"]["tokens_per_s"] / res["padded"]["tokens_per_s"]
        ratio_tok = res["packed+tokens"]["tokens_per_s"] / res["padded"]["tokens_per_s"]
        summary = {"rows": rows, "max_length": max_length, "hidden": hidden, "layers": layers, "threads": threads,
                   "row_tokens_median": statistics.median(clipped), "modes": res,
                   "padded_padding_share": res["padded"]["padding_share"],
                   "packed_over_padded": ratio, "packed_tokens_over_padded": ratio_tok}
        if out:
            write_json(out, summary)
        print(f"padding share of the padded run: {100 * res['padded']['padding_share']:.1f} %")
        print(f"packed+tokens/padded useful tokens/s: {ratio_tok:.2f}")
        print(f"packed/padded useful tokens/s: {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
