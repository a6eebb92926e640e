"""Build a zero-initialized ControlNet from a base UNet, check a ControlNet fits a base, wrap it for sampling.

The module is ComfyUI's ``comfy.cldm.cldm.ControlNet`` built from the base model's own detected
UNet configuration, so its ``state_dict()`` is ComfyUI's ldm ControlNet layout (``input_blocks.*``,
``zero_convs.N.0.*``, ``input_hint_block.*``, ``middle_block_out.0.*``, ``label_emb.*`` for SDXL)
and the stock ControlNetLoader detects the same configuration back from the keys.
"""

from __future__ import annotations

import logging

import torch

from .. import families
from . import layouts

log = logging.getLogger(__name__)

NAME = "ldm"  # this module is the "ldm" layout of ``layouts`` (SD1.x / SDXL)
DEFAULT_DEPTH = 0  # a UNet ControlNet copies the whole encoder and middle block: no depth to choose
HINT_CHANNELS = 3  # ComfyUI IMAGE tensors are RGB
# Module prefixes that do not exist in the base UNet. zero_convs / middle_block_out start at exactly
# zero (so a fresh ControlNet changes nothing); so does the last hint conv, as in the original code.
NEW_PREFIXES = ("input_hint_block.", "zero_convs.", "middle_block_out.")
ZERO_PREFIXES = ("zero_convs.", "middle_block_out.")
LAST_HINT_CONV = 14


def controlnet_config(base_model) -> dict:
    """The ``cldm.ControlNet`` constructor arguments for a base ``comfy.model_base.BaseModel``."""
    cfg = dict(base_model.model_config.unet_config)
    cfg.pop("out_channels", None)
    if not cfg.get("use_spatial_transformer", False) or cfg.get("context_dim") is None:
        raise ValueError(f"{type(base_model.model_config).__name__} models have no cross-attention UNet that a "
                         "ControlNet can copy: use an SD1.5 or SDXL-family checkpoint.")
    return cfg


def family_name(config: dict) -> str:
    """A readable name for a UNet configuration (for error messages)."""
    return families.describe_unet(config.get("context_dim"), config.get("adm_in_channels"))


def build(config: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """An empty (uninitialized) ``cldm.ControlNet`` for ``config``."""
    import comfy.cldm.cldm
    import comfy.ops

    cfg = dict(config)
    cfg.update(hint_channels=HINT_CHANNELS, operations=comfy.ops.disable_weight_init, dtype=dtype, device=device)
    return comfy.cldm.cldm.ControlNet(**cfg)


def create(base_model, generator: torch.Generator | None = None, *, depth: int = 0) -> torch.nn.Module:
    """A fresh ControlNet for ``base_model``: encoder + middle block copied, new parts initialized.

    ``zero_convs``, ``middle_block_out`` and the last hint conv are exactly zero; the other hint
    convs get PyTorch's default conv init (Kaiming-uniform), as in the reference code.
    Weights are fp32 on the CPU (training keeps fp32 master weights). ``depth`` must be 0: a UNet
    ControlNet always copies the whole encoder.
    """
    if depth:
        raise ValueError(f"depth={depth} applies to Flux.1 and SD3 ControlNets (how many transformer blocks they "
                         "copy); an SD1.5/SDXL ControlNet always copies the whole UNet encoder: set depth to 0.")
    cfg = controlnet_config(base_model)
    base_sd = base_model.diffusion_model.state_dict()
    cn = build(cfg, "cpu", torch.float32)
    sd = cn.state_dict()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = {}
    for name, ref in sd.items():
        if name in base_sd:
            if tuple(base_sd[name].shape) != tuple(ref.shape):
                raise RuntimeError(f"UNet weight {name} has shape {tuple(base_sd[name].shape)} but the ControlNet "
                                   f"built from the same config wants {tuple(ref.shape)}")
            out[name] = base_sd[name].detach().to("cpu", torch.float32).clone()
        elif name.startswith(ZERO_PREFIXES) or name.startswith(f"input_hint_block.{LAST_HINT_CONV}."):
            out[name] = torch.zeros(ref.shape)
        else:
            # the other hint convs; also a middle block the base lacks (only tiny test UNets have none)
            out[name] = _default_init(cn, name, sd, gen)
    cn.load_state_dict(out, strict=True)
    return cn


def _default_init(cn: torch.nn.Module, name: str, sd: dict, gen: torch.Generator) -> torch.Tensor:
    """PyTorch's default init for one tensor: norms 1/0, conv/linear U(+-1/sqrt(fan_in)) (kaiming_uniform(a=sqrt(5)))."""
    module_name, _, leaf = name.rpartition(".")
    module = cn.get_submodule(module_name)
    shape = tuple(sd[name].shape)
    if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
        return torch.ones(shape) if leaf == "weight" else torch.zeros(shape)
    fan_in = sd[f"{module_name}.weight"].shape[1:].numel()
    return (torch.rand(shape, generator=gen) * 2 - 1) * fan_in ** -0.5


def check_fits(control_model: torch.nn.Module, base_model) -> None:
    """Raise a clear error if ``control_model`` is not the ControlNet ``base_model``'s configuration builds.

    Compares every key and shape with a ControlNet built (on the meta device) from the base's config.
    """
    cn_sd = control_model.state_dict()
    cfg = controlnet_config(base_model)
    cn_family = family_name({"context_dim": _context_dim(cn_sd), "adm_in_channels": _adm_channels(cn_sd)})
    layouts.check_shapes(layouts.shapes(build(cfg, "meta")), layouts.shapes(cn_sd), f"it was made for {cn_family}",
                         family_name(cfg))


def _context_dim(sd: dict) -> int | None:
    for k, v in sd.items():
        if k.endswith("attn2.to_k.weight"):
            return int(v.shape[1])
    return None


def _adm_channels(sd: dict) -> int | None:
    w = sd.get("label_emb.0.0.weight")
    return int(w.shape[1]) if w is not None else None


trainable_copy = layouts.trainable_copy


def wrap(control_model: torch.nn.Module, vae=None):
    """A ``comfy.controlnet.ControlNet`` (the stock CONTROL_NET type) around ``control_model``.

    ``vae`` is not used: ldm ControlNets take pixel hints.
    """
    return layouts.stock_control_net(control_model)


def unwrap(control_net) -> torch.nn.Module:
    """The ``cldm.ControlNet`` module inside a CONTROL_NET, or a clear error for other kinds."""
    module = layouts.control_module(control_net, owns, lambda kind: (
        f"this CONTROL_NET is a {kind}, not a UNet ControlNet (ControlNet-Zero trains only ldm-layout ControlNets for "
        "SD1.5/SDXL, e.g. from ControlNet-Zero Create or a ControlNet file loaded with Load ControlNet Model)."))
    if getattr(module, "control_add_embedding", None) is not None:
        raise ValueError("this CONTROL_NET is a Union ControlNet; ControlNet-Zero trains plain ControlNets only.")
    hint = module.input_hint_block[0].weight.shape[1] if module.input_hint_block is not None else None
    if hint != HINT_CHANNELS:
        raise ValueError(f"this ControlNet takes {hint}-channel hints; ControlNet-Zero trains RGB (3-channel) "
                         "hint ControlNets only.")
    return module


def owns(control_model) -> bool:
    """Whether ``control_model`` is a UNet ControlNet (``unwrap`` says which kinds of them train)."""
    import comfy.cldm.cldm

    return isinstance(control_model, comfy.cldm.cldm.ControlNet)


def file_tensors(control_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own state dict: ComfyUI's ldm ControlNet layout, which the stock loader reads as is."""
    return dict(control_model.state_dict())


def load(tensors: dict[str, torch.Tensor], base_model) -> torch.nn.Module:
    """An fp32 CPU ControlNet for ``base_model`` from an ldm-layout file's tensors (bare or ``control_model.``)."""
    if "zero_convs.0.0.weight" not in tensors:
        prefixed = {k[len("control_model."):]: v for k, v in tensors.items() if k.startswith("control_model.")}
        if "zero_convs.0.0.weight" not in prefixed:
            raise ValueError("not an ldm-layout ControlNet (no zero_convs.0.0.weight): convert a diffusers "
                             "ControlNet by loading it in ComfyUI and saving it with ControlNet-Zero Save.")
        tensors = prefixed
    return layouts.load_checked(build(controlnet_config(base_model), "cpu", torch.float32), tensors, base_model,
                                check_fits, "ControlNet layout")


hint_input = layouts.pixel_hints


def control(control_model, x_in: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, conds: dict,
            compute: torch.dtype) -> dict:
    """The UNet's ``control`` dict from the ControlNet's outputs, as ``get_control`` feeds it (fresh lists)."""
    y = conds.get("y")
    outputs = control_model(x=x_in, hint=hint, timesteps=timesteps, context=conds["c_crossattn"], y=y)
    return {"input": [], "middle": [c.to(compute) for c in outputs["middle"]],
            "output": [c.to(compute) for c in outputs["output"]]}
