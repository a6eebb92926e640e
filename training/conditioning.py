"""The UNet's extra inputs for one caption, built once, as ComfyUI's sampling builds them."""

from __future__ import annotations

import torch


def training_conds(model, conditioning: list, latent: torch.Tensor, device: torch.device) -> dict[str, object]:
    """The UNet's extra inputs (``c_crossattn``, SDXL ``y``, Flux ``guidance``) for one caption.

    ``model`` is a ``comfy.model_base.BaseModel``; its own ``extra_conds`` build the inputs exactly as
    sampling does, so SDXL gets its pooled output and size conditioning (width/height of ``latent``'s
    image unless the conditioning sets them). Inputs that are not tensors (``CONDConstant`` values such as
    Z-Image's ``num_tokens``, a plain int) pass through untouched.
    """
    cond, extras = conditioning[0]
    params = dict(extras)
    params.update(cross_attn=cond, device=device, noise=latent, prompt_type="positive",
                  width=params.get("width", latent.shape[-1] * 8), height=params.get("height", latent.shape[-2] * 8))
    return {name: _trainable_input(value.cond, device) for name, value in model.extra_conds(**params).items()}


def _trainable_input(value: object, device: torch.device) -> object:
    """A tensor detached and cloned onto ``device`` (upstream nodes hand over inference tensors, which autograd
    cannot save), also inside a list (``CONDList``: reference latents); anything else (ints, strings) as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device).clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_trainable_input(v, device) for v in value)
    return value


def batched(conds: dict[str, object], batch_size: int) -> dict[str, object]:
    """``conds`` for a batch: each tensor's first dimension expanded to ``batch_size`` (a view, no copy);
    non-tensor inputs as they are."""
    return {k: v.expand(batch_size, *v.shape[1:]) if isinstance(v, torch.Tensor) else v for k, v in conds.items()}
