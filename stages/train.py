"""train: fine-tune the base model on data/train/<train.data>.<records.format> with DeepSpeed ZeRO.

Single process (no launcher; CPU: DS_ACCELERATOR=cpu + gloo):   python stages/train.py
Data parallel:   torchrun --nproc_per_node N stages/train.py   or   deepspeed --num_gpus N stages/train.py
Writes models/trained (HF folder + tokenizer), metrics/train.json, dvclive/train (per-step logs) and
resumable checkpoints in models/checkpoints. See drsft.train for the details.
"""

from pathlib import Path

import drsft  # noqa: F401 -- first: one clear line when this interpreter lacks the environment

import click

from drsft.params import load_params, section
from drsft.stage import TRAIN_WEIGHT_FACTOR, clear_errors, preflight, weights_bytes
from drsft.train import data_file, train


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--params", "params_path", default="params.yaml", show_default=True)
@click.option("--data-dir", default="data/train", show_default=True,
              help="folder holding the rewritten and expert training rows (train.data picks one)")
@click.option("--data", "data_path", default=None,
              help="a training records file (.jsonl or .parquet) overriding --data-dir/train.data")
@click.option("--problems", default="data/prepare/train.jsonl", show_default=True,
              help="the problems (their text renders the prompts with train.prompt_format: question)")
@click.option("--model", "model_dir", default="models/base", show_default=True)
@click.option("--out", default="models/trained", show_default=True)
@click.option("--checkpoints", default="models/checkpoints", show_default=True)
@click.option("--metrics", default="metrics/train.json", show_default=True)
@click.option("--live-dir", default="dvclive/train", show_default=True)
@click.option("--max-steps", type=int, default=None,
              help="debugging: stop after this many optimizer steps as if killed (no final checkpoint, no model)")
@click.pass_context
@clear_errors
def main(ctx, params_path, data_dir, data_path, problems, model_dir, out, checkpoints, metrics, live_dir, max_steps):
    """Fine-tune the base model on data/train/<train.data>.<records.format> with train.loss (DeepSpeed ZeRO),
    resuming from the last checkpoint of the same run."""
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK is read from the environment instead.
    extra = [a for a in ctx.args if not a.startswith("--local_rank")]
    if extra:
        raise click.UsageError(f"unexpected arguments: {' '.join(extra)}")
    params = load_params(params_path)
    cfg = section(params, "train")   # drsft.train leaves out `launcher` (dvc.yaml's, not the trainer's)
    trust = section(params, "model")["trust_remote_code"]
    preflight([out, checkpoints, metrics, live_dir], need_bytes=TRAIN_WEIGHT_FACTOR * weights_bytes(model_dir))
    path = Path(data_path) if data_path else data_file(data_dir, cfg["data"], section(params, "records")["format"])
    train(cfg, path, model_dir, out, checkpoints, metrics, live_dir=live_dir, trust_remote_code=trust,
          max_steps=max_steps, problems_path=problems)


if __name__ == "__main__":
    main()
