"""ControlNet-Zero's "flux_instantx" layout: a Flux.1 ControlNet in InstantX's / diffusers' ``FluxControlNetModel`` layout.

The network is ComfyUI's own ``comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, ...)``, what the stock
loader builds for this layout (``comfy/controlnet.py`` ``load_controlnet_flux_instantx``): the base's embedders
(``img_in``, ``time_in``, ``vector_in``, ``guidance_in``, ``txt_in``) and its first N double blocks copied from
the base's weights, no single blocks, one zero-initialized ``controlnet_blocks`` Linear per block and a
zero-initialized ``pos_embed_input`` (diffusers' ``controlnet_x_embedder``: the hint latent's patch embedding,
added to ``img_in``'s output), as diffusers' ``FluxControlNetModel.__init__`` (``zero_module`` on each controlnet
block) and ``from_transformer`` (``zero_module(controlnet_x_embedder)``) do. A created, untrained ControlNet adds
exactly zero to the base's image stream. Next to the "flux_xlabs" layout (pixel hints through eight
full-resolution 3x3 convolutions) this one takes the hint as a VAE latent through one Linear, the format of the
InstantX and Shakker-Labs Union Flux ControlNets, and what diffusers' ``train_controlnet_flux.py`` trains.

Depth: N defaults to 4, ``--num_double_layers``' default in diffusers' ``examples/controlnet/
train_controlnet_flux.py`` (and ``FluxControlNetModel.from_transformer``'s ``num_layers`` default). That script's
``--num_single_layers`` default is 4 (``from_transformer``'s 10); ControlNet-Zero creates none, as the
Shakker-Labs Union-Pro 2.0 Flux ControlNet (6 double, 0 single blocks), keeping the module to copied double
blocks; files with single blocks (InstantX's) load and train on as they are. Training guidance: diffusers'
script feeds ``--guidance_scale`` (default 3.5, ``TRAIN_GUIDANCE``) to the ControlNet and the base; the Train
node's ``flux_guidance`` chooses it (its default, 4, is x-flux's).

ComfyUI's sampling-time conventions, which training reproduces: the hint is the VAE latent of the hint image
through ``latent_formats.Flux().process_in`` (``(z - 0.1159) * 0.3611``, as diffusers' script scales
``control_latents`` with the VAE's shift and scale), the ControlNet gets the ``y`` and ``guidance`` conds, and its
N outputs are repeated ``ceil(19 / N)`` times each over the base's 19 double blocks (``ControlNetFlux.forward_orig``
with ``latent_input``: block i gets output ``i // ceil(19 / N)``, as diffusers' ``FluxTransformer2DModel``
``interval_control``).

The file (``file_tensors``) is diffusers' names: the inverse of ``comfy.utils.flux_to_diffusers`` (fused ``qkv``
split into ``to_q``/``to_k``/``to_v`` and ``add_*_proj``; ``pos_embed_input`` -> ``controlnet_x_embedder``), with
``controlnet_blocks.*`` under their own names; the stock loader converts it back with
``comfy.model_detection.convert_diffusers_mmdit``, every key used, none missing. It is key for key and value for
value what ``FluxControlNetModel.from_transformer(num_layers=N, num_single_layers=0)`` makes from the same base
(``tests/node/test_controlnet_zero_flux_instantx.py``).
"""

from __future__ import annotations

import logging

import torch

from .. import families
from . import flux_xlabs, layouts

log = logging.getLogger(__name__)

# this module is the "flux_instantx" layout of ``layouts`` (Flux.1, a choice next to XLabs'); the module is named
# after diffusers' FluxControlNetModel, as sd3_diffusers (instantstyle.flux_instantx is another module)
NAME = "flux_instantx"
DEFAULT_DEPTH = 4  # diffusers train_controlnet_flux.py --num_double_layers default (from_transformer num_layers=4)
TRAIN_GUIDANCE = 3.5  # diffusers train_controlnet_flux.py --guidance_scale default
# Modules the base lacks; both start at exactly zero (diffusers' zero_module).
ZERO_PREFIXES = ("controlnet_blocks.", "controlnet_single_blocks.", "pos_embed_input.")
FILE_OWN_NAMES = ("controlnet_blocks.", "controlnet_single_blocks.")  # loaded raw by load_controlnet_flux_instantx
LATENT_HINTS = True  # hint_input gives Flux VAE latents [B, 16, H/8, W/8]
# The last double block's text stream feeds nothing (only its img output reaches a controlnet_block).
UNUSED_PARAMETERS = True

