"""The ``train`` stage: off-policy SFT with DeepSpeed ZeRO (stages 0-3) and the losses of
:mod:`drsft.losses`.

Data. Rows are training examples (docs/records.md). The model input is
``encode_prompt(tokenizer, prompt) + response_ids``; only response tokens are predicted (the
prompt and the padding are masked out of the loss). ``behaviour_logprobs`` (or null) is aligned
with ``response_ids``. ``train.prompt_format: question`` replaces the row's prompt by the chat
template applied to the bare problem (read from the problems file), ``train.response_end: eos``
its response's last token by EOS (:func:`load_examples`). A row longer than ``max_length`` keeps
its whole prompt and loses the end of its response (counted as *truncated*; a sequence-level IS
weight then covers the kept tokens only); a row whose prompt alone leaves no room for a response
token is dropped (counted).

Batching. One optimizer step consumes one *global batch* of ``global_batch_size`` rows. Each
epoch visits the rows in a permutation seeded by ``(seed, epoch)``; the plan of global batches
is a pure function of the seed and the row count, so a resumed run replays exactly the batches
that remain. The last global batch of an epoch may be short (no row is dropped), unless
``drop_last`` (then each epoch ends with its last full batch). A global batch
is cut into ``gradient_accumulation_steps x world_size`` micro-batches of ``micro_batch_size``;
rank ``r`` gets slots ``m * world_size + r``. A slot left empty by a short batch runs a forward
and backward on a masked dummy row (loss 0) so that every rank takes part in the collectives.
With ``batching: tokens`` the global batch is still ``global_batch_size`` rows (the paper's 256
keep their meaning), but each rank's share (rows dealt longest first to the least-loaded rank) is
cut into micro-batches of at most ``max_tokens_per_micro_batch`` tokens (:func:`token_slots`), so
their number varies; ranks with fewer run dummies, and the trainer sets DeepSpeed's accumulation
boundary itself (``set_gradient_accumulation_boundary``, one ``engine.step()`` per global batch).

Packing. With ``packing: true`` a micro-batch's rows run as one padding-free sequence
(:func:`collate_packed`): position ids restart at 0 for each row, which transformers' masks read
as separate sequences (attention confined to each row; flash-attention runs them variable-length,
SDPA and eager with a block-diagonal mask). The log-probs are mapped back to the padded layout, so
the loss, weights, behaviour log-probs and per-tier statistics are those of the padded batch.
Before the first step :func:`check_packing` runs two rows packed and alone and stops the run if
they differ (a model whose attention ignores packed position ids would let rows see each other).

Normalisation (``train.loss_norm``, :func:`micro_batch_normaliser`). ``global_token_mean``: the
loss is the token mean over **all response tokens of the global batch**: every rank knows the
plan, so it knows that count without communication, and each micro-batch divides its weighted sum
by ``tokens_global / (gradient_accumulation_steps * world_size)``; DeepSpeed then divides by the
accumulation steps and averages over ranks (with ``batching: tokens``: by ``tokens_global /
world_size``, and no division by the accumulation steps). The result does not depend on how the
batch is split over micro-batches and processes (the 1- vs 2-process test).
``micro_batch_token_mean_sum`` (the paper's verl trainer): each micro-batch's own token mean,
summed over a rank's micro-batches, averaged over ranks.

Cost. One forward per micro-batch: ``gather_logprobs`` turns the logits into the target-token
log-probs, and the loss weights are computed from their detached values (no second pass).

DeepSpeed. The config dict is built from params (:func:`deepspeed_config`): ZeRO stage, micro
batch, accumulation steps, gradient clipping, bf16 on GPU (fp32 master weights in the ZeRO
optimizer) or fp32 on CPU. The optimizer is ``torch.optim.AdamW`` passed as a client optimizer
(``zero_allow_untested_optimizer``; DeepSpeed's own CPU Adam needs compiled ops and is not
used, ``zero_force_ds_cpu_optimizer: False``), the schedule a ``LambdaLR`` (linear warm-up, then
cosine to 0) that the engine steps at each optimizer step. On a machine without CUDA the stage
sets ``DS_ACCELERATOR=cpu`` and uses gloo. Without a launcher it runs as a single process
(RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT defaulted); with
``torchrun --nproc_per_node N stages/train.py`` or ``deepspeed stages/train.py`` it runs data
parallel. Multi-node runs need the checkpoint folder on a shared file system. ZeRO-3 loads the
model partitioned through ``HfDeepSpeedConfig`` and saves a consolidated copy. What has run on GPUs
(and what has not) is listed in the README's "Running at scale".

Checkpoints. Every ``save_every`` optimizer steps and after the last step the engine saves a
checkpoint (model, ZeRO optimizer partitions, LR schedule, client state: step, loss history,
running statistics) into ``<checkpoints>/step-NNNNNN``; older ones are deleted. The folder also
holds ``fingerprint.json``: a hash of the train params (``save_every`` excluded), the data
file, the base model and the world size. A run whose fingerprint differs discards the old
checkpoints and starts over; a matching one resumes from ``latest``.

Output. The final weights (consolidated from the ZeRO-3 partitions with DeepSpeed's 16-bit
consolidation; whole on every rank for stages 0-2) are saved with ``save_pretrained`` next to
the tokenizer, so :func:`drsft.models.load_model` loads them like any HF model. Per-step logs go
to dvclive (``save_dvc_exp=False, dvcyaml=None``: the pipeline's dvc.yaml declares the plots);
the summary to ``metrics/train.json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drsft.fingerprint import file_sha256, fingerprint, model_fingerprint
from drsft.io import (DataError, atomic_path, check_duplicate_row, iter_records, record_file, require, write_json,
                      write_run_info)
from drsft.params import ParamsError

log = logging.getLogger("drsft.train")

TIERS = ("self", "guided", "fallback", "expert")
DATA_KINDS = ("rewritten", "expert", "self")   # self: the rewritten set's self tier (rejection-sampling FT)
LOSS_NORMS = ("global_token_mean", "micro_batch_token_mean_sum")
PROMPT_FORMATS = ("sampling", "question")
RESPONSE_ENDS = ("end_of_turn", "eos")
LR_SCHEDULES = ("drsft", "verl")
FINGERPRINT_FILE = "fingerprint.json"
CHECKPOINT_FORMAT = 1        # bump when the client state saved in checkpoints changes
TAG_PREFIX = "step-"
# Per-tier statistics summed over ranks each step (see _StepStats).
_SUM_FIELDS = ("tokens", "weight_sum", "ratio_tokens", "clipped_tokens", "wnll_sum", "nll_sum", "rows")


# ----------------------------------------------------------------------------------------------
# Parameters


def validate_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` params section, checked against the typed schema (:mod:`drsft.schema`, the
    one definition of what is legal; params.yaml holds the defaults), with numbers as floats.
    ``launcher`` (the command dvc.yaml runs this stage with) is optional here and not returned:
    it is not a trainer setting and must not enter the checkpoint fingerprint.
    :class:`ParamsError` lists every bad key with its path."""
    from drsft.schema import check_section

    c = {k: v for k, v in cfg.items() if k != "launcher"}
    problems = check_section("train", {**c, "launcher": "python"})
    if problems:
        raise ParamsError("\n".join(f"params.yaml: {path}: {msg}" for path, msg in problems))
    for key in ("lr", "warmup_ratio", "weight_decay", "grad_clip"):
        c[key] = float(c[key])
    return c


