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
"""

from __future__ import annotations

import contextlib

import torch


def _layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    layers = []
    for block in module.modules():
        if isinstance(block, TimestepEmbedSequential):
            layers.extend(block.children())
    return layers


def _dicts(args: tuple, kwargs: dict) -> dict[int, dict]:
    """The dict arguments of a layer call (ComfyUI's ``transformer_options``), by identity."""
    return {id(a): a for a in (*args, *kwargs.values()) if isinstance(a, dict)}


def _checkpoint(layer: torch.nn.Module) -> None:
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
            return plain(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    layer.forward = forward


@contextlib.contextmanager
def gradient_checkpointing(modules: list[torch.nn.Module], enabled: bool = True):
    """Checkpoint every UNet/ControlNet layer of ``modules`` while the block runs; undo it afterwards."""
    patched = []
    if enabled:
        for module in modules:
            for layer in _layers(module):
                if "forward" not in layer.__dict__:
                    _checkpoint(layer)
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
