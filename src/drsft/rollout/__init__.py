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

from drsft.rollout.api import (BACKENDS, LAYOUT_KEYS, SAMPLE_FIELDS, Completion, SamplingParams, check_sample_records,
                               make_backend, policy_identity, sample_records, sequence_seed)
from drsft.rollout.hf import HFBackend
from drsft.rollout.vllm import VLLMBackend, dp_gpu_slices, dp_reassemble, dp_split, visible_gpus

__all__ = ["BACKENDS", "LAYOUT_KEYS", "SAMPLE_FIELDS", "Completion", "HFBackend", "SamplingParams", "VLLMBackend",
           "check_sample_records", "dp_gpu_slices", "dp_reassemble", "dp_split", "make_backend", "policy_identity",
           "sample_records", "sequence_seed", "visible_gpus"]
