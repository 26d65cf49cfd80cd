"""Baseline distillation losses (DKD, FitNets, RKD, CRD) against hand computations with loops and python floats."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from moma_hf.losses import crd_loss, dkd_loss, fitnet_loss, kd_loss, rkd_loss


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def _dkd_pieces(zs, zt, y, t):
    """TCKD and NCKD of one sample, from python lists of logits."""
    ps, pt = _softmax([v / t for v in zs]), _softmax([v / t for v in zt])
    tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
    qs = _softmax([v / t for c, v in enumerate(zs) if c != y])
    qt = _softmax([v / t for c, v in enumerate(zt) if c != y])
    return tckd, _kl(qt, qs), pt[y]


DKD_STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.3, -1.0, 2.2], [-0.5, 0.0, 0.5], [2.0, 1.0, -3.0]])
DKD_TEACHER = torch.tensor([[0.2, 3.0, -1.0], [1.5, 0.4, 0.1], [0.0, -2.0, 1.0], [4.0, -1.0, 0.5]])
DKD_LABELS = torch.tensor([1, 0, 2, 1])


def test_dkd_matches_a_hand_computation():
    for alpha, beta, t in [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0)]:
        expected = 0.0
        for zs, zt, y in zip(DKD_STUDENT.tolist(), DKD_TEACHER.tolist(), DKD_LABELS.tolist()):
            tckd, nckd, _ = _dkd_pieces(zs, zt, y, t)
            expected += t * t * (alpha * tckd + beta * nckd)
        got = dkd_loss(DKD_STUDENT, DKD_TEACHER, DKD_LABELS, alpha=alpha, beta=beta, temperature=t)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(expected / 4, rel=1e-5)


def test_dkd_is_its_weighted_pieces_and_zero_for_an_identical_teacher():
    args = (DKD_STUDENT, DKD_TEACHER, DKD_LABELS)
    tckd = dkd_loss(*args, alpha=1.0, beta=0.0)
    nckd = dkd_loss(*args, alpha=0.0, beta=1.0)
    assert dkd_loss(*args, alpha=0.7, beta=3.0).item() == pytest.approx(0.7 * tckd.item() + 3.0 * nckd.item(), rel=1e-5)
    assert tckd.item() > 0 and nckd.item() > 0
    assert dkd_loss(DKD_STUDENT, DKD_STUDENT.clone(), DKD_LABELS).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_pieces_recombine_into_classical_kd():
    # The DKD paper's identity KD = TCKD + (1 - p_y^teacher) NCKD, per sample, at several temperatures.
    for t in (1.0, 4.0):
        for i in range(4):
            zs, zt, y = DKD_STUDENT[i : i + 1], DKD_TEACHER[i : i + 1], DKD_LABELS[i : i + 1]
            p_target = F.softmax(zt / t, dim=-1)[0, y].item()
            tckd = dkd_loss(zs, zt, y, alpha=1.0, beta=0.0, temperature=t).item()
            nckd = dkd_loss(zs, zt, y, alpha=0.0, beta=1.0, temperature=t).item()
            assert kd_loss(zs, zt, t).item() == pytest.approx(tckd + (1 - p_target) * nckd, rel=1e-5)


def test_dkd_gradient_reaches_only_the_student_and_stays_finite_for_confident_logits():
    student = (DKD_STUDENT * 30).requires_grad_()  # p_y ~ 1: log(1 - p_y) must not underflow to -inf
    teacher = (DKD_TEACHER * 30).requires_grad_()
    loss = dkd_loss(student, teacher, DKD_LABELS)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert dkd_loss(student.half(), teacher.half(), DKD_LABELS).dtype == torch.float32


def test_fitnet_is_the_mean_squared_error_and_leaves_the_teacher_alone():
    a = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, 1.0]], requires_grad=True)
    b = torch.tensor([[0.5, -1.0, 0.5], [2.0, 1.0, -1.0]], requires_grad=True)
    expected = sum((x - y) ** 2 for ra, rb in zip(a.tolist(), b.tolist()) for x, y in zip(ra, rb)) / 6
    loss = fitnet_loss(a, b)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert loss.item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    loss.backward()
    assert a.grad is not None and b.grad is None
    with pytest.raises(ValueError, match="equal shapes"):
        fitnet_loss(a, b[:, :2])


def _huber(x, y):
    d = abs(x - y)
    return 0.5 * d * d if d < 1 else d - 0.5


def _rkd_by_hand(s, t, w_distance, w_angle):
    """RKD with nested loops over pairs and triples of python lists."""
    n = len(s)

    def distance(x, i, j):
        return math.hypot(*[a - b for a, b in zip(x[i], x[j])])

    def normalised_distances(x):
        d = {(i, j): distance(x, i, j) for i in range(n) for j in range(n) if i != j}
        mu = sum(d.values()) / len(d)
        return {pair: v / mu for pair, v in d.items()}

    def cosine(x, i, j, k):
        e_ij = [(a - b) / distance(x, i, j) for a, b in zip(x[i], x[j])]
        e_kj = [(a - b) / distance(x, k, j) for a, b in zip(x[k], x[j])]
        return sum(a * b for a, b in zip(e_ij, e_kj))

    ds, dt = normalised_distances(s), normalised_distances(t)
    distance_term = sum(_huber(ds[p], dt[p]) for p in ds) / len(ds)
    triples = list(itertools.permutations(range(n), 3))
    angle_term = sum(_huber(cosine(s, *ijk), cosine(t, *ijk)) for ijk in triples) / len(triples)
    return w_distance * distance_term + w_angle * angle_term


def test_rkd_matches_a_hand_computation_with_different_dims():
    s = [[0.1, 0.9], [1.2, -0.3], [-0.7, 0.4], [0.5, 2.0]]
    t = [[1.0, 0.0, 0.5], [0.0, 1.5, -0.2], [-1.0, -0.5, 0.3], [0.3, 0.2, 2.0]]
    for w_distance, w_angle in [(25.0, 50.0), (1.0, 0.0), (0.0, 1.0)]:
        got = rkd_loss(torch.tensor(s), torch.tensor(t), w_distance=w_distance, w_angle=w_angle)
        assert got.item() == pytest.approx(_rkd_by_hand(s, t, w_distance, w_angle), rel=1e-5)
    # Far apart student and teacher: the Huber loss is in its linear part for some pairs.
    far = [[10 * v for v in row] for row in s]
    got = rkd_loss(torch.tensor(far) ** 3, torch.tensor(t))
    assert got.item() == pytest.approx(_rkd_by_hand([[v**3 for v in r] for r in far], t, 25.0, 50.0), rel=1e-5)


def test_rkd_ignores_scale_rotation_translation_and_padding():
    torch.manual_seed(0)
    teacher = torch.randn(4, 3)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3))
    moved = 2.5 * teacher @ rotation + torch.tensor([3.0, -1.0, 0.5])
    assert rkd_loss(moved, teacher).item() == pytest.approx(0.0, abs=1e-4)
    padded = torch.cat([0.3 * teacher, torch.zeros(4, 2)], dim=1)  # (4, 5) student, (4, 3) teacher
    assert rkd_loss(padded, teacher).item() == pytest.approx(0.0, abs=1e-4)
    assert rkd_loss(torch.randn(4, 5), teacher).item() > 0


def test_rkd_gradient_reaches_only_the_student_and_survives_duplicate_rows():
    torch.manual_seed(1)
    student = torch.randn(4, 2)
    student[3] = student[0]  # a zero-length side: distance 0, its angles count as cosine 0
    student.requires_grad_()
    teacher = torch.randn(4, 3, requires_grad=True)
    loss = rkd_loss(student, teacher)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_rkd_rejects_batches_too_small_for_its_terms():
    with pytest.raises(ValueError, match="batch size 2"):
        rkd_loss(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="batch size 1"):
        rkd_loss(torch.randn(1, 3), torch.randn(1, 4), w_angle=0.0)
    assert torch.isfinite(rkd_loss(torch.randn(2, 3), torch.randn(2, 4), w_angle=0.0))


def _unit(rows):
    return F.normalize(torch.tensor(rows), dim=1)


CRD_S = _unit([[1.0, 0.2, -0.3], [0.1, 1.0, 0.4], [-0.5, 0.3, 1.0]])
CRD_T = _unit([[0.8, 0.5, 0.0], [-0.2, 1.0, 0.1], [0.0, -0.4, 1.0]])
CRD_MEM_S = _unit([[1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [0.5, 0.0, -1.0], [-1.0, 0.2, 0.2]])
CRD_MEM_T = _unit([[0.3, -1.0, 0.2], [1.0, 0.0, 1.0], [-0.6, 0.6, 0.1], [0.2, 0.9, -0.7]])


def test_crd_matches_a_hand_computed_two_direction_info_nce():
    mask = torch.tensor([True, False, True, True])
    t = 0.07
    s, te, ms, mt = (x.tolist() for x in (CRD_S, CRD_T, CRD_MEM_S, CRD_MEM_T))

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    def direction(anchors, positives, memory):
        total = 0.0
        for a, p in zip(anchors, positives):
            logits = [dot(a, p) / t] + [dot(a, m) / t for m, keep in zip(memory, mask.tolist()) if keep]
            total += -math.log(math.exp(logits[0]) / sum(math.exp(v) for v in logits))
        return total / len(anchors)

    expected = (direction(s, te, mt) + direction(te, s, ms)) / 2
    got = crd_loss(CRD_S, CRD_T, CRD_MEM_S, CRD_MEM_T, temperature=t, memory_mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_crd_masked_slots_are_the_same_as_removed_rows():
    mask = torch.tensor([False, True, True, False])
    masked = crd_loss(CRD_S, CRD_T, CRD_MEM_S, CRD_MEM_T, 0.2, mask)
    removed = crd_loss(CRD_S, CRD_T, CRD_MEM_S[1:3], CRD_MEM_T[1:3], 0.2)
    assert masked.item() == pytest.approx(removed.item(), rel=1e-6)
    assert crd_loss(CRD_S, CRD_T, CRD_MEM_S, CRD_MEM_T, 0.2).item() != pytest.approx(masked.item(), rel=1e-3)


def test_crd_gradient_reaches_both_embeddings_through_both_directions():
    student, teacher = CRD_S.clone().requires_grad_(), CRD_T.clone().requires_grad_()
    memory_s, memory_t = CRD_MEM_S.clone().requires_grad_(), CRD_MEM_T.clone().requires_grad_()
    crd_loss(student, teacher, memory_s, memory_t).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0
    assert memory_s.grad is None and memory_t.grad is None
    # The positive is not detached: with an empty teacher memory the student-anchored term is a one-logit CE (0,
    # no gradient), so the student's gradient can only come as the positive key of the teacher-anchored term.
    student = CRD_S.clone().requires_grad_()
    loss = crd_loss(student, CRD_T, CRD_MEM_S, CRD_MEM_T[:0])
    loss.backward()
    assert loss.item() > 0 and student.grad.abs().sum() > 0
