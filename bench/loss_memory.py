"""Peak memory and time of the training log-prob path at the paper's shape: the chunked head against
the full logits (drsft.logprob_head, ``train.logprob_chunk``).

A 1-layer, hidden-64 Llama with the Qwen2.5 vocabulary (151,936), so that the output projection and
the log-softmax are nearly all the work; a micro-batch of 4 rows x 2,048 positions, bf16 weights;
one step = :func:`drsft.train.forward_logprobs` (padded), the DFT loss (drsft.losses) and backward.
Each variant runs in its own process (``--variant``), so one's allocations cannot hide the other's
peak: peak memory is the growth of the process's peak resident set (``ru_maxrss``) over its size
before the first step; time is the median over ``--reps`` steps after one warm-up step.

    python bench/loss_memory.py              # both variants, then the ratio line
    python bench/loss_memory.py --chunk 512

Goal (issue #32): chunked / full peak memory <= 0.25 at time <= 1.1.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

VOCAB = 151_936


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def run_variant(chunk: int, reps: int, rows: int, length: int, threads: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from drsft.losses import weighted_nll
    from drsft.train import Example, collate, forward_logprobs

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length,
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.train()
    g = torch.Generator().manual_seed(1)
    examples = [Example(f"r{i}", "self", torch.randint(0, VOCAB, (length,), generator=g).tolist(), 64, None)
                for i in range(rows)]
    batch = collate(examples, pad_id=0)

    def step() -> float:
        t0 = time.perf_counter()
        logp = forward_logprobs(model, batch, "cpu", packed=False, chunk=chunk)
        out = weighted_nll(logp, batch["mask"], "dft")
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    before = _rss_bytes()
    times = [step() for _ in range(reps + 1)][1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # Linux: KiB
    return {"chunk": chunk, "peak_growth_bytes": max(0, peak - before), "seconds": statistics.median(times),
            "times": times}


@click.command()
@click.option("--chunk", default=1024, show_default=True, help="positions per chunk of the chunked head")
@click.option("--reps", default=3, show_default=True, help="timed steps per variant (after one warm-up)")
@click.option("--rows", default=4, show_default=True, help="rows per micro-batch")
@click.option("--length", default=2048, show_default=True, help="positions per row")
@click.option("--threads", default=2, show_default=True)
@click.option("--variant", type=click.Choice(["full", "chunked"]), default=None,
              help="run one variant in this process and print its JSON (what the default run spawns)")
def main(chunk, reps, rows, length, threads, variant):
    """Chunked vs full log-prob head at the Qwen2.5 vocabulary: peak memory and time of forward + backward."""
    if variant:
        print(json.dumps(run_variant(0 if variant == "full" else chunk, reps, rows, length, threads)))
        return
    res = {}
    for name in ("full", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--variant", name, "--chunk", str(chunk), "--reps", str(reps),
                               "--rows", str(rows), "--length", str(length), "--threads", str(threads)],
                              capture_output=True, text=True, check=True)
        res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = res[name]
        click.echo(f"{name:8s} chunk {r['chunk']:5d}: peak +{r['peak_growth_bytes'] / 2**30:.2f} GiB, "
                   f"{r['seconds']:.2f} s per step (median of {len(r['times'])}: "
                   f"{', '.join(f'{t:.2f}' for t in r['times'])})")
    mem = res["chunked"]["peak_growth_bytes"] / res["full"]["peak_growth_bytes"]
    t = res["chunked"]["seconds"] / res["full"]["seconds"]
    click.echo(f"{rows} x {length} positions, vocabulary {VOCAB}, bf16, {threads} threads")
    click.echo(f"chunked/full peak memory: {mem:.3f}, time: {t:.3f}")


if __name__ == "__main__":
    main()
