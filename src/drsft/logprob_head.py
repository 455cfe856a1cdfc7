"""The label log-probabilities of a causal LM without its full logits: the output projection and
the log-softmax run chunk by chunk of positions, and again chunk by chunk in backward.

A training step needs ``log p(label_t)`` at every position, not the (positions x vocabulary)
logits: at the Qwen2.5 vocabulary (151,936) a micro-batch of 4 x 2,048 positions has 1.2e9 logits,
2.5 GB in bf16 and twice that as float32, before their gradients. :func:`label_logprobs` runs each
chunk of positions through the model's own output projection and
:func:`drsft.scoring.gather_logprobs` under ``torch.utils.checkpoint`` (non-reentrant): forward
keeps only the chunk's log-probs, backward recomputes the chunk's logits and drops them after its
gradients. So at most one chunk's logits are alive; the cost is one more projection per chunk.
Calling the projection module itself (not its weight) keeps DeepSpeed ZeRO-3's gather hooks
working. :func:`head_of` says whether a model's logits are exactly its output projection of the
final hidden states (no soft-capping or scaling after it), which is what skipping its own logits
needs.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from drsft.scoring import gather_logprobs

DEFAULT_CHUNK = 1024


def _chunk_logprobs(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return gather_logprobs(head(hidden), labels)


def label_logprobs(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                   chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``log_softmax(head(hidden))[..., label]`` in float32 (as :func:`drsft.scoring.gather_logprobs`:
    labels < 0 give 0.0), holding at most ``chunk`` positions' logits at a time, forward and backward.
    ``hidden``: ``[..., H]`` (the final hidden states); ``head``: the output projection; ``labels``:
    ``[...]``. Differentiable in ``hidden`` and the head's parameters."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"label_logprobs: hidden {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}")
    if chunk < 1:
        raise ValueError(f"label_logprobs: chunk must be >= 1, got {chunk}")
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_l = labels.reshape(-1)
    if flat_h.shape[0] == 0:
        return hidden.new_zeros(labels.shape, dtype=torch.float32)
    parts = [checkpoint(_chunk_logprobs, head, flat_h[s:s + chunk], flat_l[s:s + chunk], use_reentrant=False)
             for s in range(0, flat_h.shape[0], chunk)]
    return torch.cat(parts).view(labels.shape)


def head_of(model) -> torch.nn.Module | None:
    """The output projection whose output is exactly the model's logits, or None when the model
    changes its logits after it (final-logit soft-capping or a logit scale: Gemma 2/3, Cohere, ...)
    or has none to expose; the trainer then computes the full logits."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if cfg is not None and hasattr(cfg, "get_text_config") else cfg
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(text, attr, None)
        if value not in (None, 1, 1.0):
            return None
    return head


__all__ = ["DEFAULT_CHUNK", "head_of", "label_logprobs"]
