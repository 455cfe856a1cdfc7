"""Parity with the paper's code (NKU-HLT/Off-Policy-SFT at dc6b464; docs/parity.md): each option set to
the paper's behaviour against a reference written here from that code's logic, not from drsft's.

* the token ids of a training row (``prompt_format: question``, ``response_end: eos``, right
  truncation) against verl's ``SFTDataset.__getitem__`` (utils/dataset/sft_dataset.py:119-178), for a
  stand-in tokenizer whose EOS and chat-template end of turn differ (as Qwen2.5-Math-7B's base
  tokenizer: <|endoftext|> and <|im_end|>);
* the gradient under ``loss_norm: micro_batch_token_mean_sum`` (trainer/fsdp_dft_trainer.py:443-456,
  476-479: each micro-batch's DFT loss over its own response tokens, backward per micro-batch, ranks
  averaged) over several micro-batches and two ranks with uneven response lengths, against the
  gradient norms the DeepSpeed run logs; ``global_token_mean`` against the token mean;
* the weight-decay groups (trainer/fsdp_dft_trainer.py:304-309: one AdamW group), the batches with
  ``drop_last`` (:158-168) and verl's warm-up (utils/torch_functional.py:505-544).
"""

import csv
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from drsft.io import DataError, read_json, write_jsonl
from drsft.params import ParamsError

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "stages" / "train.py"

# A Qwen-like template: its own default system turn when none is given, turns closed by <|im_end|>.
QWEN_LIKE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|system|>\nPlease reason step by step.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def eot_model_dir(tmp_path_factory, prompt_cfg):
    """A tiny Llama whose tokenizer's EOS (<|eos|>) is not its chat template's end of turn (<|im_end|>)."""
    from drsft.toy.tinylm import build_model, build_tokenizer

    texts = [f"Compute ${a} + {b}$. We add: {a} + {b} = {a + b}. The answer is \\boxed{{{a + b}}}."
             for a in range(12) for b in range(12)] + [prompt_cfg["system"], prompt_cfg["instruction"]]
    tok = build_tokenizer(texts, vocab_size=320)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.chat_template = QWEN_LIKE_TEMPLATE
    model = build_model(tok, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=0)
    out = tmp_path_factory.mktemp("eot_model")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------
# Token ids of a training row


