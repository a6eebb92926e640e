"""Small API-format prompts around each FrozenTune node, on the tiny stand-in models, for the reliability tier.

Each builder returns a ``Graph`` whose ``target`` is the FrozenTune node under test, with the smallest
sizes that still run it (64 px, one training step, one or two sampler steps), so a fuzz case that the node
accepts finishes in seconds. The model names are the stand-ins ``harness.server.prepare_base`` links.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL_BLOCKS = "sd_xl_base_1.0_0.9vae.safetensors"  # SDXL's block ids: the InstantStyle presets fit it
IPADAPTER = "ip-adapter_sdxl.safetensors"
CLIP_VISION = "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
IMAGE = "example.png"  # copied into every test server's input/
SIZE = 64


@dataclass
class Graph:
    """An API prompt under construction; ``add`` returns the new node's id."""

    nodes: dict[str, dict] = field(default_factory=dict)
    target: str | None = None

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    def prompt(self, **overrides) -> dict:
        """A copy of the prompt with ``overrides`` set on the target node's inputs."""
        out = copy.deepcopy(self.nodes)
        out[self.target]["inputs"].update(overrides)
        return out

    def inputs(self) -> dict:
        return self.nodes[self.target]["inputs"]


def out(node_id: str, slot: int = 0) -> list:
    return [node_id, slot]


def _checkpoint(g: Graph, name: str = SD15) -> str:
    return g.add("CheckpointLoaderSimple", ckpt_name=name)


def _image(g: Graph, size: int = SIZE) -> str:
    loaded = g.add("LoadImage", image=IMAGE)
    return g.add("ImageScale", image=out(loaded), upscale_method="nearest-exact", width=size, height=size,
                 crop="center")


def _sample_and_preview(g: Graph, model: list, ckpt: str, seed: int = 0, steps: int = 1, text: str = "a photo",
                        size: int = SIZE) -> str:
    pos = g.add("CLIPTextEncode", clip=out(ckpt, 1), text=text)
    neg = g.add("CLIPTextEncode", clip=out(ckpt, 1), text="")
    latent = g.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sampled = g.add("KSampler", model=model, seed=seed, steps=steps, cfg=7.0, sampler_name="euler",
                    scheduler="normal", positive=out(pos), negative=out(neg), latent_image=out(latent), denoise=1.0)
    decoded = g.add("VAEDecode", samples=out(sampled), vae=out(ckpt, 2))
    return g.add("PreviewImage", images=out(decoded))


def fine_tune_inputs(**overrides) -> dict:
    """UniTune Fine-Tune settings for one tiny LoRA step."""
    return {"token": "beikkpic", "class_word": "", "steps": 1, "batch_size": 1, "learning_rate": 1e-4,
            "optimizer": "adamw", "train": "lora", "lora_rank": 4, "gradient_checkpointing": False, "seed": 0,
            "precision": "fp32", **overrides}


def unitune_fine_tune(**overrides) -> Graph:
    g = Graph()
    ckpt = _checkpoint(g)
    image = _image(g)
    g.target = g.add("FrozenTuneUniTuneFineTune", model=out(ckpt), clip=out(ckpt, 1), vae=out(ckpt, 2),
                     image=out(image), **fine_tune_inputs(**overrides))
    g.add("PreviewImage", images=out(g.target, 1))
    return g


def unitune_save(filename: str = "unitune/fuzz", save_as: str = "as trained", lora_rank: int = 4,
                 **fine_tune) -> Graph:
    g = unitune_fine_tune(**fine_tune)
    tuned = [n for n, v in g.nodes.items() if v["class_type"] == "FrozenTuneUniTuneFineTune"][0]
    g.target = g.add("FrozenTuneUniTuneSave", model=out(tuned), filename=filename, save_as=save_as,
                     lora_rank=lora_rank)
    return g


