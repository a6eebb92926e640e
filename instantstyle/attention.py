"""The attn2 replace that adds an IP-Adapter's image attention to one cross-attention layer.

ComfyUI calls an attn2 replace with the layer's projected ``q, k, v`` and expects the attention output
before ``to_out``. The text attention is computed exactly as the stock layer does (same function, same
arguments), or by the replace that was already on this key (so patches compose); then
``weight * softmax(q k_ip^T) v_ip`` is added, as IP-Adapter does (``IPAdapterAttnProcessor2_0``).

The batch arrives in chunks, one per entry of ``cond_or_uncond``. The chunks whose index the guider
declared unconditional (``sampling.cond_chunks.unconditional_indexes``: stock CFG and our Prompt Guidance
{1}, PerpNeg {1, 2}, DualCFG {0}) get the unconditional image tokens (projection of a zero embedding, or
of the negative image); every other chunk gets the style image tokens. Tokens hold one row, or one row per
latent in batch mode: row r of every chunk reads row min(r, rows - 1) (cubiq's "unfold").

``scaling`` says where the weight goes (cubiq's ``embeds_scaling``, CrossAttentionPatch.py at f204d6f):
``V only`` = ``w * softmax(q k^T) v`` (the reference, diffusers/official); ``K+V`` = ``softmax(q (w k)^T)
(w v)``, which also sharpens or flattens the softmax; ``K+V w/ C penalty`` = ``K+V`` with ``w * C / 1280``,
C the layer's inner width, so the 640-wide SDXL layers get half the weight.

Patch objects are immutable: chaining wraps, ``to(device)`` returns a new object, ``to(dtype)`` changes
nothing (the weights and tokens keep their own dtype and are cast to the query's at use), and
``deepcopy`` (which ``ModelPatcher.clone()`` applies to model options) shares the weights instead of
copying them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from ..sampling import cond_chunks

SCALING_MODES = ("V only", "K+V", "K+V w/ C penalty")
C_PENALTY_WIDTH = 1280  # cubiq: weight * inner_dim / 1280
# The node order that works beside cubiq's IPAdapter_plus: ours wraps a replace already on the key, his cannot.
ORDER_HINT = ("Put his IPAdapter nodes first and InstantStyle Apply (or Apply Embeds) after them (InstantStyle then "
              "wraps his patch, so both act).")


def token_grid(latent_hw: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """(h, w) of a layer's token grid: the latent size halved (rounding up, as stride-2 convs do) until it fits."""
    h, w = latent_hw
    while h * w > seq_len:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != seq_len:
        raise ValueError(f"cannot place {seq_len} attention tokens on a grid of the {latent_hw} latent.")
    return h, w


def mask_rows(mask: torch.Tensor, rows: int, latent_hw: tuple[int, int], seq_len: int,
              like: torch.Tensor) -> torch.Tensor:
    """The attention MASK [M, H, W] resized to the layer's tokens: [rows, seq_len, 1]; row i uses mask min(i, M-1)."""
    h, w = token_grid(latent_hw, seq_len)
    small = torch.nn.functional.interpolate(mask[:, None].to(like.device, torch.float32), size=(h, w),
                                            mode="bilinear", align_corners=False)
    small = small.reshape(mask.shape[0], h * w, 1).to(like.dtype)
    index = torch.clamp(torch.arange(rows, device=like.device), max=mask.shape[0] - 1)
    return small[index]


def _attention(q, k, v, heads: int, extra: dict) -> torch.Tensor:
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, v, heads, attn_precision=extra.get("attn_precision"), transformer_options=extra)


def sigma_gate(options: dict, rows: int, like: torch.Tensor, sigma_start: float, sigma_end: float) -> torch.Tensor | None:
    """Per-row 0/1 factor from the rows' sigmas (``options["sigmas"]``): 1 inside [sigma_end, sigma_start];
    None when every row is active (or no sigmas are known)."""
    sigmas = options.get("sigmas")
    if sigmas is None:
        return None
    sigmas = torch.as_tensor(sigmas).flatten()
    if sigmas.numel() != rows:
        sigmas = sigmas[:1].expand(rows)
    active = (sigmas <= sigma_start) & (sigmas >= sigma_end)
    return None if bool(active.all()) else active.to(like.device, like.dtype)


