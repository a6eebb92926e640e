"""ComfyUI V3 nodes of FrozenTune: schemas, input checks and progress only.

The algorithms live in the capability packages (``unitune/``, ``textual_inversion/``, ``guidance/``,
``instantstyle/``, ``controlnet_zero/``); a node
here reads its inputs, calls them and wraps the result.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import (
    controlnet_zero_nodes,
    guidance_nodes,
    instantstyle_nodes,
    textual_inversion_nodes,
    unitune_nodes,
)

# Every node class of the pack, in menu order. Node ids start with "FrozenTune" and never change.
NODE_CLASSES: list[type[io.ComfyNode]] = [*unitune_nodes.NODES, *guidance_nodes.NODES, *instantstyle_nodes.NODES,
                                            *controlnet_zero_nodes.NODES, *textual_inversion_nodes.NODES]


class FrozenTuneExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
