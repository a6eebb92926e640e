"""gpu-check probe: peak CUDA memory and per-node step times of the gpu-check server, over HTTP.

Linked into the custom_nodes of the server that ``bench/gpu_check.py`` starts (never shipped with the
pack). The workflows run inside the server process, so only code there can read
``torch.cuda.max_memory_allocated`` and see each ProgressBar update; this adds two routes:

- ``POST /frozentune_gpu_check/reset``: reset the peak-memory counter and the step times.
- ``GET /frozentune_gpu_check/stats``: ``{"max_memory_allocated": bytes or null (no CUDA),
  "steps": {node id: [perf_counter of each progress update]}}``.
"""

from __future__ import annotations

import time

import comfy.utils
import torch
from aiohttp import web
from comfy_execution.utils import get_executing_context
from server import PromptServer

NODE_CLASS_MAPPINGS: dict = {}
_steps: dict[str, list[float]] = {}
_stock_set_hook = comfy.utils.set_progress_bar_global_hook


def _timed(hook):
    """The server's progress hook, also recording when each update of each node happened."""

    def timed(value, total, preview_image, prompt_id=None, node_id=None):
        context = get_executing_context()
        node = node_id if node_id is not None else (context.node_id if context is not None else None)
        _steps.setdefault(str(node), []).append(time.perf_counter())
        return hook(value, total, preview_image, prompt_id=prompt_id, node_id=node_id)

    return timed


def _set_hook(function) -> None:
    _stock_set_hook(_timed(function) if function is not None else None)


# main.py installs its hook after the custom nodes are imported, through this module attribute
comfy.utils.set_progress_bar_global_hook = _set_hook
routes = PromptServer.instance.routes


@routes.post("/frozentune_gpu_check/reset")
async def reset(request: web.Request) -> web.Response:
    _steps.clear()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return web.json_response({"ok": True})


@routes.get("/frozentune_gpu_check/stats")
async def stats(request: web.Request) -> web.Response:
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return web.json_response({"max_memory_allocated": peak, "steps": _steps})
