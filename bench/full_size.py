"""Full-size SD1.5 / SDXL UNets with random weights, built the way ComfyUI's loaders build them, for the benches.

No weights can be downloaded here. The configs are ComfyUI's own (``comfy/model_detection.py``,
``unet_config_from_diffusers_unet``); ``comfy.model_detection.model_config_from_unet_config`` matches them to
``comfy.supported_models.SD15`` / ``SDXL`` and ``get_model`` builds the ``BaseModel``. No text encoder or VAE:
training runs only the UNet, so the benches feed random conditioning of the right shape.
"""

from __future__ import annotations

# ComfyUI's own full-size UNet configs (comfy/model_detection.py, unet_config_from_diffusers_unet).
SD15_FULL = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
                 use_linear_in_transformer=False, context_dim=768, num_heads=8,
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_attention=False,
                 use_temporal_resblock=False)
SDXL_FULL = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10], channel_mult=[1, 2, 4],
                 transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048, num_head_channels=64,
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], use_temporal_attention=False,
                 use_temporal_resblock=False)


def unet_config(model: str) -> dict:
    if model == "sd15":
        return dict(SD15_FULL)
    if model == "sdxl":
        return dict(SDXL_FULL)
    from harness import tiny_models

    recipe = tiny_models.RECIPES[model.removeprefix("tiny-")]
    return dict(recipe.unet, use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                use_temporal_attention=False, use_temporal_resblock=False)


def build_base(model: str, dtype, real: bool):
    """A ComfyUI ModelPatcher of ``model``'s UNet (weights stored in ``dtype``, computing natively in it).

    Built as ComfyUI's loaders build it (supported_models config -> ``get_model``); ``real``: random
    normal(0, 0.02) weights (zero-initialized output layers stay so), else whatever FakeTensorMode holds.
    """
    import comfy.model_detection
    import comfy.model_patcher
    import torch

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config(model), dtype=dtype))
    if config is None:
        raise RuntimeError(f"ComfyUI matched no supported model to the {model} UNet config")
    config.set_inference_dtype(dtype, None)
    base = config.get_model({}, "", device=torch.device("cpu"))
    if real:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in base.diffusion_model.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    base.eval()
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu), type(config).__name__


def conditioning(model: str):
    import torch

    gen = torch.Generator().manual_seed(1)
    cfg = unet_config(model)
    cond = torch.randn(1, 77, cfg["context_dim"], generator=gen)
    extras = {"pooled_output": torch.randn(1, 1280, generator=gen)} if cfg.get("adm_in_channels") else {}
    return [[cond, extras]]
