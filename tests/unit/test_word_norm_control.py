"""Norm control of learned word vectors (pure torch): the vocabulary statistic and the retraction step against
hand-computed cases. The maths is cog-sdxl's ``TokenEmbeddingsHandler.retract_embeddings`` (also in diffusers'
advanced SDXL DreamBooth LoRA trainer): ``vectors *= (std(table) / std(vectors)) ** 0.1``, unbiased stds."""

from __future__ import annotations

import math

import pytest
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; the word trainer's maths needs no ComfyUI
from frozentune.textual_inversion import word_trainer as ti  # noqa: E402


def test_vocabulary_std_by_hand():
    # Elements 1, 2, 3, 4: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, unbiased variance 5/3.
    table = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert ti.vocabulary_std(table) == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert ti.vocabulary_std(table, rows=1) == pytest.approx(math.sqrt(5 / 3), rel=1e-12)  # merged slices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vocabulary_std_matches_torch_std_of_the_table_read_in_fp32(dtype):
    gen = torch.Generator().manual_seed(0)
    table = (torch.randn(1000, 24, generator=gen) * 0.03 + 0.01).to(dtype)
    expected = table.to(torch.float32).std().item()
    assert ti.vocabulary_std(table, rows=64) == pytest.approx(expected, rel=1e-5)
    assert table.dtype == dtype  # read, not converted in place


@pytest.mark.parametrize("scale, factor", [(1024.0, 2.0), (1 / 1024, 0.5), (1.0, 1.0)])
def test_retract_by_hand(scale, factor):
    # [[1, -1]] has unbiased std sqrt(2); a vocabulary std 1024x (1/1024x) that gives an off ratio of 1024
    # (1/1024), and 1024 ** 0.1 = 2: the vectors double (halve). Equal stds leave them as they are.
    vectors = torch.tensor([[1.0, -1.0]])
    ti.retract(vectors, math.sqrt(2) * scale)
    assert torch.allclose(vectors, torch.tensor([[factor, -factor]]), rtol=1e-6, atol=0)


def test_retract_uses_the_std_of_all_the_vectors_together():
    # Two vectors, elements 0, 2, 4, 6: mean 3, squared deviations 9 + 1 + 1 + 9 = 20, std sqrt(20/3); both rows
    # get the same factor (the std of the whole trained set, as retract_embeddings takes it), mean included.
    vectors = torch.tensor([[0.0, 2.0], [4.0, 6.0]])
    own = math.sqrt(20 / 3)
    ti.retract(vectors, own * 32.0)  # off ratio 32: 32 ** 0.1 = 2 ** 0.5
    assert torch.allclose(vectors, torch.tensor([[0.0, 2.0], [4.0, 6.0]]) * math.sqrt(2), rtol=1e-6, atol=0)


def test_retract_leaves_constant_vectors_alone_and_keeps_the_parameter():
    flat = torch.nn.Parameter(torch.full((1, 4), 0.5))
    ti.retract(flat, 0.02)  # std 0: no ratio to take (diffusers would write inf)
    assert torch.equal(flat.detach(), torch.full((1, 4), 0.5))
    moving = torch.nn.Parameter(torch.tensor([[1.0, -1.0]]))
    ti.retract(moving, math.sqrt(2) * 1024)
    assert moving.requires_grad and moving.grad is None and torch.equal(moving.detach(), torch.tensor([[2.0, -2.0]]))


def test_norm_control_is_off_by_default_and_recorded():
    settings = ti.TextualInversionSettings()
    assert settings.norm_control is False
    assert ti.TextualInversionSettings(norm_control=True).metadata()["textual_inversion.norm_control"] == "True"