def paper_row_ids(tok, question: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """verl SFTDataset.__getitem__ as the paper's code runs it: the chat template on one user turn
    holding the bare question, the response text followed by ``tokenizer.eos_token``, each tokenized
    without special tokens, concatenated, cut on the right at max_length. Returns (input ids, loss
    mask over the ids: 1 where the id is a trained response token)."""
    prompt_str = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    prompt_ids = tok(prompt_str, add_special_tokens=False)["input_ids"]
    response_ids = tok(response + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids)[:max_length]
    mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    return ids, mask[:max_length]


def _rows(tok, prompt_cfg, problems):
    """A sampled self row (its stop token sampled as <|im_end|>) and an expert row written by the
    pipeline (encode_response: the text, then the end of turn) per problem."""
    from drsft.prompts import encode_response, render_prompt

    rows = []
    for i, (q, sol) in enumerate(problems):
        prompt = render_prompt(tok, q, prompt_cfg)
        ids = encode_response(tok, sol)
        rows.append({"problem_id": f"p{i}", "tier": "self", "prompt": prompt, "response": sol, "response_ids": ids,
                     "behaviour_logprobs": [-0.5] * len(ids), "plain_logprobs": [-0.5] * len(ids),
                     "behaviour": "sampled"})
        rows.append({"problem_id": f"p{i}", "tier": "expert", "prompt": prompt, "response": sol,
                     "response_ids": ids, "behaviour_logprobs": None, "plain_logprobs": [-0.5] * len(ids),
                     "behaviour": "unknown"})
    return rows


PROBLEMS = [("Compute $3 + 4$.", "We add: 3 + 4 = 7. The answer is \\boxed{7}."),
            ("Compute $11 + 9$.", "We add: 11 + 9 = 20. The answer is \\boxed{20}.")]


@pytest.mark.parametrize("cut", [False, True])
def test_question_prompt_and_eos_give_the_paper_codes_token_ids(cut, eot_model_dir, prompt_cfg, tmp_path):
    from transformers import AutoTokenizer

    from drsft.prompts import end_of_turn_id, question_prompt
    from drsft.train import load_examples, response_end_token

    tok = AutoTokenizer.from_pretrained(eot_model_dir)
    longest_prompt = max(len(tok(question_prompt(tok, q), add_special_tokens=False)["input_ids"]) for q, _ in PROBLEMS)
    max_length = longest_prompt + 5 if cut else 512   # cut: every response loses its end
    eos, eot = tok.eos_token_id, end_of_turn_id(tok)
    assert eot is not None and eot != eos
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, _rows(tok, prompt_cfg, PROBLEMS))
    questions = {f"p{i}": q for i, (q, _) in enumerate(PROBLEMS)}
    ex, stats = load_examples(path, tok, max_length, len(tok), questions=questions,
                              end_token=response_end_token(tok, "eos"))
    assert len(ex) == 4 and stats.end_changed == 4 and stats.end_changed_behaviour == 2
    for e in ex:
        q, sol = PROBLEMS[int(e.problem_id[1:])]
        ids, mask = paper_row_ids(tok, q, sol, max_length)
        assert e.input_ids == ids
        assert [int(e.prompt_len <= j < len(e.input_ids)) for j in range(len(ids))] == mask
        assert "Please reason step by step." in tok.decode(ids[:e.prompt_len])     # the template's own system
        assert prompt_cfg["system"] not in tok.decode(ids[:e.prompt_len])         # no system of ours
    assert all(e.input_ids[-1] == eos for e in ex) == (not cut)
    assert stats.truncated == (4 if cut else 0)
    # drsft's default conditions on the sampling prompt and ends with the end of turn: not the paper's ids
    default, _ = load_examples(path, tok, 512, len(tok))
    assert all(d.input_ids != paper_row_ids(tok, *PROBLEMS[int(d.problem_id[1:])], 512)[0] for d in default)
    assert all(d.input_ids[-1] == eot for d in default)


def test_response_end_eos_is_refused_with_importance_sampling_losses(eot_model_dir, prompt_cfg, tmp_path):
    from transformers import AutoTokenizer

    from drsft.train import check_response_end, load_examples, response_end_token

    tok = AutoTokenizer.from_pretrained(eot_model_dir)
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, _rows(tok, prompt_cfg, PROBLEMS))
    _, stats = load_examples(path, tok, 512, len(tok), end_token=response_end_token(tok, "eos"))
    check_response_end("dft", stats)
    with pytest.raises(ParamsError, match=r"train\.response_end: eos replaces the sampled stop token of 2 row"):
        check_response_end("is", stats)
    _, stats = load_examples(path, tok, 512, len(tok))          # end_of_turn: nothing replaced
    check_response_end("is_dft", stats)
    # a response that does not end with a special token: refused, naming the row and field
    rows = _rows(tok, prompt_cfg, PROBLEMS[:1])
    rows[1]["response_ids"] = rows[1]["response_ids"][:-1]
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"rows\.jsonl:2: field 'response_ids'.*not a special token"):
        load_examples(path, tok, 512, len(tok), end_token=response_end_token(tok, "eos"))
    with pytest.raises(DataError, match=r"rows\.jsonl:1: field 'problem_id'"):
        load_examples(path, tok, 512, len(tok), questions={"other": "x"})


# ----------------------------------------------------------------------------------------------
# Optimizer groups, batches, schedule


