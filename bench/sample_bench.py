"""Throughput of the hf rollout backend: batched decode loop vs one-at-a-time ``generate``.

    .venv/bin/python bench/sample_bench.py            # builds a ~0.9M-param toy Llama in a temp dir
    .venv/bin/python bench/sample_bench.py --model models/base --threads 2

Both sides produce the same data: per sequence the sampled ids and their raw (T=1) log-probs.
The naive side calls ``model.generate`` once per prompt per sample (``output_logits=True``) on
the first ``--naive-sequences`` sequences; the batched side runs ``HFBackend.generate`` on all
prompts x n. The figure is generated tokens per second of each, and their ratio.

    .venv/bin/python bench/sample_bench.py --model models/base --threads 2 --prompts 400 \
        --batch-size 256 --max-new-tokens 192 --workers 2 --naive-sequences 0

``--workers N``: also the batched side on N forked single-thread workers (``rollout.
data_parallel_size`` on CPU), checked to give the completions of a single-thread process.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import click  # noqa: E402

PROMPT_CFG = {"system": "You are a careful math tutor.",
              "instruction": "Please reason step by step, and put your final answer within \\boxed{}."}


def _toy_model(folder: Path) -> Path:
    from drsft.toy.tinylm import build_model, build_tokenizer

    texts = [f"Compute ${a} + {b}$. We add: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
             for a in range(20) for b in range(20)] + list(PROMPT_CFG.values())
    tok = build_tokenizer(texts, vocab_size=512)
    model = build_model(tok, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384, seed=0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _naive(model, tok, prompts: list[str], n: int, max_new: int, limit: int, seed: int) -> tuple[int, float]:
    import torch

    from drsft.prompts import encode_prompt
    from drsft.scoring import gather_logprobs

    seqs = [(p, j) for p in prompts for j in range(n)][:limit]
    tokens = 0
    t0 = time.perf_counter()
    for k, (p, _) in enumerate(seqs):
        ids = torch.tensor([encode_prompt(tok, p)])
        torch.manual_seed(seed + k)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                 top_p=1.0, top_k=0, max_new_tokens=max_new, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            new = out.sequences[0, ids.shape[1]:]
            logits = torch.stack(out.logits, dim=1)[0, :len(new)]
            gather_logprobs(logits, new).tolist()
        tokens += len(new)
    return tokens, time.perf_counter() - t0


@click.command()
@click.option("--model", "model_dir", default=None, help="model folder (default: build the toy model)")
@click.option("--prompts", "n_prompts", default=16, show_default=True)
@click.option("--n", default=4, show_default=True)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--naive-sequences", default=16, show_default=True, help="sequences timed one at a time")
@click.option("--threads", default=1, show_default=True)
@click.option("--workers", default=0, show_default=True, help="also time N forked single-thread workers (0: no)")
def main(model_dir, n_prompts, n, max_new_tokens, batch_size, naive_sequences, threads, workers):
    import torch

    from drsft.models import load_model, load_tokenizer
    from drsft.prompts import render_prompt
    from drsft.rollout import HFBackend, SamplingParams

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(model_dir) if model_dir else _toy_model(Path(tmp))
        tok = load_tokenizer(folder)
        model = load_model(folder, device="cpu")
        params = sum(p.numel() for p in model.parameters())
        prompts = [render_prompt(tok, f"Compute ${a} + {a * 7 % 13}$." + " Think." * (a % 4), PROMPT_CFG)
                   for a in range(n_prompts)]
        backend = HFBackend(model, tok)
        sp = SamplingParams(n=n, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=0,
                            batch_size=batch_size)
        backend.generate(prompts[:2], SamplingParams(n=1, max_new_tokens=4))  # warm-up
        t0 = time.perf_counter()
        comps = backend.generate(prompts, sp)
        batched_s = time.perf_counter() - t0
        batched_tokens = sum(len(c.token_ids) for cs in comps for c in cs)
        forked = None
        if workers:
            t0 = time.perf_counter()
            fcomps = HFBackend(model, tok, processes=workers).generate(prompts, sp)
            forked_s = time.perf_counter() - t0
            forked_tokens = sum(len(c.token_ids) for cs in fcomps for c in cs)
            forked = {"workers": workers, "tokens": forked_tokens, "seconds": round(forked_s, 3),
                      "tokens_per_s": round(forked_tokens / forked_s, 1),
                      "same_tokens_as_batched": [[c.token_ids for c in cs] for cs in fcomps]
                      == [[c.token_ids for c in cs] for cs in comps],
                      "speedup_vs_batched": round(batched_s / forked_s, 2)}
        naive_tokens, naive_s = _naive(model, tok, prompts, n, max_new_tokens, naive_sequences, 0) \
            if naive_sequences else (0, 0.0)
    result = {
        "model_params": params, "threads": threads, "prompts": n_prompts, "n": n,
        "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "batched": {"sequences": n_prompts * n, "tokens": batched_tokens, "seconds": round(batched_s, 3),
                    "tokens_per_s": round(batched_tokens / batched_s, 1)},
    }
    if naive_sequences:
        result["naive"] = {"sequences": min(naive_sequences, n_prompts * n), "tokens": naive_tokens,
                           "seconds": round(naive_s, 3), "tokens_per_s": round(naive_tokens / naive_s, 1)}
        result["speedup"] = round(result["batched"]["tokens_per_s"] / result["naive"]["tokens_per_s"], 1)
    if forked:
        result["forked_workers"] = forked
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
