"""The embedded tiny causal LM: a byte-level BPE tokenizer and a small Llama built from a config.

Both are saved with ``save_pretrained`` so that ``AutoTokenizer.from_pretrained(path)`` and
``AutoModelForCausalLM.from_pretrained(path)`` load them exactly like a hub model.
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A chat template in the usual Jinja form: role markers, generation prompt for the assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Train a byte-level BPE (digits split one per token) and wrap it as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", padding_side="left")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(tokenizer, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                intermediate_size: int = 384, max_position_embeddings: int = 1024, seed: int = 0):
    """A randomly initialised Llama sized for CPU (about 1M parameters at the defaults)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``min_ratio * lr``."""
    import math

    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def encode_example(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + response + EOS`` and the number of prompt tokens.

    The prompt is encoded with :func:`drsft.prompts.encode_prompt` and the response separately,
    exactly as a sampler sees them (prompt ids, then generated ids ending in EOS).
    """
    from drsft.prompts import encode_prompt

    p = encode_prompt(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    return p + r + [tokenizer.eos_token_id], len(p)


def _batches(lengths: list[int], batch_size: int, gen) -> list[list[int]]:
    """One epoch of batches: a seeded permutation, length-sorted within windows of 16 batches
    (less padding), then the batches shuffled."""
    import torch

    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * 16
    batches = []
    for s in range(0, len(perm), window):
        chunk = sorted(perm[s:s + window], key=lambda i: (lengths[i], i))
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=gen).tolist()
    return [batches[i] for i in order]


def _batch_tensors(idx, seqs, starts, pad):
    """Right-padded ``input_ids`` and ``labels`` (-100 outside the loss) for the rows ``idx``.

    ``starts[i]``: first labelled position of row ``i`` (its prompt length); ``None``: every token
    after BOS (drills)."""
    import torch

    width = max(len(seqs[i]) for i in idx)
    input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
    labels = torch.full((len(idx), width), -100, dtype=torch.long)
    for row, i in enumerate(idx):
        s = torch.tensor(seqs[i], dtype=torch.long)
        st = 1 if starts is None else starts[i]
        input_ids[row, :len(s)] = s
        labels[row, st:len(s)] = s[st:]
    return input_ids, labels


def _labelled(seqs, starts, idx) -> int:
    """Loss tokens of the rows ``idx`` (next-token targets from each row's first labelled position)."""
    return sum(len(seqs[i]) - (1 if starts is None else starts[i]) for i in idx)


def _loss_sum(model, input_ids, labels):
    """Summed next-token cross-entropy over the labelled positions.

    The output projection runs on the labelled positions only (prompts and padding need no
    logits): the same loss as projecting every position, at a fraction of the vocabulary matmul."""
    import torch

    hidden = model.model(input_ids=input_ids).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[keep]).float()
    return torch.nn.functional.cross_entropy(logits, target[keep], reduction="sum")


