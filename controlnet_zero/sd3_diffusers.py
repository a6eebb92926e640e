"""ControlNet-Zero's "sd3_diffusers" layout: an SD3/SD3.5 ControlNet in diffusers' ``SD3ControlNetModel`` layout.

The network is ComfyUI's own ``comfy.cldm.mmdit.ControlNet`` (what the stock loader builds for this
layout, ``comfy/controlnet.py`` ``load_controlnet_mmdit``): the base MMDiT's patch/time/pooled/text
embedders and its first N joint blocks, copied from the base's weights, plus one zero-initialized
``controlnet_blocks`` Linear per block and a zero-initialized ``pos_embed_input`` (the hint's patch
embedding), as diffusers' ``SD3ControlNetModel.__init__`` (``zero_module`` on each controlnet block) and
``from_transformer`` (``zero_module(pos_embed_input)``) do. A created, untrained ControlNet therefore adds
exactly zero to the base's residual stream. N defaults to 12, ``from_transformer``'s ``num_layers``
default, which diffusers' ``examples/controlnet/train_controlnet_sd3.py`` uses (it passes no
``num_layers``); the hint takes 16 latent channels (that script's ``--num_extra_conditioning_channels``
default 0; 17 channels would make ComfyUI treat the file as an inpaint ControlNet).

Why diffusers' layout and not Stability's SD3.5 layout, which the stock loader also reads:

- Stability's layout (``load_controlnet_sd35``, ``comfy.cldm.dit_embedder.ControlNetEmbedder``; Stability's
  SD3.5 Large Blur/Canny/Depth files) has image-only DiT blocks with no text stream, so the base's joint
  blocks cannot be copied into it, and ComfyUI's loader hard-codes 2048 pooled channels, 16 input
  channels and patch size 2 and overwrites the x/y embedders from the base at every run (``pre_run``).
  It is a different architecture trained from scratch, not a ControlNet grown from the base.
- Diffusers' layout is the original ControlNet recipe on an MMDiT (copied blocks, zero-initialized
  outputs), what diffusers' SD3 trainer writes and the InstantX SD3 ControlNets use; ComfyUI builds its
  config from the file itself (any width and depth, SD3 and SD3.5 Medium/Large, MMDiT-X second attention,
  QK-norm). It loads through the stock ``ControlNetLoader`` + ``ControlNetApplyAdvanced`` with a VAE.

ComfyUI's sampling-time conventions for this layout, which training reproduces so the trained file
behaves the same in the stock nodes: the hint is the VAE latent of the hint image scaled by SD3's
latent scale with **no shift** (``latent_format.shift_factor = 0``, "SD3 controlnet weirdness"; diffusers'
pipeline does the same for ``force_zeros_for_pooled_projection`` ControlNets), and the ControlNet sees a
**zero** pooled vector (``comfy.cldm.mmdit.ControlNet.forward`` zeroes ``y``; diffusers' pipeline zeroes
it for the same ControlNets). Its outputs feed ``control["output"]``, added after joint block i.

The file (``file_tensors``) is in diffusers' key names, the inverse of ``comfy.utils.mmdit_to_diffusers``
for the ControlNet's modules, with ``controlnet_blocks.*`` and ``pos_embed_input.*`` under their own
names (the loader reads those two raw). The stock loader consumes every key and misses none, and the
file is key for key and value for value what diffusers' ``SD3ControlNetModel.from_transformer`` makes from the
same base (``tests/node/test_controlnet_zero_sd3.py`` checks both, and equal outputs).

Scaled-fp8 and quantized bases are read through their ops' ``convert_weight``, so the copied blocks hold the
weights the base computes with.
"""

from __future__ import annotations

import logging

import torch

from . import layouts

log = logging.getLogger(__name__)

NAME = "sd3_diffusers"  # this module is the "sd3_diffusers" layout of ``layouts`` (SD3/SD3.5)
# diffusers SD3ControlNetModel.from_transformer(transformer, num_layers=12, ...); train_controlnet_sd3.py passes none.
DEFAULT_DEPTH = 12
# Modules the base MMDiT lacks; both start at exactly zero (diffusers' zero_module).
ZERO_PREFIXES = ("controlnet_blocks.", "pos_embed_input.")
FILE_OWN_NAMES = ZERO_PREFIXES  # loaded under their own names by comfy.controlnet.load_controlnet_mmdit
LATENT_HINTS = True  # hint_input gives VAE latents [B, 16, H/8, W/8] (pixel-hint layouts: uint8 pixels)


# --- configuration -----------------------------------------------------------------------------------

def _diffusion_model(base_model):
    return base_model.diffusion_model


def _is_mmdit(base_model) -> bool:
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit

    return isinstance(_diffusion_model(base_model), mmdit.MMDiT)


def describe(hidden: int | None, blocks: int | None = None) -> str:
    """A readable name for an SD3-family MMDiT width (for messages)."""
    return layouts.describe_width("an SD3/SD3.5 MMDiT", hidden, blocks, head=64)


def base_config(base_model) -> dict:
    """The base MMDiT's ComfyUI ``unet_config`` (what ``comfy.cldm.mmdit.ControlNet`` is built from)."""
    return layouts.unet_config(base_model, _is_mmdit(base_model), NAME, "an SD3/SD3.5 (MMDiT) model")


def block_count(base_model, depth: int | None) -> int:
    """The number of joint blocks the ControlNet copies: ``depth`` (0/None: ``DEFAULT_DEPTH``) checked against the base.

    At most the base's blocks minus one: the base's last joint block is ``pre_only`` (its text stream
    ends there), a different shape from a ControlNet block, which diffusers' ``from_transformer`` cannot
    copy either. 0/None caps the default at that bound (tiny or shallow bases); an explicit value is
    refused outside it.
    """
    blocks = len(_diffusion_model(base_model).joint_blocks)
    most = blocks - 1
    if most < 1:
        raise ValueError(f"this SD3 model has {blocks} joint block(s); a ControlNet copies at least 1 of the "
                         "blocks before the last, so the base needs at least 2.")
    return layouts.chosen_depth(
        depth, DEFAULT_DEPTH, most, f"SD3: the base has {blocks} joint blocks (capped at blocks - 1)",
        f"depth {depth} is out of range for this SD3 model: it has {blocks} joint blocks and a ControlNet copies 1 to "
        f"{most} of them (the last one is the text stream's end and has another shape). diffusers' default is "
        f"{DEFAULT_DEPTH}.")


def depth_of(control_model: torch.nn.Module) -> int:
    """The joint blocks a ControlNet copies (what Create's ``depth`` resolved to; for the metadata)."""
    return len(control_model.joint_blocks)


def _config(config: dict, num_blocks: int) -> dict:
    cfg = {k: v for k, v in config.items() if k not in ("dtype", "device", "operations", "num_blocks", "final_layer")}
    layers = cfg.get("x_block_self_attn_layers") or []
    cfg["x_block_self_attn_layers"] = [i for i in layers if i < num_blocks]  # as the loader detects from the file
    return cfg


def build(config: dict, num_blocks: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
          operations=None) -> torch.nn.Module:
    """An empty ``comfy.cldm.mmdit.ControlNet`` of ``num_blocks`` joint blocks for the base ``config``."""
    import comfy.cldm.mmdit
    import comfy.ops

    return comfy.cldm.mmdit.ControlNet(num_blocks=num_blocks, control_latent_channels=config.get("in_channels", 16),
                                       operations=operations or comfy.ops.disable_weight_init, dtype=dtype,
                                       device=device, **_config(config, num_blocks))


# --- protocol ----------------------------------------------------------------------------------------

def create(base_model, generator: torch.Generator | None = None, *, depth: int = 0) -> torch.nn.Module:
    """A fresh SD3 ControlNet for ``base_model`` (a ``comfy.model_base.BaseModel``): fp32 on the CPU.

    Embedders (``x_embedder``, ``pos_embed``, ``t_embedder``, ``y_embedder``, ``context_embedder``) and joint
    blocks ``0..depth-1`` are the base's weights; ``controlnet_blocks`` and ``pos_embed_input`` are exactly
    zero (diffusers' ``zero_module``). ``depth`` 0: ``DEFAULT_DEPTH``, capped at the base's blocks - 1
    (``block_count``). Nothing is random, so ``generator`` is unused (it is the protocol's).
    """
    del generator
    cfg = base_config(base_model)
    n = block_count(base_model, depth)
    cn = build(cfg, n, "cpu", torch.float32)
    layouts.fill_from_base(cn, _diffusion_model(base_model), ZERO_PREFIXES, "SD3")
    log.info("ControlNet-Zero SD3: created a %d-block ControlNet (width %d) from the base's weights", n, cn.hidden_size)
    return cn.eval().requires_grad_(False)


def owns(control_model) -> bool:
    """Whether ``control_model`` is an MMDiT ControlNet (``unwrap`` says which of them train)."""
    import comfy.cldm.mmdit

    return isinstance(control_model, comfy.cldm.mmdit.ControlNet)


def _refusal(kind: str) -> str:
    hint = (" (Stability's SD3.5 ControlNet layout: a different architecture, not grown from the base; "
            "ControlNet-Zero trains diffusers' SD3 layout)") if kind == "ControlNetEmbedder" else ""
    return (f"this CONTROL_NET is a {kind}{hint}, not an SD3 ControlNet in diffusers' layout. For an SD3/SD3.5 model "
            "use ControlNet-Zero Create or a diffusers-layout SD3 ControlNet file loaded with Load ControlNet Model.")


def unwrap(control_net) -> torch.nn.Module:
    """The ``comfy.cldm.mmdit.ControlNet`` inside a CONTROL_NET, or a clear error for other kinds."""
    module = layouts.control_module(control_net, owns, _refusal)
    layouts.plain_latent_hints(module, module.pos_embed_input.proj.weight.shape[1], "SD3")
    return module


def check_fits(control_model, base_model) -> None:
    """Raise a clear error unless ``control_model`` is the ControlNet ``base_model``'s config builds (any depth)."""
    have = layouts.shapes(control_model)
    n = layouts.controlnet_blocks(have)
    made_for = describe(layouts.width(have, "x_embedder.proj.weight"), n)
    if not _is_mmdit(base_model):
        layouts.wrong_family(made_for, base_model, "SD3/SD3.5")
    cfg = base_config(base_model)
    blocks = len(_diffusion_model(base_model).joint_blocks)
    layouts.check_blocks(n, blocks, blocks - 1, "joint blocks")
    layouts.check_shapes(layouts.shapes(build(cfg, n, "meta")), have, f"it was made for {made_for}",
                         f"{describe(64 * cfg['depth'])} with {blocks} joint blocks")


def wrap(control_model: torch.nn.Module, vae=None):
    """A stock ``comfy.controlnet.ControlNet`` around ``control_model``, as ``load_controlnet_mmdit`` makes it.

    Latent hints (the stock Apply node's VAE encodes them at sampling time), ``compression_ratio`` 1, SD3's
    latent format with shift 0, no inpaint mask. ``vae`` is not stored: the Apply node gives it.
    """
    del vae
    return layouts.latent_control_net(layouts.checked(unwrap, control_model), hint_latent_format())


def hint_latent_format():
    """SD3's latent format with ``shift_factor`` 0: how ComfyUI scales this layout's hint latents."""
    import comfy.latent_formats

    latent_format = comfy.latent_formats.SD3()
    latent_format.shift_factor = 0  # as comfy.controlnet.load_controlnet_mmdit ("SD3 controlnet weirdness")
    return latent_format


def _diffusers_map(depth: int, num_blocks: int) -> dict:
    """diffusers key -> comfy key, or (comfy key, (dim, start, size) | None, fn) (``comfy.utils.mmdit_to_diffusers``)."""
    import comfy.utils

    return comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": num_blocks}, output_prefix="")


