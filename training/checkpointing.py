"""Gradient checkpointing that really covers ComfyUI's UNet and ControlNet blocks, and its undo.

ComfyUI's ``UNetModel`` and ``cldm.ControlNet`` run a block's layers through
``forward_timestep_embed`` and never call ``TimestepEmbedSequential.forward``, so patching a
block's forward does nothing. The layers (ResBlock, SpatialTransformer, Up/Downsample) are called
as modules, so their ``forward`` is what gets wrapped: each layer keeps only its input for the
backward pass and recomputes its insides. Patch a twin, never a base model's modules.

The UNet passes its layers one shared ``transformer_options`` dict whose per-block entries (``block``,
``transformer_index``, ...) it overwrites as it walks its blocks, so by the backward pass that dict holds
the last block's values. Each checkpointed layer therefore keeps a shallow copy of the dicts it was
called with (references only, no tensor copies) and is recomputed with a fresh copy of that snapshot:
block-keyed attention patches see the same block in the recomputation as in the forward, and the
caller's dict is never touched by the backward pass.

Diffusion transformers (Flux, SD3, ...) have no ``TimestepEmbedSequential``: their blocks are the entries of
the model's top-level ``ModuleList``s (``double_blocks``, ``single_blocks``, ``joint_blocks``), and those are
what gets checkpointed there.

ComfyUI's Flux blocks (``comfy/ldm/flux/layers.py``: ``img += ...``, ``txt += ...``, ``x += ...``) add into
their residual stream in place, after a LayerNorm saved that very tensor for its backward pass: autograd
stops with "modified by an inplace operation". Under checkpointing it is worse: torch skips its version check
for saved tensors behind hooks, so a recomputed block would silently read the already-updated stream.
``protect_inplace_blocks`` fixes both without touching ComfyUI: each LayerNorm of such a block gets its own
copy of its input while gradients are recorded (so what it saves is never written to, the memory an
out-of-place ``img = img + ...`` would have kept), and a checkpointed block of that kind runs on a copy of its
inputs (so the inputs kept for the recomputation stay the block's real inputs).
"""

from __future__ import annotations

import contextlib

import torch

# Blocks whose forward adds into its own input in place after a LayerNorm saved it (module, class name).
INPLACE_BLOCKS = (
    ("comfy.ldm.flux.layers", "DoubleStreamBlock"),  # Flux.1, Chroma: img += ..., txt += ...
    ("comfy.ldm.flux.layers", "SingleStreamBlock"),  # x += ...
    ("comfy.ldm.modules.diffusionmodules.mmdit", "ContextProcessorBlock"),  # x += ... (MMDiT context processor)
)


def _inplace_classes() -> tuple[type, ...]:
    import importlib

    classes = []
    for module_name, class_name in INPLACE_BLOCKS:
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is not None:
            classes.append(cls)
    return tuple(classes)


def _layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers to checkpoint: a UNet's/ControlNet's block layers, else a DiT's blocks (top-level ModuleLists)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    layers = []
    for block in module.modules():
        if isinstance(block, TimestepEmbedSequential):
            layers.extend(block.children())
    if layers:
        return layers
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            layers.extend(child.children())
    return layers


def _copy_input(module: torch.nn.Module, args: tuple):
    """Forward pre-hook: the layer's first input copied when autograd will save it (see the module docstring)."""
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad and torch.is_grad_enabled():
        return (args[0].clone(), *args[1:])
    return None


def protect_inplace_blocks(module: torch.nn.Module) -> int:
    """Hook every LayerNorm inside ``module``'s in-place blocks (``INPLACE_BLOCKS``) to get a copy of its input.

    Call it on a twin, never on a base model's modules. Returns how many norms were hooked (0 for UNets).
    """
    classes = _inplace_classes()
    count = 0
    for block in module.modules():
        if classes and isinstance(block, classes):
            for norm in block.children():
                if isinstance(norm, torch.nn.LayerNorm):
                    norm.register_forward_pre_hook(_copy_input)
                    count += 1
    return count


def _copies(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _dicts(args: tuple, kwargs: dict) -> dict[int, dict]:
    """The dict arguments of a layer call (ComfyUI's ``transformer_options``), by identity."""
    return {id(a): a for a in (*args, *kwargs.values()) if isinstance(a, dict)}


def _checkpoint(layer: torch.nn.Module, copy_inputs: bool = False) -> None:
    """Checkpoint ``layer``; ``copy_inputs``: run it on copies of its tensor inputs (a block that writes into them)."""
    from torch.utils.checkpoint import checkpoint

    plain = layer.forward

    def forward(*args, **kwargs):
        snapshots = {key: dict(d) for key, d in _dicts(args, kwargs).items()}
        recomputing = False

        def run(*a, **k):
            # The forward runs on the caller's dicts (the layer's writes to them must stay visible, as
            # without checkpointing); a recomputation runs on fresh copies of their forward-time entries.
            nonlocal recomputing
            if recomputing and snapshots:
                copies = {key: dict(s) for key, s in snapshots.items()}
                a = tuple(copies.get(id(v), v) if isinstance(v, dict) else v for v in a)
                k = {n: copies.get(id(v), v) if isinstance(v, dict) else v for n, v in k.items()}
            recomputing = True
            if copy_inputs:
                a = tuple(_copies(v) for v in a)
                k = {n: _copies(v) for n, v in k.items()}
            return plain(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    layer.forward = forward


@contextlib.contextmanager
def gradient_checkpointing(modules: list[torch.nn.Module], enabled: bool = True):
    """Checkpoint every UNet/ControlNet layer (DiT block) of ``modules`` while the block runs; undo it afterwards."""
    patched = []
    if enabled:
        inplace = _inplace_classes()
        for module in modules:
            for layer in _layers(module):
                if "forward" not in layer.__dict__:
                    _checkpoint(layer, copy_inputs=bool(inplace) and isinstance(layer, inplace))
                    patched.append(layer)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            layer.__dict__.pop("forward", None)


def retained_bytes(fn) -> tuple[object, int]:
    """``(fn(), bytes fn's result keeps alive on the CPU)``: for a forward pass, what autograd holds for backward.

    Counted with torch's profiler (``profile_memory``): every allocation minus every free while ``fn``
    ran, so it includes what checkpointing keeps (each layer's input) and excludes what it frees.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    return out, int(sum(e.self_cpu_memory_usage for e in prof.events()))
