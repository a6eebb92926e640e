"""Test-server shim: ComfyUI's stock loader nodes read FrozenTune's tiny Flux.1/SD3 stand-ins (harness.tiny_dits).

Flux detection fixes 24 heads of 128, so the tiny random Flux.1 files carry their unet_config in the
safetensors metadata key ``frozentune_tiny_unet_config``; ComfyUI builds its text encoders from fixed
full-size configs, so the tiny text encoders (and the tiny SD3 checkpoint) carry their ``model_options`` in
``frozentune_tiny_te_options``. This installs the shims that read them (``install_detection_shim``,
``install_text_encoder_shim``); they answer only for files with those keys, so every other model loads as
stock ComfyUI loads it. Linked into the e2e/demo server's custom_nodes only, never shipped with the pack.
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
