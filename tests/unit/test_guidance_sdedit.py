"""The pure edit helpers: late start, blend-back, mask fitting (no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; its root import is lazy, so ComfyUI is not needed here
from frozentune.guidance import sdedit as edit  # noqa: E402


def test_late_start_skips_the_first_part_of_the_schedule():
    sigmas = torch.linspace(10, 0, 11)
    assert torch.equal(edit.late_start(sigmas, 1.0), sigmas)
    assert torch.equal(edit.late_start(sigmas, 0.6), sigmas[4:])
    assert edit.late_start(sigmas, 0.0).shape == (1,)
    with pytest.raises(ValueError, match="start=1.2"):
        edit.late_start(sigmas, 1.2)


def test_blend_ends_are_exact():
    gen = torch.Generator().manual_seed(0)
    original, edited = torch.rand(2, 16, 16, 3, generator=gen), torch.rand(2, 16, 16, 3, generator=gen)
    assert torch.equal(edit.blend_back(edited, original, 1.0, 0.0), original)
    assert torch.equal(edit.blend_back(edited, original, 0.0, 0.0), edited)
    half = edit.blend_back(edited, original, 0.5, 0.0)
    assert torch.allclose(half, (edited + original) / 2, atol=1e-6)


def test_blend_unchanged_restores_only_where_the_edit_did_not_change_the_image():
    gen = torch.Generator().manual_seed(0)
    original = torch.rand(1, 32, 32, 3, generator=gen)
    edited = original + 0.005 * torch.randn(original.shape, generator=gen)  # sampler noise everywhere
    edited[:, 8:24, 8:24] = 1.0 - original[:, 8:24, 8:24]  # the real edit
    out = edit.blend_back(edited, original, 0.0, 1.0)
    assert torch.equal(out[:, :4], original[:, :4])  # far from the edit: the original exactly
    assert torch.equal(out[:, 12:20, 12:20], edited[:, 12:20, 12:20])  # inside the edit: untouched


def test_mask_outside_is_the_original_exactly():
    gen = torch.Generator().manual_seed(1)
    original, edited = torch.rand(1, 8, 8, 3, generator=gen), torch.rand(1, 8, 8, 3, generator=gen)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1.0
    out = edit.blend_back(edited, original, 0.0, 0.0, mask)
    assert torch.equal(out[:, mask[0] == 0], original[:, mask[0] == 0])
    assert torch.equal(out[:, mask[0] == 1], edited[:, mask[0] == 1])


def test_fit_mask_resizes_and_checks_shape():
    assert edit.fit_mask(torch.ones(4, 4), 8, 8).shape == (1, 8, 8)
    with pytest.raises(ValueError, match=r"\(1, 1, 4, 4\)"):
        edit.fit_mask(torch.ones(1, 1, 4, 4), 8, 8)


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 16, 8, 8), (1, 16, 1, 8, 8)])
def test_repeat_batch_copies_along_the_batch_dim_at_any_rank(shape):
    """Qwen-Image's Wan-2.1 latents are 5-D: ``latent.repeat(batch, 1, 1, 1)`` raised on them."""
    latent = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    out = edit.repeat_batch(latent, 3)
    assert out.shape == (3, *shape[1:]) and all(torch.equal(row, latent[0]) for row in out)


def test_latent_mask_keeps_one_mask_per_variation_for_5d_latents():
    masks = torch.rand(2, 64, 64)
    assert edit.latent_mask(masks, torch.zeros(2, 16, 8, 8)) is masks  # ComfyUI's MASK as it is
    shaped = edit.latent_mask(masks, torch.zeros(2, 16, 1, 8, 8))
    assert shaped.shape == (2, 1, 1, 64, 64) and torch.equal(shaped[:, 0, 0], masks)
    assert edit.latent_mask(None, torch.zeros(2, 16, 1, 8, 8)) is None


def test_decoded_images_flattens_a_video_vaes_frames():
    frames = torch.rand(2, 1, 64, 64, 3)
    assert torch.equal(edit.decoded_images(frames), frames[:, 0])
    images = torch.rand(2, 64, 64, 3)
    assert edit.decoded_images(images) is images
