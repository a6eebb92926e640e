"""Test-server shim: lets ComfyUI's stock CLIPVisionLoader load FrozenTune's tiny random CLIP vision stand-in.

The stock loader chooses a full-size config by layer count and returns nothing for anything smaller. This
shim, linked into the e2e/demo server's custom_nodes only (never shipped with the pack), falls back to the
tiny config when the stock detection finds nothing and the weights have exactly its shape (the projection width
read from the file: 1280 for the SDXL stand-in, 64 for the Flux ViT-L one). The model it
returns is a stock ``comfy.clip_vision.ClipVisionModel``, so everything downstream is stock.
"""

import json
import logging
import os
import tempfile

import comfy.clip_vision

CONFIG = os.path.join(os.path.dirname(os.path.realpath(__file__)), "tiny_clip_vision_config.json")
NODE_CLASS_MAPPINGS: dict = {}

_stock = comfy.clip_vision.load_clipvision_from_sd


def _is_tiny(sd) -> bool:
    with open(CONFIG) as f:
        cfg = json.load(f)
    key = "vision_model.encoder.layers.0.layer_norm1.weight"
    last = f"vision_model.encoder.layers.{cfg['num_hidden_layers'] - 1}.layer_norm1.weight"
    beyond = f"vision_model.encoder.layers.{cfg['num_hidden_layers']}.layer_norm1.weight"
    return key in sd and sd[key].shape[0] == cfg["hidden_size"] and last in sd and beyond not in sd


def _config_for(sd) -> str:
    """CONFIG, or a copy with the file's projection width (the Flux ViT-L stand-in's 64-d image_embeds)."""
    with open(CONFIG) as f:
        cfg = json.load(f)
    width = sd["visual_projection.weight"].shape[0] if "visual_projection.weight" in sd else cfg["projection_dim"]
    if width == cfg["projection_dim"]:
        return CONFIG
    path = os.path.join(tempfile.gettempdir(), f"frozentune_tiny_clip_vision_config_p{width}.json")
    with open(path, "w") as f:
        json.dump({**cfg, "projection_dim": width}, f)
    return path


def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
    model = _stock(sd, prefix=prefix, convert_keys=convert_keys)
    if model is None and not convert_keys and _is_tiny(sd):
        model = comfy.clip_vision.ClipVisionModel(_config_for(sd))
        model.load_sd(sd)
        logging.info("FrozenTune test shim: loaded the tiny random CLIP vision stand-in")
    return model


comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd
