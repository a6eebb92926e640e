"""One ControlNet-Zero layout per family: which module builds, trains and saves a family's ControlNet.

A family's ``controlnet_layout`` slot (``families.table``) names its layout; each layout is a module of
this package implementing the protocol below as module-level functions. Create, Train, Save and the CLI
reach a layout only through ``for_model(base)`` (by the base's family), ``for_module(control)`` (by the
control module's class) or ``for_control_net(control_net)`` (a CONTROL_NET object), never by importing
a layout module, so a family is one more module plus one table value.

Layouts: ``"ldm"`` -> ``network`` (SD1.x/SDXL: ``comfy.cldm.cldm.ControlNet``), ``"flux_xlabs"`` ->
``flux_xlabs`` (Flux.1: ``comfy.ldm.flux.controlnet.ControlNetFlux``, XLabs' layout, pixel hints),
``"sd3_diffusers"`` -> ``sd3_diffusers`` (SD3/SD3.5: ``comfy.cldm.mmdit.ControlNet``, diffusers' layout,
latent hints), ``"qwen_instantx"`` -> ``qwen_instantx`` (Qwen-Image: ``comfy.ldm.qwen_image.controlnet.
QwenImageControlNetModel``, InstantX's / diffusers' layout, Wan-2.1 latent hints), ``"flux_instantx"`` ->
``flux_diffusers`` (Flux.1: ``ControlNetFlux(latent_input=True)``, InstantX's / diffusers' layout, latent hints; a
choice next to the family's XLabs default, ``ALTERNATIVES``). A family without a layout may carry a
``controlnet_refusal`` (the reason, e.g. no stock loader), which ``for_model`` names.

The protocol (names fixed; ``base_model`` is a loaded ``comfy.model_base.BaseModel``):

- ``NAME: str`` the layout's name (the table's value); ``DEFAULT_DEPTH: int`` the blocks Create copies when
  its ``depth`` input is 0 (0 for ldm: the whole encoder, there is no choice).
- ``owns(control_model) -> bool``: whether a control module is this layout's (its class and kind).
- ``create(base_model, generator=None, *, depth=0) -> torch.nn.Module``: a fresh fp32 CPU control module,
  its copied blocks from the base's own weights, zero-initialized exactly as the reference code.
  ``depth`` 0: ``DEFAULT_DEPTH``; a layout without a depth refuses any other value with a clear error.
- ``unwrap(control_net) -> torch.nn.Module``: the module inside a CONTROL_NET; a clear error if it is not
  a ControlNet this layout trains.
- ``check_fits(control_model, base_model) -> None``: a clear error (both families/widths named) if the
  control module was not made for this base.
- ``wrap(control_model, vae=None)``: the stock ``comfy.controlnet.ControlNet`` exactly as the stock loader
  builds it for this layout (extra conds, latent format, compression ratio).
- ``file_tensors(control_model) -> dict[str, Tensor]``: the tensors of a file the stock ControlNetLoader
  reads for this layout (names only; the caller casts and writes).
- ``load(tensors, base_model) -> torch.nn.Module``: a saved file (``file_tensors``' names) back into an fp32
  CPU control module for this base (resume, the CLI's ``controlnet`` setting); a clear error otherwise.
- ``hint_input(hints, vae) -> Tensor``: what the cache stores per row for a batch of hints ``hints``
  (``[B, H, W, 3]`` uint8 at the training resolution, as the dataset loads them). Pixel-hint layouts return
  them unchanged (uint8 [B, H, W, 3]); latent-hint layouts return float latents ``[B, C, h, w]`` (Qwen-Image:
  ``[B, C, 1, h, w]``) processed as ``comfy.controlnet.ControlNet.get_control`` does. ``cache.TrainingData.batch`` hands the control
  module uint8 rows as ``[B, 3, H, W]`` floats in [0, 1] and float rows as they are.
- ``control(control_model, x_in, hint, timesteps, conds, compute) -> dict``: runs the control module
  (``control_model`` may be its DDP wrapper) as ``get_control`` does at sampling time and returns the
  ``control=`` dict the base diffusion model's forward takes, every tensor in ``compute`` dtype (fresh
  lists: the base pops them). ``x_in`` is ``model_sampling.calculate_input(sigma, x_t)``, ``conds`` the
  cached conds (``c_crossattn``, and ``y`` / ``guidance`` where the family has them). The training forward
  then calls the frozen base twin with ``context=c_crossattn`` and every other cond by its name.
- ``UNUSED_PARAMETERS: bool`` (optional, default False): the control module has weights the loss never reaches
  (DDP then runs with ``find_unused_parameters``).
- ``depth_of(control_model) -> int`` (optional): the blocks a control module copies (recorded in the metadata).
- ``module_tensors(tensors) -> dict[str, Tensor]`` (optional): a file's tensors under the control module's
  state-dict names (resume loads a checkpoint's weights file through it); missing means the names are the same.
- ``training(control_model, base_twin)`` (optional): a context manager the training forward runs inside (hooks
  the trainable control module and the frozen base twin, ``training.precision.frozen_twin``, need for autograd;
  removed on exit); missing means none.

From ``FileTensors`` on, this module holds the pieces layouts share (``unwrap``'s first check, ``check_fits``'
refusals, the stock CONTROL_NET ``wrap`` builds, diffusers-named files, latent hints): layout modules call them;
Create, Train, Save and the CLI call the protocol.

Nothing heavy is imported here: layout modules import ComfyUI inside their functions.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from types import ModuleType
from typing import TYPE_CHECKING

from .. import families

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch

LDM, FLUX_XLABS, SD3_DIFFUSERS, QWEN_INSTANTX = "ldm", "flux_xlabs", "sd3_diffusers", "qwen_instantx"
FLUX_INSTANTX = "flux_instantx"
MODULES = {LDM: "network", FLUX_XLABS: "flux_xlabs", SD3_DIFFUSERS: "sd3_diffusers", QWEN_INSTANTX: "qwen_instantx",
           FLUX_INSTANTX: "flux_diffusers"}
# The other layouts a family may choose (Create's ``layout`` input, the CLI's ``layout``), by its slot's layout:
# Flux.1 defaults to XLabs' layout (pixel hints, no VAE) and also has InstantX's / diffusers' (latent hints).
ALTERNATIVES: dict[str, tuple[str, ...]] = {FLUX_XLABS: (FLUX_INSTANTX,)}
FAMILY_DEFAULT = "family default"  # Create's ``layout`` choice meaning the family's slot


def layout(name: str) -> ModuleType:
    """The module implementing layout ``name``."""
    if name not in MODULES:
        raise KeyError(f"no ControlNet-Zero layout {name!r}: known {', '.join(MODULES)}")
    return importlib.import_module(f".{MODULES[name]}", __package__)


def available() -> list[ModuleType]:
    """The layout modules that import (a layout still being written is skipped)."""
    found = []
    for name in MODULES:
        try:
            found.append(layout(name))
        except ImportError:
            continue
    return found


def supported_labels() -> str:
    """The families ControlNet-Zero supports, for messages ("SD1.x, SDXL family, Flux.1 dev, ...")."""
    return ", ".join(f.label for f in families.FAMILIES.values() if f.controlnet_layout in MODULES)


def choices(family) -> tuple[str, ...]:
    """The layouts a family (``families.Family``) may use: its slot's first, then its alternatives (none: ``()``)."""
    if family.controlnet_layout is None:
        return ()
    return (family.controlnet_layout, *ALTERNATIVES.get(family.controlnet_layout, ()))