def unitune_load(unitune_name: str, strength: float = 1.0, seed: int = 0) -> Graph:
    g = Graph()
    ckpt = _checkpoint(g)
    g.target = g.add("FrozenTuneUniTuneLoad", model=out(ckpt), unitune_name=unitune_name, strength=strength)
    _sample_and_preview(g, out(g.target), ckpt, seed=seed)
    return g


def prompt_guidance(**overrides) -> Graph:
    g = Graph()
    ckpt = _checkpoint(g)
    pos = g.add("CLIPTextEncode", clip=out(ckpt, 1), text="beikkpic as a watercolor")
    base = g.add("CLIPTextEncode", clip=out(ckpt, 1), text="beikkpic")
    neg = g.add("CLIPTextEncode", clip=out(ckpt, 1), text="")
    g.target = g.add("FrozenTunePromptGuidanceGuider", model=out(ckpt), positive=out(pos), baseline=out(base),
                     negative=out(neg), **{"cfg": 7.5, "pg": 2.0, "pg_start": 0.0, "pg_end": 1.0, "rescale": 0.0,
                                            **overrides})
    noise = g.add("RandomNoise", noise_seed=0)
    sampler = g.add("KSamplerSelect", sampler_name="euler")
    sigmas = g.add("BasicScheduler", model=out(ckpt), scheduler="normal", steps=2, denoise=1.0)
    latent = g.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    sampled = g.add("SamplerCustomAdvanced", noise=out(noise), guider=out(g.target), sampler=out(sampler),
                    sigmas=out(sigmas), latent_image=out(latent))
    decoded = g.add("VAEDecode", samples=out(sampled), vae=out(ckpt, 2))
    g.add("PreviewImage", images=out(decoded))
    return g


def unitune_edit(mask: list | None = None, **overrides) -> Graph:
    g = Graph()
    ckpt = _checkpoint(g)
    image = _image(g)
    inputs = {"token": "beikkpic", "edit_prompt": "as a watercolor painting", "negative": "", "steps": 1,
              "cfg": 7.5, "pg": 1.0, "sampler_name": "euler", "scheduler": "normal", "seed": 0, "batch": 1,
              "start": 1.0, "blend": 0.0, "blend_unchanged": 0.0, **overrides}
    if mask is not None:
        inputs["mask"] = mask
    g.target = g.add("FrozenTuneUniTuneEdit", model=out(ckpt), image=out(image), vae=out(ckpt, 2),
                     clip=out(ckpt, 1), **inputs)
    g.add("PreviewImage", images=out(g.target))
    return g


def unitune_edit_with_mask_batch(mask_batch: int, batch: int) -> Graph:
    """UniTune Edit with a mask batch of ``mask_batch`` (the red channel of a repeated image) and ``batch``."""
    g = unitune_edit()
    image = [n for n, v in g.nodes.items() if v["class_type"] == "ImageScale"][0]
    repeated = g.add("RepeatImageBatch", image=out(image), amount=mask_batch)
    mask = g.add("ImageToMask", image=out(repeated), channel="red")
    g.nodes[g.target]["inputs"].update(mask=out(mask), batch=batch)
    return g


def ipadapter_loader(ipadapter_file: str = IPADAPTER) -> Graph:
    g = instantstyle_apply()
    loader = [n for n, v in g.nodes.items() if v["class_type"] == "FrozenTuneIPAdapterLoader"][0]
    g.nodes[loader]["inputs"]["ipadapter_file"] = ipadapter_file
    g.target = loader
    return g


def instantstyle_apply(**overrides) -> Graph:
    g = Graph()
    ckpt = _checkpoint(g, SDXL_BLOCKS)
    vision = g.add("CLIPVisionLoader", clip_name=CLIP_VISION)
    image = _image(g)
    adapter = g.add("FrozenTuneIPAdapterLoader", ipadapter_file=IPADAPTER)
    inputs = {"weight": 1.0, "preset": "style", "custom_blocks": "output 1", "combine_images": "average",
              "content_text": "a girl in a pink dress", "subtract": 0.5, "start_at": 0.0, "end_at": 1.0, **overrides}
    g.target = g.add("FrozenTuneInstantStyleApply", model=out(ckpt), ipadapter=out(adapter),
                     clip_vision=out(vision), image=out(image), clip=out(ckpt, 1), **inputs)
    _sample_and_preview(g, out(g.target), ckpt)
    return g


