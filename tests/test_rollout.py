import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from drsft.rollout import hf as rollout_hf
from drsft.io import read_json, read_jsonl, write_jsonl
from drsft.models import load_model, load_tokenizer
from drsft.prompts import render_prompt
from drsft.rollout import HFBackend, SamplingParams, make_backend
from drsft.shards import run_sharded

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    return make_backend("hf", str(tiny_model_dir), dtype="auto", device="cpu", trust_remote_code=False,
                        tensor_parallel_size=1, gpu_memory_utilization=0.9)


@pytest.fixture(scope="module")
def prompts(backend, prompt_cfg):
    problems = [f"Compute ${a} + {b}$." + " Explain." * (a % 4) for a in range(4) for b in (2, 9)]
    return [render_prompt(backend.tokenizer, p, prompt_cfg) for p in problems]


@pytest.fixture(scope="module")
def eos_backend(tiny_model_dir):
    """The tiny model with the EOS logit raised by 4: sequences stop at varied lengths."""
    model = load_model(tiny_model_dir, device="cpu")
    tok = load_tokenizer(tiny_model_dir)
    bias = torch.zeros(model.config.vocab_size)
    bias[tok.eos_token_id] = 4.0
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    return HFBackend(model, tok)


def ids_of(comps):
    return [[c.token_ids for c in cs] for cs in comps]


def test_same_seed_same_completions_other_seed_differs(backend, prompts):
    sp = SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=16, seed=5, batch_size=3)
    a, b = backend.generate(prompts, sp), backend.generate(prompts, sp)
    assert [[(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in cs] for cs in a] == \
           [[(c.text, c.token_ids, c.logprobs, c.finish_reason) for c in cs] for cs in b]
    other = backend.generate(prompts, SamplingParams(n=2, temperature=1.0, top_p=0.95, max_new_tokens=16, seed=6,
                                                     batch_size=3))
    assert ids_of(other) != ids_of(a)
    assert all(len(cs) == 2 for cs in a) and len(a) == len(prompts)
    assert a[0][0].token_ids != a[0][1].token_ids  # samples of one prompt differ


def test_samples_do_not_depend_on_unrelated_prompts(backend, prompts):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=16, seed=2, batch_size=64)
    full = backend.generate(prompts, sp)
    alone = backend.generate([prompts[5]], sp)
    assert ids_of(alone)[0] == ids_of(full)[5]
    # a repeated prompt text gets fresh samples, not a copy of the first occurrence
    twice = backend.generate([prompts[5], prompts[5]], sp)
    assert ids_of(twice)[0] == ids_of(full)[5] and ids_of(twice)[1] != ids_of(twice)[0]


def test_left_padding_greedy_same_alone_and_in_batch(backend, prompts):
    sp = SamplingParams(n=1, temperature=0.0, max_new_tokens=20, batch_size=64)
    shortest = min(prompts, key=len)
    longer = [p for p in prompts if len(p) > len(shortest)]
    alone = backend.generate([shortest], sp)[0][0]
    batched = backend.generate(longer + [shortest], sp)[-1][0]
    assert batched.token_ids == alone.token_ids
    assert batched.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    # greedy with n > 1: n copies of the one greedy decode
    many = backend.generate([shortest], SamplingParams(n=3, temperature=0.0, max_new_tokens=20))[0]
    assert [c.token_ids for c in many] == [alone.token_ids] * 3



