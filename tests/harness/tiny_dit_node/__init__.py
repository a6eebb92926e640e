"""Test-server shim: ComfyUI's stock UNETLoader detects FrozenTune's tiny Flux files from their metadata.

Flux detection fixes 24 heads of 128, so the tiny random Flux.1 files (``harness.tiny_dits``) carry their
unet_config in the safetensors metadata key ``frozentune_tiny_unet_config``; this installs the detection shim
that reads it (``harness.tiny_dits.install_detection_shim``). It answers only for files with that key, so
every other model is detected as stock ComfyUI does. Linked into the e2e/demo server's custom_nodes only,
never shipped with the pack.
"""

import os
import sys

NODE_CLASS_MAPPINGS: dict = {}

_tests = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _tests not in sys.path:
    sys.path.append(_tests)

from harness.tiny_dits import install_detection_shim  # noqa: E402

install_detection_shim()
