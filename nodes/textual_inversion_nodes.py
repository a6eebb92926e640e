"""Textual Inversion Train: a thin V3 node over ``unitune.textual_inversion`` (schema, checks, progress, save)."""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..training import files as weights_file
from ..training import image_folder, names, user_paths
from ..training import precision as training_precision
from ..training import preview as previews
from ..training.loss_curve import loss_curve_image
from ..unitune import textual_inversion as ti
from ..unitune.finetune import prepare_images
from . import checks, saved_files

log = logging.getLogger(__name__)

CATEGORY = "FrozenTune/Textual Inversion"
FOLDER = "embeddings"
EMBEDDING_SUFFIXES = ("", ".safetensors", ".pt", ".bin")  # what comfy.sd1_clip.load_embed tries for a name

CAPTIONS_TOOLTIP = (
    "Captions the new word is trained in. object templates (default) / style templates: one of the paper's "
    "short templates per step ('a photo of a {}', 'a painting in the style of {}'), so the word learns to work "
    "inside a sentence, as you will use it. token alone: the bare word, as UniTune trains.")
PRECISION_TOOLTIP = (
    "Compute dtype of training (autocast). auto: bf16 on a CUDA GPU that supports it, else fp16 with loss "
    "scaling; fp32 on the CPU. The vectors train in fp32 whatever you pick; the models keep their load dtype.")

FOLDER_TOOLTIP = (
    "Instead of the image input: a folder of views of the concept (.png, .jpg, .jpeg, .webp, .bmp directly in it; "
    "other files and subfolders are ignored), read as the stock Load Image node reads a file. All must be the "
    "same size (different sizes are refused, naming them; nothing is resized). It must be inside ComfyUI's "
    "input folder (relative paths start there, e.g. 'my_concept') or a folder the server's admin lists in "
    "FROZENTUNE_DATA_DIRS; other paths are refused. Leave empty to train on the image input; giving both is "
    "refused.")

PREVIEW_MAX = 256
PREVIEW_TOOLTIP = (
    "Draw a preview every N steps (0 = off): the first caption of the captions choice ('a photo of a "
    "embedding:name' for object templates) sampled in 4 Euler steps from a fixed noise with the current "
    "vectors, at the images' size up to 256 px, shown in the node and gathered in the previews output. Each "
    "preview costs 1 text-encoder and 4 UNet passes without gradients (a step: 1 of each, forward and "
    "backward). The trained vectors are identical with previews on or off.")


def _taken(stem: str) -> bool:
    """Whether the stock loader would find a file for ``embedding:<stem>`` in any embeddings folder."""
    import comfy.sd1_clip

    for folder in comfy.sd1_clip.expand_directory_list(folder_paths.get_folder_paths(FOLDER)):
        if any(Path(folder, stem + suffix).is_file() for suffix in EMBEDDING_SUFFIXES):
            return True
    return False


def embedding_target(name: str) -> tuple[Path, str]:
    """Where the file goes and the word prompts use; a taken word gets the next free ``_00001`` counter.

    Never overwrites: the counter is checked against every embeddings folder, so the returned word
    resolves to the new file in a stock prompt.
    """
    folder, stem = names.save_target(name, input_name="name", folders={FOLDER: Path(folder_paths.get_folder_paths(
        FOLDER)[0])}, default=FOLDER)
    ti.check_name(stem)
    word, counter = stem, 0
    while _taken(word):
        counter += 1
        word = f"{stem}_{counter:05d}"
    if counter:
        log.warning("Textual inversion: embedding:%s exists; this one is saved as embedding:%s", stem, word)
    return folder / f"{word}.safetensors", word


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
                                "prompt. Saved as models/embeddings/name.safetensors; if that word is taken, "
                                "name_00001 (see the embedding output). Letters, digits, '-', '_', '.'."),
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
                seed, precision="auto", image=None, folder="", preview_every=0) -> io.NodeOutput:
        checks.finite(learning_rate=learning_rate)
        settings = ti.TextualInversionSettings(init_text=init_text, vectors=vectors, captions=captions, steps=steps,
                                               batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                               precision=precision)
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
                             precision=precision, folder=folder, preview_every=preview_every)
        log.info("Textual inversion: saved embedding:%s (%s) to %s", word, ", ".join(result.vectors), path)
        curve = loss_curve_image(result.losses, title="textual inversion loss")
        return io.NodeOutput(f"embedding:{word}", curve, str(path), shown.grid())


NODES = [TextualInversionTrain]