def test_forked_cpu_workers_give_the_single_thread_completions(tiny_model_dir, prompts):
    """``data_parallel_size`` 2 on CPU: the batches go to two forked single-thread workers; every
    completion equals that of one single-thread process (a batch is generated whole by one
    worker), in prompt order, with a progress bar that counts every sequence."""
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=12, seed=5, batch_size=4)
    greedy = SamplingParams(n=2, temperature=0.0, max_new_tokens=8, batch_size=3)
    forked = make_backend("hf", str(tiny_model_dir), device="cpu", data_parallel_size=2)
    assert forked.processes == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = make_backend("hf", str(tiny_model_dir), device="cpu")
        one, one_greedy = single.generate(prompts, sp), single.generate(prompts, greedy)
    finally:
        torch.set_num_threads(threads)

    class Bar:
        n = 0

        def update(self, k):
            self.n += k

        def set_postfix(self, **_):
            pass

    bar = Bar()
    two = forked.generate(prompts, sp, progress=bar)
    assert [[(c.token_ids, c.logprobs, c.finish_reason, c.text) for c in cs] for cs in two] == \
        [[(c.token_ids, c.logprobs, c.finish_reason, c.text) for c in cs] for cs in one]
    assert bar.n == len(prompts) * 3 and len({c.text for cs in two for c in cs}) > 1
    assert [[(c.token_ids, c.logprobs) for c in cs] for cs in forked.generate(prompts, greedy)] == \
        [[(c.token_ids, c.logprobs) for c in cs] for cs in one_greedy]
    with pytest.raises(ValueError, match="processes"):
        rollout_hf.HFBackend(forked.model, forked.tokenizer, processes=0)


def _die_in_worker(bi):
    import os

    os._exit(3)


def test_a_dead_generation_worker_is_an_error_not_a_hang(tiny_model_dir, prompts, monkeypatch):
    from concurrent.futures.process import BrokenProcessPool

    monkeypatch.setattr(rollout_hf, "_fork_worker_batch", _die_in_worker)
    forked = make_backend("hf", str(tiny_model_dir), device="cpu", data_parallel_size=2)
    with pytest.raises(BrokenProcessPool):
        forked.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=4, batch_size=4))

def test_tiny_top_p_is_greedy(backend, prompts):
    greedy = backend.generate(prompts[:3], SamplingParams(n=1, temperature=0.0, max_new_tokens=12))
    nucleus = backend.generate(prompts[:3], SamplingParams(n=2, temperature=1.0, top_p=1e-6, max_new_tokens=12))
    assert [[cs[0].token_ids] * 2 for cs in greedy] == ids_of(nucleus)


def test_finish_reasons_and_eos_handling(eos_backend, prompts):
    sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=0, batch_size=16)
    comps = eos_backend.generate(prompts, sp)
    tok, eos = eos_backend.tokenizer, eos_backend.tokenizer.eos_token_id
    reasons = {c.finish_reason for cs in comps for c in cs}
    assert reasons == {"stop", "length"}
    for cs in comps:
        for c in cs:
            assert len(c.logprobs) == len(c.token_ids) >= 1
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert eos not in c.token_ids[:-1]  # nothing after EOS, no padding
            if c.finish_reason == "stop":
                assert c.token_ids[-1] == eos
            else:
                assert len(c.token_ids) == 10 and c.token_ids[-1] != eos
            assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
    # rows that finish early are dropped from the batch (and the cache) without disturbing the
    # others: batched equals one sequence at a time, and the preallocated cache equals the default
    one_by_one = eos_backend.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=10, seed=0,
                                                              batch_size=1))
    assert ids_of(one_by_one) == ids_of(comps)


def test_preallocated_cache_matches_default_cache(eos_backend, prompts, monkeypatch):
    sp = SamplingParams(n=2, temperature=0.8, max_new_tokens=12, seed=4, batch_size=5)
    fast = eos_backend.generate(prompts, sp)
    monkeypatch.setattr(rollout_hf, "_prealloc_cache", lambda model, capacity: None)
    slow = eos_backend.generate(prompts, sp)
    assert ids_of(fast) == ids_of(slow)
    for a, b in zip(fast, slow):
        for x, y in zip(a, b):
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_inverse_cdf_sampler_frequencies(backend):
    """_pick draws exactly the processed distribution: a grid of uniforms gives exact counts."""
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().repeat(1000, 1)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000

    def counts(**kw):
        tokens, lps = backend._pick(logits, u, SamplingParams(**kw), greedy=False)
        torch.testing.assert_close(lps, probs.log()[tokens])  # raw T=1 log-probs regardless
        return torch.bincount(tokens, minlength=4).tolist()

    assert counts(temperature=1.0) == [100, 200, 300, 400]
    sq = probs ** 2 / (probs ** 2).sum()  # T = 0.5
    assert counts(temperature=0.5) == pytest.approx((sq * 1000).tolist(), abs=1)
    # top_p = 0.65 keeps {0.4, 0.3}: the smallest prefix whose mass reaches 0.65
    assert counts(temperature=1.0, top_p=0.65) == pytest.approx([0, 0, 1000 * 3 / 7, 1000 * 4 / 7], abs=1)


