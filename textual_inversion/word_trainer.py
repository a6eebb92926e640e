"""Textual inversion: learn new token vectors for a concept while the text encoder(s) and the UNet stay frozen.

Gal et al. 2022, "An Image is Worth One Word". What trains is a few fp32 vectors per text encoder
(CLIP-L 768 for SD1.5; CLIP-L 768 and CLIP-G 1280 together for the SDXL family), initialised from the
token embeddings of ``init_text``. Nothing else trains, is copied or is written: the text encoders and
the UNet run as ``training.precision.frozen_twin``s (their weights alias the base's in their load dtype)
and the vocabulary table is never touched, because the vectors do not enter it at all.

They enter where ComfyUI's own ``embedding:name`` syntax puts a loaded embedding: each training caption
is parsed by the stock tokenizer (``comfy.sd1_clip.SDTokenizer.tokenize_with_weights``) with only its
file lookup (``_try_get_embedding``) answering ``name`` with our tensors, and encoded by the stock
``encode_token_weights``, so the conditioning and SDXL's pooled output are exactly what a stock
``CLIPTextEncode`` with "embedding:name" makes from the saved file. The UNet inputs are the model's own
``extra_conds`` (SDXL size conditioning included) and the loss is in the model's parameterization
(``training.objective``).

Captions: the paper's and diffusers' small CLIP-ImageNet-style templates ("a photo of a {}"), one drawn
per step, by default: the vector then learns to act as a noun inside sentences, which is how it is used
afterwards ("embedding:name as a watercolor"). ``token alone`` trains on the bare word, as UniTune does.

Norm control (``norm_control``, off by default as in the paper and diffusers' ``textual_inversion.py``; on
for pivotal UniTune): after every optimizer step each encoder's vectors are scaled by
``(vocabulary std / their std) ** 0.1``, as ``TokenEmbeddingsHandler.retract_embeddings`` does in cog-sdxl's
``dataset_and_utils.py`` and diffusers' ``train_dreambooth_lora_sdxl_advanced.py``, so a long or fast run
cannot blow the word up far past the size of the words the text encoder knows.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial

import torch

from .. import families
from ..families import fingerprint
from ..training import loop, objective, optimizers, precision
from ..training import preview as previews

log = logging.getLogger(__name__)

FILE_FORMAT = "frozentune.textual_inversion/1"
MAX_VECTORS = 16
# The single tensor key of an SD1.5 embedding: A1111's safetensors layout, which ComfyUI's load_embed
# reads (a file with one tensor), as do A1111, kohya sd-scripts and diffusers' load_textual_inversion.
SD15_KEY = "emb_params"
ENCODER_KEYS = {"sd15": ("clip_l",), "sdxl": ("clip_l", "clip_g")}
CAPTIONS = ("object templates", "style templates", "token alone")
# From the paper's / diffusers' imagenet_templates_small and imagenet_style_templates_small. Nothing
# follows the placeholder: ComfyUI's tokenizer reads "embedding:name." as a file named "name.".
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}",
    "a good painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
)
# Characters that break "embedding:name" in a prompt: whitespace ends the word, a comma is stripped,
# parentheses and ':' are the weight syntax "(word:1.2)", '\\' escapes.
NAME_BREAKERS = frozenset(" \t\r\n(),:\\[]{}")
# Norm control, as cog-sdxl's TokenEmbeddingsHandler.retract_embeddings (copied into diffusers' advanced SDXL
# DreamBooth LoRA trainer): after each step the trained vectors are multiplied by
# (std of the whole token table / std of the trained vectors) ** RETRACT_EXPONENT.
RETRACT_EXPONENT = 0.1


def caption_templates(captions: str) -> tuple[str, ...]:
    """The caption templates (``{}`` = the new word) for a ``captions`` choice."""
    if captions == "object templates":
        return OBJECT_TEMPLATES
    if captions == "style templates":
        return STYLE_TEMPLATES
    if captions == "token alone":
        return ("{}",)
    raise ValueError(f"captions {captions!r} is unknown: use one of {', '.join(CAPTIONS)}.")


@dataclass(frozen=True)
class TextualInversionSettings:
    init_text: str = "object"
    vectors: int = 1
    captions: str = "object templates"
    steps: int = 1000
    batch_size: int = 4
    learning_rate: float = 2e-3
    seed: int = 0
    precision: str = "auto"
    norm_control: bool = False  # retract the vectors toward the vocabulary's std after every step (``retract``)

    def check(self) -> None:
        if not self.init_text.strip():
            raise ValueError("init_text is empty: give the word(s) the new vectors start from, e.g. 'dog'.")
        if not (isinstance(self.vectors, int) and 1 <= self.vectors <= MAX_VECTORS):
            raise ValueError(f"vectors={self.vectors!r} is out of range: give 1 to {MAX_VECTORS} vectors per token.")
        caption_templates(self.captions)
        if self.precision not in precision.PRECISIONS:
            raise ValueError(f"precision {self.precision!r} is unknown: use one of {', '.join(precision.PRECISIONS)}.")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must both be at least 1.")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate} must be a positive number such as 2e-3.")

    def metadata(self) -> dict[str, str]:
        return {f"textual_inversion.{k}": str(v) for k, v in asdict(self).items()}


@dataclass
class TextualInversionResult:
    vectors: dict[str, torch.Tensor]  # [vectors, width] fp32 on the CPU, by encoder key (clip_l, clip_g)
    losses: list[float]
    settings: TextualInversionSettings
    family: str
    metadata: dict[str, str] = field(default_factory=dict)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors in the layout ComfyUI's ``load_embed`` reads: one tensor (SD1.5), or clip_l + clip_g."""
        if self.family == "sd15":
            return {SD15_KEY: self.vectors["clip_l"]}
        return dict(self.vectors)