def _style_inputs(g: Graph) -> tuple[str, str, str, str]:
    """The SDXL-family checkpoint, CLIP vision, style image and IP-Adapter loader every InstantStyle graph starts with."""
    ckpt = _checkpoint(g, SDXL_BLOCKS)
    vision = g.add("CLIPVisionLoader", clip_name=CLIP_VISION)
    image = _image(g)
    adapter = g.add("FrozenTuneIPAdapterLoader", ipadapter_file=IPADAPTER)
    return ckpt, vision, image, adapter


def _apply_embeds_and_sample(g: Graph, ckpt: str, adapter: str, embeds: list, negative: list | None = None,
                             **overrides) -> str:
    """InstantStyle Apply Embeds on ``embeds`` (and ``negative``) -> one sampler step -> preview; returns its id."""
    inputs = {"weight": 1.0, "composition_weight": 1.0, "preset": "style+layout",
              "custom_blocks": "output 1:1.0, input 8:0.5", "combine_embeds": "average", "embeds_scaling": "V only",
              "start_at": 0.0, "end_at": 1.0, **overrides}
    if negative is not None:
        inputs["negative_embeds"] = negative
    applied = g.add("FrozenTuneInstantStyleApplyEmbeds", model=out(ckpt), ipadapter=out(adapter), embeds=embeds,
                    **inputs)
    _sample_and_preview(g, out(applied), ckpt)
    return applied


def instantstyle_encode(**overrides) -> Graph:
    """InstantStyle Encode (content subtraction on) -> Apply Embeds with its negative -> sample."""
    g = Graph()
    ckpt, vision, image, adapter = _style_inputs(g)
    inputs = {"content_text": "a girl in a pink dress", "subtract": 0.5, **overrides}
    g.target = g.add("FrozenTuneInstantStyleEncode", ipadapter=out(adapter), clip_vision=out(vision),
                     image=out(image), clip=out(ckpt, 1), **inputs)
    _apply_embeds_and_sample(g, ckpt, adapter, out(g.target), out(g.target, 1))
    return g


def _retarget(g: Graph, class_type: str, **overrides) -> Graph:
    g.target = [n for n, v in g.nodes.items() if v["class_type"] == class_type][0]
    g.nodes[g.target]["inputs"].update(overrides)
    return g


def instantstyle_apply_embeds(**overrides) -> Graph:
    return _retarget(instantstyle_encode(), "FrozenTuneInstantStyleApplyEmbeds", **overrides)


def instantstyle_combine_embeds(**overrides) -> Graph:
    """Encode -> Combine Embeds (weighted, two inputs, so every weight input is read) -> Apply Embeds -> sample."""
    g = Graph()
    ckpt, vision, image, adapter = _style_inputs(g)
    encoded = g.add("FrozenTuneInstantStyleEncode", ipadapter=out(adapter), clip_vision=out(vision),
                    image=out(image), content_text="", subtract=0.5)
    inputs = {"method": "weighted", "weight_1": 1.0, "weight_2": 0.5, "weight_3": 1.0, "weight_4": 1.0, **overrides}
    g.target = g.add("FrozenTuneInstantStyleCombineEmbeds", embeds_1=out(encoded), embeds_2=out(encoded), **inputs)
    _apply_embeds_and_sample(g, ckpt, adapter, out(g.target), out(encoded, 1))
    return g


