import math

import pytest
import torch
import torch.nn.functional as F

from smpo_diffusers import dpo_loss, preference_probability, smpo_loss


def _errors(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, generator=g, dtype=torch.float64) * 0.2 for _ in range(4)]


def diffusion_dpo_reference(pw, pl, rw, rl, beta):
    # Method page, section 1, written out independently of the library.
    model_diff = pw - pl
    ref_diff = rw - rl
    inside = -0.5 * beta * (model_diff - ref_diff)
    return -F.logsigmoid(inside).mean()


def test_preference_probability_elementwise_any_shape():
    rw = torch.tensor([[0.3, 0.2], [0.25, 0.1]])
    rl = torch.tensor([[0.2, 0.2], [0.3, 0.1]])
    p = preference_probability(rw, rl, 0.1)
    assert p.shape == (2, 2)
    expected = 1 / (1 + torch.exp(-(rw - rl) / 0.1))
    torch.testing.assert_close(p, expected)
    assert p[0, 1] == 0.5
    assert float(preference_probability(0.28, 0.11, 0.17)) == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan")])
def test_preference_probability_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        preference_probability(torch.zeros(2), torch.zeros(2), scale)


def test_p_one_gamma_one_equals_diffusion_dpo():
    pw, pl, rw, rl = _errors()
    for beta in (1.0, 2000.0, 5000.0):
        out = smpo_loss(pw, pl, rw, rl, torch.ones(6, dtype=torch.float64), beta, gamma=1.0)
        torch.testing.assert_close(out.loss, diffusion_dpo_reference(pw, pl, rw, rl, beta), rtol=1e-12, atol=0)
        torch.testing.assert_close(dpo_loss(pw, pl, rw, rl, beta).loss, out.loss, rtol=0, atol=0)


def test_tie_gives_log2_and_exactly_zero_gradient():
    pw, pl, rw, rl = _errors()
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    out = smpo_loss(pw, pl, rw, rl, torch.full((6,), 0.5, dtype=torch.float64), 5000.0, gamma=10.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-15)
    out.loss.backward()
    assert torch.count_nonzero(pw.grad) == 0 and torch.count_nonzero(pl.grad) == 0
    assert torch.all(out.weight == 0)


def test_swapping_winner_and_loser_with_complementary_p_is_invariant():
    pw, pl, rw, rl = _errors(seed=3)
    p = torch.tensor([0.9, 0.6, 0.5, 0.55, 0.99, 0.7], dtype=torch.float64)
    a = smpo_loss(pw, pl, rw, rl, p, 2000.0, gamma=10.0)
    b = smpo_loss(pl, pw, rl, rw, 1 - p, 2000.0, gamma=10.0)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a.implicit_accuracy, b.implicit_accuracy)


def test_per_pair_probability_is_honoured():
    pw, pl, rw, rl = _errors(seed=5)
    p = torch.tensor([0.95, 0.5, 0.7, 0.51, 0.8, 0.6], dtype=torch.float64)
    batched = smpo_loss(pw, pl, rw, rl, p, 3000.0, gamma=10.0)
    singles = torch.stack([
        smpo_loss(pw[i:i + 1], pl[i:i + 1], rw[i:i + 1], rl[i:i + 1], p[i:i + 1], 3000.0, gamma=10.0).loss
        for i in range(6)
    ])
    torch.testing.assert_close(batched.loss, singles.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(batched.weight, 10 * (2 * p - 1))
    # A batch where only the first pair's label changes changes only the first pair's term.
    p2 = p.clone()
    p2[0] = 0.5
    changed = smpo_loss(pw, pl, rw, rl, p2, 3000.0, gamma=10.0)
    assert torch.equal(changed.weight[1:], batched.weight[1:])
    assert changed.weight[0] == 0


def test_diagnostics():
    pw = torch.tensor([0.10, 0.20])
    pl = torch.tensor([0.20, 0.10])
    rw = torch.tensor([0.15, 0.15])
    rl = torch.tensor([0.15, 0.15])
    out = smpo_loss(pw, pl, rw, rl, torch.tensor([1.0, 1.0]), 100.0, gamma=1.0)
    torch.testing.assert_close(out.margin, torch.tensor([-0.1, 0.1]))
    torch.testing.assert_close(out.reward_margin, torch.tensor([5.0, -5.0]))
    torch.testing.assert_close(out.implicit_accuracy, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"\(B,\)"):
        smpo_loss(pw[None], pl[None], rw[None], rl[None], 1.0, 1.0)


def test_gradient_descent_lowers_winner_relative_error():
    torch.manual_seed(0)
    policy_w = torch.full((4,), 0.3, requires_grad=True)
    policy_l = torch.full((4,), 0.3, requires_grad=True)
    ref_w = torch.full((4,), 0.3)
    ref_l = torch.full((4,), 0.3)
    p = torch.tensor([0.9, 0.7, 0.6, 0.99])
    opt = torch.optim.SGD([policy_w, policy_l], lr=1e-4)
    for _ in range(20):
        opt.zero_grad()
        smpo_loss(policy_w, policy_l, ref_w, ref_l, p, 2000.0, gamma=10.0).loss.backward()
        opt.step()
    relative = (policy_w - policy_l) - (ref_w - ref_l)
    assert torch.all(relative < 0), relative
    # A stronger preference moves its pair further.
    assert relative[3] < relative[2]


def test_bad_shapes_probabilities_and_half_precision_inputs():
    pw, pl, rw, rl = (e.float() for e in _errors())
    with pytest.raises(ValueError, match="shape"):
        smpo_loss(pw, pl.unsqueeze(1), rw, rl, 0.7, 5000.0)  # would broadcast to (B, B)
    with pytest.raises(ValueError, match="prob_w"):
        smpo_loss(pw, pl, rw, rl, torch.ones(3), 5000.0)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            smpo_loss(pw, pl, rw, rl, bad, 5000.0)
    with pytest.raises(ValueError, match="finite"):
        preference_probability(torch.zeros(2), torch.ones(2), float("inf"))
    # bf16 errors: the weight γ(2p - 1) and the loss are computed in fp32
    half = smpo_loss(*(e.bfloat16() for e in (pw, pl, rw, rl)), 0.55, 5000.0)
    assert half.loss.dtype == torch.float32 and torch.allclose(half.weight, torch.full((6,), 1.0))
    mixed = smpo_loss(pw, pl, rw.double(), rl.double(), 0.55, 5000.0)  # fp64 reference errors stay fp64
    assert mixed.loss.dtype == torch.float64 and mixed.margin.dtype == torch.float64