def attention_implementation(choice: str, on_gpu: bool, packing: bool) -> str | None:
    """The ``attn_implementation`` the trainer loads the model with (``train.attn_implementation``);
    None is transformers' default (SDPA).

    ``auto``: ``flash_attention_2`` for packed micro-batches on a GPU when the flash-attn package is
    installed (its variable-length kernel runs each packed row on its own, where SDPA applies a
    block-diagonal mask over the whole pack), else the default. ``flash_attention_2`` asked for
    explicitly without a GPU or without flash-attn is a :class:`ParamsError`, raised before the
    model is loaded."""
    import importlib.util

    has_fa = importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        return "flash_attention_2" if on_gpu and packing and has_fa else None
    if choice == "flash_attention_2" and not (on_gpu and has_fa):
        need = "a CUDA GPU" if not on_gpu else "the flash-attn package (pip install flash-attn --no-build-isolation)"
        raise ParamsError(f"params.yaml: train.attn_implementation: flash_attention_2 needs {need}; "
                          "use auto or sdpa")
    return choice


def build_optimizer(model, cfg: Mapping[str, Any]):
    """AdamW at ``train.lr`` with ``train.adam_betas``; weight decay on the matrices only (not on
    norms and biases), or with ``train.weight_decay_1d`` on every parameter (the paper's verl trainer
    passes all parameters to one AdamW group)."""
    import torch

    every = bool(cfg["weight_decay_1d"])
    decay = [p for p in model.parameters() if p.requires_grad and (every or p.ndim >= 2)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not every and p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg["lr"],
                             betas=(float(cfg["adam_betas"][0]), float(cfg["adam_betas"][1])))


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """``global / (micro x world)``, or a :class:`ParamsError` saying what does not divide."""
    per_pass = micro_batch * world_size
    if global_batch % per_pass:
        raise ParamsError(
            f"params.yaml: train.global_batch_size ({global_batch}) must be a multiple of "
            f"train.micro_batch_size ({micro_batch}) x world size ({world_size}) = {per_pass}")
    return global_batch // per_pass


def zero_stage_run(stage: int, world_size: int) -> int:
    """The ZeRO stage DeepSpeed runs for ``train.zero_stage``: stage 2 on a single rank runs as stage 1.
    Partitioning gradients over one rank partitions nothing (stages 1 and 2 then hold the same states
    and compute the same update), yet stage 2 copies every gradient into a reduction bucket from a
    per-parameter hook on every micro-batch: ~6 % of a CPU step here (bench/train_bench.py). Stages
    0, 1 and 3 run as set (stage 3 partitions the parameters themselves and has its own save path)."""
    return 1 if int(stage) == 2 and world_size == 1 else int(stage)


