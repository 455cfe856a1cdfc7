"""The hf backend: batched sampling with transformers (CPU or GPU), raw T=1 log-probs per token."""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

from drsft.prompts import encode_prompt
from drsft.rollout.api import Completion, SamplingParams, _occurrences, _Progress, sequence_seed

log = logging.getLogger("drsft.rollout")

_PREALLOC_LAYER = None

# The job a forked worker pool runs (HFBackend._generate_forked): set in the parent just before
# the fork, so the workers inherit it instead of receiving the model through a pipe.
_FORK_JOB = None


def _fork_worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _fork_worker_batch(bi: int):
    import torch

    backend, batches, params, greedy = _FORK_JOB
    batch = batches[bi]
    with torch.inference_mode():
        backend._generate_batch(batch, params, greedy)
    return bi, [(r.token_ids, r.logprobs, r.finish_reason) for r in batch]


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
    - ``processes`` > 1 (``rollout.data_parallel_size`` on CPU): the batches go to that many
      forked single-thread workers (:meth:`_generate_forked`); the decode loop is mostly
      per-step Python and small kernels that a second thread barely speeds up, while a second
      process doubles them. Ignored on GPU (one process drives the device).

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

    def __init__(self, model, tokenizer, stop_token_ids=(), processes: int = 1):
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
        if int(processes) < 1:
            raise ValueError(f"HFBackend: processes must be >= 1, got {processes}")
        if int(processes) > 1 and self.device.type != "cpu":
            log.warning("rollout.data_parallel_size=%s is ignored by the hf backend on %s (one process drives "
                        "the device)", processes, self.device)
            processes = 1
        self.processes = int(processes)

    @classmethod
    def load(cls, model_path: str, device: str | None = None, dtype: str = "auto", trust_remote_code: bool = False,
             attn_implementation: str | None = None, stop_token_ids=(), data_parallel_size: int = 1,
             **ignored) -> HFBackend:
        """Load from a model folder (or what resolve_model returned). ``data_parallel_size`` > 1 on
        CPU: that many forked single-thread worker processes (``processes``). vLLM-only options are
        ignored."""
        from drsft.models import load_model, load_tokenizer

        if attn_implementation:
            log.info("attn_implementation=%s is left to transformers' default in the hf backend", attn_implementation)
        tok = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        model = load_model(model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        return cls(model, tok, stop_token_ids, processes=int(data_parallel_size or 1))

    # -- public --------------------------------------------------------------------------------

    def generate(self, prompts: list[str], params: SamplingParams, progress: Any = False) -> list[list[Completion]]:
        """n completions per prompt, in prompt order then sample order.

        ``progress``: False, True (a tqdm bar over sequences with tokens/s), or an existing tqdm
        bar to advance by finished sequences.
        """
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
        batches = [[rows[r] for r in order[start:start + int(params.batch_size)]]
                   for start in range(0, len(order), int(params.batch_size))]
        bar = _Progress(progress, total=len(prompts) * int(params.n))
        copies = int(params.n) if greedy else 1
        try:
            if self.processes > 1 and len(batches) > 1:
                done = self._generate_forked(batches, params, greedy)
            else:
                done = self._generate_here(batches, params, greedy)
            for batch in done:
                bar.update(len(batch) * copies, sum(len(r.token_ids) for r in batch) * copies)
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

    def _generate_here(self, batches: list[list[_Row]], params: SamplingParams, greedy: bool):
        """Generate the batches in this process, yielding each when done."""
        import torch

        with torch.inference_mode(), _attention_kernels(self.device):
            for batch in batches:
                self._generate_batch(batch, params, greedy)
                yield batch

    def _generate_forked(self, batches: list[list[_Row]], params: SamplingParams, greedy: bool):
        """Generate the batches in ``self.processes`` forked single-thread CPU workers, yielding
        each batch when its results are back.

        A batch is generated whole by one worker, so its composition (and so every sequence's
        floats) does not depend on which worker took it or when: the outputs are those of one
        single-thread process. Forked (not spawned): the workers share the loaded model
        copy-on-write and start in milliseconds; they run only torch on one thread (the rule
        torch's DataLoader workers follow), never the parent's other threads or locks.
        """
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        global _FORK_JOB
        _FORK_JOB = (self, batches, params, greedy)
        try:
            # An executor, not multiprocessing.Pool: a worker that dies (OOM kill) raises
            # BrokenProcessPool here instead of leaving the caller waiting forever.
            pool = ProcessPoolExecutor(min(self.processes, len(batches)), mp_context=multiprocessing.get_context("fork"),
                                       initializer=_fork_worker_init)
            try:
                futures = [pool.submit(_fork_worker_batch, bi) for bi in range(len(batches))]
                for future in as_completed(futures):
                    bi, results = future.result()
                    for row, (token_ids, logprobs, finish_reason) in zip(batches[bi], results):
                        row.token_ids, row.logprobs, row.finish_reason = token_ids, logprobs, finish_reason
                    yield batches[bi]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            _FORK_JOB = None

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
