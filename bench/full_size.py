"""Full-size SD1.5 / SDXL UNets and Flux.1-dev / SD3.5 Large / Qwen-Image / Z-Image DiTs with random weights, built
as ComfyUI builds them.

No weights can be downloaded here. The configs are ComfyUI's own (``comfy/model_detection.py``:
``unet_config_from_diffusers_unet`` for the UNets, ``detect_unet_config`` read against the published files'
shapes for the DiTs); ``comfy.model_detection.model_config_from_unet_config`` matches them to
``comfy.supported_models`` (``SD15``, ``SDXL``, ``Flux``, ``SD3``, ``QwenImage``, ``ZImage``) and ``get_model`` builds
the ``BaseModel``.
No text encoder or VAE: training runs only the diffusion model, so the benches feed random conditioning of the
right shape (Flux.1: 512 T5 tokens, as its text encoder pads to; SD3.5: 77 CLIP + 77 T5 tokens, ComfyUI's default;
Qwen-Image and Z-Image: 512 tokens of Qwen2.5-VL-7B / Qwen3-4B width, see ``DIT_TEXT``).
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
# Qwen-Image (Qwen/Qwen-Image, qwen_image_fp8_e4m3fn.safetensors / transformer/): detect_unet_config reads only
# in_channels (img_in 3072x64) and the block count (60 transformer_blocks); the rest is QwenImageTransformer2DModel's
# defaults, which are the published config's: 24 heads of 128 (3072 wide), joint_attention_dim 3584 (Qwen2.5-VL-7B's
# hidden size: txt_norm 3584, txt_in 3072x3584), patch 2, out_channels 16, rope axes (16, 56, 56); 20.4B parameters.
QWEN_IMAGE_FULL = dict(image_model="qwen_image", in_channels=64, num_layers=60)
# Z-Image (Tongyi-MAI/Z-Image-Turbo, z_image_turbo_bf16.safetensors): cap_embedder.1 3840x2560 (dim 3840; caption
# width 2560, Qwen3-4B's hidden size), 30 layers, cap_pad_token present; detect_unet_config's dim-3840 branch sets
# the rest (30 heads of 128, rope axes 32/48/48, theta 256, SwiGLU 8/3, Z-Image modulation, time scale 1000) and
# leaves n_refiner_layers at NextDiT's 2 (the published 2 noise + 2 context refiners); 6.15B parameters.
Z_IMAGE_FULL = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=30,
                    qk_norm=True, n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512],
                    rope_theta=256.0, ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0,
                    pad_tokens_multiple=32)
# Chroma (lodestones/Chroma, chroma-unlocked-v*.safetensors): Flux.1's 19 double + 38 single blocks without their
# modulation layers, fed by distilled_guidance_layer (5 layers, 5120 hidden, 64 in -> 3072 out); img_in 3072x64 (the
# 2x2-patchified 16-channel latent), txt_in 3072x4096 (T5-XXL); what detect_unet_config's Chroma branch sets. Used by
# bench/gpu_check.py --families, not by the memory bench (no target for Chroma).
CHROMA_FULL = dict(image_model="chroma", in_channels=64, out_channels=64, in_dim=64, out_dim=3072, hidden_dim=5120,
                   n_layers=5, axes_dim=[16, 56, 56], num_heads=24, mlp_ratio=4.0, theta=10000, qkv_bias=True,
                   hidden_size=3072, context_in_dim=4096, patch_size=2, depth=19, depth_single_blocks=38)
FULL_SIZE = {"sd15": SD15_FULL, "sdxl": SDXL_FULL, "flux1-dev": FLUX_DEV_FULL, "sd3.5-large": SD35_LARGE_FULL,
             "qwen-image": QWEN_IMAGE_FULL, "z-image": Z_IMAGE_FULL}
# text tokens, pooled width (None: the model reads none) and context width the conditioning has, per DiT (see the
# module docstring). Qwen-Image and Z-Image: their encoders pad nothing, so the token count is the caption's; 512 is
# diffusers' max_sequence_length for both pipelines, an upper bound for a training caption.
DIT_TEXT = {"flux1-dev": (512, 768, 4096), "sd3.5-large": (154, 2048, 4096), "qwen-image": (512, None, 3584),
            "z-image": (512, None, 2560)}
LATENT_CHANNELS = {"flux1-dev": 16, "sd3.5-large": 16, "qwen-image": 16, "z-image": 16}
VIDEO_LATENT = ("qwen-image",)  # Wan-2.1 latent format: [B, C, 1, h, w] (one frame), what its VAE encodes to


def latent_channels(model: str) -> int:
    return LATENT_CHANNELS.get(model, 4)


def latent_shape(model: str, size: int, batch: int = 1) -> tuple[int, ...]:
    """The VAE latent of a ``size``-pixel square image: ``[B, C, h, w]``, or ``[B, C, 1, h, w]`` for Qwen-Image."""
    side = size // 8
    frames = (1,) if model in VIDEO_LATENT else ()
    return (batch, latent_channels(model), *frames, side, side)


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
        tokens, pooled, width = DIT_TEXT[model]
        extras = {"pooled_output": torch.randn(1, pooled, generator=gen)} if pooled else {}
        if cfg.get("guidance_embed"):
            extras["guidance"] = 1.0
        return [[torch.randn(1, tokens, width, generator=gen), extras]]
    cond = torch.randn(1, 77, cfg["context_dim"], generator=gen)
    extras = {"pooled_output": torch.randn(1, 1280, generator=gen)} if cfg.get("adm_in_channels") else {}
    return [[cond, extras]]