def instantstyle_save_embeds(filename: str = "fuzz", **overrides) -> Graph:
    """Encode -> Save Embeds (an output node: it writes models/ipadapter_embeds/) -> Apply Embeds of what it read back."""
    g = Graph()
    ckpt, vision, image, adapter = _style_inputs(g)
    encoded = g.add("FrozenTuneInstantStyleEncode", ipadapter=out(adapter), clip_vision=out(vision),
                    image=out(image), content_text="", subtract=0.5)
    g.target = g.add("FrozenTuneInstantStyleSaveEmbeds", embeds=out(encoded), negative_embeds=out(encoded, 1),
                     filename=filename, **overrides)
    _apply_embeds_and_sample(g, ckpt, adapter, out(g.target), out(g.target, 1))
    return g


def instantstyle_load_embeds(embeds_file: str) -> Graph:
    """Load Embeds (a file Save Embeds wrote) -> Apply Embeds with its negative -> sample."""
    g = Graph()
    ckpt = _checkpoint(g, SDXL_BLOCKS)
    adapter = g.add("FrozenTuneIPAdapterLoader", ipadapter_file=IPADAPTER)
    g.target = g.add("FrozenTuneInstantStyleLoadEmbeds", embeds_file=embeds_file)
    _apply_embeds_and_sample(g, ckpt, adapter, out(g.target), out(g.target, 1))
    return g


def train_inputs(**overrides) -> dict:
    """ControlNet-Zero Train settings for one tiny step on the image inputs."""
    return {"dataset_folder": "", "steps": 1, "batch_size": 1, "gradient_accumulation": 1, "learning_rate": 1e-5,
            "prompt_dropout": 0.5, "resolution": SIZE, "gradient_checkpointing": False, "mixed_precision": "fp32",
            "seed": 0, "checkpoint_every": 0, "run_name": "fuzz", "resume": False, "captions": "a photo",
            "optimizer": "adamw", **overrides}


def controlnet_zero_train(use_images: bool = True, **overrides) -> Graph:
    """Create -> Train -> loss-curve preview; trains on the example image as both target and hint by default."""
    g = Graph()
    ckpt = _checkpoint(g)
    create = g.add("FrozenTuneControlNetZeroCreate", model=out(ckpt), seed=0)
    inputs = train_inputs(**overrides)
    if use_images:
        image = _image(g)
        inputs.update(images=out(image), hints=out(image))
    g.target = g.add("FrozenTuneControlNetZeroTrain", model=out(ckpt), clip=out(ckpt, 1), vae=out(ckpt, 2),
                     control_net=out(create), **inputs)
    g.add("PreviewImage", images=out(g.target, 1))
    return g


def controlnet_zero_create(**overrides) -> Graph:
    g = controlnet_zero_train()
    g.target = [n for n, v in g.nodes.items() if v["class_type"] == "FrozenTuneControlNetZeroCreate"][0]
    g.nodes[g.target]["inputs"].update(overrides)
    return g


def controlnet_zero_save(filename: str = "controlnet_zero/fuzz", dtype: str = "fp16", **train) -> Graph:
    g = controlnet_zero_train(**train)
    trained = g.target
    g.target = g.add("FrozenTuneControlNetZeroSave", control_net=out(trained), filename=filename, dtype=dtype)
    return g


def textual_inversion_train(use_image: bool = True, **overrides) -> Graph:
    """Textual Inversion Train for one tiny step (an output node: it saves into models/embeddings/).

    ``use_image=False`` leaves the image input empty, so the views come from ``folder`` alone.
    """
    g = Graph()
    ckpt = _checkpoint(g)
    inputs = {"name": "fuzz_concept", "init_text": "object", "vectors": 1, "captions": "object templates",
              "steps": 1, "batch_size": 1, "learning_rate": 2e-3, "seed": 0, "precision": "fp32", **overrides}
    if use_image:
        inputs["image"] = out(_image(g))
    g.target = g.add("FrozenTuneTextualInversionTrain", model=out(ckpt), clip=out(ckpt, 1), vae=out(ckpt, 2),
                     **inputs)
    g.add("PreviewImage", images=out(g.target, 1))
    return g