def deepspeed_config(cfg: Mapping[str, Any], world_size: int, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config dict for validated train params (never a hand-edited JSON)."""
    gas = accumulation_steps(cfg["global_batch_size"], cfg["micro_batch_size"], world_size)
    zero: dict[str, Any] = {"stage": zero_stage_run(cfg["zero_stage"], world_size)}
    if cfg["zero_stage"] == 3:
        # lets _zero3_consolidated_16bit_state_dict / save_16bit_model gather the full weights
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_batch_size": int(cfg["global_batch_size"]),
        "train_micro_batch_size_per_gpu": int(cfg["micro_batch_size"]),
        "gradient_accumulation_steps": gas,
        "gradient_clipping": float(cfg["grad_clip"]),
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,     # client torch AdamW under ZeRO
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": bool(on_gpu)},
        "fp16": {"enabled": False},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "drsft") -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based) under ``train.lr_schedule``:

    * ``drsft``: linear warm-up reaching 1 at step ``warmup_steps - 1`` (the first step trains at
      ``1 / warmup_steps``), then cosine from 1 (step ``warmup_steps``) towards 0;
    * ``verl``: verl's ``get_cosine_schedule_with_warmup`` (the paper's trainer): the warm-up starts
      at 0 (the first step moves no weight) and reaches 1 at step ``warmup_steps``, the same cosine.
    """
    if step < warmup_steps:
        return (step + (schedule == "drsft")) / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_ratio: float, schedule: str = "drsft") -> int:
    """Warm-up steps: ``ceil(ratio x steps)`` (drsft), or ``int(ratio x steps)`` as verl rounds down."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown train.lr_schedule {schedule!r}: expected one of {', '.join(LR_SCHEDULES)}")
    return int(math.ceil(warmup_ratio * total_steps)) if schedule == "drsft" else int(warmup_ratio * total_steps)


# ----------------------------------------------------------------------------------------------
# Data


@dataclass
class Example:
    problem_id: str
    tier: str
    input_ids: list[int]              # prompt ids + (possibly truncated) response ids
    prompt_len: int
    behaviour: list[float] | None     # aligned with the kept response ids

    @property
    def n_response(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class DataStats:
    rows: int = 0
    truncated: int = 0
    dropped: int = 0
    known_behaviour: int = 0
    end_changed: int = 0          # responses whose end token ``end_token`` replaced
    end_changed_behaviour: int = 0  # ... of rows with behaviour log-probs (recorded for the old token)
    other_tiers: int = 0          # rows of tiers train.data leaves out (train.data: self)


def load_examples(path: str | os.PathLike, tokenizer, max_length: int, vocab_size: int,
                  questions: Mapping[str, str] | None = None, end_token: int | None = None,
                  tiers: frozenset[str] | None = None) -> tuple[list[Example], DataStats]:
    """Read training examples (docs/records.md); :class:`DataError` names file, line and field.

    As recorded, a row conditions on its ``prompt`` and its response ends with the token it was
    sampled or written with. ``questions`` (``{problem_id: problem text}``; ``train.prompt_format:
    question``) replaces each prompt by the chat template applied to the bare problem
    (:func:`drsft.prompts.question_prompt`). ``end_token`` (``train.response_end: eos``) replaces
    each response's last token, which ends it (a special token: the stop token it was sampled with,
    or the end written after a demonstration), by that id; a row whose last token is not special
    is a :class:`DataError`. ``tiers``: only rows of these tiers are used (the others are checked
    and counted in ``rows``, not in ``used``)."""
    from drsft.prompts import encode_prompt, question_prompt, special_ids

    specials = special_ids(tokenizer) if end_token is not None else set()
    stats = DataStats()
    examples: list[Example] = []
    cache: dict[str, list[int]] = {}
    seen: dict = {}
    for line, rec in iter_records(path):
        stats.rows += 1
        pid = require(rec, "problem_id", path, line)
        tier = require(rec, "tier", path, line)
        if tier not in TIERS:
            raise DataError(path, line, f"unknown tier {tier!r} (expected one of {', '.join(TIERS)})", "tier")
        prompt = require(rec, "prompt", path, line)
        resp = require(rec, "response_ids", path, line, list)
        for j, t in enumerate(resp):
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise DataError(path, line, f"item {j} = {t!r} is not a token id in [0, {vocab_size})", "response_ids")
        beh = rec.get("behaviour_logprobs")
        if beh is not None:
            if not isinstance(beh, list) or len(beh) != len(resp):
                n = len(beh) if isinstance(beh, list) else type(beh).__name__
                raise DataError(path, line, f"must be null or a list of {len(resp)} log-probs (one per response "
                                            f"token), got {n}", "behaviour_logprobs")
            for j, v in enumerate(beh):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > 1e-3:
                    raise DataError(path, line, f"item {j} = {v!r} is not a finite log-probability <= 0",
                                    "behaviour_logprobs")
            beh = [min(float(v), 0.0) for v in beh]
            stats.known_behaviour += 1
        check_duplicate_row(seen, pid, tier, resp, path, line)
        if tiers is not None and tier not in tiers:
            stats.other_tiers += 1
            continue
        if questions is not None:
            if pid not in questions:
                raise DataError(path, line, f"{pid!r} is not a problem of the problems file (train.prompt_format: "
                                            f"question renders the prompt from the problem's text)", "problem_id")
            prompt = question_prompt(tokenizer, questions[pid])
        if end_token is not None and resp and resp[-1] != end_token:
            if resp[-1] not in specials:
                raise DataError(path, line, f"ends with token {resp[-1]}, not a special token: train.response_end: "
                                            f"eos replaces the token that ends a response (docs/records.md)",
                                "response_ids")
            resp = [*resp[:-1], end_token]
            stats.end_changed += 1
            stats.end_changed_behaviour += beh is not None
        if prompt not in cache:
            cache[prompt] = encode_prompt(tokenizer, prompt)
        pids = cache[prompt]
        room = max_length - len(pids)
        if room < 1:
            stats.dropped += 1
            continue
        if len(resp) > room:
            stats.truncated += 1
            resp = resp[:room]
            beh = beh[:room] if beh is not None else None
        examples.append(Example(pid, tier, list(pids) + list(resp), len(pids), beh))
    if not examples:
        raise DataError(path, None, f"no usable training rows ({stats.rows} read, {stats.dropped} with prompts longer "
                                    f"than train.max_length={max_length}, {stats.other_tiers} of other tiers)")
    return examples, stats


def read_questions(problems_path: str | os.PathLike | None) -> dict[str, str]:
    """``{problem id: problem text}`` of the problems file (``train.prompt_format: question``)."""
    if problems_path is None:
        raise ParamsError("params.yaml: train.prompt_format: question renders each prompt from the problem's text: "
                          "the stage needs the problems file (--problems)")
    out: dict[str, str] = {}
    for line, rec in iter_records(problems_path):
        out[require(rec, "id", problems_path, line)] = require(rec, "problem", problems_path, line)
    return out


def response_end_token(tokenizer, response_end: str) -> int | None:
    """The id every training response ends with for ``train.response_end`` (None: as recorded)."""
    if response_end == "end_of_turn":
        return None
    if response_end == "eos":
        if tokenizer.eos_token_id is None:
            raise ParamsError("params.yaml: train.response_end: eos, but the tokenizer has no EOS token")
        return int(tokenizer.eos_token_id)
    raise ValueError(f"unknown train.response_end {response_end!r}: expected one of {', '.join(RESPONSE_ENDS)}")


def check_response_end(loss: str, stats: DataStats) -> None:
    """An importance-sampling loss divides by each token's behaviour probability: a response whose
    sampled stop token ``train.response_end: eos`` replaced has none for the token it trains on."""
    if loss in ("is", "is_dft") and stats.end_changed_behaviour:
        raise ParamsError(f"params.yaml: train.response_end: eos replaces the sampled stop token of "
                          f"{stats.end_changed_behaviour} row(s) with behaviour log-probs, recorded for the token "
                          f"sampled, which train.loss {loss} divides by; use train.response_end end_of_turn "
                          f"with is / is_dft")


def batch_plan(n_examples: int, global_batch: int, epochs: int, seed: int, *, drop_last: bool
               ) -> list[list[int]]:
    """Global batches (lists of example indices) for all epochs, a pure function of its inputs.
    ``drop_last``: each epoch ends with its last full batch (the rows that fall in the short one are
    not trained on in that epoch), as the paper's loader does (``DistributedSampler`` and ``DataLoader``, both
    ``drop_last=True``: ``floor(n / global_batch)`` steps per epoch on its two ranks)."""
    if drop_last and n_examples < global_batch:
        raise ParamsError(f"params.yaml: train.drop_last: {n_examples} training rows make no full batch of "
                          f"train.global_batch_size ({global_batch}): every row would be dropped")
    end = n_examples - (n_examples % global_batch if drop_last else 0)
    plan: list[list[int]] = []
    for epoch in range(epochs):
        order = list(range(n_examples))
        random.Random(f"drsft-train-{seed}-{epoch}").shuffle(order)
        plan.extend(order[i:i + global_batch] for i in range(0, end, global_batch))
    return plan


def micro_batch_normaliser(loss_norm: str, tokens_global: int, tokens_micro: int, gas: int, world_size: int,
                           by_tokens: bool) -> float:
    """What one micro-batch divides its weighted token-loss sum by, so that after DeepSpeed's scaling
    (the loss divided by the accumulation steps ``gas``, unless ``by_tokens``: then the trainer sets
    the boundary and nothing is divided) and its average over the ``world_size`` ranks the optimizer
    sees the gradient ``train.loss_norm`` names:

    * ``global_token_mean``: the token mean over the global batch (``tokens_global`` response tokens
      of all micro-batches of all ranks): every token counts the same, however the batch is split;
    * ``micro_batch_token_mean_sum``: each micro-batch's own token mean, summed over the rank's
      micro-batches, averaged over the ranks (the paper's verl trainer: ``loss / valid_tokens`` per
      micro-batch, ``backward`` per micro-batch, FSDP's average over ranks). The gradient grows with
      the number of micro-batches per rank, and a token of a micro-batch of short responses weighs
      more than one of long responses.

    A micro-batch without response tokens (a dummy) contributes 0 whatever it divides by."""
    if loss_norm == "global_token_mean":
        return tokens_global / (world_size if by_tokens else gas * world_size)
    if loss_norm == "micro_batch_token_mean_sum":
        return max(tokens_micro, 1) / (1 if by_tokens else gas)
    raise ValueError(f"unknown train.loss_norm {loss_norm!r}: expected one of {', '.join(LOSS_NORMS)}")


def micro_slots(global_idx: Sequence[int], micro_batch: int, gas: int, world_size: int, rank: int) -> list[list[int]]:
    """The ``gas`` micro-batches of ``rank`` within one global batch (slot ``m*world + rank``)."""
    out = []
    for m in range(gas):
        slot = m * world_size + rank
        out.append(list(global_idx[slot * micro_batch:(slot + 1) * micro_batch]))
    return out


def micro_batch_tokens(lengths: Sequence[int], packed: bool) -> int:
    """What a micro-batch of rows of these lengths computes: the sum of lengths when packed, the
    rows times the longest when padded."""
    if not lengths:
        return 0
    return sum(lengths) if packed else len(lengths) * max(lengths)


def token_slots(global_idx: Sequence[int], lengths: Sequence[int], budget: int, world_size: int,
                packed: bool) -> list[list[list[int]]]:
    """Every rank's micro-batches of one global batch under a token budget (``batching: tokens``).

    Rows go longest first to the rank with the fewest tokens so far, then, on each rank, first-fit
    into micro-batches of at most ``budget`` tokens (:func:`micro_batch_tokens`). Every rank gets
    the same number of micro-batches (empty ones where it has fewer), so the ranks' backward passes
    pair up. A pure function of its inputs: each rank computes the whole plan and takes its part.
    """
    order = sorted(global_idx, key=lambda i: (-lengths[i], i))
    loads, shares = [0] * world_size, [[] for _ in range(world_size)]
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        shares[r].append(i)
        loads[r] += lengths[i]
    plans = []
    for rows in shares:
        bins: list[list[int]] = []
        for i in rows:
            for b in bins:
                if micro_batch_tokens([lengths[j] for j in b] + [lengths[i]], packed) <= budget:
                    b.append(i)
                    break
            else:
                bins.append([i])
        plans.append(bins)
    n = max(1, max(len(b) for b in plans))
    return [b + [[] for _ in range(n - len(b))] for b in plans]


def step_slots(gidx: Sequence[int], lengths: Sequence[int], cfg: Mapping[str, Any], gas: int, world_size: int
               ) -> list[list[list[int]]]:
    """Every rank's micro-batches (lists of example indices) of one global batch, for either batching."""
    if cfg["batching"] == "tokens":
        return token_slots(gidx, lengths, cfg["max_tokens_per_micro_batch"], world_size, cfg["packing"])
    return [micro_slots(gidx, cfg["micro_batch_size"], gas, world_size, r) for r in range(world_size)]


def batching_summary(plan: Sequence[Sequence[int]], lengths: Sequence[int], cfg: Mapping[str, Any], gas: int,
                     world_size: int) -> dict:
    """Micro-batches per rank and step, and the share of computed tokens that are padding."""
    n_micro = computed = real = 0
    for gidx in plan:
        slots = step_slots(gidx, lengths, cfg, gas, world_size)
        n_micro += len(slots[0])
        for rank_slots in slots:
            for slot in rank_slots:
                ls = [lengths[i] for i in slot]
                computed += micro_batch_tokens(ls, cfg["packing"])
                real += sum(ls)
    return {"micro_batches_per_step": n_micro / max(1, len(plan)), "computed_tokens": computed,
            "padding_share": 1 - real / computed if computed else 0.0}


def collate(examples: Sequence[Example], pad_id: int, dummy: bool = False) -> dict:
    """Right-padded tensors. Targets are shifted: column t of ``labels``/``mask``/``behaviour`` is
    the token at position t+1, predicted by the logits at position t. ``dummy`` masks everything."""
    import torch

    B = len(examples)
    L = max(len(e.input_ids) for e in examples)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L - 1), dtype=torch.float32)
    beh = torch.zeros((B, L - 1), dtype=torch.float32)
    known = torch.zeros(B, dtype=torch.bool)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        if not dummy:
            mask[i, e.prompt_len - 1:n - 1] = 1
            if e.behaviour is not None:
                beh[i, e.prompt_len - 1:n - 1] = torch.tensor(e.behaviour)
                known[i] = True
    positions = torch.arange(L).unsqueeze(0).expand(B, -1).contiguous()
    return {"input_ids": ids, "attention_mask": attn, "position_ids": positions, "labels": ids[:, 1:].clone(),
            "mask": mask, "behaviour": beh, "known": known, "tiers": [e.tier for e in examples],
            "input_tokens": 0 if dummy else int(attn.sum())}


