"""ControlNet-Zero precision and memory, measured on the tiny SD1.5 (16.2M UNet).

- No fp16 hop in the gradient path (issue 11, item 6): with the base loaded in fp16 (computing
  natively, as ComfyUI on a GPU does), the control residuals entering the UNet, their gradients and
  the UNet input are in the compute dtype (fp32, or bf16 under bf16 autocast), never fp16.
- bf16 autocast on the CPU with an fp16 base trains (it used to crash in GroupNorm, "mixed dtype").
- Gradient checkpointing covers both networks (item 2): the bytes a training forward keeps alive for
  backward, on/off, and equal losses and gradients on/off.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import disks
from harness.controlnet_zero_helpers import R
from harness.hashing import weight_hash

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def fp16_sd15(tiny_checkpoints, pack):
    from harness.precision import load_checkpoint

    with torch.inference_mode():  # as in a real graph, the loader's weights are inference tensors
        return load_checkpoint(tiny_checkpoints["sd15"], torch.float16)


@pytest.fixture(scope="module")
def fp32_sd15(tiny_checkpoints, pack):
    from harness.precision import load_checkpoint

    with torch.inference_mode():
        return load_checkpoint(tiny_checkpoints["sd15"], torch.float32)


def encoded(model, clip, vae, count=4):
    from frozentune.controlnet_zero import cache

    targets, hints = disks.disks(count, R, seed=0)
    with torch.inference_mode(False):
        return cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION] * count), model.model, vae,
                            clip, R)


def fresh(model, device):
    from frozentune.controlnet_zero import network

    with torch.inference_mode(False):
        return network.trainable_copy(network.create(model.model), device)


class Recorder:
    """Records the dtypes at the ControlNet -> UNet seam: residuals, their gradients, the UNet input."""

    def __init__(self, monkeypatch):
        from comfy.ldm.modules.diffusionmodules import openaimodel

        self.residuals, self.grads, self.inputs = set(), set(), set()
        stock_apply, stock_forward = openaimodel.apply_control, openaimodel.UNetModel._forward

        def apply_control(h, control, name):
            if control is not None and control.get(name):
                ctrl = control[name][-1]
                self.residuals.add(ctrl.dtype)
                if ctrl.requires_grad:
                    ctrl.register_hook(lambda g: self.grads.add(g.dtype))
            return stock_apply(h, control, name)

        def _forward(unet, x, *args, **kwargs):
            self.inputs.add(x.dtype)
            return stock_forward(unet, x, *args, **kwargs)

        monkeypatch.setattr(openaimodel, "apply_control", apply_control)
        monkeypatch.setattr(openaimodel.UNetModel, "_forward", _forward)


@pytest.mark.half  # an fp16 base, both computes
@pytest.mark.parametrize("precision, compute", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_no_fp16_hop_between_controlnet_and_an_fp16_base(precision, compute, fp16_sd15, monkeypatch):
    import comfy.model_management as mm

    from frozentune.controlnet_zero import training_run as trainer

    model, clip, vae = fp16_sd15
    assert model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float16
    assert model.model.manual_cast_dtype is None, "the fp16 base must compute natively, as on a GPU"
    data = encoded(model, clip, vae)
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    before = weight_hash(model.model.diffusion_model)
    cn = fresh(model, device)
    record = Recorder(monkeypatch)
    settings = trainer.TrainSettings(steps=2, batch_size=2, learning_rate=1e-3, resolution=R,
                                     gradient_checkpointing=True, mixed_precision=precision)
    with torch.inference_mode(False), torch.enable_grad():
        result = trainer.train(model.model, cn, data, settings, device)
    assert record.residuals == {compute}, record.residuals
    assert record.grads == {compute}, f"residual gradients in {record.grads}, expected only {compute}"
    assert record.inputs == {compute}, record.inputs
    assert all(math.isfinite(v) for v in result.losses), result.losses
    assert {p.dtype for p in result.control_model.parameters()} == {torch.float32}, "master weights must stay fp32"
    assert weight_hash(model.model.diffusion_model) == before, "training modified the fp16 base"
    assert model.model.diffusion_model.input_blocks[0][0].weight.dtype == torch.float16


@pytest.mark.half
def test_bf16_on_the_cpu_with_an_fp16_base_trains(fp16_sd15):
    import comfy.model_management as mm

    from frozentune.controlnet_zero import training_run as trainer

    model, clip, vae = fp16_sd15
    data = encoded(model, clip, vae)
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    assert device.type == "cpu"
    cn = fresh(model, device)
    start = {k: v.clone() for k, v in cn.state_dict().items()}
    settings = trainer.TrainSettings(steps=3, batch_size=2, learning_rate=1e-3, resolution=R,
                                     gradient_checkpointing=False, mixed_precision="bf16")
    with torch.inference_mode(False), torch.enable_grad():
        result = trainer.train(model.model, cn, data, settings, device)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses), result.losses
    after = result.control_model.state_dict()
    moved = [k for k in after if not torch.equal(after[k], start[k])]
    assert "zero_convs.0.0.weight" in moved and "middle_block_out.0.weight" in moved, moved[:5]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gradient_checkpointing_covers_both_networks(dtype, fp32_sd15, fp16_sd15):
    import comfy.model_management as mm

    model, clip, vae = fp32_sd15 if dtype == "fp32" else fp16_sd15
    data = encoded(model, clip, vae, count=2)
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    cn = fresh(model, device)
    # a trained-looking ControlNet: with exactly-zero zero convs almost no gradient reaches its insides
    with torch.no_grad():
        for z in [z[0] for z in cn.zero_convs] + [cn.middle_block_out[0]]:
            z.weight.normal_(0, 1e-2, generator=torch.Generator().manual_seed(1))
    off_loss, off_bytes, off_grads = cz.loss_bytes_and_grads(model, cn, data, False)
    on_loss, on_bytes, on_grads = cz.loss_bytes_and_grads(model, cn, data, True)
    ratio = on_bytes / off_bytes
    log.warning("ControlNet-Zero checkpointing (SD1.5-tiny, %s base, batch 2, %d px): retained for backward "
                "%.1f MiB off, %.1f MiB on, ratio %.3f", dtype, R, off_bytes / 2**20, on_bytes / 2**20, ratio)
    assert ratio <= 0.5, ratio
    assert abs(on_loss - off_loss) <= 1e-6 * abs(off_loss), (on_loss, off_loss)
    assert on_grads.keys() == off_grads.keys() and len(on_grads) == len(list(cn.parameters()))
    for name, g in off_grads.items():
        assert torch.allclose(on_grads[name], g, rtol=1e-4, atol=1e-7 * g.abs().max().item() + 1e-12), name