def check_name(name: str) -> None:
    """Refuse a name the stock ``embedding:name`` prompt syntax cannot spell."""
    bad = sorted({c for c in name if c in NAME_BREAKERS})
    if bad:
        raise ValueError(f"name {name!r} contains {', '.join(repr(c) for c in bad)}, which a prompt's "
                         "'embedding:name' cannot spell (spaces end the word; commas, brackets and ':' are "
                         "prompt syntax): use letters, digits, '-', '_' and '.', e.g. 'my_dog'.")


def encoder_keys(model, clip) -> tuple[str, ...]:
    """The text encoders (file keys) a vector set is trained for; refuses families this trainer does not know."""
    family = families.model_family(model.model)
    keys = ENCODER_KEYS.get(family)
    found = tuple(sub_tokenizers(clip))
    if keys is None or set(keys) != set(found):
        raise ValueError(f"textual inversion supports SD1.5 (CLIP-L) and the SDXL family (CLIP-L + CLIP-G); this "
                         f"MODEL is {family!r} with text encoders {list(found)}: connect an SD1.5 or SDXL "
                         "checkpoint's MODEL and CLIP.")
    return keys


def sub_tokenizers(clip) -> dict[str, object]:
    """The CLIP's per-encoder stock tokenizers by embedding key (``clip_l``, ``clip_g``)."""
    import comfy.sd1_clip

    return {t.embedding_key: t for t in vars(clip.tokenizer).values() if isinstance(t, comfy.sd1_clip.SDTokenizer)}


def word_ids(sub, text: str) -> list[int]:
    """The token ids ``text`` takes in one stock tokenizer, without start/end tokens (e.g. "<|endoftext|>" typed in)."""
    ids = sub.tokenizer(text)["input_ids"]
    ids = ids[sub.tokens_start:-1 if sub.tokenizer_adds_end_token else None]
    return [i for i in ids if i not in (sub.start_token, sub.end_token)]


def _text_encoder(cond_stage_model, key: str) -> torch.nn.Module:
    return getattr(cond_stage_model, key)


def initial_vectors(clip, keys: tuple[str, ...], init_text: str, count: int) -> dict[str, torch.Tensor]:
    """``count`` fp32 vectors per encoder from the token embeddings of ``init_text`` (cycled when fewer)."""
    subs = sub_tokenizers(clip)
    out = {}
    for key in keys:
        sub = subs[key]
        ids = word_ids(sub, init_text)
        if not ids:
            raise ValueError(f"init_text {init_text!r} tokenizes to nothing: give one or more words, e.g. 'dog'.")
        if len(ids) > count:
            raise ValueError(f"init_text {init_text!r} is {len(ids)} tokens but vectors={count}: raise vectors to "
                             f"at least {len(ids)} (up to {MAX_VECTORS}) or shorten init_text.")
        table = _text_encoder(clip.cond_stage_model, key).transformer.get_input_embeddings().weight
        picked = torch.tensor([ids[i % len(ids)] for i in range(count)], device=table.device)
        out[key] = table.detach()[picked].to(torch.float32).clone()
    return out


