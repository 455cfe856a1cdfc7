"""Unit tests of drsft.losses on hand-computed tensors (values, gradients, masking, clipping)."""

import math

import pytest
import torch

from drsft.losses import LOSS_KINDS, parse_clip, token_weights, weighted_nll

LN = math.log


def _batch():
    # Row 0: prompt token (masked), then 3 response tokens; row 1: 2 response tokens, then padding.
    p = torch.tensor([[0.9, 0.5, 0.25, 0.8],
                      [0.4, 0.1, 0.7, 0.3]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1],
                         [1, 1, 0, 0]], dtype=torch.float64)
    b = torch.tensor([[0.0, LN(0.25), LN(0.5), LN(0.1)],
                      [LN(0.8), LN(0.05), 0.0, 0.0]], dtype=torch.float64)
    return p, mask, b


def _leaf(p):
    return p.log().clone().requires_grad_(True)


def test_sft_value_and_gradient_is_token_mean():
    p, mask, _ = _batch()
    logp = _leaf(p)
    out = weighted_nll(logp, mask, "sft")
    expected = -(LN(0.5) + LN(0.25) + LN(0.8) + LN(0.4) + LN(0.1)) / 5
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    out.loss.backward()
    assert torch.allclose(logp.grad, -mask / 5)
    assert out.stats["tokens"] == 5
    assert out.stats["weight_mean"] == pytest.approx(1.0)


def test_dft_weight_is_detached_probability():
    p, mask, _ = _batch()
    logp = _leaf(p)
    out = weighted_nll(logp, mask, "dft")
    expected = -(0.5 * LN(0.5) + 0.25 * LN(0.25) + 0.8 * LN(0.8) + 0.4 * LN(0.4) + 0.1 * LN(0.1)) / 5
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    # d/dlogp of -sg(p) log p is -sg(p): not -(p log p + p), which the non-detached version would give.
    assert torch.allclose(logp.grad, (-p * mask / 5).to(logp.grad.dtype), atol=1e-7)
    assert out.stats["weight_max"] == pytest.approx(0.8, rel=1e-6)


def test_masked_tokens_do_not_matter_even_if_not_finite():
    p, mask, b = _batch()
    logp = _leaf(p)
    ref = weighted_nll(logp, mask, "is", b, torch.tensor([True, True]), is_clip=[0, 10])
    logp2 = p.log().clone()
    logp2[mask == 0] = -math.inf     # e.g. padding labels
    b2 = b.clone()
    b2[mask == 0] = float("nan")
    logp2.requires_grad_(True)
    out = weighted_nll(logp2, mask, "is", b2, torch.tensor([True, True]), is_clip=[0, 10])
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-7)
    out.loss.backward()
    assert torch.isfinite(logp2.grad).all()
    assert (logp2.grad[mask == 0] == 0).all()
    assert (out.weights[mask == 0] == 0).all()


def test_is_equals_sft_when_behaviour_is_the_model():
    p, mask, _ = _batch()
    logp_a, logp_b = _leaf(p), _leaf(p)
    sft = weighted_nll(logp_a, mask, "sft")
    iso = weighted_nll(logp_b, mask, "is", p.log(), torch.tensor([True, True]), is_clip=[0.0, 5.0])
    assert iso.loss.item() == pytest.approx(sft.loss.item(), rel=1e-6)
    sft.loss.backward()
    iso.loss.backward()
    assert torch.allclose(logp_a.grad, logp_b.grad.to(logp_a.grad.dtype), atol=1e-7)
    assert iso.stats["clip_frac"] == 0.0


def test_is_token_values_and_clipping_bounds():
    p, mask, b = _batch()
    logp = _leaf(p)
    # ratios: row0 = 0.5/0.25=2, 0.25/0.5=0.5, 0.8/0.1=8 ; row1 = 0.4/0.8=0.5, 0.1/0.05=2
    out = weighted_nll(logp, mask, "is", b, torch.tensor([True, True]), is_clip=[0.6, 4.0])
    w_exp = torch.tensor([[0, 2.0, 0.6, 4.0], [0.6, 2.0, 0, 0]], dtype=torch.float64)
    assert torch.allclose(out.weights.double(), w_exp, atol=1e-6)
    assert out.clipped.tolist() == [[False, False, True, True], [True, False, False, False]]
    assert out.stats["clip_frac"] == pytest.approx(3 / 5)
    assert out.stats["weight_max"] == pytest.approx(4.0, rel=1e-6)
    expected = -(2 * LN(0.5) + 0.6 * LN(0.25) + 4 * LN(0.8) + 0.6 * LN(0.4) + 2 * LN(0.1)) / 5
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    out.loss.backward()
    assert torch.allclose(logp.grad, (-w_exp / 5).to(logp.grad.dtype), atol=1e-6)
    # bounds hold on every response token
    resp = out.weights[mask.bool()]
    assert (resp >= 0.6 - 1e-6).all() and (resp <= 4.0 + 1e-6).all()


def test_one_sided_cap_and_unbounded():
    p, mask, b = _batch()
    known = torch.tensor([True, True])
    w_cap, clipped, _ = token_weights(p.log(), mask, "is", b, known, is_clip=3.0)
    assert w_cap[0].tolist() == pytest.approx([0, 2.0, 0.5, 3.0])
    assert clipped.sum().item() == 1
    w_free, clipped, _ = token_weights(p.log(), mask, "is", b, known, is_clip=[0, None])
    assert w_free[0].tolist() == pytest.approx([0, 2.0, 0.5, 8.0])
    assert clipped.sum().item() == 0
    assert parse_clip([0.0, 5.0]) == (0.0, 5.0)
    for bad in ([2.0, 1.0], [-1, 2], "x", [1, 2, 3], [0, 0]):
        with pytest.raises(ValueError):
            parse_clip(bad)


