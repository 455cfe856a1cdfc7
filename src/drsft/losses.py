"""Token-level training losses for off-policy SFT: ``sft``, ``dft``, ``is`` and ``is_dft``.

Every loss is a weighted negative log-likelihood of the response tokens,

    L = - sum_t  mask_t * sg(weight_t) * log p_t  /  normaliser,

where ``log p_t`` is the log-probability of the target token under the model being trained
(with gradient), ``sg`` is stop-gradient (the weights are computed from detached tensors, so the
gradient is ``-sum_t weight_t * grad log p_t / normaliser``: one forward pass, no second one for
the weights) and the mask is 1 on response tokens and 0 on prompt and padding tokens.

Weights (``p_t = exp(log p_t)``, ``b_t`` = recorded behaviour log-prob ``log pi_beta``):

* ``sft``:    1.
* ``dft``:    ``p_t`` (Dynamic Fine-Tuning, Wu et al. 2025: the SFT gradient rescaled by the token
  probability). This is the paper's optimisation-level correction; ``is`` and ``is_dft`` below are
  drsft's extensions, not the paper's method.
* ``is``:     ``clip(w_t)`` with ``w_t = exp(log p_t - b_t)`` (importance ratio pi_theta / pi_beta).
  ``is_level: sequence`` replaces ``w_t`` by the sequence ratio ``exp(sum_t (log p_t - b_t))``
  over the row's (kept) response tokens, computed in log space, clipped, and broadcast to every
  token of the row. **Rows whose behaviour policy is unknown** (``behaviour_known`` false:
  fallback/expert demonstrations) have no ratio; they fall back to the DFT weight ``p_t``, i.e. the
  behaviour probability is replaced by 1 (as if the demonstration were deterministic), which keeps
  them on the same scale as the self-generated rows instead of giving them the unbounded weight 1/b.
  The fallback weight is *not* clipped and is not counted in the clipping statistics.
* ``is_dft``: ``clip(w_t * p_t)`` (product of the two weights, clipped); unknown rows use ``p_t``.
  At sequence level the product is ``exp(sum_t (log p_t - b_t)) * p_t`` per token.

Clipping: ``is_clip = [low, high]`` bounds the weight to ``[low, high]``; ``high`` may be null/inf
for no upper cap and ``low = 0`` gives the one-sided cap. Clipping is done in log space (the
ratio can overflow in float32 before clipping otherwise).

Normalisation (the same for every loss): the weighted sum is divided by ``normaliser``, which
defaults to the number of response tokens in the tensors passed in (a token mean). The trainer
passes what ``train.loss_norm`` needs (:func:`drsft.train.micro_batch_normaliser`): by default the
token count of the whole **global** batch scaled so that, after DeepSpeed's division by the
accumulation steps and averaging over ranks, the optimizer sees the gradient of the token mean
over the global batch (every response token of the step counts the same, however the batch is
split); or, as the paper's trainer, each micro-batch's own token count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOSS_KINDS = ("sft", "dft", "is", "is_dft")
IS_LEVELS = ("token", "sequence")


@dataclass
class LossOutput:
    """The loss and what the trainer logs about the weights.

    ``weights``: (B, T) detached per-token weights (0 on masked tokens).
    ``clipped``: (B, T) bool, tokens whose weight was changed by clipping.
    ``ratio_rows``: (B,) bool, rows whose weight is an importance ratio (known behaviour policy and
    an ``is``/``is_dft`` loss); the clipping statistics are over those rows only.
    ``stats``: python floats: ``weight_mean``, ``weight_max`` (over response tokens),
    ``clip_frac`` (fraction of ratio-weighted tokens that were clipped), ``tokens``, ``nll_sum``
    (sum of -log p over response tokens, for logging the plain NLL whatever the loss).
    """

    loss: torch.Tensor
    weights: torch.Tensor
    clipped: torch.Tensor
    ratio_rows: torch.Tensor
    stats: dict


def parse_clip(is_clip) -> tuple[float, float]:
    """``[low, high]`` (either may be null) or a single number (an upper cap) -> (low, high)."""
    if is_clip is None:
        return 0.0, math.inf
    if isinstance(is_clip, (int, float)):
        low, high = 0.0, float(is_clip)
    elif isinstance(is_clip, Sequence) and not isinstance(is_clip, str) and len(is_clip) == 2:
        low = 0.0 if is_clip[0] is None else float(is_clip[0])
        high = math.inf if is_clip[1] is None else float(is_clip[1])
    else:
        raise ValueError(f"is_clip must be [low, high] or a number, got {is_clip!r}")
    if not (low >= 0.0 and high > 0.0 and low <= high):
        raise ValueError(f"is_clip must satisfy 0 <= low <= high and high > 0, got {is_clip!r}")
    return low, high


def _compute_dtype(logp: torch.Tensor) -> torch.dtype:
    """float32 at least (bf16 log-probs are upcast), float64 kept."""
    return torch.promote_types(logp.dtype, torch.float32)


def _clip_log(log_w: torch.Tensor, low: float, high: float) -> torch.Tensor:
    lo = math.log(low) if low > 0 else -math.inf
    hi = math.log(high) if math.isfinite(high) else math.inf
    return log_w.clamp(min=lo, max=hi)


def token_weights(logp: torch.Tensor, mask: torch.Tensor, kind: str,
                  behaviour_logp: torch.Tensor | None = None, behaviour_known: torch.Tensor | None = None,
                  is_clip=(0.0, 5.0), is_level: str = "token"):
    """Detached per-token weights for ``kind``: returns ``(weights, clipped, ratio_rows)``.

    Inputs are (B, T) except ``behaviour_known`` (B,). Masked positions get weight 0. Values of
    ``logp``/``behaviour_logp`` at masked positions are ignored (they may be anything finite or not).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {kind!r}: expected one of {', '.join(LOSS_KINDS)}")
    if is_level not in IS_LEVELS:
        raise ValueError(f"unknown is_level {is_level!r}: expected one of {', '.join(IS_LEVELS)}")
    m = mask.to(torch.bool)
    dt = _compute_dtype(logp)
    lp = torch.where(m, logp.detach().to(dt), torch.zeros((), dtype=dt, device=logp.device))
    B = lp.shape[0]
    no_ratio = torch.zeros(B, dtype=torch.bool, device=lp.device)
    no_clip = torch.zeros_like(m)
    if kind == "sft":
        return m.float(), no_clip, no_ratio
    p = lp.exp() * m
    if kind == "dft":
        return p, no_clip, no_ratio

    if behaviour_logp is None or behaviour_known is None:
        raise ValueError(f"loss {kind!r} needs behaviour_logp and behaviour_known")
    known = behaviour_known.to(torch.bool).to(lp.device)
    b = torch.where(m, behaviour_logp.detach().to(device=lp.device, dtype=dt),
                    torch.zeros((), dtype=dt, device=lp.device))
    log_ratio = (lp - b) * m                               # 0 on masked tokens
    if is_level == "sequence":
        log_w = log_ratio.sum(dim=1, keepdim=True).expand_as(lp)
    else:
        log_w = log_ratio
    if kind == "is_dft":
        log_w = log_w + lp
    low, high = parse_clip(is_clip)
    log_w_clipped = _clip_log(log_w, low, high)
    w = log_w_clipped.exp()
    clipped = (log_w_clipped != log_w) & m & known[:, None]
    weights = torch.where(known[:, None], w, p) * m      # unknown behaviour policy: the DFT weight
    return weights, clipped, known.clone()


