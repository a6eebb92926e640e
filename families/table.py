"""The family table: one ``Family`` record per model family FrozenTune supports, as data.

Everything a capability asks of a family lives here: which ComfyUI config classes
(``comfy.supported_models``) it covers, its latents, its text encoders, how it is guided, and which
modules of its diffusion model each UniTune train mode trains. What ComfyUI already knows about a
loaded model (parameterization, shift, the guidance default) is read from the model, never restated.
A new family is one more record plus its tests (Qwen-Image, Z-Image and Chroma were).

Nothing here imports torch or ComfyUI.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_MODES = ("full", "attention", "lora")


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family, by the names ComfyUI gives it."""

    key: str  # embedding-file key and tokenizer attribute: "clip_l", "clip_g", "t5xxl"
    tokens: str  # its key in ``CLIP.tokenize`` output: "l", "g", "t5xxl"
    width: int  # width of its token embeddings (what an ``embedding:`` file holds for it)
    word: bool  # its per-token output is (part of) the conditioning, so a prompt's word acts through it
    pooled: bool  # it feeds the pooled vector
    # ComfyUI 0.3.75's tokenizer reads ``embedding:name`` words for it (False: built without the embedding
    # directory, so the words stay plain text: Qwen2.5-VL in text_encoders/qwen_image.py:11, Qwen3 in z_image.py:9)
    embedding: bool = True
    # FrozenTune reads ``embedding:name`` words for it on a private copy of the tokenizer (a CLIP clone: the
    # Embedding Words node, textual inversion and pivotal tuning; textual_inversion/private_words.py), for an
    # encoder whose stock tokenizer does not (``embedding`` False) and whose chat template that copy knows.
    private_words: bool = False


@dataclass(frozen=True)
class TrainTargets:
    """Which modules of the diffusion model a UniTune train mode trains, as regular expressions.

    Each pattern is matched whole (``re.fullmatch``) against a module's name in
    ``diffusion_model.named_modules()``. ``full`` and ``attention`` train the matching modules' own
    parameters; ``lora`` puts a LoRA on each matching module (all of them are Linear layers).
    """

    full: str
    attention: str
    lora: str

    def pattern(self, mode: str) -> str:
        if mode not in TRAIN_MODES:
            raise ValueError(f"train mode {mode!r} is unknown: use one of {', '.join(TRAIN_MODES)}.")
        return getattr(self, mode)


@dataclass(frozen=True)
class Family:
    """A model family. Families FrozenTune does not know get a record with only id, label and config class."""

    id: str  # "sd15", "sdxl", "flux1", ..., "chroma"; for others the config class name, lower case
    label: str  # for messages: "SD1.x", "Flux.1 dev"
    config_classes: tuple[str, ...] = ()  # the comfy.supported_models classes it covers
    arch: str | None = None  # "unet" | "dit"; None for a family FrozenTune does not know
    latent_channels: int | None = None
    text_encoders: tuple[TextEncoder, ...] = ()
    cfg: str | None = None  # "true": sampled with classifier-free guidance; "distilled": at cfg 1
    guidance_embed: bool = False  # takes a guidance strength as model input (the value: ``default_guidance``)
    context_dim: int | None = None  # width of the text context (c_crossattn) the model reads
    pooled_dim: int | None = None  # width of the pooled text vector it reads (SDXL: of CLIP-G alone), else None
    targets: TrainTargets | None = None  # UniTune train targets per mode
    # What UniTune's train = auto picks: the mode whose fp32 state fits a 24 GB card beside the model (SD1.x:
    # full, as the paper; the others: lora).
    auto_train: str | None = None
    # Slots for the next issue. InstantStyle's block roles (role -> diffusers block names) live in
    # instantstyle/blocks.py BLOCK_ROLES for SD1.x/SDXL today; no DiT has a published map yet.
    style_blocks: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    # The ControlNet file layout ControlNet-Zero writes (controlnet_zero/layouts.py): "ldm" (comfy.cldm.cldm.
    # ControlNet's state dict), "flux_xlabs" (XLabs' Flux ControlNet = ComfyUI's ControlNetFlux state dict),
    # "sd3_diffusers" (diffusers' SD3ControlNetModel names), "qwen_instantx" (InstantX's Qwen-Image ControlNet:
    # diffusers' QwenImageControlNetModel names = ComfyUI's module names); None: ControlNet-Zero does not support it.
    controlnet_layout: str | None = None
    # Why ControlNet-Zero refuses a family without a layout (named in the refusal); None: just unsupported.
    controlnet_refusal: str | None = None

    @property
    def known(self) -> bool:
        """Whether this is a family of the table (not just a named config class)."""
        return self.arch is not None

    @property
    def pooled(self) -> bool:
        return self.pooled_dim is not None

    def encoder(self, key: str) -> TextEncoder | None:
        return next((e for e in self.text_encoders if e.key == key), None)

    @property
    def word_encoders(self) -> tuple[TextEncoder, ...]:
        """The text encoders whose per-token output carries a prompt's words (where a learned word acts)."""
        return tuple(e for e in self.text_encoders if e.word)


