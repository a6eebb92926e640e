"""Textual inversion: learn new token vectors for a concept while the text encoder(s) and the UNet stay frozen.

Gal et al. 2022, "An Image is Worth One Word". What trains is a few fp32 vectors per text encoder,
all of the family's encoders together (its ``families`` record lists them and their embedding-file keys):
CLIP-L for SD1.5; CLIP-L + CLIP-G for the SDXL family; CLIP-L + T5-XXL for Flux.1 (dev, schnell), where
CLIP-L feeds only the pooled vector and the T5 tokens carry the word (both are trained: the pooled path
too); CLIP-L + CLIP-G + T5-XXL for SD3/SD3.5, or whichever of them the CLIP has (checkpoints that ship
only the two CLIPs). The vectors start from the token embeddings of ``init_text``. Nothing else trains,
is copied or is written: the text encoders and the diffusion model run as ``training.precision.
frozen_twin``s (their weights alias the base's in their load dtype) and the vocabulary tables are never
touched, because the vectors do not enter them at all. Gradients reach the vectors through the frozen
T5 the way they reach them through a CLIP: only the new token rows are trainable, the T5's weights have
``requires_grad`` False (no weight gradient is ever allocated), and its layers are always checkpointed
(``checkpoint_text_layers``) so the backward pass keeps each layer's input only, not the cast copies of
its frozen weights. Qwen-Image (Qwen2.5-VL-7B) and Z-Image (Qwen3-4B) train the same way through their LLM
(its layers always checkpointed too); their stock tokenizers ignore ``embedding:`` words, so the captions are
read on a private tokenizer copy (``private_words``), the one the Embedding Words node gives sampling graphs.

They enter where ComfyUI's own ``embedding:name`` syntax puts a loaded embedding: each training caption
is parsed by the stock tokenizer (``comfy.sd1_clip.SDTokenizer.tokenize_with_weights``) with only its
file lookup (``_try_get_embedding``) answering ``name`` with our tensors, and encoded by the stock
``encode_token_weights``, so the conditioning and the pooled output are exactly what a stock
``CLIPTextEncode`` with "embedding:name" makes from the saved file. The diffusion model's inputs are its
own ``extra_conds`` (SDXL size conditioning, Flux.1-dev's guidance value: ``FLUX_GUIDANCE``) and
the loss is in the model's parameterization (``training.objective``: eps, v, or the flow target
v = noise - x0 for Flux and SD3).

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

import torch

from .. import families
from ..families import fingerprint
from ..training import checkpointing, objective, precision, trainer
from ..training import preview as previews
from . import private_words

log = logging.getLogger(__name__)

FILE_FORMAT = "frozentune.textual_inversion/1"
MAX_VECTORS = 16
# The single tensor key of an SD1.5 embedding: A1111's safetensors layout, which ComfyUI's load_embed
# reads (a file with one tensor), as do A1111, kohya sd-scripts and diffusers' load_textual_inversion.
SD15_KEY = "emb_params"
# The embedding-file keys ComfyUI's tokenizers look up (``SDTokenizer.embedding_key``): clip_l (sd1_clip.py),
# clip_g (sdxl_clip.py), t5xxl (text_encoders/sd3_clip.py, flux.py); qwen25_7b (qwen_image.py) and qwen3_4b
# (z_image.py), read on a private tokenizer (``private_words``). diffusers' Flux/SD3 files say "t5", which
# ComfyUI does not read. From the ``families`` records: the encoders that can hold a word, in table order;
# others (Gemma, Mistral tokenizers get no embedding folder in ComfyUI) cannot.
EMBEDDING_KEYS = tuple(dict.fromkeys(e.key for f in families.FAMILIES.values() for e in f.text_encoders
                                     if e.embedding or e.private_words))
# Families whose ComfyUI text encoder runs with some of its encoders absent, and that encoder's class:
# SD3ClipModel's clip_l/clip_g/t5 flags (text_encoders/sd3_clip.py), as SD3/SD3.5 checkpoints that ship only
# the two CLIPs load. The others always build all of theirs, so a CLIP that lacks one belongs to another family.
PARTIAL_TEXT_ENCODERS = {families.SD3: "SD3ClipModel"}
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
# The guidance value Flux.1 dev (guidance-distilled: the value is a model input) learns a word at: 3.5, the value
# it samples with when nothing sets one (comfy.model_base.Flux.extra_conds; the FluxGuidance node's default), so
# the word fits the guidance it is prompted at; diffusers' pivotal-tuning Flux script, which trains textual
# inversion vectors for CLIP-L and T5 (examples/advanced_diffusion_training/train_dreambooth_lora_flux_advanced.py,
# --train_text_encoder_ti --enable_t5_ti), trains at its --guidance_scale default 3.5 too. Pivotal UniTune passes
# its own value instead (the LoRA's), so the word and the tuned model see the same conditioning.
FLUX_GUIDANCE = 3.5
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
    gradient_checkpointing: bool = False  # recompute CLIP layers and UNet/DiT blocks in backward (T5 layers always)
    guidance: float = FLUX_GUIDANCE  # the guidance value a guidance-embedding model (Flux.1 dev) trains at

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
        if not (self.guidance >= 0 and math.isfinite(self.guidance)):
            raise ValueError(f"guidance={self.guidance} must be a number of 0 or more (Flux.1 dev: {FLUX_GUIDANCE:g}).")

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


def supported_families() -> tuple[str, ...]:
    """The family ids textual inversion trains on: those whose text encoders all take ``embedding:`` words
    (stock, or on the private tokenizer)."""
    return tuple(f.id for f in families.FAMILIES.values()
                 if f.text_encoders and all(e.embedding or e.private_words for e in f.text_encoders))


def present_encoders(clip) -> tuple[str, ...]:
    """The embedding keys of the text encoders this CLIP really runs (a tokenizer and a loaded encoder).

    SD3's tokenizer always has all three sub-tokenizers; an encoder left out of the checkpoint is None.
    """
    subs = sub_tokenizers(clip)
    return tuple(k for k in EMBEDDING_KEYS if k in subs and getattr(clip.cond_stage_model, k, None) is not None)


ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "t5xxl": "T5-XXL", "qwen25_7b": "Qwen2.5-VL",
                 "qwen3_4b": "Qwen3"}


def _encoder_names(keys) -> str:
    return " + ".join(ENCODER_NAMES.get(k, k) for k in keys) or "none"


def refuse_without_embedding_words(model) -> None:
    """A clear refusal for a family with a text encoder whose words no tokenizer here reads: neither ComfyUI's
    (built without the embedding directory) nor FrozenTune's private copy (``private_words``: only for the
    encoders whose prompt template it knows). No family of the table has one today."""
    family = families.family_of(model)
    plain = [e.key for e in family.text_encoders if not (e.embedding or e.private_words)]
    if plain:
        labels = ", ".join(families.FAMILIES[s].label for s in supported_families())
        raise ValueError(f"Textual inversion does not support {family.label} yet (supported: {labels}): ComfyUI "
                         f"0.3.75 builds the {_encoder_names(plain)} tokenizer without embedding support, so "
                         "embedding:name in a prompt stays plain text and a trained vector could never be used.")


def encoder_keys(model, clip) -> tuple[str, ...]:
    """The text encoders (file keys) a vector set is trained for, in the family's order.

    Refuses a family without embedding-capable text encoders (naming it and the supported ones), and a
    CLIP that does not go with the MODEL's family.
    """
    refuse_without_embedding_words(model)
    family = families.require(model, "Textual inversion", supported_families())
    wanted = tuple(e.key for e in family.text_encoders)
    found = present_encoders(clip)
    keys = tuple(k for k in wanted if k in found)
    missing = [k for k in wanted if k not in found]
    partial = PARTIAL_TEXT_ENCODERS.get(family.id)
    partial_ok = partial is not None and any(c.__name__ == partial for c in type(clip.cond_stage_model).__mro__)
    if (not keys or any(k not in wanted for k in found) or (missing and not partial_ok)
            or not any(family.encoder(k).word for k in keys)):
        raise ValueError(f"textual inversion on {family.label} trains vectors for {_encoder_names(wanted)}, but this "
                         f"CLIP runs {_encoder_names(found)}: connect the CLIP that goes with this MODEL (the "
                         "checkpoint's CLIP, or the text encoder loader for this family).")
    return keys


def sub_tokenizers(clip) -> dict[str, object]:
    """The CLIP's per-encoder stock tokenizers by embedding key (``clip_l``, ``clip_g``, ``t5xxl``, ``qwen3_4b``...);
    none for an object without a tokenizer (a stand-in)."""
    tokenizer = getattr(clip, "tokenizer", None)
    return {} if tokenizer is None else {k: t for k, (_, t) in private_words.sub_tokenizers(tokenizer).items()}


def word_ids(sub, text: str) -> list[int]:
    """The token ids ``text`` takes in one stock tokenizer, without start/end tokens (e.g. "<|endoftext|>" typed in)."""
    ids = sub.tokenizer(text)["input_ids"]
    ids = ids[sub.tokens_start:-1 if sub.tokenizer_adds_end_token else None]
    return [i for i in ids if i not in (sub.start_token, sub.end_token)]


def prompt_word_ids(sub, text: str) -> list[int]:
    """The token ids ``text`` takes as a word of a prompt: ``word_ids``, after a space for the byte-level BPE of
    the Qwen tokenizers (``private_words``), where " object" and "object" are different tokens (CLIP and T5
    ignore the space)."""
    return word_ids(sub, " " + text if sub.embedding_key in private_words.private_keys() else text)


def _text_encoder(cond_stage_model, key: str) -> torch.nn.Module:
    return getattr(cond_stage_model, key)


def token_table(cond_stage_model, key: str) -> torch.Tensor:
    """One text encoder's token embedding table (CLIP ``token_embedding``, T5 ``shared``), read only."""
    return _text_encoder(cond_stage_model, key).transformer.get_input_embeddings().weight