def test_params_validation_and_backend_errors(backend, tiny_model_dir, monkeypatch):
    with pytest.raises(ValueError, match="top_p"):
        backend.generate(["x"], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="temperature"):
        backend.generate(["x"], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="unknown rollout backend"):
        make_backend("tgi", str(tiny_model_dir))
    with pytest.raises(TypeError, match="unknown option"):
        make_backend("hf", str(tiny_model_dir), tensor_parallel=2)
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'drsft\[gpu\]'"):
        make_backend("vllm", str(tiny_model_dir))


# ---------------------------------------------------------------------------------------------
# run_sharded and the sample stage


def test_run_sharded_resume_stale_and_corrupt(tmp_path):
    calls = []

    def process(chunk):
        calls.append(list(chunk))
        return [{"problem_id": str(x), "v": x * 10} for x in chunk]

    def validate(chunk, records):
        if [r["problem_id"] for r in records] != [str(x) for x in chunk]:
            raise ValueError("wrong ids")

    items = list(range(7))
    run = run_sharded(items, tmp_path, 3, {"a": 1}, process, validate=validate)
    assert (run.resumed, run.generated, run.records_written) == ([], [0, 1, 2], 7)
    fresh = [p.read_bytes() for p in run.paths]
    # missing shard, truncated shard, leftover temp file of a killed write, a stray extra shard
    run.paths[1].unlink()
    run.paths[2].write_bytes(run.paths[2].read_bytes()[:-5])
    (tmp_path / ".shard-00001.jsonl.abc.tmp").write_text("partial")
    write_jsonl(tmp_path / "shard-00009.jsonl", [{"problem_id": "zz"}])
    calls.clear()
    run = run_sharded(items, tmp_path, 3, {"a": 1}, process, validate=validate)
    assert (run.resumed, run.generated) == ([0], [1, 2]) and calls == [[3, 4, 5], [6]]
    assert [p.read_bytes() for p in run.paths] == fresh
    assert sorted(f.name for f in tmp_path.iterdir()) == ["manifest.json", "shard-00000.jsonl",
                                                         "shard-00001.jsonl", "shard-00002.jsonl"]
    # other inputs: every old shard goes, nothing is reused
    calls.clear()
    run = run_sharded(items, tmp_path, 3, {"a": 2}, process, validate=validate)
    assert run.resumed == [] and len(calls) == 3
    assert read_json(tmp_path / "manifest.json")["inputs"] == {"a": 2}


def _stage_workspace(root: Path, tiny_model_dir) -> Path:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sample"].update(n=2, max_new_tokens=12, shard_size=2, seed=1, temperature=1.0, top_p=1.0)
    params["rollout"].update(backend="hf", batch_size=8)
    (root / "data" / "prepare").mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_jsonl(root / "data" / "prepare" / "train.jsonl",
                [{"id": f"arith-{i:05d}", "problem": f"Compute ${i} + {i + 2}$.", "solution": f"\\boxed{{{2 * i + 2}}}",
                  "answer": str(2 * i + 2), "source": "arith"} for i in range(5)])
    shutil.copytree(tiny_model_dir, root / "models" / "base")
    return root