SD15 = "sd15"
SDXL = "sdxl"
FLUX1 = "flux1"
FLUX1_SCHNELL = "flux1_schnell"
SD3 = "sd3"
QWEN_IMAGE = "qwen_image"
Z_IMAGE = "z_image"
CHROMA = "chroma"

CLIP_L = TextEncoder("clip_l", "l", 768, word=True, pooled=False)
CLIP_G = TextEncoder("clip_g", "g", 1280, word=True, pooled=True)  # SDXL: the pooled vector is CLIP-G's alone
T5XXL = TextEncoder("t5xxl", "t5xxl", 4096, word=True, pooled=False)
# Flux: CLIP-L feeds only the pooled vector (text_encoders/flux.py FluxClipModel.encode_token_weights
# returns t5_out, l_pooled); the T5 tokens carry the words.
FLUX_CLIP_L = TextEncoder("clip_l", "l", 768, word=False, pooled=True)
# SD3: CLIP-L and CLIP-G tokens are concatenated (padded to 4096) before T5's; pooled = l_pooled ++ g_pooled
# (text_encoders/sd3_clip.py SD3ClipModel.encode_token_weights).
SD3_CLIP_L = TextEncoder("clip_l", "l", 768, word=True, pooled=True)
# Qwen-Image: Qwen2.5-VL-7B (text_encoders/qwen_image.py: tokenizer attribute and tokens key "qwen25_7b", 3584
# wide; its loader always builds the 1280-wide vision tower too). Z-Image: Qwen3-4B, hidden layer -2
# (text_encoders/z_image.py: "qwen3_4b", 2560 wide). Neither tokenizer gets an embedding directory in 0.3.75:
# their words are read on a private tokenizer copy (``private_words``).
QWEN25_7B = TextEncoder("qwen25_7b", "qwen25_7b", 3584, word=True, pooled=False, embedding=False, private_words=True)
QWEN3_4B = TextEncoder("qwen3_4b", "qwen3_4b", 2560, word=True, pooled=False, embedding=False, private_words=True)

# UniTune train targets. SD1.x/SDXL are today's unitune/finetune.py rules written as patterns (at 28daab5:
# ATTENTION = (".attn1.", ".attn2."), ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0");
# attention mode trains every module with an attn1/attn2 component, lora mode the ones among them whose
# name ends in a projection): self- and cross-attention, LoRA on the four projections, no MLP.
UNET_TARGETS = TrainTargets(
    full=r".*",
    attention=r"(.*\.)?attn[12](\..*)?",
    lora=r"(.*\.)?attn[12]\..*(to_q|to_k|to_v|to_out\.0)",
)
# DiTs. ``lora``: the attention q/k/v/out and MLP projections of every transformer block; modulation
# (img_mod/txt_mod/modulation.lin, adaLN_modulation), embedders (img_in, txt_in, time_in, vector_in,
# guidance_in, x/t/y/context_embedder), QK-norm scales and the final layer stay frozen. The anchors:
# - diffusers train_dreambooth_lora_flux.py default target_modules: attn.to_{q,k,v,out.0},
#   attn.add_{q,k,v}_proj, attn.to_add_out, ff.net.{0.proj,2}, ff_context.net.{0.proj,2} (double blocks:
#   both streams' attention and MLP; single blocks: only attn.to_{q,k,v}, i.e. the q/k/v rows of
#   ComfyUI's fused linear1; no modulation).
# - diffusers train_dreambooth_lora_sd3.py default: attention only (to_{q,k,v,out.0}, add_{q,k,v}_proj,
#   to_add_out; early versions to_{q,k,v,out.0}); no MLP, no modulation, and (peft matches name
#   suffixes) not SD3.5 medium's attn2, which we include.
# - kohya sd-scripts networks/lora_flux.py: every Linear inside DoubleStreamBlock and SingleStreamBlock
#   (linear1/linear2 whole, modulation included; split_qkv only splits the qkv LoRA). kohya's
#   musubi-tuner (HunyuanVideo and later DiTs) excludes ``.*(img_mod|txt_mod|modulation).*`` by default,
#   as community reports said it trains better.
# We follow kohya's block coverage without modulation, which is diffusers' Flux default plus the whole
# fused single-block layers: ComfyUI's Flux fuses a single block's q/k/v with the MLP input in linear1 and
# the attention output with the MLP output in linear2, so the whole layer is the unit a LoRA (and a
# ``.diff``) can address, and ComfyUI's key map still maps diffusers' per-projection names onto slices of
# it. SD3 gets the same rule (attention + MLP) as Flux rather than diffusers' attention-only default, so
# one mode means one thing across the DiTs.
# ``attention``: the attention projections. Flux single blocks have no separate ones, so attention mode
# trains their fused linear1/linear2 whole (the MLP halves with them); QK-norm scales are not trained.
FLUX_TARGETS = TrainTargets(
    full=r".*",
    attention=r"double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)|single_blocks\.\d+\.linear[12]",
    lora=r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12]",
)
# SD3/SD3.5 (comfy/ldm/modules/diffusionmodules/mmdit.py): joint_blocks.i.{x,context}_block.attn.{qkv,proj}
# (the last context block is pre_only: attn.qkv alone, no proj or mlp), SD3.5 medium's
# x_block.attn2.{qkv,proj}, and mlp.fc1/fc2.
SD3_TARGETS = TrainTargets(
    full=r".*",
    attention=r"joint_blocks\.\d+\.(x|context)_block\.attn2?\.(qkv|proj)",
    lora=r"joint_blocks\.\d+\.(x|context)_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])",
)