def create_choices() -> list[str]:
    """Create's ``layout`` options: ``FAMILY_DEFAULT``, then every layout some family may choose besides its default."""
    return [FAMILY_DEFAULT, *sorted({name for names in ALTERNATIVES.values() for name in names} | set(ALTERNATIVES))]


def for_model(base_model, name: str | None = None) -> ModuleType:
    """The layout of a base model (a MODEL or ``comfy.model_base.BaseModel``), by its family; a clear error else.

    ``name``: a layout the family may choose instead of its default (None / ``FAMILY_DEFAULT``: the default); one
    that does not fit the family is refused, naming both.
    """
    family = families.family_of(base_model)
    if family.controlnet_layout is None:
        why = f": {family.controlnet_refusal}" if family.controlnet_refusal else ""
        raise ValueError(f"ControlNet-Zero does not support {family.label} models{why} (supported: "
                         f"{supported_labels()}): connect a MODEL of one of those families.")
    if name in (None, "", FAMILY_DEFAULT):
        return layout(family.controlnet_layout)
    if name not in choices(family):
        fits = ", ".join(f.label for f in families.FAMILIES.values() if name in choices(f))
        raise ValueError(f"the ControlNet layout {name!r} does not fit the MODEL: it is for {fits or 'no family'}, the "
                         f"MODEL is {family.label}, whose layouts are {', '.join(choices(family))}. Choose "
                         f"{FAMILY_DEFAULT!r} or one of those.")
    return layout(name)


