"""The CPU side of the pipeline at the paper's record sizes, on synthetic records: time, memory, disk.

    python bench/scale_sim.py --problems 50000 --n 4 --tokens 600 [--format parquet|jsonl]
        [--logprob-dtype float16|float32] [--workdir DIR] [--out sim.json]

Writes records of that size in the pipeline's own formats (docs/records.md; ``--format`` is
``records.format``, parquet by default as in the paper configs, and ``--logprob-dtype``
``records.logprob_dtype``, float16 with parquet as there): ``train.jsonl`` (problems with a
reference answer and an expert solution), and sample shards of ``--n`` samples per problem, each
with ``response_ids`` and ``logprobs`` of about ``--tokens`` tokens (uniform in [0.5, 1.5] x tokens,
ids below Qwen2.5's vocabulary of 151,936, log-probs as the sampler returns them) and a response text of ~3.6 characters per token that ends in a ``\\boxed{}`` answer,
right for about ``--solve-rate`` of the samples (answers: integers, fractions and surds, so that
math-verify parses two in three). Random but well-formed: every reader's checks pass.

Then it runs, each in its own process, with wall time and peak RSS (``wait4``):

* ``verify``      -- ``stages/verify.py`` (math-verify, ``verify.workers`` processes);
* ``self_align``  -- ``stages/self_align.py``;
* ``fallback``    -- the fallback stage's assembly without the model: the rows of ``self_align``
  plus an expert row per unsolved problem (its log-probs random instead of scored; scoring is GPU
  work), written as ``data/train/rewritten.<format>`` and ``expert.<format>`` with their metrics;
* ``train_load``  -- the trainer's data side: :func:`drsft.train.load_examples` of the rewritten set
  (prompts tokenized with a small BPE trained on the synthetic words), the global-batch plan and the packed token-budget
  micro-batches of every step (:func:`drsft.train.batching_summary`).

guided_align is left out (it is generation); its unsolved problems all fall back here. The same
``--seed`` gives the same records in either format. The last lines report the records on disk and
the largest peak RSS against the goals (1 GiB, 12 GiB).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import drsft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import click  # noqa: E402

QWEN_VOCAB = 151_936
WORDS = ("we", "add", "the", "terms", "so", "that", "then", "gives", "and", "hence", "multiply", "both", "sides",
         "by", "which", "is", "equal", "to", "$x$", "$2x + 3 = 7$", "$\\frac{1}{2}$", "therefore")


def _answer(rng: random.Random) -> str:
    """An integer, a fraction or a surd: the last two go through math-verify's parser."""
    kind = rng.randrange(3)
    if kind == 0:
        return str(rng.randint(1, 10 ** 6))
    if kind == 1:
        return f"\\frac{{{rng.randint(1, 999)}}}{{{rng.randint(2, 999)}}}"
    return f"{rng.randint(2, 99)}\\sqrt{{{rng.choice([2, 3, 5, 6, 7, 10, 11])}}}"


def _text(rng: random.Random, n_chars: int, answer: str) -> str:
    words, size = [], 0
    while size < n_chars:
        w = rng.choice(WORDS)
        words.append(w)
        size += len(w) + 1
    return " ".join(words) + f". The answer is $\\boxed{{{answer}}}$."


def generate(work: Path, problems: int, n: int, tokens: int, solve_rate: float, shard_size: int, seed: int,
             fmt: str, dtype: str) -> dict:
    """train.jsonl and data/sample shards in records format ``fmt``; returns counts and sizes."""
    from drsft.io import write_records

    rng = random.Random(seed)
    (work / "data" / "sample").mkdir(parents=True, exist_ok=True)
    train = work / "data" / "train.jsonl"
    t0 = time.perf_counter()
    with open(train, "w", encoding="utf-8") as f:
        for i in range(problems):
            ans = _answer(rng)
            f.write(json.dumps({"id": f"p{i:06d}", "problem": f"Problem {i}: compute the value. " + _text(rng, 200, "?"),
                                "solution": _text(rng, int(tokens * 3.6), ans), "answer": ans,
                                "source": "sim"}) + "\n")
    answers = {}
    for _, rec in _iter(train):
        answers[rec["id"]] = rec["answer"]
    ids = list(answers)
    samples = 0
    for s in range(0, problems, shard_size):
        shard = []
        for pid in ids[s:s + shard_size]:
            prompt = f"<|im_start|>user\nProblem {pid}: compute the value.<|im_end|>\n<|im_start|>assistant\n"
            for j in range(n):
                k = max(1, int(tokens * rng.uniform(0.5, 1.5)))
                ans = answers[pid] if rng.random() < solve_rate else _answer(rng)
                shard.append({
                    "problem_id": pid, "sample_index": j, "prompt": prompt,
                    "response": _text(rng, int(k * 3.6), ans),
                    "response_ids": [rng.randrange(QWEN_VOCAB) for _ in range(k)],
                    "logprobs": [-rng.expovariate(2.0) for _ in range(k)],
                    "finish_reason": "stop"})
        samples += write_records(work / "data" / "sample" / f"shard-{s // shard_size:05d}.{fmt}", shard, dtype)
    return {"problems": problems, "samples": samples, "seconds": time.perf_counter() - t0}


