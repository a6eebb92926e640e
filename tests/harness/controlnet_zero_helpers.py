"""What the ControlNet-Zero node tests (``tests/node/test_controlnet_zero_*.py``) share: the nodes run as ComfyUI's
executor runs them, stock sampling with a ControlNet applied, a trained-looking ControlNet, the synthetic disk data
sets of the learning checks, one training loss with its gradients, and the checks several layouts repeat.

ComfyUI and the pack are imported inside the functions: the tests' fixtures (``pack``) import them first.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harness import disks

R = 64  # hint / image size of every ControlNet-Zero node test: latents 8x8
log = logging.getLogger(__name__)


def layout(name: str):
    """The layout module ``frozentune.controlnet_zero.<name>`` (imported once the pack is)."""
    return importlib.import_module(f"frozentune.controlnet_zero.{name}")


def hint_image(seed: int = 7) -> torch.Tensor:
    return torch.rand(1, R, R, 3, generator=torch.Generator().manual_seed(seed))


def prompts(kit) -> tuple:
    """The positive and empty negative conditioning of a ``harness.tiny_dits`` kit."""
    return kit.encode("a red disk"), kit.encode("")


def create(model, seed: int = 0, **kwargs):
    """ControlNet-Zero Create's CONTROL_NET."""
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroCreate

    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return ControlNetZeroCreate.execute(model=model, seed=seed, **kwargs).args[0]


TRAIN_ARGS = dict(dataset_folder="", captions=disks.CAPTION, steps=2, batch_size=2, gradient_accumulation=1,
                  learning_rate=1e-3, prompt_dropout=0.5, resolution=R, gradient_checkpointing=False,
                  mixed_precision="fp32", seed=0, checkpoint_every=0, run_name="test", resume=False, optimizer="adamw")


def train_node(model, clip, vae, control_net, pairs: int = 4, **args):
    """ControlNet-Zero Train's NodeOutput on ``pairs`` disks (``disks.disks(pairs, R, seed=0)``), ``TRAIN_ARGS``
    overridden by ``args``."""
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroTrain

    targets, hints = disks.disks(pairs, R, seed=0)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return ControlNetZeroTrain.execute(model=model, clip=clip, vae=vae, control_net=control_net,
                                           **{**TRAIN_ARGS, "images": targets, "hints": hints, **args})


def perturbed(cn: torch.nn.Module, prefixes: tuple[str, ...], scale: float, seed: int = 1) -> torch.nn.Module:
    """A copy of ``cn`` whose zero-initialized parts (names starting with ``prefixes``) are random, ``scale`` wide
    (a stand-in for a trained ControlNet)."""
    out = copy.deepcopy(cn)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.startswith(prefixes):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return out


