"""The vllm backend (GPU; the ``gpu`` extra): one engine, or one per data-parallel rank in spawned
workers. UNRUN here: no GPU (see the note below)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from drsft.prompts import encode_prompt
from drsft.rollout.api import Completion, SamplingParams, _generation_eos, _occurrences, _Progress, sequence_seed

log = logging.getLogger("drsft.rollout")

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
    as ``use_tqdm(total=..., desc=..., ...)`` for its bar and, per finished request, reads
    ``format_dict["elapsed"]``, sets ``postfix``, calls ``update(<the request's samples>)`` and
    compares ``n`` with its request count (``LLM._run_engine``); some versions also wrap the request
    list as ``use_tqdm(iterable, desc=...)``, which is passed through. Finished samples go to
    ``report(n)``, at most every ``min_interval`` seconds (and on close), so a data-parallel worker
    can forward them to the parent's bar over its pipe."""

    def __init__(self, report: Any, min_interval: float = 0.5):
        self.report = report
        self.min_interval = min_interval

    def __call__(self, iterable: Any = None, *args: Any, **kwargs: Any) -> Any:
        if iterable is not None:
            return iterable
        return _RelayBar(self.report, self.min_interval, kwargs.get("total"))


class _RelayBar:
    def __init__(self, report: Any, min_interval: float, total: int | None = None):
        self.report, self.min_interval, self.total = report, min_interval, total
        self.start = self.last = time.monotonic()
        self.n = self.pending = 0
        self.postfix = None

    @property
    def format_dict(self) -> dict:
        return {"n": self.n, "total": self.total, "elapsed": max(time.monotonic() - self.start, 1e-6)}

    def update(self, n: int = 1) -> None:
        self.n += int(n)
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
        # One bar over sequences, whatever the number of engines: finished samples reach it from
        # vLLM's own loop (single engine) or from every data-parallel worker, as they finish; a
        # greedy decode stands for the n copies made of it below.
        bar = _Progress(progress, total=len(prompts) * int(params.n))
        copies = int(params.n) // sp_kwargs["n"]
        done = [0]

        def finished(n: int) -> None:
            done[0] += n * copies
            bar.update(n * copies, 0)

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
        bar.update(max(0, len(requests) * int(params.n) - done[0]), sum(len(c.token_ids) for cs in result for c in cs))
        bar.close()
        return result