def encoder_layers(cond_stage_model, key: str) -> torch.nn.Module:
    """One text encoder's transformer layers (CLIP ``text_model.encoder``, T5 ``encoder``, Qwen ``model.layers``):
    what its fingerprint samples (the token table is too big for ``fingerprint``'s sampling)."""
    transformer = _text_encoder(cond_stage_model, key).transformer
    text_model = getattr(transformer, "text_model", None)
    if text_model is not None:
        return text_model.encoder
    return transformer.encoder if hasattr(transformer, "encoder") else transformer.model.layers


def initial_vectors(clip, keys: tuple[str, ...], init_text: str, count: int) -> dict[str, torch.Tensor]:
    """``count`` fp32 vectors per encoder from the token embeddings of ``init_text`` (cycled when fewer)."""
    subs = sub_tokenizers(clip)
    out = {}
    for key in keys:
        sub = subs[key]
        ids = prompt_word_ids(sub, init_text)
        if not ids:
            raise ValueError(f"init_text {init_text!r} tokenizes to nothing: give one or more words, e.g. 'dog'.")
        if len(ids) > count:
            raise ValueError(f"init_text {init_text!r} is {len(ids)} tokens but vectors={count}: raise vectors to "
                             f"at least {len(ids)} (up to {MAX_VECTORS}) or shorten init_text.")
        table = token_table(clip.cond_stage_model, key)
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
    return {key: vocabulary_std(token_table(clip.cond_stage_model, key)) for key in keys}


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

    A sub-tokenizer without vectors (SD3's T5 tokenizer when the checkpoint has no T5: its tokens are
    never encoded) gets the first vector set, as the stock ``load_embed`` falls back to a file's first
    tensor for a key the file lacks, instead of a "does not exist" warning at every step.

    A Qwen tokenizer (stock: no ``embedding:`` words) becomes ``private_words.word_reader``, the tokenizer the
    Embedding Words node gives sampling graphs, answering ``name`` with ``vectors`` and other words from the
    embeddings folders.
    """
    view = copy.copy(clip)
    view.tokenizer = copy.copy(clip.tokenizer)
    fallback = next(iter(vectors.values()), None)
    for key, (attr, sub) in private_words.sub_tokenizers(clip.tokenizer).items():
        if fallback is None:
            continue
        if key in private_words.private_keys():
            folders = private_words.reading_folders(sub)
            stock = private_words.folder_lookup(sub, folders)
            tensor = vectors.get(key, fallback)
            setattr(view.tokenizer, attr, private_words.word_reader(
                sub, lambda word, _t=tensor, _stock=stock: _t if word == name else _stock(word), folders))
            continue
        own = copy.copy(sub)
        own.embedding_directory = sub.embedding_directory if sub.embedding_directory is not None else []
        own._try_get_embedding = _lookup(sub, name, vectors.get(sub.embedding_key, fallback))
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
    """Make a text-encoder twin's layers add their residuals out of place, so gradients reach the input.

    ComfyUI's ``CLIPLayer.forward`` does ``x += attn(norm(x))`` and T5's ``T5LayerSelfAttention`` /
    ``T5LayerFF`` do ``x += output``, overwriting the tensor the norm saved for backward. ``x + y`` gives
    the same values; the twin's layers only (the base's are not touched). Returns the number of layers changed.
    """
    import comfy.clip_model
    import comfy.text_encoders.t5 as t5

    changed = 0
    for m in cond_stage_model.modules():
        if isinstance(m, comfy.clip_model.CLIPLayer):
            m.forward = _residual_forward(m)
        elif isinstance(m, t5.T5LayerSelfAttention):
            m.forward = _t5_attention_forward(m)
        elif isinstance(m, t5.T5LayerFF):
            m.forward = _t5_ff_forward(m)
        else:
            continue
        changed += 1
    return changed


def _residual_forward(layer):
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


def _t5_attention_forward(layer):
    def forward(x, mask=None, past_bias=None, optimized_attention=None):
        output, past_bias = layer.SelfAttention(layer.layer_norm(x), mask=mask, past_bias=past_bias,
                                                optimized_attention=optimized_attention)
        return x + output, past_bias

    return forward


def _t5_ff_forward(layer):
    def forward(x):
        return x + layer.DenseReluDense(layer.layer_norm(x))

    return forward


def text_layers(cond_stage_model: torch.nn.Module, clip_layers: bool = True) -> list[torch.nn.Module]:
    """The transformer layers of the text encoders (T5 and Qwen blocks; CLIP layers too with ``clip_layers``): the units
    checkpointing wraps."""
    import comfy.clip_model
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.t5 as t5

    big = (t5.T5Block, llama.TransformerBlock)  # T5-XXL, Qwen2.5-VL-7B / Qwen3-4B layers: always
    kinds = (comfy.clip_model.CLIPLayer, *big) if clip_layers else big
    return [m for m in cond_stage_model.modules() if isinstance(m, kinds)]


def checkpoint_text_layers(cond_stage_model: torch.nn.Module, clip_layers: bool = True) -> int:
    """Gradient checkpointing of a text-encoder twin's layers: each keeps only its input for the backward pass
    and recomputes its insides there (``torch.utils.checkpoint``, non-reentrant). Same values and gradients
    (to float rounding). Returns how many layers were wrapped.

    The T5's matter most: under autocast each of its Linear layers keeps a compute-dtype copy of its frozen
    weight for the backward pass (its input arrives in fp32, so the weight is cast per call), about the
    layer's weight size per layer; checkpointed, one layer's copies exist at a time.
    """
    from torch.utils.checkpoint import checkpoint

    layers = text_layers(cond_stage_model, clip_layers)
    for layer in layers:
        plain = layer.forward

        def forward(*args, _plain=plain, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    return len(layers)


def encode_tokens(cond_stage_model, clip, tokens) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """``(cond, pooled, extras)`` as ``CLIP.encode_from_tokens`` computes them, with ``cond_stage_model`` (a twin).

    ``extras`` is what the stock conditioning carries beside them (e.g. a T5 ``attention_mask``), usually empty.
    """
    cond_stage_model.reset_clip_options()
    if clip.layer_idx is not None:
        cond_stage_model.set_clip_options({"layer": clip.layer_idx})
    out = cond_stage_model.encode_token_weights(tokens)
    return out[0], out[1], dict(out[2]) if len(out) > 2 else {}


def training_guidance(model, settings: TextualInversionSettings) -> float | None:
    """The guidance value the model is trained at: ``settings.guidance`` for a model that takes one as input
    (Flux.1 dev), None for the others (they have no such input)."""
    return settings.guidance if families.family_of(model).guidance_embed else None


def unet_inputs(model, cond: torch.Tensor, pooled: torch.Tensor | None, latent: torch.Tensor,
                device: torch.device, extras: Mapping | None = None) -> dict[str, object]:
    """The diffusion model's extra inputs for one caption, as sampling builds them, kept differentiable.

    SDXL: pooled + size; Flux: pooled + the guidance value in ``extras`` (``training_guidance``); SD3: pooled.
    """
    params = dict(extras or {})
    params.update(cross_attn=cond, pooled_output=pooled, device=device, noise=latent, prompt_type="positive",
                  width=latent.shape[-1] * 8, height=latent.shape[-2] * 8)
    out = {}
    for k, v in model.extra_conds(**params).items():
        out[k] = v.cond.to(device) if isinstance(v.cond, torch.Tensor) else v.cond
    return out


class TrainingRun(trainer.Trainer):
    """Textual inversion on the trainer skeleton (``training.trainer``): frozen twins of the diffusion model and
    text encoder(s), the trainable vectors (AdamW), a caption and a batch drawn per step, norm control after it.

    Build under ``torch.inference_mode(False)`` after the base and the CLIP are loaded.
    """

    what = "Textual inversion"

    def __init__(self, model, clip, latents: torch.Tensor, settings: TextualInversionSettings, name: str):
        super().__init__(model.load_device, settings.precision, steps=settings.steps,
                         learning_rate=settings.learning_rate, seed=settings.seed)
        self.settings, self.clip, self.name = settings, clip, name
        self.keys = encoder_keys(model, clip)
        self.twin = trainer.frozen_model(model.model, self.dtype)
        self.text = precision.frozen_twin(clip.cond_stage_model)
        precision.cast_on_use(self.text)
        differentiable_text_encoder(self.text)
        # T5 layers always (their cast weights would otherwise stay alive for backward: several GiB for a
        # T5-XXL), CLIP layers with the gradient_checkpointing setting (SD1.5/SDXL runs as before without it).
        checkpoint_text_layers(self.text, clip_layers=settings.gradient_checkpointing)
        self.guidance = training_guidance(model, settings)
        self.text_extras: dict = {}  # what the last ``conditioning`` call's encoders returned beside cond/pooled
        start = initial_vectors(clip, self.keys, settings.init_text, settings.vectors)
        self.vectors = {k: torch.nn.Parameter(v, requires_grad=True) for k, v in start.items()}
        self.vocabulary_std = vocabulary_stds(clip, self.keys) if settings.norm_control else None
        self.view = tokenizing_clip(clip, name, self.vectors)
        self.templates = caption_templates(settings.captions)
        self.build_optimizer("adamw", list(self.vectors.values()))
        self.preview_modules = (self.twin, self.text)
        self.x0 = self.twin.latent_format.process_in(latents.detach().to(self.device, torch.float32).clone())

    def caption(self, index: int) -> str:
        return self.templates[index].format(f"embedding:{self.name}")

    def conditioning(self, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stock conditioning and pooled output of ``text`` with the current vectors (differentiable)."""
        tokens = self.view.tokenize(text)
        with precision.autocast(self.device, self.dtype):
            cond, pooled, self.text_extras = encode_tokens(self.text, self.clip, tokens)
        return cond, pooled

    def model_inputs(self, cond: torch.Tensor, pooled: torch.Tensor | None, latent: torch.Tensor) -> dict[str, object]:
        """The diffusion model's extra inputs for this conditioning (plus the training guidance on Flux.1-dev)."""
        extras = dict(self.text_extras)
        if self.guidance is not None:
            extras["guidance"] = self.guidance
        return unet_inputs(self.twin, cond, pooled, latent, self.device, extras)

    def loss(self, text: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, pooled = self.conditioning(text)
        conds = self.model_inputs(cond, pooled, x0[:1])
        conds = {k: v.expand(x0.shape[0], *v.shape[1:]) if isinstance(v, torch.Tensor) else v
                 for k, v in conds.items()}
        ms = self.twin.model_sampling
        x_t = objective.noised(ms, sigma, noise, x0)
        with precision.autocast(self.device, self.dtype):
            denoised = self.twin.apply_model(x_t, sigma, **conds)
        return objective.denoised_loss(ms, sigma, x_t, x0, denoised)

    def draw(self, generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return trainer.draw(self.x0, n, generator, self.twin.model_sampling)

    def batch_loss(self, step: int) -> torch.Tensor:
        """One caption drawn, ``batch_size`` noise/timestep draws."""
        gen = self.generator
        text = self.caption(int(torch.randint(0, len(self.templates), (1,), generator=gen)))
        return self.loss(text, *self.draw(gen, self.settings.batch_size))

    def after_update(self) -> None:
        if self.vocabulary_std is not None:  # every step, as retract_embeddings (a skipped fp16 step too)
            for key, vectors in self.vectors.items():
                retract(vectors, self.vocabulary_std[key])

    def preview_conds(self, noise: torch.Tensor) -> dict:
        """The first caption template with the word, with the current vectors (SDXL's size conditioning for the noise)."""
        cond, pooled = self.conditioning(self.caption(0))
        return self.model_inputs(cond, pooled, noise)

    def checkpointing(self):
        """The settings' gradient checkpointing on the diffusion model's blocks (the text layers: at build)."""
        return checkpointing.gradient_checkpointing([self.twin.diffusion_model], self.settings.gradient_checkpointing)

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
            losses = run.fit(on_step, preview)  # releases the optimizer state and gradients, also on Cancel
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
        if not families.family_of(model).guidance_embed:
            metadata.pop("textual_inversion.guidance")  # not a model input there: it did nothing
        for key in vectors:  # the transformer layers: the token table is too big for fingerprint's sampling
            layers = encoder_layers(clip.cond_stage_model, key)
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
    # init_text/vectors only have to be valid for every tokenizer (T5 splits "a" in two); the vectors are replaced.
    settings = TextualInversionSettings(init_text="the", vectors=MAX_VECTORS, captions=captions, steps=1,
                                        precision="fp32")
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
