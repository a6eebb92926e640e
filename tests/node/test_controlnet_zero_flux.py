"""ControlNet-Zero on Flux.1: the "flux_xlabs" layout (issue 23), on the tiny Flux.1 dev (2 double + 2 single blocks).

The oracles are stock: ``ControlNetApplyAdvanced`` and ``KSampler`` sample with the ControlNet ControlNet-Zero
Create makes; ``ControlNetLoader`` reads the file ControlNet-Zero Save writes (XLabs' keys,
``comfy/controlnet.py`` ``load_controlnet_flux_xlabs_mistoline``). ComfyUI's Flux detection fixes 24 heads of
128 (hidden 3072) and ``ControlNetLoader`` passes no file metadata to it (``controlnet_config``), so the tiny
ControlNet file needs a test-only shape shim (``tiny_dits.flux_controlnet_detection``): for a Flux state dict whose
hidden width is the tiny one it answers the tiny heads/axes; every other file detects as stock.
"""

from __future__ import annotations

import math

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import disks, tiny_dits
from harness.controlnet_zero_helpers import R, create, hint_image, loss_and_grads
from harness.hashing import weight_hash


@pytest.fixture(scope="module")
def prompts(flux):
    return cz.prompts(flux)


def sample(model, prompts, control_net=None, hint=None, steps: int = 2) -> torch.Tensor:
    return cz.sample(model, prompts, None, control_net, hint, steps)


