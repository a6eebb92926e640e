"""ControlNet-Zero on Flux.1 in InstantX's / diffusers' layout ("flux_instantx", issue 23), on the tiny Flux.1 dev.

The oracles: diffusers' own ``FluxControlNetModel.from_transformer`` on a ``FluxTransformer2DModel`` holding the
tiny base's weights (the same file, key for key and value for value, and the same block outputs); the stock
``ControlNetLoader`` (``comfy/controlnet.py`` ``load_controlnet_flux_instantx``, through the tests' Flux width shim
``tiny_dits.flux_controlnet_detection``) and ``ControlNetApplyAdvanced`` + ``KSampler`` with the tiny VAE (latent
hints). Fixtures and helpers are the ControlNet-Zero tests' (``tests/node/conftest.py``,
``harness.controlnet_zero_helpers``).
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from harness import controlnet_zero_helpers as cz
from harness import disks, tiny_dits
from harness.controlnet_zero_helpers import R, create, hint_image, sample
from harness.hashing import weight_hash

log = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def prompts(flux):
    return cz.prompts(flux)


def layout():
    return cz.layout("flux_diffusers")


def perturbed(cn: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``cn`` whose zero-initialized parts are random (a stand-in for a trained ControlNet)."""
    return cz.perturbed(cn, layout().ZERO_PREFIXES, 0.1)


def test_create_node_layout_input_copies_the_base_and_zeroes_what_diffusers_zeroes(flux):
    from frozentune.controlnet_zero import flux_xlabs, layouts

    flux_instantx = layout()
    base = flux.model.model
    before = weight_hash(base.diffusion_model)
    control_net = create(flux.model, layout="flux_instantx")
    cn = control_net.control_model
    assert layouts.for_module(cn) is flux_instantx and not flux_xlabs.owns(cn) and cn.latent_input
    assert layouts.for_model(flux.model) is flux_xlabs, "the family default must stay XLabs'"
    assert create(flux.model).control_model.latent_input is False
    # default 4 (diffusers' --num_double_layers), capped at the tiny base's 2 double blocks; no single blocks
    assert len(cn.double_blocks) == 2 and len(cn.single_blocks) == 0
    assert control_net.frozentune_metadata["controlnet_zero.depth"] == "2"
    assert control_net.latent_format is not None and control_net.compression_ratio == 1
    assert set(control_net.extra_conds) == {"y", "guidance"}
    base_sd, sd = base.diffusion_model.state_dict(), cn.state_dict()
    zero = sorted(k for k in sd if k.startswith(flux_instantx.ZERO_PREFIXES))
    assert zero == ["controlnet_blocks.0.bias", "controlnet_blocks.0.weight", "controlnet_blocks.1.bias",
                    "controlnet_blocks.1.weight", "pos_embed_input.bias", "pos_embed_input.weight"]
    assert all(not sd[k].any() for k in zero)
    assert cn.pos_embed_input.weight.shape == (64, 64)  # 16 latent channels x 2 x 2 (17: an inpaint ControlNet)
    for k in set(sd) - set(zero):
        assert torch.equal(sd[k], base_sd[k].float()), k
    assert len(create(flux.model, depth=1, layout="flux_instantx").control_model.double_blocks) == 1
    with pytest.raises(ValueError, match="depth=3: a Flux ControlNet copies 1 to 2"):
        create(flux.model, depth=3, layout="flux_instantx")
    assert weight_hash(base.diffusion_model) == before, "Create modified the base MODEL"


def test_create_refuses_a_layout_that_does_not_fit_the_family(flux, tiny_checkpoints):
    import types

    import nodes

    from frozentune.controlnet_zero import layouts

    sd15 = nodes.CheckpointLoaderSimple().load_checkpoint(tiny_checkpoints["sd15"].name)[0]
    with pytest.raises(ValueError, match=r"layout 'flux_instantx' does not fit the MODEL: it is for Flux.1 dev, "
                                         r"Flux.1 schnell, the MODEL is SD1.x.*layouts are ldm"):
        create(sd15, layout="flux_instantx")
    with pytest.raises(ValueError, match=r"'qwen_instantx' does not fit the MODEL: it is for Qwen-Image"):
        layouts.for_model(flux.model, "qwen_instantx")
    cn = layout().create(flux.model.model)
    stub = types.SimpleNamespace(model_config=type("SDXL", (), {})())
    with pytest.raises(ValueError, match=r"flux_instantx-layout ControlNet \(for Flux.1 dev, Flux.1 schnell\), the "
                                         "MODEL is SDXL family"):
        layouts.check_pair(cn, stub)
    assert layouts.check_pair(cn, flux.model.model).NAME == "flux_instantx"
    with pytest.raises(ValueError, match="not a Flux ControlNet in InstantX's / diffusers' layout"):
        layout().unwrap(create(flux.model))  # an XLabs one


