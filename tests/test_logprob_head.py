"""The chunked log-prob head (drsft.logprob_head): the same log-probs, losses and gradients as the
full logits, padded and packed, for every loss; and the models whose logits it may not replace."""

import pytest
import torch

from drsft.logprob_head import head_of, label_logprobs
from drsft.scoring import gather_logprobs


def test_label_logprobs_equal_the_full_logits_and_their_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, 4] = -100                                       # an ignored position gives 0
    w = torch.rand(3, 11)
    full = gather_logprobs(head(hidden), labels)
    (full * w).sum().backward()
    g_h, g_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None
    for chunk in (1, 5, 33, 1000):
        part = label_logprobs(hidden, head, labels, chunk=chunk)
        assert part.dtype == torch.float32 and part[0, 4] == 0.0
        assert torch.allclose(part, full, atol=1e-6)
        (part * w).sum().backward()
        assert torch.allclose(hidden.grad, g_h, atol=1e-6) and torch.allclose(head.weight.grad, g_w, atol=1e-6)
        hidden.grad, head.weight.grad = None, None
    with pytest.raises(ValueError, match="does not match labels"):
        label_logprobs(hidden, head, labels[:, :-1])


def test_head_of_refuses_models_whose_logits_are_not_the_projection(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert head_of(model) is model.lm_head
    model.config.final_logit_softcapping = 30.0               # Gemma-2-like
    assert head_of(model) is None
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 0.0625                         # Cohere-like
    assert head_of(model) is None
    assert head_of(torch.nn.Linear(2, 2)) is None             # no output embedding to expose


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kind,level", [("sft", "token"), ("dft", "token"), ("is", "token"), ("is", "sequence"),
                                        ("is_dft", "token"), ("is_dft", "sequence")])
def test_chunked_head_gives_the_full_paths_losses_and_gradients(kind, level, packed, tiny_model_dir, prompt_cfg):
    """Training rows of different lengths, padded or packed, through the trainer's forward with the
    chunked head (chunks of 7 positions) and with the full logits: the same loss and the same
    gradient of every parameter (float32, 1e-6)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drsft.losses import weighted_nll
    from drsft.prompts import encode_prompt, encode_response, render_prompt
    from drsft.train import Example, collate, collate_packed, forward_logprobs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = []
    for i in range(5):
        p = encode_prompt(tok, render_prompt(tok, f"Compute ${i} + {i + 2}$.", prompt_cfg))
        r = encode_response(tok, " ".join([f"We add: {i} + {i + 2} = {2 * i + 2}."] * (1 + i)))
        beh = [-0.3 - 0.1 * (j % 3) for j in range(len(r))] if i % 2 else None
        rows.append(Example(f"p{i}", "self" if beh else "expert", p + r, len(p), beh))
    results = []
    for chunk in (0, 7):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        batch = (collate_packed if packed else collate)(rows, tok.pad_token_id)
        logp = forward_logprobs(model, batch, "cpu", packed, chunk=chunk)
        out = weighted_nll(logp, batch["mask"], kind, batch["behaviour"], batch["known"], is_clip=[0.0, 2.0],
                           is_level=level, normaliser=57.0)
        out.loss.backward()
        results.append((out.loss.detach(), {n: q.grad.clone() for n, q in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-6)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name
