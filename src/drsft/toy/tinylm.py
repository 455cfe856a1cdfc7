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


def pretrain(out_dir, examples, prompt_cfg, *, seed: int = 0, vocab_size: int = 512, hidden_size: int = 128,
             num_layers: int = 4, num_heads: int = 4, intermediate_size: int = 384, steps: int = 300,
             batch_size: int = 32, lr: float = 3e-3, warmup_steps: int = 20, weight_decay: float = 0.0,
             grad_clip: float = 1.0, max_length: int = 512, threads: int = 2, log_every: int = 25,
             drills=(), drill_frac: float = 0.0, drill_batch_size: int | None = None, log=print) -> dict:
    """Pretrain the embedded tiny model on chat examples and save model + tokenizer to ``out_dir``.

    ``examples``: objects with ``problem``, ``hint`` (``None`` for a plain prompt) and ``response``
    (e.g. :class:`drsft.toy.world.PretrainExample`). Each is rendered with
    :func:`drsft.prompts.render_prompt` (the guided template when there is a hint), followed by the
    response and EOS; the loss covers the response tokens (EOS included) only. Plain torch AdamW,
    a fixed number of optimiser ``steps`` (cycling through the examples in seeded epochs).

    ``drills``: optional plain texts (e.g. arithmetic-table drills, :func:`drsft.toy.world.fact_drills`),
    trained as ``BOS text EOS`` with the loss on every token after BOS; a ``drill_frac`` share of
    the steps (spread evenly) takes a batch of ``drill_batch_size`` (default ``batch_size``) drills
    instead of chat examples. Drills are short, so those steps are cheap.

    Deterministic on CPU: torch's thread count is fixed to ``threads`` and every RNG is seeded,
    so the same arguments give byte-identical weights. Returns a summary (parameter count, first
    and last losses, wall time, token counts).
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
        lengths = [len(s) for s in seqs]
        dseqs = [([tok.bos_token_id] + tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:max_length]
                 for d in drills] if drill_frac else []
        dlengths = [len(s) for s in dseqs]
        dbs = int(drill_batch_size or batch_size)
        log(f"pretrain: {len(seqs)} examples ({dropped} dropped > {max_length} tokens), "
            f"mean {sum(lengths) / len(lengths):.0f} tokens, vocab {len(tok)}, {n_params / 1e6:.2f}M params")

        lr = float(lr)  # YAML reads "3e-3" (no dot) as a string
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        queue: list[list[int]] = []
        dqueue: list[list[int]] = []
        dgen = torch.Generator().manual_seed(seed + 1)
        n_drill_steps = 0
        losses: list[float] = []
        dlosses: list[float] = []
        n_tokens = 0
        pad = tok.pad_token_id
        for step in range(steps):
            drill = int((step + 1) * drill_frac) > int(step * drill_frac)
            if drill:
                if not dqueue:
                    dqueue = _batches(dlengths, dbs, dgen)
                idx, bseqs, bstarts, blens = dqueue.pop(0), dseqs, None, dlengths
                n_drill_steps += 1
            else:
                if not queue:
                    queue = _batches(lengths, batch_size, gen)
                idx, bseqs, bstarts, blens = queue.pop(0), seqs, starts, lengths
            width = max(blens[i] for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            labels = torch.full((len(idx), width), -100, dtype=torch.long)
            for row, i in enumerate(idx):
                s = torch.tensor(bseqs[i], dtype=torch.long)
                st = 1 if bstarts is None else bstarts[i]
                input_ids[row, :len(s)] = s
                labels[row, st:len(s)] = s[st:]
            # Right padding under a causal mask: padded positions never influence real ones.
            logits = model(input_ids=input_ids).logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                     ignore_index=-100)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps, warmup_steps, lr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            (dlosses if drill else losses).append(loss.item())
            if not drill:
                n_tokens += int((target != -100).sum())
            if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
                recent = losses[-log_every:] or [float("nan")]
                drec = f" drill loss {sum(dlosses[-log_every:]) / len(dlosses[-log_every:]):.4f}" if dlosses else ""
                log(f"pretrain step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f}{drec} "
                    f"lr {opt.param_groups[0]['lr']:.2e} {time.time() - t0:.0f}s")
        model.eval()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        tail = losses[-min(len(losses), log_every):]
        return {"params": n_params, "vocab_size": len(tok), "steps": steps, "batch_size": batch_size,
                "examples": len(seqs), "dropped_long": dropped,
                "drills": len(dseqs), "drill_steps": n_drill_steps, "response_tokens": n_tokens,
                "loss_first": losses[0], "loss_final": sum(tail) / len(tail),
                "seconds": round(time.time() - t0, 1), "threads": int(threads)}
    finally:
        torch.set_num_threads(prev_threads)
