"""The ``patches_replace["dit"]`` block replace that adds a Flux IP-Adapter's image attention to one block.

x-flux's ``IPDoubleStreamBlockProcessor`` (``src/flux/modules/layers.py``): the block runs as usual; the image
stream's query ``img_q`` (after the QK RMSNorm, *before* RoPE) attends over the adapter's image keys/values
(``ip_adapter_double_stream_{k,v}_proj(image_proj)``, split into the block's heads) with plain SDPA, and
``ip_scale * ip_attention`` is added to the block's image output (no gate, no out projection). InstantX adds
its term to the attention output instead (``placement`` "attention_output").

How: the replace runs the block (or the replace that was already on the key, so patches compose) with a copy of
``transformer_options`` holding an ``optimized_attention_override`` (ComfyUI ``attention.py`` ``wrap_attn``) that
sees the block's joint attention call. Its query has RoPE applied (``flux/math.py`` ``attention``); RoPE is a
rotation per pair of channels, so the un-rotated query is recovered with the transposed rotation from the
block's own ``pe``. The image attention runs through the same attention function the model uses.

Keys/values are computed once when the node runs (they depend only on the image tokens), kept in float32 and
cast to the query's dtype at use, so fp8-stored models never quantize them. Patch objects are immutable:
``to(device)`` returns a moved copy, ``to(dtype)`` changes nothing, ``deepcopy`` shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..sampling import cond_chunks
from .attention import sigma_gate

TXT_LEN_KEY = "frozentune_flux_ip_txt_len"  # transformer_options: text tokens ahead of the image tokens
TXT_LEN_WRAPPER_KEY = "frozentune_flux_ip_txt_len"
REPLACE_NAMES = {"double": "double_block", "single": "single_block"}


def unrope(q: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """The query before ``apply_rope1(q, pe)``: the same rotation transposed (its inverse)."""
    from comfy.ldm.flux.math import apply_rope1

    return apply_rope1(q, pe.transpose(-1, -2))


@dataclass(frozen=True, eq=False)
class FluxIPBlock:
    """Replace for one Flux block: the block (or ``prev``) + ``weight`` x image attention, as ``placement`` says."""

    block_type: str  # "double" | "single"
    index: int
    cond_kv: tuple[torch.Tensor, torch.Tensor]  # [1 or rows, T, hidden] for conditional chunks
    uncond_kv: tuple[torch.Tensor, torch.Tensor]  # for the chunks the guider declares unconditional
    weight: float
    placement: str = "block_output"  # "block_output" (XLabs) | "attention_output" (InstantX)
    query_rows: str = "image"  # "image" | "all"
    sigma_start: float = math.inf
    sigma_end: float = 0.0
    prev: Callable | None = None

    def __deepcopy__(self, memo):
        return self

    def to(self, target) -> FluxIPBlock:
        prev = self.prev.to(target) if hasattr(self.prev, "to") else self.prev
        if isinstance(target, torch.dtype):
            return self if prev is self.prev else replace(self, prev=prev)
        cond = tuple(t.to(device=target) for t in self.cond_kv)
        uncond = tuple(t.to(device=target) for t in self.uncond_kv)
        if prev is self.prev and all(a is b for a, b in zip(cond + uncond, self.cond_kv + self.uncond_kv, strict=True)):
            return self
        return replace(self, cond_kv=cond, uncond_kv=uncond, prev=prev)

    def models(self) -> list:
        return self.prev.models() if hasattr(self.prev, "models") else []

    def _gate(self, options: dict, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        return sigma_gate(options, rows, like, self.sigma_start, self.sigma_end)

    def image_attention(self, func, q: torch.Tensor, heads: int, options: dict) -> torch.Tensor:
        """[B, L, H*D] attention of the (un-rotated) query rows ``q`` [B, H, L, D] over the image k/v, per chunk."""
        chunks = list(options.get("cond_or_uncond") or [0])
        unconditional = cond_chunks.unconditional_indexes(options)
        rows = q.shape[0]
        if rows % len(chunks):
            raise ValueError(f"batch of {rows} does not split into the {len(chunks)} chunks of cond_or_uncond {chunks}")
        per = rows // len(chunks)
        out = None
        for is_uncond in (False, True):
            picked = [i for i, c in enumerate(chunks) if (c in unconditional) == is_uncond]
            if not picked:
                continue
            idx = [i * per + r for i in picked for r in range(per)]
            k, v = (t.to(q.device, q.dtype) for t in (self.uncond_kv if is_uncond else self.cond_kv))
            if k.shape[0] == 1:
                k, v = k.expand(len(idx), -1, -1), v.expand(len(idx), -1, -1)
            else:  # one token row per latent (batch mode): row r of each chunk reads row min(r, N - 1)
                which = torch.clamp(torch.arange(per, device=q.device), max=k.shape[0] - 1).repeat(len(picked))
                k, v = k[which], v[which]
            split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
            if len(idx) == rows:
                return func(q, split(k), split(v), heads, skip_reshape=True)
            if out is None:
                out = q.new_empty(rows, q.shape[2], q.shape[1] * q.shape[3])
            index = torch.tensor(idx, device=q.device)
            out[index] = func(q[index], split(k), split(v), heads, skip_reshape=True)
        return out

    def __call__(self, args: dict, extra: dict) -> dict:
        run = (lambda a: self.prev(a, extra)) if self.prev is not None else extra["original_block"]
        options = args.get("transformer_options") or {}
        if self.weight == 0:
            return run(args)
        rows = args["img"].shape[0]
        gate = self._gate(options, rows, args["img"])
        if gate is not None and not bool(gate.any()):
            return run(args)
        if self.query_rows == "all":
            start = 0
        elif self.block_type == "double":
            start = args["txt"].shape[1]
        else:
            start = options.get(TXT_LEN_KEY)
            if start is None:
                raise RuntimeError("the Flux IP-Adapter single-block patch needs the text length; its "
                                   "DIFFUSION_MODEL wrapper (add_txt_len_wrapper) was not applied.")
        pe = args["pe"]
        previous_override = options.get("optimized_attention_override")
        seen: dict[str, torch.Tensor] = {}

        def override(func, *a, **kw):
            out = previous_override(func, *a, **kw) if previous_override is not None else func(*a, **kw)
            if "ip" in seen:  # only the block's own joint attention
                return out
            q, heads = a[0], a[3]
            query = q[:, :, start:] if pe is None else unrope(q[:, :, start:], pe[:, :, start:])  # pe: [B, 1, L, ...]
            ip = self.image_attention(func, query, heads, options) * self.weight
            if gate is not None:
                ip = ip * gate[:, None, None].to(ip.dtype)
            seen["ip"] = ip
            if self.placement == "attention_output":
                out = torch.cat((out[:, :start], out[:, start:] + ip.to(out.dtype)), dim=1)
            return out

        result = run({**args, "transformer_options": {**options, "optimized_attention_override": override}})
        if "ip" not in seen:
            raise RuntimeError(f"the {self.block_type} block {self.index} ran no attention through ComfyUI's "
                               "optimized_attention: the Flux IP-Adapter patch cannot act on this model.")
        if self.placement == "block_output":
            result = dict(result)
            img = result["img"]
            ip = seen["ip"].to(img.dtype)
            if self.block_type == "double" and self.query_rows == "image":
                result["img"] = img + ip
            else:  # single: img is txt + image tokens; double with "all": the txt rows are not img's
                if self.block_type == "double":
                    raise ValueError("query_rows 'all' with placement 'block_output' is undefined for double blocks.")
                result["img"] = torch.cat((img[:, :start], img[:, start:] + ip), dim=1)
        return result


@dataclass(frozen=True)
class TxtLenWrapper:
    """DIFFUSION_MODEL wrapper: tells single-block patches how many text tokens precede the image tokens."""

    def __call__(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options=None, **kwargs):
        options = {**(transformer_options or {}), TXT_LEN_KEY: int(context.shape[1])}
        return executor(x, timestep, context, y, guidance, ref_latents, control, options, **kwargs)


def add_txt_len_wrapper(model_patcher) -> None:
    import comfy.patcher_extension

    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, TXT_LEN_WRAPPER_KEY,
                                       TxtLenWrapper())


def set_block_patch(model_patcher, patch: FluxIPBlock) -> None:
    model_patcher.set_model_patch_replace(patch, "dit", REPLACE_NAMES[patch.block_type], patch.index)


def existing_patch(model, block_type: str, index: int):
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    return replaces.get((REPLACE_NAMES[block_type], index))