def load_file(tensors: dict, base_model) -> torch.nn.Module:
    """The control module for ``base_model`` from a file's tensors, in whichever of the family's layouts the file is.

    Each layout's ``load`` says "not a ..." for a file of another layout; the first other error (the file is of
    that layout but does not fit) is raised; a file of none of them raises the family default's "not a ..." error.
    """
    family = families.family_of(base_model)
    names = choices(family) or (None,)
    first: ValueError | None = None
    for name in names:
        try:
            return for_model(base_model, name).load(tensors, base_model)
        except ValueError as error:
            if not str(error).startswith("not "):
                raise
            first = first or error
    raise first


def owner(control_model) -> ModuleType | None:
    """The layout a control module belongs to, or None (also where ComfyUI is not importable)."""
    for module in available():
        try:
            if module.owns(control_model):
                return module
        except ImportError:
            return None
    return None


def file_tensors(control_model) -> dict:
    """The tensors of ``control_model``'s file: its layout's ``file_tensors``, else its own state dict."""
    module = owner(control_model)
    return module.file_tensors(control_model) if module is not None else dict(control_model.state_dict())


def for_module(control_model) -> ModuleType:
    """The layout a control module belongs to; a clear error for a module no layout trains."""
    module = owner(control_model)
    if module is not None:
        return module
    raise ValueError(f"this ControlNet is a {type(control_model).__name__}, which ControlNet-Zero does not train "
                     f"(it trains ControlNets of {supported_labels()} made by ControlNet-Zero Create or loaded with "
                     "Load ControlNet Model from a file in one of those layouts).")


def for_control_net(control_net) -> ModuleType:
    """The layout of a CONTROL_NET object (what Create/Train/Save receive)."""
    module = getattr(control_net, "control_model", None)
    if module is None:
        raise ValueError(f"this CONTROL_NET is a {type(control_net).__name__} without a control model (a T2I-Adapter "
                         "or a Control-LoRA?): ControlNet-Zero trains full ControlNets only.")
    return for_module(module)


def training(layout_module: ModuleType, control_model, base_twin):
    """``layout_module.training(control_model, base_twin)`` if the layout has one, else a context that does nothing."""
    hook = getattr(layout_module, "training", None)
    return hook(control_model, base_twin) if hook is not None else contextlib.nullcontext()


def check_pair(control_model, base_model) -> ModuleType:
    """The control module's layout, after checking it fits ``base_model`` (a clear error naming both if not)."""
    mine = for_module(control_model)
    family = families.family_of(base_model)
    if mine.NAME not in choices(family):
        wanted = ", ".join(f.label for f in families.FAMILIES.values() if mine.NAME in choices(f))
        raise ValueError(f"this ControlNet does not fit the MODEL: it is a {mine.NAME}-layout ControlNet (for "
                         f"{wanted or 'another family'}), the MODEL is {family.label}. Continue training only from a "
                         "ControlNet of the same base model, or start a new one with ControlNet-Zero Create.")
    mine.check_fits(control_model, base_model)
    return mine


class FileTensors:
    """A file's tensors where a layout's ``check_fits`` wants a module: it reads only ``state_dict()``."""

    def __init__(self, tensors: dict) -> None:
        self._tensors = tensors

    def state_dict(self) -> dict:
        return self._tensors


def control_module(control_net, owns, refusal) -> torch.nn.Module:
    """``unwrap``'s first check: the module inside ``control_net`` where the layout ``owns`` it, else a ValueError
    whose message is ``refusal(kind)`` (kind: the module's class name, or the object's where it holds none)."""
    module = getattr(control_net, "control_model", None)
    if module is None or not owns(module):
        kind = type(module).__name__ if module is not None else type(control_net).__name__
        raise ValueError(refusal(kind))
    return module


class _Probe:
    """A bare control module standing in for the CONTROL_NET holding it (``checked``)."""

    def __init__(self, control_model) -> None:
        self.control_model = control_model


