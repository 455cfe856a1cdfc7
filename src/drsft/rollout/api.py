"""The rollout API: sampling params, completions, per-sequence seeds, the backend factory, the
progress bar both backends share, and the Sample records the stages write (docs/records.md)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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

    @classmethod
    def from_params(cls, section: Mapping[str, Any], batch_size: int, n: int | None = None,
                    seed: int | None = None) -> SamplingParams:
        """The decoding keys that ``sample``, ``guided_align``, ``evaluate`` and ``prepare.probe``
        share (``temperature``, ``top_p``, ``max_new_tokens``, ``seed``; ``n`` unless given, e.g.
        evaluate's ``k``), validated."""
        sp = cls(n=int(section["n"] if n is None else n), temperature=float(section["temperature"]),
                 top_p=float(section["top_p"]), max_new_tokens=int(section["max_new_tokens"]),
                 seed=int(section["seed"] if seed is None else seed), batch_size=int(batch_size))
        sp.validate()
        return sp

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
    one engine per rank; hf on CPU: forked single-thread workers), ``stop_token_ids``
    (``rollout.stop_token_ids``: extra ids to stop at, besides the model's EOS ids and its chat
    template's end of turn,
    :func:`drsft.prompts.stop_token_ids`); a backend ignores the ones it has no use for, and an
    unknown option is an error.
    """
    unknown = sorted(set(opts) - _COMMON_OPTS)
    if unknown:
        raise TypeError(f"make_backend: unknown option(s) {unknown}; known: {sorted(_COMMON_OPTS)}")
    if name == "hf":
        from drsft.rollout.hf import HFBackend

        return HFBackend.load(model_path, **opts)
    if name == "vllm":
        from drsft.rollout.vllm import VLLMBackend

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