def _train_loop(model, data: dict, cfg: dict, *, rank: int = 0, world: int = 1, allreduce=None, log=print,
                t0: float = 0.0) -> dict:
    """The optimiser loop of :func:`pretrain` on rank ``rank`` of ``world`` processes.

    Every rank draws the same batches (same seeded generators) and computes the loss on its share
    of each batch's rows (``idx[rank::world]``), summed and divided by the whole batch's loss-token
    count; ``allreduce`` sums the flattened gradients (and the loss, for logging) over the ranks, so
    the update is that of the token-mean loss over the whole batch and the weights stay identical on
    every rank. ``world == 1``: no communication."""
    import time

    import torch

    seqs, starts, dseqs = data["seqs"], data["starts"], data["dseqs"]
    lengths, dlengths = [len(s) for s in seqs], [len(s) for s in dseqs]
    steps, lr, seed = int(cfg["steps"]), float(cfg["lr"]), int(cfg["seed"])
    drill_frac, log_every, grad_clip = float(cfg["drill_frac"]), int(cfg["log_every"]), float(cfg["grad_clip"])
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=float(cfg["weight_decay"]))
    gen = torch.Generator().manual_seed(seed)
    dgen = torch.Generator().manual_seed(seed + 1)
    model.train()
    queue: list[list[int]] = []
    dqueue: list[list[int]] = []
    n_drill_steps, n_tokens = 0, 0
    losses: list[float] = []
    dlosses: list[float] = []
    for step in range(steps):
        drill = int((step + 1) * drill_frac) > int(step * drill_frac)
        if drill:
            if not dqueue:
                dqueue = _batches(dlengths, int(cfg["drill_batch_size"]), dgen)
            idx, bseqs, bstarts = dqueue.pop(0), dseqs, None
            n_drill_steps += 1
        else:
            if not queue:
                queue = _batches(lengths, int(cfg["batch_size"]), gen)
            idx, bseqs, bstarts = queue.pop(0), seqs, starts
        total = _labelled(bseqs, bstarts, idx)
        mine = idx[rank::world]
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, int(cfg["warmup_steps"]), lr)
        opt.zero_grad(set_to_none=True)
        if mine:
            loss = _loss_sum(model, *_batch_tensors(mine, bseqs, bstarts, cfg["pad"])) / total
            loss.backward()
            loss_value = loss.detach().reshape(1)
        else:
            loss_value = torch.zeros(1)
        if allreduce is not None:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                             + [loss_value])
            allreduce(flat)
            offset = 0
            for p in params:
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p)
                offset += n
            loss_value = flat[offset:]
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        (dlosses if drill else losses).append(float(loss_value))
        if not drill:
            n_tokens += total
        if rank == 0 and ((step + 1) % log_every == 0 or step == 0 or step + 1 == steps):
            recent = losses[-log_every:] or [float("nan")]
            drec = f" drill loss {sum(dlosses[-log_every:]) / len(dlosses[-log_every:]):.4f}" if dlosses else ""
            log(f"pretrain step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f}{drec} "
                f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s")
    model.eval()
    return {"losses": losses, "drill_steps": n_drill_steps, "response_tokens": n_tokens}


def _rank_main(rank: int, world: int, init_file: str, model, data: dict, cfg: dict, messages, out_file: str):
    """A pretraining process (started by :func:`pretrain`): gloo over a file rendezvous, one share of each batch."""
    import copy
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(int(cfg["threads"]))
    model = copy.deepcopy(model)  # the argument's tensors are shared memory: every rank needs its own
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        out = _train_loop(model, data, cfg, rank=rank, world=world, allreduce=dist.all_reduce,
                          log=messages.put, t0=cfg["t0"])
        if rank == 0:
            torch.save({"state": model.state_dict(), "out": out}, out_file)
    finally:
        dist.destroy_process_group()


def _train_processes(model, data: dict, cfg: dict, processes: int, log) -> dict:
    """Run :func:`_train_loop` in ``processes`` ranks; load rank 0's weights into ``model``.

    Forked on Linux when each rank runs one thread: a spawned rank would re-import torch and
    transformers and unpickle the data before its first step. A forked rank sets one thread before
    any torch work, so it never enters the OpenMP pool it inherits (the rule torch's DataLoader
    workers follow). Spawned otherwise."""
    import queue
    import sys
    import tempfile
    from pathlib import Path

    import torch
    import torch.multiprocessing as mp

    method = "fork" if sys.platform.startswith("linux") and int(cfg["threads"]) == 1 else "spawn"
    ctx = mp.get_context(method)
    messages = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="drsft-pretrain-") as tmp:
        out_file = str(Path(tmp) / "rank0.pt")
        procs = mp.start_processes(_rank_main, args=(processes, str(Path(tmp) / "rendezvous"), model, data, cfg,
                                                     messages, out_file),
                                   nprocs=processes, join=False, start_method=method)

        def drain():
            while True:
                try:
                    log(messages.get_nowait())
                except queue.Empty:
                    return

        while not procs.join(timeout=1):
            drain()
        drain()
        saved = torch.load(out_file, weights_only=True)
    model.load_state_dict(saved["state"])
    return saved["out"]