def vocabulary_std(table: torch.Tensor, rows: int = 8192) -> float:
    """The standard deviation of every element of a token table (unbiased, as ``torch.std``), read in fp32.

    ``rows``-row slices, each cast to fp32 on its own and merged exactly (Chan et al.'s pairwise update in
    float64), so an fp16/bf16 CLIP-G table (49408 x 1280) is never copied whole to fp32.
    """
    count, mean, squares = 0, 0.0, 0.0
    for part in table.detach().split(rows):
        var, part_mean = torch.var_mean(part.to(torch.float32), correction=0)
        n, part_mean, part_squares = part.numel(), float(part_mean), float(var) * part.numel()
        delta, total = part_mean - mean, count + n
        mean, squares = mean + delta * n / total, squares + part_squares + delta * delta * count * n / total
        count = total
    if count < 2:
        raise ValueError(f"a token table of {count} element(s) has no standard deviation.")
    return math.sqrt(squares / (count - 1))


def vocabulary_stds(clip, keys: tuple[str, ...]) -> dict[str, float]:
    """Each text encoder's ``vocabulary_std``, from its frozen token table (read only)."""
    return {key: vocabulary_std(_text_encoder(clip.cond_stage_model, key).transformer.get_input_embeddings().weight)
            for key in keys}


@torch.no_grad()
def retract(vectors: torch.Tensor, std: float) -> None:
    """Pull ``vectors`` (one encoder's trained vectors, fp32) toward the vocabulary's ``std``, in place.

    retract_embeddings' maths: ``off_ratio = std / vectors.std()``, ``vectors *= off_ratio ** 0.1`` (the std
    of all the trained elements together, unbiased). Both ways: too large shrinks, too small grows, each step
    a tenth of the way in log scale. Vectors that are all one value (std 0) are left as they are.
    """
    own = vectors.std()
    if own > 0:
        vectors.mul_((std / own) ** RETRACT_EXPONENT)


def tokenizing_clip(clip, name: str, vectors: Mapping[str, torch.Tensor]):
    """A shallow copy of ``clip`` whose stock tokenizers answer ``embedding:<name>`` with ``vectors``.

    Only the file lookup differs from stock ComfyUI: parsing, weights, batching and padding are the stock
    ``tokenize_with_weights``, so the tensors land exactly where a saved file's would. Other
    ``embedding:`` words still load from the embeddings folders. The CLIP itself is not changed.
    """
    import comfy.sd1_clip

    view = copy.copy(clip)
    view.tokenizer = copy.copy(clip.tokenizer)
    for attr, sub in vars(clip.tokenizer).items():
        if not isinstance(sub, comfy.sd1_clip.SDTokenizer) or sub.embedding_key not in vectors:
            continue
        key = sub.embedding_key
        own = copy.copy(sub)
        own.embedding_directory = sub.embedding_directory if sub.embedding_directory is not None else []
        own._try_get_embedding = _lookup(sub, name, vectors[key])
        setattr(view.tokenizer, attr, own)
    return view


def _lookup(sub, name: str, tensor: torch.Tensor) -> Callable[[str], tuple]:
    stock = sub._try_get_embedding

    def lookup(embedding_name: str):
        words = embedding_name.split()
        if words and words[0] == name:
            return tensor, " ".join(words[1:])
        return stock(embedding_name)

    return lookup


def differentiable_text_encoder(cond_stage_model: torch.nn.Module) -> int:
    """Make a text-encoder twin's CLIP layers add their residuals out of place, so gradients reach the input.

    ComfyUI's ``CLIPLayer.forward`` does ``x += attn(norm(x))``, overwriting the tensor the norm saved for
    backward. ``x + y`` gives the same values; the twin's layers only (the base's are not touched).
    Returns the number of layers changed.
    """
    import comfy.clip_model

    layers = [m for m in cond_stage_model.modules() if isinstance(m, comfy.clip_model.CLIPLayer)]
    for layer in layers:
        layer.forward = _residual_forward(layer)
    return len(layers)