def embedding_words(text: str = "a photo of embedding:fuzz_concept") -> Graph:
    """Embedding Words on the tiny SD1.5's CLIP (it reads embedding: words already: passed through) -> one step."""
    g = Graph()
    ckpt = _checkpoint(g)
    g.target = g.add("FrozenTuneEmbeddingWords", clip=out(ckpt, 1))
    pos = g.add("CLIPTextEncode", clip=out(g.target), text=text)
    neg = g.add("CLIPTextEncode", clip=out(g.target), text="")
    latent = g.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=1)
    sampled = g.add("KSampler", model=out(ckpt), seed=0, steps=1, cfg=7.0, sampler_name="euler", scheduler="normal",
                    positive=out(pos), negative=out(neg), latent_image=out(latent), denoise=1.0)
    g.add("PreviewImage", images=out(g.add("VAEDecode", samples=out(sampled), vae=out(ckpt, 2))))
    return g


def stock_text_to_image(seed: int = 0, steps: int = 2, text: str = "a photo of a cat") -> Graph:
    """The stock text-to-image graph on the tiny SD1.5 (no FrozenTune node); target = its PreviewImage."""
    g = Graph()
    ckpt = _checkpoint(g)
    g.target = _sample_and_preview(g, out(ckpt), ckpt, seed=seed, steps=steps, text=text)
    return g


