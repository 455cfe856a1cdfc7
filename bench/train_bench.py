"""Trainer throughput: our DeepSpeed trainer (``drsft.train.train``) vs the plain transformers
``Trainer`` doing SFT on the same model, the same rows and the same micro-batches, in one process.

Target (issue): ours / baseline tokens/s >= 0.95 -- the IS and DFT weights are computed from the
detached log-probs of the one forward pass, so ``is_dft`` must cost no second forward.

What is compared
* Ours: ``train(cfg, ...)`` with ``loss: sft`` and ``loss: is_dft`` (ZeRO stage from params.yaml,
  single process, fp32 on CPU, gloo), ``save_every`` beyond the run so it saves once at the end.
  ZeRO-2 runs as ZeRO-1 in one process (``drsft.train.zero_stage_run``: nothing to partition), for
  ours and the Trainer + DeepSpeed alike (it is given our DeepSpeed config).
* Baseline: ``transformers.Trainer`` (accelerate), input ids ``encode_prompt(tok, prompt) +
  response_ids`` (the same truncation to ``max_length`` as ours), labels -100 on the prompt and
  the padding, the model's own causal-LM loss; AdamW, linear warm-up + cosine, the same lr /
  micro batch / accumulation / grad clip / steps; no eval, no saving, ``report_to=[]``.
* Baseline with DeepSpeed (ZeRO stage >= 1): the same ``Trainer`` through its own DeepSpeed
  integration, ``TrainingArguments(deepspeed=<our deepspeed_config>)``: the same engine and ZeRO
  config as ours, so its ratio is our trainer's own cost; the ratio vs the plain ``Trainer`` also
  holds DeepSpeed's own cost.
* Same micro-batches: the baseline's rows are laid out in our trainer's batch plan
  (``drsft.train.batch_plan``) and read sequentially, and both pad to the longest row of each
  micro-batch, so both process exactly the same tensors (checked: equal token counts).

Tokens are the **input tokens** (prompt + response, padding excluded) -- what ``train()``
reports as ``tokens_per_s``; response tokens/s are printed too. Timing covers the training loop
only: for ours ``train_time_s`` (the sum of the per-step times: collate, forward, loss and
weights, backward, optimizer step, step statistics), for the baseline the time from the
``on_train_begin`` callback to the last ``on_step_end`` (data loading, forward, backward, clip,
optimizer and scheduler step). Model loading, DeepSpeed initialisation, checkpoint and model
saving are excluded on both sides. Runs are interleaved (baseline, sft, is_dft, then the reverse
order, ...) and after one untimed warm-up of each the medians are reported.

Threads: ``torch.set_num_threads(--threads)`` for every run, and ``OMP_WAIT_POLICY=PASSIVE``
unless set: on this shared 2-core machine, with other jobs running, spinning OpenMP workers made
both trainers 10-30x slower and erratic (a 1 s loop took 30 s); set ``OMP_WAIT_POLICY=ACTIVE``
to see it. ``--zero-stage`` overrides ``train.zero_stage``. The last lines give, per interleaved
rep, ours / Trainer as a mean with its 95 % t interval over the reps.

Uses ``models/base`` and ``data/train/rewritten.jsonl`` (after ``dvc repro``); without them a
random tiny Llama (drsft.toy.tinylm) and synthetic rows are built, and the output says so.

    python bench/train_bench.py [--rows 256] [--reps 3] [--threads 2] [--out bench.json]
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
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
try:
    import drsft  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "src"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting turn an oversubscribed CPU (other jobs on this shared
# 2-core machine) into 10-30x slower, erratic steps for *both* trainers; passive waiting keeps the
# figures about the trainers. Must be set before torch loads; an explicit value is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# What drsft.train.setup_environment sets for a launcher-less process; accelerate reads
# LOCAL_RANK != -1 on CPU as a multi-process run and would wrap the baseline in DDP.
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")

import click  # noqa: E402

from drsft.io import iter_jsonl, write_json, write_jsonl  # noqa: E402
from drsft.params import load_params, section  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Inputs


def synthetic_world(work: Path, prompt_cfg: dict, n_rows: int, seed: int = 0) -> tuple[Path, Path]:
    """A random tiny Llama and rows shaped like data/train/rewritten.jsonl (no dvc repro needed)."""
    from drsft.prompts import encode_response, render_prompt
    from drsft.rewrite import training_row
    from drsft.toy.tinylm import build_model, build_tokenizer

    rng = random.Random(seed)
    texts = []
    for _ in range(400):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        texts.append(f"Compute ${a} + {b}$. We add the numbers: {a} + {b} = {a + b}. "
                     f"The answer is \\boxed{{{a + b}}}.")
    texts += [prompt_cfg.get("system", ""), prompt_cfg.get("instruction", "")]
    tok = build_tokenizer(texts, vocab_size=534)
    model = build_model(tok, hidden_size=96, num_layers=4, num_heads=4, intermediate_size=256, seed=seed)
    model_dir = work / "synthetic_model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    rows = []
    for i in range(n_rows):
        text = texts[i % 400]
        problem, solution = text.split(" We add", 1)
        ids = encode_response(tok, ("We add" + solution) * rng.randint(1, 3))
        known = i % 3 != 2
        rows.append(training_row(f"syn-{i:05d}", "self" if known else "fallback", render_prompt(tok, problem, prompt_cfg),
                                 "", ids, [-rng.random() for _ in ids] if known else None,
                                 [-rng.random() for _ in ids], "sampled" if known else "unknown"))
    data = work / "synthetic.jsonl"
    write_jsonl(data, rows)
    return model_dir, data


def subset(src: Path, dst: Path, n_rows: int) -> int:
    """The first ``n_rows`` rows of ``src`` (verbatim lines) into ``dst``; returns how many."""
    n = 0
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for line in fin:
            if not line.strip():
                continue
            if n == n_rows:
                break
            fout.write(line if line.endswith("\n") else line + "\n")
            n += 1
    return n


def restore_env(env0: dict) -> None:
    """Restore the launcher variables that our trainer's ``setup_environment`` set, so that the
    baseline runs as a plain single process (checked: accelerate mode NO, no DDP wrapper). The
    gloo group our trainer created stays (DeepSpeed caches its groups); nothing uses it then."""
    for k in DIST_ENV:
        if env0.get(k) is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = env0[k]


# ----------------------------------------------------------------------------------------------
# Baseline: plain transformers Trainer


def baseline_rows(data: Path, tok, max_length: int) -> list[tuple[list[int], int]]:
    """``(input_ids, prompt_len)`` per row: prompt ids + response ids, response cut to fit."""
    from drsft.prompts import encode_prompt

    out = []
    cache: dict[str, list[int]] = {}
    for _, rec in iter_jsonl(data):
        p = rec["prompt"]
        if p not in cache:
            cache[p] = encode_prompt(tok, p)
        pids = cache[p]
        room = max_length - len(pids)
        if room < 1:
            continue
        out.append((list(pids) + list(rec["response_ids"][:room]), len(pids)))
    return out


def run_baseline(model_dir: Path, rows, plan, cfg: dict, steps: int, warmup: int, gas: int, pad_id: int,
                 work: Path, threads: int, ds_cfg: dict | None = None) -> dict:
    """The transformers Trainer; with ``ds_cfg``, through its own DeepSpeed integration with our
    ZeRO config (``TrainingArguments(deepspeed=...)``), the same engine our trainer uses."""
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(threads)
    accelerate_env0 = {k for k in os.environ if k.startswith("ACCELERATE_")}
    ordered = [rows[i] for gidx in plan[:steps] for i in gidx]
    counts = {"input": 0, "response": 0}

    def collate(batch):
        L = max(len(ids) for ids, _ in batch)
        B = len(batch)
        input_ids = torch.full((B, L), pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        labels = torch.full((B, L), -100, dtype=torch.long)
        for i, (ids, plen) in enumerate(batch):
            t = torch.tensor(ids)
            input_ids[i, :len(ids)] = t
            attn[i, :len(ids)] = 1
            labels[i, plen:len(ids)] = t[plen:]
            counts["input"] += len(ids)
            counts["response"] += len(ids) - plen
        return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        t_begin = t_end = None

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.t_end = time.perf_counter()

    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.config.use_cache = False
    args = TrainingArguments(
        output_dir=str(work / "hf_out"), per_device_train_batch_size=cfg["micro_batch_size"],
        gradient_accumulation_steps=gas, learning_rate=cfg["lr"], max_steps=steps, lr_scheduler_type="cosine",
        warmup_steps=warmup, weight_decay=cfg["weight_decay"], max_grad_norm=cfg["grad_clip"], optim="adamw_torch",
        use_cpu=True, bf16=False, fp16=False, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
        remove_unused_columns=False, seed=cfg["seed"], data_seed=cfg["seed"], deepspeed=ds_cfg)
    clock = Clock()
    trainer = InOrder(model=model, args=args, train_dataset=ordered, data_collator=collate, callbacks=[clock])
    with contextlib.redirect_stdout(io.StringIO()):     # the Trainer prints its summary dict
        out = trainer.train()
    dt = clock.t_end - clock.t_begin
    res = {"input_tokens": counts["input"], "response_tokens": counts["response"], "train_time_s": dt,
           "steps": trainer.state.global_step, "threads": torch.get_num_threads(),
           "distributed_type": str(trainer.accelerator.distributed_type), "model_class": type(trainer.model_wrapped).__name__,
           "train_runtime_s": out.metrics.get("train_runtime")}
    del trainer, model
    if ds_cfg is not None:
        # accelerate's AcceleratorState and transformers' global DeepSpeed config outlive the
        # Trainer: reset them, or the next plain Trainer would run through DeepSpeed too.
        from accelerate.state import AcceleratorState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        AcceleratorState._reset_state(True)
        unset_hf_deepspeed_config()
        for k in [k for k in os.environ if k.startswith("ACCELERATE_") and k not in accelerate_env0]:
            os.environ.pop(k)   # TrainingArguments(deepspeed=...) sets ACCELERATE_USE_DEEPSPEED
    return res


# ----------------------------------------------------------------------------------------------
# Ours


def run_ours(cfg: dict, loss: str, data: Path, model_dir: Path, work: Path, threads: int) -> dict:
    import torch

    from drsft.train import train

    torch.set_num_threads(threads)
    run_dir = Path(tempfile.mkdtemp(prefix=f"ours-{loss}-", dir=work))
    try:
        m = train({**cfg, "loss": loss}, data, model_dir, run_dir / "model", run_dir / "ckpt", None)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"input_tokens": m["input_tokens"], "response_tokens": m["response_tokens"],
            "train_time_s": m["train_time_s"], "steps": m["steps"], "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------


def _median_rate(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] / r["train_time_s"] for r in runs)


def paired_ratio(ours: list[dict], base: list[dict]) -> dict:
    """Per interleaved rep, the baseline's loop time over ours (the same tokens: ours / baseline
    tokens/s), as mean with a 95 % t interval over reps; None bounds with fewer than two reps."""
    from drsft.ablation import world_interval   # the t interval the ablation puts over worlds

    ratios = [b["train_time_s"] / o["train_time_s"] for o, b in zip(ours, base)]
    ci = world_interval(ratios)
    return {"mean": statistics.fmean(ratios), "ci": ci or [None, None], "reps": len(ratios)}


@click.command()
@click.option("--params", "params_path", default=str(ROOT / "params.yaml"), show_default=True)
@click.option("--model", "model_dir", default=str(ROOT / "models/base"), show_default=True)
@click.option("--data", "data_path", default=str(ROOT / "data/train/rewritten.jsonl"), show_default=True)
@click.option("--rows", default=256, show_default=True,
              help="rows used (rounded down to a multiple of train.global_batch_size): one epoch of them")
@click.option("--reps", default=3, show_default=True, type=click.IntRange(min=1), help="timed repetitions of each trainer (after a warm-up)")
@click.option("--threads", default=2, show_default=True, help="torch.set_num_threads for every run")
@click.option("--zero-stage", type=int, default=None, help="override train.zero_stage")
@click.option("--out", "out_path", default=None, help="also write the figures as JSON here")
def main(params_path, model_dir, data_path, rows, reps, threads, zero_stage, out_path):
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    logging.basicConfig(level=logging.WARNING)
    for name in ("drsft", "DeepSpeed", "deepspeed", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(threads)
    from drsft.models import load_tokenizer
    from drsft.train import accumulation_steps, batch_plan, validate_config, warmup_steps_for, zero_stage_run

    params = load_params(params_path)
    cfg = validate_config(section(params, "train"))
    if zero_stage is not None:
        cfg["zero_stage"] = zero_stage
    gbs = cfg["global_batch_size"]
    rows = max(gbs, rows // gbs * gbs)
    cfg.update(epochs=1, save_every=10 ** 6)
    cfg = validate_config(cfg)
    stage_run = zero_stage_run(cfg["zero_stage"], 1)   # what our trainer and the Trainer + DeepSpeed run

    env0 = {k: os.environ.get(k) for k in DIST_ENV}
    work = Path(tempfile.mkdtemp(prefix="train_bench-"))
    try:
        model_dir, data_src = Path(model_dir), Path(data_path)
        if (model_dir / "config.json").exists() and data_src.exists():
            source = f"real: {model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir} + " \
                     f"{data_src.relative_to(ROOT) if data_src.is_relative_to(ROOT) else data_src}"
        else:
            source = "SYNTHETIC (models/base or data/train/rewritten.jsonl missing: run `dvc repro`): random " \
                     "tiny Llama + random rows"
            model_dir, data_src = synthetic_world(work, section(params, "prompt"), rows)
        data = work / "rows.jsonl"
        n = subset(data_src, data, rows)
        if n < rows:
            rows = max(gbs, n // gbs * gbs)
            subset(data_src, data, rows)
        tok = load_tokenizer(model_dir)
        base_rows = baseline_rows(data, tok, cfg["max_length"])
        if len(base_rows) % gbs:
            raise SystemExit(f"{len(base_rows)} usable rows is not a multiple of the global batch {gbs}")
        gas = accumulation_steps(gbs, cfg["micro_batch_size"], 1)
        plan = batch_plan(len(base_rows), gbs, 1, cfg["seed"], drop_last=cfg["drop_last"])
        steps = len(plan)
        warmup = warmup_steps_for(steps, cfg["warmup_ratio"])

        import deepspeed

        from drsft.train import deepspeed_config, setup_environment, skip_shm_comm_build

        skip_shm_comm_build(deepspeed)  # as our trainer does on CPU: the Trainer's DeepSpeed init would compile it
        ds_cfg = deepspeed_config(cfg, 1, on_gpu=False) if cfg["zero_stage"] > 0 else None
        order = ["baseline", *(["baseline_ds"] if ds_cfg else []), "sft", "is_dft"]
        runs: dict[str, list[dict]] = {k: [] for k in order}
        for rep in range(reps + 1):
            for kind in order if rep % 2 == 0 else order[::-1]:
                restore_env(env0)
                if kind == "baseline":
                    r = run_baseline(model_dir, base_rows, plan, cfg, steps, warmup, gas, tok.pad_token_id, work,
                                     threads)
                elif kind == "baseline_ds":
                    setup_environment()   # one gloo process, as for ours
                    r = run_baseline(model_dir, base_rows, plan, cfg, steps, warmup, gas, tok.pad_token_id, work,
                                     threads, ds_cfg=ds_cfg)
                else:
                    r = run_ours(cfg, kind, data, model_dir, work, threads)
                restore_env(env0)
                r["warmup"] = rep == 0
                runs[kind].append(r)
                print(f"  {'warm-up' if rep == 0 else f'rep {rep}':7s} {kind:8s} {r['input_tokens']:6d} tok "
                      f"{r['train_time_s']:6.2f}s {r['input_tokens'] / r['train_time_s']:8.0f} tok/s "
                      f"(threads {r['threads']})", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    timed = {k: [r for r in v if not r["warmup"]] or v for k, v in runs.items()}
    toks = {k: {(r["input_tokens"], r["response_tokens"]) for r in v} for k, v in runs.items()}
    same_tokens = len(set().union(*toks.values())) == 1
    base = _median_rate(timed["baseline"], "input_tokens")
    base_ds = _median_rate(timed["baseline_ds"], "input_tokens") if "baseline_ds" in timed else None
    table = {}
    for k in order:
        tps = _median_rate(timed[k], "input_tokens")
        table[k] = {"tokens_per_s": tps, "response_tokens_per_s": _median_rate(timed[k], "response_tokens"),
                    "ratio": tps / base, "ratio_vs_trainer_deepspeed": tps / base_ds if base_ds else None,
                    "train_time_s": [round(r["train_time_s"], 3) for r in timed[k]],
                    "per_rep_ratio": paired_ratio(timed[k], timed["baseline"]),
                    "per_rep_ratio_vs_trainer_deepspeed":
                        paired_ratio(timed[k], timed["baseline_ds"]) if "baseline_ds" in timed else None,
                    "input_tokens": timed[k][0]["input_tokens"], "response_tokens": timed[k][0]["response_tokens"]}
    load_end = os.getloadavg()
    result = {
        "source": source, "rows": rows, "steps": steps, "micro_batch_size": cfg["micro_batch_size"],
        "global_batch_size": gbs, "gradient_accumulation_steps": gas, "max_length": cfg["max_length"],
        "zero_stage": cfg["zero_stage"], "zero_stage_run": stage_run, "threads": threads, "reps": reps, "token_count": "input tokens "
        "(prompt + response, no padding)", "same_tokens": same_tokens,
        "baseline_distributed_type": sorted({r["distributed_type"] for r in runs["baseline"]}),
        "baseline_ds_model_class": sorted({r["model_class"] for r in runs.get("baseline_ds", [])}),
        "baseline_model_class": sorted({r["model_class"] for r in runs["baseline"]}),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_start": load_start, "loadavg_end": load_end, "results": table,
        "target_ratio": 0.95, "wall_s": time.perf_counter() - t_start,
    }

    print()
    print(f"data: {source}; {rows} rows, {steps} steps of {gbs} rows (micro {cfg['micro_batch_size']} x "
          f"accumulation {gas}), max_length {cfg['max_length']}, ZeRO {cfg['zero_stage']} (runs as "
          f"{stage_run} on one rank), fp32 CPU, "
          f"{threads} threads (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}), single process; baseline "
          f"accelerate mode {'/'.join(result['baseline_distributed_type'])}, model "
          f"{'/'.join(result['baseline_model_class'])}")
    print(f"tokens = input tokens (prompt + response, padding excluded), identical across trainers: {same_tokens}; "
          f"time = training loop only (no model load / DeepSpeed init / saving); median of {reps} interleaved "
          f"reps after a warm-up")
    print()
    print("| trainer | tokens/s | response tokens/s | ratio vs HF Trainer | ratio vs HF Trainer + DeepSpeed "
          "(same ZeRO) | loop times (s) |")
    print("|---|---:|---:|---:|---:|---|")
    names = {"baseline": "transformers Trainer (sft)",
             "baseline_ds": f"transformers Trainer + DeepSpeed ZeRO-{stage_run} (sft; "
                            f"{'/'.join(result['baseline_ds_model_class'])})",
             "sft": "drsft DeepSpeed, sft", "is_dft": "drsft DeepSpeed, is_dft"}
    for k in order:
        v = table[k]
        vs_ds = "—" if v["ratio_vs_trainer_deepspeed"] is None else f"{v['ratio_vs_trainer_deepspeed']:.3f}"
        print(f"| {names[k]} | {v['tokens_per_s']:,.0f} | {v['response_tokens_per_s']:,.0f} | {v['ratio']:.3f} | "
              f"{vs_ds} | {', '.join(f'{t:.2f}' for t in v['train_time_s'])} |")
    def _ci(r):
        return f"{r['mean']:.3f}" + ("" if r["ci"][0] is None else f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]")

    print()
    print(f"per interleaved rep (same tokens), mean with 95 % t interval over {reps} reps: ours / Trainer: "
          + ", ".join(f"{k} {_ci(table[k]['per_rep_ratio'])}" for k in ("sft", "is_dft"))
          + ("" if "baseline_ds" not in table else "; ours / Trainer + DeepSpeed: "
             + ", ".join(f"{k} {_ci(table[k]['per_rep_ratio_vs_trainer_deepspeed'])}" for k in ("sft", "is_dft"))))
    print(f"load average (1/5/15 min): start {' '.join(f'{x:.2f}' for x in load_start)}, "
          f"end {' '.join(f'{x:.2f}' for x in load_end)}; {os.cpu_count()} CPUs; wall {result['wall_s']:.0f}s")
    if out_path:
        write_json(out_path, result)
    if not same_tokens:
        print(f"WARNING: token counts differ between trainers: {toks}")


if __name__ == "__main__":
    main()