def collate_packed(examples: Sequence[Example], pad_id: int, dummy: bool = False) -> dict:
    """:func:`collate` plus the same rows packed into one padding-free sequence.

    ``packed_ids``/``packed_positions`` (1, N): the rows concatenated, position ids restarting at 0
    for each row (transformers then confines attention to each row: ``find_packed_sequence_indices``);
    ``packed_labels`` (1, N - 1): the next token of each position. ``unpack`` (B, L - 1) maps each
    target of the padded layout to its position in the packed log-probs, so the loss, the behaviour
    log-probs, the weights and the per-tier statistics keep the padded layout (padding points at 0,
    masked). A row's last token would predict the next row's first: no target maps to it."""
    import torch

    batch = collate(examples, pad_id, dummy)
    lengths = [len(e.input_ids) for e in examples]
    ids = torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.long)
    unpack = torch.zeros((len(examples), max(lengths) - 1), dtype=torch.long)
    start = 0
    for i, n in enumerate(lengths):
        unpack[i, :n - 1] = torch.arange(start, start + n - 1)
        start += n
    batch.update(packed_ids=ids[None], packed_positions=torch.cat([torch.arange(n) for n in lengths])[None],
                 packed_labels=ids[1:][None], unpack=unpack)
    return batch


def logprob_chunk(cfg: Mapping[str, Any], ds_cfg: Mapping[str, Any]) -> int:
    """``train.logprob_chunk``, or 0 (the full logits) under ZeRO-3: ZeRO-3 reduces a parameter's
    gradient from a hook on each accumulation, and the output projection used by several
    checkpointed chunks trained wrongly there (tests/test_train.py, token batches under ZeRO-3)."""
    return 0 if ds_cfg["zero_optimization"]["stage"] == 3 else int(cfg["logprob_chunk"])


def forward_logprobs(model, batch: dict, device, packed: bool, chunk: int = 0):
    """Log-probs (B, L - 1) of each target token of ``batch`` (:func:`collate` layout) under ``model``,
    computed padded or packed (:func:`collate_packed`): the same values up to float rounding.

    ``chunk`` > 0 (``train.logprob_chunk``) and a model whose logits are its output projection of the
    final hidden states (:func:`drsft.logprob_head.head_of`): the decoder's hidden states go through
    :func:`drsft.logprob_head.label_logprobs`, which never holds more than ``chunk`` positions'
    logits; otherwise the model computes its full logits."""
    from drsft.logprob_head import head_of, label_logprobs
    from drsft.scoring import gather_logprobs

    inner = getattr(model, "module", model)       # a DeepSpeed engine wraps the model
    head = head_of(inner) if chunk > 0 else None
    if head is not None and callable(getattr(inner, "get_decoder", None)):
        decoder = inner.get_decoder()
        if packed:
            hidden = decoder(input_ids=batch["packed_ids"].to(device), position_ids=batch["packed_positions"].to(device),
                             use_cache=False).last_hidden_state
            lp = label_logprobs(hidden[:, :-1], head, batch["packed_labels"].to(device), chunk)
            return lp[0][batch["unpack"].to(device)]
        hidden = decoder(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         position_ids=batch["position_ids"].to(device), use_cache=False).last_hidden_state
        return label_logprobs(hidden[:, :-1], head, batch["labels"].to(device), chunk)
    if packed:
        logits = model(input_ids=batch["packed_ids"].to(device), position_ids=batch["packed_positions"].to(device),
                       use_cache=False).logits
        return gather_logprobs(logits[:, :-1], batch["packed_labels"].to(device))[0][batch["unpack"].to(device)]
    logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                   position_ids=batch["position_ids"].to(device), use_cache=False).logits
    return gather_logprobs(logits[:, :-1], batch["labels"].to(device))


