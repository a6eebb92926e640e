"""IP-Adapter Loader, InstantStyle Apply and the embeds nodes (Encode, Apply Embeds, Combine, Save, Load):
thin V3 wrappers over ``instantstyle``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..instantstyle import adapter_file, apply, attention, blocks, flux_adapter_file, flux_apply, flux_blocks
from ..instantstyle import embeds as style_embeds
from ..storage import names
from ..storage import safetensors_file as weights_file
from . import checks, saved_files

log = logging.getLogger(__name__)

CATEGORY = "FrozenTune/InstantStyle"
FOLDER = "ipadapter"
EMBEDS_FOLDER = "ipadapter_embeds"
# Our own socket types, prefixed FROZENTUNE_: cubiq's ComfyUI_IPAdapter_plus uses IPADAPTER (a dict of his
# models) and EMBEDS (a bare tensor), so sharing a name would let the frontend link either pack's value
# into the other's nodes, where it fails deep inside (tests/node/test_instantstyle_beside_ipadapter_plus.py).
# Renamed from IPADAPTER / IPADAPTER_EMBEDS: saved workflows still run, the server checks a link by the
# source node's RETURN_TYPES, not by the type string saved in the workflow (execution.py validate_inputs).
IPAdapterType = io.Custom("FROZENTUNE_IPADAPTER")
EmbedsType = io.Custom("FROZENTUNE_IPADAPTER_EMBEDS")
# One socket type per adapter family: Flux IP-Adapters (XLabs, InstantX) never link into the SD nodes or back.
# Not XLabs' IP_ADAPTER_FLUX nor Shakker-Labs' IP_ADAPTER_FLUX_INSTANTX: their values are other objects.
FluxIPAdapterType = io.Custom("FROZENTUNE_FLUX_IPADAPTER")

# models/ipadapter/ (the folder name other IP-Adapter packs use too, so files are found by both).
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)],
                                                   {".safetensors", ".bin"})
# models/ipadapter_embeds/: embeds written by InstantStyle Save Embeds, listed by Load Embeds.
if EMBEDS_FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[EMBEDS_FOLDER] = ([os.path.join(folder_paths.models_dir, EMBEDS_FOLDER)],
                                                          {".safetensors"})

PRESET_TIP = ("Blocks that receive the image: style (SDXL output 1), layout (SDXL input 8), style+layout, all blocks "
              "(the original IP-Adapter), custom (custom_blocks with a weight per block), or precise style (style "
              "block at weight, the layout block's image tokens on the unconditional side).")
CUSTOM_TIP = ("For preset 'custom': comma-separated blocks with optional weights (factors on weight), e.g. "
              "'output 1:1.0, input 8:0.5, middle 0' (or diffusers names like up_blocks.0.attentions.1:0.8). "
              "Checked against the model: a block it lacks is an error listing the ones it has.")
SCALING_TIP = ("Where the weight acts: V only (weight x the image attention; the official/diffusers maths), K+V (keys "
               "and values scaled, which also sharpens or flattens the attention), K+V w/ C penalty (K+V with weight "
               "x width/1280, so SDXL's 640-wide layers get half).")


def model_input() -> io.Model.Input:
    return io.Model.Input("model", tooltip="The model to style (SD1.5 or SDXL family). It is not modified.")


def window_inputs() -> list[io.Float.Input]:
    return [io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                           tooltip="Fraction of the schedule where the image attention starts (by sigma)."),
            io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                           tooltip="Fraction of the schedule where it stops.")]


def subtraction_inputs() -> list:
    return [io.String.Input("content_text", default="", tooltip="What the reference shows (e.g. 'a cat'): its CLIP "
                            "text embedding is subtracted from the image embedding to keep its content out. Needs "
                            "the clip input; plain adapters only."),
            io.Float.Input("subtract", default=0.5, min=0.0, max=2.0, step=0.05,
                           tooltip="Scale of the content subtraction: image_embeds - subtract * text_embeds "
                           "(official gradio default 0.5). Ignored while content_text is empty.")]


def plus_negative_input() -> io.Combo.Input:
    # The last widget: saved workflows store widget values by position, so one added at the end leaves the
    # older values where they were (a workflow saved before it gets the default). Optional, so an API prompt
    # written before it still validates.
    return io.Combo.Input("plus_negative", options=list(apply.PLUS_NEGATIVES), default=apply.PLUS_NEGATIVE_ZEROS,
                          optional=True,
                          tooltip="Plus adapters without a negative image: the unconditional tokens come from zero "
                          "pixels after CLIP normalisation (official IP-Adapter, diffusers) or from a black image "
                          "(cubiq's IPAdapter_plus). Plain adapters use zero embeds either way.")


def mask_input() -> io.Mask.Input:
    return io.Mask.Input("attn_mask", optional=True, tooltip="Optional mask: where in the picture the style "
                         "image acts (1) and where not (0).")


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
                model_input(),
                IPAdapterType.Input("ipadapter", tooltip="From IP-Adapter Loader; it must match the model family."),
                io.ClipVision.Input("clip_vision", tooltip="The adapter's image encoder from the stock CLIPVisionLoader "
                                    "(ViT-bigG for ip-adapter_sdxl, ViT-H for the vit-h and SD1.5 adapters)."),
                io.Image.Input("image", tooltip="The style reference. Several images are averaged or their tokens "
                               "concatenated (see combine_images)."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of the image attention (1 = the official scale; 0 = no effect)."),
                io.Combo.Input("preset", options=list(blocks.PRESET_NAMES), default="style", tooltip=PRESET_TIP),
                io.String.Input("custom_blocks", default="output 1", tooltip=CUSTOM_TIP),
                io.Combo.Input("combine_images", options=list(apply.COMBINE_MODES), default="average",
                               tooltip="Several style images: average their embeddings, concatenate their tokens "
                               "(every image attended to at once), or batch (image i styles latent i of the "
                               "batch; the last image repeats)."),
                *subtraction_inputs(),
                *window_inputs(),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder for content_text, in the image encoder's "
                              "space: the SDXL CLIP (clip_g pooled, 1280-d) for ViT-bigG adapters."),
                io.Image.Input("negative_image", optional=True, tooltip="Optional image for the unconditional "
                               "branch instead of the zero embedding (e.g. noise, or what to steer away from)."),
                mask_input(),
                plus_negative_input(),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, clip_vision, image, weight, preset, custom_blocks, combine_images,
                content_text, subtract, start_at, end_at, clip=None, negative_image=None,
                attn_mask=None, plus_negative=apply.PLUS_NEGATIVE_ZEROS) -> io.NodeOutput:
        checks.finite(weight=weight, subtract=subtract, start_at=start_at, end_at=end_at)
        settings = apply.StyleSettings(weight=weight, preset=preset, custom_blocks=custom_blocks,
                                       combine=combine_images, subtract=subtract, start=start_at, end=end_at,
                                       plus_negative=plus_negative)
        check_sd_pair(ipadapter, model)
        chosen = apply.select_layers(model, ipadapter, settings)
        content_pooled = content_embedding(clip, content_text, subtract)
        cond, uncond = apply.encode_tokens(ipadapter, clip_vision, image, settings, negative_image, content_pooled)
        return io.NodeOutput(apply.patch_model(model, ipadapter, chosen, cond, uncond, settings, attn_mask))


def check_sd_pair(ipadapter, model=None) -> None:
    """Refuse a Flux adapter, or a Flux/SD3 MODEL, in the SD1.5/SDXL nodes, naming both (the HTTP API skips the
    socket types, so a prompt can send anything)."""
    from .. import families

    family = families.family_of(model) if model is not None else None
    if not isinstance(ipadapter, adapter_file.IPAdapter):
        on = f" for MODEL {family.label}" if family is not None else ""
        raise ValueError(f"InstantStyle (SD1.5/SDXL) got {flux_apply.adapter_label(ipadapter)}{on}, which is not an "
                         "SD1.5/SDXL IP-Adapter: use the Flux nodes (InstantStyle Apply (Flux)) for Flux adapters.")
    if family is None:
        return
    if family.arch == "dit" or (family.known and family.id not in (families.SD15, families.SDXL)):
        raise ValueError(f"the IP-Adapter {ipadapter.name} is {ipadapter.family} but MODEL is {family.label}: "
                         "load a Flux IP-Adapter (Flux IP-Adapter Loader) and use InstantStyle Apply (Flux) on Flux.1, "
                         "or connect an SD1.5/SDXL model.")


def content_embedding(clip, content_text: str, subtract: float):
    """The pooled text embedding of content_text (None when nothing is to be subtracted)."""
    if not content_text.strip() or subtract == 0:
        return None
    if clip is None:
        raise ValueError("content_text is set but the clip input is empty: connect the text encoder "
                         "(the SDXL CLIP for ViT-bigG adapters), or clear content_text.")
    _, pooled = clip.encode_from_tokens(clip.tokenize(content_text), return_pooled=True)
    return pooled.float()


class InstantStyleEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleEncode",
            display_name="InstantStyle Encode",
            category=CATEGORY,
            description=(
                "Encodes style image(s) once into embeds (the CLIP-vision features the IP-Adapter projects, "
                "minus the content text embedding when content_text is set), to apply, combine or save. "
                "negative_embeds are the negative image's features, or the reference's zeros (Plus adapters: "
                "zero pixels, or a black image as cubiq's pack does; see plus_negative)."
            ),
            inputs=[
                IPAdapterType.Input("ipadapter", tooltip="From IP-Adapter Loader: says which features to keep "
                                    "(image embeds for plain adapters, patch tokens for Plus) and their width."),
                io.ClipVision.Input("clip_vision", tooltip="The adapter's image encoder from the stock "
                                    "CLIPVisionLoader (ViT-bigG for ip-adapter_sdxl)."),
                io.Image.Input("image", tooltip="The style reference(s); every image is kept (one row each)."),
                *subtraction_inputs(),
                io.Clip.Input("clip", optional=True, tooltip="Text encoder for content_text: the SDXL CLIP "
                              "(clip_g pooled, 1280-d) for ViT-bigG adapters."),
                io.Image.Input("negative_image", optional=True, tooltip="Image(s) for the unconditional side "
                               "instead of the zero embedding."),
                plus_negative_input(),
            ],
            outputs=[EmbedsType.Output(display_name="embeds", tooltip="The style embeds, one row per image."),
                     EmbedsType.Output(display_name="negative_embeds", tooltip="The unconditional embeds.")],
        )

    @classmethod
    def execute(cls, ipadapter, clip_vision, image, content_text, subtract, clip=None,
                negative_image=None, plus_negative=apply.PLUS_NEGATIVE_ZEROS) -> io.NodeOutput:
        checks.finite(subtract=subtract)
        checks.choice("plus_negative", plus_negative, apply.PLUS_NEGATIVES)
        check_sd_pair(ipadapter)
        pooled = content_embedding(clip, content_text, subtract)
        embeds, negative = apply.encode_embeds(ipadapter, clip_vision, image, subtract, pooled, negative_image,
                                               plus_negative)
        log.info("InstantStyle Encode: %s", embeds.describe())
        return io.NodeOutput(embeds, negative)


class InstantStyleApplyEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleApplyEmbeds",
            display_name="InstantStyle Apply Embeds",
            category=CATEGORY,
            description=(
                "InstantStyle Apply from embeds (InstantStyle Encode, Combine Embeds or Load Embeds) instead of "
                "images, so one encoding serves many generations. composition_embeds give the layout block its "
                "own image (style from one image, composition from another); weight and composition_weight are "
                "the style and layout blocks' sliders. Returns a patched copy of MODEL."
            ),
            inputs=[
                model_input(),
                IPAdapterType.Input("ipadapter", tooltip="From IP-Adapter Loader; the embeds must come from its "
                                    "image encoder."),
                EmbedsType.Input("embeds", tooltip="Style embeds (one or more images)."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of the image attention in the style block (and every other block "
                               "the preset patches); 1 = the official scale, 0 = no effect."),
                io.Float.Input("composition_weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength in the layout block for presets style+layout and precise style "
                               "(cubiq's weight_composition / style_boost)."),
                io.Combo.Input("preset", options=list(blocks.PRESET_NAMES), default="style+layout",
                               tooltip=PRESET_TIP),
                io.String.Input("custom_blocks", default="output 1:1.0, input 8:0.5", tooltip=CUSTOM_TIP),
                io.Combo.Input("combine_embeds", options=list(apply.COMBINE_MODES), default="average",
                               tooltip="Several images in the embeds: average their features, concatenate their "
                               "tokens, or batch (image i styles latent i; the last repeats)."),
                io.Combo.Input("embeds_scaling", options=list(attention.SCALING_MODES), default="V only",
                               tooltip=SCALING_TIP),
                *window_inputs(),
                EmbedsType.Input("negative_embeds", optional=True, tooltip="Unconditional embeds (from Encode or "
                                 "Load Embeds); empty = the zero embedding (plain adapters; Plus needs them)."),
                EmbedsType.Input("composition_embeds", optional=True, tooltip="Embeds for the layout block only "
                                 "(needs a preset with the layout block); empty = the style embeds."),
                mask_input(),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, ipadapter, embeds, weight, composition_weight, preset, custom_blocks, combine_embeds,
                embeds_scaling, start_at, end_at, negative_embeds=None, composition_embeds=None,
                attn_mask=None) -> io.NodeOutput:
        checks.finite(weight=weight, composition_weight=composition_weight, start_at=start_at, end_at=end_at)
        settings = apply.StyleSettings(weight=weight, preset=preset, custom_blocks=custom_blocks,
                                       combine=combine_embeds, start=start_at, end=end_at, scaling=embeds_scaling,
                                       composition_weight=composition_weight)
        check_sd_pair(ipadapter, model)
        chosen = apply.select_layers(model, ipadapter, settings)
        cond, uncond = apply.tokens_from_embeds(ipadapter, embeds, negative_embeds, combine_embeds)
        composition = None
        if composition_embeds is not None:
            style_embeds.check_fits(composition_embeds, ipadapter.projection, ipadapter.embed_width, ipadapter.name,
                                    "composition_embeds")
            composition = apply.style_tokens(ipadapter, composition_embeds.features, combine_embeds)
        return io.NodeOutput(apply.patch_model(model, ipadapter, chosen, cond, uncond, settings, attn_mask,
                                               composition))


class InstantStyleCombineEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleCombineEmbeds",
            display_name="InstantStyle Combine Embeds",
            category=CATEGORY,
            description=("Combines up to four embeds: concat keeps every image (Apply then averages, "
                         "concatenates or batches them), average makes one image of all, weighted makes one image "
                         "sum(w_i * e_i) / sum(w_i) from the inputs' means."),
            inputs=[
                io.Combo.Input("method", options=list(style_embeds.COMBINE_METHODS), default="average",
                               tooltip="concat (all images kept), average (the mean of every image's features) "
                               "or weighted (the inputs' means weighted by weight_1..4, divided by their sum)."),
                EmbedsType.Input("embeds_1", tooltip="Embeds from Encode, Load Embeds or another Combine."),
                io.Float.Input("weight_1", default=1.0, min=-5.0, max=5.0, step=0.05,
                               tooltip="Weight of embeds_1 (method weighted only)."),
                EmbedsType.Input("embeds_2", optional=True, tooltip="More embeds (same image encoder)."),
                io.Float.Input("weight_2", default=1.0, min=-5.0, max=5.0, step=0.05, optional=True,
                               tooltip="Weight of embeds_2 (method weighted only)."),
                EmbedsType.Input("embeds_3", optional=True, tooltip="More embeds (same image encoder)."),
                io.Float.Input("weight_3", default=1.0, min=-5.0, max=5.0, step=0.05, optional=True,
                               tooltip="Weight of embeds_3 (method weighted only)."),
                EmbedsType.Input("embeds_4", optional=True, tooltip="More embeds (same image encoder)."),
                io.Float.Input("weight_4", default=1.0, min=-5.0, max=5.0, step=0.05, optional=True,
                               tooltip="Weight of embeds_4 (method weighted only)."),
            ],
            outputs=[EmbedsType.Output(display_name="embeds", tooltip="The combined embeds.")],
        )

    @classmethod
    def execute(cls, method, embeds_1, weight_1, embeds_2=None, weight_2=1.0, embeds_3=None, weight_3=1.0,
                embeds_4=None, weight_4=1.0) -> io.NodeOutput:
        checks.finite(weight_1=weight_1, weight_2=weight_2, weight_3=weight_3, weight_4=weight_4)
        checks.choice("method", method, style_embeds.COMBINE_METHODS)
        pairs = [(e, w) for e, w in ((embeds_1, weight_1), (embeds_2, weight_2), (embeds_3, weight_3),
                                     (embeds_4, weight_4)) if e is not None]
        return io.NodeOutput(style_embeds.combine([e for e, _ in pairs], method, [w for _, w in pairs]))


class InstantStyleSaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleSaveEmbeds",
            display_name="InstantStyle Save Embeds",
            category=CATEGORY,
            is_output_node=True,
            description=("Saves embeds (and their negative) as a safetensors file in models/ipadapter_embeds/, "
                         "listed by InstantStyle Load Embeds. Its outputs are the embeds read back from the file, "
                         "so what follows uses exactly what was saved."),
            inputs=[
                EmbedsType.Input("embeds", tooltip="The embeds to save."),
                io.String.Input("filename", default="ipadapter_embeds/style", tooltip="File name in "
                                "models/ipadapter_embeds/ (sub-folders allowed, e.g. 'paintings/monet'). A counter "
                                "is appended if the file exists."),
                EmbedsType.Input("negative_embeds", optional=True, tooltip="Saved with them, so Load Embeds "
                                 "returns both."),
            ],
            outputs=[EmbedsType.Output(display_name="embeds", tooltip="The embeds as read back from the file."),
                     EmbedsType.Output(display_name="negative_embeds", tooltip="The negative embeds as read back "
                                       "(empty when none were saved)."),
                     io.String.Output(display_name="path", tooltip="Where the file was written.")],
        )

    @classmethod
    def fingerprint_inputs(cls, embeds=None, filename=None, negative_embeds=None) -> int:
        # Runs again (writing the file again) when the file it wrote for these inputs was deleted.
        return saved_files.fingerprint(cls.__name__, filename=filename)

    @classmethod
    def execute(cls, embeds, filename, negative_embeds=None) -> io.NodeOutput:
        folders = {EMBEDS_FOLDER: Path(folder_paths.get_folder_paths(EMBEDS_FOLDER)[0])}
        folder, stem = names.save_target(filename, input_name="filename", folders=folders, default=EMBEDS_FOLDER)
        path = weights_file.unused_path(folder, stem)
        style_embeds.save(path, embeds, negative_embeds)
        saved_files.remember(cls.__name__, path, filename=filename)
        log.info("InstantStyle: saved %s to %s", embeds.describe(), path)
        back, negative = style_embeds.load(path)
        return io.NodeOutput(back, negative, str(path))


class InstantStyleLoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleLoadEmbeds",
            display_name="InstantStyle Load Embeds",
            category=CATEGORY,
            description="Loads embeds written by InstantStyle Save Embeds from models/ipadapter_embeds/.",
            inputs=[io.Combo.Input("embeds_file", options=folder_paths.get_filename_list(EMBEDS_FOLDER),
                                   tooltip="A file from models/ipadapter_embeds/.")],
            outputs=[EmbedsType.Output(display_name="embeds", tooltip="The saved embeds."),
                     EmbedsType.Output(display_name="negative_embeds", tooltip="The saved negative embeds (empty "
                                       "when none were saved).")],
        )

    @classmethod
    def execute(cls, embeds_file) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(EMBEDS_FOLDER, embeds_file)
        embeds, negative = style_embeds.load(path)
        log.info("InstantStyle: loaded %s from %s", embeds.describe(), embeds_file)
        return io.NodeOutput(embeds, negative)


FLUX_PRESET_TIP = ("Blocks that get the image (provisional until tried on real weights): all (every block the "
                   "adapter has; the reference), style (double 10-18, single 10-37), layout (double 0-9, single 0-9) "
                   "or custom. Single-stream split from SplitFlux (arXiv 2511.15258); the double-stream split is a "
                   "guess.")
FLUX_CUSTOM_TIP = ("For preset 'custom': comma-separated blocks with optional weights (factors on weight), e.g. "
                   "'double 10-18:1.0, single 10-37:0.8' (or double_blocks.3). Only blocks the adapter has weights "
                   "for: XLabs covers the 19 double blocks.")
SIGLIP_NONE = "none"


def flux_adapter_input() -> io.Custom.Input:
    return FluxIPAdapterType.Input("flux_ipadapter", tooltip="From Flux IP-Adapter Loader (XLabs or InstantX); an "
                                   "SD1.5/SDXL IP-Adapter is refused.")


def flux_block_inputs(weight_tip: str) -> list:
    return [io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05, tooltip=weight_tip),
            io.Combo.Input("preset", options=list(flux_blocks.PRESETS), default="all", tooltip=FLUX_PRESET_TIP),
            io.String.Input("custom_blocks", default="double 10-18", tooltip=FLUX_CUSTOM_TIP)]


def flux_subtraction_inputs() -> list:
    return [io.String.Input("content_text", default="", tooltip="What the reference shows (e.g. 'a cat'): its "
                            "CLIP-L text embedding (text projection applied) is subtracted from the CLIP ViT-L image "
                            "embedding. Needs the clip input; XLabs adapters only."),
            io.Float.Input("subtract", default=0.5, min=0.0, max=2.0, step=0.05,
                           tooltip="Scale of the content subtraction: image_embeds - subtract * text_embeds. "
                           "Ignored while content_text is empty.")]


def flux_content(clip, content_text: str, subtract: float, adapter):
    if not content_text.strip() or subtract == 0:
        return None
    if clip is None:
        raise ValueError("content_text is set but the clip input is empty: connect the Flux CLIP (clip_l + t5xxl), "
                         "or clear content_text.")
    return flux_apply.content_embedding(clip, content_text, adapter)


class FluxIPAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneFluxIPAdapterLoader",
            display_name="Flux IP-Adapter Loader",
            category=CATEGORY,
            description=(
                "Loads a Flux.1 IP-Adapter from models/ipadapter/: XLabs (flux-ip-adapter, CLIP ViT-L image embeds, "
                "double blocks) or InstantX (FLUX.1-dev-IP-Adapter, SigLIP, double and single blocks). Other files "
                "(SD1.5/SDXL adapters, damaged files) are refused with the format expected."
            ),
            inputs=[
                io.Combo.Input("flux_ipadapter_file", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A Flux IP-Adapter file from models/ipadapter/, e.g. XLabs' "
                               "flux-ip-adapter.safetensors or InstantX's ip-adapter.bin."),
                io.Combo.Input("siglip_file", options=[SIGLIP_NONE, *folder_paths.get_filename_list("clip_vision")],
                               default=SIGLIP_NONE, optional=True,
                               tooltip="InstantX adapters only: the SigLIP so400m-384 file (the one CLIP Vision "
                               "Loader loads), for its pooling head. Ignored for XLabs."),
            ],
            outputs=[FluxIPAdapterType.Output(display_name="FLUX_IPADAPTER", tooltip="The adapter, for InstantStyle "
                                              "Apply (Flux) and Encode (Flux).")],
        )

    @classmethod
    def execute(cls, flux_ipadapter_file, siglip_file=SIGLIP_NONE) -> io.NodeOutput:
        checks.choice("siglip_file", siglip_file, [SIGLIP_NONE, *folder_paths.get_filename_list("clip_vision")])
        path = folder_paths.get_full_path_or_raise(FOLDER, flux_ipadapter_file)
        adapter = flux_adapter_file.load(path)
        if siglip_file and siglip_file != SIGLIP_NONE and hasattr(adapter, "with_siglip_head"):
            adapter = adapter.with_siglip_head(folder_paths.get_full_path_or_raise("clip_vision", siglip_file))
        log.info("Flux IP-Adapter: %s", flux_adapter_file.describe(adapter))
        return io.NodeOutput(adapter)


class InstantStyleApplyFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleApplyFlux",
            display_name="InstantStyle Apply (Flux)",
            category=CATEGORY,
            description=(
                "Transfers the style of an image to Flux.1 with an XLabs or InstantX IP-Adapter injected only into "
                "chosen transformer blocks, with a weight per block; optionally subtracts the reference's content "
                "(CLIP-L text embedding, XLabs). Presets style/layout are provisional. Returns a patched copy of "
                "MODEL; the input MODEL is untouched."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The Flux.1 model to style (dev or schnell). It is not modified."),
                flux_adapter_input(),
                io.ClipVision.Input("clip_vision", tooltip="The adapter's image encoder from the stock "
                                    "CLIPVisionLoader: CLIP ViT-L/14 for XLabs, SigLIP so400m-384 for InstantX."),
                io.Image.Input("image", tooltip="The style reference. Several images are averaged or their tokens "
                               "concatenated (see combine_images)."),
                *flux_block_inputs("Strength of the image attention (XLabs' ip_scale; 1 = the reference scale, 0 = "
                                   "no effect)."),
                io.Combo.Input("combine_images", options=list(flux_apply.COMBINE_MODES), default="average",
                               tooltip="Several style images: average their features, or concatenate their tokens."),
                *flux_subtraction_inputs(),
                *window_inputs(),
                io.Clip.Input("clip", optional=True, tooltip="The Flux CLIP (clip_l + t5xxl) for content_text: its "
                              "CLIP-L embeds the text in CLIP ViT-L space."),
                io.Image.Input("negative_image", optional=True, tooltip="Optional image for the unconditional side "
                               "(true CFG only) instead of x-flux's black image."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, flux_ipadapter, clip_vision, image, weight, preset, custom_blocks, combine_images,
                content_text, subtract, start_at, end_at, clip=None, negative_image=None) -> io.NodeOutput:
        checks.finite(weight=weight, subtract=subtract, start_at=start_at, end_at=end_at)
        settings = flux_apply.FluxStyleSettings(weight=weight, preset=preset, custom_blocks=custom_blocks,
                                                combine=combine_images, subtract=subtract, start=start_at, end=end_at)
        adapter, chosen = flux_apply.prepare(model, flux_ipadapter, settings)
        content = flux_content(clip, content_text, subtract, adapter)
        features, negative = flux_apply.encode_embeds(adapter, clip_vision, image, subtract, content, negative_image)
        cond = flux_apply.tokens(adapter, features, combine_images)
        uncond = flux_apply.tokens(adapter, negative, "average")
        return io.NodeOutput(flux_apply.patch_model(model, adapter, chosen, cond, uncond, settings))


class InstantStyleEncodeFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleEncodeFlux",
            display_name="InstantStyle Encode (Flux)",
            category=CATEGORY,
            description=(
                "Encodes style image(s) once into embeds for a Flux IP-Adapter (its image encoder's features, minus "
                "the content text embedding when content_text is set), to apply, combine or save with the "
                "InstantStyle embeds nodes. negative_embeds: the negative image's features, else a black image's."
            ),
            inputs=[
                flux_adapter_input(),
                io.ClipVision.Input("clip_vision", tooltip="The adapter's image encoder (CLIP ViT-L/14 for XLabs)."),
                io.Image.Input("image", tooltip="The style reference(s); every image is kept (one row each)."),
                *flux_subtraction_inputs(),
                io.Clip.Input("clip", optional=True, tooltip="The Flux CLIP (clip_l + t5xxl) for content_text."),
                io.Image.Input("negative_image", optional=True, tooltip="Image(s) for the unconditional side "
                               "instead of a black image."),
            ],
            outputs=[EmbedsType.Output(display_name="embeds", tooltip="The style embeds, one row per image."),
                     EmbedsType.Output(display_name="negative_embeds", tooltip="The unconditional embeds.")],
        )

    @classmethod
    def execute(cls, flux_ipadapter, clip_vision, image, content_text, subtract, clip=None,
                negative_image=None) -> io.NodeOutput:
        checks.finite(subtract=subtract)
        adapter = flux_apply.check_adapter(flux_ipadapter)
        content = flux_content(clip, content_text, subtract, adapter)
        features, negative = flux_apply.encode_embeds(adapter, clip_vision, image, subtract, content, negative_image)
        source = "image" if content is None else f"image minus {subtract:g} x content text"
        embeds = flux_apply.as_style_embeds(adapter, features, source)
        log.info("InstantStyle Encode (Flux): %s", embeds.describe())
        return io.NodeOutput(embeds, flux_apply.as_style_embeds(adapter, negative, "negative"))


class InstantStyleApplyEmbedsFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneInstantStyleApplyEmbedsFlux",
            display_name="InstantStyle Apply Embeds (Flux)",
            category=CATEGORY,
            description=("InstantStyle Apply (Flux) from embeds (Encode (Flux), Combine or Load Embeds) instead of "
                         "images, so one encoding serves many generations. Returns a patched copy of MODEL."),
            inputs=[
                io.Model.Input("model", tooltip="The Flux.1 model to style. It is not modified."),
                flux_adapter_input(),
                EmbedsType.Input("embeds", tooltip="Style embeds made with this adapter's image encoder."),
                *flux_block_inputs("Strength of the image attention (1 = the reference scale, 0 = no effect)."),
                io.Combo.Input("combine_embeds", options=list(flux_apply.COMBINE_MODES), default="average",
                               tooltip="Several images in the embeds: average their features, or concatenate their "
                               "tokens."),
                *window_inputs(),
                EmbedsType.Input("negative_embeds", optional=True, tooltip="Unconditional embeds (from Encode "
                                 "(Flux) or Load Embeds); empty = zero embeds."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="A patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, flux_ipadapter, embeds, weight, preset, custom_blocks, combine_embeds, start_at, end_at,
                negative_embeds=None) -> io.NodeOutput:
        checks.finite(weight=weight, start_at=start_at, end_at=end_at)
        settings = flux_apply.FluxStyleSettings(weight=weight, preset=preset, custom_blocks=custom_blocks,
                                                combine=combine_embeds, start=start_at, end=end_at)
        adapter, chosen = flux_apply.prepare(model, flux_ipadapter, settings)
        flux_apply.check_embeds(adapter, embeds)
        negative = negative_embeds.features if negative_embeds is not None else torch.zeros_like(embeds.features[:1])
        if negative_embeds is not None:
            flux_apply.check_embeds(adapter, negative_embeds, "negative_embeds")
        cond = flux_apply.tokens(adapter, embeds.features, combine_embeds)
        uncond = flux_apply.tokens(adapter, negative, "average")
        return io.NodeOutput(flux_apply.patch_model(model, adapter, chosen, cond, uncond, settings))


NODES = [IPAdapterLoader, InstantStyleApply, InstantStyleEncode, InstantStyleApplyEmbeds, InstantStyleCombineEmbeds,
         InstantStyleSaveEmbeds, InstantStyleLoadEmbeds, FluxIPAdapterLoader, InstantStyleApplyFlux,
         InstantStyleEncodeFlux, InstantStyleApplyEmbedsFlux]