# Qwen-Image (comfy/ldm/qwen_image/model.py): transformer_blocks.i.attn.{to_q,to_k,to_v,to_out.0} (image
# stream), .attn.{add_q_proj,add_k_proj,add_v_proj,to_add_out} (text stream), {img,txt}_mlp.net.{0.proj,2};
# img_mod/txt_mod, img_in/txt_in/txt_norm, time_text_embed, norm_out/proj_out frozen. diffusers'
# train_dreambooth_lora_qwen_image.py defaults to to_{k,q,v,out.0} (peft suffixes: the image stream only);
# musubi-tuner's Qwen-Image LoRA takes every Linear of the blocks but the modulation: the Flux rule again.
QWEN_IMAGE_TARGETS = TrainTargets(
    full=r".*",
    attention=r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",
    lora=r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
         r"|(img|txt)_mlp\.net\.(0\.proj|2))",
)
# Z-Image (comfy/ldm/lumina/model.py NextDiT): the main blocks (layers.i), the image-token refiner
# (noise_refiner.i) and the caption refiner (context_refiner.i) are all JointTransformerBlocks with a fused
# attention.qkv, attention.out and a SwiGLU feed_forward.w1/w2/w3; adaLN_modulation, x/t/cap_embedder, the norms
# and final_layer stay frozen. The refiners are transformer blocks of the image and text streams, as Flux's
# txt_* halves are, so they train too.
Z_IMAGE_TARGETS = TrainTargets(
    full=r".*",
    attention=r"(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)",
    lora=r"(layers|noise_refiner|context_refiner)\.\d+\.(attention\.(qkv|out)|feed_forward\.w[123])",
)
# Chroma (comfy/ldm/chroma/model.py) runs Flux's own DoubleStreamBlock/SingleStreamBlock with modulation=False
# (its modulations come from distilled_guidance_layer, frozen), so Flux's rule names the same layers.
CHROMA_TARGETS = FLUX_TARGETS