def check_packing(model, examples: Sequence[Example], pad_id: int, device, tol: float) -> float:
    """Run two rows packed and each alone; raise if the packed log-probs differ by more than ``tol``
    (the model's attention let a row see the other: a model or transformers version whose masks do
    not read packed position ids). Returns the largest difference."""
    import torch

    rows = list(examples[:2])
    if len(rows) < 2:
        return 0.0
    was_training = model.training
    model.eval()  # no dropout: the two computations must be comparable
    with torch.no_grad():
        batch = collate_packed(rows, pad_id)
        packed = forward_logprobs(model, batch, device, packed=True)
        worst = 0.0
        for i, e in enumerate(rows):
            alone = forward_logprobs(model, collate([e], pad_id), device, packed=False)[0]
            n = len(e.input_ids) - 1
            worst = max(worst, float((packed[i, :n].float() - alone[:n].float()).abs().max()))
    model.train(was_training)
    if worst > tol:
        raise RuntimeError(f"train.packing: packed rows change each other's log-probs (max difference {worst:.3g} > "
                           f"{tol}): this model's attention does not confine packed rows (custom modelling code, "
                           f"or a transformers version without packed-sequence masks); set train.packing: false")
    return worst


# ----------------------------------------------------------------------------------------------
# Fingerprint of a run (what a checkpoint may be resumed into)


def run_fingerprint(cfg: Mapping[str, Any], data_path: str | os.PathLike, model_dir: str | os.PathLike,
                    resolved_model: str, world_size: int, problems_path: str | os.PathLike | None = None) -> dict:
    """What a checkpoint may be resumed into: the train params (``save_every`` aside), the data file,
    the base model, the world size, and the problems file when the prompts are rendered from it
    (``train.prompt_format: question``)."""
    ident = {
        "format": CHECKPOINT_FORMAT,
        "train": {k: v for k, v in sorted(cfg.items()) if k != "save_every"},
        "data_sha256": file_sha256(Path(data_path)),
        "base_model": model_fingerprint(model_dir),
        "resolved_model": resolved_model if not Path(resolved_model).is_dir() else "local",
        "world_size": world_size,
    }
    if problems_path is not None:
        ident["problems_sha256"] = file_sha256(Path(problems_path))
    ident["hash"] = fingerprint(ident)
    return ident


def _tags(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir())


def _latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by ``latest`` (written atomically after a complete save), if it exists."""
    try:
        tag = (ckpt_dir / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if tag and (ckpt_dir / tag).is_dir() else None


def _clear_checkpoints(ckpt_dir: Path) -> None:
    """Remove what this stage writes in the folder (and nothing else)."""
    for p in _tags(ckpt_dir):
        shutil.rmtree(p)
    for name in ("latest", FINGERPRINT_FILE, "zero_to_fp32.py"):
        (ckpt_dir / name).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Distributed plumbing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_environment() -> bool:
    """Env defaults for a launcher-less single process and the CPU accelerator. Must run before
    deepspeed is imported. Returns whether CUDA is used."""
    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    return on_gpu


def _init_distributed(on_gpu: bool):
    import deepspeed
    import torch.distributed as dist

    if not on_gpu:
        skip_shm_comm_build(deepspeed)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", verbose=False)
    return dist


def skip_shm_comm_build(deepspeed) -> bool:
    """Keep DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    On CPU, ``deepspeed.init_distributed`` compiles ``deepspeed_shm_comm`` (C++, ~45 s on two
    cores, again for every new virtual-environment path) for ``inference_all_reduce``, which only
    DeepSpeed-inference's tensor parallelism calls; training reduces through torch.distributed.
    DeepSpeed reads the op's availability from the ``deepspeed.ops.__compatible_ops__`` dict, kept
    in the module so that edits to it persist; marking the op unavailable skips the build. Returns
    whether the op was marked."""
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(ops, dict) or "deepspeed_shm_comm" not in ops:
        return False
    ops["deepspeed_shm_comm"] = False
    return True


class _StepStats:
    """Per-tier sums (and max weight) of one optimizer step on this rank, reduced over ranks."""

    def __init__(self, torch, device):
        self.torch = torch
        self.sums = torch.zeros(len(TIERS), len(_SUM_FIELDS), dtype=torch.float64, device=device)
        self.maxw = torch.zeros(len(TIERS), dtype=torch.float64, device=device)

    def add(self, batch: dict, out, logp) -> None:
        torch = self.torch
        m = batch["mask"].to(out.weights.device).bool()
        w = out.weights.double()
        lp = torch.where(m, logp.detach().double(), torch.zeros((), dtype=torch.float64, device=m.device))
        rows = {
            "tokens": m.sum(1).double(),
            "weight_sum": w.sum(1),
            "ratio_tokens": (m & out.ratio_rows[:, None]).sum(1).double(),
            "clipped_tokens": out.clipped.sum(1).double(),
            "wnll_sum": -(w * lp).sum(1),
            "nll_sum": -lp.sum(1),
            "rows": (m.sum(1) > 0).double(),
        }
        per_row = torch.stack([rows[f] for f in _SUM_FIELDS], dim=1).to(self.sums.device)
        row_max = (w * m).max(dim=1).values.to(self.maxw.device)
        for i, tier in enumerate(batch["tiers"]):
            t = TIERS.index(tier)
            self.sums[t] += per_row[i]
            self.maxw[t] = torch.maximum(self.maxw[t], row_max[i])

    def reduce(self, dist) -> None:
        if dist.get_world_size() > 1:
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM)
            dist.all_reduce(self.maxw, op=dist.ReduceOp.MAX)

    def as_dict(self) -> dict[str, dict[str, float]]:
        sums = self.sums.cpu().tolist()
        maxw = self.maxw.cpu().tolist()
        return {tier: {**dict(zip(_SUM_FIELDS, sums[i])), "weight_max": maxw[i]} for i, tier in enumerate(TIERS)}


def _merge_totals(totals: dict, step: dict) -> None:
    for tier, vals in step.items():
        acc = totals.setdefault(tier, {f: 0.0 for f in _SUM_FIELDS} | {"weight_max": 0.0})
        for f in _SUM_FIELDS:
            acc[f] += vals[f]
        acc["weight_max"] = max(acc["weight_max"], vals["weight_max"])


def weight_summary(totals: Mapping[str, Mapping[str, float]]) -> dict:
    """``{"all": {...}, "<tier>": {...}}`` with weight_mean, weight_max, clip_frac, tokens, rows."""
    def one(v):
        return {
            "tokens": int(v["tokens"]),
            "rows": int(v["rows"]),
            "weight_mean": v["weight_sum"] / v["tokens"] if v["tokens"] else None,
            "weight_max": v["weight_max"] if v["tokens"] else None,
            "clip_frac": v["clipped_tokens"] / v["ratio_tokens"] if v["ratio_tokens"] else None,
            "nll": v["nll_sum"] / v["tokens"] if v["tokens"] else None,
        }

    out = {tier: one(v) for tier, v in totals.items() if v["tokens"]}
    allv = {f: sum(v[f] for v in totals.values()) for f in _SUM_FIELDS}
    allv["weight_max"] = max((v["weight_max"] for v in totals.values()), default=0.0)
    out["all"] = one(allv)
    return out


def _trim_live_history(live_dir: Path, keep_below: int) -> None:
    """Drop dvclive rows of steps >= ``keep_below`` (logged after the checkpoint we resume from)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        lines = tsv.read_text(encoding="utf-8").splitlines(keepends=True)
        if not lines:
            continue
        header, rows = lines[0], lines[1:]
        cols = header.rstrip("\n").split("\t")
        if "step" not in cols:
            continue
        si = cols.index("step")
        kept = [r for r in rows if r.strip() and int(r.split("\t")[si]) < keep_below]
        with atomic_path(tsv) as fh:
            fh.write(header)
            fh.writelines(kept)


