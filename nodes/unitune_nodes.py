"""UniTune Fine-Tune, Save, Load and Edit nodes: thin V3 wrappers over ``unitune`` and ``guidance``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
from comfy_api.latest import io

from .. import families
from ..families import fingerprint
from ..guidance import sdedit
from ..guidance.guider import DEFAULT_PG, FORMULA, check_scales
from ..guidance.guider import PromptGuidanceGuider as Guider
from ..storage import names
from ..storage import safetensors_file as weights_file
from ..textual_inversion import private_words
from ..textual_inversion import word_trainer as ti
from ..textual_inversion.embedding_file import embedding_target
from ..training import image_folder, objective
from ..training.loss_curve import loss_curve_image
from ..unitune import compress, finetune, pivotal
from ..unitune.edit_prompts import TuningCaption, edit_prompts
from . import checks, saved_files, training_inputs
from .sampling_inputs import guidance_inputs

log = logging.getLogger(__name__)

CATEGORY = "FrozenTune/UniTune"
FOLDER = "unitune"
ATTACHMENT = "frozentune.unitune"
# The caption a tuned MODEL was tuned on (TuningCaption), set by Fine-Tune and Load: UniTune Edit's class word.
CAPTION_ATTACHMENT = "frozentune.unitune.caption"
MODE_CHOICES = ["auto", *finetune.TRAIN_MODES]
SAVE_AS = ("as trained", "lora")
# The memory each mode costs is on the help page (nodes/web/docs/FrozenTuneUniTuneFineTune.md).
TRAIN_TOOLTIP = (
    "What trains, kept in fp32 (the base's weights are shared, never copied): full = every weight, attention = "
    "the attention layers, lora = low-rank adapters (SD: attention projections; Flux/SD3: attention and MLP). "
    "auto: full for SD1.5, lora for SDXL, Flux.1 and SD3.")
CHECKPOINTING_TOOLTIP = (
    "Recompute each UNet layer (Flux/SD3: each transformer block) in the backward pass instead of keeping its "
    "activations: much less memory for an extra forward of each layer, with equal training results.")
EMBEDDING_TOOLTIP = (
    "Optional (pivotal tuning): a learned word, 'embedding:name' (from Textual Inversion Train or "
    "models/embeddings/), used in the caption instead of the token and carried by the output MODEL. "
    "Empty = the token.")
PIVOTAL_TOOLTIP = (
    "Pivotal tuning: first learn the token as a word for this many textual-inversion steps, then tune with "
    "'embedding:<token>' in the caption; the word travels with the MODEL and clip outputs. 0 = off; not with "
    "the embedding input.")
PIVOTAL_LR_TOOLTIP = (
    "AdamW step size of the word's learning run (pivotal_steps > 0 only). 2e-3 is Textual Inversion Train's "
    "default; cog-sdxl's joint pivotal run uses 3e-4 (the recipe is on the help page).")
PIVOTAL_NORM_TOOLTIP = (
    "After every step of the word's learning run, pull the spread (std) of its vectors toward that of the "
    "words the text encoder knows, as diffusers' and cog-sdxl's pivotal tuning do. Off: plain textual "
    "inversion, whose vectors can grow far past any known word's size.")
PREVIEW_TOOLTIP = (
    "Show a preview in this node every N UniTune steps (0 = off): the training caption drawn from a fixed "
    "noise with the weights as tuned so far, i.e. the image as the model reconstructs it. The tuned result "
    "is bit-identical with previews on or off.")
TIMESTEP_SAMPLING_TOOLTIP = (
    "How training picks noise levels. uniform: evenly over the model's own (for Flux/SD3 shifted) schedule; "
    "logit-normal (diffusers' SD3 default) and sigmoid (kohya's Flux recipe) favour the middle; Flux and SD3 only.")
FLUX_GUIDANCE_TOOLTIP = (
    "Flux.1 dev only: the guidance strength it is trained at (set in the conditioning as FluxGuidance does); "
    "1.0 as kohya and x-flux train Flux LoRAs. Ignored by models without a guidance input (schnell, SD3, SD1.5, SDXL).")
# UniTune Edit samples a guidance-embedding model (Flux.1 dev) at this guidance unless told otherwise: the stock
# FluxGuidance node's default, and Flux.1's own when the conditioning sets none (model_base.Flux.extra_conds).
EDIT_GUIDANCE = 3.5
EDIT_FLUX_GUIDANCE_TOOLTIP = (
    "Flux.1 dev/Krea: the guidance strength the prompt, the baseline and the negative are sampled at, set in "
    "their conditioning as the FluxGuidance node sets it (3.5 = the model's default). Ignored by models without "
    "a guidance input (Flux.1 schnell, SD, SD3.5, Qwen-Image, Z-Image, Chroma).")
PRECISION_TOOLTIP = training_inputs.precision_tooltip("what trains stays fp32 and the base keeps its load dtype")

# models/unitune/ for tuned results, safetensors only (listed by UniTune Load).
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})


class UniTuneFineTune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneUniTuneFineTune",
            display_name="UniTune Fine-Tune",
            category=CATEGORY,
            is_experimental=True,
            description=(
                "Binds one image to a rare token by fine-tuning the model on it (UniTune). Training runs on a "
                "frozen twin that shares the base's weights; the input MODEL is never changed, and the output "
                "MODEL carries the trained weights as patches. "
                "Prompt the output with the token plus an edit, e.g. 'beikkpic as a watercolor'. Several "
                "images of one subject (same size) train DreamBooth-style."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.5, SDXL family, Flux.1 dev/schnell, SD3/SD3.5, "
                               "Qwen-Image, Z-Image or Chroma). It is not modified."),
                io.Clip.Input("clip", tooltip="The model's text encoder, used once to encode the training caption."),
                io.Vae.Input("vae", tooltip="The model's VAE, used once to encode the image."),
                io.Image.Input("image", tooltip="The image to bind to the token. A batch of several views of the "
                               "same subject (same size) trains DreamBooth-style."),
                io.String.Input("token", default="beikkpic", tooltip="A rare nonsense word the model does not know. "
                                "The training caption is this token alone (plus the class word, if given)."),
                io.String.Input("class_word", default="", tooltip="Optional class noun after the token, e.g. 'dog' "
                                "(the paper uses none)."),
                io.Int.Input("steps", default=0, min=0, max=10000, tooltip="Optimizer steps. 0 = auto: 128 for "
                             "full and attention (the paper's recipe), 256 for lora (measured on the test models: "
                             "bench/README.md, UniTune LoRA recipe)."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Noised copies of the image per "
                             "step, each at its own random timestep (the paper: 4)."),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1.0, step=1e-5, round=1e-7,
                               tooltip="Step size. 0 = auto: 1e-4 for full and attention (the paper's recipe), 1e-3 "
                               "for lora (measured on the test models)."),
                io.Combo.Input("optimizer", options=list(finetune.OPTIMIZERS), default="adafactor",
                               tooltip="adafactor (the paper's; factored, small optimizer state), adamw (8 bytes of state "
                               "per trained weight) or adamw8bit (bitsandbytes' 8-bit AdamW, about 2 bytes; needs the "
                               "bitsandbytes package)."),
                io.Combo.Input("train", options=MODE_CHOICES, default="auto", tooltip=TRAIN_TOOLTIP),
                io.Int.Input("lora_rank", default=32, min=1, max=256, tooltip="Rank of the LoRA adapters "
                             "(train = lora only). 32: the best rank measured on the test models (4 was clearly "
                             "worse, 16 close)."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip=CHECKPOINTING_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the noise and timesteps; the same seed gives the same result."),
                training_inputs.precision_input(tooltip=PRECISION_TOOLTIP),
                io.String.Input("embedding", default="", optional=True, tooltip=EMBEDDING_TOOLTIP),
                io.Int.Input("pivotal_steps", default=0, min=0, max=100000, optional=True, tooltip=PIVOTAL_TOOLTIP),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True, tooltip=PREVIEW_TOOLTIP),
                io.Float.Input("pivotal_learning_rate", default=pivotal.LEARNING_RATE, min=1e-6, max=1.0, step=1e-4,
                               round=1e-6, optional=True, tooltip=PIVOTAL_LR_TOOLTIP),
                io.Boolean.Input("pivotal_norm_control", default=pivotal.NORM_CONTROL, optional=True,
                                 tooltip=PIVOTAL_NORM_TOOLTIP),
                io.Combo.Input("timestep_sampling", options=list(objective.TIMESTEP_SAMPLINGS), default=objective.UNIFORM,
                               optional=True, tooltip=TIMESTEP_SAMPLING_TOOLTIP),
                io.Float.Input("flux_guidance", default=finetune.TRAIN_GUIDANCE, min=0.0, max=100.0, step=0.1,
                               optional=True, tooltip=FLUX_GUIDANCE_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The tuned model: the base plus the trained "
                                "patches (and the learned word, when pivotal). Connect it to UniTune Save to keep it."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step (the UniTune steps)."),
                io.Clip.Output(display_name="clip", tooltip="The input CLIP; when pivotal, a view of it whose prompts "
                               "read 'embedding:<word>' as the learned vectors before any file is saved (the same "
                               "conditioning the stock loader gives once UniTune Save wrote the word). The CLIP itself "
                               "is not changed."),
                io.String.Output(display_name="token", tooltip="What the image is bound to, for the edit prompt: the "
                                 "token, or 'embedding:<word>' when pivotal."),
                io.Image.Output(display_name="previews", tooltip="The previews drawn while tuning, side by side in "
                                "step order (a 64x64 black image when preview_every is 0)."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, token, class_word, steps, batch_size, learning_rate, optimizer,
                train, lora_rank, gradient_checkpointing, seed, precision="auto", embedding="",
                pivotal_steps=0, preview_every=0, pivotal_learning_rate=pivotal.LEARNING_RATE,
                pivotal_norm_control=pivotal.NORM_CONTROL, timestep_sampling=objective.UNIFORM,
                flux_guidance=finetune.TRAIN_GUIDANCE) -> io.NodeOutput:
        checks.finite(learning_rate=learning_rate, pivotal_learning_rate=pivotal_learning_rate,
                      flux_guidance=flux_guidance)
        family = finetune.family_of(model)
        objective.check_timestep_sampling(model.get_model_object("model_sampling"), timestep_sampling)
        mode = finetune.auto_mode(family) if train == "auto" else train
        steps, learning_rate = finetune.recipe(mode, steps, learning_rate)
        embedding = (embedding or "").strip()
        if embedding and pivotal_steps:
            raise ValueError(f"embedding {embedding!r} and pivotal_steps={pivotal_steps} are both set: give a learned "
                             "word (embedding) or learn one here (pivotal_steps), not both.")
        word = pivotal.read_word(model, clip, embedding) if embedding else None
        settings = finetune.FineTuneSettings(
            token=token, class_word=class_word, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
            optimizer=optimizer, mode=mode, lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing,
            seed=seed, precision=precision, pivotal_steps=pivotal_steps,
            embedding=word.name if word else token.strip() if pivotal_steps else "",
            timestep_sampling=timestep_sampling, guidance=flux_guidance,
        )
        settings.check()
        if pivotal_steps:  # refuse a family textual inversion does not know, or an unusable token, before any work
            ti.encoder_keys(model, clip)
            pivotal.check_token(clip, token)
            if not pivotal_learning_rate > 0:
                raise ValueError(f"pivotal_learning_rate={pivotal_learning_rate} must be a positive number such as "
                                 f"{pivotal.LEARNING_RATE:g}.")
        checks.vae(vae)
        pixels = image_folder.prepare_images(list(image))
        progress = training_inputs.Progress(pivotal_steps + steps, preview_every, model.model.latent_format,
                                            training_inputs.preview_size(pixels))
        preview = progress.preview(offset=pivotal_steps)
        latents = vae.encode(pixels)

        if pivotal_steps:
            word = pivotal.learn_word(model, clip, latents, token, pivotal_steps, batch_size, seed, precision,
                                      on_step=progress.on_step("Pivotal UniTune: word step", 50),
                                      learning_rate=pivotal_learning_rate,
                                      norm_control=pivotal_norm_control,
                                      gradient_checkpointing=gradient_checkpointing, guidance=flux_guidance)
        view = pivotal.caption_clip(clip, word)
        conditioning = view.encode_from_tokens_scheduled(view.tokenize(settings.caption))
        on_step = progress.on_step("UniTune step", 16, offset=pivotal_steps)
        result = finetune.fine_tune(model, latents, conditioning, settings, on_step=on_step, preview=preview)
        result.word = word
        tuned = finetune.apply_patches(model, result.tensors)
        tuned.set_attachments(ATTACHMENT, result)
        tuned.set_attachments(CAPTION_ATTACHMENT, TuningCaption(settings.word, settings.class_word.strip()))
        curve = loss_curve_image(result.losses, title=f"UniTune {mode} loss")
        return io.NodeOutput(tuned, curve, view, settings.word, progress.grid())


class UniTuneSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneUniTuneSave",
            display_name="UniTune Save",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Saves what UniTune Fine-Tune trained into models/unitune/ as a safetensors file in ComfyUI's LoRA "
                "format (weight deltas, or LoRA factors), with the settings and the base model's identity in its "
                "metadata. UniTune Load, and the stock LoraLoader, read it back. A pivotal result (a learned word) "
                "is saved as a pair: the patches file plus the word in models/embeddings/ under the same name (the "
                "stock embedding layout), its name and SHA-256 in the patches file's metadata."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The MODEL output of UniTune Fine-Tune."),
                io.String.Input("filename", default="unitune/beikkpic", tooltip="File name in models/unitune/ "
                                "(listed by UniTune Load), sub-folders allowed, or 'loras/...' for models/loras/ "
                                "(the stock LoraLoader). A counter is appended if the file exists."),
                io.Combo.Input("save_as", options=list(SAVE_AS), default="as trained", optional=True,
                               tooltip="as trained: the exact result. lora: compress a full or attention "
                               "result to a much smaller LoRA of lora_rank (truncated SVD; a lora-mode result is "
                               "saved as is)."),
                io.Int.Input("lora_rank", default=32, min=1, max=1024, optional=True,
                             tooltip="Rank of the compressed LoRA (save_as = lora only)."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the file was written."),
                     io.String.Output(display_name="token", tooltip="What to write in prompts: 'embedding:<name>' "
                                      "for a pivotal result (the word as saved to models/embeddings/), else the token.")],
        )

    @classmethod
    def fingerprint_inputs(cls, model=None, filename=None, save_as=None, lora_rank=None) -> int:
        # Runs again (writing the file again) when the file it wrote for these inputs was deleted.
        return saved_files.fingerprint(cls.__name__, filename=filename, save_as=save_as, lora_rank=lora_rank)

    @classmethod
    def execute(cls, model, filename, save_as="as trained", lora_rank=32) -> io.NodeOutput:
        result = model.attachments.get(ATTACHMENT)
        if result is None:
            raise ValueError("this MODEL was not made by UniTune Fine-Tune (nothing to save): connect the MODEL "
                             "output of UniTune Fine-Tune.")
        if save_as not in SAVE_AS:
            raise ValueError(f"save_as {save_as!r} is not one of {', '.join(SAVE_AS)}.")
        folders = {word: Path(folder_paths.get_folder_paths(word)[0]) for word in (FOLDER, "loras")}
        folder, stem = names.save_target(filename, input_name="filename", folders=folders, default=FOLDER)
        tensors, metadata = result.tensors, dict(result.metadata)
        if save_as == "lora" and result.settings.mode != "lora":
            tensors, error = compress.delta_to_lora(tensors, lora_rank)
            metadata.update({"unitune.saved_as": f"lora rank {lora_rank}", "unitune.lora_relative_error": f"{error:.6g}"})
            log.info("UniTune: compressed the %s delta to a rank-%d LoRA, relative error %.4g",
                     result.settings.mode, lora_rank, error)
        elif save_as == "lora":
            log.info("UniTune: this result is a LoRA already; saved as trained")
        path = weights_file.unused_path(folder, stem)
        word = result.word
        token = result.settings.word
        if word is not None:  # the pair: the word first, then the patches file that names it
            word_path, token = save_word(word, Path(stem).name, path.name)
            metadata.update({"unitune.embedding_file": token.removeprefix(pivotal.PREFIX),
                             "unitune.embedding_sha256": pivotal.digest(word.file_tensors()),
                             "unitune.embedding_source": word.source})
            saved_files.remember(cls.__name__, word_path, filename=filename, save_as=save_as, lora_rank=lora_rank)
        weights_file.save(path, tensors, metadata, format=finetune.FILE_FORMAT)
        saved_files.remember(cls.__name__, path, filename=filename, save_as=save_as, lora_rank=lora_rank)
        log.info("UniTune: saved %d tensors to %s", len(tensors), path)
        return io.NodeOutput(str(path), token)


def save_word(word: pivotal.Word, stem: str, unitune_file: str) -> tuple[Path, str]:
    """Write a pivotal result's word to models/embeddings/<stem>.safetensors (a counter if taken); returns
    the path and the prompt word ``embedding:<name>``. The vectors are the trained ones, under the saved name."""
    try:
        ti.check_name(stem)
    except ValueError as error:
        raise ValueError(f"filename: the learned word is saved under the file's name, and {error}") from None
    path, name = embedding_target(stem)
    metadata = dict(word.metadata)
    metadata.update({"textual_inversion.name": name, "textual_inversion.family": word.family,
                     "textual_inversion.trained_as": word.name, "textual_inversion.unitune_file": unitune_file})
    weights_file.save(path, word.file_tensors(), metadata, format=ti.FILE_FORMAT)
    log.info("UniTune: saved the learned word embedding:%s to %s", name, path)
    return path, f"{pivotal.PREFIX}{name}"


def load_word(metadata: dict[str, str], source: str) -> str:
    """The prompt word of a saved UniTune file: ``embedding:<name>`` once its embedding file is found in an
    embeddings folder and matches the SHA-256 it was saved with; the token for a file without a word."""
    import comfy.sd1_clip

    name = metadata.get("unitune.embedding_file")
    if not name:
        return metadata.get("unitune.token", "")
    folders = comfy.sd1_clip.expand_directory_list(folder_paths.get_folder_paths("embeddings"))
    found = next((Path(f, f"{name}.safetensors") for f in folders if Path(f, f"{name}.safetensors").is_file()), None)
    if found is None:
        raise ValueError(f"{source} was saved with its learned word embedding:{name}, but {name}.safetensors is in "
                         "no embeddings folder: put the file UniTune Save wrote with it back into models/embeddings/.")
    tensors, _ = weights_file.load(found)
    expected, actual = metadata.get("unitune.embedding_sha256", ""), pivotal.digest(tensors)
    if actual != expected:
        raise ValueError(f"{found} is not the word {source} was saved with (SHA-256 {actual[:12]}, expected "
                         f"{expected[:12]}): put back the file UniTune Save wrote, or rename the other one.")
    return f"{pivotal.PREFIX}{name}"


class UniTuneLoad(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneUniTuneLoad",
            display_name="UniTune Load",
            category=CATEGORY,
            description=("Applies a saved UniTune result to its base model. Refuses a file trained on another model. "
                         "A pivotal file's learned word is checked in models/embeddings/, so prompts can use it."),
            inputs=[
                io.Model.Input("model", tooltip="The base model the file was trained on. It is not modified."),
                io.Combo.Input("unitune_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip="A file from models/unitune/."),
                io.Float.Input("strength", default=1.0, min=-2.0, max=2.0, step=0.05,
                               tooltip="How much of the trained change to apply (1 = as trained)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The base model with the tuned weights."),
                     io.String.Output(display_name="token", tooltip="What the image is bound to, for the edit "
                                      "prompt: 'embedding:<name>' for a pivotal file (its word, checked present in "
                                      "models/embeddings/ and unchanged), else the token it was trained with.")],
        )

    @classmethod
    def execute(cls, model, unitune_name, strength) -> io.NodeOutput:
        checks.finite(strength=strength)
        path = folder_paths.get_full_path_or_raise(FOLDER, unitune_name)
        tensors, metadata = weights_file.load(path)
        weights_file.check_finite(tensors, source=unitune_name)
        check_family(model, metadata.get("unitune.family"), unitune_name)
        expected = metadata.get("unitune.base_fingerprint")
        if expected:
            comfy.model_management.load_models_gpu([model], force_patch_weights=True)
            matches, actual = fingerprint.same_base(expected, model.model.diffusion_model)
            if not matches:
                family = metadata.get("unitune.family", "?")
                raise ValueError(
                    f"{unitune_name} was trained on another base model ({family}, fingerprint "
                    f"{fingerprint.short(expected)}) than this MODEL ({families.model_family(model.model)}, fingerprint "
                    f"{fingerprint.short(actual)}): connect the checkpoint it was trained on (in any dtype)."
                )
        token = load_word(metadata, unitune_name)
        tuned = finetune.apply_patches(model, tensors, strength, source=unitune_name)
        tuned.set_attachments(CAPTION_ATTACHMENT, TuningCaption(token, metadata.get("unitune.class_word", "").strip()))
        return io.NodeOutput(tuned, token)


def check_family(model, trained_on: str | None, source: str) -> None:
    """Refuse a file made for another model family than ``model``'s, naming both (before any weight is read)."""
    family = families.family_of(model)
    if not trained_on or trained_on == family.id:
        return
    made_for = families.FAMILIES[trained_on].label if trained_on in families.FAMILIES else trained_on
    raise ValueError(f"{source} was trained on another base model: it was made for {made_for}, and this MODEL is "
                     f"{family.label}. Connect the {made_for} checkpoint it was trained on.")


class UniTuneEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneUniTuneEdit",
            display_name="UniTune Edit",
            category="FrozenTune/UniTune",
            description=(
                "Edits the image a model was UniTune-tuned on, in one node: samples '<token> <class word> <edit "
                f"prompt>' with CFG plus Prompt Guidance (pg {DEFAULT_PG:g} by default, as the Prompt Guidance Guider) "
                f"against the tuning caption '<token> <class word>' ({FORMULA}), optionally starting late from the "
                "noised original (SDEdit), then blends original detail back and keeps everything outside the "
                "mask as the original."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The tuned MODEL from UniTune Fine-Tune or UniTune Load."),
                io.Image.Input("image", tooltip="The original image (the one the model was tuned on)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the original and decodes the edit."),
                io.Clip.Input("clip", tooltip="The checkpoint's text encoder, for the prompts."),
                io.String.Input("token", default="beikkpic", tooltip="The token the image was bound to. With the "
                                "class word it is the prompt-guidance baseline, and is put in front of the edit prompt "
                                "unless the prompt has it already (any case, punctuation around it: 'Beikkpic,')."),
                io.String.Input("edit_prompt", default="as a watercolor painting", multiline=True,
                                tooltip="What to change, e.g. 'a minion' or 'in the snow'."),
                io.String.Input("negative", default="", multiline=True, tooltip="Negative prompt (the paper uses "
                                "an empty one)."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Steps of the full schedule; with "
                             "start < 1 only the last start × steps of them run."),
                *guidance_inputs(),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="The sampling algorithm (the stock list)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="The noise schedule (the stock list)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise; each variation in the batch gets its own noise."),
                io.Int.Input("batch", default=1, min=1, max=64, tooltip="How many variations to sample."),
                io.Float.Input("start", default=0.9, min=0.0, max=1.0, step=0.01, tooltip="SDEdit late start: "
                               "1 = from pure noise; 0.6 = from the original noised to 60% of the schedule (keeps "
                               "more of it); 0 = return the original."),
                io.Float.Input("blend", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="After sampling, mix "
                               "the original back in everywhere (0 = the edit, 1 = the original)."),
                io.Float.Input("blend_unchanged", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="After "
                               "sampling, restore the original where the edit barely changed the image (a soft "
                               "mask from the difference), keeping detail the sampler lost."),
                io.Mask.Input("mask", optional=True, tooltip="Optional: edit only inside the mask (white); "
                              "outside it the result is the original exactly. Resized to the image if needed."),
                # Last: saved workflows store widget values by position, so a new widget goes at the end.
                io.String.Input("class_word", default="", optional=True, tooltip="The class word the model was "
                                "tuned with, e.g. 'dog': put after the token in the prompt and the baseline. Empty = "
                                "the one the MODEL carries from UniTune Fine-Tune or Load (none for other models)."),
                io.Float.Input("flux_guidance", default=EDIT_GUIDANCE, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip=EDIT_FLUX_GUIDANCE_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The edited image(s), after blend and mask."),
                io.Latent.Output(display_name="LATENT", tooltip="The sampled latent(s), before blend and mask."),
            ],
        )

    @classmethod
    def execute(cls, model, image, vae, clip, token, edit_prompt, negative, steps, cfg, pg, sampler_name, scheduler,
                seed, batch, start, blend, blend_unchanged, mask=None, class_word="",
                flux_guidance=EDIT_GUIDANCE) -> io.NodeOutput:
        checks.finite(cfg=cfg, pg=pg, start=start, blend=blend, blend_unchanged=blend_unchanged,
                      flux_guidance=flux_guidance)
        if flux_guidance < 0:
            raise ValueError(f"flux_guidance={flux_guidance} must be 0 or more (the FluxGuidance node's default: "
                             f"{EDIT_GUIDANCE:g}).")
        checks.choice("sampler_name", sampler_name, comfy.samplers.SAMPLER_NAMES)
        checks.choice("scheduler", scheduler, comfy.samplers.SCHEDULER_NAMES)
        checks.vae(vae)
        if clip is None:
            raise ValueError("the CLIP input is missing: connect the checkpoint's CLIP.")
        if not token.strip():
            raise ValueError("token is empty: give the token the image was tuned on, e.g. 'beikkpic'.")
        if image.shape[0] != 1:
            raise ValueError(f"UniTune Edit edits one image, got a batch of {image.shape[0]}: pick one (e.g. with "
                             "ImageFromBatch) and use `batch` for variations.")
        sdedit.check_start(start)
        sdedit.check_blend(blend, blend_unchanged)
        check_scales(cfg, pg, 0.0, 1.0, 0.0)
        original = image_folder.prepare_images([image[0]])
        height, width = original.shape[1:3]
        mask = sdedit.fit_mask(mask, height, width, batch)
        latent = vae.encode(original)
        if start == 0.0:
            log.info("UniTune Edit: start = 0, returning the original")
            return io.NodeOutput(original.repeat(batch, 1, 1, 1), {"samples": sdedit.repeat_batch(latent, batch)})

        prompt, baseline = edit_prompts(token, tuned_class_word(model, token, class_word), edit_prompt)
        log.info("UniTune Edit: prompt %r, prompt-guidance baseline %r", prompt, baseline)
        if pivotal.PREFIX in token:  # a learned word: Qwen-Image/Z-Image read it on a private tokenizer only
            clip = private_words.reading_embeddings(clip)

        family = families.family_of(model)

        def encode(text):  # at flux_guidance on a guidance-embedding model (Flux.1 dev), as FluxGuidance sets it
            return finetune.with_guidance(family, clip.encode_from_tokens_scheduled(clip.tokenize(text)), flux_guidance)

        guider = Guider(model, cfg=cfg, pg=pg)
        guider.set_conds(encode(prompt), encode(negative), encode(baseline))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        sigmas = sdedit.late_start(sigmas, start)
        latents = comfy.sample.fix_empty_latent_channels(model, sdedit.repeat_batch(latent, batch))
        noise = comfy.sample.prepare_noise(latents, seed)
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        samples = guider.sample(noise, latents, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=sdedit.latent_mask(mask, latents), callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        samples = samples.to(comfy.model_management.intermediate_device())
        edited = sdedit.decoded_images(vae.decode(samples))[..., :3]
        if tuple(edited.shape[1:3]) != (height, width):
            raise RuntimeError(f"the VAE decoded {edited.shape[2]}x{edited.shape[1]} from a {width}x{height} image: "
                               "use the VAE of the checkpoint the model came from.")
        return io.NodeOutput(sdedit.blend_back(edited, original, blend, blend_unchanged, mask), {"samples": samples})


def tuned_class_word(model, token: str, class_word: str) -> str:
    """The class word UniTune Edit uses: the input when given, else the one the MODEL was tuned with (its
    TuningCaption from Fine-Tune or Load), else none. A mismatch with the MODEL's caption is logged, not refused."""
    caption = model.attachments.get(CAPTION_ATTACHMENT)
    class_word = " ".join(class_word.split())
    if caption is None:
        return class_word
    if token.strip().lower() != caption.word.lower():
        log.warning("UniTune Edit: token %r is not the word this MODEL was tuned on (%r)", token.strip(), caption.word)
    if class_word and class_word.lower() != " ".join(caption.class_word.split()).lower():
        log.warning("UniTune Edit: class_word %r is not the one this MODEL was tuned with (%r); using %r",
                    class_word, caption.class_word, class_word)
    return class_word or caption.class_word


NODES = [UniTuneFineTune, UniTuneSave, UniTuneLoad, UniTuneEdit]