def merge(*parts: Graph) -> dict:
    """One API prompt running several graphs side by side (node ids prefixed ``a``, ``b``, ...)."""
    prompt = {}
    for prefix, g in zip("abcdefgh", parts, strict=False):
        for node_id, node in copy.deepcopy(g.nodes).items():
            for name, value in node["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str):
                    node["inputs"][name] = [prefix + value[0], value[1]]
            prompt[prefix + node_id] = node
    return prompt


# The Flux.1 dev names the e2e server links to tiny stand-ins (harness.server.DIT_STAND_INS).
FLUX_UNET, FLUX_CLIP, FLUX_VAE = "flux1-dev.safetensors", ("clip_l.safetensors", "t5xxl_fp16.safetensors"), "ae.safetensors"
FLUX_IPADAPTER, FLUX_CLIP_VISION = "flux-ip-adapter.safetensors", "clip_vit_large_patch14.safetensors"


def _flux_style_inputs(g: Graph) -> tuple[str, str, str, str, str, str]:
    """Flux.1 dev model, CLIP, VAE, CLIP ViT-L vision, style image and Flux IP-Adapter loader."""
    model = g.add("UNETLoader", unet_name=FLUX_UNET, weight_dtype="default")
    clip = g.add("DualCLIPLoader", clip_name1=FLUX_CLIP[0], clip_name2=FLUX_CLIP[1], type="flux")
    vae = g.add("VAELoader", vae_name=FLUX_VAE)
    vision = g.add("CLIPVisionLoader", clip_name=FLUX_CLIP_VISION)
    adapter = g.add("FrozenTuneFluxIPAdapterLoader", flux_ipadapter_file=FLUX_IPADAPTER)
    return model, clip, vae, vision, _image(g), adapter


def _flux_sample(g: Graph, model: list, clip: str, vae: str, size: int = SIZE) -> str:
    pos = g.add("FluxGuidance", conditioning=out(g.add("CLIPTextEncode", clip=out(clip), text="a cat")), guidance=3.5)
    neg = g.add("CLIPTextEncode", clip=out(clip), text="")
    latent = g.add("EmptySD3LatentImage", width=size, height=size, batch_size=1)
    sampled = g.add("KSampler", model=model, seed=0, steps=1, cfg=1.0, sampler_name="euler", scheduler="simple",
                    positive=out(pos), negative=out(neg), latent_image=out(latent), denoise=1.0)
    return g.add("PreviewImage", images=out(g.add("VAEDecode", samples=out(sampled), vae=out(vae))))


FLUX_BLOCKS = {"weight": 1.0, "preset": "all", "custom_blocks": "double 0-1", "start_at": 0.0, "end_at": 1.0}


def instantstyle_apply_flux(**overrides) -> Graph:
    g = Graph()
    model, clip, vae, vision, image, adapter = _flux_style_inputs(g)
    inputs = {**FLUX_BLOCKS, "combine_images": "average", "content_text": "a girl", "subtract": 0.5, **overrides}
    g.target = g.add("FrozenTuneInstantStyleApplyFlux", model=out(model), flux_ipadapter=out(adapter),
                     clip_vision=out(vision), image=out(image), clip=out(clip), **inputs)
    _flux_sample(g, out(g.target), clip, vae)
    return g


def flux_ipadapter_loader(flux_ipadapter_file: str = FLUX_IPADAPTER) -> Graph:
    g = instantstyle_apply_flux()
    loader = [n for n, v in g.nodes.items() if v["class_type"] == "FrozenTuneFluxIPAdapterLoader"][0]
    g.nodes[loader]["inputs"]["flux_ipadapter_file"] = flux_ipadapter_file
    g.target = loader
    return g


def instantstyle_encode_flux(**overrides) -> Graph:
    """InstantStyle Encode (Flux) -> Apply Embeds (Flux) with its negative -> one step."""
    g = Graph()
    model, clip, vae, vision, image, adapter = _flux_style_inputs(g)
    g.target = g.add("FrozenTuneInstantStyleEncodeFlux", flux_ipadapter=out(adapter), clip_vision=out(vision),
                     image=out(image), clip=out(clip), **{"content_text": "a girl", "subtract": 0.5, **overrides})
    applied = g.add("FrozenTuneInstantStyleApplyEmbedsFlux", model=out(model), flux_ipadapter=out(adapter),
                    embeds=out(g.target), negative_embeds=out(g.target, 1), combine_embeds="average", **FLUX_BLOCKS)
    _flux_sample(g, out(applied), clip, vae)
    return g


def instantstyle_apply_embeds_flux(**overrides) -> Graph:
    g = instantstyle_encode_flux()
    applied = [n for n, v in g.nodes.items() if v["class_type"] == "FrozenTuneInstantStyleApplyEmbedsFlux"][0]
    g.nodes[applied]["inputs"].update(overrides)
    g.target = applied
    return g


# One valid base graph per FrozenTune node id (the fuzz pass starts from these).
BASES = {
    "FrozenTuneUniTuneFineTune": unitune_fine_tune,
    "FrozenTuneUniTuneSave": unitune_save,
    "FrozenTunePromptGuidanceGuider": prompt_guidance,
    "FrozenTuneUniTuneEdit": unitune_edit,
    "FrozenTuneIPAdapterLoader": ipadapter_loader,
    "FrozenTuneInstantStyleApply": instantstyle_apply,
    "FrozenTuneControlNetZeroCreate": controlnet_zero_create,
    "FrozenTuneControlNetZeroTrain": controlnet_zero_train,
    "FrozenTuneControlNetZeroSave": controlnet_zero_save,
    "FrozenTuneTextualInversionTrain": textual_inversion_train,
    "FrozenTuneEmbeddingWords": embedding_words,
    "FrozenTuneInstantStyleEncode": instantstyle_encode,
    "FrozenTuneInstantStyleApplyEmbeds": instantstyle_apply_embeds,
    "FrozenTuneInstantStyleCombineEmbeds": instantstyle_combine_embeds,
    "FrozenTuneInstantStyleSaveEmbeds": instantstyle_save_embeds,
    "FrozenTuneFluxIPAdapterLoader": flux_ipadapter_loader,
    "FrozenTuneInstantStyleApplyFlux": instantstyle_apply_flux,
    "FrozenTuneInstantStyleEncodeFlux": instantstyle_encode_flux,
    "FrozenTuneInstantStyleApplyEmbedsFlux": instantstyle_apply_embeds_flux,
}
