"""ControlNet-Zero Create, Train and Save nodes: thin V3 wrappers over ``controlnet_zero``.

The ControlNet travels between the nodes as the stock CONTROL_NET type, so a fresh or trained one
also plugs straight into ControlNetApplyAdvanced, and a file loaded with the stock
ControlNetLoader can be trained further.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import comfy.model_management
import folder_paths
import torch
from comfy_api.latest import io

from ..controlnet_zero import cache, controlnet_file, dataset, flux_xlabs, layouts, network, training_run
from ..controlnet_zero.texts import text
from ..storage import names, user_paths
from ..storage import safetensors_file as weights_file
from ..training.loss_curve import loss_curve_image
from . import checks, saved_files, training_inputs

log = logging.getLogger(__name__)

CATEGORY = "FrozenTune/ControlNet-Zero"
METADATA_ATTR = "frozentune_metadata"
DISK_CACHE_ABOVE = 256  # pairs; larger sets keep their encodings in a temp folder instead of memory
SAVE_NODE = "FrozenTuneControlNetZeroSave"
PREVIEW_SIZE = training_inputs.PREVIEW_SIZE  # a preview's longer side (at most the training resolution)


def _with_metadata(control_model: torch.nn.Module, metadata: dict[str, str]):
    control_net = layouts.for_module(control_model).wrap(control_model)
    setattr(control_net, METADATA_ATTR, dict(metadata))
    return control_net


class ControlNetZeroCreate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneControlNetZeroCreate",
            display_name="ControlNet-Zero Create",
            category=CATEGORY,
            description=(
                "Builds a new trainable ControlNet for the MODEL: a copy of its encoder and middle block joined "
                "through zero-initialized convolutions (SD1.5/SDXL), or of its first transformer blocks with "
                "zero-initialized output layers (Flux.1: XLabs' layout, or InstantX's with layout flux_instantx; SD3: "
                "diffusers'; Qwen-Image: InstantX's), plus a small hint encoder. Until trained it changes nothing (sampling with it applied is identical to sampling "
                "without it). The MODEL is not modified."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.5, SDXL, Flux.1, SD3 or Qwen-Image family) the ControlNet is "
                               "built for. It is only read."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed for the initial weights of the hint encoder (the only random part)."),
                # Last and optional, so workflows saved before it existed still load and build the same ControlNet.
                io.Int.Input("depth", default=0, min=0, max=64, optional=True, tooltip=text("depth")),
                io.Combo.Input("layout", options=layouts.create_choices(), default=layouts.FAMILY_DEFAULT,
                               optional=True, tooltip=text("layout")),
            ],
            outputs=[io.ControlNet.Output(display_name="CONTROL_NET", tooltip="The fresh ControlNet: connect it "
                                          "to ControlNet-Zero Train.")],
        )

    @classmethod
    def execute(cls, model, seed, depth=0, layout=layouts.FAMILY_DEFAULT) -> io.NodeOutput:
        layout = layouts.for_model(model, layout)  # an unsupported family or layout is refused before anything loads
        comfy.model_management.load_models_gpu([model])
        with torch.inference_mode(False):
            control_model = layout.create(model.model, torch.Generator().manual_seed(seed), depth=depth)
        metadata = {"controlnet_zero.init_seed": str(seed)}
        if hasattr(layout, "depth_of"):  # the layouts whose depth is a choice record the one made
            metadata["controlnet_zero.depth"] = str(layout.depth_of(control_model))
        return io.NodeOutput(_with_metadata(control_model, metadata))


class ControlNetZeroTrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneControlNetZeroTrain",
            display_name="ControlNet-Zero Train",
            category=CATEGORY,
            is_experimental=True,
            description=(
                "Trains a ControlNet on (image, hint, caption) triples with the base model frozen: only the "
                "ControlNet learns (AdamW or 8-bit AdamW), the loss is in the model's own eps/v/flow "
                "parameterization, latents and captions are encoded once. Give either a dataset folder (images/ + conditioning/ + captions) or "
                "image and hint batches. The input MODEL and CONTROL_NET are not modified."
            ),
            inputs=[
                io.Model.Input("model", tooltip=text("model")),
                io.Clip.Input("clip", tooltip=text("clip")),
                io.Vae.Input("vae", tooltip=text("vae")),
                io.ControlNet.Input("control_net", tooltip=text("control_net")),
                io.String.Input("dataset_folder", default="", tooltip=text("dataset_folder")),
                io.Int.Input("steps", default=1000, min=1, max=1000000, tooltip=text("steps")),
                io.Int.Input("batch_size", default=4, min=1, max=256, tooltip=text("batch_size")),
                io.Int.Input("gradient_accumulation", default=1, min=1, max=256, tooltip=text("gradient_accumulation")),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=1e-2, step=1e-6, round=1e-8,
                               tooltip=text("learning_rate")),
                io.Float.Input("prompt_dropout", default=0.5, min=0.0, max=1.0, step=0.05, tooltip=text("prompt_dropout")),
                io.Int.Input("resolution", default=512, min=64, max=4096, step=64, tooltip=text("resolution")),
                io.Boolean.Input("gradient_checkpointing", default=True, tooltip=text("gradient_checkpointing")),
                training_inputs.precision_input("mixed_precision", tooltip=text("mixed_precision"), optional=False),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip=text("seed")),
                io.Int.Input("checkpoint_every", default=0, min=0, max=1000000, tooltip=text("checkpoint_every")),
                io.String.Input("run_name", default="controlnet_zero", tooltip=text("run_name")),
                io.Boolean.Input("resume", default=False, tooltip=text("resume")),
                io.Image.Input("images", optional=True, tooltip=text("images")),
                io.Image.Input("hints", optional=True, tooltip=text("hints")),
                io.String.Input("captions", default="", multiline=True, optional=True, tooltip=text("captions")),
                # Last and optional, so workflows saved before it existed still load (their widget values
                # are positional) and train with AdamW as before.
                io.Combo.Input("optimizer", options=list(training_run.OPTIMIZERS), default="adamw", optional=True,
                               tooltip=text("optimizer")),
                io.Int.Input("preview_every", default=0, min=0, max=1000000, optional=True,
                             tooltip=text("preview_every")),
                io.Float.Input("flux_guidance", default=flux_xlabs.TRAIN_GUIDANCE, min=0.0, max=100.0, step=0.1,
                               optional=True, tooltip=text("flux_guidance")),
            ],
            outputs=[
                io.ControlNet.Output(display_name="CONTROL_NET", tooltip="The trained ControlNet. Apply it with "
                                     "Apply ControlNet, and keep it with ControlNet-Zero Save."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per optimizer step."),
                io.Image.Output(display_name="previews", tooltip=text("previews")),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, control_net, dataset_folder, steps, batch_size, gradient_accumulation,
                learning_rate, prompt_dropout, resolution, gradient_checkpointing, mixed_precision, seed,
                checkpoint_every, run_name, resume, images=None, hints=None, captions="",
                optimizer="adamw", preview_every=0, flux_guidance=flux_xlabs.TRAIN_GUIDANCE) -> io.NodeOutput:
        checks.finite(learning_rate=learning_rate, prompt_dropout=prompt_dropout, flux_guidance=flux_guidance)
        settings = training_run.TrainSettings(
            steps=steps, batch_size=batch_size, gradient_accumulation=gradient_accumulation,
            learning_rate=learning_rate, prompt_dropout=prompt_dropout, resolution=resolution,
            gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision, seed=seed,
            checkpoint_every=checkpoint_every, optimizer=optimizer,
        )
        settings.check()
        run = names.plain_name(run_name, input_name="run_name", example="controlnet_zero")
        layout = layouts.for_control_net(control_net)
        source_module = layout.unwrap(control_net)
        comfy.model_management.load_models_gpu([model])
        layouts.check_pair(source_module, model.model)
        checks.vae(vae)
        guidance = training_run.training_guidance(model.model, flux_guidance)
        run_dir = Path(folder_paths.get_output_directory()) / "controlnet_zero" / run
        source = cls._source(dataset_folder, images, hints, captions or "", resolution)
        cache_dir = None
        if source.count > DISK_CACHE_ABOVE:  # this run's own, in ComfyUI's temp folder (emptied at start-up too)
            cache_dir = Path(folder_paths.get_temp_directory()) / f"frozentune_controlnet_zero_{uuid.uuid4().hex}"

        progress = training_inputs.Progress(steps, preview_every, model.model.latent_format, min(PREVIEW_SIZE, resolution))
        preview = progress.preview()

        try:
            with torch.inference_mode(False), torch.enable_grad():
                data = cache.encode(source, model.model, vae, clip, resolution, cache_dir=cache_dir, guidance=guidance,
                                    hint_input=layout.hint_input)
                comfy.model_management.load_models_gpu([model], force_full_load=True)
                device = model.load_device
                control_model = network.trainable_copy(source_module, device)
                metadata = dict(getattr(control_net, METADATA_ATTR, {}) or {})
                metadata.update(training_run.guidance_metadata(guidance))
                result = training_run.train(model.model, control_model, data, settings, device,
                                       checkpoint_root=run_dir, resume=resume, metadata=metadata,
                                       on_step=progress.on_step("ControlNet-Zero step", 25),
                                       run_folders=True, preview=preview)
                trained = result.control_model.to(comfy.model_management.unet_offload_device())
        finally:
            if cache_dir is not None:  # not reused: removed whether the run finished, failed or was cancelled
                shutil.rmtree(cache_dir, ignore_errors=True)
            comfy.model_management.soft_empty_cache()
        curve = loss_curve_image(result.losses, title="ControlNet-Zero loss")
        return io.NodeOutput(_with_metadata(trained, result.metadata), curve, progress.grid())

    @staticmethod
    def _source(folder: str, images, hints, captions: str, resolution: int) -> cache.Source:
        folder = folder.strip()
        if folder and (images is not None or hints is not None):
            raise ValueError("both dataset_folder and image inputs are given: use one of them (clear "
                             "dataset_folder to train on the images and hints).")
        if folder:  # confined to input/ (and FROZENTUNE_DATA_DIRS) before anything is read
            roots = user_paths.roots(Path(folder_paths.get_input_directory()))
            return cache.Source.from_pairs(dataset.scan_folder(folder, roots=roots), resolution)
        if images is None or hints is None:
            raise ValueError("no dataset: set dataset_folder, or connect both images and hints.")
        targets, fitted_hints, caps = dataset.from_images(images, hints, captions, resolution)
        return cache.Source.from_tensors(targets, fitted_hints, caps)


class ControlNetZeroSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneControlNetZeroSave",
            display_name="ControlNet-Zero Save",
            category=CATEGORY,
            is_output_node=True,
            description=(
                "Saves a ControlNet into models/controlnet/ as safetensors in the layout the stock loader reads for "
                "its family (SD1.5/SDXL: ComfyUI's ldm layout; Flux.1: XLabs' or InstantX's, as created; SD3: diffusers'), atomic, training "
                "settings in the metadata, where the stock Load ControlNet Model node lists it. Its control_net_name output can feed that node's name input directly."
            ),
            inputs=[
                io.ControlNet.Input("control_net", tooltip="The CONTROL_NET output of ControlNet-Zero Train."),
                io.String.Input("filename", default="controlnet_zero/my_controlnet", tooltip=text("filename")),
                io.Combo.Input("dtype", options=list(controlnet_file.DTYPES), default="fp32", tooltip=text("save_dtype")),
            ],
            outputs=[io.AnyType.Output(display_name="control_net_name", tooltip="The saved file's name as Load "
                                       "ControlNet Model lists it (connect it to that node's name input).")],
        )

    @classmethod
    def fingerprint_inputs(cls, control_net=None, filename=None, dtype=None) -> int:
        # Runs again (writing the file again) when the file it wrote for these inputs was deleted.
        return saved_files.fingerprint(SAVE_NODE, filename=filename, dtype=dtype)

    @classmethod
    def execute(cls, control_net, filename, dtype) -> io.NodeOutput:
        module = layouts.for_control_net(control_net).unwrap(control_net)
        root = Path(folder_paths.get_folder_paths("controlnet")[0])
        folder, stem = names.save_target(filename, input_name="filename", folders={"controlnet": root},
                                         default="controlnet")
        controlnet_file.check_stem(Path(stem))  # before anything is written
        path = weights_file.unused_path(folder, stem)
        with torch.inference_mode(False):
            controlnet_file.save(path, module, getattr(control_net, METADATA_ATTR, {}) or {}, dtype)
        saved_files.remember(SAVE_NODE, path, filename=filename, dtype=dtype)
        listed = os.path.relpath(path, root).replace(os.sep, "/")
        log.info("ControlNet-Zero: saved %s", path)
        return io.NodeOutput(listed)


NODES = [ControlNetZeroCreate, ControlNetZeroTrain, ControlNetZeroSave]