def sample(model, prompts, vae=None, control_net=None, hint=None, steps: int = 2, cfg: float = 1.0,
           latent_shape: tuple[int, ...] = (1, 16, R // 8, R // 8)) -> torch.Tensor:
    """Stock ``KSampler`` (seed 0, euler, simple) from a zero latent, with ``control_net`` applied through stock
    ``ControlNetApplyAdvanced`` (strength 1, ``vae`` for latent hints) when given."""
    import nodes

    positive, negative = prompts
    if control_net is not None:
        positive, negative = nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint,
                                                                            1.0, 0.0, 1.0, vae=vae)
    latent = {"samples": torch.zeros(latent_shape)}
    return nodes.KSampler().sample(model, 0, steps, cfg, "euler", "simple", positive, negative, latent)[0]["samples"]


def resume_matches_an_uninterrupted_run(train: Callable[..., object], after_cut: Callable[[], None] | None = None,
                                        caplog=None):
    """``train(run_name, resume=False)`` (a Train run of 4 steps, checkpointing every 2) run whole, cancelled at step 3
    (``after_cut()`` then checks what that left), and resumed (with pytest's ``caplog``: the trainer says it resumed
    at step 2, not started over): the resumed ControlNet is the whole run's to 1e-6; returns (whole, resumed)."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import training_run
    from harness.cancel import cancel_at

    whole = train("whole")
    with cancel_at(3), pytest.raises(mm.InterruptProcessingException):
        train("cut")
    if after_cut is not None:
        after_cut()
    if caplog is None:
        resumed = train("cut", resume=True)
    else:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=training_run.log.name):
            resumed = train("cut", resume=True)
        assert "ControlNet-Zero: resumed from" in caplog.text and "at step 2 " in caplog.text, caplog.text
    a, b = whole.control_model.state_dict(), resumed.control_model.state_dict()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    return whole, resumed


def flux_resume_matches_an_uninterrupted_run(flux, caplog, optimizer: str, guidance: float, refused: float,
                                             saved_key: str, **create_args) -> None:
    """``resume_matches_an_uninterrupted_run`` on the tiny Flux kit ``flux`` (a fresh ``create(flux.model,
    **create_args)`` each run, batch 1 x 2 accumulated, ``optimizer``, ``flux_guidance=guidance``): the cut run's
    step-2 checkpoint (under ComfyUI's output folder) holds the file's ``saved_key``, resuming it at ``refused``
    guidance is refused naming both values, and the resumed run records its 4 steps."""
    import re

    import folder_paths
    import safetensors

    def train(run_name, resume=False, flux_guidance=guidance):
        return train_node(flux.model, flux.clip, flux.vae, create(flux.model, **create_args), steps=4, batch_size=1,
                          gradient_accumulation=2, checkpoint_every=2, run_name=run_name, resume=resume,
                          optimizer=optimizer, flux_guidance=flux_guidance).args[0]

    def after_cut():
        step = Path(folder_paths.get_output_directory()) / "controlnet_zero" / "cut" / "run_001" / "step_000002"
        with safetensors.safe_open(str(step / "controlnet.safetensors"), framework="pt") as f:
            assert saved_key in f.keys(), "checkpoints are in the file's layout"
        with pytest.raises(ValueError, match=re.escape(f"flux_guidance: stored {guidance:g}, requested {refused:g}")):
            train("cut", resume=True, flux_guidance=refused)

    _, resumed = resume_matches_an_uninterrupted_run(train, after_cut, caplog)
    assert resumed.frozentune_metadata["controlnet_zero.steps_done"] == "4"


def file_is_diffusers(layout, base_model, reference, perturbed: Callable[[torch.nn.Module], torch.nn.Module]):
    """``layout``'s file of a fresh ControlNet on ``base_model`` has exactly the keys and values of diffusers'
    ``reference`` (its ``from_transformer`` on the same base); returns a trained-looking one (``perturbed``), whose
    file ``reference`` now holds (strict)."""
    theirs = reference.state_dict()
    ours = layout.file_tensors(layout.create(base_model))
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    cn = perturbed(layout.create(base_model))
    reference.load_state_dict(layout.file_tensors(cn), strict=True)
    return cn


def tiny_flux_in(dtype_name: str):
    """The tiny Flux.1 dev MODEL stored in bf16 (computing natively, as on a GPU) or fp8 (``fp8_e4m3fn``, UNETLoader's
    weight_dtype, cast per op), checked to be so: (model, its storage dtype)."""
    from harness import tiny_dits

    kwargs = {"bf16": dict(dtype="bf16"), "fp8": dict(weight_dtype="fp8_e4m3fn")}[dtype_name]
    stored = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}[dtype_name]
    with torch.inference_mode():
        model = tiny_dits.load_model("flux1", **kwargs)
    assert model.model.diffusion_model.img_in.weight.dtype == stored
    if dtype_name == "bf16":
        assert model.model.manual_cast_dtype is None, "the bf16 base must compute natively, as on a GPU"
    return model, stored


def train_fresh_around_a_half_base(model, layout, data, precision: str, steps: int):
    """``train_around_a_half_base`` of a fresh trainable ``layout`` ControlNet on ``model`` (loaded first)."""
    import comfy.model_management as mm

    from harness.hashing import weight_hash

    mm.load_models_gpu([model], force_full_load=True)
    before = weight_hash(model.model.diffusion_model)
    with torch.inference_mode(False):
        cn = layout.trainable_copy(layout.create(model.model), model.load_device)
    return train_around_a_half_base(model, cn, data, precision, steps, before)


def train_around_a_half_base(model, cn, data, precision: str, steps: int, before: str):
    """``steps`` steps of batch 2, checkpointing on, of the fp32 ControlNet ``cn`` around the ModelPatcher ``model``
    stored in ``precision`` ("bf16": bf16 autocast; fp8 storage: fp32 compute): finite losses, fp32 master weights,
    and the base's weights still hash to ``before``; returns the training result."""
    import math

    from frozentune.controlnet_zero import training_run as trainer
    from harness.hashing import weight_hash

    with torch.inference_mode(False):
        settings = trainer.TrainSettings(steps=steps, batch_size=2, learning_rate=1e-3, resolution=R,
                                         gradient_checkpointing=True,
                                         mixed_precision="bf16" if precision == "bf16" else "fp32")
        with torch.enable_grad():
            result = trainer.train(model.model, cn, data, settings, model.load_device)
    assert len(result.losses) == steps and all(math.isfinite(v) for v in result.losses), result.losses
    assert {p.dtype for p in result.control_model.parameters()} == {torch.float32}, "master weights must stay fp32"
    assert weight_hash(model.model.diffusion_model) == before, "training modified the base"
    return result


# --- one training loss -----------------------------------------------------------------------------------------

def loss_and_grads(model, cn, batch, compute=torch.float32, checkpointing=False, forward=None):
    """The training loss of ``batch`` (``(x0, hint, conds, sigma, noise)``) for the ModelPatcher ``model`` and the
    ControlNet's gradients (None where none reached it); ``forward(loss_fn)`` runs it (default: a call)."""
    from frozentune.controlnet_zero import training_run as trainer

    cn.zero_grad(set_to_none=True)
    with torch.inference_mode(False), torch.enable_grad(), trainer.controlled_loss(
            model.model, cn, model.load_device, compute, checkpointing) as loss_fn:
        loss = (forward or (lambda f: f()))(lambda: loss_fn(cn, *batch))
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in cn.named_parameters()}


def two_rows(model, data):
    """Rows 0 and 1 of ``data`` (the second one's caption dropped) at sigmas 100 and 700 with seeded noise, on the
    ModelPatcher's load device: a ``loss_and_grads`` batch."""
    device = model.load_device
    x0, hint, conds = data.batch(torch.tensor([0, 1]), torch.tensor([False, True]), device)
    sigma = model.model.model_sampling.sigmas[torch.tensor([100, 700])].to(device)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)).to(device)
    return x0, hint, conds, sigma, noise


