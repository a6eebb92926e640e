"""Textual Inversion Train: a thin V3 node over ``textual_inversion.word_trainer`` (schema, checks, progress, save)."""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..storage import safetensors_file as weights_file
from ..storage import user_paths
from ..textual_inversion import word_trainer as ti
from ..textual_inversion.embedding_file import embedding_target
from ..training import image_folder
from ..training import precision as training_precision
from ..training import preview as previews
from ..training.image_folder import prepare_images
from ..training.loss_curve import loss_curve_image
from . import checks, saved_files

log = logging.getLogger(__name__)

CATEGORY = "FrozenTune/Textual Inversion"

CAPTIONS_TOOLTIP = (
    "Captions the new word is trained in: object templates (default) / style templates take one of the paper's "
    "short templates per step ('a photo of a {}', 'a painting in the style of {}'); token alone is the bare "
    "word, as UniTune trains.")
PRECISION_TOOLTIP = (
    "Compute dtype of training (autocast); the vectors train in fp32 and the models keep their load dtype. "
    "auto: bf16 on a CUDA GPU that supports it, else fp16 with loss scaling; fp32 on the CPU.")

FOLDER_TOOLTIP = (
    "Instead of the image input: a folder of same-size views of the concept (.png, .jpg, .jpeg, .webp, .bmp), "
    "inside ComfyUI's input folder or a folder listed in FROZENTUNE_DATA_DIRS. Leave empty to train on the "
    "image input; giving both is refused.")

PREVIEW_MAX = 256
PREVIEW_TOOLTIP = (
    "Draw a preview every N steps (0 = off): the first caption of the captions choice sampled from a fixed "
    "noise with the current vectors, shown in the node and gathered in the previews output. The trained "
    "vectors are identical with previews on or off.")

NORM_CONTROL_TOOLTIP = (
    "After every step, pull the spread (std) of the vectors toward that of the words the text encoder knows, "
    "as diffusers' and cog-sdxl's pivotal tuning do (on in UniTune Fine-Tune's pivotal run). Off (default): the "
    "paper's textual inversion, whose vectors can grow far past any known word's size.")


def preview_size(image_size) -> int:
    """Previews as large as the training images, rounded up to 64 px, at most 256 px (the longer side)."""
    longest = max(int(v) for v in image_size)
    return min(PREVIEW_MAX, max(64, -(-longest // 64) * 64))


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
                "encoder, while the text encoder(s) and the UNet stay frozen and unchanged. Saves them to "
                "models/embeddings/ in the layout the stock loader reads, so any prompt can use "
                "'embedding:name' in the stock CLIPTextEncode."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.5 or SDXL family). It is not modified."),
                io.Clip.Input("clip", tooltip="The model's text encoder(s). They are not modified; the vectors are "
                              "trained for CLIP-L (SD1.5) or CLIP-L and CLIP-G together (SDXL)."),
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
                io.Combo.Input("precision", options=list(training_precision.PRECISIONS), default="auto",
                               optional=True, tooltip=PRECISION_TOOLTIP),
                io.String.Input("folder", default="", optional=True, tooltip=FOLDER_TOOLTIP),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip=PREVIEW_TOOLTIP),
                io.Boolean.Input("norm_control", default=False, optional=True, tooltip=NORM_CONTROL_TOOLTIP),
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
                norm_control=False) -> io.NodeOutput:
        checks.finite(learning_rate=learning_rate)
        settings = ti.TextualInversionSettings(init_text=init_text, vectors=vectors, captions=captions, steps=steps,
                                               batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                               precision=precision, norm_control=bool(norm_control))
        settings.check()
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise ValueError("the VAE input is missing or empty: connect the checkpoint's VAE.")
        ti.initial_vectors(clip, ti.encoder_keys(model, clip), init_text, vectors)  # refuse a bad init_text first
        views = _views(image, folder or "")
        path, word = embedding_target(name)
        pixels = prepare_images(views)
        latents = vae.encode(pixels)
        pbar = comfy.utils.ProgressBar(steps)

        def on_step(step: int, total: int, loss: float) -> None:
            pbar.update_absolute(step, total)  # also raises on Cancel
            if step == 1 or step % 50 == 0 or step == total:
                log.info("Textual inversion step %d/%d loss %.5f", step, total, loss)

        shown = previews.Shown(pbar, steps)
        preview = previews.Preview(every=preview_every, show=shown, latent_format=model.model.latent_format,
                                   size=preview_size(pixels.shape[1:3]))
        result = ti.train(model, clip, latents, settings, name=word, on_step=on_step, preview=preview)
        weights_file.save(path, result.file_tensors(), result.metadata, format=ti.FILE_FORMAT)
        saved_files.remember(cls.__name__, path, name=name, init_text=init_text, vectors=vectors, captions=captions,
                             steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                             precision=precision, folder=folder, preview_every=preview_every,
                             norm_control=norm_control)
        log.info("Textual inversion: saved embedding:%s (%s) to %s", word, ", ".join(result.vectors), path)
        curve = loss_curve_image(result.losses, title="textual inversion loss")
        return io.NodeOutput(f"embedding:{word}", curve, str(path), shown.grid())


NODES = [TextualInversionTrain]
