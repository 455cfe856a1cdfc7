"""Verifier throughput on typical answers: verdicts per second of ``verify_batch`` (default 2 workers).

The mix imitates a sampling stage on a GSM8K/MATH-like set: ``--samples`` samples for each of
``--problems`` problems, each a short chain of thought ending in ``\\boxed{}``:
40% the reference verbatim, 20% an equivalent form (``0.5`` vs ``\\frac{1}{2}``, ``x = 7``, ``1,200``),
30% a wrong number, 10% no box. The figure is end to end (worker start-up included); the second run
reuses the forkserver, which is what a stage sees after its first batch.

    python bench/verify_bench.py [--workers 2] [--problems 1000] [--samples 8]
"""

from __future__ import annotations

import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import click  # noqa: E402

from drsft.verify import verify_batch  # noqa: E402


def make_pairs(problems: int, samples: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for p in range(problems):
        kind = p % 4
        if kind == 0:  # integer answer
            n = rng.randint(2, 5000)
            ref, equiv = str(n), (f"{n:,}" if n >= 1000 else f"x = {n}")
        elif kind == 1:  # fraction answer
            a, b = rng.randint(1, 9), rng.choice([2, 4, 5, 8])
            ref, equiv = f"\\frac{{{a}}}{{{b}}}", f"{a / b:g}"
        elif kind == 2:  # decimal answer
            v = rng.randint(1, 999) / 10
            ref, equiv = f"{v:g}", f"\\frac{{{int(round(v * 10))}}}{{10}}"
        else:  # surd answer
            k = rng.randint(2, 9)
            ref, equiv = f"{k}\\sqrt{{2}}", f"\\sqrt{{{2 * k * k}}}"
        for _ in range(samples):
            u = rng.random()
            steps = f"We compute step by step: {rng.randint(1, 99)} + {rng.randint(1, 99)} and so on."
            if u < 0.4:
                resp = f"{steps} The answer is $\\boxed{{{ref}}}$."
            elif u < 0.6:
                resp = f"{steps} So the answer is \\boxed{{{equiv}}}."
            elif u < 0.9:
                resp = f"{steps} The answer is \\boxed{{{rng.randint(1, 5000)}}}."
            else:
                resp = f"{steps} I am not sure."
            pairs.append((resp, ref))
    return pairs


@click.command()
@click.option("--workers", default=2, show_default=True)
@click.option("--problems", default=1000, show_default=True)
@click.option("--samples", default=8, show_default=True)
@click.option("--timeout-s", default=5.0, show_default=True)
@click.option("--repeats", default=2, show_default=True)
def main(workers: int, problems: int, samples: int, timeout_s: float, repeats: int) -> None:
    pairs = make_pairs(problems, samples)
    for r in range(repeats):
        t0 = time.perf_counter()
        verdicts = verify_batch(pairs, workers=workers, timeout_s=timeout_s)
        dt = time.perf_counter() - t0
        reasons = Counter(v.reason for v in verdicts)
        print(f"run {r + 1}: {len(pairs)} verdicts in {dt:.2f}s = {len(pairs) / dt:,.0f} verdicts/s "
              f"on {workers} worker(s); reasons {dict(sorted(reasons.items()))}")


if __name__ == "__main__":
    main()
