"""Textual Inversion Train: a thin V3 node over ``textual_inversion.word_trainer`` (schema, checks, progress, save)."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..storage import safetensors_file as weights_file
from ..storage import user_paths
from ..textual_inversion import private_words
from ..textual_inversion import word_trainer as ti
from ..textual_inversion.embedding_file import embedding_target
from ..training import image_folder
from ..training.image_folder import prepare_images
from ..training.loss_curve import loss_curve_image
from . import checks, saved_files, training_inputs

log = logging.getLogger(__name__)

CATEGORY = "FrozenTune/Textual Inversion"

CAPTIONS_TOOLTIP = (
    "Captions the new word is trained in: object templates (default) / style templates take one of the paper's "
    "short templates per step ('a photo of a {}', 'a painting in the style of {}'); token alone is the bare "
    "word, as UniTune trains.")
PRECISION_TOOLTIP = training_inputs.precision_tooltip("the vectors train in fp32 and the models keep their load dtype")

FOLDER_TOOLTIP = (
    "Instead of the image input: a folder of same-size views of the concept (.png, .jpg, .jpeg, .webp, .bmp), "
    "inside ComfyUI's input folder or a folder listed in FROZENTUNE_DATA_DIRS. Leave empty to train on the "
    "image input; giving both is refused.")

PREVIEW_TOOLTIP = (
    "Draw a preview every N steps (0 = off): the first caption of the captions choice sampled from a fixed "
    "noise with the current vectors, shown in the node and gathered in the previews output. The trained "
    "vectors are identical with previews on or off.")

CHECKPOINTING_TOOLTIP = (
    "Recompute each CLIP layer and each UNet/DiT block in the backward pass instead of keeping its activations: "
    "less memory, more time per step, same result. T5 layers are always recomputed (Flux.1, SD3).")

GUIDANCE_TOOLTIP = (
    "Flux.1 dev only: the guidance strength the word is learned at (set in the conditioning as FluxGuidance does); "
    "3.5, what Flux.1 dev samples with by default. Ignored by models without a guidance input (schnell, SD3, SD1.5, SDXL).")

NORM_CONTROL_TOOLTIP = (
    "After every step, pull the spread (std) of the vectors toward that of the words the text encoder knows, "
    "as diffusers' and cog-sdxl's pivotal tuning do (on in UniTune Fine-Tune's pivotal run). Off (default): the "
    "paper's textual inversion, whose vectors can grow far past any known word's size.")


def _roots() -> list[Path]:
    return user_paths.roots(Path(folder_paths.get_input_directory()))


def _views(image, folder: str) -> list:
    """The training views: the image batch, or the images in ``folder`` (confined before anything is read)."""
    folder = folder.strip()
    if folder and image is not None:
        raise ValueError(f"both folder {folder!r} and the image input are given: use one of them (clear folder to "
                         "train on the image input, or disconnect the image).")
    if folder:
        return image_folder.read_views(folder, input_name="folder", roots=_roots())
    if image is None:
        raise ValueError("no images: connect the image input (one or several views of the concept) or set folder.")
    return list(image)


class TextualInversionTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneTextualInversionTrain",
            display_name="Textual Inversion Train",
            category=CATEGORY,
            is_experimental=True,
            is_output_node=True,
            description=(
                "Learns a new word for the concept in the images (textual inversion): a few vectors per text "
                "encoder (SD1.5, SDXL, Flux.1 dev/schnell, SD3/SD3.5, Chroma, Qwen-Image, Z-Image), while the text "
                "encoder(s) and the UNet or DiT stay frozen and unchanged. Saves them to models/embeddings/ in the "
                "layout the stock loader reads, so any prompt can use 'embedding:name' in the stock CLIPTextEncode "
                "(on Qwen-Image and Z-Image through the CLIP of the Embedding Words node)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model: SD1.5, SDXL family, Flux.1 dev/schnell, "
                               "SD3/SD3.5, Chroma, Qwen-Image or Z-Image. It is not modified."),
                io.Clip.Input("clip", tooltip="The model's text encoder(s), not modified. Vectors are trained for each: "
                              "CLIP-L (SD1.5); CLIP-L + CLIP-G (SDXL); CLIP-L + T5 (Flux.1, where T5 carries the "
                              "word); CLIP-L + CLIP-G + T5 or those present (SD3); T5 (Chroma); Qwen2.5-VL, Qwen3 "
                              "(Qwen-Image, Z-Image)."),
                io.Vae.Input("vae", tooltip="The model's VAE, used once to encode the images."),
                io.Image.Input("image", optional=True, tooltip="One or several views of the concept, all the same "
                               "size (a batch). Or leave it unconnected and set folder."),
                io.String.Input("name", default="my_concept", tooltip="The new word: write 'embedding:name' in a "
                                "prompt; saved as models/embeddings/name.safetensors, or name_00001 if that word "
                                "is taken (see the embedding output). Letters, digits, '-', '_', '.'."),
                io.String.Input("init_text", default="object", tooltip="Word(s) the vectors start from, e.g. "
                                "'dog': their token embeddings (repeated to fill the vectors)."),
                io.Int.Input("vectors", default=1, min=1, max=ti.MAX_VECTORS, tooltip="Vectors per text encoder "
                             "(1 to 16), i.e. how many prompt tokens the word takes. At least the number of "
                             "tokens of init_text."),
                io.Combo.Input("captions", options=list(ti.CAPTIONS), default="object templates",
                               tooltip=CAPTIONS_TOOLTIP),
                io.Int.Input("steps", default=1000, min=1, max=100000, tooltip="Optimizer steps (AdamW). Each step "
                             "runs the text encoder(s) and the UNet forward and backward once."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Noised copies per step (images drawn "
                             "from the input), each at its own random timestep; one caption per step."),
                io.Float.Input("learning_rate", default=2e-3, min=1e-6, max=1.0, step=1e-4, round=1e-6,
                               tooltip="AdamW step size. 2e-3 is the effective rate of diffusers' documented "
                               "textual inversion example (5e-4 scaled by its 4 images per step)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for captions, noise and timesteps; the same seed gives the same result."),
                training_inputs.precision_input(tooltip=PRECISION_TOOLTIP),
                io.String.Input("folder", default="", optional=True, tooltip=FOLDER_TOOLTIP),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip=PREVIEW_TOOLTIP),
                io.Boolean.Input("norm_control", default=False, optional=True, tooltip=NORM_CONTROL_TOOLTIP),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip=CHECKPOINTING_TOOLTIP),
                io.Float.Input("flux_guidance", default=ti.FLUX_GUIDANCE, min=0.0, max=100.0, step=0.1,
                               optional=True, tooltip=GUIDANCE_TOOLTIP),
            ],
            outputs=[
                io.String.Output(display_name="embedding", tooltip="The word to write in prompts, e.g. "
                                 "'embedding:my_concept'."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
                io.String.Output(display_name="path", tooltip="Where the file was written."),
                io.Image.Output(display_name="previews", tooltip="The previews drawn while training, side by side "
                                "(a 64x64 black image when preview_every is 0)."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **inputs) -> int:
        # Runs again (writing the file again) when the file it wrote for these widget values was deleted.
        # A folder also runs it again when its images change (as the stock Load Image re-runs on a changed file).
        widgets = {k: v for k, v in inputs.items() if k not in ("model", "clip", "vae", "image")}
        folder = (inputs.get("folder") or "").strip()
        views = image_folder.signature(folder, input_name="folder", roots=_roots()) if folder else ""
        return f"{saved_files.fingerprint(cls.__name__, **widgets)}:{views}"

    @classmethod
    def execute(cls, model, clip, vae, name, init_text, vectors, captions, steps, batch_size, learning_rate,
                seed, precision="auto", image=None, folder="", preview_every=0,
                norm_control=False, gradient_checkpointing=False, flux_guidance=ti.FLUX_GUIDANCE) -> io.NodeOutput:
        checks.finite(learning_rate=learning_rate, flux_guidance=flux_guidance)
        settings = ti.TextualInversionSettings(init_text=init_text, vectors=vectors, captions=captions, steps=steps,
                                               batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                               precision=precision, norm_control=bool(norm_control),
                                               gradient_checkpointing=bool(gradient_checkpointing),
                                               guidance=float(flux_guidance))
        settings.check()
        checks.vae(vae)
        ti.initial_vectors(clip, ti.encoder_keys(model, clip), init_text, vectors)  # refuse a bad init_text first
        views = _views(image, folder or "")
        path, word = embedding_target(name)
        pixels = prepare_images(views)
        latents = vae.encode(pixels)
        progress = training_inputs.Progress(steps, preview_every, model.model.latent_format,
                                            training_inputs.preview_size(pixels))
        result = ti.train(model, clip, latents, settings, name=word,
                          on_step=progress.on_step("Textual inversion step", 50), preview=progress.preview())
        weights_file.save(path, result.file_tensors(), result.metadata, format=ti.FILE_FORMAT)
        saved_files.remember(cls.__name__, path, name=name, init_text=init_text, vectors=vectors, captions=captions,
                             steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                             precision=precision, folder=folder, preview_every=preview_every,
                             norm_control=norm_control, gradient_checkpointing=gradient_checkpointing,
                             flux_guidance=flux_guidance)
        log.info("Textual inversion: saved embedding:%s (%s) to %s", word, ", ".join(result.vectors), path)
        curve = loss_curve_image(result.losses, title="textual inversion loss")
        return io.NodeOutput(f"embedding:{word}", curve, str(path), progress.grid())


class EmbeddingWords(io.ComfyNode):
    """CLIP -> a clone whose tokenizer reads ``embedding:name`` on Qwen-Image / Z-Image (``private_words``)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneEmbeddingWords",
            display_name="Embedding Words",
            category=CATEGORY,
            description=(
                "Makes 'embedding:name' work in prompts on Qwen-Image and Z-Image, whose stock ComfyUI tokenizers "
                "ignore it: the output CLIP reads the words from models/embeddings/ on a private tokenizer; the "
                "input CLIP and its other copies are unchanged. Other CLIPs already read them and pass through."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder, not modified: Qwen-Image's Qwen2.5-VL or Z-Image's "
                              "Qwen3 get a private tokenizer that reads embedding:name. Other CLIPs (SD1.5, SDXL, "
                              "Flux, SD3, Chroma) read the words already and are returned as they are."),
            ],
            outputs=[
                io.Clip.Output(display_name="clip", tooltip="The CLIP whose prompts read 'embedding:name' from "
                               "models/embeddings/; connect it to CLIPTextEncode (or the Qwen edit encoders)."),
            ],
        )

    @classmethod
    def execute(cls, clip) -> io.NodeOutput:
        if clip is None:
            raise ValueError("no CLIP: connect the text encoder (e.g. the CLIPLoader output).")
        return io.NodeOutput(private_words.reading_embeddings(clip))


NODES = [TextualInversionTrain, EmbeddingWords]