# ----------------------------------------------------------------------------------------------
# The trainer


def _save_final_model(engine, model, tokenizer, out_dir: Path, zero_stage: int, rank: int, dist,
                      lora: Mapping[str, Any] | None = None, resolved: str | None = None,
                      trust_remote_code: bool = False) -> None:
    """The final weights as a plain HF folder beside the tokenizer; with ``lora`` (``r`` > 0) the
    adapters merged into the base weights (:func:`merged_lora`)."""
    import torch

    if zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()   # all ranks; full on rank 0
    else:
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else None
    if rank == 0:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with torch.no_grad():
            if lora is not None and lora["r"]:
                dtype = next(iter(state_dict.values())).dtype
                merged_lora(resolved, state_dict, lora, dtype, trust_remote_code).save_pretrained(tmp)
            else:
                model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    dist.barrier()


def _checkpoint_dir(ckpt_dir: Path, fp: dict, rank: int, dist) -> None:
    """Keep only checkpoints of this run: others (params, data, base model or world size changed)
    are discarded, and a tag folder that `latest` does not name (a kill while saving) is removed."""
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        fp_file = ckpt_dir / FINGERPRINT_FILE
        old = None
        if fp_file.exists():
            try:
                old = json.loads(fp_file.read_text(encoding="utf-8")).get("hash")
            except (OSError, ValueError):
                old = None
        if old != fp["hash"]:
            if old is not None or _tags(ckpt_dir):
                log.warning("%s: checkpoints are from a different run (params, data, base model or world size "
                            "changed): discarding them", ckpt_dir)
            _clear_checkpoints(ckpt_dir)
            write_json(fp_file, fp)
        keep = _latest_tag(ckpt_dir)
        for partial in _tags(ckpt_dir):
            if partial.name != keep:
                log.warning("%s: removing %s, a checkpoint interrupted while being saved", ckpt_dir, partial.name)
                shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()


def lora_config(lora: Mapping[str, Any]):
    """peft's ``LoraConfig`` for ``train.lora`` (``r`` > 0): adapters on ``target_modules`` (peft's
    ``all-linear``: every linear layer but the output projection), no bias."""
    from peft import LoraConfig

    targets = lora["target_modules"]
    return LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=targets if isinstance(targets, str) else list(targets), bias="none",
                      task_type="CAUSAL_LM")


def with_lora(model, lora: Mapping[str, Any]):
    """The model itself (``train.lora.r: 0``: full fine-tuning), or the model with LoRA adapters, the
    only parameters that train (peft; B starts at zero, so the model computes what it did)."""
    if not lora["r"]:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora_config(lora))


def merged_lora(resolved: str, state_dict: Mapping[str, Any], lora: Mapping[str, Any], dtype,
                trust_remote_code: bool = False):
    """A plain model whose weights are the base model's with the trained adapters merged in (the
    adapters' state from ``state_dict``, the LoRA model's own state as saved): what ``models/trained``
    holds, so evaluation and vLLM need nothing of peft."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code)
    peft_model = with_lora(base, lora)
    missing, unexpected = peft_model.load_state_dict(dict(state_dict), strict=False)
    adapters = [k for k in missing if "lora_" in k]
    if adapters or unexpected:
        raise RuntimeError(f"train.lora: the trained state does not fit the LoRA model: missing {adapters[:3]}, "
                           f"unexpected {list(unexpected)[:3]}")
    return peft_model.merge_and_unload()


def _build_engine(cfg: Mapping[str, Any], ds_cfg: dict, resolved: str, on_gpu: bool, total_steps: int,
                  trust_remote_code: bool = False, attn: str | None = None):
    """The model (ZeRO-3: partitioned while loading; ``attn``: its attention implementation, None for
    transformers' default, see :func:`attention_implementation`), AdamW and the warm-up/cosine
    schedule, wrapped by DeepSpeed."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    random.seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    warmup = warmup_steps_for(total_steps, cfg["warmup_ratio"], cfg["lr_schedule"])
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hf_ds = None
    if cfg["zero_stage"] == 3:
        # Partition the weights while loading (zero.Init); must stay alive until initialize.
        from transformers.integrations import HfDeepSpeedConfig
        hf_ds = HfDeepSpeedConfig(ds_cfg)  # noqa: F841
    model = AutoModelForCausalLM.from_pretrained(resolved, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 **({"attn_implementation": attn} if attn else {}))
    model.config.use_cache = False
    model = with_lora(model, cfg["lora"])
    if cfg["gradient_checkpointing"]:
        model.gradient_checkpointing_enable()
        if cfg["lora"]["r"]:
            model.enable_input_require_grads()   # frozen embeddings: checkpointed blocks still need an input grad
    model.train()
    optimizer = build_optimizer(model, cfg)

    def make_scheduler(opt):
        # Built by DeepSpeed on the optimizer it wraps (ZeRO-3 regroups the parameters).
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup, cfg["lr_schedule"]))

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=make_scheduler,
                                           config=ds_cfg)
    del hf_ds
    return engine


def _resume(engine, ckpt_dir: Path, fp: dict, total_steps: int, rank: int) -> dict[str, Any]:
    """The loop's state: fresh, or restored (with the engine's) from the latest checkpoint."""
    state: dict[str, Any] = {"step": 0, "history": [], "nll_history": [], "train_time_s": 0.0, "input_tokens": 0,
                             "totals": {}, "resumed_from": []}
    tag = _latest_tag(ckpt_dir)
    if tag is not None:
        load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if load_path is None or not client or client.get("fingerprint") != fp["hash"]:
            raise RuntimeError(f"{ckpt_dir}: could not resume from the latest checkpoint ({load_path}); "
                               f"delete the folder to start over")
        state = {k: client[k] for k in state}
        state["resumed_from"] = state["resumed_from"] + [state["step"]]
        if rank == 0:
            log.info("resumed from %s at optimizer step %d/%d", load_path, state["step"], total_steps)
    return state


def _open_live(live_dir, state: dict, cfg: Mapping[str, Any], world: int, gas: int):
    """The dvclive history (rank 0), its steps after the resumed one trimmed."""
    from dvclive import Live

    live_dir = Path(live_dir)
    resuming = state["step"] > 0
    if resuming:
        _trim_live_history(live_dir, state["step"])
    live = Live(dir=str(live_dir), resume=resuming, save_dvc_exp=False, dvcyaml=None, report=None)
    live.step = state["step"]
    live.log_params({"train": {k: v for k, v in cfg.items()}, "world_size": world, "gradient_accumulation_steps": gas})
    return live


def _save_checkpoint(engine, ckpt_dir: Path, state: dict, fp: dict, step: int, rank: int, dist) -> None:
    """A checkpoint of the engine and the loop's state; only the newest is kept."""
    tag = f"{TAG_PREFIX}{step:06d}"
    # DeepSpeed's own `latest` is rewritten in place (a kill mid-write leaves it empty): we write it
    # ourselves, atomically, once every rank has finished writing the tag.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={**state, "fingerprint": fp["hash"]},
                           save_latest=False)
    dist.barrier()
    if rank == 0:
        with atomic_path(ckpt_dir / "latest") as fh:
            fh.write(tag)
        for old in _tags(ckpt_dir):
            if old.name != tag:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