def loss_bytes_and_grads(model, cn, data, checkpointing: bool):
    """``loss_and_grads`` on ``two_rows``: the loss, the bytes the forward keeps for backward, and the gradients
    that reached a weight."""
    from frozentune.training.checkpointing import retained_bytes

    kept = []

    def measured(run):
        loss, n = retained_bytes(run)
        kept.append(n)
        return loss

    loss, grads = loss_and_grads(model, cn, two_rows(model, data), checkpointing=checkpointing, forward=measured)
    return loss.item(), kept[0], {n: g for n, g in grads.items() if g is not None}


# --- the learning checks: disks visible in the latents, true vs shuffled hints on held-out disks ----------------

def disk_latents(images: torch.Tensor, channels: int = 4, mixed: bool = False) -> torch.Tensor:
    """``[N, R, R, 3]`` images -> ``[N, channels, R/8, R/8]`` latents that show the disk (a stand-in for a trained
    VAE: the tiny random VAEs map every disk to almost the same latent): 8x8 average pooling, RGB + mean, repeated
    to ``channels`` or (``mixed``) through a fixed random 4 -> ``channels`` map, standardized."""
    pooled = torch.nn.functional.avg_pool2d(images.movedim(-1, 1), 8)
    lat = torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)
    if mixed:
        mix = torch.randn(channels, 4, generator=torch.Generator().manual_seed(3))
        lat = torch.einsum("ck,nkhw->nchw", mix, lat)
    else:
        lat = lat.repeat(1, channels // 4, 1, 1)
    return (lat - lat.mean()) / lat.std()


def caption_texts(base_model, vae, clip, **encode_kwargs):
    """The cached text conditioning of ``disks.CAPTION`` (and the empty caption) as ``cache.encode`` makes it."""
    from frozentune.controlnet_zero import cache

    targets, hints = disks.disks(1, R, seed=0)
    with torch.inference_mode(False):
        return cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION]), base_model, vae, clip, R,
                            **encode_kwargs).texts


def disk_set(count: int, seed: int, texts, latents: Callable[[torch.Tensor], torch.Tensor],
             latent_hints: bool = True):
    """``count`` disks (``disks.disks(count, R, seed)``) as cached training data: ``latents(targets)`` as the
    latents, the hints as ``latents(hints)`` or (``latent_hints=False``) as uint8 pixels, every row captioned."""
    from frozentune.controlnet_zero import cache

    targets, hints = disks.disks(count, R, seed=seed)
    x0 = latents(targets)
    cond = latents(hints) if latent_hints else (hints * 255).round().to(torch.uint8)
    images = cache.Rows({i: {"latent": x0[i], "hint": cond[i]} for i in range(count)})
    return cache.TrainingData(images, texts, torch.ones(count, dtype=torch.long), R)


def true_hints_beat_shuffled_hints(model, create: Callable, train_set, held_out, steps: int, learning_rate: float,
                                   label: str, check: Callable[[torch.nn.Module], None] | None = None) -> None:
    """The learning check on the ModelPatcher ``model``: a trainable copy of ``create(base_model)`` (a layout's
    fresh ControlNet; ``check(it)`` first) is indifferent to shuffling the hints on 4 held-out rows before
    training; after ``steps`` steps of batch 4 on ``train_set`` the held-out loss with the true hints is clearly
    below the one with shuffled hints."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import layouts
    from frozentune.controlnet_zero import training_run as trainer

    base = model.model
    rows = list(range(len(held_out)))
    mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    with torch.inference_mode(False):
        cn = layouts.trainable_copy(create(base), device)
        if check is not None:
            check(cn)
        start = trainer.evaluate(base, cn, held_out, device, rows[:4], repeats=1)
        assert trainer.evaluate(base, cn, held_out, device, rows[:4], repeats=1, shuffle_hints=True) == start
        settings = trainer.TrainSettings(steps=steps, batch_size=4, learning_rate=learning_rate, resolution=R,
                                         gradient_checkpointing=False)
        result = trainer.train(base, cn, train_set, settings, device)
        true = trainer.evaluate(base, cn, held_out, device, rows)
        shuffled = trainer.evaluate(base, cn, held_out, device, rows, shuffle_hints=True)
    log.warning("ControlNet-Zero learning check (%s, %d steps x batch 4, lr %g): held-out loss before (4 rows) "
                "%.4f; after: true hints %.4f, shuffled hints %.4f (ratio %.3f); train loss %.4f -> %.4f", label,
                steps, learning_rate, start, true, shuffled, true / shuffled, sum(result.losses[:10]) / 10,
                sum(result.losses[-10:]) / 10)
    assert true < 0.85 * shuffled, (true, shuffled)