def test_weight_decay_1d_puts_every_parameter_in_one_decayed_group(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from drsft.train import build_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = {"lr": 1e-3, "adam_betas": [0.9, 0.95], "weight_decay": 0.01}
    paper = build_optimizer(model, {**cfg, "weight_decay_1d": True})
    decayed = [p for g in paper.param_groups if g["weight_decay"] == 0.01 for p in g["params"]]
    assert len(decayed) == len(list(model.parameters()))
    assert any(p.ndim == 1 for p in decayed)                       # norms decay too
    ours = build_optimizer(model, {**cfg, "weight_decay_1d": False})
    assert all(p.ndim >= 2 for g in ours.param_groups if g["weight_decay"] > 0 for p in g["params"])


def test_drop_last_keeps_full_batches_only():
    from drsft.train import batch_plan

    # the paper's loader: DistributedSampler(drop_last) then DataLoader(batch 128 per rank, drop_last) on 2
    # ranks: floor(floor(n / 2) / 128) = floor(n / 256) steps per epoch
    for n in (256, 511, 700, 1000):
        plan = batch_plan(n, 256, 2, 0, drop_last=True)
        assert len(plan) == 2 * ((n // 2) // 128) and all(len(b) == 256 for b in plan)
        for epoch in (plan[:len(plan) // 2], plan[len(plan) // 2:]):
            rows = [i for b in epoch for i in b]
            assert len(set(rows)) == len(rows)
    assert [len(b) for b in batch_plan(10, 4, 1, 0, drop_last=False)] == [4, 4, 2]
    with pytest.raises(ParamsError, match=r"train\.drop_last: 3 training rows make no full batch"):
        batch_plan(3, 4, 1, 0, drop_last=True)


def test_verl_schedule_starts_at_zero_and_rounds_the_warmup_down():
    from drsft.train import lr_factor, warmup_steps_for

    def verl(step, total, ratio):   # get_cosine_schedule_with_warmup, min_lr_ratio 0, num_cycles 0.5
        warm = int(total * ratio)
        if step < warm:
            return step / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * progress))

    for total, ratio in ((10, 0.25), (195, 0.1), (7, 0.1)):
        warm = warmup_steps_for(total, ratio, "verl")
        assert [lr_factor(s, total, warm, "verl") for s in range(total)] == pytest.approx(
            [verl(s, total, ratio) for s in range(total)], abs=1e-12)
    assert warmup_steps_for(10, 0.25, "verl") == 2 and warmup_steps_for(10, 0.25, "drsft") == 3
    assert lr_factor(0, 10, 2, "verl") == 0.0 and lr_factor(0, 10, 3, "drsft") == pytest.approx(1 / 3)


def test_micro_batch_normaliser_by_hand():
    from drsft.train import micro_batch_normaliser

    # 100 response tokens in the global batch, 4 accumulation steps, 2 ranks; this micro-batch has 7
    assert micro_batch_normaliser("global_token_mean", 100, 7, 4, 2, False) == 100 / 8
    assert micro_batch_normaliser("micro_batch_token_mean_sum", 100, 7, 4, 2, False) == 7 / 4
    assert micro_batch_normaliser("global_token_mean", 100, 7, 4, 2, True) == 100 / 2
    assert micro_batch_normaliser("micro_batch_token_mean_sum", 100, 7, 4, 2, True) == 7
    assert micro_batch_normaliser("micro_batch_token_mean_sum", 100, 0, 4, 2, False) == 1 / 4   # a dummy: loss 0
    with pytest.raises(ValueError, match="loss_norm"):
        micro_batch_normaliser("sequence_mean", 100, 7, 4, 2, False)


# ----------------------------------------------------------------------------------------------
# The gradient of one optimizer step


TRAIN = {"data": "rewritten", "loss": "dft", "loss_norm": "global_token_mean", "prompt_format": "sampling",
         "response_end": "end_of_turn", "is_clip": [0.0, 5.0], "is_level": "token", "zero_stage": 2,
         "lr": 1e-9, "epochs": 1, "micro_batch_size": 2, "global_batch_size": 8, "max_length": 256,
         "warmup_ratio": 0.0, "lr_schedule": "drsft", "weight_decay": 0.0, "weight_decay_1d": False,
         "drop_last": True, "adam_betas": [0.9, 0.95], "grad_clip": 0.0, "lora": {"r": 0, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}, "gradient_checkpointing": False,
         "packing": False, "logprob_chunk": 1024, "attn_implementation": "auto", "batching": "rows", "max_tokens_per_micro_batch": 4096,
         "save_every": 100, "seed": 0}
N_ROWS = 27    # 3 full global batches of 8; drop_last leaves out the last 3 rows


GRAD_PROBLEMS = [(f"Compute ${i % 12} + {(7 * i + 2) % 12}$.",
                  " ".join([f"We add: {i % 12} + {(7 * i + 2) % 12} = {i % 12 + (7 * i + 2) % 12}."] * (1 + (i * 5) % 9))
                  + f" The answer is \\boxed{{{i % 12 + (7 * i + 2) % 12}}}.") for i in range(N_ROWS)]


@pytest.fixture(scope="module")
def grad_rows(eot_model_dir, prompt_cfg, tmp_path_factory):
    """27 training rows (self and fallback) whose responses are 1 to 9 sentences long: micro-batches of
    very different token counts; and the problems file they come from."""
    from transformers import AutoTokenizer

    from drsft.prompts import encode_response, render_prompt

    tok = AutoTokenizer.from_pretrained(eot_model_dir)
    rows = []
    for i, (q, text) in enumerate(GRAD_PROBLEMS):
        ids = encode_response(tok, text)
        rows.append({"problem_id": f"p{i:03d}", "tier": ("self", "fallback")[i % 2],
                     "prompt": render_prompt(tok, q, prompt_cfg), "response": text, "response_ids": ids,
                     "behaviour_logprobs": None, "plain_logprobs": [-1.0] * len(ids), "behaviour": "unknown"})
    folder = tmp_path_factory.mktemp("grad_rows")
    write_jsonl(folder / "rewritten.jsonl", rows)
    write_jsonl(folder / "train.jsonl", [{"id": f"p{i:03d}", "problem": q, "solution": t, "answer": "0", "source": "x"}
                                         for i, (q, t) in enumerate(GRAD_PROBLEMS)])
    return folder


def paper_gradient_norm(model, rank_micro_batches, pad_id, mode):
    """The gradient norm of one optimizer step of the DFT loss, from first principles.

    ``rank_micro_batches``: per rank, its micro-batches, each a list of (input ids, prompt length).
    ``mode``: "paper" -- per micro-batch ``sum(CE x sg(p) x mask) / sum(mask)``, backward each (summed
    into the rank's gradient, no division by their number), the ranks' gradients averaged (FSDP);
    "token_mean" -- the sum over every response token of the step over their number."""
    import torch.nn.functional as F

    total_tokens = sum(len(ids) - plen for mbs in rank_micro_batches for mb in mbs for ids, plen in mb)
    grads = []
    for mbs in rank_micro_batches:
        model.zero_grad(set_to_none=True)
        for mb in mbs:
            L = max(len(ids) for ids, _ in mb)
            input_ids = torch.tensor([ids + [pad_id] * (L - len(ids)) for ids, _ in mb])
            attention = torch.tensor([[1] * len(ids) + [0] * (L - len(ids)) for ids, _ in mb])
            loss_mask = torch.tensor([[0] * (plen - 1) + [1] * (len(ids) - plen) + [0] * (L - len(ids))
                                      for ids, plen in mb], dtype=torch.float32)      # predicts response tokens
            logits = model(input_ids=input_ids, attention_mask=attention,
                           position_ids=(attention.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1]
            labels = input_ids[:, 1:]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
            p = torch.softmax(logits.reshape(-1, logits.shape[-1]), -1).gather(1, labels.reshape(-1, 1)).squeeze(1)
            weighted = (ce * p.detach() * loss_mask.reshape(-1)).sum()
            loss = weighted / loss_mask.sum() if mode == "paper" else weighted * len(rank_micro_batches) / total_tokens
            loss.backward()
        grads.append({n: q.grad.detach().clone() for n, q in model.named_parameters()})
    mean = {n: sum(g[n] for g in grads) / len(grads) for n in grads[0]}
    return math.sqrt(sum(float((g.double() ** 2).sum()) for g in mean.values()))


def _env():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", ""))
    return env


def _train(work: Path, folder: Path, model: Path, name: str, nproc: int, **overrides) -> list[float]:
    """Run the train stage on ``folder``'s rows and problems; return the gradient norm logged each step."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update({**TRAIN, **overrides})
    (work / f"{name}.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", str(work / f"{name}.yaml"), "--data", str(folder / "rewritten.jsonl"),
            "--problems", str(folder / "train.jsonl"), "--model", str(model),
            "--out", str(work / f"{name}_model"), "--checkpoints", str(work / f"{name}_ckpt"),
            "--metrics", str(work / f"{name}.json"), "--live-dir", str(work / f"{name}_live")]
    if nproc == 1:
        cmd = [sys.executable, str(STAGE), *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(port), str(STAGE), *args]
    proc = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    with open(work / f"{name}_live" / "plots" / "metrics" / "train" / "grad_norm.tsv") as fh:
        return [float(r["grad_norm"]) for r in csv.DictReader(fh, delimiter="\t")]


@pytest.mark.slow
def test_the_paper_recipe_trains_with_the_paper_codes_gradient(eot_model_dir, grad_rows, tmp_path):
    """The paper configs' train options together (micro_batch_token_mean_sum, question prompts, EOS
    ends, drop_last) on two ranks with two micro-batches of two rows each per step: the gradient norm
    of every step (the weights barely move at lr 1e-9) equals the paper code's, computed here from its
    dataset and trainer logic alone; drsft's defaults give the token mean over drsft's own rows; the
    two differ in every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drsft.train import batch_plan, load_examples, micro_slots

    tok = AutoTokenizer.from_pretrained(eot_model_dir)
    model = AutoModelForCausalLM.from_pretrained(eot_model_dir, dtype=torch.float32)
    ours_rows, _ = load_examples(grad_rows / "rewritten.jsonl", tok, TRAIN["max_length"], len(tok))
    paper_rows = []
    for q, text in GRAD_PROBLEMS:
        ids, mask = paper_row_ids(tok, q, text, TRAIN["max_length"])
        paper_rows.append((ids, mask.index(1)))
    # which rows share a micro-batch is drsft's seeded plan over the file's rows (an input here, not
    # the logic under test; the paper's loader draws another permutation)
    plan = batch_plan(N_ROWS, 8, 1, 0, drop_last=True)
    assert len(plan) == 3
    ref = {"paper": [], "token_mean": []}
    for gidx in plan:
        slots = [micro_slots(gidx, 2, 2, 2, r) for r in range(2)]
        lengths = [sum(len(paper_rows[i][0]) - paper_rows[i][1] for i in slot) for rank in slots for slot in rank]
        assert max(lengths) > 1.5 * min(lengths)        # uneven micro-batches: the two norms differ
        ref["paper"].append(paper_gradient_norm(model, [[[paper_rows[i] for i in slot] for slot in rank]
                                                        for rank in slots], tok.pad_token_id, "paper"))
        ref["token_mean"].append(paper_gradient_norm(
            model, [[[(ours_rows[i].input_ids, ours_rows[i].prompt_len) for i in slot] for slot in rank]
                    for rank in slots], tok.pad_token_id, "token_mean"))
    paper = _train(tmp_path, grad_rows, eot_model_dir, "paper", 2, loss_norm="micro_batch_token_mean_sum",
                   prompt_format="question", response_end="eos", weight_decay_1d=True, lr_schedule="verl")
    ours = _train(tmp_path, grad_rows, eot_model_dir, "ours", 1)
    assert paper == pytest.approx(ref["paper"], rel=1e-4)
    assert ours == pytest.approx(ref["token_mean"], rel=1e-4)
    assert all(abs(a / b - 1) > 0.05 for a, b in zip(ref["paper"], ref["token_mean"]))
    m = read_json(tmp_path / "paper.json")
    assert (m["steps"], m["examples"], m["response_end_replaced"]) == (3, 24, N_ROWS)