def _iter(path: Path):
    from drsft.io import iter_jsonl

    return iter_jsonl(path)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(name: str, cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``; its wall time and peak RSS (the largest of the process tree's members, as
    wait4 reports for the child; the verifier's worker processes are counted by the stage itself)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise click.ClickException(f"{name} failed ({proc.returncode}):\n{out[-4000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2 ** 20, 3)}


def assemble(work: str, tokens: int, seed: int, fmt: str, dtype: str) -> None:
    """The fallback stage's assembly, model scoring replaced by random log-probs."""
    from drsft.io import read_problem_ids, read_problems, read_training_rows, record_file, write_json, write_records
    from drsft.rewrite import rewrite_metrics, training_row

    w = Path(work)
    rng = random.Random(seed)
    problems = read_problems(w / "data" / "train.jsonl")
    known = [p["id"] for p in problems]
    unsolved = set(read_problem_ids(w / "data" / "self_align" / "unsolved.jsonl", known))
    tiers = read_training_rows(record_file(w / "data" / "self_align", "selected", fmt), known)
    expert = []
    for p in problems:
        k = max(1, int(tokens * rng.uniform(0.5, 1.5)))
        expert.append(training_row(p["id"], "expert", f"<|im_start|>user\n{p['problem']}<|im_end|>\n", p["solution"],
                                   [rng.randrange(QWEN_VOCAB) for _ in range(k)], None,
                                   [-rng.expovariate(2.0) for _ in range(k)], "unknown"))
    rewritten = tiers + [{**r, "tier": "fallback"} for r in expert if r["problem_id"] in unsolved]
    write_records(record_file(w / "data" / "train", "rewritten", fmt), rewritten, dtype)
    write_records(record_file(w / "data" / "train", "expert", fmt), expert, dtype)
    write_json(w / "metrics" / "rewrite.json", rewrite_metrics(rewritten, expert))


def train_load(work: str, max_length: int, budget: int, fmt: str) -> None:
    """The trainer's data side on the rewritten set: rows, global batches, packed token-budget micro-batches."""
    from drsft.io import record_file, write_json
    from drsft.params import load_params, section
    from drsft.toy.tinylm import build_tokenizer
    from drsft.train import batch_plan, batching_summary, load_examples

    w = Path(work)
    prompt_cfg = section(load_params(ROOT / "params.yaml"), "prompt")
    texts = [" ".join(WORDS), "<|im_start|>user\nProblem p000001: compute the value.<|im_end|>",
             prompt_cfg["system"], prompt_cfg["instruction"]]
    tok = build_tokenizer(texts * 20, vocab_size=400)
    examples, stats = load_examples(record_file(w / "data" / "train", "rewritten", fmt), tok, max_length, QWEN_VOCAB)
    cfg = {"batching": "tokens", "packing": True, "max_tokens_per_micro_batch": budget, "micro_batch_size": 4}
    plan = batch_plan(len(examples), 256, 1, 0, drop_last=False)
    summary = batching_summary(plan, [len(e.input_ids) for e in examples], cfg, 8, 8)
    write_json(w / "metrics" / "train_load.json", {"rows": len(examples), "truncated": stats.truncated,
                                                   "steps": len(plan), **summary})


@click.group(invoke_without_command=True)
@click.option("--problems", default=50000, show_default=True)
@click.option("--n", default=4, show_default=True, help="samples per problem")
@click.option("--tokens", default=600, show_default=True, help="mean response tokens")
@click.option("--solve-rate", default=0.3, show_default=True, help="share of samples with the right answer")
@click.option("--shard-size", default=500, show_default=True, help="problems per sample shard")
@click.option("--max-length", default=2048, show_default=True)
@click.option("--budget", default=8192, show_default=True, help="train.max_tokens_per_micro_batch")
@click.option("--workdir", type=click.Path(file_okay=False), default=None, help="keep the records here")
@click.option("--seed", default=0, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["parquet", "jsonl"]), default="parquet", show_default=True,
              help="records.format")
@click.option("--logprob-dtype", "dtype", type=click.Choice(["float16", "float32"]), default=None,
              help="records.logprob_dtype  [default: float16 with parquet, as the paper configs; float32 with jsonl]")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the figures as JSON")
@click.pass_context
def main(ctx, problems, n, tokens, solve_rate, shard_size, max_length, budget, workdir, seed, fmt, dtype, out):
    if ctx.invoked_subcommand is not None:
        return
    from drsft.io import read_json, write_json

    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="drsft-scale-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    params = work / "params.yaml"
    doc = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    dtype = dtype or ("float16" if fmt == "parquet" else "float32")
    doc["records"].update(format=fmt, logprob_dtype=dtype)
    params.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    py, stages, me = sys.executable, ROOT / "stages", str(Path(__file__).resolve())
    try:
        click.echo(f"generating {problems} problems x {n} samples x ~{tokens} tokens in {work} ...", err=True)
        gen = generate(work, problems, n, tokens, solve_rate, shard_size, seed, fmt, dtype)
        d = "data"
        runs = {
            "verify": [py, str(stages / "verify.py"), "--params", str(params), "--problems", f"{d}/train.jsonl",
                       "--samples", f"{d}/sample", "--out", f"{d}/verify/verdicts.jsonl", "--metrics",
                       "metrics/verify.json"],
            "self_align": [py, str(stages / "self_align.py"), "--params", str(params), "--problems", f"{d}/train.jsonl",
                           "--samples", f"{d}/sample", "--verdicts", f"{d}/verify/verdicts.jsonl", "--out",
                           f"{d}/self_align", "--metrics", "metrics/self_align.json"],
            "fallback": [py, me, "assemble", str(work), "--tokens", str(tokens), "--seed", str(seed), "--format", fmt,
                         "--logprob-dtype", dtype],
            "train_load": [py, me, "load", str(work), "--max-length", str(max_length), "--budget", str(budget),
                           "--format", fmt],
        }
        res = {"generate": {"seconds": round(gen["seconds"], 1), "peak_rss_gib": None}}
        for name, cmd in runs.items():
            res[name] = measure(name, cmd, work)
            click.echo(f"{name}: {res[name]['seconds']} s, peak RSS {res[name]['peak_rss_gib']} GiB", err=True)
        sizes = {"samples": _size(work / d / "sample"), "verdicts": _size(work / d / "verify"),
                 "self_align": _size(work / d / "self_align"), "train": _size(work / d / "train")}
        records = sum(sizes.values())
        loaded = read_json(work / "metrics" / "train_load.json")
        summary = {"problems": problems, "n": n, "tokens": tokens, "format": fmt, "logprob_dtype": dtype,
                   "samples": gen["samples"],
                   "stages": res, "bytes": sizes, "records_gib": records / 2 ** 30,
                   "peak_rss_gib": max(v["peak_rss_gib"] for v in res.values() if v["peak_rss_gib"] is not None),
                   "verify": read_json(work / "metrics" / "verify.json"),
                   "self_align": read_json(work / "metrics" / "self_align.json"), "train_load": loaded}
        if out:
            write_json(out, summary)
        click.echo(f"{'stage':<11} {'wall s':>8} {'peak RSS GiB':>13}")
        for name, v in res.items():
            click.echo(f"{name:<11} {v['seconds']:>8} {v['peak_rss_gib'] if v['peak_rss_gib'] is not None else '-':>13}")
        click.echo("on disk: " + ", ".join(f"{k} {v / 2 ** 30:.2f} GiB" for k, v in sizes.items()))
        click.echo(f"train_load: {loaded['rows']} rows, {loaded['steps']} steps of 256, "
                   f"{loaded['micro_batches_per_step']:.1f} packed micro-batches of <= {budget} tokens per rank "
                   f"(8 ranks), padding {100 * loaded['padding_share']:.1f} %")
        click.echo(f"records on disk ({fmt}, log-probs {dtype if fmt == 'parquet' else 'in full'}): "
                   f"{records / 2 ** 30:.2f} GiB (goal <= 1); largest peak RSS: "
                   f"{summary['peak_rss_gib']:.2f} GiB (goal <= 12)")
    finally:
        if not workdir:
            shutil.rmtree(work, ignore_errors=True)


@main.command("assemble")
@click.argument("work")
@click.option("--tokens", default=600)
@click.option("--seed", default=0)
@click.option("--format", "fmt", default="parquet")
@click.option("--logprob-dtype", "dtype", default="float16")
def assemble_cmd(work, tokens, seed, fmt, dtype):
    assemble(work, tokens, seed, fmt, dtype)


@main.command("load")
@click.argument("work")
@click.option("--max-length", default=2048)
@click.option("--budget", default=8192)
@click.option("--format", "fmt", default="parquet")
def load_cmd(work, max_length, budget, fmt):
    train_load(work, max_length, budget, fmt)


if __name__ == "__main__":
    main()
