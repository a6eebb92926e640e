"""FrozenTune: keep the big model frozen, get new behaviour from something small around it.

ComfyUI imports this file when it loads custom nodes. It stays import-safe and cheap:
nothing heavy (torch, diffusers, comfy.*) is imported until ComfyUI asks for the nodes.
"""

__version__ = "0.1.0"
# Served by ComfyUI at /extensions/<this folder>/: the nodes' help pages (docs/<node id>.md), which
# the frontend's node library shows.
WEB_DIRECTORY = "./nodes/web"


def comfy_entrypoint():
    """V3 entry point: ComfyUI calls this to get the extension listing our nodes."""
    from .nodes import FrozenTuneExtension

    return FrozenTuneExtension()