# The same ComfyUI Flux blocks as the XLabs layout: the same autograd hooks around its in-place code.
training = flux_xlabs.training
base_config = flux_xlabs.base_config
trainable_copy = layouts.trainable_copy


def build(config: dict, depth: int, single: int = 0, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """An empty ``ControlNetFlux(latent_input=True)`` as ``load_controlnet_flux_instantx`` builds it (plain latent hints)."""
    return flux_xlabs.build(config, depth, single, device, dtype, latent_input=True,
                            control_latent_channels=config["in_channels"])


def block_count(base_model, depth: int | None) -> int:
    """The double blocks the ControlNet copies: ``depth`` (0/None: ``DEFAULT_DEPTH``, capped at the base's blocks)."""
    blocks = int(base_config(base_model)["depth"])
    return layouts.chosen_depth(
        depth, DEFAULT_DEPTH, blocks, f"Flux (InstantX layout): the base has {blocks} double blocks",
        f"depth={depth}: a Flux ControlNet copies 1 to {blocks} of the MODEL's {blocks} double blocks (diffusers' "
        f"train_controlnet_flux.py default: {DEFAULT_DEPTH}).")


def create(base_model, generator: torch.Generator | None = None, *, depth: int = 0) -> torch.nn.Module:
    """A fresh InstantX-layout ControlNet from the base's embedders and first ``depth`` double blocks (fp32, CPU).

    ``controlnet_blocks`` and ``pos_embed_input`` are exactly zero; nothing is random, so ``generator`` is unused.
    """
    del generator
    cfg = base_config(base_model)
    n = block_count(base_model, depth)
    cn = build(cfg, n)
    layouts.fill_from_base(cn, base_model.diffusion_model, ZERO_PREFIXES, "Flux.1")
    log.info("ControlNet-Zero Flux (InstantX layout): created a %d-block ControlNet (width %d) from the base's weights",
             n, cn.hidden_size)
    return cn.eval().requires_grad_(False)


def depth_of(control_model: torch.nn.Module) -> int:
    """The double blocks a ControlNet copies (what Create's ``depth`` resolved to; for the metadata)."""
    return len(control_model.double_blocks)


def owns(control_model) -> bool:
    """Whether ``control_model`` is a latent-hint (InstantX/diffusers) Flux ControlNet."""
    import comfy.ldm.flux.controlnet

    return isinstance(control_model, comfy.ldm.flux.controlnet.ControlNetFlux) and bool(control_model.latent_input)


def unwrap(control_net) -> torch.nn.Module:
    """The ``ControlNetFlux`` inside a CONTROL_NET, or a clear error for the kinds this layout does not train."""
    module = layouts.control_module(control_net, owns, lambda kind: (
        f"this CONTROL_NET is a {kind}, not a Flux ControlNet in InstantX's / diffusers' layout (latent hints). Start "
        "one with ControlNet-Zero Create (layout flux_instantx), or load an InstantX-layout Flux ControlNet file with "
        "Load ControlNet Model."))
    if module.controlnet_mode_embedder is not None:
        raise ValueError("this CONTROL_NET is a Union Flux ControlNet (control modes); ControlNet-Zero trains plain "
                         "ControlNets only.")
    layouts.plain_latent_hints(module, module.pos_embed_input.weight.shape[1], "Flux")
    return module


def _counts(names) -> tuple[int, int]:
    """(controlnet blocks, controlnet single blocks) among module state-dict ``names``."""
    import comfy.model_detection

    shapes = {k: None for k in names}
    return (comfy.model_detection.count_blocks(shapes, "controlnet_blocks.{}."),
            comfy.model_detection.count_blocks(shapes, "controlnet_single_blocks.{}."))


def check_fits(control_model, base_model) -> None:
    """Raise a clear error unless ``control_model`` is an InstantX ControlNet the base Flux's configuration builds."""
    have = layouts.shapes(control_model)
    width = have.get("img_in.weight", ("?",))[0]
    family = families.family_of(base_model)
    if family.id not in flux_xlabs.FAMILY_IDS:
        layouts.wrong_family(f"a Flux.1 model (InstantX layout, width {width})", base_model, "Flux.1")
    cfg = base_config(base_model)
    depth, single = _counts(have)
    blocks = int(cfg["depth"])
    layouts.check_blocks(depth, blocks, blocks, "double blocks")
    layouts.check_shapes(layouts.shapes(build(cfg, depth, single, "meta")), have,
                         f"it is an InstantX-layout Flux ControlNet of width {width}",
                         f"{family.label} of width {cfg['hidden_size']}")


def hint_latent_format():
    """Flux's latent format: how ``load_controlnet_flux_instantx`` scales this layout's hint latents."""
    import comfy.latent_formats

    return comfy.latent_formats.Flux()


def wrap(control_model: torch.nn.Module, vae=None):
    """The stock CONTROL_NET as ``load_controlnet_flux_instantx`` makes it: latent hints (Flux's latent format,
    ``compression_ratio`` 1, no inpaint mask), extra conds ``y`` and ``guidance``. ``vae`` is not stored: the
    Apply node gives it."""
    del vae
    return layouts.latent_control_net(layouts.checked(unwrap, control_model), hint_latent_format(),
                                      extra_conds=["y", "guidance"])


def _key_map(module: torch.nn.Module) -> dict:
    """diffusers key -> ComfyUI key or (key, (dim, start, size) | None[, fn]) (``comfy.utils.flux_to_diffusers``)."""
    import comfy.utils

    return comfy.utils.flux_to_diffusers({"depth": len(module.double_blocks),
                                          "depth_single_blocks": len(module.single_blocks),
                                          "hidden_size": module.hidden_size}, output_prefix="")


def file_tensors(control_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The ControlNet's weights in diffusers' ``FluxControlNetModel`` names, on the CPU in ``dtype``.

    Every module weight is written once; ``controlnet_blocks.*`` keep their names (the loader reads them raw).
    """
    module = layouts.checked(unwrap, control_model)
    return layouts.diffusers_file(module, _key_map(module), FILE_OWN_NAMES, "Flux", dtype)


def module_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An InstantX-layout Flux ControlNet file's tensors under ComfyUI's module names (as the stock loader converts)."""
    if "controlnet_x_embedder.weight" not in tensors or "x_embedder.weight" not in tensors \
            or "transformer_blocks.0.attn.to_q.weight" not in tensors:
        raise ValueError("not a Flux ControlNet in InstantX's / diffusers' layout (it needs controlnet_x_embedder, "
                         "x_embedder and transformer_blocks.0.attn.to_q weights).")
    if "transformer_blocks.0.img_mlp.net.0.proj.weight" in tensors:
        raise ValueError("not a Flux ControlNet in InstantX's layout but a Qwen-Image one.")
    return layouts.from_diffusers(tensors, FILE_OWN_NAMES)


def load(tensors: dict[str, torch.Tensor], base_model) -> torch.nn.Module:
    """The fp32 CPU ControlNet for ``base_model`` holding an InstantX-layout file's weights (resume / CLI)."""
    sd = {k: v.float() for k, v in module_tensors(tensors).items()}
    if "controlnet_mode_embedder.weight" in sd:
        raise ValueError("not a plain Flux ControlNet but a Union one (control modes); ControlNet-Zero trains plain "
                         "ControlNets only.")
    return layouts.load_strict(sd, base_model, check_fits, lambda sd: build(base_config(base_model), *_counts(sd)))


def hint_input(hint_pixels: torch.Tensor, vae) -> torch.Tensor:
    """The ControlNet's hint for ``hint_pixels`` ([B, H, W, 3], IMAGE layout, uint8 or float in [0, 1]).

    As ``comfy.controlnet.ControlNet.get_control`` does for this layout: the VAE's latent, then
    ``Flux().process_in``. [B, 16, H/8, W/8] float32 on the CPU.
    """
    return layouts.latent_hints(hint_pixels, vae, hint_latent_format())


def control(control_model, x_in: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, conds: dict,
            compute: torch.dtype) -> dict:
    """The base Flux's ``control`` dict as ``get_control`` builds it: ``input`` = the 19 double-block residuals
    (``output`` = the 38 single-block ones for a file with single blocks), fresh lists in ``compute``."""
    outputs = control_model(x=x_in, hint=hint.to(device=x_in.device, dtype=x_in.dtype), timesteps=timesteps,
                            context=conds["c_crossattn"], y=conds.get("y"), guidance=conds.get("guidance"))
    return {"input": [c.to(compute) for c in outputs["input"]], "middle": [],
            "output": [c.to(compute) for c in outputs.get("output", ())]}
