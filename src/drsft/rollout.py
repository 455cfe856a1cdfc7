"""The rollout engine: sample n completions per prompt, with behaviour log-probabilities.

One small interface, two backends::

    backend = make_backend("hf", model_path, dtype="auto")
    completions = backend.generate(prompts, SamplingParams(n=4, temperature=1.0), progress=True)
    # completions[i][j]: Completion(text, token_ids, logprobs, finish_reason) of prompt i, sample j

``prompts`` are rendered strings (:func:`drsft.prompts.render_prompt`) and are tokenized with
:func:`drsft.prompts.encode_prompt`, exactly as scoring and training tokenize them.

Behaviour log-probabilities (``Completion.logprobs``) are always those of the *model's own
distribution at temperature 1, from the raw logits* -- not of the temperature/top-p processed
distribution that the token was actually drawn from. This is the policy the trainer's importance
weights refer to: re-scoring an on-policy response teacher-forced with
:func:`drsft.scoring.score_responses` gives the same numbers (tested to |w - 1| < 1e-4).

``token_ids`` hold the generated ids, the EOS token included (with its log-prob) when
``finish_reason == "stop"``, and nothing after it (no padding). ``finish_reason`` is ``length``
when ``max_new_tokens`` ran out first. ``text`` is the decode without special tokens.

The stages run it through the resumable shards of :mod:`drsft.shards`.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drsft.prompts import encode_prompt

log = logging.getLogger("drsft.rollout")

BACKENDS = ("hf", "vllm")
# Options every backend accepts, so callers can pass one dict whatever the backend; the ones a
# backend has no use for are ignored (documented per backend).
_COMMON_OPTS = {"device", "dtype", "trust_remote_code", "tensor_parallel_size", "gpu_memory_utilization",
                "max_model_len", "enforce_eager", "attn_implementation", "data_parallel_size", "stop_token_ids"}


@dataclass
class SamplingParams:
    """How to sample. ``temperature == 0`` is greedy decoding (``top_p`` is then unused).

    ``batch_size`` is the number of *sequences* (prompt x sample) per forward batch (hf backend).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    batch_size: int = 64

    def validate(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not float(self.temperature) >= 0.0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if int(self.batch_size) < 1:
            raise ValueError(f"SamplingParams.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


# Engine layout: how the work is spread over devices and batches, not which policy samples. Left
# out of the resume fingerprint of sample / guided_align shards, so a run resumed on another layout
# (fewer GPUs, another batch size) reuses the finished shards: their samples come from the same
# model, prompts and sampling params. A fresh run with the same layout is byte-identical on CPU; on
# another layout samples may differ in float rounding (batch composition), not in distribution.
LAYOUT_KEYS = ("batch_size", "tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization")


def policy_identity(rollout_cfg: dict) -> dict:
    """The ``rollout`` params that determine what is sampled (backend, dtype): for shard fingerprints."""
    return {k: v for k, v in rollout_cfg.items() if k not in LAYOUT_KEYS}


def _generation_eos(model_path: str):
    """``eos_token_id`` of a local model folder's ``generation_config.json`` (an int, a list or None);
    nothing is downloaded."""
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def make_backend(name: str, model_path: str, **opts):
    """Build a rollout backend.

    ``name``: ``hf`` (transformers, CPU or GPU) or ``vllm`` (GPU, the ``gpu`` extra).
    ``model_path``: a model folder written by ``prepare`` (``models/base``: a full HF folder or a
    ``reference.json``), or what :func:`drsft.models.resolve_model` returned for one.
    ``opts``: any of ``device``, ``dtype`` (``auto``: bf16 on GPU, fp32 on CPU),
    ``trust_remote_code``, ``tensor_parallel_size``, ``gpu_memory_utilization``,
    ``max_model_len``, ``enforce_eager``, ``attn_implementation``, ``data_parallel_size`` (vllm:
    one engine per rank), ``stop_token_ids`` (``rollout.stop_token_ids``: extra ids to stop at,
    besides the model's EOS ids and its chat template's end of turn,
    :func:`drsft.prompts.stop_token_ids`); a backend ignores the ones it has no use for, and an
    unknown option is an error.
    """
    unknown = sorted(set(opts) - _COMMON_OPTS)
    if unknown:
        raise TypeError(f"make_backend: unknown option(s) {unknown}; known: {sorted(_COMMON_OPTS)}")
    if name == "hf":
        if int(opts.get("data_parallel_size", 1) or 1) > 1:
            log.warning("rollout.data_parallel_size=%s is ignored by the hf backend (one process, one device)",
                        opts["data_parallel_size"])
        return HFBackend.load(model_path, **opts)
    if name == "vllm":
        return VLLMBackend(model_path, **opts)
    raise ValueError(f"unknown rollout backend {name!r}: expected one of {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------------------------
# Seeds


def sequence_seed(seed: int, prompt: str, occurrence: int, sample_index: int) -> int:
    """The 63-bit seed of one sequence: a hash of the run seed, the prompt *text*, which repeat of
    that same text within the call it is (0 for the first), and the sample index."""
    h = hashlib.sha256(f"drsft-rollout\0{int(seed)}\0{occurrence}\0{sample_index}\0".encode() + prompt.encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


def _occurrences(prompts: Sequence[str]) -> list[int]:
    seen: dict[str, int] = {}
    occ = []
    for p in prompts:
        occ.append(seen.get(p, 0))
        seen[p] = occ[-1] + 1
    return occ


# ----------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A tqdm bar over sequences, with generated tokens/s; ``progress`` may be a bar to reuse."""

    def __init__(self, progress: Any, total: int, desc: str = "generate"):
        self.bar = None
        self.own = False
        self.tokens = 0
        self.start = time.perf_counter()
        if progress is True:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)
            self.own = True
        elif progress is not None and progress is not False and hasattr(progress, "update"):
            self.bar = progress

    def update(self, sequences: int, tokens: int) -> None:
        self.tokens += tokens
        if self.bar is None:
            return
        # tokens/s over the bar's lifetime (a shared bar accumulates over generate calls)
        total = getattr(self.bar, "drsft_tokens", 0) + tokens
        self.bar.drsft_tokens = total
        self.bar.update(sequences)
        elapsed = max(time.perf_counter() - getattr(self.bar, "drsft_start", self.start), 1e-9)
        if not hasattr(self.bar, "drsft_start"):
            self.bar.drsft_start = self.start
        self.bar.set_postfix(tok_s=f"{total / elapsed:.0f}", refresh=False)

    def close(self) -> None:
        if self.own and self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------
# hf backend

_PREALLOC_LAYER = None


def _prealloc_layer_class():
    """A transformers ``DynamicLayer`` that writes into a preallocated buffer instead of
    concatenating a new tensor every step (``torch.cat`` of the whole cache per token is the
    dominant cost of long batched decodes on CPU). Batch selection falls back to the parent's
    indexing, after which the next update re-buffers. None if transformers has no such class."""
    global _PREALLOC_LAYER
    if _PREALLOC_LAYER is not None:
        return _PREALLOC_LAYER
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers
        return None

    class PreallocLayer(DynamicLayer):
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = int(capacity)
            self._kbuf = self._vbuf = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            need = n + key_states.shape[-2]
            buf = self._kbuf
            if (buf is None or buf.shape[0] != key_states.shape[0] or buf.shape[-2] < need
                    or (n and self.keys.data_ptr() != buf.data_ptr())):
                cap = max(need, self.capacity)
                shape = (*key_states.shape[:2], cap, key_states.shape[-1])
                self._kbuf = key_states.new_empty(shape)
                self._vbuf = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                if n:
                    self._kbuf[..., :n, :].copy_(self.keys)
                    self._vbuf[..., :n, :].copy_(self.values)
            self._kbuf[..., n:need, :].copy_(key_states)
            self._vbuf[..., n:need, :].copy_(value_states)
            self.keys = self._kbuf[..., :need, :]
            self.values = self._vbuf[..., :need, :]
            return self.keys, self.values

    _PREALLOC_LAYER = PreallocLayer
    return PreallocLayer


def _prealloc_cache(model, capacity: int):
    """A DynamicCache of preallocating layers for plain full-attention models, else None (the
    model then builds its default cache)."""
    layer_cls = _prealloc_layer_class()
    if layer_cls is None:
        return None
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - any incompatibility: use the model's default cache
        return None
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    cache.layers = [layer_cls(capacity) for _ in layers]
    return cache


def _attention_kernels(device):
    """SDPA backends for decoding on CUDA: every one but cuDNN. Measured on an H200 (torch 2.11):
    cuDNN attention, which SDPA picks for masked decode steps, spent 1.8 ms of CPU per call
    (a new plan for each KV length), 60 % of a decode step's time at Qwen2.5-1.5B shape."""
    if getattr(device, "type", str(device)) != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    seed: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "length"


class HFBackend:
    """Batched sampling with transformers: a hand-written decode loop over the model's KV cache.

    - Sequences (prompt x sample) are sorted by prompt length (longest first) and cut into batches
      of ``params.batch_size``; each batch is LEFT padded, with an attention mask and position ids
      that skip the padding, so a prompt's computation does not depend on its batch neighbours
      (up to float rounding of batched kernels).
    - Each step computes the raw next-token logits once; the behaviour log-prob of the chosen
      token is :func:`drsft.scoring.gather_logprobs` of the raw logits (T = 1), the token is drawn
      from softmax(logits / T) restricted to the top-p nucleus by inverse-CDF sampling with one
      pre-drawn uniform per step. Finished sequences (EOS) are dropped from the batch and the KV
      cache (in bulk, once they are 1/8 of it), so long stragglers do not keep paying for finished
      rows. The KV cache is preallocated for plain full-attention models (no per-step concat).
    - One device-to-host copy per step (ids, log-probs, EOS flags together); on CUDA, SDPA runs
      without its cuDNN backend (:func:`_attention_kernels`: 4.6x faster decode steps measured
      at Qwen2.5-1.5B shape on an H200).
    - Greedy (``temperature == 0``) decodes each prompt once and copies it ``n`` times.

    Determinism: each sequence has its own random stream, seeded by :func:`sequence_seed` from
    ``params.seed``, the prompt text, the repeat index of identical prompt texts, and the sample
    index; the uniforms are drawn on the CPU in float64, so they are the same on any device.
    Guaranteed: the same model, device, dtype, library versions, prompts and params give
    bit-identical completions (tested on CPU). Not depending on position or on unrelated prompts:
    a sequence's draws never depend on other prompts, but its logits can change by float rounding
    (~1e-6 in fp32) when the batch composition or padding changes, so a token can differ only
    when its uniform falls within that distance of a CDF boundary (or, greedy, on a near tie).
    vLLM (another kernel stack) gives different samples for the same seed.
    """

    def __init__(self, model, tokenizer, stop_token_ids=()):
        import torch

        from drsft.prompts import stop_token_ids as stop_ids

        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._logits_kw = "logits_to_keep" if "logits_to_keep" in params else (
            "num_logits_to_keep" if "num_logits_to_keep" in params else None)
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = stop_ids(tokenizer, gen_eos, stop_token_ids)
        if not eos:
            raise ValueError("HFBackend: neither the tokenizer nor the generation config names an EOS token")
        self.eos_ids = eos
        self._eos_tensor = torch.tensor(sorted(eos), device=self.device)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else min(eos))

    @classmethod
    def load(cls, model_path: str, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
             attn_implementation: str | None = None, stop_token_ids=(), **ignored) -> HFBackend:
        """Load from a model folder (or what resolve_model returned). vLLM-only options are ignored."""
        from drsft.models import load_model, load_tokenizer

        if attn_implementation:
            log.info("attn_implementation=%s is left to transformers' default in the hf backend", attn_implementation)
        tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        model = load_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return cls(model, tok, stop_token_ids)

    # -- public --------------------------------------------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams, progress: Any = False) -> list[list[Completion]]:
        """n completions per prompt, in prompt order then sample order.

        ``progress``: False, True (a tqdm bar over sequences with tokens/s), or an existing tqdm
        bar to advance by finished sequences.
        """
        import torch

        params.validate()
        greedy = float(params.temperature) == 0.0
        n_rows = 1 if greedy else int(params.n)
        encoded: dict[str, list[int]] = {}
        rows: list[_Row] = []
        for pi, (prompt, occ) in enumerate(zip(prompts, _occurrences(prompts))):
            if prompt not in encoded:
                encoded[prompt] = encode_prompt(self.tokenizer, prompt)
                if not encoded[prompt]:
                    raise ValueError(f"prompt {pi} encodes to no tokens")
            for si in range(n_rows):
                rows.append(_Row(pi, si, encoded[prompt], sequence_seed(params.seed, prompt, occ, si)))
        order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].prompt_ids), r))
        bar = _Progress(progress, total=len(prompts) * int(params.n))
        try:
            with torch.inference_mode(), _attention_kernels(self.device):
                for start in range(0, len(order), int(params.batch_size)):
                    batch = [rows[r] for r in order[start:start + int(params.batch_size)]]
                    self._generate_batch(batch, params, greedy)
                    bar.update(len(batch) * (int(params.n) if greedy else 1),
                               sum(len(r.token_ids) for r in batch) * (int(params.n) if greedy else 1))
        finally:
            bar.close()

        out: list[list[Completion]] = [[] for _ in prompts]
        for row in rows:  # rows are in (prompt, sample) order
            text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
            copies = int(params.n) if greedy else 1
            for _ in range(copies):
                out[row.prompt_index].append(Completion(text, list(row.token_ids), list(row.logprobs),
                                                        row.finish_reason))
        return out

    # -- internals -----------------------------------------------------------------------------

    def _forward(self, input_ids, attention_mask, position_ids, cache, last_only: bool):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "use_cache": True}
        if cache is not None:
            kwargs[self._cache_kw] = cache
        if last_only and self._logits_kw:
            kwargs[self._logits_kw] = 1
        out = self.model(**kwargs)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :], (new_cache if new_cache is not None else cache)

    @staticmethod
    def _select(cache, index):
        if hasattr(cache, "batch_select_indices"):
            cache.batch_select_indices(index)
            return cache
        # legacy tuple-of-tuples cache (remote-code models)
        return tuple(tuple(t[index] for t in layer) for layer in cache)

    def _pick(self, logits, uniforms, params: SamplingParams, greedy: bool):
        """Choose the next token of each row; returns (tokens, raw T=1 log-probs)."""
        import torch

        from drsft.scoring import gather_logprobs

        lf = logits.float()
        if greedy:
            tokens = lf.argmax(dim=-1)
        else:
            probs = torch.softmax(lf / float(params.temperature), dim=-1)
            if float(params.top_p) < 1.0:
                sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
                # keep the smallest prefix whose mass reaches top_p (the first token always)
                keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < float(params.top_p)
                weights = sorted_p * keep
            else:
                order, weights = None, probs
            cdf = torch.cumsum(weights.double(), dim=-1)
            target = uniforms.to(cdf.device) * cdf[:, -1]
            idx = torch.searchsorted(cdf, target.unsqueeze(-1), right=True).squeeze(-1)
            # guard against rounding past the end: the last index with positive weight
            positive = weights > 0
            last_pos = positive.shape[-1] - 1 - positive.flip(-1).int().argmax(dim=-1)
            idx = torch.minimum(idx, last_pos)
            tokens = idx if order is None else order.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
        return tokens, gather_logprobs(logits, tokens)

    def _generate_batch(self, batch: list[_Row], params: SamplingParams, greedy: bool) -> None:
        import torch

        max_new = int(params.max_new_tokens)
        b = len(batch)
        length = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        attn = torch.zeros((b, length), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, length - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attn[i, length - len(r.prompt_ids):] = 1
        positions = (attn.cumsum(-1) - 1).clamp(min=0)
        uniforms = None
        if not greedy:
            uniforms = torch.stack([torch.rand(max_new, generator=torch.Generator().manual_seed(r.seed),
                                               dtype=torch.float64) for r in batch]).to(self.device)
        ids, attn, positions = ids.to(self.device), attn.to(self.device), positions.to(self.device)
        alive_index = torch.arange(b, device=self.device)
        cache = _prealloc_cache(self.model, length + max_new)
        logits, cache = self._forward(ids, attn, positions, cache, last_only=True)
        next_pos = positions[:, -1] + 1
        alive = list(range(b))  # batch rows in the tensors, in tensor order
        dead = [False] * b       # finished rows still in the tensors (dropped in bulk, see below)
        for step in range(max_new):
            u = None if uniforms is None else uniforms[alive_index, step]
            tokens, lps = self._pick(logits, u, params, greedy)
            is_eos = torch.isin(tokens, self._eos_tensor)
            # One device-to-host copy (one sync) per step: ids are exact in float64 (< 2**53).
            tok_l, lp_l, eos_l = torch.stack([tokens.double(), lps.double(), is_eos.double()]).tolist()
            for j, bi in enumerate(alive):
                if dead[j]:
                    continue
                row = batch[bi]
                row.token_ids.append(int(tok_l[j]))
                row.logprobs.append(lp_l[j])
                if eos_l[j]:
                    row.finish_reason = "stop"
                    dead[j] = True
            n_dead = sum(dead)
            if n_dead == len(alive) or step == max_new - 1:
                break
            # Drop finished rows from the batch and the cache once they are >= 1/8 of it: each
            # drop copies the cache, each kept dead row costs its share of every step.
            if n_dead * 8 >= len(alive):
                keep = [j for j in range(len(alive)) if not dead[j]]
                index = torch.tensor(keep, device=self.device)
                cache = self._select(cache, index)
                attn, next_pos, tokens = attn[index], next_pos[index], tokens[index]
                alive_index = alive_index[index]
                alive = [alive[j] for j in keep]
                dead = [False] * len(alive)
            attn = torch.cat([attn, attn.new_ones((len(alive), 1))], dim=1)
            logits, cache = self._forward(tokens.unsqueeze(-1), attn, next_pos.unsqueeze(-1), cache, last_only=False)
            next_pos = next_pos + 1


# ----------------------------------------------------------------------------------------------
# vllm backend
#
# UNRUN: no GPU and no vllm on the development machine. The code follows the vLLM API of the
# versions pinned in the ``gpu`` extra (pyproject.toml: vllm>=0.10.2,<0.12, V1 engine); the pure
# parts (splitting, GPU slices, reassembly) and the process orchestration are tested on CPU with a
# stand-in ``vllm`` module (tests/test_rollout.py, tests/test_scale.py).


def dp_split(n_items: int, data_parallel_size: int) -> list[list[int]]:
    """Indices of the prompts each data-parallel rank generates: round-robin (rank r gets
    r, r + dp, r + 2 dp, ...), so that a list sorted by length or difficulty spreads evenly.
    A rank may get none when there are fewer prompts than ranks."""
    dp = int(data_parallel_size)
    if dp < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    return [list(range(r, n_items, dp)) for r in range(dp)]


def dp_reassemble(parts: Sequence[Sequence[Any]], splits: Sequence[Sequence[int]], n_items: int) -> list[Any]:
    """Inverse of :func:`dp_split`: ``parts[r][j]`` is the result for prompt ``splits[r][j]``;
    returns the results in input order. Raises ValueError when a rank returned the wrong number
    of results or the splits do not cover every index exactly once."""
    out: list[Any] = [None] * n_items
    seen = [False] * n_items
    for r, (part, idx) in enumerate(zip(parts, splits)):
        if len(part) != len(idx):
            raise ValueError(f"data-parallel rank {r} returned {len(part)} results for {len(idx)} prompts")
        for j, i in enumerate(idx):
            if not 0 <= i < n_items or seen[i]:
                raise ValueError(f"data-parallel split: index {i} out of range or assigned twice")
            seen[i] = True
            out[i] = part[j]
    if len(parts) != len(splits) or not all(seen):
        raise ValueError("data-parallel split does not cover every prompt exactly once")
    return out


def visible_gpus() -> list[str]:
    """The GPU ids this process may use: ``CUDA_VISIBLE_DEVICES`` when set (ids or UUIDs, kept as
    written), else ``0 .. torch.cuda.device_count() - 1``."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def dp_gpu_slices(data_parallel_size: int, tensor_parallel_size: int, visible: Sequence[str]) -> list[list[str]]:
    """The ``CUDA_VISIBLE_DEVICES`` slice of each data-parallel rank: rank r gets the
    ``tensor_parallel_size`` GPUs ``visible[r*tp:(r+1)*tp]`` (the layout of vLLM's offline
    data-parallel example). Raises ValueError when dp x tp GPUs are not visible."""
    dp, tp = int(data_parallel_size), int(tensor_parallel_size)
    if dp < 1 or tp < 1:
        raise ValueError(f"data_parallel_size and tensor_parallel_size must be >= 1, got {dp} and {tp}")
    visible = list(visible)
    if dp * tp > len(visible):
        raise ValueError(f"rollout.data_parallel_size x rollout.tensor_parallel_size = {dp} x {tp} = {dp * tp} GPUs, "
                         f"but only {len(visible)} are visible ({','.join(visible) or 'none'})")
    return [visible[r * tp:(r + 1) * tp] for r in range(dp)]


class _ProgressRelay:
    """What drsft passes as vLLM's ``use_tqdm`` (which accepts a tqdm-like factory): vLLM calls it
    as ``use_tqdm(total=..., desc=..., ...)`` for its bar of finished requests and uses ``update(n)``,
    ``postfix`` and ``close()``; some versions also wrap the request list as ``use_tqdm(iterable,
    desc=...)``, which is passed through. Finished requests go to ``report(n)``, at most every
    ``min_interval`` seconds (and on close), so a data-parallel worker can forward them to the
    parent's bar over its pipe."""

    def __init__(self, report: Any, min_interval: float = 0.5):
        self.report = report
        self.min_interval = min_interval

    def __call__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        return iterable if iterable is not None else _RelayBar(self.report, self.min_interval)


class _RelayBar:
    def __init__(self, report: Any, min_interval: float):
        self.report, self.min_interval = report, min_interval
        self.pending, self.last = 0, time.monotonic()
        self.postfix = None

    def update(self, n: int = 1) -> None:
        self.pending += int(n)
        if time.monotonic() - self.last >= self.min_interval:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.report(self.pending)
            self.pending = 0
        self.last = time.monotonic()

    def close(self) -> None:
        self.flush()

    def __getattr__(self, name: str) -> Any:  # other tqdm methods vLLM may call (refresh, set_postfix, ...)
        return lambda *args, **kwargs: None


def _vllm_requests(llm, vllm, requests: Sequence[tuple[list[int], int]], sp_kwargs: dict,
                   use_tqdm: Any = False) -> list[list[tuple[list[int], list[float], str]]]:
    """Run ``requests`` = ``[(prompt_token_ids, seed), ...]`` in ONE ``llm.generate`` call (vLLM
    schedules the whole list itself) and return, per request, its samples in sample order as
    ``(token_ids, logprobs, finish_reason)`` with plain Python numbers (small to pickle)."""
    if not requests:
        return []
    inputs = [{"prompt_token_ids": list(ids)} for ids, _ in requests]
    sps = [vllm.SamplingParams(**sp_kwargs, seed=int(seed)) for _, seed in requests]
    outputs = llm.generate(inputs, sampling_params=sps, use_tqdm=use_tqdm)
    if len(outputs) != len(requests):
        raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(requests)} requests")
    result = []
    for i, out in enumerate(outputs):
        samples = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            ids = [int(t) for t in c.token_ids]
            if c.logprobs is None or len(c.logprobs) != len(ids):
                raise RuntimeError(f"vLLM returned no per-token logprobs for request {i}")
            # logprobs=0: each position holds the sampled token's entry (raw_logprobs: T=1, raw logits)
            lps = [float(c.logprobs[k][t].logprob) for k, t in enumerate(ids)]
            samples.append((ids, lps, str(c.finish_reason)))
        result.append(samples)
    return result