def test_unknown_behaviour_rows_fall_back_to_dft_weight():
    p, mask, b = _batch()
    known = torch.tensor([True, False])
    out = weighted_nll(_leaf(p), mask, "is", b, known, is_clip=[0.0, 5.0])
    assert out.weights[1].tolist() == pytest.approx([0.4, 0.1, 0, 0])       # p, not a ratio
    assert out.weights[0].tolist() == pytest.approx([0, 2.0, 0.5, 5.0])
    assert out.ratio_rows.tolist() == [True, False]
    assert out.stats["ratio_tokens"] == 3 and out.stats["clipped_tokens"] == 1
    assert out.stats["clip_frac"] == pytest.approx(1 / 3)
    dft = weighted_nll(_leaf(p), mask, "is_dft", b, known, is_clip=[0.0, 5.0])
    assert dft.weights[1].tolist() == pytest.approx([0.4, 0.1, 0, 0])


def test_sequence_level_ratio_is_clipped_product_broadcast():
    p, mask, b = _batch()
    known = torch.tensor([True, True])
    # row0 product = 2 * 0.5 * 8 = 8 ; row1 product = 0.5 * 2 = 1
    w, clipped, _ = token_weights(p.log(), mask, "is", b, known, is_clip=[0, 5.0], is_level="sequence")
    assert w.tolist() == [pytest.approx([0, 5.0, 5.0, 5.0]), pytest.approx([1.0, 1.0, 0, 0])]
    assert clipped.tolist() == [[False, True, True, True], [False, False, False, False]]
    w, _, _ = token_weights(p.log(), mask, "is", b, known, is_clip=[0, None], is_level="sequence")
    assert w[0].tolist() == pytest.approx([0, 8.0, 8.0, 8.0])
    # log-space: a long sequence whose ratio product overflows float32 is clipped, not inf/nan
    T = 400
    lp = torch.full((1, T), math.log(0.9))
    bb = torch.full((1, T), math.log(0.1))          # ratio 9 per token: 9**400 overflows
    w, clipped, _ = token_weights(lp, torch.ones(1, T), "is", bb, torch.tensor([True]),
                                  is_clip=[0, 5.0], is_level="sequence")
    assert torch.isfinite(w).all() and torch.allclose(w, torch.full_like(w, 5.0))


def test_is_dft_is_clipped_product():
    p, mask, b = _batch()
    known = torch.tensor([True, True])
    # token ratios * p: row0: 2*0.5=1, 0.5*0.25=0.125, 8*0.8=6.4 ; row1: 0.5*0.4=0.2, 2*0.1=0.2
    w, clipped, _ = token_weights(p.log(), mask, "is_dft", b, known, is_clip=[0.15, 5.0])
    assert w.tolist() == [pytest.approx([0, 1.0, 0.15, 5.0]), pytest.approx([0.2, 0.2, 0, 0])]
    assert clipped.sum().item() == 2
    # sequence level: product (8 for row0, 1 for row1) times each token's p
    w, _, _ = token_weights(p.log(), mask, "is_dft", b, known, is_clip=[0, None], is_level="sequence")
    assert w.tolist() == [pytest.approx([0, 4.0, 2.0, 6.4]), pytest.approx([0.4, 0.1, 0, 0])]


def test_normaliser_and_empty_batch():
    p, mask, _ = _batch()
    logp = _leaf(p)
    out = weighted_nll(logp, mask, "sft", normaliser=10.0)
    assert out.loss.item() == pytest.approx(-(LN(0.5) + LN(0.25) + LN(0.8) + LN(0.4) + LN(0.1)) / 10)
    empty = weighted_nll(_leaf(p), torch.zeros_like(mask), "dft")
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad
    assert empty.stats["tokens"] == 0 and empty.stats["weight_mean"] == 0.0


def test_bad_arguments():
    p, mask, b = _batch()
    with pytest.raises(ValueError, match="unknown loss"):
        weighted_nll(_leaf(p), mask, "ppo")
    with pytest.raises(ValueError, match="needs behaviour"):
        weighted_nll(_leaf(p), mask, "is")
    with pytest.raises(ValueError, match="is_level"):
        weighted_nll(_leaf(p), mask, "is", b, torch.tensor([True, True]), is_level="batch")
    with pytest.raises(ValueError, match="differ"):
        weighted_nll(_leaf(p), mask[:, :2], "sft")
    assert set(LOSS_KINDS) == {"sft", "dft", "is", "is_dft"}


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_weights_and_their_statistics_count_response_tokens_only(kind, level):
    """Every kind weighs masked (prompt, padding) tokens 0, so the trainer's per-tier sums of the
    weights (drsft.train._StepStats) and the logged weight_mean/weight_max are over response
    tokens only. Row 0's masked prompt token has p 0.9, more than any response token."""
    p, mask, b = _batch()
    out = weighted_nll(_leaf(p), mask, kind, b, torch.tensor([True, False]), is_clip=[0, 10], is_level=level)
    assert (out.weights[mask == 0] == 0).all()
    kept = out.weights[mask == 1]
    assert out.stats["tokens"] == 5
    assert out.stats["weight_mean"] == pytest.approx(kept.sum().item() / 5, rel=1e-6)
    assert out.stats["weight_max"] == pytest.approx(kept.max().item(), rel=1e-6)
    if kind == "dft":
        assert out.stats["weight_mean"] == pytest.approx((0.5 + 0.25 + 0.8 + 0.4 + 0.1) / 5, rel=1e-6)
        assert out.stats["weight_max"] == pytest.approx(0.8, rel=1e-6)
