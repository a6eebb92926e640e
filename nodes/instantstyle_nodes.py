"""IP-Adapter Loader and InstantStyle Apply: thin V3 wrappers over ``instantstyle``."""

from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from ..instantstyle import adapter_file, apply, blocks
from . import checks

log = logging.getLogger(__name__)

CATEGORY = "FrozenTune/InstantStyle"
FOLDER = "ipadapter"
IPAdapterType = io.Custom("IPADAPTER")

# models/ipadapter/ (the folder name other IP-Adapter packs use too, so files are found by both).
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                   {".safetensors", ".bin"})


class IPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneIPAdapterLoader",
            display_name="IP-Adapter Loader",
            category=CATEGORY,
            description=(
                "Loads IP-Adapter weights (.safetensors, or a legacy .bin read weights-only) from models/ipadapter/ "
                "and detects what they fit: SD1.5 (768-d) or SDXL (2048-d), plain 4-token or Plus (Resampler) "
                "projection, and the CLIP vision encoder (ViT-H or ViT-bigG) to load with the stock CLIPVisionLoader."
            ),
            inputs=[
                io.Combo.Input("ipadapter_file", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="An IP-Adapter file from models/ipadapter/, e.g. ip-adapter_sdxl.safetensors "
                               "(the InstantStyle default, ViT-bigG)."),
            ],
            outputs=[IPAdapterType.Output(display_name="IPADAPTER", tooltip="The adapter weights, for InstantStyle "
                                          "Apply.")],
        )

    @classmethod
    def execute(cls, ipadapter_file) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, ipadapter_file)
        adapter = adapter_file.load(path)
        log.info("IP-Adapter: %s", adapter.describe())
        return io.NodeOutput(adapter)


class InstantStyleApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleApply",
            display_name="InstantStyle Apply",
            category=CATEGORY,
            description=(
                "Transfers the style of an image with an IP-Adapter injected only into chosen blocks (InstantStyle): "
                "SDXL 'style' = up_blocks.0.attentions.1 = ComfyUI output 1, 'layout' = input 8. Optionally subtracts "
                "the CLIP text embedding of the reference's content from the image embedding, so its subject does "
                "not leak. Returns a patched copy of MODEL; other blocks run the stock attention, the input MODEL "
                "is untouched. SD1.5 presets are experimental (style = up_blocks.1; layout = down_blocks.2 + middle)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to style (SD1.5 or SDXL family). It is not modified."),
                IPAdapterType.Input("ipadapter", tooltip="From IP-Adapter Loader; it must match the model family."),
                io.ClipVision.Input("clip_vision", tooltip="The adapter's image encoder from the stock CLIPVisionLoader "
                                    "(ViT-bigG for ip-adapter_sdxl, ViT-H for the vit-h and SD1.5 adapters)."),
                io.Image.Input("image", tooltip="The style reference. Several images are averaged or their tokens "
                               "concatenated (see combine_images)."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of the image attention (1 = the official scale; 0 = no effect)."),
                io.Combo.Input("preset", options=list(blocks.PRESET_NAMES), default="style",
                               tooltip="Blocks that receive the image: style (SDXL output 1), layout (SDXL input 8), "
                               "style+layout, all blocks (the original IP-Adapter), or custom."),
                io.String.Input("custom_blocks", default="output 1", tooltip="For preset 'custom': comma-separated "
                                "block keys such as 'output 1, input 8, middle 0' (or diffusers names like "
                                "up_blocks.0.attentions.1). Checked against the model."),
                io.Combo.Input("combine_images", options=list(apply.COMBINE_MODES), default="average",
                               tooltip="Several style images: average their embeddings, or concatenate their tokens "
                               "(every image attended to at once)."),
                io.String.Input("content_text", default="", tooltip="What the reference shows (e.g. 'a cat'): its "
                                "CLIP text embedding is subtracted from the image embedding to keep its content "
                                "out. Needs the clip input; plain adapters only."),
                io.Float.Input("subtract", default=0.5, min=0.0, max=2.0, step=0.05,
                               tooltip="Scale of the content subtraction: image_embeds - subtract * text_embeds "
                               "(official gradio default 0.5). Ignored while content_text is empty."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where the image attention starts (by sigma)."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where it stops."),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder for content_text, in the image encoder's "
                              "space: the SDXL CLIP (clip_g pooled, 1280-d) for ViT-bigG adapters."),
                io.Image.Input("negative_image", optional=True, tooltip="Optional image for the unconditional "
                               "branch instead of the zero embedding (e.g. noise, or what to steer away from)."),
                io.Mask.Input("attn_mask", optional=True, tooltip="Optional mask: where in the picture the style "
                              "image acts (1) and where not (0)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, preset, custom_blocks, combine_images,
                content_text, subtract, start_at, end_at, clip=None, negative_image=None,
                attn_mask=None) -> io.NodeOutput:
        checks.finite(weight=weight, subtract=subtract, start_at=start_at, end_at=end_at)
        settings = apply.StyleSettings(weight=weight, preset=preset, custom_blocks=custom_blocks,
                                       combine=combine_images, subtract=subtract, start=start_at, end=end_at)
        chosen = apply.select_layers(model, ipadapter, settings)
        content_pooled = None
        if content_text.strip() and subtract != 0:
            if clip is None:
                raise ValueError("content_text is set but the clip input is empty: connect the text encoder "
                                 "(the SDXL CLIP for ViT-bigG adapters), or clear content_text.")
            _, content_pooled = clip.encode_from_tokens(clip.tokenize(content_text), return_pooled=True)
            content_pooled = content_pooled.float()
        cond, uncond = apply.encode_tokens(ipadapter, clip_vision, image, settings, negative_image, content_pooled)
        return io.NodeOutput(apply.patch_model(model, ipadapter, chosen, cond, uncond, settings, attn_mask))


NODES = [IPAdapterLoader, InstantStyleApply]