@dataclass(frozen=True, eq=False)
class IPAttention:
    """attn2 replace for one layer: stock (or previous) text attention + weight * image attention."""

    to_k_ip: torch.Tensor  # [inner, context]
    to_v_ip: torch.Tensor
    cond: torch.Tensor  # [1 or rows, T, context] style image tokens
    uncond: torch.Tensor  # [1 or rows, T', context] tokens for unconditional chunks
    weight: float
    sigma_start: float = math.inf  # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    mask: torch.Tensor | None = None  # [M, H, W] in 0..1, or None
    prev: Callable | None = None  # the replace that was on this key before, if any
    key: tuple = ()
    scaling: str = "V only"

    def __deepcopy__(self, memo):
        return self

    def to(self, target) -> IPAttention:
        """Move to a device; a dtype is ignored here (it is passed on to ``prev``).

        ComfyUI calls ``model_patches_to(model dtype)`` on every load: on an fp8 UNet that would quantize
        the adapter and the image tokens to fp8 (image attention off by 4.9%). They keep their own dtype
        and are cast to the query's dtype where they are used.
        """
        prev = self.prev.to(target) if hasattr(self.prev, "to") else self.prev
        if isinstance(target, torch.dtype):
            return self if prev is self.prev else replace(self, prev=prev)
        moved = {name: getattr(self, name).to(device=target) for name in ("to_k_ip", "to_v_ip", "cond", "uncond")}
        if self.mask is not None:
            moved["mask"] = self.mask.to(device=target)
        if prev is self.prev and all(t is getattr(self, n) for n, t in moved.items()):
            return self
        return replace(self, prev=prev, **moved)

    def models(self) -> list:
        return self.prev.models() if hasattr(self.prev, "models") else []

    def add(self, *args, **kwargs) -> None:
        """Refuse cubiq's ``Attn2Replace.add``: his ``set_model_patch_replace`` (IPAdapterPlus.py:222-226 at
        9d076a3) calls ``.add`` on whatever replace already sits on the key, to append his attention to it in
        place. This patch is immutable and shared with upstream models, so the run stops here, unchanged."""
        layer = f" {self.key}" if self.key else ""
        raise ValueError(
            f"cubiq's IPAdapter node (ComfyUI_IPAdapter_plus) was applied after FrozenTune InstantStyle on the same "
            f"attention layer{layer}: it would change InstantStyle's patch in place, which FrozenTune refuses. "
            + ORDER_HINT)

    def _gate(self, extra: dict, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        return sigma_gate(extra, rows, like, self.sigma_start, self.sigma_end)

    def effective_weight(self) -> float:
        if self.scaling == "K+V w/ C penalty":
            return self.weight * self.to_k_ip.shape[0] / C_PENALTY_WIDTH
        return self.weight

    def image_attention(self, q: torch.Tensor, extra: dict) -> torch.Tensor:
        """The weighted image-attention term per row, with the cond or uncond tokens each chunk calls for."""
        heads = extra["n_heads"]
        chunks = list(extra.get("cond_or_uncond") or [0])
        unconditional = cond_chunks.unconditional_indexes(extra)
        rows = q.shape[0]
        if rows % len(chunks):
            raise ValueError(f"batch of {rows} does not split into the {len(chunks)} chunks of cond_or_uncond {chunks}")
        per = rows // len(chunks)
        k_w = self.to_k_ip.to(q.device, q.dtype)
        v_w = self.to_v_ip.to(q.device, q.dtype)
        weight = self.effective_weight()
        kv_scaled = self.scaling != "V only"
        out = torch.empty_like(q)
        for is_uncond in (False, True):
            picked = [i for i, c in enumerate(chunks) if (c in unconditional) == is_uncond]
            if not picked:
                continue
            idx = [i * per + r for i in picked for r in range(per)]
            tokens = (self.uncond if is_uncond else self.cond).to(q.device, q.dtype)
            k_ip = torch.nn.functional.linear(tokens, k_w)
            v_ip = torch.nn.functional.linear(tokens, v_w)
            if kv_scaled:
                k_ip, v_ip = k_ip * weight, v_ip * weight
            if tokens.shape[0] == 1:
                k_ip, v_ip = k_ip.expand(len(idx), -1, -1), v_ip.expand(len(idx), -1, -1)
            else:  # batch mode: row r of each chunk reads token row min(r, N - 1)
                which = torch.clamp(torch.arange(per, device=q.device), max=tokens.shape[0] - 1).repeat(len(picked))
                k_ip, v_ip = k_ip[which], v_ip[which]
            if len(idx) == rows:
                out = _attention(q, k_ip, v_ip, heads, extra)
                break
            index = torch.tensor(idx, device=q.device)
            out[index] = _attention(q[index], k_ip, v_ip, heads, extra)
        return out if kv_scaled else out * weight

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        base = self.prev(q, k, v, extra) if self.prev is not None else _attention(q, k, v, extra["n_heads"], extra)
        if self.weight == 0:
            return base
        gate = self._gate(extra, q.shape[0], q)
        if gate is not None and not bool(gate.any()):
            return base
        ip = self.image_attention(q, extra)
        if gate is not None:
            ip = ip * gate[:, None, None]
        if self.mask is not None:
            shape = extra.get("original_shape")
            if shape is None:
                raise ValueError("an attention mask needs extra_options['original_shape'] (the latent shape).")
            chunks = len(extra.get("cond_or_uncond") or [0])
            per = q.shape[0] // chunks
            m = mask_rows(self.mask, per, (shape[-2], shape[-1]), q.shape[1], q)
            ip = ip * m.repeat(chunks, 1, 1)
        return base + ip
