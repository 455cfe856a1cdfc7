"""Teacher-forced log-probabilities: the one computation shared by sampling, scoring and training.

``gather_logprobs`` is the only place where logits become per-token log-probabilities. The hf
rollout backend records behaviour log-probs with it, :func:`score_responses` re-scores
responses with it, and the trainer computes its losses with it, so all three agree to float
rounding (the importance weight of an on-policy token is 1 up to ~1e-6). :func:`score_sharded`
runs :func:`score_responses` in resumable shards, for the stages that score many responses.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from drsft.io import read_records
from drsft.prompts import encode_prompt
from drsft.shards import items_in, run_sharded


_FP32_CHUNK = 4096   # positions per transient fp32 copy of low-precision logits


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[..., label]`` computed in fp32, at temperature 1.

    ``logits``: ``[..., V]`` (any float dtype; upcast to fp32), ``labels``: ``[...]`` integer ids.
    Returns fp32 ``[...]``. Labels < 0 (e.g. the ``-100`` ignore index) give 0.0. Differentiable.
    Computed with the fused ``cross_entropy`` kernel (one pass, no materialised log-softmax): on fp32
    logits over the whole batch at once; on lower-precision logits (bf16 on GPU) one leading row
    (sequence) at a time, in chunks of 4,096 positions, so the transient fp32 copy of the logits is at
    most one chunk, not the whole batch (matters for bf16 logits of a 150k vocabulary).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"gather_logprobs: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    labels = labels.long()
    vocab = logits.shape[-1]

    def one(lg: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
        nll = F.cross_entropy(lg.float().reshape(-1, vocab), lb.reshape(-1), ignore_index=-100, reduction="none")
        return -nll.view(lb.shape)

    valid = labels >= 0
    safe = labels.masked_fill(~valid, -100)     # any negative label is ignored (0.0), not only -100
    if logits.dtype == torch.float32 or logits.dim() <= 2:
        out = one(logits, safe)
    else:  # a packed micro-batch is one long row: chunk it too
        rows = [torch.cat([one(c, d) for c, d in zip(lg.split(_FP32_CHUNK), lb.split(_FP32_CHUNK))])
                for lg, lb in zip(logits, safe)]
        out = torch.stack(rows) if rows else logits.new_zeros(labels.shape, dtype=torch.float32)
    return out.masked_fill(~valid, 0.0)


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


@torch.no_grad()
def score_responses(model, tokenizer, prompts: Sequence[str], response_ids: Sequence[Sequence[int]],
                    batch_size: int = 32) -> list[list[float]]:
    """Per-response-token log-probs at temperature 1, teacher-forced, no grad.

    For each pair the input is ``encode_prompt(tokenizer, prompt) + response_ids``; the result
    holds, for each response token, ``log p(token | prompt, previous response tokens)`` (an empty
    response gives ``[]``). Pairs are sorted by length and batched (``batch_size`` sequences,
    right padding with an attention mask), then returned in the input order. The model's
    train/eval mode is restored afterwards (it is put in eval mode for scoring).
    """
    if len(prompts) != len(response_ids):
        raise ValueError(f"score_responses: {len(prompts)} prompts but {len(response_ids)} responses")
    if batch_size < 1:
        raise ValueError(f"score_responses: batch_size must be >= 1, got {batch_size}")
    vocab = model.get_input_embeddings().weight.shape[0]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded: dict[str, list[int]] = {}
    seqs: list[tuple[list[int], list[int]]] = []
    for i, (prompt, resp) in enumerate(zip(prompts, response_ids)):
        if prompt not in encoded:
            encoded[prompt] = encode_prompt(tokenizer, prompt)
        pids = encoded[prompt]
        resp = [int(t) for t in resp]
        if not pids:
            raise ValueError(f"score_responses: prompt {i} encodes to no tokens")
        bad = [t for t in resp if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"score_responses: response {i} has token ids outside the vocabulary (size {vocab}): {bad[:5]}")
        seqs.append((pids, resp))

    out: list[list[float] | None] = [None] * len(seqs)
    todo = [i for i, (_, r) in enumerate(seqs) if r]
    for i, (_, r) in enumerate(seqs):
        if not r:
            out[i] = []
    todo.sort(key=lambda i: (-(len(seqs[i][0]) + len(seqs[i][1])), i))
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            length = max(len(seqs[i][0]) + len(seqs[i][1]) for i in chunk)
            ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), length), dtype=torch.long)
            labels = torch.full((len(chunk), length), -100, dtype=torch.long)
            for row, i in enumerate(chunk):
                p, r = seqs[i]
                n = len(p) + len(r)
                ids[row, :n] = torch.tensor(p + r)
                attn[row, :n] = 1
                labels[row, len(p):n] = torch.tensor(r)
            positions = torch.arange(length).unsqueeze(0).expand(len(chunk), -1)
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device),
                           position_ids=positions.to(device), use_cache=False).logits
            # position t predicts token t+1
            lp = gather_logprobs(logits[:, :-1], labels[:, 1:].to(device)).cpu()
            for row, i in enumerate(chunk):
                p, r = seqs[i]
                out[i] = lp[row, len(p) - 1:len(p) - 1 + len(r)].tolist()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


def score_sharded(out_dir, shard_size: int, keys: Sequence[str], prompts: Sequence[str],
                  response_ids: Sequence[Sequence[int]], inputs: dict, load: Callable[[], tuple],
                  batch_size: int, progress: bool = False, desc: str = "score", fmt: str = "jsonl",
                  logprob_dtype: str = "float32") -> list[list[float]]:
    """:func:`score_responses` over resumable shards of ``shard_size`` pairs (drsft.shards), in order.

    A killed scoring run keeps its finished shards (records ``{"key", "logprobs"}`` in ``out_dir``, in
    records format ``fmt``: Parquet stores the log-probs as ``logprob_dtype``; what is returned is
    read back from the shards, so a resumed run returns what a fresh one does);
    the rerun scores only the rest. ``keys`` name the pairs (unique strings, e.g. problem ids).
    ``load()`` returns ``(model, tokenizer)`` and is called only when some shard is left to score.
    ``inputs``: what determines the log-probs besides the pairs (the model's fingerprint, dtype); a
    hash of every ``(key, prompt, response_ids)`` is added, so other pairs never reuse a shard.
    """
    if not len(keys) == len(prompts) == len(response_ids):
        raise ValueError(f"score_sharded: {len(keys)} keys, {len(prompts)} prompts, {len(response_ids)} responses")
    h = hashlib.sha256()
    for key, prompt, ids in zip(keys, prompts, response_ids):
        h.update(json.dumps([key, prompt, [int(t) for t in ids]]).encode("utf-8") + b"\n")
    items = list(range(len(keys)))
    state: dict = {"model": None, "bar": None}

    def on_start(resumed, todo):
        if todo:
            state["model"] = load()
            if progress:
                from tqdm.auto import tqdm

                n = items_in(todo, len(items), shard_size)
                state["bar"] = tqdm(total=n, desc=desc, unit="seq", dynamic_ncols=True)

    def process(chunk):
        model, tok = state["model"]
        lps = score_responses(model, tok, [prompts[i] for i in chunk], [response_ids[i] for i in chunk],
                              batch_size=batch_size)
        if state["bar"] is not None:
            state["bar"].update(len(chunk))
        return [{"key": keys[i], "logprobs": lp} for i, lp in zip(chunk, lps)]

    def validate(chunk, records):
        if [r.get("key") for r in records] != [keys[i] for i in chunk]:
            raise ValueError(f"expected the scores of {len(chunk)} pairs in order, got {len(records)} records")
        for i, r in zip(chunk, records):
            lp = r.get("logprobs")
            if (not isinstance(lp, list) or len(lp) != len(response_ids[i])
                    or not all(isinstance(x, float) and math.isfinite(x) and x <= 0 for x in lp)):
                raise ValueError(f"pair {keys[i]!r}: logprobs must be {len(response_ids[i])} finite floats <= 0")

    try:
        run = run_sharded(items, out_dir, shard_size, {**inputs, "pairs_sha256": h.hexdigest()}, process,
                          validate=validate, on_start=on_start, fmt=fmt, logprob_dtype=logprob_dtype)
    finally:
        if state["bar"] is not None:
            state["bar"].close()
    return [rec["logprobs"] for path in run.paths for rec in read_records(path)]
