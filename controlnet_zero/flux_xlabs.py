"""The "flux_xlabs" ControlNet-Zero layout (``layouts``): Flux.1 ControlNets as XLabs' x-flux trains them.

The module is ComfyUI's own ``comfy.ldm.flux.controlnet.ControlNetFlux`` (ported from x-flux's
``src/flux/controlnet.py``) with ``depth`` double blocks and no single blocks, built from the base's own
configuration. Its ``state_dict()`` is the XLabs file layout (``double_blocks.*``, ``controlnet_blocks.*``,
``pos_embed_input.*``, ``input_hint_block.*`` and the embedders ``img_in``/``time_in``/``vector_in``/
``guidance_in``/``txt_in``), which the stock ControlNetLoader recognises by ``controlnet_blocks.0.weight`` +
``double_blocks.0.img_attn.norm.key_norm.scale`` (``comfy/controlnet.py`` dispatch ->
``load_controlnet_flux_xlabs_mistoline``) and detects the configuration of from the shapes: no key
conversion, no VAE (pixel hints, scaled to [-1, 1] and downsampled 8x by the hint convs).

As x-flux builds one (``src/flux/util.py`` ``load_controlnet``: ``ControlNetFlux(params)`` then
``load_state_dict(transformer.state_dict(), strict=False)``): the embedders and the first ``depth`` double
blocks are the base's weights, ``controlnet_blocks`` and the last hint conv are zero (``zero_module``), the
other hint convs and ``pos_embed_input`` keep PyTorch's default init. x-flux's ``ControlNetFlux`` defaults
to ``controlnet_depth=2``, the depth of XLabs' released Flux ControlNets (canny/depth/hed v3): our
``DEFAULT_DEPTH``. At sampling time ComfyUI repeats the ``depth`` outputs over the base's 19 double blocks
(block i gets output ``i % depth``), as x-flux's Flux does.

Training guidance: x-flux's ControlNet trainer feeds the frozen Flux.1-dev ``guidance = 4``
(``train_flux_deepspeed_controlnet.py``: ``guidance_vec = torch.full(..., 4)``), to the ControlNet and
the base alike: ``TRAIN_GUIDANCE``.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator

import torch

from .. import families
from ..training import lean_norm
from . import layouts

log = logging.getLogger(__name__)

NAME = "flux_xlabs"
DEFAULT_DEPTH = 2  # x-flux ControlNetFlux(controlnet_depth=2): XLabs' released Flux ControlNets
TRAIN_GUIDANCE = 4.0  # x-flux train_flux_deepspeed_controlnet.py: guidance_vec = torch.full((bs,), 4)
ZERO_PREFIXES = ("controlnet_blocks.", "controlnet_single_blocks.")
LAST_HINT_CONV = 14  # input_hint_block.14: zero_module(nn.Conv2d(16, 16, 3, padding=1)) in x-flux
FAMILY_IDS = (families.FLUX1, families.FLUX1_SCHNELL)
# The last double block's text-stream weights (txt_attn.proj, txt_mlp) get no gradient: only its img output
# reaches a controlnet_block (as in x-flux). DDP must be told (``find_unused_parameters``).
UNUSED_PARAMETERS = True
_BLOCK = re.compile(r"^(controlnet_blocks|controlnet_single_blocks|double_blocks)\.(\d+)\.")


def base_config(base_model) -> dict:
    """The base Flux's ``unet_config`` (a clear error for another family or a Flux variant x-flux has no layout for)."""
    family = families.family_of(base_model)
    cfg = dict(base_model.model_config.unet_config)
    if family.id not in FAMILY_IDS or cfg.get("image_model") != "flux":
        raise ValueError(f"a Flux XLabs-layout ControlNet needs a Flux.1 dev or schnell MODEL; this MODEL is "
                         f"{family.label}.")
    return cfg


def build(config: dict, depth: int, single: int = 0, device: torch.device | str = "cpu",
          dtype: torch.dtype = torch.float32, **kind) -> torch.nn.Module:
    """An empty (uninitialized) ``ControlNetFlux`` with ``depth`` double and ``single`` single blocks.

    ``kind``: ``ControlNetFlux``'s other arguments (the "flux_instantx" layout's ``latent_input``); none: XLabs'.
    """
    import dataclasses

    import comfy.ldm.flux.controlnet
    import comfy.ldm.flux.model
    import comfy.ops

    # the Flux parameters only (a loaded model's unet_config also carries dtype, operations and the like)
    names = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    cfg = {k: v for k, v in config.items() if k in names}
    cfg.update(depth=depth, depth_single_blocks=single)
    return comfy.ldm.flux.controlnet.ControlNetFlux(operations=comfy.ops.disable_weight_init, dtype=dtype,
                                                    device=device, **kind, **cfg)