def pretrain(out_dir, examples, prompt_cfg, *, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128,
             num_layers: int = 4, num_heads: int = 4, intermediate_size: int = 384, steps: int = 300,
             batch_size: int = 32, lr: float = 3e-3, warmup_steps: int = 20, weight_decay: float = 0.0,
             grad_clip: float = 1.0, max_length: int = 512, threads: int = 2, processes: int = 1,
             log_every: int = 25, drills=(), drill_frac: float = 0.0, drill_batch_size: int | None = None,
             log=print) -> dict:
    """Pretrain the embedded tiny model on chat examples and save model + tokenizer to ``out_dir``.

    ``examples``: objects with ``problem``, ``hint`` (``None`` for a plain prompt) and ``response``
    (e.g. :class:`drsft.toy.world.PretrainExample`). Each is rendered with
    :func:`drsft.prompts.render_prompt` (the guided template when there is a hint), followed by the
    response and EOS; the loss (token mean over the batch) covers the response tokens (EOS
    included) only. Plain torch AdamW, a fixed number of optimiser ``steps`` (cycling through the
    examples in seeded epochs).

    ``drills``: optional plain texts (e.g. arithmetic-table drills, :func:`drsft.toy.world.fact_drills`),
    trained as ``BOS text EOS`` with the loss on every token after BOS; a ``drill_frac`` share of
    the steps (spread evenly) takes a batch of ``drill_batch_size`` (default ``batch_size``) drills
    instead of chat examples. Drills are short, so those steps are cheap.

    ``processes`` > 1: data parallelism over that many CPU processes of ``threads`` threads
    each (gloo), every one on a share of each batch's rows; the same loss and update as one process,
    up to float rounding. On small matrices two single-thread processes beat one two-thread process.

    Deterministic on CPU: thread and process counts are fixed and every RNG is seeded, so the same
    arguments give byte-identical weights. Returns a summary (parameter count, first and last
    losses, wall time, token counts).
    """
    import time
    from pathlib import Path

    import torch

    from drsft.prompts import render_prompt

    t0 = time.time()
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        examples = list(examples)
        if not examples:
            raise ValueError("pretrain: no examples")
        processes = int(processes)
        if processes < 1:
            raise ValueError(f"pretrain: processes must be >= 1, got {processes}")
        texts = [prompt_cfg.get("system", ""), prompt_cfg.get("instruction", ""),
                 prompt_cfg.get("guided_template", "")]
        for ex in examples:
            texts += [ex.problem, ex.response] + ([ex.hint] if ex.hint else [])
        drills = list(drills)
        if not 0.0 <= float(drill_frac) < 1.0:
            raise ValueError(f"pretrain: drill_frac must be in [0, 1), got {drill_frac}")
        if drill_frac and not drills:
            raise ValueError("pretrain: drill_frac > 0 but no drills")
        tok = build_tokenizer(texts, vocab_size=vocab_size)
        model = build_model(tok, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                            intermediate_size=intermediate_size, max_position_embeddings=max(1024, max_length),
                            seed=seed)
        n_params = sum(p.numel() for p in model.parameters())

        seqs, starts, dropped = [], [], 0
        for ex in examples:
            ids, n_prompt = encode_example(tok, render_prompt(tok, ex.problem, prompt_cfg, hint=ex.hint),
                                           ex.response)
            if len(ids) > max_length:
                dropped += 1
                continue
            seqs.append(ids)
            starts.append(n_prompt)
        if not seqs:
            raise ValueError(f"pretrain: every example is longer than max_length={max_length}")
        dseqs = [([tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_length]
                 for d in drills] if drill_frac else []
        log(f"pretrain: {len(seqs)} examples ({dropped} dropped > {max_length} tokens), "
            f"mean {sum(len(s) for s in seqs) / len(seqs):.0f} tokens, vocab {len(tok)}, {n_params / 1e6:.2f}M params"
            + (f", {processes} processes" if processes > 1 else ""))

        data = {"seqs": seqs, "starts": starts, "dseqs": dseqs}
        cfg = {"steps": steps, "lr": lr, "seed": seed, "drill_frac": drill_frac, "log_every": log_every,
               "grad_clip": grad_clip, "weight_decay": weight_decay, "warmup_steps": warmup_steps,
               "batch_size": batch_size, "drill_batch_size": drill_batch_size or batch_size,
               "pad": tok.pad_token_id, "threads": threads, "t0": t0}
        if processes == 1:
            out = _train_loop(model, data, cfg, log=log, t0=t0)
        else:
            out = _train_processes(model, data, cfg, processes, log)
        losses = out["losses"]
        out_path = Path(out_dir)
        out_path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_path)
        tok.save_pretrained(out_path)
        tail = losses[-min(len(losses), log_every):]
        return {"params": n_params, "vocab_size": len(tok), "steps": steps, "batch_size": batch_size,
                "examples": len(seqs), "dropped_long": dropped,
                "drills": len(dseqs), "drill_steps": out["drill_steps"], "response_tokens": out["response_tokens"],
                "loss_first": losses[0], "loss_final": sum(tail) / len(tail),
                "seconds": round(time.time() - t0, 1), "threads": int(threads), "processes": processes}
    finally:
        torch.set_num_threads(prev_threads)
