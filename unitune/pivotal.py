"""Pivotal UniTune: the image is bound to a learned word (textual inversion vectors) instead of a rare token.

Pivotal tuning (as in cloneofsimo's lora pivotal tuning and kohya's / ai-toolkit's "pivotal" runs): the
token's vectors are learned first with the UNet frozen, then the UNet is tuned with that word in the
caption, so the UNet has less to bind. The word either comes from a file in ComfyUI's embeddings folder
(the ``embedding:name`` output of Textual Inversion Train) or is learned here first, starting from the
token's own vectors (``learn_word``). Only "learn first" is offered, not joint training: it reuses the
textual inversion trainer as is and keeps the UNet run unchanged.

The word travels with the tuned MODEL as a ``Word`` (its vectors by text encoder). Every prompt that uses
it goes through ComfyUI's own ``embedding:`` tokenizer path (``textual_inversion.tokenizing_clip`` in the
graph, the stock file loader once saved), so the caption the UNet was tuned on and a later stock
CLIPTextEncode of "embedding:name ..." put exactly the same vectors in the same places.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import families
from ..textual_inversion import private_words
from ..textual_inversion import word_trainer as ti

log = logging.getLogger(__name__)

PREFIX = "embedding:"
# The word's own learning run (textual inversion, AdamW): the default learning rate (UniTune Fine-Tune's
# pivotal_learning_rate) is Textual Inversion Train's default, with norm control on (pivotal_norm_control) as
# cog-sdxl's and diffusers' pivotal tuning retract the word's vectors after every step (help page: the recipe).
LEARNING_RATE = ti.TextualInversionSettings.learning_rate
NORM_CONTROL = True


@dataclass(frozen=True)
class Word:
    """A learned word: what prompts write (``embedding:<name>``) and its vectors by encoder key (clip_l, clip_g, t5xxl)."""

    name: str
    vectors: dict[str, torch.Tensor]
    family: str
    source: str  # "learned here (N steps)" or the file it was read from
    losses: list[float] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return f"{PREFIX}{self.name}"

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The stock embedding layout (as Textual Inversion Train writes): one tensor for SD1.5, else one per
        encoder key (clip_l/clip_g for SDXL, clip_l/t5xxl for Flux.1, clip_l/clip_g/t5xxl for SD3)."""
        if self.family == "sd15":
            return {ti.SD15_KEY: self.vectors["clip_l"].contiguous()}
        return {k: v.contiguous() for k, v in self.vectors.items()}


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of an embedding's tensors (keys, dtypes, shapes and bytes): ties a UniTune file to its word's file."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def word_name(value: str) -> str:
    """``embedding:name`` (or a bare ``name``) -> ``name``; refuses an empty or unspellable name."""
    name = value.strip()
    name = name[len(PREFIX):].strip() if name.startswith(PREFIX) else name
    if not name:
        raise ValueError(f"embedding {value!r} names no word: give 'embedding:<name>' (the embedding output of "
                         "Textual Inversion Train), or leave it empty to use the token.")
    ti.check_name(name)
    return name


def read_word(model, clip, value: str) -> Word:
    """The word ``value`` as the stock loader reads it for this CLIP, checked to fit every text encoder.

    ComfyUI itself only logs a warning and drops the word when the file is missing or its vectors have
    another width (an SD1.5 embedding in an SDXL prompt reaches CLIP-L only), so the tuning would
    silently bind the image to a caption without the word.
    """
    import comfy.sd1_clip

    name = word_name(value)
    family = families.model_family(model.model)
    keys = ti.encoder_keys(model, clip)
    subs = ti.sub_tokenizers(clip)
    vectors = {}
    for key in keys:
        sub, width = subs[key], ti.token_table(clip.cond_stage_model, key).shape[-1]
        directories = private_words.reading_folders(sub)  # a Qwen tokenizer's words: the embeddings folders
        found = comfy.sd1_clip.load_embed(name, directories, sub.embedding_size, sub.embedding_key)
        if found is None:
            folders = ", ".join(map(str, directories)) or "none"
            raise ValueError(f"embedding {value!r}: no file {name}.safetensors (or .pt/.bin) in the embeddings "
                             f"folders this CLIP reads ({folders}): train it first with Textual Inversion Train "
                             "(connect its embedding output here), or give the name of a file in models/embeddings/.")
        found = found.reshape(-1, found.shape[-1]) if found.dim() != 2 else found
        if found.shape[-1] != width:  # the encoder's own table width (what ComfyUI compares the vectors with)
            raise ValueError(f"embedding {value!r} has {found.shape[-1]}-wide vectors for {sub.embedding_key}, which "
                             f"needs {width} (an SD1.5 embedding with an SDXL-family model, or a file without a "
                             f"{sub.embedding_key} key?): this MODEL is {family}; train the word on this model "
                             "(Textual Inversion Train, or pivotal_steps here with the embedding input empty).")
        vectors[sub.embedding_key] = found.to(torch.float32)
    return Word(name, vectors, family, source=f"models/embeddings/{name}")


