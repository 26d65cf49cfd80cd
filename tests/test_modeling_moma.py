"""The MoMA model: loss terms, queue, EMA, gradients, teacher modes and save/load, on real patches."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import timm_classifier, tiny_vit

from moma_hf import MoMAForDistillation
from moma_hf.losses import info_nce, kd_loss
from moma_hf.modules.heads import ProjectionHead
from moma_hf.modules.key_queue import KeyQueue
from moma_hf.networks.backbones import pooled_features


def test_info_nce_matches_a_hand_computation():
    torch.manual_seed(0)
    q, k = F.normalize(torch.randn(3, 4), dim=1), F.normalize(torch.randn(3, 4), dim=1)
    queue = F.normalize(torch.randn(5, 4), dim=1)
    mask = torch.tensor([True, True, True, False, False])
    expected = 0.0
    for i in range(3):
        pos = math.exp(float(q[i] @ k[i]) / 0.15)
        negs = sum(math.exp(float(q[i] @ queue[j]) / 0.15) for j in range(3))  # masked slots 3, 4 excluded
        expected += -math.log(pos / (pos + negs))
    assert info_nce(q, k, queue, 0.15, mask).item() == pytest.approx(expected / 3, rel=1e-5)
    full = sum(-math.log(math.exp(float(q[i] @ k[i]) / 0.5) / (math.exp(float(q[i] @ k[i]) / 0.5) + sum(
        math.exp(float(q[i] @ queue[j]) / 0.5) for j in range(5)))) for i in range(3)) / 3
    assert info_nce(q, k, queue, 0.5).item() == pytest.approx(full, rel=1e-5)


def test_kd_loss_matches_a_hand_computation():
    zs, zt, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 3.0, -1.0]]), 4.0
    ps = [math.exp(v / t) for v in zs[0].tolist()]
    pt = [math.exp(v / t) for v in zt[0].tolist()]
    ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
    expected = t * t * sum(b * math.log(b / a) for a, b in zip(ps, pt))
    assert kd_loss(zs, zt, t).item() == pytest.approx(expected, rel=1e-5)


def test_queue_is_fifo_and_wraps_around():
    queue = KeyQueue(size=5, dim=2)
    first = torch.arange(6.0).view(3, 2)
    queue.enqueue(first)
    assert queue.queue_ptr.item() == 3 and queue.queue_len.item() == 3
    assert torch.equal(queue.queue[:3], first) and queue.valid_mask().tolist() == [True] * 3 + [False] * 2
    second = torch.arange(100.0, 106.0).view(3, 2)
    queue.enqueue(second)  # slots 3, 4, then wraps to 0
    assert queue.queue_ptr.item() == (3 + 3) % 5 and queue.queue_len.item() == 5
    assert torch.equal(queue.queue[3:], second[:2]) and torch.equal(queue.queue[0], second[2])
    assert torch.equal(queue.queue[1:3], first[1:])
    with pytest.raises(ValueError, match="queue_size"):
        queue.enqueue(torch.zeros(6, 2))


def test_momentum_update_is_the_ema_of_every_key_side_tensor(small_moma):
    model = small_moma(student=timm_classifier(), teacher=timm_classifier(), momentum=0.9)
    assert model.teacher_update == "momentum"
    keys, queries = model.ema_pairs()
    with torch.no_grad():
        for q in queries:
            q.add_(torch.randn_like(q))
    before = [k.clone() for k in keys]
    model.momentum_update()
    for k, old, q in zip(keys, before, queries):
        torch.testing.assert_close(k, 0.9 * old + 0.1 * q)
    # every parameter of the teacher backbone, g_T and A_k is covered, and nothing of the query side
    covered = {id(k) for k in keys}
    head = {id(p) for p in model.teacher.timm_model.get_classifier().parameters()}
    key_side = [*model.teacher.parameters(), *model.key_head.parameters(), *model.key_attention.parameters()]
    assert all(id(p) in covered for p in key_side if id(p) not in head)
    assert not covered & {id(p) for p in model.student.parameters()}


def test_gradients_reach_the_query_side_and_never_the_key_side(small_moma, nct_tensors):
    model = small_moma().train()
    pixels, labels = nct_tensors
    model.enqueue(model(pixel_values=pixels[:8], labels=labels[:8]).contrastive_keys)
    out = model(pixel_values=pixels[8:24], labels=labels[8:24])
    assert out.loss_moma > 0 and out.loss_kd > 0 and out.loss_ce > 0
    out.loss.backward()
    for module in (model.student, model.query_head, model.query_attention):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    for module in (model.teacher, model.key_head, model.key_attention):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    expected = out.loss_ce + out.loss_kd + out.loss_moma
    torch.testing.assert_close(out.loss, expected)


def test_auto_chooses_momentum_for_twins_and_frozen_across_architectures(small_moma):
    assert small_moma(timm_classifier(), timm_classifier()).teacher_update == "momentum"
    frozen = small_moma(timm_classifier(), tiny_vit())
    assert frozen.teacher_update == "frozen" and not frozen.key_head.fitted
    with pytest.raises(ValueError, match="same-as-teacher"):
        small_moma(timm_classifier(), tiny_vit(), teacher_update="momentum")
    assert small_moma(timm_classifier(), timm_classifier(), teacher_update="frozen").teacher_update == "frozen"


def test_frozen_mode_fits_g_t_once_and_keeps_the_teacher_fixed(small_moma, nct_tensors):
    model = small_moma(teacher=tiny_vit(classifier=False)).train()
    assert model.config.w_kd == 0  # a backbone teacher has no logits
    pixels, labels = nct_tensors
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    out = model(pixel_values=pixels[:16], labels=labels[:16])
    assert model.key_head.fitted
    weight = model.key_head.weight.clone()
    # the fitted projection is orthonormal on its rows: it keeps the teacher's geometry
    rows = min(weight.shape)
    torch.testing.assert_close(weight[:rows] @ weight[:rows].T, torch.eye(rows), atol=1e-4, rtol=0)
    model.enqueue(out.contrastive_keys)
    model.momentum_update()
    model(pixel_values=pixels[16:32], labels=labels[16:32])
    assert torch.equal(model.key_head.weight, weight)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))


def _mean_pairwise_cosine(rows):
    gram = F.normalize(rows, dim=-1) @ F.normalize(rows, dim=-1).T
    return float((gram.sum() - gram.diagonal().sum()) / (len(rows) * (len(rows) - 1)))


@pytest.mark.parametrize("residual", [True, False])
def test_batch_attention_keeps_each_sample_only_with_its_residual(small_moma, nct_tensors, residual):
    # The defect benchmarks/diagnose_attention.py found: at initialisation, attention without a residual gives
    # every sample the same output, so InfoNCE cannot tell a key from the queued negatives.
    torch.manual_seed(0)
    model = small_moma(teacher=tiny_vit(classifier=False), attention_residual=residual).train()
    pixels, labels = nct_tensors
    with torch.no_grad():
        out = model(pixel_values=pixels[:32], labels=labels[:32])
        features, _ = pooled_features(model.teacher, pixels[:32])
        before = model.key_head(features)
    expected = model.key_attention.attention(before[None], before[None], before[None])[0][0]
    expected = F.normalize(before + expected if residual else expected, dim=-1)
    torch.testing.assert_close(out.contrastive_keys, expected)
    similarity = _mean_pairwise_cosine(out.contrastive_keys)
    if residual:
        assert similarity < _mean_pairwise_cosine(before) + 0.2
    else:
        assert similarity > 0.99


def test_save_and_load_restore_queue_pointer_and_key_pathway_exactly(small_moma, nct_tensors, tmp_path):
    model = small_moma().train()
    pixels, labels = nct_tensors
    for start in range(0, 48, 16):
        out = model(pixel_values=pixels[start:start + 16], labels=labels[start:start + 16])
        model.momentum_update()
        model.enqueue(out.contrastive_keys)
    model.save_pretrained(tmp_path)
    loaded = MoMAForDistillation.from_pretrained(tmp_path)
    assert loaded.teacher_update == "frozen" and loaded.key_queue.queue_ptr.item() == 48
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name



def test_a_learned_frozen_key_head_is_trained_by_its_own_term_and_reloads(small_moma, nct_tensors, tmp_path):
    model = small_moma(frozen_key_head="learned").train()
    assert isinstance(model.key_head, ProjectionHead) and model.learns_key_head
    assert "loss_key_head" in model.loss_terms and "loss_key_head" not in small_moma().loss_terms
    assert not {id(p) for p in model.key_head.parameters()} & {id(t) for t in model.ema_pairs()[0]}
    pixels, labels = nct_tensors
    model.enqueue(model(pixel_values=pixels[:8], labels=labels[:8]).contrastive_keys)
    out = model(pixel_values=pixels[8:24], labels=labels[8:24])
    assert not out.contrastive_keys.requires_grad and not model.key_queue.queue.requires_grad
    # the keys, computed independently: A_k (the residual attention) on the normalised head of the teacher's features
    with torch.no_grad():
        features, _ = pooled_features(model.teacher, pixels[8:24])
        head = F.normalize(model.key_head.net(features), dim=-1)
        attended = model.key_attention.attention(head[None], head[None], head[None])[0][0]
        keys = F.normalize(head + attended, dim=-1)
        student_features, _ = pooled_features(model.student, pixels[8:24])
        queries = model.query_attention(model.query_head(student_features))
    torch.testing.assert_close(out.contrastive_keys, keys)
    # loss_key_head by hand: -log softmax of each key's similarity to its own query among the batch's queries
    expected = sum(-math.log(math.exp(float(keys[i] @ queries[i]) / 0.15)
                             / sum(math.exp(float(keys[i] @ queries[j]) / 0.15) for j in range(16)))
                   for i in range(16)) / 16
    assert out.loss_key_head.item() == pytest.approx(expected, rel=1e-4)
    torch.testing.assert_close(out.loss, out.loss_ce + out.loss_kd + out.loss_moma + out.loss_key_head)
    # g_T learns from its own term only: the student's InfoNCE term sends it nothing
    out.loss_moma.backward(retain_graph=True)
    assert all(p.grad is None for p in model.key_head.parameters())
    out.loss_key_head.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.key_head.parameters())
    assert all(p.grad is None for m in (model.teacher, model.key_attention) for p in m.parameters())
    # and an optimizer over the trainable parameters moves g_T, never the teacher
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    head_before = [p.clone() for p in model.key_head.parameters()]
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(head_before, model.key_head.parameters()))
    model.save_pretrained(tmp_path)
    loaded = MoMAForDistillation.from_pretrained(tmp_path)
    assert loaded.config.frozen_key_head == "learned" and isinstance(loaded.key_head, ProjectionHead)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_a_learned_key_head_is_refused_for_a_momentum_teacher_and_bad_values_are_named(small_moma):
    with pytest.raises(ValueError, match="frozen teachers only"):
        small_moma(timm_classifier(), timm_classifier(), frozen_key_head="learned")
    with pytest.raises(ValueError, match="--frozen_key_head"):
        small_moma(frozen_key_head="trained")
