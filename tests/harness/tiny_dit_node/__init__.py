"""Test-server shim: ComfyUI's stock loader nodes read FrozenTune's tiny Flux.1/SD3 stand-ins (harness.tiny_dits).

Flux detection fixes 24 heads of 128, so the tiny random Flux.1 files carry their unet_config in the
safetensors metadata key ``frozentune_tiny_unet_config``; ComfyUI builds its text encoders from fixed
full-size configs, so the tiny text encoders (and the tiny SD3 checkpoint) carry their ``model_options`` in
``frozentune_tiny_te_options``. This installs the shims that read them (``install_detection_shim``,
``install_text_encoder_shim``); they answer only for files with those keys, so every other model loads as
stock ComfyUI loads it. A ControlNet file carries no such key (the stock ControlNetLoader passes no metadata to
the detection): a Flux state dict of the tiny Flux's width gets the tiny heads and RoPE axes. Linked into the
e2e/demo server's custom_nodes only, never shipped with the pack.
"""

import os
import sys

NODE_CLASS_MAPPINGS: dict = {}

_tests = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _tests not in sys.path:
    sys.path.append(_tests)

from harness.tiny_dits import install_detection_shim, install_text_encoder_shim  # noqa: E402

install_detection_shim()
install_text_encoder_shim()


def _install_controlnet_shape_shim() -> None:
    """ControlNetLoader passes no file metadata to the detection, and Flux detection fixes 24 heads of 128: a Flux
    state dict of the tiny Flux's width (a ControlNet-Zero file trained on it) gets the tiny heads and RoPE axes.
    Every other width (all real files) detects as stock."""
    import comfy.model_detection as md

    from harness.tiny_dits import tiny_flux_widths

    current = md.detect_unet_config
    detect_unet_config = tiny_flux_widths(current)
    for attr in ("frozentune_tiny_shim", "stock"):  # harness.tiny_dits still sees its shim installed
        if hasattr(current, attr):
            setattr(detect_unet_config, attr, getattr(current, attr))
    md.detect_unet_config = detect_unet_config


_install_controlnet_shape_shim()


def _install_qwen_zimage_shims() -> None:
    """Qwen-Image / Z-Image Turbo stand-ins (harness.tiny_stand_ins2), for their files only:

    - a Z-Image unet_config below the real width (3840; only a tiny file's CONFIG_KEY metadata gives one) gets the
      ZImage config class, which stock matching reserves for dim 3840 (the rest is Lumina2);
    - a Qwen2.5-VL built from a tiny file's options (a non-empty config) gets a vision tower one block deep: the
      stock one is fixed at 0.67B parameters, and text prompts never run it.
    """
    import functools

    import comfy.model_detection as md
    import comfy.supported_models
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_vl as qwen_vl

    from harness.tiny_stand_ins2 import VISION_LAYERS

    stock_match = md.model_config_from_unet_config

    def model_config_from_unet_config(unet_config, state_dict=None):
        if unet_config.get("z_image_modulation") and unet_config.get("dim") != 3840:
            return comfy.supported_models.ZImage(unet_config)
        return stock_match(unet_config, state_dict)

    md.model_config_from_unet_config = model_config_from_unet_config

    stock_init = llama.Qwen25_7BVLI.__init__

    @functools.wraps(stock_init)
    def init(self, config_dict, dtype, device, operations):
        if not config_dict:
            return stock_init(self, config_dict, dtype, device, operations)
        stock_vision = qwen_vl.Qwen2VLVisionTransformer
        qwen_vl.Qwen2VLVisionTransformer = functools.partial(stock_vision, num_layers=VISION_LAYERS)
        try:
            return stock_init(self, config_dict, dtype, device, operations)
        finally:
            qwen_vl.Qwen2VLVisionTransformer = stock_vision

    llama.Qwen25_7BVLI.__init__ = init


_install_qwen_zimage_shims()