def _vllm_llm(vllm, llm_kwargs: dict):
    try:
        return vllm.LLM(**llm_kwargs)
    except TypeError as exc:
        if "logprobs_mode" in str(exc):
            raise RuntimeError("this vLLM has no logprobs_mode option (raw log-probs); vLLM >= 0.10.2 "
                               "is needed (pip install 'drsft[gpu]')") from exc
        raise


def _vllm_worker(conn, rank: int, gpus: list[str], llm_kwargs: dict) -> None:
    """One data-parallel rank (a spawned process): its own GPU slice, its own ``vllm.LLM``.

    Protocol on ``conn``: sends ``("ready", rank)`` or ``("error", text)`` once; then for each
    ``(requests, sp_kwargs)`` received answers ``("ok", results)`` or ``("error", text)``;
    ``None`` (or a closed pipe) ends it. While generating it sends ``("progress", n)`` for every
    ``n`` requests finished (throttled), for the parent's progress bar."""
    # Before anything can initialise CUDA in this process: the slice is all it may see.
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    import traceback

    try:
        import vllm

        llm = _vllm_llm(vllm, llm_kwargs)
        conn.send(("ready", rank))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", (f"rank {rank} (GPUs {','.join(gpus)}): {type(exc).__name__}: {exc}\n"
                             f"{traceback.format_exc()}")))
        conn.close()
        return
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        requests, sp_kwargs = msg
        try:
            relay = _ProgressRelay(lambda n: conn.send(("progress", n)))
            conn.send(("ok", _vllm_requests(llm, vllm, requests, sp_kwargs, use_tqdm=relay)))
        except BaseException as exc:  # noqa: BLE001
            conn.send(("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    conn.close()


def _shutdown_workers(procs, conns) -> None:
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.send(None)
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
            p.join(timeout=10)
    for conn in conns:
        with contextlib.suppress(Exception):
            conn.close()


class _VLLMWorkerPool:
    """``data_parallel_size`` persistent worker processes (spawned, not forked: CUDA must not be
    inherited), each pinned to ``tensor_parallel_size`` GPUs through ``CUDA_VISIBLE_DEVICES`` and
    holding its own ``vllm.LLM`` for the life of the backend, so the model is loaded once per
    rank, not once per ``generate`` call. Workers are not daemons (vLLM's engine starts its own
    processes); a multiprocessing finalizer stops them before the interpreter joins its children."""

    def __init__(self, slices: list[list[str]], llm_kwargs: dict):
        import multiprocessing as mp
        from multiprocessing import util as mp_util

        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        for rank, gpus in enumerate(slices):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_vllm_worker, args=(child, rank, list(gpus), dict(llm_kwargs)),
                            name=f"drsft-vllm-dp{rank}", daemon=False)
            p.start()
            child.close()
            self.procs.append(p)
            self.conns.append(parent)
        self._finalizer = mp_util.Finalize(self, _shutdown_workers, args=(self.procs, self.conns), exitpriority=10)
        errors = []
        for conn in self.conns:
            try:
                kind, payload = conn.recv()
            except EOFError:
                kind, payload = "error", "a data-parallel worker died while loading the model"
            if kind != "ready":
                errors.append(str(payload))
        if errors:
            self.close()
            raise RuntimeError("vLLM data-parallel workers failed to start:\n" + "\n".join(errors))
        log.info("vLLM: %d data-parallel ranks on GPUs %s", len(slices), [",".join(s) for s in slices])

    def run(self, parts: list[list[tuple[list[int], int]]], sp_kwargs: dict, on_progress: Any = None) -> list[list]:
        """Send rank r its requests ``parts[r]`` (all ranks work at once) and collect the results;
        ``on_progress(n)`` hears of every ``n`` requests any rank finishes."""
        from multiprocessing.connection import wait

        busy = [r for r, part in enumerate(parts) if part]
        for r in busy:
            self.conns[r].send((parts[r], sp_kwargs))
        results: list[list] = [[] for _ in parts]
        errors = []
        rank_of = {id(self.conns[r]): r for r in busy}
        pending = {r: self.conns[r] for r in busy}
        while pending:  # every busy rank answers before we raise, so the pipes stay in step
            for conn in wait(list(pending.values())):
                r = rank_of[id(conn)]
                try:
                    kind, payload = conn.recv()
                except EOFError:
                    kind, payload = "error", f"data-parallel rank {r} died"
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(int(payload))
                    continue
                del pending[r]
                if kind == "ok":
                    results[r] = payload
                else:
                    errors.append(str(payload))
        if errors:
            raise RuntimeError("vLLM generation failed:\n" + "\n".join(errors))
        return results

    def close(self) -> None:
        self._finalizer()


class VLLMBackend:
    """vLLM offline inference (GPU). **UNRUN** on the development machine (CPU only, no vllm):
    the code follows the vLLM API of the ``gpu`` extra (``vllm>=0.10.2,<0.12``: ``vllm.LLM`` /
    ``vllm.SamplingParams``, V1 engine, the ``logprobs_mode`` engine option).

    Behaviour log-probs: the engine option ``logprobs_mode`` (vLLM PR #21398; its "processed"
    modes were made to mean "after temperature and top-k/top-p" by PR #22387, in 0.10.2) chooses
    what ``logprobs`` hold: ``raw_logprobs`` = log-softmax of the model's raw logits, computed
    before any logit processor, temperature or top-k/top-p; ``processed_logprobs`` = after them;
    or the ``*_logits`` variants. We pass ``logprobs_mode="raw_logprobs"`` explicitly (it is also
    the default), the T=1 distribution of the model that our importance weights need, and
    ``SamplingParams(logprobs=0)``, so each position carries only the sampled token's log-prob.
    The token itself is still drawn at the requested temperature/top-p. This matches the hf
    backend's contract (``Completion.logprobs`` = raw T=1 log-probs of the sampled tokens).

    Prompts are passed as token ids (``encode_prompt``), so vLLM sees exactly the tokens that
    scoring and training use, and each ``generate`` call hands the whole prompt list to vLLM at
    once (vLLM's scheduler batches it; ``rollout.batch_size`` is for the hf backend only).

    Seeds: every prompt is its own request with its own seed (:func:`sequence_seed` of the run
    seed, the prompt text and its repeat index, computed over the *whole* prompt list); vLLM
    derives the seed of sample j of an ``n > 1`` request as ``seed + j`` and draws each seeded
    request's randomness from its own generator. So which rank or batch a prompt lands in does
    not change its random draws.

    Data parallel (``data_parallel_size > 1``): like vLLM's offline data-parallel example, one
    process per rank, each with its own ``CUDA_VISIBLE_DEVICES`` slice of
    ``tensor_parallel_size`` GPUs (:func:`dp_gpu_slices`) and its own engine (independent
    replicas: the dense models used here need no cross-rank coordination, so the example's
    ``VLLM_DP_*`` variables, which exist for MoE expert parallelism, are not set). Prompts are
    split round-robin (:func:`dp_split`) and the results put back in input order
    (:func:`dp_reassemble`). Results do not depend on the DP size *up to floating-point
    batch effects*: the seeds and so the random draws are the same whatever the split, but the
    logits of a sequence can differ in the last bits when it is batched with other sequences
    (vLLM's kernels are not batch-invariant by default), which can flip a token whose draw lies
    within that distance of a CDF boundary -- the same caveat as for the hf backend.
    ``device``, ``attn_implementation`` and the hf ``batch_size`` are ignored.
    """

    def __init__(self, model_path: str, dtype: str = "auto", trust_remote_code: bool = False,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9,
                 max_model_len: int | None = None, enforce_eager: bool = False, data_parallel_size: int = 1,
                 stop_token_ids=(), **ignored):
        import importlib.util

        from drsft.models import load_tokenizer, resolve_model
        from drsft.prompts import stop_token_ids as stop_ids

        dp, tp = int(data_parallel_size), int(tensor_parallel_size)
        if dp < 1 or tp < 1:
            raise ValueError(f"rollout: data_parallel_size and tensor_parallel_size must be >= 1, got {dp} and {tp}")
        missing = ImportError(
            "rollout backend 'vllm' needs the vllm package, which is not installed: install the GPU extra "
            "on a CUDA machine with `pip install 'drsft[gpu]'`, or set rollout.backend: hf")
        try:
            if importlib.util.find_spec("vllm") is None:
                raise missing
        except ValueError:  # vllm in sys.modules as None (tests) or without a spec
            if sys.modules.get("vllm") is None:
                raise missing from None
        target = resolve_model(model_path) if Path(model_path).is_dir() else str(model_path)
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.eos_ids = stop_ids(self.tokenizer, _generation_eos(target), stop_token_ids)
        self.llm_kwargs = dict(model=target, dtype="auto" if dtype in (None, "auto") else dtype,
                               trust_remote_code=trust_remote_code, tensor_parallel_size=tp,
                               gpu_memory_utilization=float(gpu_memory_utilization), seed=0,
                               logprobs_mode="raw_logprobs", enforce_eager=bool(enforce_eager))
        if max_model_len:
            self.llm_kwargs["max_model_len"] = int(max_model_len)
        self.data_parallel_size = dp
        self.pool = None
        self.llm = None
        if dp == 1:
            try:
                import vllm
            except ImportError as exc:
                raise missing from exc
            self._vllm = vllm
            self.llm = _vllm_llm(vllm, self.llm_kwargs)
        else:
            self.pool = _VLLMWorkerPool(dp_gpu_slices(dp, tp, visible_gpus()), self.llm_kwargs)

    def close(self) -> None:
        """Stop the data-parallel workers (also done automatically at exit)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def generate(self, prompts: list[str], params: SamplingParams, progress: Any = False) -> list[list[Completion]]:
        params.validate()
        if not prompts:
            return []
        greedy = float(params.temperature) == 0.0
        sp_kwargs = dict(n=1 if greedy else int(params.n), temperature=float(params.temperature),
                         top_p=1.0 if greedy else float(params.top_p), max_tokens=int(params.max_new_tokens),
                         logprobs=0, skip_special_tokens=True, stop_token_ids=sorted(self.eos_ids))
        encoded: dict[str, list[int]] = {}
        requests = []
        for prompt, occ in zip(prompts, _occurrences(prompts)):
            if prompt not in encoded:
                encoded[prompt] = encode_prompt(self.tokenizer, prompt)
            requests.append((encoded[prompt], sequence_seed(params.seed, prompt, occ, 0)))
        # One bar over sequences, whatever the number of engines: finished requests reach it from
        # vLLM's own loop (single engine) or from every data-parallel worker, as they finish.
        bar = _Progress(progress, total=len(prompts) * int(params.n))
        done = [0]

        def finished(n: int) -> None:
            done[0] += n
            bar.update(n * int(params.n), 0)

        try:
            if self.pool is None:
                raw = _vllm_requests(self.llm, self._vllm, requests, sp_kwargs,
                                     use_tqdm=_ProgressRelay(finished) if bar.bar is not None else False)
            else:
                splits = dp_split(len(requests), self.data_parallel_size)
                parts = self.pool.run([[requests[i] for i in idx] for idx in splits], sp_kwargs,
                                      on_progress=finished if bar.bar is not None else None)
                raw = dp_reassemble(parts, splits, len(requests))
        except BaseException:
            bar.close()
            raise
        result: list[list[Completion]] = []
        for i, samples in enumerate(raw):
            if len(samples) != sp_kwargs["n"]:
                raise RuntimeError(f"vLLM returned {len(samples)} samples for prompt {i}, expected {sp_kwargs['n']}")
            comps = []
            for ids, lps, finish in samples:
                if finish not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request {i} finished with {finish!r}")
                comps.append(Completion(self.tokenizer.decode(ids, skip_special_tokens=True), ids, lps, finish))
            if greedy:  # one greedy decode, copied n times (as the hf backend does)
                comps = [Completion(comps[0].text, list(comps[0].token_ids), list(comps[0].logprobs),
                                    comps[0].finish_reason) for _ in range(int(params.n))]
            result.append(comps)
        bar.update(max(0, len(requests) - done[0]) * int(params.n), sum(len(c.token_ids) for cs in result for c in cs))
        bar.close()
        return result


# ----------------------------------------------------------------------------------------------
# Sample records (docs/records.md "Sample")

SAMPLE_FIELDS = ("problem_id", "sample_index", "prompt", "response", "response_ids", "logprobs", "finish_reason")


def sample_records(problem_ids: Sequence[str], prompts: Sequence[str],
                   completions: Sequence[Sequence[Completion]]) -> list[dict]:
    """Sample records, problem by problem then sample by sample."""
    return [{"problem_id": pid, "sample_index": j, "prompt": prompt, "response": c.text,
             "response_ids": list(c.token_ids), "logprobs": list(c.logprobs), "finish_reason": c.finish_reason}
            for pid, prompt, comps in zip(problem_ids, prompts, completions) for j, c in enumerate(comps)]


def check_sample_records(problem_ids: Sequence[str], n: int, records: Sequence[dict]) -> None:
    """Raise ValueError unless ``records`` are exactly samples 0..n-1 of each problem, well formed."""
    expected = [(pid, j) for pid in problem_ids for j in range(n)]
    got = []
    for k, rec in enumerate(records):
        missing = [f for f in SAMPLE_FIELDS if f not in rec]
        if missing:
            raise ValueError(f"record {k + 1} lacks field(s) {missing}")
        ids, lps = rec["response_ids"], rec["logprobs"]
        if not isinstance(ids, list) or not isinstance(lps, list) or len(ids) != len(lps):
            raise ValueError(f"record {k + 1}: response_ids and logprobs must be lists of equal length")
        if rec["finish_reason"] not in ("stop", "length"):
            raise ValueError(f"record {k + 1}: finish_reason {rec['finish_reason']!r}")
        got.append((rec["problem_id"], rec["sample_index"]))
    if got != expected:
        raise ValueError(f"expected samples 0..{n - 1} of {len(problem_ids)} problems in order, "
                         f"got {len(got)} records")