def checked(unwrap, control_model) -> torch.nn.Module:
    """``control_model`` after a layout's ``unwrap`` checks on it (a clear error for a kind it does not train)."""
    return unwrap(_Probe(control_model))


def plain_latent_hints(module, channels: int, label: str) -> None:
    """``unwrap``'s refusal of a latent-hint ControlNet whose hint embedding takes ``channels`` other than the latent's
    (``module.in_channels``): an inpaint ControlNet (``label``: the family, for the message)."""
    if channels != module.in_channels:
        raise ValueError(f"this {label} ControlNet takes {channels}-channel hints (an inpaint ControlNet: the latent "
                         f"plus a mask); ControlNet-Zero trains plain {module.in_channels}-channel latent hints only.")


def wrong_family(made_for: str, base_model, family: str) -> None:
    """``check_fits``' refusal of a MODEL of another family: the ControlNet was ``made_for`` a ``family`` model."""
    raise ValueError(f"this ControlNet was made for {made_for}; the MODEL is {families.family_of(base_model).label}. "
                     f"Use it with the {family} model it was made for.")


def check_blocks(n: int, blocks: int, most: int, what: str) -> None:
    """``check_fits``' refusal of ``n`` ControlNet blocks outside 1..``most`` for a MODEL of ``blocks`` ``what``
    (e.g. "joint blocks")."""
    if not 1 <= n <= most:
        raise ValueError(f"this ControlNet does not fit the MODEL: it has {n} ControlNet blocks, the MODEL's {blocks} "
                         f"{what} take 1 to {most}. {FIT_FIX}")


def check_shapes(want: dict, have: dict, this: str, model: str) -> None:
    """``check_fits``' refusal of weight shapes ``have`` other than ``want`` (what the MODEL's config builds), with
    ``misfit``'s account: "this ControlNet does not fit the MODEL: ``this``, the MODEL is ``model`` (...)"."""
    why = misfit(want, have)
    if why:
        raise ValueError(f"this ControlNet does not fit the MODEL: {this}, the MODEL is {model} ({why}). {FIT_FIX}")


