"""InstantStyle content subtraction: image embedding minus the CLIP text embedding of the content.

The official code (``IPAdapterXL.generate``) does ``image_embeds - scale * pooled_text`` on the raw,
unnormalised vectors and changes only the conditional branch; the unconditional branch stays the projection
of a zero embedding. It works on the global (pooled) embedding only, so never on Plus adapters, and only
when text and image live in the same CLIP space: SDXL's clip_g pooled output (1280-d) with the bigG image
encoder of ``ip-adapter_sdxl``; an OpenCLIP ViT-H text tower (SD2.x CLIP, 1024-d) for ViT-H adapters.
"""

from __future__ import annotations

import torch


def check_subtraction(projection: str, embed_width: int, text_width: int, adapter_name: str = "the IP-Adapter") -> None:
    if projection == "plus":
        raise ValueError(f"{adapter_name} is a Plus adapter (it reads CLIP patch tokens), and the content subtraction "
                         "works only on the global image embedding: set subtract to 0 or empty the content text, or "
                         "use a plain adapter such as ip-adapter_sdxl.")
    if text_width != embed_width:
        hint = {1280: "an SDXL CLIP (its clip_g pooled output is 1280-d, bigG space)",
                1024: "an SD2.x CLIP (OpenCLIP ViT-H text, 1024-d)"}.get(embed_width, f"a {embed_width}-d text encoder")
        raise ValueError(f"the content text embedding is {text_width}-d but {adapter_name} expects {embed_width}-d "
                         f"image embeddings, so they are not in the same space: connect {hint} to the clip input.")


def subtract_content(image_embeds: torch.Tensor, text_pooled: torch.Tensor, scale: float) -> torch.Tensor:
    """``image_embeds - scale * text_pooled`` ([N, E] minus [1, E]), exactly as the official code does."""
    if text_pooled.ndim != 2 or text_pooled.shape[0] != 1 or image_embeds.shape[-1] != text_pooled.shape[-1]:
        raise ValueError(f"cannot subtract a {tuple(text_pooled.shape)} text embedding from "
                         f"{tuple(image_embeds.shape)} image embeddings: widths differ.")
    return image_embeds - text_pooled.to(image_embeds) * scale
