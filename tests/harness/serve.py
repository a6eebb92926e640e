"""``make serve``: ComfyUI with FrozenTune and the tiny stand-in models, for people who want the page.

Runs in the foreground on http://127.0.0.1:PORT (default 8188) until Ctrl-C. The base directory
is ``build/serve_base``; put real models into its ``models/`` folders to use them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from harness import comfy_env

log = logging.getLogger("frozentune.serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8188)))
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="serve: %(message)s")

    comfy_env.import_comfy()
    from harness.server import ComfyServer, ServerError, prepare_base

    base = prepare_base(comfy_env.REPO_ROOT / "build" / "serve_base")
    try:
        srv = ComfyServer(base, port=args.port, host=args.host)
    except ServerError as err:
        log.error("%s", err)
        return 2
    log.info("ComfyUI with FrozenTune at http://%s:%d (base directory %s; the checkpoints there are "
             "tiny random stand-ins)", args.host, args.port, base)
    cmd = srv.command()
    os.chdir(comfy_env.comfyui_dir())
    os.execv(cmd[0], cmd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