def load_checked(module, tensors: dict, base_model, check_fits, what: str):
    """``module`` holding ``tensors`` (as fp32); if keys are missing or unexpected, ``check_fits`` names the
    mismatch (base vs file) or a ValueError saying the file ``does not match`` ``what``."""
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if missing or unexpected:
        check_fits(FileTensors(tensors), base_model)
        raise ValueError(f"does not match the base model's {what} (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    return module


def load_strict(sd: dict, base_model, check_fits, build) -> torch.nn.Module:
    """A latent-hint layout's ``load`` once a file's tensors are ``sd`` (fp32, the module's names): ``check_fits`` on
    them (a clear error naming both), then the empty module ``build(sd)`` holding exactly them, frozen."""
    check_fits(FileTensors(sd), base_model)
    module = build(sd)
    module.load_state_dict(sd, strict=True)
    return module.eval().requires_grad_(False)


def pixel_hints(hints, vae=None):
    """``hint_input`` of a pixel-hint layout: the uint8 ``[B, H, W, 3]`` rows are what the cache keeps."""
    return hints


def latent_hints(hint_pixels, vae, latent_format, *, one_at_a_time: bool = False) -> torch.Tensor:
    """``hint_input`` of a latent-hint layout, as ``comfy.controlnet.ControlNet.get_control`` makes the hint: the VAE's
    latent of ``hint_pixels`` ([B, H, W, 3], uint8 or float in [0, 1]) through ``latent_format.process_in``, float32
    on the CPU. ``one_at_a_time``: each image encoded on its own (a video VAE would read a batch as frames)."""
    import torch

    pixels = hint_pixels.float() / 255.0 if hint_pixels.dtype == torch.uint8 else hint_pixels.float()
    with torch.no_grad():
        if one_at_a_time:
            latent = torch.cat([vae.encode(pixels[i:i + 1, ..., :3]).float().cpu() for i in range(pixels.shape[0])])
        else:
            latent = vae.encode(pixels[..., :3]).float().cpu()
    return latent_format.process_in(latent)


def stock_control_net(control_model, **options):
    """``wrap``'s stock ``comfy.controlnet.ControlNet`` around ``control_model`` as ComfyUI's loaders make it: loaded on
    the torch device, manual cast for the module's dtype there, and the loader's own ``options`` (``extra_conds``...)."""
    import comfy.controlnet
    import comfy.model_management as mm

    load_device = mm.get_torch_device()
    dtype = next(control_model.parameters()).dtype
    manual_cast = mm.unet_manual_cast(dtype, load_device)
    return comfy.controlnet.ControlNet(control_model, load_device=load_device, manual_cast_dtype=manual_cast,
                                       **options)


def latent_control_net(control_model, latent_format, **options):
    """``stock_control_net`` for a latent-hint layout: ``compression_ratio`` 1 (the hint is a latent already), its
    ``latent_format``, no inpaint mask, and the loader's other ``options`` (``extra_conds``)."""
    return stock_control_net(control_model, compression_ratio=1, latent_format=latent_format, concat_mask=False,
                             **options)


def unet_config(base_model, fits: bool, name: str, needs: str) -> dict:
    """A DiT layout's ``base_config``: the base's ComfyUI ``unet_config`` (what its ControlNet is built from), or where
    the base does not ``fit`` a ValueError: the layout ``name`` ``needs`` another model (e.g. "a Qwen-Image model")."""
    if not fits:
        model = type(getattr(base_model, "model_config", base_model)).__name__
        raise ValueError(f"the {name} ControlNet layout needs {needs}, not {model}.")
    return dict(base_model.model_config.unet_config)


def trainable_copy(control_model, device):
    """A private fp32 copy of ``control_model`` whose weights are ordinary (not inference) tensors.

    Run under ``torch.inference_mode(False)``: modules created by a ComfyUI node hold inference
    tensors, which autograd refuses; the input object is never modified.
    """
    import copy

    import torch

    memo = {id(p): torch.nn.Parameter(p.detach().to(device, torch.float32).clone())
            for p in control_model.parameters()}
    memo.update({id(b): b.detach().to(device).clone() for b in control_model.buffers()})
    cn = copy.deepcopy(control_model, memo)
    cn.dtype = torch.float32
    return cn


def base_value(diffusion_model, name: str, stored):
    """The base's weight ``name`` as fp32 CPU values, through its op's ``convert_weight`` where it has one.

    Scaled-fp8 files store ``weight / scale_weight``; ComfyUI's ops dequantize with ``convert_weight`` (as its
    LoRA patching does), so a copied block holds the weights the base computes with.
    """
    import torch

    module_name, _, leaf = name.rpartition(".")
    convert = getattr(diffusion_model.get_submodule(module_name), "convert_weight", None) if leaf == "weight" else None
    value = convert(stored.detach()) if convert is not None else stored.detach()
    return value.to("cpu", torch.float32).clone()


def shapes(module_or_sd) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a module's state dict (or of a state dict)."""
    sd = module_or_sd if isinstance(module_or_sd, dict) else module_or_sd.state_dict()
    return {k: tuple(v.shape) for k, v in sd.items()}


def width(named_shapes: dict, key: str) -> int | None:
    """The output width of weight ``key`` (its first dimension) in a name -> shape dict; None where it has no ``key``."""
    shape = named_shapes.get(key)
    return int(shape[0]) if shape is not None else None


def describe_width(kind: str, width: int | None, blocks: int | None = None, head: int | None = None) -> str:
    """A DiT ControlNet's base for messages: "``kind`` of width W[ (H heads of ``head``)][, N ControlNet blocks]", or
    "a model that is not ``kind``" where ``width`` is None (e.g. kind "a Qwen-Image transformer")."""
    if width is None:
        return f"a model that is not {kind}"
    heads = f" ({width // head} heads of {head})" if head else ""
    return f"{kind} of width {width}{heads}" + (f", {blocks} ControlNet blocks" if blocks is not None else "")


def controlnet_blocks(named_shapes: dict) -> int:
    """How many ``controlnet_blocks.N`` a DiT ControlNet's state dict holds."""
    import comfy.model_detection

    return comfy.model_detection.count_blocks(named_shapes, "controlnet_blocks.{}.")


def invert_key_map(sd: dict, key_map: dict) -> tuple[dict, set[str]]:
    """ComfyUI tensors ``sd`` -> the foreign names of a ``comfy.utils.*_to_diffusers`` ``key_map`` (foreign name ->
    ComfyUI name, or (name, (dim, start, size) | None[, fn]) with ``fn`` its own inverse), and the names used.

    Entries whose ComfyUI weight ``sd`` lacks (a final layer a ControlNet has not) are skipped.
    """
    out: dict = {}
    used: set[str] = set()
    for foreign, target in key_map.items():
        name = target if isinstance(target, str) else target[0]
        if name not in sd:
            continue
        weight = sd[name]
        if not isinstance(target, str):
            if target[1] is not None:
                weight = weight.narrow(*target[1])
            if len(target) > 2:
                weight = target[2](weight)
        out[foreign] = weight.contiguous()
        used.add(name)
    return out, used


def diffusers_file(module, key_map: dict, own_names: tuple[str, ...], label: str, dtype) -> dict:
    """``file_tensors`` of a layout whose file has diffusers' names: ``module``'s tensors on the CPU in ``dtype`` under
    ``key_map``'s foreign names (``invert_key_map``), those starting with ``own_names`` under their own (the stock
    loader reads them raw); every weight written once, a RuntimeError (``label``: the family) for one with no name."""
    sd = {k: v.detach().to("cpu", dtype) for k, v in module.state_dict().items()}
    out, used = invert_key_map(sd, key_map)
    for name, weight in sd.items():
        if name.startswith(own_names):
            out[name] = weight.contiguous()
            used.add(name)
    left = sorted(set(sd) - used)
    if left:
        raise RuntimeError(f"{label} ControlNet weights with no diffusers name: {left[:5]}")
    return out


def from_diffusers(tensors: dict, own_names: tuple[str, ...]) -> dict:
    """A diffusers-named DiT ControlNet file's tensors under ComfyUI's module names, as the stock loader converts them
    (``comfy.model_detection.convert_diffusers_mmdit``), those starting with ``own_names`` as they are."""
    import comfy.model_detection

    converted = comfy.model_detection.convert_diffusers_mmdit(dict(tensors), "")
    converted.update({k: v for k, v in tensors.items() if k.startswith(own_names)})
    return converted


def chosen_depth(depth: int | None, default: int, most: int, capped: str, refusal: str) -> int:
    """Create's ``depth`` for a layout copying 1 to ``most`` blocks: 0/None is ``default`` capped at ``most`` (logged
    with ``capped``, e.g. "the base has 2 double blocks"), another value outside 1..``most`` is refused with the
    layout's own ``refusal``."""
    if depth is None or int(depth) == 0:
        n = min(default, most)
        if n != default:
            log.info("ControlNet-Zero: %s; copying %d (default %d)", capped, n, default)
        return n
    if not 1 <= int(depth) <= most:
        raise ValueError(refusal)
    return int(depth)


FIT_FIX = ("Continue training only from a ControlNet of the same base model, or start a new one with ControlNet-Zero "
           "Create.")


def misfit(want: dict, have: dict) -> str | None:
    """How a ControlNet's weight shapes ``have`` differ from ``want`` (what the MODEL's config builds), for a refusal:
    "N weights differ, e.g. <key>: ControlNet <shape>, MODEL's <shape>"; None when they are the same."""
    differences = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    if not differences:
        return None
    first = differences[0]
    return (f"{len(differences)} weights differ, e.g. {first}: ControlNet {have.get(first, 'missing')}, MODEL's "
            f"{want.get(first, 'none')}")


def fill_from_base(cn, diffusion_model, zero_prefixes: tuple[str, ...], label: str) -> None:
    """Load ``cn`` with the base's weights under the same names (``base_value``), its ``zero_prefixes`` exactly zero.

    For layouts whose every other weight exists in the base (diffusers' DiT ControlNets); a name the base lacks or
    a shape that differs is an error naming it (``label``: the family, for the message).
    """
    import torch

    base_sd = diffusion_model.state_dict()
    out = {}
    for name, ref in cn.state_dict().items():
        if name.startswith(zero_prefixes):
            out[name] = torch.zeros(ref.shape)
        elif name in base_sd:
            value = base_value(diffusion_model, name, base_sd[name])
            if tuple(value.shape) != tuple(ref.shape):
                raise RuntimeError(f"{label} weight {name} has shape {tuple(value.shape)} but the ControlNet "
                                   f"built from the same config wants {tuple(ref.shape)}")
            out[name] = value
        else:
            raise RuntimeError(f"the {label} ControlNet has a weight {name} that the base lacks; this model's "
                               "configuration is not one ControlNet-Zero can copy.")
    cn.load_state_dict(out, strict=True)
