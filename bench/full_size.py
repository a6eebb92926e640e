"""Full-size SD1.5 / SDXL UNets and Flux.1-dev / SD3.5 Large DiTs with random weights, built as ComfyUI builds them.

No weights can be downloaded here. The configs are ComfyUI's own (``comfy/model_detection.py``:
``unet_config_from_diffusers_unet`` for the UNets, ``detect_unet_config`` read against the published files'
shapes for the DiTs); ``comfy.model_detection.model_config_from_unet_config`` matches them to
``comfy.supported_models`` (``SD15``, ``SDXL``, ``Flux``, ``SD3``) and ``get_model`` builds the ``BaseModel``.
No text encoder or VAE: training runs only the diffusion model, so the benches feed random conditioning of the
right shape (Flux.1: 512 T5 tokens, as its text encoder pads to; SD3.5: 77 CLIP + 77 T5 tokens, ComfyUI's default).
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
# Flux.1-dev (black-forest-labs/FLUX.1-dev, flux1-dev.safetensors): what detect_unet_config reads off its keys
# (img_in 3072x64, txt_in 3072x4096, vector_in 3072x768, 19 double + 38 single blocks, guidance_in present).
FLUX_DEV_FULL = dict(image_model="flux", axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000,
                     out_channels=16, qkv_bias=True, in_channels=16, hidden_size=3072, context_in_dim=4096,
                     patch_size=2, vec_in_dim=768, depth=19, depth_single_blocks=38, guidance_embed=True)
# SD3.5 Large (stabilityai/stable-diffusion-3.5-large, sd3.5_large.safetensors): x_embedder 2432x16x2x2 (depth
# 2432 / 64 = 38), y_embedder 2048 in, context_embedder 4096 -> 2432, pos_embed 192x192 patches, RMS qk norm,
# no attn2 blocks (those are SD3.5 Medium's).
SD35_LARGE_FULL = dict(in_channels=16, patch_size=2, out_channels=16, depth=38, input_size=None,
                       adm_in_channels=2048,
                       context_embedder_config={"target": "torch.nn.Linear",
                                                "params": {"in_features": 4096, "out_features": 2432}},
                       num_patches=36864, pos_embed_max_size=192, qk_norm="rms", pos_embed_scaling_factor=None,
                       x_block_self_attn_layers=[])
FULL_SIZE = {"sd15": SD15_FULL, "sdxl": SDXL_FULL, "flux1-dev": FLUX_DEV_FULL, "sd3.5-large": SD35_LARGE_FULL}
# text tokens and pooled width the conditioning has, per DiT (see the module docstring)
DIT_TEXT = {"flux1-dev": (512, 768), "sd3.5-large": (154, 2048)}
LATENT_CHANNELS = {"flux1-dev": 16, "sd3.5-large": 16}


def latent_channels(model: str) -> int:
    return LATENT_CHANNELS.get(model, 4)


def unet_config(model: str) -> dict:
    if model in FULL_SIZE:
        return dict(FULL_SIZE[model])
    from harness import tiny_models

    recipe = tiny_models.RECIPES[model.removeprefix("tiny-")]
    return dict(recipe.unet, use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
                use_temporal_attention=False, use_temporal_resblock=False)


def build_base(model: str, dtype, real: bool, compute_dtype=None):
    """A ComfyUI ModelPatcher of ``model``'s UNet (weights stored in ``dtype``, computing natively in it).

    Built as ComfyUI's loaders build it (supported_models config -> ``get_model``); ``real``: random
    normal(0, 0.02) weights (zero-initialized output layers stay so), else whatever FakeTensorMode holds.
    ``compute_dtype``: weights stored in ``dtype`` (fp8) and cast to it at each use, as ComfyUI's loader does
    with ``weight_dtype`` fp8 (``manual_cast_dtype``).
    """
    import comfy.model_detection
    import comfy.model_patcher
    import torch

    config = comfy.model_detection.model_config_from_unet_config(dict(unet_config(model), dtype=dtype))
    if config is None:
        raise RuntimeError(f"ComfyUI matched no supported model to the {model} UNet config")
    config.set_inference_dtype(dtype, compute_dtype)
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
    if model in DIT_TEXT:
        tokens, pooled = DIT_TEXT[model]
        extras = {"pooled_output": torch.randn(1, pooled, generator=gen)}
        if cfg.get("guidance_embed"):
            extras["guidance"] = 1.0
        return [[torch.randn(1, tokens, 4096, generator=gen), extras]]
    cond = torch.randn(1, 77, cfg["context_dim"], generator=gen)
    extras = {"pooled_output": torch.randn(1, 1280, generator=gen)} if cfg.get("adm_in_channels") else {}
    return [[cond, extras]]
