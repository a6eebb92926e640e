"""ControlNet-Zero's "qwen_instantx" layout: a Qwen-Image ControlNet in InstantX's layout (diffusers' names).

The network is ComfyUI's own ``comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel`` (what the stock
loader builds for this layout, ``comfy/controlnet.py`` ``load_controlnet_qwen_instantx``): the base's
``img_in``, ``txt_norm``, ``txt_in``, ``time_text_embed`` and its first N ``transformer_blocks``, copied from
the base's weights, plus one zero-initialized ``controlnet_blocks`` Linear per block and a zero-initialized
``controlnet_x_embedder`` (the hint latent's patch embedding, added to ``img_in``'s output), as diffusers'
``QwenImageControlNetModel.__init__`` (``zero_module`` on each controlnet block) and ``from_transformer``
(``zero_module(controlnet_x_embedder)``) do. A created, untrained ControlNet therefore adds exactly zero to
the base's image stream. N defaults to 5, ``from_transformer``'s ``num_layers`` default (diffusers
``models/controlnets/controlnet_qwenimage.py``), the depth of InstantX's Qwen-Image-ControlNet-Union.

One difference from ``from_transformer``: it leaves ``txt_norm`` at its initial ones (it copies only
``img_in``, ``txt_in``, ``time_text_embed`` and the blocks); here the base's ``txt_norm`` is copied too, so
the copied blocks see the text exactly as they do in the base. At zero init this changes nothing (the
outputs are zero either way).

ComfyUI's sampling-time conventions, which training reproduces: the hint is the VAE latent of the hint
image (Qwen-Image's Wan-2.1 VAE: ``[B, 16, 1, h, w]``) through ``latent_formats.Wan21().process_in``, each
image encoded on its own (the video VAE would read a batch as frames); the ControlNet gets no extra conds
(``extra_conds=[]``: no attention mask, no guidance). Its ``forward`` returns ``{"input": ...}`` of 60
entries (``main_model_double``, hard-coded), block j's output repeated ``ceil(60 / N)`` times; the base adds
entry i after its block i (``comfy/ldm/qwen_image/model.py``), so a 60-block base's block i gets ControlNet
block ``i // ceil(60 / N)``, and a shallower base reads the first entries.

The file (``file_tensors``) is the module's state dict: the stock loader reads those names as they are
(InstantX's files use the same names), every key used and none missing. ComfyUI's Qwen-Image detection reads
only the block count and ``in_channels`` from a file and fixes the widths (24 heads of 128, joint width 3584):
a file made from a real Qwen-Image loads as it is (narrower test models need the tests' detection wrapper).
The hint embedding takes 64 channels (16 latent channels x 2 x 2), not 68 (InstantX's inpaint ControlNet:
latent + mask).
"""

from __future__ import annotations

import logging

import torch

from . import layouts

log = logging.getLogger(__name__)

NAME = "qwen_instantx"  # this module is the "qwen_instantx" layout of ``layouts`` (Qwen-Image)
# diffusers QwenImageControlNetModel.from_transformer(transformer, num_layers=5, ...) (InstantX Union: 5 layers).
DEFAULT_DEPTH = 5
# Modules the base lacks; both start at exactly zero (diffusers' zero_module).
ZERO_PREFIXES = ("controlnet_blocks.", "controlnet_x_embedder.")
LATENT_HINTS = True  # hint_input gives Wan-2.1 latents [B, 16, 1, H/8, W/8]
# The last block's text stream after its attention (txt MLP) feeds nothing (the ControlNet returns image states).
UNUSED_PARAMETERS = True
_BUILD_SKIP = ("dtype", "device", "operations", "num_layers", "final_layer", "image_model")


# --- configuration -----------------------------------------------------------------------------------

def _diffusion_model(base_model):
    return base_model.diffusion_model


