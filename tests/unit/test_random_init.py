"""The tiny-model factory's random init: seeded, order-independent, norm-aware (pure torch)."""

from __future__ import annotations

import torch

from harness.tiny_models import random_state_dict


def small_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.Linear(32, 8),
                               torch.nn.GroupNorm(2, 8))


def test_same_seed_same_values_other_seed_other_values():
    a, b, c = (random_state_dict(small_net(), s) for s in (1, 1, 2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])


def test_norms_start_as_identity_and_matrices_keep_scale():
    sd = random_state_dict(small_net(), 0)
    assert torch.equal(sd["1.weight"], torch.ones(32)) and torch.equal(sd["1.bias"], torch.zeros(32))
    assert torch.equal(sd["3.weight"], torch.ones(8)) and torch.equal(sd["3.bias"], torch.zeros(8))
    assert torch.equal(sd["0.bias"], torch.zeros(32))
    # N(0, 1/fan_in): the std of a 32x16 matrix is close to 1/4.
    assert abs(sd["0.weight"].std().item() - 0.25) < 0.05


def test_a_tensor_does_not_depend_on_its_neighbours():
    alone = random_state_dict(torch.nn.Sequential(torch.nn.Linear(16, 32)), 7)
    together = random_state_dict(small_net(), 7)
    assert torch.equal(alone["0.weight"], together["0.weight"])


def test_meta_modules_are_filled_without_materializing():
    with torch.device("meta"):
        net = small_net()
    sd = random_state_dict(net, 3, torch.float16)
    assert all(t.device.type == "cpu" and t.dtype == torch.float16 for t in sd.values())
