"""Gradient checkpointing recomputes each layer with its own block's ``transformer_options`` (issue 20).

ComfyUI's UNet hands its layers one shared ``transformer_options`` dict and overwrites its per-block
entries (``block``, ``transformer_index``, ...) as it walks its blocks, so by the backward pass that
dict holds the last block's values. A checkpointed layer recomputed with it runs block-keyed attention
patches as if it were the last block: wrong gradients. Measured on the tiny SD1.5 (attention in input
block 1 and output block 0) with patches set through ComfyUI's ModelPatcher, as nodes set them. Before
the fix, a per-block attn2 patch gave silently wrong gradients and an attn2 replace keyed by block made
the backward pass raise torch's CheckpointError (the recomputation built another graph).
"""

from __future__ import annotations

import pytest
import torch

from harness import half_tier

# A different factor per attention layer: a layer recomputed as another block changes the result.
FACTORS = {(("input", 1), 0): 1.5, (("output", 0), 1): 0.25}


class BlockPatches:
    """An attn2 patch that scales by its layer's (block, transformer_index); ``replace``: an attn2 replace on input 1."""

    def __init__(self, replace: bool):
        self.replace = replace
        self.seen: list[tuple] = []

    def attn2_patch(self, n, context, value, extra_options):
        key = (extra_options["block"], extra_options["transformer_index"])
        self.seen.append(key)
        return n * FACTORS.get(key, 1.0), context, value

    @staticmethod
    def attn2_replace(n, context, value, extra_options):
        return torch.tanh(n) * 0.5

    def patched(self, model):
        """A clone of ``model`` (a ModelPatcher) carrying the patches; ``model`` is left as it was."""
        m = model.clone()
        m.set_model_attn2_patch(self.attn2_patch)
        if self.replace:
            m.set_model_attn2_replace(self.attn2_replace, "input", 1)
        return m


@pytest.fixture(scope="module")
def tiny_sd15(tiny_checkpoints, pack):
    yield {d: half_tier.load_unet(tiny_checkpoints["sd15"], d) for d in ("fp32", "bf16")}
    half_tier.forget()


def _loss_and_grads(patcher, on: bool):
    """One forward/backward of a frozen twin of ``patcher``'s model, every UNet weight trainable.

    ``transformer_options`` is built from the patcher's model_options as ComfyUI's ``calc_cond_batch`` does.
    Returns (loss, gradients by name, the options dict after the forward, the same after backward).
    """
    import comfy.model_management as mm

    from frozentune.training import checkpointing, precision

    mm.load_models_gpu([patcher], force_full_load=True)
    device = patcher.load_device
    twin = precision.frozen_twin(patcher.model)
    precision.cast_on_use(twin)
    unet = twin.diffusion_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(device)
    context = torch.randn(2, 77, 768, generator=g).to(device)
    sigma = twin.model_sampling.sigmas[torch.tensor([200, 600])].to(device)
    options = patcher.model_options["transformer_options"].copy()
    with torch.inference_mode(False), torch.enable_grad():
        unet.requires_grad_(True)
        with checkpointing.gradient_checkpointing([unet], on) as layers:
            assert (layers > 0) == on
            out = twin.apply_model(x, sigma, c_crossattn=context.to(twin.get_dtype()), transformer_options=options)
            after_forward = dict(options)
            loss = out.float().square().mean()
            loss.backward()
    grads = {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}
    return loss.detach(), grads, after_forward, dict(options)


