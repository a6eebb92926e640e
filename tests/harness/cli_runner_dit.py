"""Run ``controlnet_zero.train`` on the tiny DiTs in a fresh process (``torchrun`` can start a script, not a shim).

The tiny Flux (and the tiny Qwen-Image files of ``harness.tiny_stand_ins2``) need two test-only shims that a
new process must install itself before the CLI loads anything: the detection shim (its unet_config from the
file's metadata) and the text-encoder shim (the tiny text-encoder widths), both from ``harness.tiny_dits``; they
answer only for the tiny files. Usage, from the
pack root (any cwd works)::

    torchrun --standalone --nproc_per_node 2 tests/harness/cli_runner_dit.py --config train.toml

The arguments are the CLI's own. ``tiny_dits.flux_controlnet_detection()`` is the shape shim the stock ControlNetLoader
needs for a tiny Flux ControlNet file (ComfyUI fixes Flux's 24 heads of 128 and passes the loader no metadata).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent


def main(argv: list[str] | None = None) -> int:
    """Install the tiny-DiT shims, then run the CLI's ``main`` (the pack imported as ComfyUI imports it)."""
    # the CLI's log format, set before ComfyUI's imports log a warning (which would configure the root logger
    # first, at WARNING, and make the CLI's own basicConfig a no-op: no loss lines)
    logging.basicConfig(level=logging.INFO,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(asctime)s %(name)s: %(message)s")
    # this folder holds harness modules (server.py, ...) that must not shadow ComfyUI's top-level ones
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    from harness import comfy_env

    comfy_env.import_comfy()
    from harness import tiny_dits

    tiny_dits.install_detection_shim()
    tiny_dits.install_text_encoder_shim()
    comfy_env.import_pack()
    from frozentune.controlnet_zero import train

    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main())