FAMILIES: dict[str, Family] = {
    SD15: Family(
        SD15, "SD1.x", config_classes=("SD15", "SD15_instructpix2pix"), arch="unet", latent_channels=4,
        text_encoders=(CLIP_L,), cfg="true", context_dim=768, targets=UNET_TARGETS, auto_train="full",
        controlnet_layout="ldm",
    ),
    # Also any other config whose model is a comfy.model_base.SDXL (how the family was recognised before).
    SDXL: Family(
        SDXL, "SDXL family",
        config_classes=("SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "KOALA_1B", "SDXL_instructpix2pix"),
        arch="unet", latent_channels=4, text_encoders=(CLIP_L, CLIP_G), cfg="true", context_dim=2048,
        pooled_dim=1280, targets=UNET_TARGETS, auto_train="lora", controlnet_layout="ldm",
    ),
    FLUX1: Family(
        FLUX1, "Flux.1 dev", config_classes=("Flux",), arch="dit", latent_channels=16,
        text_encoders=(FLUX_CLIP_L, T5XXL), cfg="distilled", guidance_embed=True, context_dim=4096,
        pooled_dim=768, targets=FLUX_TARGETS, auto_train="lora", controlnet_layout="flux_xlabs",
        # InstantStyle roles, PROVISIONAL (instantstyle/flux_blocks.py): single stream from SplitFlux (arXiv
        # 2511.15258: single 0-9 content, 10-37 style); double stream an unmeasured extension of that order.
        style_blocks=(("style", ("double 10-18", "single 10-37")), ("layout", ("double 0-9", "single 0-9"))),
    ),
    FLUX1_SCHNELL: Family(
        FLUX1_SCHNELL, "Flux.1 schnell", config_classes=("FluxSchnell",), arch="dit", latent_channels=16,
        text_encoders=(FLUX_CLIP_L, T5XXL), cfg="distilled", context_dim=4096, pooled_dim=768,
        targets=FLUX_TARGETS, auto_train="lora", controlnet_layout="flux_xlabs",
    ),
    SD3: Family(
        SD3, "SD3/SD3.5", config_classes=("SD3",), arch="dit", latent_channels=16,
        text_encoders=(SD3_CLIP_L, CLIP_G, T5XXL), cfg="true", context_dim=4096, pooled_dim=2048,
        targets=SD3_TARGETS, auto_train="lora", controlnet_layout="sd3_diffusers",
    ),
    # Qwen-Image and Qwen-Image Edit (one config class; Edit adds reference latents to the conditioning): flow,
    # shift 1.15, true CFG, Wan-2.1 latent format (sampling latents [B, 16, 1, H, W]).
    QWEN_IMAGE: Family(
        QWEN_IMAGE, "Qwen-Image", config_classes=("QwenImage",), arch="dit", latent_channels=16,
        text_encoders=(QWEN25_7B,), cfg="true", context_dim=3584, targets=QWEN_IMAGE_TARGETS, auto_train="lora",
        controlnet_layout="qwen_instantx",
    ),
    # Z-Image: flow, shift 3. cfg "distilled" is Z-Image Turbo's (cfg 1; ComfyUI's template samples it at cfg 1,
    # 9 steps). A non-distilled Z-Image has the same ComfyUI config (ZImage, dim 3840) and the same keys, so
    # nothing in the model tells the two apart: the sampler's cfg is the user's either way. A Z-Image-shaped
    # model narrower than 3840 is classed Lumina2 by ComfyUI, which this record does not cover.
    Z_IMAGE: Family(
        Z_IMAGE, "Z-Image", config_classes=("ZImage",), arch="dit", latent_channels=16, text_encoders=(QWEN3_4B,),
        cfg="distilled", context_dim=2560, targets=Z_IMAGE_TARGETS, auto_train="lora",
        controlnet_refusal="ComfyUI 0.3.75 has no ControlNet loader for Z-Image (comfy/controlnet.py detects no "
        "Z-Image/Lumina 2 format), so a trained file could not be used",
    ),
    # Chroma: Flux-like blocks, T5 only (embedding key t5xxl), true CFG. Its model reads a guidance value
    # (model_base.Chroma.extra_conds, default 0) but it is not guidance-distilled: trained and sampled at 0.
    CHROMA: Family(
        CHROMA, "Chroma", config_classes=("Chroma",), arch="dit", latent_channels=16, text_encoders=(T5XXL,),
        cfg="true", context_dim=4096, targets=CHROMA_TARGETS, auto_train="lora",
        controlnet_refusal="ComfyUI 0.3.75 has no ControlNet loader for Chroma (its model takes ControlNet residuals, "
        "but no Chroma ControlNet file format is detected), so a trained file could not be used",
    ),
}

BY_CONFIG_CLASS: dict[str, Family] = {name: f for f in FAMILIES.values() for name in f.config_classes}

# Readable names for config classes FrozenTune does not support (for messages); others show the class name.
OTHER_LABELS: dict[str, str] = {
    "SD20": "SD2.x", "SD21UnclipL": "SD2.1 unCLIP", "SD21UnclipH": "SD2.1 unCLIP", "SDXLRefiner": "SDXL Refiner",
    "SD_X4Upscaler": "SD x4 upscaler", "SVD_img2vid": "Stable Video Diffusion", "Stable_Cascade_C": "Stable Cascade",
    "Stable_Cascade_B": "Stable Cascade", "FluxInpaint": "Flux.1 Fill", "Flux2": "Flux.2", "Chroma": "Chroma",
    "ChromaRadiance": "Chroma Radiance", "QwenImage": "Qwen-Image", "Lumina2": "Lumina 2", "ZImage": "Z-Image",
    "HiDream": "HiDream", "AuraFlow": "AuraFlow", "PixArtAlpha": "PixArt-α", "PixArtSigma": "PixArt-Σ",
    "HunyuanDiT": "Hunyuan-DiT", "HunyuanDiT1": "Hunyuan-DiT", "HunyuanImage21": "HunyuanImage 2.1",
    "Omnigen2": "OmniGen2", "CosmosT2IPredict2": "Cosmos Predict2",
}


def other(config_class: str) -> Family:
    """The record for a config class no family of the table covers: its readable name, nothing else."""
    return Family(config_class.lower(), OTHER_LABELS.get(config_class, config_class), config_classes=(config_class,))