def _diffusers_transformer(base):
    """The tiny Flux base as diffusers' ``FluxTransformer2DModel`` (its weights through ``flux_to_diffusers``)."""
    import comfy.utils
    from diffusers import FluxTransformer2DModel

    from frozentune.controlnet_zero import layouts

    cfg = base.model_config.unet_config
    heads = cfg["num_heads"]
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=cfg["in_channels"] * 4, num_layers=cfg["depth"],
        num_single_layers=cfg["depth_single_blocks"], attention_head_dim=cfg["hidden_size"] // heads,
        num_attention_heads=heads, joint_attention_dim=cfg["context_in_dim"], pooled_projection_dim=cfg["vec_in_dim"],
        guidance_embeds=cfg["guidance_embed"], axes_dims_rope=tuple(cfg["axes_dim"]))
    sd = {k: v.float() for k, v in base.diffusion_model.state_dict().items()}
    key_map = comfy.utils.flux_to_diffusers({"depth": cfg["depth"], "depth_single_blocks": cfg["depth_single_blocks"],
                                             "hidden_size": cfg["hidden_size"]})
    tensors, used = layouts.invert_key_map(sd, key_map)
    assert used == set(sd)
    transformer.load_state_dict(tensors, strict=True)
    return transformer.eval()


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def test_file_is_what_diffusers_flux_controlnet_from_transformer_makes_and_computes_alike(flux):
    """diffusers' ``FluxControlNetModel.from_transformer(num_layers=2, num_single_layers=0)`` on the same base has
    exactly our file's keys and values, and, trained-looking, the same block outputs."""
    from diffusers import FluxControlNetModel

    flux_instantx = layout()
    base = flux.model.model
    cfg = base.model_config.unet_config
    transformer = _diffusers_transformer(base)
    reference = FluxControlNetModel.from_transformer(transformer, num_layers=2, num_single_layers=0,
                                                     attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
                                                     num_attention_heads=cfg["num_heads"])
    cn = cz.file_is_diffusers(flux_instantx, base, reference, perturbed)
    gen = torch.Generator().manual_seed(0)
    x, hint = torch.randn(2, 16, 8, 8, generator=gen), torch.randn(2, 16, 8, 8, generator=gen)
    context, y = torch.randn(2, 7, cfg["context_in_dim"], generator=gen), torch.randn(2, cfg["vec_in_dim"],
                                                                                       generator=gen)
    sigmas, guidance = torch.tensor([0.25, 0.9]), torch.tensor([3.5, 3.5])
    ids = torch.zeros(4, 4, 3)
    ids[..., 1] += torch.arange(4)[:, None]
    ids[..., 2] += torch.arange(4)[None, :]
    with torch.no_grad():
        mine = cn(x=x, timesteps=sigmas, context=context, y=y, guidance=guidance, hint=hint)["input"]
        blocks, singles = reference(hidden_states=_pack(x), controlnet_cond=_pack(hint), encoder_hidden_states=context,
                                    pooled_projections=y, timestep=sigmas, guidance=guidance,
                                    img_ids=ids.reshape(16, 3), txt_ids=torch.zeros(7, 3), return_dict=False)
    assert len(blocks) == 2 and singles is None
    repeat = math.ceil(19 / 2)  # ComfyUI repeats each output over the base's 19 double blocks
    for j, theirs_j in enumerate(blocks):
        worst = (mine[j * repeat] - theirs_j).abs().max().item()
        log.warning("Flux InstantX ControlNet vs diffusers FluxControlNetModel, block %d: max |diff| %.3g of max "
                    "|out| %.3g", j, worst, theirs_j.abs().max().item())
        assert worst <= 1e-4 * theirs_j.abs().max().item(), (j, worst)


