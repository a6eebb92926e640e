"""Training previews (pure torch): when they are due, that drawing one leaves the training RNG and flags alone,
the image/grid shapes and the progress tuple. ComfyUI oracles (sample_euler, latent2rgb) are in
node/test_training_preview_comfy.py."""

from __future__ import annotations

import pytest
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; training/ needs no ComfyUI
from frozentune.training import preview  # noqa: E402


class _Format:  # a latent format without RGB factors: to_image's fallback, no ComfyUI needed
    latent_rgb_factors = None


def _preview(every: int, shown: list, **kw) -> preview.Preview:
    return preview.Preview(every=every, show=lambda step, image: shown.append((step, image)),
                           latent_format=_Format(), **kw)


@pytest.mark.parametrize("every, due", [(0, []), (1, [1, 2, 3, 4, 5, 6, 7]), (3, [3, 6]), (8, [])])
def test_due_every_n_optimizer_steps(every, due):
    p = _preview(every, [])
    assert [s for s in range(1, 8) if p.due(s)] == due


@pytest.mark.parametrize("bad", [dict(every=-1), dict(every=1, steps=0), dict(every=1, size=100)])
def test_bad_settings_name_the_value(bad):
    every = bad.pop("every")
    with pytest.raises(ValueError, match="preview"):
        _preview(every, [], **bad)


def test_maybe_leaves_the_global_rng_and_train_flags_and_grad_alone():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    net.train()
    net[1].eval()  # a mixed state, which a plain net.train() afterwards would not restore
    seen = {}

    def render() -> torch.Tensor:
        seen["grad"] = torch.is_grad_enabled()
        seen["training"] = [m.training for m in net.modules()]
        torch.randn(1000)  # consumes the global RNG, as any sampler step with dropout or noise would
        return net(torch.randn(1, 4, 8, 8).movedim(1, -1)).movedim(-1, 1)

    shown = []
    p = _preview(2, shown)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    assert p.maybe(1, render, modules=[net]) is None and not seen  # not due: nothing drawn
    image = p.maybe(2, render, modules=[net])
    assert torch.equal(torch.get_rng_state(), before)
    assert seen == {"grad": False, "training": [False, False, False]}
    assert [m.training for m in net.modules()] == [True, True, False]
    assert len(shown) == 1 and shown[0][0] == 2 and shown[0][1] is image


def test_maybe_without_the_fork_would_move_the_rng():
    """The check above can fail: the same render outside maybe() does move the global RNG."""
    torch.manual_seed(7)
    before = torch.get_rng_state()
    torch.randn(1000)
    assert not torch.equal(torch.get_rng_state(), before)


def test_flags_restored_when_render_raises():
    net = torch.nn.Linear(2, 2).train()

    def render() -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _preview(1, []).maybe(1, render, modules=[net])
    assert net.training


def test_fixed_noise_is_private_and_repeatable():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = preview.fixed_noise((1, 4, 8, 8), 3, "cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, preview.fixed_noise((1, 4, 8, 8), 3, "cpu", torch.float32))
    assert not torch.equal(a, preview.fixed_noise((1, 4, 8, 8), 4, "cpu", torch.float32))
    assert preview.fixed_noise((2, 4, 8, 8), 3, "cpu", torch.bfloat16).dtype == torch.bfloat16


def test_euler_with_the_exact_denoiser_of_a_point_lands_on_it():
    """Data = one point c: the exact x0 prediction is c at every sigma, so Euler from any noise ends on c."""
    c = torch.full((2, 4, 8, 8), 0.25)
    out = preview.euler(lambda x, s: c, torch.randn(2, 4, 8, 8), torch.tensor([14.6, 3.0, 0.5, 0.0]))
    torch.testing.assert_close(out, c)


def test_euler_calls_the_denoiser_once_per_step_with_batched_sigmas():
    calls = []

    def denoise(x, s):
        calls.append(s.clone())
        return x * 0.5

    preview.euler(denoise, torch.ones(3, 4, 8, 8), torch.tensor([2.0, 1.0, 0.0]))
    assert [c.tolist() for c in calls] == [[2.0] * 3, [1.0] * 3]


def test_latent_size_keeps_aspect_and_multiples_of_8():
    p = _preview(1, [], size=256)
    assert p.latent_size(512, 512) == (32, 32)
    assert p.latent_size(512, 768) == (24, 32)
    assert p.latent_size(64, 64) == (32, 32)  # up to the preview size


def test_to_image_shape_range_and_upscale():
    latent = torch.randn(2, 4, 5, 6) * 3
    image = preview.to_image(latent, _Format())
    assert image.shape == (2, 40, 48, 3) and image.dtype == torch.float32 and image.device.type == "cpu"
    assert image.min() >= 0 and image.max() <= 1
    assert torch.equal(image[:, :8, :8], image[:, :1, :1].expand(2, 8, 8, 3))  # x8 nearest


def test_progress_preview_is_the_tuple_comfyui_sends():
    from PIL import Image

    image = torch.rand(2, 16, 24, 3)
    kind, picture, size = preview.progress_preview(image, 256)
    assert (kind, size) == ("JPEG", 256)
    assert isinstance(picture, Image.Image) and picture.size == (24, 16) and picture.mode == "RGB"
    assert abs(int(picture.getpixel((0, 0))[0]) - round(float(image[0, 0, 0, 0]) * 255)) <= 1


def test_grid_is_a_row_and_black_when_empty():
    a, b = torch.rand(1, 16, 16, 3), torch.rand(1, 8, 16, 3)
    g = preview.grid([a, b])
    assert g.shape == (1, 16, 32, 3)
    assert torch.equal(g[0, :, :16], a[0]) and torch.equal(g[0, :8, 16:], b[0]) and g[0, 8:, 16:].eq(0).all()
    assert torch.equal(preview.grid([]), torch.zeros(1, 64, 64, 3))


def test_shown_sends_each_preview_to_the_progress_bar_and_keeps_it():
    class Bar:
        def __init__(self):
            self.calls = []

        def update_absolute(self, value, total=None, preview=None):
            self.calls.append((value, total, preview[0], preview[2]))

    bar = Bar()
    shown = preview.Shown(bar, total=10)
    for step in (5, 10):
        shown(step, torch.rand(1, 8, 8, 3))
    assert bar.calls == [(5, 10, "JPEG", 512), (10, 10, "JPEG", 512)]
    assert shown.steps == [5, 10] and shown.grid().shape == (1, 8, 16, 3)
