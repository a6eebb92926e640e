"""Test-server shim: with FROZENTUNE_TEST_NATIVE_HALF=1, ComfyUI computes natively in half precision on the CPU.

On the CPU ComfyUI casts bf16/fp16 UNet weights up to fp32 at every op; a GPU user's ComfyUI computes in
the half dtype. The half-precision e2e server (``--bf16-unet`` plus this env var) makes the CPU do what
that GPU does, with the same patch the node tests use (``harness.precision.native_compute``), kept active
for the server's life. Linked into the e2e/demo server's custom_nodes only, never shipped with the pack;
without the env var it does nothing.
"""

import logging
import os
import sys

NODE_CLASS_MAPPINGS: dict = {}
ENV = "FROZENTUNE_TEST_NATIVE_HALF"
LOG_LINE = "FrozenTune test shim: native half-precision compute on"

if os.environ.get(ENV) == "1":
    _tests = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
    if _tests not in sys.path:
        sys.path.append(_tests)
    from harness.precision import native_compute

    _native = native_compute()
    _native.__enter__()  # for the whole server process: never exited
    logging.info("%s (bf16/fp16 UNets load with no manual cast to fp32)", LOG_LINE)
