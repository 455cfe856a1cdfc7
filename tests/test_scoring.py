import math
import random

import pytest
import torch

from drsft.models import load_model, load_tokenizer
from drsft.prompts import encode_prompt, render_prompt
from drsft.rollout import HFBackend, SamplingParams
from drsft.scoring import gather_logprobs, score_responses

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return HFBackend(load_model(tiny_model_dir, device="cpu"), load_tokenizer(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(backend, prompt_cfg):
    problems = [f"Compute ${a} + {b}$." + " Show every step." * (a % 3) for a in range(5) for b in (1, 7)]
    return [render_prompt(backend.tokenizer, p, prompt_cfg) for p in problems]


def test_gather_logprobs_matches_log_softmax_and_ignores_negative_labels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64).to(torch.bfloat16)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[1, 2] = -100
    ref = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ref[1, 2] = 0.0
    got = gather_logprobs(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # 2-D and 1-D inputs agree with the rows of the 3-D one
    torch.testing.assert_close(gather_logprobs(logits[0], labels[0]), got[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(gather_logprobs(logits[0, 0], labels[0, 0]), got[0, 0], atol=1e-6, rtol=0)


def test_gather_logprobs_is_differentiable_and_checks_shapes():
    logits = torch.randn(2, 4, 7, requires_grad=True)
    labels = torch.tensor([[1, 2, -100, 3], [0, 6, 5, -100]])
    gather_logprobs(logits, labels).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad[0, 2].abs().sum() == 0  # ignored position gets no gradient
    with pytest.raises(ValueError, match="do not match"):
        gather_logprobs(logits, labels[:, :3])


def test_importance_weight_of_on_policy_tokens_is_one(backend, prompts):
    """Sampled at T=0.7, top_p=0.9 (processed != raw); re-scored teacher-forced in another batch
    composition, the recorded behaviour log-probs agree: |exp(score - recorded) - 1| < 1e-4."""
    sp = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=24, seed=3, batch_size=7)
    comps = backend.generate(prompts, sp)
    flat = [(p, c) for p, cs in zip(prompts, comps) for c in cs]
    random.Random(1).shuffle(flat)  # a different batch composition and order
    scores = score_responses(backend.model, backend.tokenizer, [p for p, _ in flat], [c.token_ids for _, c in flat],
                             batch_size=5)
    n_tokens, worst = 0, 0.0
    for (_, c), s in zip(flat, scores):
        assert len(s) == len(c.token_ids) == len(c.logprobs)
        for a, b in zip(s, c.logprobs):
            worst = max(worst, abs(math.exp(a - b) - 1.0))
            n_tokens += 1
    assert n_tokens == sum(len(c.token_ids) for _, c in flat) > 300
    assert worst < 1e-4

    # ...and the recorded numbers are the raw T=1 ones, not the T=0.7 processed distribution's.
    p, c = flat[0]
    ids = torch.tensor([encode_prompt(backend.tokenizer, p) + c.token_ids])
    with torch.no_grad():
        logits = backend.model(input_ids=ids).logits[0, -len(c.token_ids) - 1:-1]
    tempered = gather_logprobs(logits / 0.7, torch.tensor(c.token_ids))
    assert (tempered - torch.tensor(c.logprobs)).abs().max() > 1e-2


def test_score_responses_order_batching_and_edge_cases(backend, prompts):
    responses = [[5, 6, 7], [], [9] * 12, [10, 11]]
    ps = prompts[:4]
    a = score_responses(backend.model, backend.tokenizer, ps, responses, batch_size=1)
    b = score_responses(backend.model, backend.tokenizer, ps, responses, batch_size=32)
    assert [len(x) for x in a] == [3, 0, 12, 2]
    for x, y in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5)
    assert backend.model.training is False
    backend.model.train()
    try:
        score_responses(backend.model, backend.tokenizer, ps[:1], responses[:1])
        assert backend.model.training is True  # mode restored
    finally:
        backend.model.eval()
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        score_responses(backend.model, backend.tokenizer, ps[:2], responses[:1])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_responses(backend.model, backend.tokenizer, ps[:1], [[10**6]])


def test_score_sharded_resumes_finished_shards_and_equals_score_responses(tmp_path, backend, prompts):
    """Scoring in resumable shards: each shard equals score_responses on its pairs; a rerun reuses every
    finished shard (the model is not even loaded when none is left), rescoring only a missing one;
    other pairs never reuse a shard."""
    from drsft.scoring import score_sharded

    tok = backend.tokenizer
    pairs = prompts[:5]
    resp = [tok(f" {i} + 1 = {i + 1}. \\boxed{{{i + 1}}}", add_special_tokens=False)["input_ids"] for i in range(5)]
    keys = [f"p{i}" for i in range(5)]
    loads = []

    def load():
        loads.append(1)
        return backend.model, tok

    def run(keys_=keys, resp_=resp):
        return score_sharded(tmp_path / "s", 2, keys_, pairs, resp_, {"model": "tiny"}, load, batch_size=4)

    first = run()
    assert first == [lp for s in (0, 2, 4) for lp in score_responses(backend.model, tok, pairs[s:s + 2], resp[s:s + 2],
                                                                       batch_size=4)]
    assert sorted(p.name for p in (tmp_path / "s").glob("shard-*.jsonl")) == [f"shard-0000{i}.jsonl" for i in range(3)]
    assert len(loads) == 1
    assert run() == first and len(loads) == 1                      # everything resumed: no model load
    (tmp_path / "s" / "shard-00001.jsonl").unlink()
    before = (tmp_path / "s" / "shard-00000.jsonl").stat().st_mtime_ns
    assert run() == first and len(loads) == 2
    assert (tmp_path / "s" / "shard-00000.jsonl").stat().st_mtime_ns == before
    other = [r + [tok.eos_token_id] for r in resp]                 # other responses: a new fingerprint
    assert [len(x) for x in run(resp_=other)] == [len(r) for r in other] and len(loads) == 3
    with pytest.raises(ValueError, match="5 keys, 5 prompts, 4 responses"):
        run(resp_=resp[:4])
