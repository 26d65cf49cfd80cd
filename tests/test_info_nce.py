"""MoMA's InfoNCE in its cheaper form (1/T on the query, the mask written into the product) against a float64
reference written out term by term, at the benchmark's batch and width: value, gradient and untouched inputs."""

import pytest
import torch
import torch.nn.functional as F

from moma_hf.losses import info_nce

BATCH, DIM, SLOTS, TEMPERATURE = 32, 512, 4096, 0.07


def reference_info_nce(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float,
                       filled: int) -> torch.Tensor:
    """`mean_i [log(exp(q_i.k_i / T) + sum_{j < filled} exp(q_i.queue_j / T)) - q_i.k_i / T]` in float64."""
    query, key, queue = query.double(), key.double(), queue[:filled].double()
    positive = (query * key).sum(dim=1) / temperature
    negatives = query @ queue.T / temperature
    return (torch.logsumexp(torch.cat([positive[:, None], negatives], dim=1), dim=1) - positive).mean()


def unit_rows(*shape: int, seed: int) -> torch.Tensor:
    """Random L2-normalised rows, `shape = (N, D)`."""
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.mark.parametrize("filled", [0, 1, 1000, SLOTS])
def test_info_nce_value_and_gradient_match_a_float64_reference(filled):
    query, key, queue = unit_rows(BATCH, DIM, seed=0), unit_rows(BATCH, DIM, seed=1), unit_rows(SLOTS, DIM, seed=2)
    queue[filled:] = 0.0  # slots not yet written hold zeros, as in KeyQueue
    mask = torch.arange(SLOTS) < filled
    queue_before, key_before = queue.clone(), key.clone()

    q32 = query.clone().requires_grad_(True)
    loss = info_nce(q32, key, queue, TEMPERATURE, mask)
    loss.backward()
    q64 = query.double().requires_grad_(True)
    expected = reference_info_nce(q64, key, queue, TEMPERATURE, filled)
    expected.backward()

    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.isfinite(q32.grad).all()
    torch.testing.assert_close(q32.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)
    # The in-place mask touches only the fresh product: the queue and the keys are as they were.
    assert torch.equal(queue, queue_before) and torch.equal(key, key_before)


def test_an_empty_queue_leaves_only_the_positive_so_the_loss_is_zero():
    query, key = unit_rows(BATCH, DIM, seed=3), unit_rows(BATCH, DIM, seed=4)
    queue, mask = torch.zeros(SLOTS, DIM), torch.zeros(SLOTS, dtype=torch.bool)
    query.requires_grad_(True)
    loss = info_nce(query, key, queue, TEMPERATURE, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(query.grad) == 0


def test_without_a_mask_every_slot_is_a_negative():
    query, key, queue = unit_rows(BATCH, DIM, seed=5), unit_rows(BATCH, DIM, seed=6), unit_rows(SLOTS, DIM, seed=7)
    expected = reference_info_nce(query, key, queue, 0.5, SLOTS)
    assert info_nce(query, key, queue, 0.5).item() == pytest.approx(expected.item(), rel=1e-5)
