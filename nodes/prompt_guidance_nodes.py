"""Prompt Guidance Guider and UniTune Edit nodes: thin V3 wrappers over ``unitune.guidance`` / ``unitune.edit``."""

from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..unitune import edit, finetune, guidance
from . import checks

log = logging.getLogger(__name__)

FORMULA = "ε = ε_neg + cfg·(ε_pos − ε_neg) + pg·(ε_pos − ε_base)"


def _guidance_inputs(pg_default: float) -> list:
    return [
        io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale: how strongly the positive prompt is followed, "
                       "away from the negative."),
        io.Float.Input("pg", default=pg_default, min=-20.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Prompt-guidance scale: how strongly the result moves from the baseline prompt "
                       "toward the positive one. 0 = plain CFG (the baseline is then never evaluated)."),
    ]


class PromptGuidanceGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTunePromptGuidanceGuider",
            display_name="Prompt Guidance Guider",
            category="FrozenTune/Sampling",
            description=(
                f"CFG plus Prompt Guidance: {FORMULA}. The baseline is another prompt, e.g. the bare UniTune "
                "token or a caption of the original, so pg pushes along the direction 'baseline → edit'. "
                "All three prompts run in one batched model call per step (attention patches see "
                "cond_or_uncond 0 = positive, 1 = negative, 2 = baseline, and the guider declares only 1 "
                "unconditional, so InstantStyle gives the baseline the style tokens); outside the "
                "pg_start..pg_end window the baseline is skipped and the step is exactly stock CFG. Model "
                "hooks written for plain CFG (APG, LatentApplyOperationCFG: sampler_pre_cfg_function) get the "
                "[positive, negative] pair stock CFG gives them and rewrite the CFG term; the pg term uses the "
                "raw predictions. A baseline without a ControlNet gets the positive's. Connect to "
                "SamplerCustomAdvanced."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to sample, e.g. the UniTune-tuned MODEL."),
                io.Conditioning.Input("positive", tooltip="The edit prompt, e.g. 'beikkpic a minion'."),
                io.Conditioning.Input("baseline", tooltip="The prompt to guide away from, e.g. the bare token "
                                      "'beikkpic' or a caption of the original image."),
                io.Conditioning.Input("negative", tooltip="The unconditional / negative prompt (often empty)."),
                *_guidance_inputs(pg_default=2.0),
                io.Float.Input("pg_start", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Where in the "
                               "schedule the pg term starts acting (0 = first step)."),
                io.Float.Input("pg_end", default=1.0, min=0.0, max=1.0, step=0.01, tooltip="Where in the "
                               "schedule the pg term stops acting (1 = last step). E.g. 0..0.5 = early only."),
                io.Float.Input("rescale", default=0.0, min=0.0, max=1.0, step=0.01, tooltip="Guidance rescale φ "
                               "(as CFG-rescale) on the combined prediction; tames high cfg/pg. 0 = off, 0.7 usual."),
            ],
            outputs=[io.Guider.Output(tooltip="Connect to SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, model, positive, baseline, negative, cfg, pg, pg_start, pg_end, rescale) -> io.NodeOutput:
        checks.finite(cfg=cfg, pg=pg, pg_start=pg_start, pg_end=pg_end, rescale=rescale)
        guider = guidance.PromptGuidanceGuider(model, cfg=cfg, pg=pg, pg_start=pg_start, pg_end=pg_end,
                                               rescale=rescale)
        guider.set_conds(positive, negative, baseline)
        return io.NodeOutput(guider)


class UniTuneEdit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FrozenTuneUniTuneEdit",
            display_name="UniTune Edit",
            category="FrozenTune/UniTune",
            description=(
                "Edits the image a model was UniTune-tuned on, in one node: samples '<token> <edit prompt>' with "
                f"CFG plus Prompt Guidance against the bare token ({FORMULA}), optionally starting late from the "
                "noised original (SDEdit), then blends original detail back and keeps everything outside the "
                "mask as the original."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The tuned MODEL from UniTune Fine-Tune or UniTune Load."),
                io.Image.Input("image", tooltip="The original image (the one the model was tuned on)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the original and decodes the edit."),
                io.Clip.Input("clip", tooltip="The checkpoint's text encoder, for the prompts."),
                io.String.Input("token", default="beikkpic", tooltip="The token the image was bound to; it is also "
                                "the prompt-guidance baseline, and is put in front of the edit prompt if missing."),
                io.String.Input("edit_prompt", default="as a watercolor painting", multiline=True,
                                tooltip="What to change, e.g. 'a minion' or 'in the snow'."),
                io.String.Input("negative", default="", multiline=True, tooltip="Negative prompt (the paper uses "
                                "an empty one)."),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Steps of the full schedule; with "
                             "start < 1 only the last start × steps of them run."),
                *_guidance_inputs(pg_default=0.0),
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
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE", tooltip="The edited image(s), after blend and mask."),
                io.Latent.Output(display_name="LATENT", tooltip="The sampled latent(s), before blend and mask."),
            ],
        )

    @classmethod
    def execute(cls, model, image, vae, clip, token, edit_prompt, negative, steps, cfg, pg, sampler_name, scheduler,
                seed, batch, start, blend, blend_unchanged, mask=None) -> io.NodeOutput:
        checks.finite(cfg=cfg, pg=pg, start=start, blend=blend, blend_unchanged=blend_unchanged)
        checks.choice("sampler_name", sampler_name, comfy.samplers.SAMPLER_NAMES)
        checks.choice("scheduler", scheduler, comfy.samplers.SCHEDULER_NAMES)
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise ValueError("the VAE input is missing or empty: connect the checkpoint's VAE.")
        if clip is None:
            raise ValueError("the CLIP input is missing: connect the checkpoint's CLIP.")
        if not token.strip():
            raise ValueError("token is empty: give the token the image was tuned on, e.g. 'beikkpic'.")
        if image.shape[0] != 1:
            raise ValueError(f"UniTune Edit edits one image, got a batch of {image.shape[0]}: pick one (e.g. with "
                             "ImageFromBatch) and use `batch` for variations.")
        edit.check_start(start)
        edit.check_blend(blend, blend_unchanged)
        guidance.check_scales(cfg, pg, 0.0, 1.0, 0.0)
        original = finetune.prepare_images([image[0]])
        height, width = original.shape[1:3]
        mask = edit.fit_mask(mask, height, width, batch)
        latent = vae.encode(original)
        if start == 0.0:
            log.info("UniTune Edit: start = 0, returning the original")
            return io.NodeOutput(original.repeat(batch, 1, 1, 1), {"samples": latent.repeat(batch, 1, 1, 1)})

        token = token.strip()
        prompt = edit_prompt.strip() if token in edit_prompt.split() else f"{token} {edit_prompt.strip()}"

        def encode(text):
            return clip.encode_from_tokens_scheduled(clip.tokenize(text))

        guider = guidance.PromptGuidanceGuider(model, cfg=cfg, pg=pg)
        guider.set_conds(encode(prompt), encode(negative), encode(token))
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
        sigmas = edit.late_start(sigmas, start)
        latents = comfy.sample.fix_empty_latent_channels(model, latent.repeat(batch, 1, 1, 1))
        noise = comfy.sample.prepare_noise(latents, seed)
        callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
        samples = guider.sample(noise, latents, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=mask, callback=callback,
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        samples = samples.to(comfy.model_management.intermediate_device())
        edited = vae.decode(samples)[..., :3]
        if tuple(edited.shape[1:3]) != (height, width):
            raise RuntimeError(f"the VAE decoded {edited.shape[2]}x{edited.shape[1]} from a {width}x{height} image: "
                               "use the VAE of the checkpoint the model came from.")
        return io.NodeOutput(edit.blend_back(edited, original, blend, blend_unchanged, mask), {"samples": samples})


NODES = [PromptGuidanceGuider, UniTuneEdit]