def _run_stage(main, root: Path, monkeypatch):
    monkeypatch.chdir(root)
    res = CliRunner().invoke(main, ["--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    # the results, and what this invocation did (resumed / generated: drsft.io.write_run_info)
    return {**json.loads((root / "metrics" / "sample.json").read_text()),
            **json.loads((root / "metrics" / "runs" / "sample.json").read_text())}


def test_sample_stage_resumes_only_missing_shard(tmp_path, tiny_model_dir, monkeypatch, load_stage):
    main = load_stage("sample").main
    a = _stage_workspace(tmp_path / "a", tiny_model_dir)
    m = _run_stage(main, a, monkeypatch)
    assert (m["problems"], m["samples"], m["shards"], m["resumed_shards"], m["generated_shards"]) == (5, 10, 3, 0, 3)
    shards = sorted((a / "data" / "sample").glob("shard-*.jsonl"))
    recs = [r for s in shards for r in read_jsonl(s)]
    assert [(r["problem_id"], r["sample_index"]) for r in recs] == [(f"arith-{i:05d}", j) for i in range(5) for j in (0, 1)]
    assert m["tokens"] == sum(len(r["response_ids"]) for r in recs) == m["tokens_generated"]
    assert m["truncated_fraction"] == sum(r["finish_reason"] == "length" for r in recs) / 10
    fresh = {s.name: s.read_bytes() for s in shards}

    (a / "data" / "sample" / "shard-00001.jsonl").unlink()
    m2 = _run_stage(main, a, monkeypatch)
    assert (m2["resumed_shards"], m2["generated_shards"]) == (2, 1)
    assert m2["tokens_generated"] == sum(len(r["response_ids"]) for r in read_jsonl(a / "data/sample/shard-00001.jsonl"))
    assert {s.name: s.read_bytes() for s in sorted((a / "data" / "sample").glob("shard-*.jsonl"))} == fresh

    # a fresh run in another folder gives the same bytes (nothing depends on the path)
    b = _stage_workspace(tmp_path / "b", tiny_model_dir)
    _run_stage(main, b, monkeypatch)
    assert {s.name: s.read_bytes() for s in sorted((b / "data" / "sample").glob("shard-*.jsonl"))} == fresh

    # changed params: stale shards are not reused
    params = yaml.safe_load((a / "params.yaml").read_text())
    params["sample"]["seed"] = 2
    (a / "params.yaml").write_text(yaml.safe_dump(params))
    m3 = _run_stage(main, a, monkeypatch)
    assert (m3["resumed_shards"], m3["generated_shards"]) == (0, 3)


def test_sample_stage_bad_problem_names_file_and_line(tmp_path, tiny_model_dir, monkeypatch, load_stage):
    main = load_stage("sample").main
    root = _stage_workspace(tmp_path, tiny_model_dir)
    path = root / "data" / "prepare" / "train.jsonl"
    path.write_text(path.read_text() + json.dumps({"id": "x-1", "problem": ""}) + "\n")
    monkeypatch.chdir(root)
    res = CliRunner().invoke(main, ["--no-progress"])
    assert res.exit_code != 0
    assert "train.jsonl:6" in res.output and "problem" in res.output


def test_vllm_backend_glue_with_a_fake_vllm(tiny_model_dir, prompts, monkeypatch):
    """vLLM cannot run here; a stand-in module checks the glue: raw logprobs requested, token-id
    prompts, per-prompt seeds, output conversion and greedy replication."""
    import types
    from dataclasses import dataclass as dc

    seen = {}

    @dc
    class Logprob:
        logprob: float

    class FakeLLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def generate(self, inputs, sampling_params, use_tqdm):
            seen["inputs"], seen["sps"] = inputs, sampling_params
            outs = []
            for inp, sp in zip(inputs, sampling_params):
                comps = []
                for k in range(sp.n):
                    ids = [7 + k, 8, 2] if k % 2 == 0 else [9] * sp.max_tokens
                    comps.append(types.SimpleNamespace(
                        index=k, token_ids=ids, finish_reason="stop" if k % 2 == 0 else "length",
                        logprobs=[{t: Logprob(-0.5 - i)} for i, t in enumerate(ids)]))
                outs.append(types.SimpleNamespace(outputs=comps[::-1]))  # vLLM may reorder
            return outs

    fake = types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw))
    monkeypatch.setitem(sys.modules, "vllm", fake)
    be = make_backend("vllm", str(tiny_model_dir), dtype="auto", tensor_parallel_size=2, gpu_memory_utilization=0.5)
    assert seen["llm"]["logprobs_mode"] == "raw_logprobs" and seen["llm"]["tensor_parallel_size"] == 2
    out = be.generate(prompts[:2], SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=4, seed=1))
    assert [len(cs) for cs in out] == [2, 2]
    assert out[0][0].token_ids == [7, 8, 2] and out[0][0].logprobs == [-0.5, -1.5, -2.5]
    assert out[0][1].finish_reason == "length" and out[0][1].token_ids == [9] * 4
    assert all(sp.logprobs == 0 and sp.n == 2 and sp.temperature == 0.7 for sp in seen["sps"])
    assert seen["sps"][0].seed != seen["sps"][1].seed
    from drsft.prompts import encode_prompt
    assert seen["inputs"][0]["prompt_token_ids"] == encode_prompt(be.tokenizer, prompts[0])
    greedy = be.generate(prompts[:1], SamplingParams(n=3, temperature=0.0, max_new_tokens=4))
    assert seen["sps"][0].n == 1 and [c.token_ids for c in greedy[0]] == [[7, 8, 2]] * 3