def _is_qwen(base_model) -> bool:
    import comfy.ldm.qwen_image.controlnet as qcn
    import comfy.ldm.qwen_image.model as qwen

    module = getattr(base_model, "diffusion_model", None)
    return isinstance(module, qwen.QwenImageTransformer2DModel) and not isinstance(module, qcn.QwenImageControlNetModel)


def describe(width: int | None, blocks: int | None = None) -> str:
    """A readable name for a Qwen-Image transformer width (for messages)."""
    return layouts.describe_width("a Qwen-Image transformer", width, blocks)


def base_config(base_model) -> dict:
    """The base's ComfyUI ``unet_config`` (what ``QwenImageControlNetModel`` is built from)."""
    return layouts.unet_config(base_model, _is_qwen(base_model), NAME, "a Qwen-Image model")


def block_count(base_model, depth: int | None) -> int:
    """The blocks the ControlNet copies: ``depth`` (0/None: ``DEFAULT_DEPTH``, capped at the base's blocks)."""
    blocks = len(_diffusion_model(base_model).transformer_blocks)
    return layouts.chosen_depth(
        depth, DEFAULT_DEPTH, blocks, f"Qwen-Image: the base has {blocks} blocks",
        f"depth {depth} is out of range for this Qwen-Image model: it has {blocks} transformer blocks and a ControlNet "
        f"copies 1 to {blocks} of them. diffusers' default is {DEFAULT_DEPTH}.")


def depth_of(control_model: torch.nn.Module) -> int:
    """The transformer blocks a ControlNet copies (what Create's ``depth`` resolved to; for the metadata)."""
    return len(control_model.transformer_blocks)


def build(config: dict, num_blocks: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
          operations=None) -> torch.nn.Module:
    """An empty ``QwenImageControlNetModel`` of ``num_blocks`` blocks for the base ``config`` (plain 64-ch hints)."""
    import comfy.ldm.qwen_image.controlnet as qcn
    import comfy.ops

    cfg = {k: v for k, v in config.items() if k not in _BUILD_SKIP}
    return qcn.QwenImageControlNetModel(extra_condition_channels=0, num_layers=num_blocks,
                                        operations=operations or comfy.ops.disable_weight_init, dtype=dtype,
                                        device=device, **cfg)


# --- protocol ----------------------------------------------------------------------------------------

def create(base_model, generator: torch.Generator | None = None, *, depth: int = 0) -> torch.nn.Module:
    """A fresh Qwen-Image ControlNet for ``base_model`` (a ``comfy.model_base.BaseModel``): fp32 on the CPU.

    Embedders and blocks ``0..depth-1`` are the base's weights; ``controlnet_blocks`` and
    ``controlnet_x_embedder`` are exactly zero. Nothing is random, so ``generator`` is unused.
    """
    del generator
    cfg = base_config(base_model)
    n = block_count(base_model, depth)
    cn = build(cfg, n, "cpu", torch.float32)
    layouts.fill_from_base(cn, _diffusion_model(base_model), ZERO_PREFIXES, "Qwen-Image")
    log.info("ControlNet-Zero Qwen-Image: created a %d-block ControlNet (width %d) from the base's weights", n,
             cn.inner_dim)
    return cn.eval().requires_grad_(False)


def owns(control_model) -> bool:
    """Whether ``control_model`` is a Qwen-Image ControlNet (``unwrap`` says which of them train)."""
    import comfy.ldm.qwen_image.controlnet as qcn

    return isinstance(control_model, qcn.QwenImageControlNetModel)


def unwrap(control_net) -> torch.nn.Module:
    """The ``QwenImageControlNetModel`` inside a CONTROL_NET, or a clear error for other kinds."""
    module = layouts.control_module(control_net, owns, lambda kind: (
        f"this CONTROL_NET is a {kind}, not a Qwen-Image ControlNet in InstantX's layout. For a Qwen-Image model use "
        "ControlNet-Zero Create or an InstantX-layout Qwen-Image ControlNet file loaded with Load ControlNet Model."))
    layouts.plain_latent_hints(module, module.controlnet_x_embedder.weight.shape[1], "Qwen-Image")
    return module