@pytest.mark.parametrize("dtype, replace", [("fp32", False), ("fp32", True), ("bf16", True)])
def test_checkpointing_recomputes_each_layer_with_its_own_block(dtype, replace, tiny_sd15):
    model = tiny_sd15[dtype]
    runs, seen = {}, {}
    for on in (False, True):
        patches = BlockPatches(replace)
        runs[on] = _loss_and_grads(patches.patched(model), on)
        seen[on] = patches.seen
    assert "patches" not in model.model_options["transformer_options"], "the input model was patched"

    off_loss, off_grads, _, _ = runs[False]
    on_loss, on_grads, on_forward, on_backward = runs[True]
    assert on_backward == on_forward, "the backward pass changed the caller's transformer_options"
    assert torch.equal(on_loss, off_loss), (on_loss, off_loss)
    assert on_grads.keys() == off_grads.keys() and len(off_grads) > 50
    # The replace patch drops input 1's attention (its keys are unused), not output 0's.
    assert ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" in off_grads) != replace
    assert "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight" in off_grads
    different = [n for n, grad in off_grads.items() if not torch.equal(on_grads[n], grad)]
    assert not different, f"{len(different)} of {len(off_grads)} gradients differ, first {different[:3]}"

    forward = [(("input", 1), 0), (("output", 0), 1)]
    assert seen[False] == forward
    # The recomputation (backward runs the layers last to first) sees each layer's own block.
    assert seen[True] == forward + forward[::-1], seen[True]


def _controlnet_loss_and_grads(model, cn, on: bool):
    """One forward/backward of ControlNet-Zero's training loss (both networks checkpointed when ``on``)."""
    from frozentune.controlnet_zero import training_run

    device = model.load_device
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g).to(device)
    noise = torch.randn(2, 4, 8, 8, generator=g).to(device)
    hint = torch.rand(2, 3, 64, 64, generator=g).to(device)
    conds = {"c_crossattn": torch.randn(2, 77, 768, generator=g).to(device)}
    sigma = model.model.model_sampling.sigmas[torch.tensor([200, 600])].to(device)
    cn.zero_grad(set_to_none=True)
    with torch.inference_mode(False), torch.enable_grad(), \
            training_run.controlled_loss(model.model, cn, device, torch.float32, on) as loss_fn:
        loss = loss_fn(cn, x0, hint, conds, sigma, noise)
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in cn.named_parameters() if p.grad is not None}


def test_controlnet_zero_training_recomputes_each_layer_with_its_own_block(tiny_sd15, monkeypatch):
    """ControlNet-Zero's own training loss (ControlNet and frozen UNet), the patches reaching its UNet."""
    import comfy.model_management as mm
    from comfy.ldm.modules.diffusionmodules import openaimodel

    from frozentune.controlnet_zero import network

    model = tiny_sd15["fp32"]
    mm.load_models_gpu([model], force_full_load=True)
    with torch.inference_mode(False):
        cn = network.trainable_copy(network.create(model.model), model.load_device)
        with torch.no_grad():  # a trained-looking ControlNet: exactly-zero zero convs pass almost no gradient
            for z in [z[0] for z in cn.zero_convs] + [cn.middle_block_out[0]]:
                z.weight.normal_(0, 1e-2, generator=torch.Generator().manual_seed(1))
    # The trainer runs the UNet with its own empty transformer_options: put the patcher's patches in them.
    stock = openaimodel.UNetModel._forward
    current: list[BlockPatches] = []

    def _forward(unet, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        transformer_options = {} if transformer_options is None else transformer_options
        transformer_options.update(current[-1].patched(model).model_options["transformer_options"])
        return stock(unet, x, timesteps, context, y, control, transformer_options, **kwargs)

    monkeypatch.setattr(openaimodel.UNetModel, "_forward", _forward)
    runs, seen = {}, {}
    for on in (False, True):
        current.append(BlockPatches(replace=True))
        runs[on] = _controlnet_loss_and_grads(model, cn, on)
        seen[on] = current[-1].seen
    (off_loss, off_grads), (on_loss, on_grads) = runs[False], runs[True]
    assert torch.equal(on_loss, off_loss), (on_loss, off_loss)
    assert on_grads.keys() == off_grads.keys() and len(off_grads) == len(list(cn.parameters()))
    different = [n for n, grad in off_grads.items() if not torch.equal(on_grads[n], grad)]
    assert not different, f"{len(different)} of {len(off_grads)} gradients differ, first {different[:3]}"
    forward = [(("input", 1), 0), (("output", 0), 1)]
    # The residuals enter at the middle and the skips: only the UNet's output layers need a backward pass.
    assert seen[False] == forward and seen[True] == forward + [forward[1]], seen
