"""Distillation losses against values computed by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from crossmodal_kd.losses import (
    drop_target,
    hint_mse,
    nce_loss,
    non_target_kl,
    perturbed_feature_mse,
    rkd_angle,
    rkd_distance,
    target_kl,
    text_anchored_contrastive,
)
from crossmodal_kd.methods.c2kd import kendall_tau


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def smooth_l1(diffs):
    return sum(0.5 * d * d if abs(d) < 1 else abs(d) - 0.5 for d in diffs) / len(diffs)


def test_hint_mse():
    regressed, target = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    assert hint_mse(regressed, target).item() == pytest.approx((1 + 0 + 0 + 4) / 4)


def test_drop_target_keeps_the_other_classes_in_order():
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert drop_target(logits, torch.tensor([0, 2])).tolist() == [[2.0, 3.0], [4.0, 5.0]]


# student p = (1, 2, 1)/4, teacher p = (1, 6, 3)/10, target class 1
STUDENT = torch.tensor([[0.0, math.log(2.0), 0.0]])
TEACHER = torch.tensor([[0.0, math.log(6.0), math.log(3.0)]])
LABEL = torch.tensor([1])
TCKD = kl([0.6, 0.4], [0.5, 0.5])  # (p_y, 1 - p_y)
NCKD = kl([0.25, 0.75], [0.5, 0.5])  # non-target classes renormalised


def test_target_and_non_target_kl():
    assert target_kl(STUDENT, TEACHER, LABEL, tau=1.0).item() == pytest.approx(TCKD, rel=1e-5)
    assert non_target_kl(STUDENT, TEACHER, LABEL, tau=1.0).item() == pytest.approx(NCKD, rel=1e-5)
    # tau divides the logits and multiplies the loss by tau^2
    assert target_kl(2 * STUDENT, 2 * TEACHER, LABEL, tau=2.0).item() == pytest.approx(4 * TCKD, rel=1e-5)
    assert non_target_kl(2 * STUDENT, 2 * TEACHER, LABEL, tau=2.0).item() == pytest.approx(4 * NCKD, rel=1e-5)
    # the target logit does not enter the non-target term
    moved = STUDENT.clone()
    moved[0, 1] = 10.0
    assert non_target_kl(moved, TEACHER, LABEL, tau=1.0).item() == pytest.approx(NCKD, rel=1e-5)


def test_rkd_distance():
    student = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # sides 3, 4, 5: mean 4
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # sides 1, 1, sqrt 2
    mean_t = (2 + math.sqrt(2)) / 3
    diffs = [3 / 4 - 1 / mean_t, 4 / 4 - 1 / mean_t, 5 / 4 - math.sqrt(2) / mean_t]
    expected = smooth_l1([d for d in diffs for _ in range(2)] + [0.0] * 3)  # 9 entries, symmetric, zero diagonal
    assert rkd_distance(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle():
    student = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # right isosceles: cosines 0, 1/sqrt2, 1/sqrt2
    teacher = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])  # equilateral: cosines 1/2
    # 27 triplets (i, j, k) around vertex j: i == k != j gives cos 0 = 1 on both sides; the two
    # orderings of the other pair give the angle at j; every triplet touching j itself is 0
    diffs = [0 - 0.5] * 2 + [1 / math.sqrt(2) - 0.5] * 4
    expected = smooth_l1(diffs + [0.0] * (27 - len(diffs)))
    assert rkd_angle(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_nce_loss():
    scores = torch.tensor([[2.0, 1.0, 0.5]])  # positive 2, K = 2 negatives; m = K / N = 0.5 with N = 4
    expected = -(math.log(2 / 2.5) + math.log(0.5 / 1.5) + math.log(0.5 / 1.0))
    assert nce_loss(scores, noise_prob=0.25).item() == pytest.approx(expected, rel=1e-5)


def test_perturbed_feature_mse_adds_noise_to_the_teacher_only():
    student, teacher = torch.tensor([[1.0, 2.0]], requires_grad=True), torch.tensor([[0.0, 4.0]])
    assert perturbed_feature_mse(student, teacher, sigma=0.0).item() == pytest.approx((1 + 4) / 2)
    noise = torch.randn(1, 2, generator=torch.Generator().manual_seed(3))
    loss = perturbed_feature_mse(student, teacher, sigma=0.5, generator=torch.Generator().manual_seed(3))
    target = [0.0 + 0.5 * noise[0, 0].item(), 4.0 + 0.5 * noise[0, 1].item()]
    assert loss.item() == pytest.approx(((1 - target[0]) ** 2 + (2 - target[1]) ** 2) / 2, rel=1e-6)
    loss.backward()
    assert student.grad is not None and not teacher.requires_grad


def test_text_anchored_contrastive():
    anchors = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised to the axes
    embeddings = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    c = 1 / math.sqrt(2)  # cos of the first embedding with both anchors
    expected = (-math.log(math.exp(c / 0.5) / (2 * math.exp(c / 0.5)))
                - math.log(math.exp(1 / 0.5) / (math.exp(0.0) + math.exp(1 / 0.5)))) / 2
    loss = text_anchored_contrastive(embeddings, anchors, torch.tensor([0, 1]), temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_kendall_tau():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    y = torch.tensor([[1.0, 2.0, 4.0, 3.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    # row 0: 5 concordant, 1 discordant pair; row 1: reversed; row 2: one tie in x (tau-b: 5 / sqrt(5 * 6));
    # row 3: x constant -> 0
    expected = [4 / 6, -1.0, 5 / math.sqrt(30), 0.0]
    assert kendall_tau(x, y).tolist() == pytest.approx(expected, rel=1e-6)


def test_hierarchical_loss_of_the_relaxed_clip_teacher():
    from crossmodal_kd.losses import hierarchical_terms

    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    class_text = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # n_class of class 0 and 1 (any norm)
    relaxed = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # cos to its class: 1/sqrt(2), 1
    pretrained = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # cos to relaxed: 1/sqrt(2), 0
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(2)) / 2
    c = 1 / math.sqrt(2)
    terms = hierarchical_terms(logits, labels, relaxed, class_text, relaxed, pretrained, w_class=0.2, w_pre=0.005)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-6)
    assert terms["class"].item() == pytest.approx(0.2 * ((1 - c) + 0) / 2, rel=1e-6)
    assert terms["pretrained"].item() == pytest.approx(0.005 * ((1 - c) + 1) / 2, rel=1e-6)
    total = sum(hierarchical_terms(logits, labels, relaxed, class_text, relaxed, pretrained).values())  # defaults 0.2 / 0.005
    assert total.item() == pytest.approx(ce + 0.1 * (1 - c) + 0.0025 * (2 - c), rel=1e-6)