def weighted_nll(logp: torch.Tensor, mask: torch.Tensor, kind: str = "sft",
                 behaviour_logp: torch.Tensor | None = None, behaviour_known: torch.Tensor | None = None,
                 is_clip=(0.0, 5.0), is_level: str = "token", normaliser: float | torch.Tensor | None = None
                 ) -> LossOutput:
    """``-sum_t mask_t * sg(weight_t) * logp_t / normaliser`` (see the module docstring).

    ``normaliser`` defaults to ``mask.sum()`` (the token mean of this batch); a batch without
    response tokens gives a loss of 0 that still carries the graph (so a distributed backward
    sees every parameter).
    """
    if logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and mask {tuple(mask.shape)} differ")
    if behaviour_logp is not None and behaviour_logp.shape != logp.shape:
        raise ValueError(f"behaviour_logp {tuple(behaviour_logp.shape)} and logp {tuple(logp.shape)} differ")
    weights, clipped, ratio_rows = token_weights(logp, mask, kind, behaviour_logp, behaviour_known,
                                                 is_clip, is_level)
    m = mask.to(torch.bool)
    n_tokens = int(m.sum().item())
    if normaliser is None:
        normaliser = max(n_tokens, 1)
    dt = _compute_dtype(logp)
    safe_logp = torch.where(m, logp.to(dt), torch.zeros((), dtype=dt, device=logp.device))
    loss = -(weights.to(safe_logp.dtype) * safe_logp).sum() / normaliser

    wm = weights[m]
    ratio_tok = m & ratio_rows[:, None]
    n_ratio = int(ratio_tok.sum().item())
    stats = {
        "tokens": n_tokens,
        "weight_sum": float(wm.sum().item()) if n_tokens else 0.0,
        "weight_mean": float(wm.mean().item()) if n_tokens else 0.0,
        "weight_max": float(wm.max().item()) if n_tokens else 0.0,
        "ratio_tokens": n_ratio,
        "clipped_tokens": int(clipped.sum().item()),
        "clip_frac": float(clipped.sum().item() / n_ratio) if n_ratio else 0.0,
        "nll_sum": float(-safe_logp.detach().sum().item()),
    }
    return LossOutput(loss=loss, weights=weights, clipped=clipped, ratio_rows=ratio_rows, stats=stats)
