"""full/attention modes step each fp32 master during backward: no whole-UNet gradient buffer, same result."""

from __future__ import annotations

import logging

import pytest
import torch


@pytest.fixture(scope="module")
def sd15(tiny_checkpoints, pack):
    import nodes

    from harness.images import subject_image

    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[:3]
    img = subject_image()
    return model, vae.encode(img), clip.encode_from_tokens_scheduled(clip.tokenize("beikkpic"))


def grad_peak_and_deltas(sd15, in_backward: bool, optimizer: str, monkeypatch) -> tuple[int, dict, int, int]:
    """(most gradient bytes alive at any optimizer step, saved deltas, trainable bytes, largest parameter's
    bytes) of 2 full-mode steps."""
    from frozentune.training import optimizers
    from frozentune.unitune import finetune

    model, latents, cond = sd15
    peak = {"bytes": 0, "trainable": 0}
    params_seen = []

    def alive() -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in params_seen if p.grad is not None)

    stock_optimizer, stock_hook = finetune._optimizer, optimizers.StepInBackward._step

    def spy_optimizer(params, settings, in_backward=False):
        params_seen.extend(params)
        peak["trainable"] = sum(p.numel() * 4 for p in params)
        peak["largest"] = max(p.numel() * 4 for p in params)
        opt = stock_optimizer(params, settings, in_backward=in_backward)
        if not in_backward:
            plain_step = opt.step

            def step(*a, **kw):
                peak["bytes"] = max(peak["bytes"], alive())
                return plain_step(*a, **kw)

            opt.step = step
        return opt

    def spy_hook(self, param):
        peak["bytes"] = max(peak["bytes"], alive())
        return stock_hook(self, param)

    monkeypatch.setattr(finetune, "_optimizer", spy_optimizer)
    monkeypatch.setattr(optimizers.StepInBackward, "_step", spy_hook)
    monkeypatch.setattr(finetune.TrainingRun, "in_backward", property(lambda self: in_backward, lambda s, v: None),
                        raising=False)
    settings = finetune.FineTuneSettings(mode="full", steps=2, batch_size=2, optimizer=optimizer, learning_rate=1e-3)
    result = finetune.fine_tune(model, latents, cond, settings)
    return peak["bytes"], result.tensors, peak["trainable"], peak["largest"]


@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_step_in_backward_frees_the_gradient_buffer_with_the_same_result(sd15, optimizer, monkeypatch):
    plain_peak, plain, trainable, largest = grad_peak_and_deltas(sd15, False, optimizer, monkeypatch)
    fused_peak, fused, _, _ = grad_peak_and_deltas(sd15, True, optimizer, monkeypatch)
    logging.getLogger(__name__).info("UniTune full, tiny SD1.5: gradient bytes alive at a step %.1f MiB plain, "
                                     "%.1f MiB stepped in backward (largest parameter %.1f MiB)",
                                     plain_peak / 2**20, fused_peak / 2**20, largest / 2**20)
    assert plain_peak == trainable, "the plain step holds every fp32 gradient at once"
    assert fused_peak <= 2 * largest < 0.25 * trainable, (fused_peak, largest, trainable)
    assert plain.keys() == fused.keys()
    for k in plain:
        torch.testing.assert_close(fused[k].float(), plain[k].float(), rtol=1e-4, atol=1e-7, msg=k)
    assert any(t.abs().max() > 0 for t in fused.values())


def test_auto_steps_full_and_attention_in_backward_but_not_lora_or_fp16(sd15):
    from frozentune.unitune import finetune

    model, latents, cond = sd15
    import comfy.model_management as mm

    mm.load_models_gpu([model], force_patch_weights=True)
    want = {("full", "fp32"): True, ("attention", "bf16"): True, ("lora", "fp32"): False, ("full", "fp16"): False}
    for (mode, prec), expected in want.items():
        settings = finetune.FineTuneSettings(mode=mode, steps=1, batch_size=1, precision=prec, lora_rank=4)
        with torch.inference_mode(False), torch.enable_grad():
            run = finetune.TrainingRun(model, latents, cond, settings)
            try:
                assert run.in_backward is expected, (mode, prec)
            finally:
                run.release()
