"""The paper's equations against hand computations on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from mtprune.method import (
    alm_coupling,
    eq7_backward,
    eq7_objective,
    eq8_objective,
    eq9_backward,
    eq9_objective,
    eq10_update,
    joint_seg_backward,
    joint_seg_objective,
    l1_penalty,
    relative_gap,
    soft_threshold_,
)


def _pair():
    w1 = [torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([[0.5]], requires_grad=True)]
    w3 = [torch.tensor([0.0, -1.0], requires_grad=True), torch.tensor([[1.5]], requires_grad=True)]
    E = [torch.tensor([0.1, 0.2]), torch.tensor([[-0.3]])]
    return w1, w3, E


def test_eq7_value_and_gradient():
    w1, w3, E = _pair()
    gamma1 = [w1[0]]  # γ1 is part of W1
    loss = torch.tensor(0.7)
    obj = eq7_objective(loss, w1, w3, E, mu=2.0, gamma1=gamma1, alpha1=0.1)
    # by hand: D = W1−W3 = ([1, −1], [[−1]]); <E, D> = 0.1 − 0.2 + 0.3 = 0.2; μ/2‖D‖² = 1·3 = 3; α‖γ‖₁ = 0.1·3
    assert obj.item() == pytest.approx(0.7 + 0.2 + 3.0 + 0.3)
    obj.backward()
    # ∂/∂W1 = E + μD (+ α·sign γ on γ); W3 is held fixed
    assert torch.allclose(w1[0].grad, torch.tensor([0.1 + 2.0 + 0.1, 0.2 - 2.0 - 0.1]))
    assert torch.allclose(w1[1].grad, torch.tensor([[-0.3 - 2.0]]))
    assert w3[0].grad is None and w3[1].grad is None


def test_eq8_value_and_gradient():
    gamma2 = [torch.tensor([0.5, -0.25, 0.0], requires_grad=True)]
    seg = torch.tensor(1.5)
    obj = eq8_objective(seg, gamma2, alpha2=0.2, lam=2.0)
    assert obj.item() == pytest.approx(2.0 * 1.5 + 0.2 * 0.75)
    obj.backward()
    assert torch.allclose(gamma2[0].grad, torch.tensor([0.2, -0.2, 0.0]))  # α·sign(γ), 0 at 0


def test_eq9_value_and_gradient():
    w1, w3, E = _pair()
    obj = eq9_objective(torch.tensor(0.5), w1, w3, E, mu=2.0, gamma3=[w3[1]], alpha2=0.5, lam=3.0)
    assert obj.item() == pytest.approx(3.0 * 0.5 + 0.2 + 3.0 + 0.5 * 1.5)
    obj.backward()
    # ∂/∂W3 = −E − μD (+ α·sign γ3); W1 fixed
    assert torch.allclose(w3[0].grad, torch.tensor([-0.1 - 2.0, -0.2 + 2.0]))
    assert torch.allclose(w3[1].grad, torch.tensor([[0.3 + 2.0 + 0.5]]))
    assert w1[0].grad is None


def test_joint_objective_gives_eq8_and_eq9_gradients():
    w1, w3, E = _pair()
    gamma2 = [torch.tensor([0.3, -0.1], requires_grad=True)]
    dec = torch.tensor([2.0, 1.0], requires_grad=True)
    seg = (dec * w3[0]).sum()  # a segmentation loss depending on W2 (dec) and W3
    joint = joint_seg_objective(seg, w1, w3, E, 2.0, gamma2, [w3[1]], 0.1, 1.5)
    joint.backward()
    g_joint = [t.grad.clone() for t in (*w3, dec, gamma2[0])]
    for t in (*w3, dec, gamma2[0]):
        t.grad = None
    seg = (dec * w3[0]).sum()
    eq9_objective(seg, w1, w3, E, 2.0, [w3[1]], 0.1, 1.5).backward()
    g3 = [t.grad.clone() for t in w3]
    for t in w3:
        t.grad = None
    seg = (dec * w3[0]).sum()
    dec.grad = None
    eq8_objective(seg, gamma2, 0.1, 1.5).backward()
    assert torch.allclose(g_joint[0], g3[0]) and torch.allclose(g_joint[1], g3[1])
    assert torch.allclose(g_joint[2], dec.grad) and torch.allclose(g_joint[3], gamma2[0].grad)


def test_eq10_two_rounds():
    w1, w3, E = _pair()
    mu = eq10_update(E, w1, w3, mu=2.0, rho=1.5)
    # E ← E + μ(W1 − W3) with μ = 2; μ ← 3
    assert mu == pytest.approx(3.0)
    assert torch.allclose(E[0], torch.tensor([0.1 + 2.0, 0.2 - 2.0]))
    assert torch.allclose(E[1], torch.tensor([[-0.3 - 2.0]]))
    with torch.no_grad():
        w1[0].copy_(torch.tensor([0.5, -1.0]))  # the copies move between rounds
    mu = eq10_update(E, w1, w3, mu, rho=1.5, mu_max=4.0)
    assert mu == pytest.approx(4.0)  # ρμ = 4.5, capped by mu_max
    assert torch.allclose(E[0], torch.tensor([2.1 + 3.0 * 0.5, -1.8 + 0.0]))
    assert torch.allclose(E[1], torch.tensor([[-2.3 - 3.0]]))


def test_coupling_l1_gap_and_soft_threshold():
    w1, w3, E = _pair()
    assert alm_coupling(w1, w3, E, 0.0).item() == pytest.approx(0.2)
    assert l1_penalty([torch.tensor([1.0, -3.0])], 0.5).item() == pytest.approx(2.0)
    assert relative_gap(w1, w3) == pytest.approx((3**0.5) / (1 + 4 + 0.25) ** 0.5)
    g = [torch.tensor([0.5, -0.05, 0.02, -1.0])]
    soft_threshold_(g, 0.1)
    assert torch.allclose(g[0], torch.tensor([0.4, 0.0, 0.0, -0.9]))


def test_alm_rounds_drive_the_copies_together():
    """A toy multi-task problem: ℓcls = ½‖W1 − a‖², ℓseg = ½‖W3 − b‖², a ≠ b. With μ growing (Eq. 10)
    the inexact ALM rounds make ‖W1 − W3‖ fall round by round."""
    torch.manual_seed(0)
    a, b = torch.randn(50), torch.randn(50)
    w1 = [torch.zeros(50, requires_grad=True)]
    w3 = [torch.ones(50, requires_grad=True)]
    E = [torch.zeros(50)]
    o1, o3 = torch.optim.SGD(w1, lr=0.05), torch.optim.SGD(w3, lr=0.05)
    mu, gaps = 1.0, []
    for _ in range(8):
        for _ in range(20):
            o1.zero_grad()
            eq7_objective(0.5 * (w1[0] - a).pow(2).sum(), w1, w3, E, mu, [], 0.0).backward()
            o1.step()
        for _ in range(20):
            o3.zero_grad()
            eq9_objective(0.5 * (w3[0] - b).pow(2).sum(), w1, w3, E, mu, [], 0.0, 1.0).backward()
            o3.step()
        mu = eq10_update(E, w1, w3, mu, rho=1.5)
        gaps.append(relative_gap(w1, w3))
    assert all(g2 < g1 for g1, g2 in zip(gaps, gaps[1:], strict=False))
    assert gaps[-1] < 0.2 * gaps[0]


def test_fast_alm_gradient_equals_autograd():
    """The gradients training steps on (eq7_backward, eq9_backward: add_alm_grad_ for the ALM terms) are
    exactly the gradients of Eq. 7's and Eq. 9's objectives."""
    torch.manual_seed(1)
    for sign in (+1.0, -1.0):
        w1 = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
        w3 = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
        E = [torch.randn(3, 4), torch.randn(5)]
        task = (w1[0].sum() * 2 + w3[1].pow(2).sum()) if sign > 0 else (w3[0].sin().sum() + w1[1].sum())
        if sign > 0:
            eq7_objective(task, w1, w3, E, 0.7, [w1[1]], 0.1).backward()
            ref = [p.grad.clone() for p in w1]
            for p in w1:
                p.grad = None
            task = w1[0].sum() * 2 + w3[1].pow(2).sum()
            eq7_backward(task, w1, w3, E, 0.7, [w1[1]], 0.1)
            fast = [p.grad for p in w1]
        else:
            eq9_objective(task, w1, w3, E, 0.7, [w3[1]], 0.1, 2.0).backward()
            ref = [p.grad.clone() for p in w3]
            for p in w3:
                p.grad = None
            task = w3[0].sin().sum() + w1[1].sum()
            eq9_backward(task, w1, w3, E, 0.7, [w3[1]], 0.1, 2.0)
            fast = [p.grad for p in w3]
        for a, b in zip(ref, fast, strict=True):
            assert torch.allclose(a, b, atol=1e-6)


def test_joint_seg_backward_is_the_gradient_of_the_joint_objective():
    torch.manual_seed(2)
    w1 = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    w3 = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    w2 = [torch.randn(6, requires_grad=True)]
    E = [torch.randn(3, 4), torch.randn(5)]

    def seg() -> torch.Tensor:
        return (w3[0].sin() * 1.5).sum() + (w2[0] * w3[1].sum()).pow(2).sum()

    joint_seg_objective(seg(), w1, w3, E, 0.7, w2, [w3[1]], 0.1, 1.5).backward()
    ref = [p.grad.clone() for p in w3 + w2]
    for p in w1 + w2 + w3:
        p.grad = None
    joint_seg_backward(seg(), w1, w3, E, 0.7, w2, [w3[1]], 0.1, 1.5)
    for a, b in zip(ref, [p.grad for p in w3 + w2], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(ref[0], torch.zeros_like(ref[0]))