def perturbed(cn: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``cn`` whose zero-initialized parts are random (a stand-in for a trained ControlNet)."""
    return cz.perturbed(cn, ("controlnet_blocks.", "input_hint_block.14."), 0.1)


def test_create_copies_the_base_and_zeroes_what_x_flux_zeroes(flux):
    from frozentune.controlnet_zero import flux_xlabs, layouts, network

    base = flux.model.model
    before = weight_hash(base.diffusion_model)
    control_net = create(flux.model)
    cn = control_net.control_model
    assert layouts.for_module(cn) is flux_xlabs and layouts.for_model(flux.model) is flux_xlabs
    assert len(cn.double_blocks) == flux_xlabs.DEFAULT_DEPTH == 2 and len(cn.single_blocks) == 0
    assert control_net.frozentune_metadata["controlnet_zero.depth"] == "2"
    assert "guidance" in control_net.extra_conds and "y" in control_net.extra_conds  # as the stock loader makes it
    base_sd, sd = base.diffusion_model.state_dict(), cn.state_dict()
    copied = [k for k in sd if k in base_sd]
    assert {"img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
            "guidance_in.in_layer.weight", "double_blocks.1.img_attn.qkv.weight"} <= set(copied)
    for k in copied:
        assert torch.equal(sd[k], base_sd[k].float()), k
    zero = sorted(k for k in sd if k.startswith("controlnet_blocks.") or k.startswith("input_hint_block.14."))
    assert zero == ["controlnet_blocks.0.bias", "controlnet_blocks.0.weight", "controlnet_blocks.1.bias",
                    "controlnet_blocks.1.weight", "input_hint_block.14.bias", "input_hint_block.14.weight"]
    assert all(not sd[k].any() for k in zero)
    random = [k for k in sd if k not in copied and k not in zero]
    assert random and all(k.startswith(("input_hint_block.", "pos_embed_input.")) and sd[k].any() for k in random)
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())
    assert len(create(flux.model, depth=1).control_model.double_blocks) == 1
    for bad in (3, 9):
        with pytest.raises(ValueError, match=f"depth={bad}: a Flux ControlNet copies 1 to 2"):
            create(flux.model, depth=bad)
    with pytest.raises(ValueError, match="SD1.5/SDXL ControlNet always copies the whole UNet encoder"):
        network.create(None, depth=2)  # refused before the model is read
    assert weight_hash(base.diffusion_model) == before, "Create modified the base MODEL"


def test_schnell_gets_an_xlabs_controlnet_without_guidance_input(tiny_dit, pack):
    """Flux.1 schnell (no guidance_in): the same layout, its ControlNet has no guidance embedder, the untrained one
    changes nothing, and Train's flux_guidance is not recorded (schnell takes none)."""
    from frozentune.controlnet_zero import layouts, training_run

    schnell = tiny_dit("flux1_schnell")
    zero = create(schnell.model)
    assert layouts.for_module(zero.control_model).NAME == "flux_xlabs"
    assert not any(k.startswith("guidance_in.") for k in zero.control_model.state_dict())
    assert training_run.guidance_metadata(training_run.training_guidance(schnell.model.model, 4.0)) == {}
    prompts = schnell.encode("a red disk"), schnell.encode("")
    assert torch.equal(sample(schnell.model, prompts), sample(schnell.model, prompts, zero, hint_image()))


def test_the_layout_dispatch_refuses_what_does_not_fit(flux):
    """Families without a layout, modules no layout trains and a ControlNet of another family's layout are refused
    with both names."""
    import types

    from frozentune.controlnet_zero import layouts

    def stub(config_class: str):  # a BaseModel as families.family_of sees it
        return types.SimpleNamespace(model_config=type(config_class, (), {})())

    with pytest.raises(ValueError, match="does not support Z-Image models: ComfyUI 0.3.75 has no ControlNet loader "
                                         "for Z-Image.*SD1.x, SDXL family, Flux.1 dev"):
        layouts.for_model(stub("ZImage"))
    with pytest.raises(ValueError, match="is a Linear, which ControlNet-Zero does not train"):
        layouts.for_module(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="without a control model"):
        layouts.for_control_net(types.SimpleNamespace())
    cn = create(flux.model).control_model
    with pytest.raises(ValueError, match=r"flux_xlabs-layout ControlNet \(for Flux.1 dev, Flux.1 schnell\), the "
                                         "MODEL is SDXL family"):
        layouts.check_pair(cn, stub("SDXL"))
    assert layouts.check_pair(cn, flux.model.model).NAME == "flux_xlabs"


def test_untrained_controlnet_changes_nothing_and_a_trained_one_steers(flux, prompts):
    from frozentune.controlnet_zero import flux_xlabs

    before = weight_hash(flux.model.model.diffusion_model)
    zero = create(flux.model)
    plain = sample(flux.model, prompts)
    with_zero = sample(flux.model, prompts, zero, hint_image())
    assert torch.equal(plain, with_zero), (plain - with_zero).abs().max()
    trained = flux_xlabs.wrap(perturbed(zero.control_model))
    steered = sample(flux.model, prompts, trained, hint_image())
    other_hint = sample(flux.model, prompts, trained, hint_image(8))
    assert (steered - plain).abs().max() > 1e-3
    assert (steered - other_hint).abs().max() > 1e-5, "the hint does not reach the output"
    assert weight_hash(flux.model.model.diffusion_model) == before


def test_training_forward_is_what_sampling_computes(flux, prompts, monkeypatch):
    """The layout's control() + the frozen twin give the base's output under stock get_control, bit for bit."""
    import comfy.ldm.flux.model
    import comfy.model_management as mm

    from frozentune.controlnet_zero import cache, flux_xlabs
    from frozentune.controlnet_zero import training_run as trainer

    cn = perturbed(create(flux.model).control_model)
    hint = hint_image()
    seen = {}
    stock = comfy.ldm.flux.model.Flux._forward

    def record(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None, *args, **kwargs):
        out = stock(self, x, timestep, context, y, guidance, ref_latents, control, *args, **kwargs)
        if control is not None:
            seen.update(x=x.clone(), t=timestep.clone(), out=out.clone(), guidance=guidance.clone())
        return out

    monkeypatch.setattr(comfy.ldm.flux.model.Flux, "_forward", record)
    sample(flux.model, prompts, flux_xlabs.wrap(cn), hint, steps=1)
    monkeypatch.undo()
    ms = flux.model.model.model_sampling
    sigma = ms.sigma(seen["t"]).float()
    assert torch.equal(ms.calculate_input(sigma, seen["x"]), seen["x"])  # so the recorded input is x_t itself
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(hint, hint, ["a red disk"]), flux.model.model, flux.vae,
                            flux.clip, R, guidance=float(seen["guidance"][0]))
        _, _, conds = data.batch(torch.tensor([0]), torch.zeros(1, dtype=torch.bool), "cpu")
        mm.load_models_gpu([flux.model], force_full_load=True)
        with torch.no_grad(), trainer.controlled_forward(flux.model.model, cn, torch.device("cpu"),
                                                         torch.float32) as forward:
            out = forward(cn, seen["x"], sigma, hint.movedim(-1, 1), conds)
    assert torch.equal(out, seen["out"]), (out - seen["out"]).abs().max()