def token_count(clip, text: str) -> int:
    """How many prompt tokens ``text`` takes (the most over the text encoders the CLIP runs), as the stock
    tokenizers split it (CLIP's BPE and T5's SentencePiece may split a rare word differently)."""
    subs = ti.sub_tokenizers(clip)
    counts = [len(ti.prompt_word_ids(subs[key], text)) for key in ti.present_encoders(clip)]
    return max(counts, default=0)


def check_token(clip, token: str) -> int:
    """Refuse a token that cannot be a learned word's name; returns how many vectors its word gets."""
    try:
        ti.check_name(token.strip())
    except ValueError as error:
        raise ValueError(f"token {token!r} cannot be the learned word (pivotal_steps > 0): {error}") from None
    count = token_count(clip, token.strip())
    if not 1 <= count <= ti.MAX_VECTORS:
        raise ValueError(f"token {token!r} is {count} prompt tokens; a learned word holds 1 to {ti.MAX_VECTORS}: "
                         "use a shorter rare word such as 'beikkpic'.")
    return count


def word_settings(name: str, count: int, steps: int, batch_size: int, seed: int, precision: str,
                  learning_rate: float = LEARNING_RATE, norm_control: bool = NORM_CONTROL,
                  gradient_checkpointing: bool = False,
                  guidance: float = ti.FLUX_GUIDANCE) -> ti.TextualInversionSettings:
    """The textual inversion settings a pivotal word is learned with: the bare word as caption, from its own tokens."""
    return ti.TextualInversionSettings(init_text=name, vectors=count, captions="token alone", steps=steps,
                                       batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                                       precision=precision, norm_control=norm_control,
                                       gradient_checkpointing=gradient_checkpointing, guidance=guidance)


def learn_word(model, clip, latents: torch.Tensor, token: str, steps: int, batch_size: int, seed: int,
               precision: str, on_step: Callable[[int, int, float], None] | None = None,
               learning_rate: float = LEARNING_RATE, norm_control: bool = NORM_CONTROL,
               gradient_checkpointing: bool = False, guidance: float = ti.FLUX_GUIDANCE) -> Word:
    """Learn the vectors of the word ``token`` on ``latents`` (textual inversion, UNet and CLIP frozen).

    The vectors start from the token's own token embeddings, one per token it splits into, so the word
    takes the same prompt positions the token did; the captions are the word alone, as UniTune's are.
    ``norm_control`` retracts the vectors toward the vocabulary's std after every step (``ti.retract``);
    ``gradient_checkpointing`` recomputes the text-encoder layers and diffusion blocks in backward (as the
    UniTune run does with the same input); ``guidance`` is Flux.1 dev's training guidance (UniTune passes its
    own, so the word and the tuned model see the same conditioning; ignored by other families). Every family
    textual inversion trains on: SD1.5, SDXL, Flux.1 (CLIP-L + T5 vectors), SD3 (CLIP-L + CLIP-G + T5, or
    the encoders present), Chroma (T5), Qwen-Image (Qwen2.5-VL) and Z-Image (Qwen3; these two read the word on
    a private tokenizer, ``textual_inversion.private_words``).
    """
    name, count = token.strip(), check_token(clip, token)
    settings = word_settings(name, count, steps, batch_size, seed, precision, learning_rate, norm_control,
                             gradient_checkpointing, guidance)
    result = ti.train(model, clip, latents, settings, name=name, on_step=on_step)
    log.info("Pivotal UniTune: learned embedding:%s (%d vectors, %d steps at lr %g, norm control %s, loss %.5f)",
             name, count, steps, learning_rate, "on" if norm_control else "off", result.losses[-1])
    return Word(name, result.vectors, result.family, source=f"learned here ({steps} steps)", losses=result.losses,
                metadata=result.metadata)


def caption_clip(clip, word: Word | None):
    """``clip``, or a view of it whose tokenizer answers ``embedding:<word>`` with the word's vectors."""
    return clip if word is None else ti.tokenizing_clip(clip, word.name, word.vectors)