@dataclass
class _Run:
    """What every optimizer step needs: the engine, the data, the plan and the process layout."""

    engine: Any
    cfg: Mapping[str, Any]
    ds_cfg: dict
    examples: list[Example]
    plan: list[list[int]]
    lengths: list[int]
    tokens_global: list[int]
    gas: int
    world: int
    rank: int
    device: Any
    pad_id: int
    dist: Any


def _train_step(run: _Run, step: int) -> dict[str, Any]:
    """One optimizer step over global batch ``plan[step]``: this rank's micro-batches (rows, or a
    token budget with our own accumulation boundary), forward, weighted loss, backward, step.
    Returns the step's loss, NLL, learning rate, gradient norm, per-tier sums and input tokens
    (summed over ranks)."""
    import torch

    from drsft.losses import weighted_nll

    cfg, engine, device = run.cfg, run.engine, run.device
    torch.manual_seed(cfg["seed"] * 1_000_003 + step)   # dropout etc.: identical after a resume
    make_batch = collate_packed if cfg["packing"] else collate
    by_tokens = cfg["batching"] == "tokens"
    gidx = run.plan[step]
    slots = step_slots(gidx, run.lengths, cfg, run.gas, run.world)[run.rank]
    lr = engine.get_lr()[0]
    stats = _StepStats(torch, device)
    input_tokens = 0
    grad_norm = None
    for m, slot in enumerate(slots):
        if by_tokens:
            engine.set_gradient_accumulation_boundary(m == len(slots) - 1)
        batch = make_batch([run.examples[i] for i in slot], run.pad_id) if slot else \
            make_batch([run.examples[gidx[0]]], run.pad_id, dummy=True)
        input_tokens += batch["input_tokens"]
        logp = forward_logprobs(engine, batch, device, cfg["packing"], logprob_chunk(cfg, run.ds_cfg))
        # batching: tokens -- the boundary is ours (a varying number of micro-batches), the loss is not scaled by gas
        normaliser = micro_batch_normaliser(cfg["loss_norm"], run.tokens_global[step], int(batch["mask"].sum()),
                                            run.gas, run.world, by_tokens)
        out = weighted_nll(logp, batch["mask"].to(device), cfg["loss"], batch["behaviour"].to(device),
                           batch["known"].to(device), is_clip=cfg["is_clip"], is_level=cfg["is_level"],
                           normaliser=normaliser)
        engine.backward(out.loss, scale_wrt_gas=not by_tokens)
        if cfg["zero_stage"] == 0 and not run.ds_cfg["bf16"]["enabled"] and m == len(slots) - 1:
            # ZeRO-0 in fp32 does not record the norm: the gradients are reduced at the
            # boundary backward, so take it here (before clipping, like ZeRO-1..3's).
            grads = [p.grad.detach().double().norm() for p in engine.module.parameters() if p.grad is not None]
            grad_norm = float(torch.stack(grads).norm()) if grads else 0.0
        if not by_tokens or m == len(slots) - 1:
            engine.step()
        if slot:
            stats.add(batch, out, logp)
        del logp, out
    if grad_norm is None:
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    stats.reduce(run.dist)
    tok = torch.tensor([float(input_tokens)], dtype=torch.float64, device=device)
    if run.world > 1:
        run.dist.all_reduce(tok)
    step_stats = stats.as_dict()
    n_tok = sum(v["tokens"] for v in step_stats.values())
    return {"loss": sum(v["wnll_sum"] for v in step_stats.values()) / n_tok,
            "nll": sum(v["nll_sum"] for v in step_stats.values()) / n_tok,
            "lr": lr, "grad_norm": grad_norm, "stats": step_stats, "input_tokens": int(tok.item())}


def _log_step(live, out: dict) -> None:
    """One step of the dvclive history: losses, lr, gradient norm, per-tier weight statistics."""
    for key in ("loss", "nll", "lr", "grad_norm"):
        live.log_metric(f"train/{key}", out[key])
    for tier, v in weight_summary(out["stats"]).items():
        for key in ("weight_mean", "weight_max", "clip_frac"):
            if v[key] is not None:
                live.log_metric(f"weights/{tier}/{key}", v[key])
    live.next_step()