def test_policy_identity_drops_only_engine_layout():
    from drsft.rollout import LAYOUT_KEYS, policy_identity

    roll = {"backend": "hf", "dtype": "auto", "batch_size": 64, "tensor_parallel_size": 1,
            "data_parallel_size": 1, "gpu_memory_utilization": 0.9}
    assert policy_identity(roll) == {"backend": "hf", "dtype": "auto"}
    assert policy_identity({**roll, "batch_size": 8, "data_parallel_size": 4}) == policy_identity(roll)
    assert policy_identity({**roll, "dtype": "bfloat16"}) != policy_identity(roll)
    # every rollout key is either policy or layout: a new key must be classified, not silently dropped
    import yaml
    from pathlib import Path
    keys = set(yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["rollout"])
    assert set(LAYOUT_KEYS) <= keys and keys - set(LAYOUT_KEYS) == {"backend", "dtype", "stop_token_ids"}
    assert policy_identity({**roll, "stop_token_ids": [7]}) != policy_identity({**roll, "stop_token_ids": []})


def test_decode_attention_kernels_exclude_cudnn_on_cuda_only():
    """cuDNN SDPA rebuilt its plan at every KV length: 60 % of a decode step on an H200. The hf
    backend decodes with every SDPA backend but cuDNN on CUDA, and leaves the CPU as it is."""
    assert isinstance(rollout_hf._attention_kernels(torch.device("cpu")), contextlib.nullcontext)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with rollout_hf._attention_kernels(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled()
        assert torch.backends.cuda.math_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


# ----------------------------------------------------------------------------------------------
# Stop tokens: a chat model's turn ends with a special token that is not its EOS (Qwen's <|im_end|>)

TURN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def turn_model_dir(tmp_path_factory):
    """A tiny tokenizer whose chat template closes every turn with <|end|> (not its EOS <|eos|>),
    and a tiny model saved with it."""
    from drsft.toy.tinylm import build_model, build_tokenizer

    tok = build_tokenizer([f"Compute ${a} + {b}$. The answer is {a + b}." for a in range(10) for b in range(10)],
                          vocab_size=300)
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = TURN_TEMPLATE
    out = tmp_path_factory.mktemp("turn_model")
    build_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_end_of_turn_is_found_in_the_chat_template_and_ends_training_responses(turn_model_dir, tiny_model_dir):
    from drsft.prompts import encode_response, end_of_turn_id, response_end_id, stop_token_ids

    tok = load_tokenizer(turn_model_dir)
    end = tok.convert_tokens_to_ids("<|end|>")
    assert end != tok.eos_token_id
    assert end_of_turn_id(tok) == end == response_end_id(tok)
    assert encode_response(tok, "2")[-1] == end
    assert stop_token_ids(tok, [tok.eos_token_id, 3], extra=[9]) == {end, tok.eos_token_id, 3, 9}
    # the toy template ends a turn with a newline: no end-of-turn token, responses end with EOS
    toy = load_tokenizer(tiny_model_dir)
    assert end_of_turn_id(toy) is None and encode_response(toy, "2")[-1] == toy.eos_token_id
    toy_plain = load_tokenizer(tiny_model_dir)
    toy_plain.chat_template = None
    assert end_of_turn_id(toy_plain) is None
    # the answer is cached per tokenizer, and read again when its template changes
    tok.chat_template = None
    assert end_of_turn_id(tok) is None and encode_response(tok, "2")[-1] == tok.eos_token_id
    tok.chat_template = TURN_TEMPLATE
    assert end_of_turn_id(tok) == end


def test_hf_backend_stops_at_the_end_of_turn_and_at_extra_stop_ids(turn_model_dir, prompt_cfg):
    """The model is made to emit <|end|> often (its logit raised) and to go on after it: every
    sample stops at the first <|end|>, and nothing follows it."""
    model, tok = load_model(turn_model_dir, device="cpu"), load_tokenizer(turn_model_dir)
    end = tok.convert_tokens_to_ids("<|end|>")
    bias = torch.zeros(model.config.vocab_size)
    bias[end] = 3.0
    model.lm_head.register_forward_hook(lambda mod, inp, out: out + bias)
    prompts = [render_prompt(tok, f"Compute ${a} + 1$.", prompt_cfg) for a in range(6)]
    sp = SamplingParams(n=4, temperature=1.0, max_new_tokens=12, seed=0, batch_size=8)
    comps = HFBackend(model, tok).generate(prompts, sp)
    stopped = [c for cs in comps for c in cs if c.finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] == end for c in stopped)
    assert all(end not in c.token_ids[:-1] for cs in comps for c in cs)
    assert all(len(c.token_ids) == 12 for cs in comps for c in cs if c.finish_reason == "length")
    # an extra stop id (rollout.stop_token_ids) stops too
    first = comps[0][0].token_ids[0]
    again = HFBackend(model, tok, stop_token_ids=[first]).generate(prompts[:1], sp)
    assert again[0][0].token_ids == [first] and again[0][0].finish_reason == "stop"