def training_batch(flux):
    """A perturbed ControlNet-Zero to train (fp32, on the load device, base loaded) and one batch of two disks for
    the training loss: ``(cn, (x0, hint, conds, sigma, noise))``."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import cache, network

    targets, hints = disks.disks(2, R, seed=0)
    mm.load_models_gpu([flux.model], force_full_load=True)
    device = flux.model.load_device
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION] * 2), flux.model.model,
                            flux.vae, flux.clip, R, guidance=4.0)
        cn = network.trainable_copy(perturbed(create(flux.model).control_model), device).train()
        x0, hint, conds = data.batch(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool), device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        sigma = flux.model.model.model_sampling.sigmas[torch.tensor([300, 700])]
    return cn, (x0, hint, conds, sigma, noise)


def test_checkpointing_on_and_off_give_the_same_loss_and_gradients(flux):
    """The training forward through ComfyUI's in-place Flux code, with and without gradient checkpointing of both
    networks: the same loss and the same gradient for every ControlNet weight (and the hooks that make the plain
    path work are gone afterwards)."""
    cn, batch = training_batch(flux)
    results = {c: loss_and_grads(flux.model, cn, batch, checkpointing=c) for c in (False, True)}
    (plain, g_plain), (ckpt, g_ckpt) = results[False], results[True]
    assert float(plain) == pytest.approx(float(ckpt), rel=1e-6)
    # the last double block's text stream feeds nothing (only img goes to controlnet_blocks), as in x-flux
    unused = sorted(n for n, g in g_plain.items() if g is None)
    assert unused == sorted(n for n, g in g_ckpt.items() if g is None)
    assert unused and all(n.startswith(("double_blocks.1.txt_attn.proj.", "double_blocks.1.txt_mlp.")) for n in unused)
    assert g_plain["controlnet_blocks.0.weight"].abs().sum() > 0
    for name in set(g_plain) - set(unused):
        assert torch.allclose(g_plain[name], g_ckpt[name], rtol=1e-4, atol=1e-7), name
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in cn.modules()), "training hooks left behind"


def test_controlnet_norms_keep_their_outputs_and_a_stream_copy_each_less(flux, monkeypatch):
    """Under ``flux_xlabs.training`` the ControlNet's LayerNorms keep their output for backward
    (``training.lean_norm``), not a copy of their input: the training forward retains one norm input's bytes less
    per norm than with input copies (``checkpointing._copy_input``, what the base twin's norms get), for the same
    loss and the same gradients to fp32 rounding."""
    import contextlib

    from frozentune.training import checkpointing, lean_norm

    @contextlib.contextmanager
    def copying_inputs(norms):
        handles = [n.register_forward_pre_hook(checkpointing._copy_input) for n in norms if lean_norm.fits(n)]
        try:
            yield len(handles)
        finally:
            for h in handles:
                h.remove()

    cn, batch = training_batch(flux)
    norm_inputs = {}

    def record(name):
        return lambda m, a: norm_inputs.setdefault(name, a[0].numel() * a[0].element_size()) and None

    handles = [m.register_forward_pre_hook(record(n)) for n, m in cn.named_modules() if lean_norm.fits(m)]
    kept = []

    def measured(run):
        out, n = checkpointing.retained_bytes(run)
        kept.append(n)
        return out

    lean = loss_and_grads(flux.model, cn, batch, forward=measured)
    with monkeypatch.context() as m:
        m.setattr(lean_norm, "keeping_outputs", copying_inputs)
        copied = loss_and_grads(flux.model, cn, batch, forward=measured)
    for h in handles:
        h.remove()
    assert len(norm_inputs) == 4 * len(cn.double_blocks) + len(cn.single_blocks)
    # the last double block's text MLP feeds nothing (see above): what its norm kept is freed either way
    kept_for_backward = sum(norm_inputs.values()) - norm_inputs[f"double_blocks.{len(cn.double_blocks) - 1}.txt_norm2"]
    saved = kept[1] - kept[0]
    assert kept_for_backward <= saved < 1.1 * kept_for_backward, (saved, norm_inputs)
    assert float(lean[0]) == pytest.approx(float(copied[0]), rel=1e-6)
    for name, g in lean[1].items():
        assert (g is None and copied[1][name] is None) or torch.allclose(g, copied[1][name], rtol=1e-4, atol=1e-7), \
            name


def test_save_writes_a_file_the_stock_loader_reads_whole(flux, prompts, controlnet_folder):
    """Save's file: every key consumed by the stock ControlNetLoader (XLabs branch), the same sampling as the
    ControlNet it was saved from, and trainable further from the loaded CONTROL_NET."""
    import nodes
    import safetensors

    from frozentune.controlnet_zero import flux_xlabs
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    trained = flux_xlabs.wrap(perturbed(create(flux.model).control_model))
    trained.frozentune_metadata = {"controlnet_zero.depth": "2"}
    with torch.inference_mode():
        name = ControlNetZeroSave.execute(control_net=trained, filename="flux/edges", dtype="fp32").args[0]
    assert name == "flux/edges.safetensors"
    path = controlnet_folder / name
    with safetensors.safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert meta["controlnet_zero.depth"] == "2"
    with tiny_dits.flux_controlnet_detection():
        (loaded,) = nodes.ControlNetLoader().load_controlnet(name)
    module = loaded.control_model
    assert type(module).__name__ == "ControlNetFlux" and not module.latent_input and not module.mistoline
    assert keys == set(module.state_dict()), "the stock loader left keys missing or unexpected"
    for k, v in trained.control_model.state_dict().items():
        assert torch.equal(module.state_dict()[k].float(), v), k
    ours = sample(flux.model, prompts, trained, hint_image())
    stock = sample(flux.model, prompts, loaded, hint_image())
    assert torch.equal(ours, stock), (ours - stock).abs().max()
    # and the loaded file trains on (Train takes what Load ControlNet Model gives)
    more = cz.train_node(flux.model, flux.clip, flux.vae, loaded, pairs=2, steps=1, prompt_dropout=0.0,
                         run_name="more").args[0]
    moved = more.control_model.state_dict()["controlnet_blocks.0.weight"]
    assert not torch.equal(moved, module.state_dict()["controlnet_blocks.0.weight"].float())


def test_train_node_trains_a_flux_controlnet_that_loads_back(flux, controlnet_folder):
    """The Train node end to end on Flux (flow loss, prompt dropout, cached encodings, checkpointing of both
    networks, the training guidance, a preview): the ControlNet's zero parts move, the base stays, the guidance is
    recorded, the checkpoint loads back through the CLI's loader."""
    from frozentune.controlnet_zero import flux_xlabs, train

    before = weight_hash(flux.model.model.diffusion_model)
    start = create(flux.model)
    out = cz.train_node(flux.model, flux.clip, flux.vae, start, steps=3, gradient_checkpointing=True,
                        checkpoint_every=3, run_name="flux", preview_every=3, flux_guidance=4.0)
    trained, curve, previews = out.args
    assert curve.shape[-1] == 3
    assert previews.shape[1:] == (R, R, 3) and previews.std() > 0, "the preview (a pixel hint on Flux) was not drawn"
    meta = trained.frozentune_metadata
    assert meta["controlnet_zero.flux_guidance"] == "4" and meta["controlnet_zero.steps_done"] == "3"
    assert all(math.isfinite(float(v)) for v in [meta["controlnet_zero.final_loss"]])
    a, b = start.control_model.state_dict(), trained.control_model.state_dict()
    assert b["controlnet_blocks.0.weight"].any() and not torch.equal(a["pos_embed_input.weight"],
                                                                      b["pos_embed_input.weight"])
    assert not any(h for m in trained.control_model.modules() for h in m._forward_pre_hooks.values()), \
        "training hooks left on the trained ControlNet"
    assert weight_hash(flux.model.model.diffusion_model) == before, "training modified the base"
    checkpoint = controlnet_folder.parent / "output" / "controlnet_zero" / "flux" / "run_001" / "step_000003"
    module = train.load_controlnet_file(checkpoint / "controlnet.safetensors", flux.model.model)
    assert isinstance(module, type(trained.control_model))
    for k, v in b.items():
        assert torch.equal(module.state_dict()[k], v.cpu()), k
    assert flux_xlabs.owns(module)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_matches_an_uninterrupted_run(optimizer, flux, controlnet_folder, caplog):
    """Cancel after the step-2 checkpoint, resume: the same ControlNet as an uninterrupted run, with AdamW or 8-bit
    AdamW (whose state of the weights that get no gradient, the last block's text stream, stays empty)."""
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    cz.flux_resume_matches_an_uninterrupted_run(flux, caplog, optimizer, guidance=4.0, refused=3.5,
                                                saved_key="input_hint_block.0.weight")


@pytest.mark.half
@pytest.mark.parametrize("dtype_name", ["bf16", "fp8"])
def test_bf16_and_fp8_bases_train_fp32_controlnets_and_apply(dtype_name, flux, prompts):
    """bf16 computing natively (bf16 autocast), or fp8 weight storage (UNETLoader fp8_e4m3fn, cast per op): the
    ControlNet trains as fp32 master weights, the base is not modified, and an untrained one applied changes nothing."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import cache, flux_xlabs, network

    model, stored = cz.tiny_flux_in(dtype_name)
    clip, vae = flux.clip, flux.vae
    mm.load_models_gpu([model], force_full_load=True)
    before = weight_hash(model.model.diffusion_model)
    zero = create(model)
    plain = sample(model, prompts)
    assert torch.equal(plain, sample(model, prompts, zero, hint_image())), "an untrained ControlNet changed the output"
    targets, hints = disks.disks(4, R, seed=0)
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION] * 4), model.model, vae, clip, R,
                            guidance=4.0)
        cn = network.trainable_copy(zero.control_model, model.load_device)
    result = cz.train_around_a_half_base(model, cn, data, dtype_name, 2, before)
    assert result.control_model.state_dict()["controlnet_blocks.0.weight"].any()
    assert model.model.diffusion_model.img_in.weight.dtype == stored
    steered = sample(model, prompts, flux_xlabs.wrap(result.control_model), hint_image())
    assert torch.isfinite(steered).all() and not torch.equal(steered, plain)


@pytest.mark.slow
def test_true_hints_beat_shuffled_hints_on_held_out_disks(flux):
    """As the SD1.5 check (test_controlnet_zero_learning.py): disks visible in the latents, the tiny Flux frozen,
    lr 1e-3; after training, the held-out loss with the true hints is clearly below the one with shuffled hints."""
    from frozentune.controlnet_zero import flux_xlabs

    texts = cz.caption_texts(flux.model.model, flux.vae, flux.clip, guidance=4.0)
    train_set, held_out = (cz.disk_set(count, seed, texts, lambda x: cz.disk_latents(x, 16), latent_hints=False)
                           for count, seed in ((32, 1), (16, 2)))
    cz.true_hints_beat_shuffled_hints(flux.model, flux_xlabs.create, train_set, held_out, 80, 1e-3, "Flux.1-dev tiny")


def _plain_hints(block):
    """A stand-in for ``flux_xlabs._hint_forward``: the stock Sequential forward (every activation kept)."""
    return lambda x: torch.nn.Sequential.forward(block, x)


@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_training_shortcuts_keep_the_loss_and_gradients_bit_for_bit(compute, flux, monkeypatch):
    """The training forward's two cost cuts (the RoPE ``_fast_rope``, forward and backward; the hint block keeping
    each SiLU's input only) give the loss and every ControlNet gradient of plain autograd bit for bit, fp32 and bf16
    autocast, with checkpointing on and off; the patches are undone after (ComfyUI's ``apply_rope`` and the hint
    block's forward are the stock ones again)."""
    import contextlib

    import comfy.ldm.flux.math as flux_math

    from frozentune.controlnet_zero import flux_xlabs

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[compute]
    stock_rope = flux_math.apply_rope
    calls = []
    rope_apply = flux_xlabs._Rope.apply
    monkeypatch.setattr(flux_xlabs._Rope, "apply", lambda *a: calls.append(1) or rope_apply(*a))
    cn, batch = training_batch(flux)
    for checkpointing in (False, True):
        calls.clear()
        fast = loss_and_grads(flux.model, cn, batch, dtype, checkpointing)
        assert calls, "the training forward did not rotate through _fast_rope"
        assert flux_math.apply_rope is stock_rope and "forward" not in cn.input_hint_block.__dict__
        with monkeypatch.context() as m:
            m.setattr(flux_xlabs, "_rope_backward", contextlib.nullcontext)
            m.setattr(flux_xlabs, "_hint_forward", _plain_hints)
            plain = loss_and_grads(flux.model, cn, batch, dtype, checkpointing)
        assert torch.equal(fast[0], plain[0])
        assert fast[1].keys() == plain[1].keys() and fast[1]["input_hint_block.0.weight"] is not None
        differ = [n for n, g in plain[1].items() if not (g is None and fast[1][n] is None or torch.equal(fast[1][n], g))]
        assert not differ, (checkpointing, differ)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
def test_fast_rope_backward_is_autograds_bit_for_bit(dtype_name, pack):
    """``_fast_rope`` against ComfyUI's ``apply_rope`` under autograd, on q/k as Flux's attention makes them (a
    permuted qkv view through the QK RMSNorm) and an upstream gradient laid out as SDPA's backward gives it (not
    contiguous): the same outputs and gradients bit for bit, the norm's weight gradient included (it sums in
    memory order, so a gradient that is autograd's values in another layout already changes its rounding)."""
    import comfy.ldm.flux.math as flux_math

    from frozentune.controlnet_zero import flux_xlabs

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    gen = torch.Generator().manual_seed(0)
    b, heads, length, dim = 2, 3, 40, 64
    pos = torch.rand(b, length, 3, generator=gen) * 20
    pe = torch.cat([flux_math.rope(pos[..., i], d, 10000) for i, d in enumerate((16, 24, 24))], dim=-3).unsqueeze(1)
    qkv_data = torch.randn(b, length, 3 * heads * dim, generator=gen).to(dtype)
    scale_data = (1 + torch.randn(dim, generator=gen) / 4).to(dtype)
    grads = [torch.randn(b, length, heads, dim, generator=gen).to(dtype).transpose(1, 2) for _ in range(2)]
    results = []
    for apply_rope in (flux_math.apply_rope, flux_xlabs._fast_rope(flux_math.apply_rope1)):
        qkv = qkv_data.clone().requires_grad_(True)
        scale = scale_data.clone().requires_grad_(True)
        q, k, _ = qkv.view(b, length, 3, heads, dim).permute(2, 0, 3, 1, 4)
        q, k = (torch.nn.functional.rms_norm(t, (dim,), weight=scale, eps=1e-6) for t in (q, k))
        rq, rk = apply_rope(q, k, pe)
        raw = torch.autograd.grad([rq, rk], [q], grads, retain_graph=True)[0]
        torch.autograd.backward([rq, rk], grads)
        results.append((rq.detach(), rk.detach(), raw, qkv.grad, scale.grad))
    stock, fast = results
    assert stock[2].is_contiguous() and fast[2].is_contiguous()
    for name, a, c in zip(("q rotated", "k rotated", "q grad", "qkv grad", "norm weight grad"), stock, fast,
                          strict=True):
        assert torch.equal(a, c), name
    with torch.no_grad():  # nothing recorded: the stock function itself
        x = qkv_data[..., :heads * dim].view(b, length, heads, dim).transpose(1, 2)
        assert torch.equal(flux_xlabs._fast_rope(flux_math.apply_rope1)(x, x, pe)[0], flux_math.apply_rope1(x, pe))


def test_swap_pairs_moves_each_pairs_bits(pack):
    """``flux_xlabs._swap_pairs`` (the RoPE backward's pair swap): the bits of each (even, odd) pair exchanged, NaN
    payloads, signed zeros and infinities included, through the 64-bit rotation (4-byte types) and the fallback."""
    from frozentune.controlnet_zero import flux_xlabs

    gen = torch.Generator().manual_seed(0)
    for dtype, ints in ((torch.float32, torch.int32), (torch.float64, torch.int64), (torch.bfloat16, torch.int16)):
        t = torch.randn(3, 5, 8, generator=gen).to(dtype)
        t.view(-1)[:6] = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf"), 0.0, -1.5]).to(dtype)
        t.view(ints).view(-1)[7] = -2  # a NaN with its own payload (all ones but the last bit) in 4-byte types
        expected = t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        assert torch.equal(flux_xlabs._swap_pairs(t).view(ints), expected.view(ints)), dtype


def test_hint_block_keeps_half_its_activations_and_runs_channels_last(flux):
    """XLabs' hint convolutions: ``control`` hands them an NHWC hint even when given a contiguous one (weights and
    their gradients stay contiguous, so the saved file is unchanged), and under ``training`` the block keeps about
    half the bytes for backward (each SiLU's input, not also its output) for the same output and gradients."""
    from frozentune.controlnet_zero import flux_xlabs, network
    from frozentune.training.checkpointing import retained_bytes

    with torch.inference_mode(False):
        cn = network.trainable_copy(perturbed(create(flux.model).control_model), "cpu").train()
        seen = []
        handle = cn.input_hint_block[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        x_in = torch.randn(1, 16, R // 8, R // 8)
        conds = {"c_crossattn": torch.randn(1, 4, cn.txt_in.in_features), "y": torch.randn(1, cn.vector_in.in_layer.in_features),
                 "guidance": torch.full((1,), 4.0)}
        hint = hint_image().movedim(-1, 1).contiguous()
        with torch.no_grad():
            flux_xlabs.control(cn, x_in, hint, torch.tensor([500.0]), conds, torch.float32)
        handle.remove()
        assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()

        pixels = hint.contiguous(memory_format=torch.channels_last) * 2 - 1
        kept, outputs = {}, {}
        for name, forward in (("plain", _plain_hints), ("training", flux_xlabs._hint_forward)):
            cn.zero_grad(set_to_none=True)
            cn.input_hint_block.forward = forward(cn.input_hint_block)
            try:
                out, kept[name] = retained_bytes(lambda: cn.input_hint_block(pixels))
                out.square().sum().backward()
            finally:
                del cn.input_hint_block.forward
            outputs[name] = out.detach(), [p.grad for p in cn.input_hint_block.parameters()]
    assert torch.equal(outputs["plain"][0], outputs["training"][0])
    assert all(torch.equal(a, b) for a, b in zip(outputs["plain"][1], outputs["training"][1], strict=True))
    assert all(g.is_contiguous() for g in outputs["training"][1])
    assert kept["training"] < 0.6 * kept["plain"], kept