def create(base_model, generator: torch.Generator | None = None, *, depth: int = 0) -> torch.nn.Module:
    """A fresh XLabs-layout ControlNet from the base's first ``depth`` double blocks (0: ``DEFAULT_DEPTH``).

    Weights are fp32 on the CPU; the random part (hint convs but the last, ``pos_embed_input``) is drawn
    from ``generator``.
    """
    from .network import _default_init

    cfg = base_config(base_model)
    depth = depth or DEFAULT_DEPTH
    if not 1 <= depth <= int(cfg["depth"]):
        raise ValueError(f"depth={depth}: a Flux ControlNet copies 1 to {cfg['depth']} of the MODEL's "
                         f"{cfg['depth']} double blocks (x-flux and XLabs' released ControlNets: {DEFAULT_DEPTH}).")
    base_sd = base_model.diffusion_model.state_dict()
    cn = build(cfg, depth)
    sd = cn.state_dict()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = {}
    for name, ref in sd.items():
        if name in base_sd and tuple(base_sd[name].shape) == tuple(ref.shape):
            out[name] = layouts.base_value(base_model.diffusion_model, name, base_sd[name])
        elif name.startswith(ZERO_PREFIXES) or name.startswith(f"input_hint_block.{LAST_HINT_CONV}."):
            out[name] = torch.zeros(ref.shape)
        elif name.startswith(("input_hint_block.", "pos_embed_input.")):
            out[name] = _default_init(cn, name, sd, gen)
        else:
            raise RuntimeError(f"ControlNetFlux weight {name} {tuple(ref.shape)} has no counterpart in the base Flux "
                               f"({tuple(base_sd[name].shape) if name in base_sd else 'missing'})")
    cn.load_state_dict(out, strict=True)
    return cn


def depth_of(control_model: torch.nn.Module) -> int:
    """The double blocks a ControlNet copies (what Create's ``depth`` resolved to; for the metadata)."""
    return len(control_model.double_blocks)


def _counts(names) -> tuple[int, int]:
    """(controlnet blocks, controlnet single blocks) among state-dict ``names``."""
    found: dict[str, set[int]] = {"controlnet_blocks": set(), "controlnet_single_blocks": set()}
    for name in names:
        m = _BLOCK.match(name)
        if m and m.group(1) in found:
            found[m.group(1)].add(int(m.group(2)))
    return len(found["controlnet_blocks"]), len(found["controlnet_single_blocks"])


def _width(sd: dict) -> str:
    w = sd.get("img_in.weight")
    ctx = sd.get("txt_in.weight")
    return (f"hidden {tuple(w.shape)[0] if w is not None else '?'}, text context "
            f"{tuple(ctx.shape)[1] if ctx is not None else '?'}, guidance input "
            f"{'yes' if 'guidance_in.in_layer.weight' in sd else 'no'}")


def check_fits(control_model, base_model) -> None:
    """Raise a clear error if ``control_model`` is not an XLabs ControlNet the base Flux's configuration builds."""
    cn_sd = control_model.state_dict()
    cfg = base_config(base_model)
    depth, single = _counts(cn_sd)
    want = layouts.shapes(build(cfg, max(depth, 1), single, "meta"))
    layouts.check_shapes(want, layouts.shapes(cn_sd), f"it is a Flux ControlNet with {_width(cn_sd)}",
                         f"{families.family_of(base_model).label} with "
                         f"{_width({k: _Shape(v) for k, v in want.items()})}")


class _Shape:
    """A shape standing in for a tensor (``_width`` reads ``.shape`` only)."""

    def __init__(self, shape):
        self.shape = shape


def owns(control_model) -> bool:
    import comfy.ldm.flux.controlnet

    # latent-hint (InstantX/diffusers) Flux ControlNets are the "flux_instantx" layout's
    return isinstance(control_model, comfy.ldm.flux.controlnet.ControlNetFlux) and not control_model.latent_input