def _residual_forward(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


def encode_tokens(cond_stage_model, clip, tokens) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cond, pooled)`` as ``CLIP.encode_from_tokens`` computes them, with ``cond_stage_model`` (a twin)."""
    cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    out = cond_stage_model.encode_token_weights(tokens)
    return out[0], out[1]


def unet_inputs(model, cond: torch.Tensor, pooled: torch.Tensor | None, latent: torch.Tensor,
                device: torch.device) -> dict[str, torch.Tensor]:
    """The UNet's extra inputs for one caption, as sampling builds them (SDXL: pooled + size), kept differentiable."""
    params = dict(cross_attn=cond, pooled_output=pooled, device=device, noise=latent, prompt_type="positive",
                  width=latent.shape[-1] * 8, height=latent.shape[-2] * 8)
    return {k: v.cond.to(device) for k, v in model.extra_conds(**params).items()}


class TrainingRun:
    """Frozen twins of the UNet and text encoder(s), the trainable vectors, their optimizer and the draws.

    Build under ``torch.inference_mode(False)`` after the base and the CLIP are loaded.
    """

    def __init__(self, model, clip, latents: torch.Tensor, settings: TextualInversionSettings, name: str):
        self.settings, self.clip, self.name = settings, clip, name
        self.device = model.load_device
        self.dtype = precision.compute_dtype(settings.precision, self.device)
        self.twin = precision.frozen_twin(model.model)
        precision.cast_on_use(self.twin)
        precision.set_compute_dtype(self.twin, self.dtype)
        self.text = precision.frozen_twin(clip.cond_stage_model)
        precision.cast_on_use(self.text)
        differentiable_text_encoder(self.text)
        self.keys = encoder_keys(model, clip)
        start = initial_vectors(clip, self.keys, settings.init_text, settings.vectors)
        self.vectors = {k: torch.nn.Parameter(v, requires_grad=True) for k, v in start.items()}
        self.vocabulary_std = vocabulary_stds(clip, self.keys) if settings.norm_control else None
        self.view = tokenizing_clip(clip, name, self.vectors)
        self.templates = caption_templates(settings.captions)
        self.optimizer = optimizers.make("adamw", list(self.vectors.values()), settings.learning_rate)
        self.scaler = precision.grad_scaler(self.device, self.dtype)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.x0 = self.twin.latent_format.process_in(latents.detach().to(self.device, torch.float32).clone())

    def caption(self, index: int) -> str:
        return self.templates[index].format(f"embedding:{self.name}")

    def conditioning(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stock conditioning and pooled output of ``text`` with the current vectors (differentiable)."""
        tokens = self.view.tokenize(text)
        with precision.autocast(self.device, self.dtype):
            cond, pooled = encode_tokens(self.text, self.clip, tokens)
        return cond, pooled

    def loss(self, text: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, pooled = self.conditioning(text)
        conds = unet_inputs(self.twin, cond, pooled, x0[:1], self.device)
        conds = {k: v.expand(x0.shape[0], *v.shape[1:]) for k, v in conds.items()}
        ms = self.twin.model_sampling
        x_t = objective.noised(ms, sigma, noise, x0)
        with precision.autocast(self.device, self.dtype):
            denoised = self.twin.apply_model(x_t, sigma, **conds)
        return objective.denoised_loss(ms, sigma, x_t, x0, denoised)

    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, self.x0.shape[0], (n,), generator=generator)
        x0 = self.x0[pick.to(self.device)]
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        sigma = objective.draw_sigmas(self.twin.model_sampling, n, generator).to(self.device)
        return x0, noise, sigma

    def step(self, i: int) -> float:
        """Optimizer step ``i`` (0-based): one caption drawn, ``batch_size`` noise/timestep draws; returns the loss."""
        gen = self.generator
        text = self.caption(int(torch.randint(0, len(self.templates), (1,), generator=gen)))
        loss = self.loss(text, *self.draw(gen, self.settings.batch_size))
        value = loss.item()
        loop.check_finite(value, i + 1, self.settings.steps, "Textual inversion", self.settings.learning_rate)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.vocabulary_std is not None:  # every step, as retract_embeddings (a skipped fp16 step too)
            for key, vectors in self.vectors.items():
                retract(vectors, self.vocabulary_std[key])
        return value

    def render(self, preview: previews.Preview) -> torch.Tensor:
        """The preview latent: the first caption template with the word, Euler from the preview's fixed noise.

        Same conditioning and UNet forward as training (current vectors); the noise has the training
        images' aspect at the preview's size, so SDXL's size conditioning matches what is drawn.
        """
        h, w = preview.latent_size(self.x0.shape[-2] * 8, self.x0.shape[-1] * 8)
        noise = previews.fixed_noise((1, self.x0.shape[1], h, w), preview.seed, self.device, torch.float32)
        cond, pooled = self.conditioning(self.caption(0))
        conds = unet_inputs(self.twin, cond, pooled, noise, self.device)
        ms = self.twin.model_sampling

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            with precision.autocast(self.device, self.dtype):
                return self.twin.apply_model(x, sigma, **conds).float()

        return previews.euler(denoise, noise, previews.sigmas(ms, preview.steps), model_sampling=ms)

    def trained(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).clone() for k, v in self.vectors.items()}


def _load(model, clip) -> None:
    """Load the UNet and the text encoder(s) together, so loading one never offloads the other under the twins."""
    import comfy.model_management as mm

    mm.load_models_gpu([model, clip.patcher], force_patch_weights=True)


def train(model, clip, latents: torch.Tensor, settings: TextualInversionSettings, name: str = "concept",
          on_step: Callable[[int, int, float], None] | None = None,
          preview: previews.Preview | None = None) -> TextualInversionResult:
    """Learn the vectors for ``name`` on ``latents`` ``[N, C, h, w]`` (VAE space) beside a frozen MODEL and CLIP.

    ``on_step(step, total, loss)`` runs after every step (ComfyUI's ProgressBar there makes Cancel work);
    then, when due, ``preview`` draws the first caption with the current vectors (no effect on training).
    """
    import comfy.model_management as mm

    settings.check()
    check_name(name)
    encoder_keys(model, clip)
    _load(model, clip)
    family = families.model_family(model.model)
    run = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            run = TrainingRun(model, clip, latents, settings, name)
            hook = previews.after_step(on_step, preview, partial(run.render, preview), modules=(run.twin, run.text))
            losses = loop.run(settings.steps, run.step, what="Textual inversion",
                              learning_rate=settings.learning_rate, on_step=hook)
            vectors = run.trained()
            compute = str(run.dtype).removeprefix("torch.")
        metadata = settings.metadata()
        metadata.update({
            "textual_inversion.name": name,
            "textual_inversion.family": family,
            "textual_inversion.base_fingerprint": fingerprint.fingerprint(model.model.diffusion_model),
            "textual_inversion.encoders": ",".join(vectors),
            "textual_inversion.final_loss": f"{losses[-1]:.6g}",
            "textual_inversion.compute_dtype": compute,
        })
        for key in vectors:  # the transformer layers: the token table is too big for fingerprint's sampling
            layers = _text_encoder(clip.cond_stage_model, key).transformer.text_model.encoder
            metadata[f"textual_inversion.text_encoder_fingerprint.{key}"] = fingerprint.fingerprint(layers)
        return TextualInversionResult(vectors, losses, settings, family, metadata)
    finally:
        del run
        mm.soft_empty_cache()


def heldout_loss(model, clip, latents: torch.Tensor, vectors: Mapping[str, torch.Tensor], captions: str,
                 seed: int, draws: int = 16, name: str = "concept") -> float:
    """Mean denoising loss of ``vectors`` on fixed noise/timestep draws from ``seed`` (every template in turn).

    The same seed gives the same draws for any ``vectors``, so two vector sets compare pairwise.
    """
    settings = TextualInversionSettings(init_text="a", vectors=1, captions=captions, steps=1, precision="fp32")
    _load(model, clip)
    with torch.inference_mode(False), torch.no_grad():
        run = TrainingRun(model, clip, latents, settings, name)
        run.vectors = {k: v.to(run.device, torch.float32) for k, v in vectors.items()}
        run.view = tokenizing_clip(clip, name, run.vectors)
        gen = torch.Generator().manual_seed(seed)
        total = 0.0
        for i in range(draws):
            total += run.loss(run.caption(i % len(run.templates)), *run.draw(gen, 1)).item()
    return total / draws