def file_tensors(control_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The ControlNet's weights in diffusers' names, on the CPU in ``dtype``: what the stock ControlNetLoader reads.

    Fused ``qkv`` weights are split into ``to_q``/``to_k``/``to_v`` (and ``add_*_proj`` for the text stream);
    ``controlnet_blocks.*`` and ``pos_embed_input.*`` keep their names. Every module weight is written once.
    """
    module = layouts.checked(unwrap, control_model)
    return layouts.diffusers_file(module, _diffusers_map(module.depth, len(module.joint_blocks)), FILE_OWN_NAMES,
                                  "SD3", dtype)


def to_diffusers(sd: dict[str, torch.Tensor], depth: int, num_blocks: int) -> tuple[dict[str, torch.Tensor], set[str]]:
    """ComfyUI MMDiT tensors -> diffusers' SD3 names (the inverse of ``comfy.utils.mmdit_to_diffusers``), and
    the ComfyUI names used. ``depth``: the MMDiT's width / 64 (its block count in a full model). Weights ``sd``
    lacks (the final layer, a ControlNet's missing pre-only last block) are skipped; ``swap_scale_shift`` is its own
    inverse."""
    return layouts.invert_key_map(sd, _diffusers_map(depth, num_blocks))


def module_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-layout SD3 ControlNet file's tensors in ComfyUI module names (as the stock loader converts them)."""
    if "transformer_blocks.0.adaLN_modulation.1.bias" in tensors:
        raise ValueError("not a diffusers-layout SD3 ControlNet but one in Stability's SD3.5 layout (another "
                         "architecture); ControlNet-Zero continues only diffusers-layout SD3 ControlNets.")
    if "transformer_blocks.0.attn.add_q_proj.weight" not in tensors or "pos_embed_input.proj.weight" not in tensors:
        raise ValueError("not an SD3 ControlNet in diffusers' layout (no transformer_blocks.0.attn.add_q_proj or "
                         "pos_embed_input weights).")
    return layouts.from_diffusers(tensors, FILE_OWN_NAMES)


def load(tensors: dict[str, torch.Tensor], base_model) -> torch.nn.Module:
    """The fp32 CPU ControlNet for ``base_model`` holding a diffusers-layout file's weights (resume / CLI)."""
    sd = {k: v.float() for k, v in module_tensors(tensors).items()}
    return layouts.load_strict(sd, base_model, check_fits,
                               lambda sd: build(base_config(base_model), layouts.controlnet_blocks(sd)))


def hint_input(hint_pixels: torch.Tensor, vae) -> torch.Tensor:
    """The ControlNet's hint for ``hint_pixels`` ([B, H, W, 3], IMAGE layout, uint8 or float in [0, 1]).

    As ``comfy.controlnet.ControlNet.get_control`` does for this layout: the VAE's latent, then SD3's
    latent scale with no shift. [B, 16, H/8, W/8] float32 on the CPU. The pixels are at the training
    resolution already (sampling resizes the hint to the latent's size x 8 first; here they match).
    """
    return layouts.latent_hints(hint_pixels, vae, hint_latent_format())


def control(control_model, x_in: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, conds: dict,
            compute: torch.dtype) -> dict:
    """The base MMDiT's ``control`` argument: the ControlNet run as ``get_control`` runs it, outputs in ``compute``.

    ``x_in`` is ``model_sampling.calculate_input(sigma, x_t)``, ``timesteps`` ``model_sampling.timestep(sigma)``,
    ``conds`` holds ``c_crossattn`` and ``y`` (the module zeroes ``y`` itself, as at sampling time). The
    lists are fresh: the MMDiT adds ``control["output"][i]`` after joint block i.
    """
    context, y = conds["c_crossattn"], conds.get("y")
    if y is None:
        raise ValueError("SD3 conditioning without a pooled vector (y): encode the prompts with the SD3 text encoders.")
    outputs = control_model(x=x_in, hint=hint.to(device=x_in.device, dtype=x_in.dtype), timesteps=timesteps,
                            context=context, y=y)
    return {"input": [], "middle": [], "output": [o.to(compute) for o in outputs["output"]]}


trainable_copy = layouts.trainable_copy
