"""The UNet's extra inputs for one caption, built once, as ComfyUI's sampling builds them."""

from __future__ import annotations

import torch


def training_conds(model, conditioning: list, latent: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The UNet's extra inputs (``c_crossattn``, SDXL ``y``) for one caption.

    ``model`` is a ``comfy.model_base.BaseModel``; its own ``extra_conds`` build the inputs exactly as
    sampling does, so SDXL gets its pooled output and size conditioning (width/height of ``latent``'s
    image unless the conditioning sets them).
    """
    cond, extras = conditioning[0]
    params = dict(extras)
    params.update(cross_attn=cond, device=device, noise=latent, prompt_type="positive",
                  width=params.get("width", latent.shape[-1] * 8), height=params.get("height", latent.shape[-2] * 8))
    # detach + clone: upstream nodes hand over inference tensors, which autograd cannot save.
    return {name: value.cond.detach().to(device).clone() for name, value in model.extra_conds(**params).items()}