def test_untrained_changes_nothing_a_trained_one_steers_and_the_hint_is_what_sampling_encodes(flux, prompts,
                                                                                             monkeypatch):
    import comfy.ldm.flux.controlnet

    flux_instantx = layout()
    before = weight_hash(flux.model.model.diffusion_model)
    zero = flux_instantx.wrap(flux_instantx.create(flux.model.model))
    plain = sample(flux.model, prompts)
    assert torch.equal(plain, sample(flux.model, prompts, flux.vae, zero, hint_image()))
    # one CONTROL_NET object for both runs: ComfyUI keeps its ModelPatcher loaded, and a patcher that dies while its
    # module lives (a temporary wrap of a kept module) is a "dead" loaded model that the next VAE encode trips on
    trained = flux_instantx.wrap(perturbed(zero.control_model))
    seen = []
    stock = comfy.ldm.flux.controlnet.ControlNetFlux.forward

    def record(self, x, timesteps, context, y=None, guidance=None, hint=None, **kwargs):
        seen.append(hint.clone())
        return stock(self, x, timesteps, context, y, guidance, hint, **kwargs)

    monkeypatch.setattr(comfy.ldm.flux.controlnet.ControlNetFlux, "forward", record)
    steered = sample(flux.model, prompts, flux.vae, trained, hint_image())
    monkeypatch.undo()
    other_hint = sample(flux.model, prompts, flux.vae, trained, hint_image(8))
    assert (steered - plain).abs().max() > 1e-3
    assert (steered - other_hint).abs().max() > 1e-5, "the hint does not reach the output"
    # what training caches for the hint is what sampling feeds the ControlNet
    cached = flux_instantx.hint_input((hint_image() * 255).round().to(torch.uint8), flux.vae)
    assert seen and seen[0].shape[1:] == cached.shape[1:] == (16, R // 8, R // 8)
    from_float = flux_instantx.hint_input(hint_image(), flux.vae)
    assert torch.allclose(seen[0][:1].float(), from_float, atol=1e-5), (seen[0][:1] - from_float).abs().max()
    assert weight_hash(flux.model.model.diffusion_model) == before


def test_create_train_save_and_the_stock_loader_reads_every_key(flux, prompts, controlnet_folder, monkeypatch):
    """Create (layout flux_instantx) -> Train (latent hints through the VAE) -> Save -> stock ControlNetLoader: no
    missing or unexpected key, the same weights and the same sampling; the file trains on, and continues through
    the CLI's file loader."""
    import comfy.controlnet
    import nodes
    import safetensors

    from frozentune.controlnet_zero import train
    from frozentune.nodes.controlnet_zero_nodes import ControlNetZeroSave

    flux_instantx = layout()
    before = weight_hash(flux.model.model.diffusion_model)
    start = create(flux.model, layout="flux_instantx")
    args = dict(gradient_checkpointing=True, flux_guidance=flux_instantx.TRAIN_GUIDANCE)
    trained = cz.train_node(flux.model, flux.clip, flux.vae, start, run_name="instantx", **args).args[0]
    assert flux_instantx.owns(trained.control_model)
    assert trained.frozentune_metadata["controlnet_zero.flux_guidance"] == "3.5"
    a, b = start.control_model.state_dict(), trained.control_model.state_dict()
    assert not a["pos_embed_input.weight"].any(), "Train modified the input CONTROL_NET"
    assert b["controlnet_blocks.0.weight"].any() and b["pos_embed_input.weight"].any()
    assert weight_hash(flux.model.model.diffusion_model) == before, "training modified the base"
    with torch.inference_mode():
        name = ControlNetZeroSave.execute(control_net=trained, filename="flux/instantx", dtype="fp32").args[0]
    with safetensors.safe_open(str(controlnet_folder / name), framework="pt") as f:
        keys = set(f.keys())
    assert "controlnet_x_embedder.weight" in keys and "transformer_blocks.1.attn.to_q.weight" in keys
    reports = []
    stock = comfy.controlnet.controlnet_load_state_dict

    def record(control_model, sd):
        reports.append(control_model.load_state_dict(sd, strict=False))
        return control_model

    monkeypatch.setattr(comfy.controlnet, "controlnet_load_state_dict", record)
    with tiny_dits.flux_controlnet_detection():
        (loaded,) = nodes.ControlNetLoader().load_controlnet(name)
    monkeypatch.setattr(comfy.controlnet, "controlnet_load_state_dict", stock)
    (report,) = reports
    assert not report.missing_keys and not report.unexpected_keys, report
    module = loaded.control_model
    assert type(module).__name__ == "ControlNetFlux" and module.latent_input and flux_instantx.owns(module)
    for k, v in b.items():
        assert torch.equal(module.state_dict()[k].float(), v.cpu()), k
    ours = sample(flux.model, prompts, flux.vae, trained, hint_image())
    theirs = sample(flux.model, prompts, flux.vae, loaded, hint_image())
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    # the CLI's loader finds the file's layout among the family's (Flux.1: XLabs' default, InstantX's)
    back = train.load_controlnet_file(controlnet_folder / name, flux.model.model)
    assert flux_instantx.owns(back) and all(torch.equal(back.state_dict()[k], v.cpu()) for k, v in b.items())
    more = cz.train_node(flux.model, flux.clip, flux.vae, loaded, run_name="more", steps=1, **args).args[0]
    assert not torch.equal(more.control_model.state_dict()["controlnet_blocks.0.weight"].cpu(),
                           b["controlnet_blocks.0.weight"].cpu())


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_resume_matches_an_uninterrupted_run(optimizer, flux, controlnet_folder, caplog):
    """As the XLabs layout's: Cancel after the step-2 checkpoint (the InstantX file's keys), resume: the same
    ControlNet as an uninterrupted run, with AdamW or 8-bit AdamW; a resume at another flux_guidance is refused."""
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    cz.flux_resume_matches_an_uninterrupted_run(flux, caplog, optimizer, guidance=layout().TRAIN_GUIDANCE,
                                                refused=4.0, saved_key="controlnet_x_embedder.weight",
                                                layout="flux_instantx")


@pytest.mark.half
@pytest.mark.parametrize("dtype_name", ["bf16", "fp8"])
def test_bf16_and_fp8_bases_train_fp32_controlnets_and_apply(dtype_name, flux, prompts):
    """bf16 computing natively, or fp8 weight storage (cast per op): an untrained ControlNet applied changes nothing,
    it trains as fp32 master weights with latent hints, and the base is not modified."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import cache

    flux_instantx = layout()
    model, _ = cz.tiny_flux_in(dtype_name)
    mm.load_models_gpu([model], force_full_load=True)
    before = weight_hash(model.model.diffusion_model)
    zero = create(model, layout="flux_instantx")
    plain = sample(model, prompts)
    assert torch.equal(plain, sample(model, prompts, flux.vae, zero, hint_image())), "an untrained one changed it"
    targets, hints = disks.disks(4, R, seed=0)
    with torch.inference_mode(False):
        data = cache.encode(cache.Source.from_tensors(targets, hints, [disks.CAPTION] * 4), model.model, flux.vae,
                            flux.clip, R, guidance=flux_instantx.TRAIN_GUIDANCE, hint_input=flux_instantx.hint_input)
        cn = flux_instantx.trainable_copy(zero.control_model, model.load_device)
    result = cz.train_around_a_half_base(model, cn, data, dtype_name, 2, before)
    assert result.control_model.state_dict()["pos_embed_input.weight"].any()
    steered = sample(model, prompts, flux.vae, flux_instantx.wrap(result.control_model), hint_image())
    assert torch.isfinite(steered).all() and not torch.equal(steered, plain)


def _disk_set(count: int, seed: int, texts):
    """Disks visible in the target latents and the hint latents (pooled pixels: the tiny VAE's latents hardly
    differ between disks), as the XLabs check builds its targets."""
    return cz.disk_set(count, seed, texts, lambda images: cz.disk_latents(images, 16))


def test_true_hints_beat_shuffled_hints_on_held_out_disks(flux):  # ~9-12 s on a shared 2-core CPU: unmarked
    """As the XLabs check: the tiny Flux frozen, lr 1e-3; after training, the held-out loss with the true (latent)
    hints is clearly below the one with shuffled hints."""
    flux_instantx = layout()
    texts = cz.caption_texts(flux.model.model, flux.vae, flux.clip, guidance=4.0)
    cz.true_hints_beat_shuffled_hints(flux.model, flux_instantx.create, _disk_set(32, 1, texts),
                                      _disk_set(16, 2, texts), 80, 1e-3, "Flux.1-dev tiny, InstantX layout")


def test_cli_trains_the_instantx_layout_and_continues_from_its_file(tiny_dit, pack, tmp_path, caplog):
    """``controlnet_zero.train.run`` with ``layout = "flux_instantx"`` on the tiny Flux split files: a file the stock
    loader reads whole (latent-hint ControlNetFlux); ``controlnet =`` that file continues in its own layout (no
    ``layout`` given), and a layout of another family is refused before anything is encoded."""
    import comfy.controlnet
    import safetensors.torch

    from frozentune.controlnet_zero import train, training_run

    flux_instantx = layout()
    had = tiny_dits.uninstall_text_encoder_shim()
    tiny_dits.install_text_encoder_shim()
    try:
        data = disks.write_folder(tmp_path / "data", count=2, size=R)
        split = {"diffusion_model": str(tiny_dits.diffusion_model_path("flux1")), "vae": str(tiny_dits.vae_path()),
                 "text_encoders": [str(tiny_dits.text_encoder_path(n)) for n in tiny_dits.RECIPES["flux1"].text_encoders]}
        settings = training_run.TrainSettings(steps=1, batch_size=2, resolution=R, learning_rate=1e-3,
                                              mixed_precision="fp32", gradient_checkpointing=False)
        first = tmp_path / "cn" / "instantx.safetensors"
        opts = {**split, "dataset": str(data), "eval_rows": 0, "flux_guidance": flux_instantx.TRAIN_GUIDANCE}
        with pytest.raises(ValueError, match="layout 'sd3_diffusers' does not fit the MODEL"):
            train.run({**opts, "output": str(tmp_path / "no.safetensors"), "layout": "sd3_diffusers"}, settings)
        train.run({**opts, "output": str(first), "layout": "flux_instantx"}, settings)
        caplog.clear()
        with tiny_dits.flux_controlnet_detection(), caplog.at_level(logging.DEBUG):
            loaded = comfy.controlnet.load_controlnet(str(first))
        assert "missing controlnet keys" not in caplog.text and "unexpected controlnet keys" not in caplog.text
        assert loaded.control_model.latent_input and flux_instantx.owns(loaded.control_model)
        more = tmp_path / "cn" / "more.safetensors"
        train.run({**opts, "output": str(more), "controlnet": str(first)}, settings)
        a, b = safetensors.torch.load_file(str(first)), safetensors.torch.load_file(str(more))
        assert a.keys() == b.keys() and "controlnet_x_embedder.weight" in a
        assert not torch.equal(a["controlnet_x_embedder.weight"], b["controlnet_x_embedder.weight"])
    finally:
        if not had:
            tiny_dits.uninstall_text_encoder_shim()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_controlnet_with_single_blocks_trains_every_block_through_the_in_place_flux_code(flux, checkpointing):
    """An InstantX file may carry single blocks (they load and train on): ComfyUI's blocks add into their streams in
    place, so the training hooks copy the image stream a controlnet block saved before the next block of its kind
    adds into it; every block then gets a gradient, with and without checkpointing, and the loss is the same."""
    import comfy.model_management as mm

    from frozentune.controlnet_zero import flux_diffusers
    from frozentune.controlnet_zero import training_run as trainer

    base = flux.model.model
    mm.load_models_gpu([flux.model], force_full_load=True)
    device = flux.model.load_device
    with torch.inference_mode(False):
        data = _disk_set(4, 3, cz.caption_texts(base, flux.vae, flux.clip, guidance=4.0))
        cfg = flux_diffusers.base_config(base)
        cn = flux_diffusers.build(cfg, 2, single=2)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in cn.parameters():  # nothing zero: every block's gradient must reach it
                p.copy_(torch.randn(p.shape) * 0.05)
        cn = flux_diffusers.trainable_copy(cn, device)
        # spread over the tiny base's 2 + 2 blocks as over Flux.1's 19 + 38 (ComfyUI fixes those counts): each
        # controlnet block then feeds a base block, as at full size
        cn.main_model_double, cn.main_model_single = len(base.diffusion_model.double_blocks), \
            len(base.diffusion_model.single_blocks)
        before = {k: v.clone() for k, v in cn.state_dict().items()}
        # batch 1: a single block's image slice is then a view the controlnet block's Linear saves as is
        settings = trainer.TrainSettings(steps=1, batch_size=1, learning_rate=1e-2, resolution=R,
                                         gradient_checkpointing=checkpointing)
        result = trainer.train(base, cn, data, settings, device)
    assert all(math.isfinite(v) for v in result.losses), result.losses
    after = result.control_model.state_dict()
    for prefix in ("double_blocks.0.", "double_blocks.1.", "single_blocks.0.", "single_blocks.1.",
                   "controlnet_single_blocks.1."):
        changed = [k for k in after if k.startswith(prefix) and not torch.equal(after[k], before[k])]
        assert changed, f"{prefix} got no update"