def test_vllm_request_carries_every_stop_id(turn_model_dir, monkeypatch):
    import types

    seen = {}

    class FakeLLM:
        def __init__(self, **kw):
            pass

        def generate(self, inputs, sampling_params, use_tqdm):
            seen["sps"] = sampling_params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                index=0, token_ids=[5], finish_reason="stop",
                logprobs=[{5: types.SimpleNamespace(logprob=-0.1)}])]) for _ in inputs]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(
        LLM=FakeLLM, SamplingParams=lambda **kw: types.SimpleNamespace(**kw)))
    gen = json.loads((turn_model_dir / "generation_config.json").read_text())
    tok = load_tokenizer(turn_model_dir)
    be = make_backend("vllm", str(turn_model_dir), stop_token_ids=[42])
    be.generate(["x"], SamplingParams(n=1, temperature=1.0, max_new_tokens=4))
    ids = set(seen["sps"][0].stop_token_ids)
    assert {tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id, 42} <= ids
    assert set(gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]) <= ids


def test_sampling_params_from_a_params_section():
    from drsft.rollout import SamplingParams

    cfg = {"n": 4, "temperature": 1, "top_p": 0.95, "max_new_tokens": 192, "seed": 3, "shard_size": 50}
    sp = SamplingParams.from_params(cfg, 256)
    assert sp == SamplingParams(n=4, temperature=1.0, top_p=0.95, max_new_tokens=192, seed=3, batch_size=256)
    assert isinstance(sp.temperature, float)
    assert SamplingParams.from_params(cfg, 8, n=2, seed=7) == SamplingParams(2, 1.0, 0.95, 192, 7, 8)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_params({**cfg, "top_p": 0}, 8)