def check_fits(control_model, base_model) -> None:
    """Raise a clear error unless ``control_model`` is the ControlNet ``base_model``'s config builds (any depth)."""
    have = layouts.shapes(control_model)
    n = layouts.controlnet_blocks(have)
    made_for = describe(layouts.width(have, "img_in.weight"), n)
    if not _is_qwen(base_model):
        layouts.wrong_family(made_for, base_model, "Qwen-Image")
    cfg = base_config(base_model)
    blocks = len(_diffusion_model(base_model).transformer_blocks)
    layouts.check_blocks(n, blocks, blocks, "transformer blocks")
    layouts.check_shapes(layouts.shapes(build(cfg, n, "meta")), have, f"it was made for {made_for}",
                         f"{describe(_diffusion_model(base_model).inner_dim)} with {blocks} blocks")


def hint_latent_format():
    """The Wan-2.1 latent format: how ComfyUI scales this layout's hint latents (``load_controlnet_qwen_instantx``)."""
    import comfy.latent_formats

    return comfy.latent_formats.Wan21()


def wrap(control_model: torch.nn.Module, vae=None):
    """A stock ``comfy.controlnet.ControlNet`` around ``control_model``, as ``load_controlnet_qwen_instantx`` makes it.

    Latent hints (the stock Apply node's VAE encodes them), ``compression_ratio`` 1, the Wan-2.1 latent
    format, no inpaint mask, no extra conds. ``vae`` is not stored: the Apply node gives it.
    """
    del vae
    return layouts.latent_control_net(layouts.checked(unwrap, control_model), hint_latent_format(), extra_conds=[])


def file_tensors(control_model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under the names the stock ControlNetLoader reads (its own state-dict names)."""
    module = layouts.checked(unwrap, control_model)
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}


def module_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An InstantX-layout file's tensors under the module's names (the same names; checked)."""
    if "transformer_blocks.0.img_mlp.net.0.proj.weight" not in tensors or "controlnet_x_embedder.weight" not in tensors:
        raise ValueError("not a Qwen-Image ControlNet in InstantX's layout (no transformer_blocks.0.img_mlp or "
                         "controlnet_x_embedder weights).")
    return dict(tensors)


def load(tensors: dict[str, torch.Tensor], base_model) -> torch.nn.Module:
    """The fp32 CPU ControlNet for ``base_model`` holding an InstantX-layout file's weights (resume / CLI)."""
    sd = {k: v.float() for k, v in module_tensors(tensors).items()}
    return layouts.load_strict(sd, base_model, check_fits,
                               lambda sd: build(base_config(base_model), layouts.controlnet_blocks(sd)))


def hint_input(hint_pixels: torch.Tensor, vae) -> torch.Tensor:
    """The ControlNet's hint for ``hint_pixels`` ([B, H, W, 3], IMAGE layout, uint8 or float in [0, 1]).

    As ``comfy.controlnet.ControlNet.get_control`` does for this layout: each image's VAE latent (one at a
    time: Wan-2.1's video VAE would encode a batch as the frames of one video), then ``Wan21().process_in``.
    [B, 16, 1, H/8, W/8] float32 on the CPU.
    """
    return layouts.latent_hints(hint_pixels, vae, hint_latent_format(), one_at_a_time=True)


def control(control_model, x_in: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, conds: dict,
            compute: torch.dtype) -> dict:
    """The base's ``control`` argument: the ControlNet run as ``get_control`` runs it (no extra conds), in ``compute``.

    The base adds ``control["input"][i]`` after its block i; the list is fresh (the same tensor repeats, as
    the module returns it).
    """
    outputs = control_model(x=x_in, hint=hint.to(device=x_in.device, dtype=x_in.dtype), timesteps=timesteps,
                            context=conds["c_crossattn"])
    return {"input": [o.to(compute) for o in outputs["input"]], "middle": [], "output": []}


trainable_copy = layouts.trainable_copy