def unwrap(control_net) -> torch.nn.Module:
    """The ``ControlNetFlux`` inside a CONTROL_NET, or a clear error for the Flux ControlNets this layout does not train."""
    # a latent-hint ControlNetFlux is not this layout's (``owns``): the "flux_instantx" layout's unwrap takes it
    module = layouts.control_module(control_net, owns,
                                    lambda kind: f"this CONTROL_NET is a {kind}, not a Flux XLabs-layout ControlNet.")
    if module.mistoline:
        raise ValueError("this CONTROL_NET is a MistoLine Flux ControlNet; ControlNet-Zero trains XLabs-layout Flux "
                         "ControlNets: start one with ControlNet-Zero Create.")
    if module.controlnet_mode_embedder is not None:
        raise ValueError("this CONTROL_NET is a Union Flux ControlNet; ControlNet-Zero trains plain ControlNets only.")
    return module


def wrap(control_model: torch.nn.Module, vae=None):
    """The stock CONTROL_NET as ``load_controlnet_flux_xlabs_mistoline`` makes it (extra conds y and guidance).

    ``vae`` is not used: XLabs ControlNets take pixel hints.
    """
    return layouts.stock_control_net(control_model, extra_conds=["y", "guidance"])


def file_tensors(control_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's own state dict: ComfyUI's ``ControlNetFlux`` names are XLabs' file names."""
    return dict(control_model.state_dict())


def load(tensors: dict[str, torch.Tensor], base_model) -> torch.nn.Module:
    """An fp32 CPU ``ControlNetFlux`` for ``base_model`` from an XLabs-layout file's tensors."""
    if "controlnet_blocks.0.weight" not in tensors or "double_blocks.0.img_attn.norm.key_norm.scale" not in tensors:
        raise ValueError("not an XLabs-layout Flux ControlNet (it needs controlnet_blocks.0.weight and "
                         "double_blocks.0.*): InstantX/Union and MistoLine Flux ControlNets are not trained here.")
    depth, single = _counts(tensors)
    return layouts.load_checked(build(base_config(base_model), depth, single), tensors, base_model, check_fits,
                                "Flux ControlNet layout")


hint_input = layouts.pixel_hints


def control(control_model, x_in: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, conds: dict,
            compute: torch.dtype) -> dict:
    """The base Flux's ``control`` dict, as ``get_control`` builds it: ``input`` = the 19 double-block residuals.

    The pixel hint goes in channels-last (the cache's ``[B, R, R, 3]`` rows moved to ``[B, 3, R, R]`` already are,
    so this is free): the hint convolutions run on NHWC (oneDNN's and cuDNN's fast layout; on CPU the stack's
    forward and backward take about 40% less time than on NCHW). The weights stay contiguous, so their gradients,
    the optimizer state and the saved file keep their layout; only the convolutions' rounding may differ from NCHW.
    """
    if hint.ndim == 4:
        hint = hint.contiguous(memory_format=torch.channels_last)
    outputs = control_model(x=x_in, hint=hint, timesteps=timesteps, context=conds["c_crossattn"], y=conds.get("y"),
                            guidance=conds.get("guidance"))
    return {"input": [c.to(compute) for c in outputs["input"]], "middle": [],
            "output": [c.to(compute) for c in outputs.get("output", ())]}


def _copy_stream(module: torch.nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook (with kwargs) of every control block but the first of its kind: the block runs on a copy
    of its image stream (``img``, or a single block's ``x``) when grad is recorded.

    ``ControlNetFlux`` feeds a block's image output both to its ``controlnet_blocks`` Linear (which saves it for
    backward) and to the next block, which adds into it in place: the copy keeps the saved one intact. The text
    stream needs none (no Linear saves it; the LayerNorm that reads it keeps its output, not its input), nor does
    the first block (its input is a fresh sum; the single blocks' a fresh ``cat``).
    """
    if not torch.is_grad_enabled():
        return None

    def own(v):
        return v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v

    return (own(args[0]), *args[1:]) if args else args, {k: own(v) if k in ("img", "x") else v
                                                         for k, v in kwargs.items()}


def _own_output(module: torch.nn.Module, args: tuple, out: torch.Tensor):
    """Forward hook: a frozen layer's output as a tensor of its own when it is a view without grad.

    The frozen Flux's ``img_in`` gives a view of its matmul's output (no grad: nothing in it trains); the base
    then adds the control residual into a slice of it in place (``flux/model.py``: ``img[:, :n] += add``),
    which autograd refuses on a view of a leaf ("a leaf Variable that requires grad is being used in an
    in-place operation"). With gradient checkpointing the blocks run on copies, so only the plain path needs it.
    """
    if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and not out.requires_grad and out._base is not None:
        return out.clone()
    return None


def _rotate(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``comfy.ldm.flux.math.apply_rope1(x, f)`` bit for bit, each output half written by loops ``D/2`` long.

    The stock function multiplies ``[..., D/2, 1, 2]`` views that broadcast over the pair, an inner loop two
    elements long; here each half (even, odd outputs) takes the same products and the same ``addcmul_`` per
    element from strided views (bench/README has the timings). The test against the stock function holds it to that.
    """
    xv = x.to(f.dtype).unflatten(-1, (-1, 2))
    out = torch.empty(torch.broadcast_shapes(f.shape[:-2], xv.shape[:-1]) + (2,), dtype=f.dtype, device=x.device)
    for r in range(2):  # out[..., r] = f[r, 0] x[0] + f[r, 1] x[1]
        half = out[..., r]
        torch.mul(f[..., r, 0], xv[..., 0], out=half)
        half.addcmul_(f[..., r, 1], xv[..., 1])
    return out.flatten(-2).type_as(x)


def _swap_pairs(t: torch.Tensor) -> torch.Tensor:
    """A contiguous ``t`` with each (even, odd) pair of its last dimension swapped (the bits moved, not computed)."""
    if t.element_size() == 4 and t.device.type in ("cpu", "cuda"):  # a pair is one 64-bit word: rotate it by 32
        v = t.view(torch.int64)
        return ((v << 32) | ((v >> 32) & 0xFFFFFFFF)).view(t.dtype)
    return t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


class _Rope(torch.autograd.Function):
    """ComfyUI's ``apply_rope1`` (as ``_rotate``) whose backward is the rotation transposed: two products and a sum.

    Autograd's backward of ``apply_rope1`` (``comfy/ldm/flux/math.py``: broadcast products of ``[..., D/2, 1, 2]``
    views, an in-place ``addcmul_``) runs two broadcast products, two reductions and two zero-filled scatters per
    call. Here, with ``d = [f00, f11]`` and ``e = [f01, f10]`` per pair, ``dx = d * g + swap(e * g)``: for an even
    output ``f00 g0 + f10 g1`` and for an odd one ``f11 g1 + f01 g0``, autograd's two products summed in its order,
    or the other (an exact swap), so the gradient is bit for bit the same, laid out contiguous as autograd's is
    (a norm's weight gradient before it sums in memory order). Only the frequencies (no gradient) are kept for
    backward, as autograd keeps them.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(freqs_cis)
        ctx.x_dtype = x.dtype
        return _rotate(x, freqs_cis)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (f,) = ctx.saved_tensors  # [..., D/2, 2 (out), 2 (in)]: out[r] = f[r, 0] x[0] + f[r, 1] x[1]
        g = grad.to(f.dtype)
        d = torch.stack((f[..., 0, 0], f[..., 1, 1]), -1).flatten(-2)
        e = torch.stack((f[..., 0, 1], f[..., 1, 0]), -1).flatten(-2)
        dx = torch.empty(g.shape, dtype=f.dtype, device=g.device)
        torch.mul(d, g, out=dx)
        dx += _swap_pairs(torch.mul(e, g, out=torch.empty_like(dx)))
        return dx.to(ctx.x_dtype), None


def _fast_rope(apply_rope1):
    """``comfy.ldm.flux.math.apply_rope`` through ``_Rope`` for the inputs autograd records (the rest unchanged)."""

    def rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        if (torch.is_grad_enabled() and x.requires_grad and not freqs_cis.requires_grad
                and freqs_cis.shape[-2:] == (2, 2) and x.shape[-1] == 2 * freqs_cis.shape[-3]  # the layout above
                and torch.broadcast_shapes(freqs_cis.shape[:-3], x.shape[:-1]) == x.shape[:-1]):
            return _Rope.apply(x, freqs_cis)
        return apply_rope1(x, freqs_cis)

    def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
        return rope1(xq, freqs_cis), rope1(xk, freqs_cis)

    apply_rope.frozentune_fast_rope = True
    return apply_rope


@contextlib.contextmanager
def _rope_backward() -> Iterator[None]:
    """While the block runs, ComfyUI's Flux attention rotates q and k through ``_fast_rope`` (undone after)."""
    import comfy.ldm.flux.math as flux_math

    original = flux_math.apply_rope
    if getattr(original, "frozentune_fast_rope", False):  # nested: the outer block's patch stays
        yield
        return
    flux_math.apply_rope = _fast_rope(flux_math.apply_rope1)
    try:
        yield
    finally:
        flux_math.apply_rope = original


class _SiluOf:
    """What the hint block keeps for a SiLU output a convolution saved: the SiLU's input (kept anyway)."""

    __slots__ = ("pre",)

    def __init__(self, pre: torch.Tensor):
        self.pre = pre


def _unpack(saved):
    return torch.nn.functional.silu(saved.pre) if isinstance(saved, _SiluOf) else saved


def _hint_forward(block: torch.nn.Sequential):
    """``input_hint_block.forward`` that keeps each SiLU's input only, not also its output, for backward.

    The convolution after a SiLU saves the SiLU's output, the SiLU its input: two full-resolution maps per layer.
    Here the convolution's saved input is recomputed from the SiLU's (elementwise, the same values bit for bit)
    when backward needs it, so the stack keeps about half the activations for a few elementwise passes.
    """
    layers = list(block)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return torch.nn.Sequential.forward(block, x)
        made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(SiLU output) -> (output, input)

        def pack(t: torch.Tensor):
            entry = made.get(id(t))
            return _SiluOf(entry[1]) if entry is not None and entry[0] is t else t

        with torch.autograd.graph.saved_tensors_hooks(pack, _unpack):
            for layer in layers:
                out = layer(x)
                made.pop(id(x), None)  # what consumed it has saved it by now
                if type(layer) is torch.nn.SiLU and not layer.inplace:
                    made[id(out)] = (out, x)
                x = out
        return x

    return forward


@contextlib.contextmanager
def training(control_model: torch.nn.Module, base_twin: torch.nn.Module | None = None) -> Iterator[None]:
    """While training: hooks that let autograd through ComfyUI's in-place Flux code, removed after.

    The blocks add into their residual stream in place after a LayerNorm read it (``training.checkpointing``
    explains it; the frozen base twin's norms get a copy of their input from ``frozen_twin``). The ControlNet's
    norms keep their output instead of their input for backward (``training.lean_norm``: its modulation, which
    trains, keeps that output anyway, so the stream copy is saved), and every block but the first of its kind runs
    on a copy of its image stream (``_copy_stream``). The base twin's ``img_in`` output gets its own storage
    (``_own_output``). The trained module keeps no hook, so the CONTROL_NET Train returns runs as a loaded one.
    Two changes of cost, not of result (the same values bit for bit): both networks' RoPE runs through
    ``_fast_rope`` (a lighter forward and backward), and a pixel-hint ControlNet's ``input_hint_block`` keeps each
    SiLU's input only (``_hint_forward``: half the hint activations).
    """
    import comfy.ldm.flux.layers

    blocks = (comfy.ldm.flux.layers.DoubleStreamBlock, comfy.ldm.flux.layers.SingleStreamBlock)
    norms = [norm for block in control_model.modules() if isinstance(block, blocks) for norm in block.children()]
    handles = [block.register_forward_pre_hook(_copy_stream, with_kwargs=True)
               for name in ("double_blocks", "single_blocks") for block in getattr(control_model, name, ())[1:]]
    img_in = getattr(base_twin, "img_in", None)
    if img_in is not None:
        handles.append(img_in.register_forward_hook(_own_output))
    hint_block = getattr(control_model, "input_hint_block", None)  # pixel hints only (latent ones have none)
    patch_hints = isinstance(hint_block, torch.nn.Sequential) and "forward" not in hint_block.__dict__
    if patch_hints:
        hint_block.forward = _hint_forward(hint_block)
    try:
        with _rope_backward(), lean_norm.keeping_outputs(norms):
            yield
    finally:
        if patch_hints:
            hint_block.__dict__.pop("forward", None)
        for handle in handles:
            handle.remove()