def train(cfg: Mapping[str, Any], data_path: str | os.PathLike, model_dir: str | os.PathLike,
          out_dir: str | os.PathLike, ckpt_dir: str | os.PathLike, metrics_path: str | os.PathLike | None,
          live_dir: str | os.PathLike | None = None, trust_remote_code: bool = False,
          max_steps: int | None = None, problems_path: str | os.PathLike | None = None) -> dict | None:
    """Train and save the model; returns the metrics dict (on every rank), or ``None`` when
    ``max_steps`` stopped the run early (a debugging aid that simulates a kill: no final
    checkpoint, no model, no metrics; the next call resumes from the last periodic checkpoint).

    In order: the process group and DeepSpeed config; the data and the batch plan; the checkpoint
    folder (this run's only); the engine (:func:`_build_engine`); the resumed state
    (:func:`_resume`); then the steps (:func:`_train_step`), logged to dvclive and checkpointed
    every ``save_every``; the final model, gathered from the ZeRO partitions; the metrics.
    ``problems_path``: the problems file (``data/prepare/train.jsonl``), read with
    ``train.prompt_format: question``."""
    cfg = validate_config(cfg)
    on_gpu = setup_environment()

    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoConfig

    from drsft.models import load_tokenizer, resolve_model

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # Fail on a batch size that does not divide before starting any process group.
    deepspeed_config(cfg, int(os.environ["WORLD_SIZE"]), on_gpu)
    attn = attention_implementation(cfg["attn_implementation"], on_gpu, cfg["packing"])  # a bad choice fails here
    if on_gpu:
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist = _init_distributed(on_gpu)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(get_accelerator().current_device_name())
    out_dir, ckpt_dir = Path(out_dir), Path(ckpt_dir)
    ds_cfg = deepspeed_config(cfg, world, on_gpu)
    gas = ds_cfg["gradient_accumulation_steps"]
    if rank == 0 and cfg["logprob_chunk"] and not logprob_chunk(cfg, ds_cfg):
        log.info("train.logprob_chunk: ZeRO-3 computes the full logits (its gradient hooks and the chunked head's "
                 "repeated use of the output projection do not mix)")
    if rank == 0 and ds_cfg["zero_optimization"]["stage"] != cfg["zero_stage"]:
        log.info("train.zero_stage %d on a single rank runs as ZeRO stage %d (nothing to partition)",
                 cfg["zero_stage"], ds_cfg["zero_optimization"]["stage"])

    # Data: examples checked and tokenized, token ids validated against the vocabulary (read from
    # the config, before any weights are loaded).
    resolved = resolve_model(model_dir)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    conf = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    conf = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    vocab = getattr(conf, "vocab_size", None) or len(tokenizer)
    questions = read_questions(problems_path) if cfg["prompt_format"] == "question" else None
    end_token = response_end_token(tokenizer, cfg["response_end"])
    examples, dstats = load_examples(data_path, tokenizer, cfg["max_length"], vocab, questions=questions,
                                     end_token=end_token, tiers=data_tiers(cfg["data"]))
    check_response_end(cfg["loss"], dstats)
    if cfg["loss"] in ("is", "is_dft") and dstats.known_behaviour == 0 and rank == 0:
        log.warning("loss %s but no row has behaviour_logprobs: every row uses the DFT fallback weight", cfg["loss"])
    if rank == 0:
        log.info("%s: %d rows, %d used, %d truncated to max_length=%d, %d dropped, %d with behaviour log-probs",
                 data_path, dstats.rows, len(examples), dstats.truncated, cfg["max_length"], dstats.dropped,
                 dstats.known_behaviour)
    plan = batch_plan(len(examples), cfg["global_batch_size"], cfg["epochs"], cfg["seed"], drop_last=cfg["drop_last"])
    total_steps = len(plan)

    fp = run_fingerprint(cfg, data_path, model_dir, resolved, world, problems_path if questions is not None else None)
    _checkpoint_dir(ckpt_dir, fp, rank, dist)
    engine = _build_engine(cfg, ds_cfg, resolved, on_gpu, total_steps, trust_remote_code, attn)
    state = _resume(engine, ckpt_dir, fp, total_steps, rank)
    live = _open_live(live_dir, state, cfg, world, gas) if rank == 0 and live_dir is not None else None

    if cfg["packing"]:
        # bf16 rounding moves log-probs by up to ~0.1; a row that sees another moves them by nats
        diff = check_packing(engine.module, examples, tokenizer.pad_token_id, device, tol=0.5 if on_gpu else 1e-3)
        if rank == 0:
            log.info("packing: packed rows match rows alone (max log-prob difference %.2g)", diff)
    lengths = [len(e.input_ids) for e in examples]
    run = _Run(engine=engine, cfg=cfg, ds_cfg=ds_cfg, examples=examples, plan=plan, lengths=lengths,
               tokens_global=[sum(examples[i].n_response for i in gidx) for gidx in plan], gas=gas, world=world,
               rank=rank, device=device, pad_id=tokenizer.pad_token_id, dist=dist)
    t_segment = time.perf_counter()
    # A bar on an interactive terminal (rank 0); elsewhere (dvc's captured log, CI) one line per step.
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], desc="train", unit="step", dynamic_ncols=True,
               disable=None if rank == 0 else True)
    stopped_early = False
    for step in range(state["step"], total_steps):
        if max_steps is not None and step >= max_steps:
            stopped_early = True
            break
        t0 = time.perf_counter()
        out = _train_step(run, step)
        dt = time.perf_counter() - t0
        state["step"] = step + 1
        state["history"].append(out["loss"])
        state["nll_history"].append(out["nll"])
        state["input_tokens"] += out["input_tokens"]
        _merge_totals(state["totals"], out["stats"])
        state["train_time_s"] += dt
        if live is not None:
            _log_step(live, out)
        if rank == 0:
            log.log(logging.DEBUG if not bar.disable else logging.INFO,
                    "step %d/%d loss %.4f nll %.4f lr %.3g grad_norm %.3f (%.2fs)", step + 1, total_steps,
                    out["loss"], out["nll"], out["lr"], out["grad_norm"], dt)
            bar.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2g}", refresh=False)
            bar.update(1)
        if (step + 1) % cfg["save_every"] == 0 or step + 1 == total_steps:
            _save_checkpoint(engine, ckpt_dir, state, fp, step + 1, rank, dist)
    bar.close()

    if stopped_early:
        if rank == 0:
            log.warning("stopped at max_steps=%d (step %d/%d) without saving a model", max_steps, state["step"],
                        total_steps)
            if live is not None:
                live.end()
        dist.barrier()
        return None

    _save_final_model(engine, engine.module, tokenizer, out_dir, cfg["zero_stage"], rank, dist, cfg["lora"], resolved,
                      trust_remote_code)
    metrics = _summary(run, state, dstats)
    # what this run did and how long it took: beside the metrics, not in them (drsft.io.write_run_info)
    run_info = {"train_time_s": state["train_time_s"],
                "tokens_per_s": state["input_tokens"] / state["train_time_s"] if state["train_time_s"] > 0 else None,
                "resumed_from_steps": state["resumed_from"]}
    if rank == 0:
        if metrics_path is not None:
            write_json(metrics_path, metrics)
            write_run_info(metrics_path, run_info)
        if live is not None:
            live.summary.update({"final_loss": metrics["final_loss"], "mean_loss": metrics["mean_loss"]})
            live.end()
        log.info("trained %d steps in %.1fs (this run %.1fs); model saved to %s", total_steps, state["train_time_s"],
                 time.perf_counter() - t_segment, out_dir)
    dist.barrier()
    return {**metrics, **run_info}


def _summary(run: _Run, state: dict, dstats: DataStats) -> dict:
    """metrics/train.json: the run's data, losses, per-tier weights and batching."""
    cfg, history, nlls = run.cfg, state["history"], state["nll_history"]
    return {
        "steps": len(run.plan),
        "epochs": cfg["epochs"],
        "examples": sum(len(b) for b in run.plan),     # rows trained on, over the epochs (drop_last: fewer)
        "rows": dstats.rows,
        "rows_used": len(run.examples),
        "truncated": dstats.truncated,
        "dropped": dstats.dropped,
        "other_tiers": dstats.other_tiers,
        "response_end_replaced": dstats.end_changed,
        "response_tokens": int(sum(run.tokens_global)),
        "input_tokens": state["input_tokens"],
        "final_loss": history[-1] if history else None,
        "mean_loss": sum(history) / len(history) if history else None,
        "final_nll": nlls[-1] if nlls else None,
        "mean_nll": sum(nlls) / len(nlls) if nlls else None,
        "weights": weight_summary(state["totals"]),
        "loss": cfg["loss"],
        "zero_stage": cfg["zero_stage"],
        "zero_stage_run": run.ds_cfg["zero_optimization"]["stage"],
        "world_size": run.world,
        "gradient_accumulation_steps": run.gas,
        "packing": cfg["packing"],
        "batching": cfg["batching"],
        **batching_summary(run.plan, run.lengths, cfg, run.gas, run.world),
    }


def data_file(data_dir: str | os.PathLike, kind: str, fmt: str = "jsonl") -> Path:
    """``data/train/<kind>.<fmt>`` for ``train.data`` and ``records.format``; ``self`` reads the
    rewritten set (:func:`data_tiers` keeps its self tier)."""
    if kind not in DATA_KINDS:
        raise ParamsError(f"params.yaml: train.data = {kind!r}: expected one of {', '.join(DATA_KINDS)}")
    return record_file(data_dir, "rewritten" if kind == "self" else kind, fmt)


def data_tiers(kind: str) -> frozenset[str] | None:
    """The tiers of the file that ``train.data`` trains on (None: every row): ``self`` is rejection-
    sampling fine-tuning, the model's own correct samples alone (problems without one are left out)."""
    return frozenset({"self"}) if kind == "self" else None


__all__ = ["TIERS", "Example", "DataStats", "validate_config", "accumulation_steps", "deepspeed_config",
           "lr_factor", "warmup_steps_for", "load_examples", "batch_plan", "micro_slots", "collate",
           "run_fingerprint", "setup_environment", "weight_summary", "train", "data_file", "data_tiers", "build_optimizer",
           "attention_implementation"]
