"""``embedding:name`` words for text encoders whose stock tokenizer ignores them, on a private tokenizer copy.

ComfyUI 0.3.75 builds the Qwen2.5-VL tokenizer of Qwen-Image (``text_encoders/qwen_image.py``) and the Qwen3
tokenizer of Z-Image (``text_encoders/z_image.py``) without ``embedding_directory``, so ``embedding:x`` stays
text there; and ``CLIP.clone()`` shares the tokenizer object, so setting the directory on it would change every
clone of the CLIP. Here a clone gets its own copy of the tokenizer wrapper and of the per-encoder
``SDTokenizer`` (shallow: the Hugging Face tokenizer, its vocabulary and ``inv_vocab`` are shared; tokenizing
only reads them, the Qwen2 BPE cache is a memo of a pure function), whose stock ``tokenize_with_weights``
reads the words. The input CLIP, its tokenizer and every other clone keep the stock behaviour.

Four things differ from a stock embedding-reading tokenizer, the first three because the Qwen chat templates
wrap the prompt (``user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``):

- a word ends at whitespace or at a special token ``<|``, so ``embedding:x`` at the end of the prompt is ``x``,
  not ``x<|im_end|>``;
- a newline before the word stays a token (the template's ``user\n`` when the prompt starts with the word);
- the text after the word is kept exactly (the stock parser rejoins it with single spaces and drops trailing
  newlines, which would rewrite the template's ``\\n`` tokens);
- the vectors are handed on as ``{"type": "embedding", "data": row}`` tokens, which ``SDClipModel.process_tokens``
  reads as it reads a bare tensor, because ``QwenImageTokenizer.tokenize_with_weights`` compares every token
  with the image-pad id (``r[i][0] == 151655``), which fails on a tensor of more than one element.

Which encoders take this route is data: the ``families`` record's ``TextEncoder.private_words``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

from .. import families

log = logging.getLogger(__name__)

FOLDER = "embeddings"
SPECIAL = "<|"  # where a Qwen chat-template token starts right after the prompt
Find = Callable[[str], object]  # an ``embedding:`` name -> its vectors ([n, width] or [width]) or None


def private_keys() -> frozenset[str]:
    """The embedding keys whose words FrozenTune reads on a private tokenizer (Qwen2.5-VL, Qwen3)."""
    return frozenset(e.key for f in families.FAMILIES.values() for e in f.text_encoders if e.private_words)


def stock_keys() -> frozenset[str]:
    """The embedding keys whose stock ComfyUI tokenizer reads ``embedding:`` words (CLIP-L, CLIP-G, T5-XXL)."""
    return frozenset(e.key for f in families.FAMILIES.values() for e in f.text_encoders if e.embedding)


def embedding_folders() -> list[str]:
    """ComfyUI's embeddings folders now (what ``CLIPLoader`` hands a stock tokenizer)."""
    import folder_paths

    return list(folder_paths.get_folder_paths(FOLDER))


def sub_tokenizers(tokenizer) -> dict[str, tuple[str, object]]:
    """The per-encoder ``SDTokenizer``s of a CLIP's tokenizer: embedding key -> (attribute name, tokenizer)."""
    import comfy.sd1_clip

    return {t.embedding_key: (attr, t) for attr, t in vars(tokenizer).items()
            if isinstance(t, comfy.sd1_clip.SDTokenizer)}


def reading_folders(sub) -> list[str]:
    """The embeddings folders ``sub`` reads words from: its own (stock, or a private copy's), else ComfyUI's now."""
    return list(sub.embedding_directory) if sub.embedding_directory is not None else embedding_folders()


def folder_lookup(sub, folders: list[str]) -> Find:
    """``name`` -> the vectors the stock loader reads for ``sub``'s key from ``folders`` (None when none)."""
    import comfy.sd1_clip

    def find(name: str):
        return comfy.sd1_clip.load_embed(name, folders, sub.embedding_size, sub.embedding_key)

    return find


def word_reader(sub, find: Find, folders: list[str] | None = None):
    """A copy of the stock ``SDTokenizer`` ``sub`` that reads ``embedding:name`` words through ``find``.

    Parsing, batching and padding stay the stock ``tokenize_with_weights`` of ``sub``'s class; only the word
    lookup (``_try_get_embedding``) and the token form of the vectors differ (module docstring). ``sub`` is
    not changed.
    """
    own = copy.copy(sub)
    own.embedding_directory = list(folders) if folders is not None else embedding_folders()
    stock_tokenize = type(sub).tokenize_with_weights
    seen = {"text": ""}

    def lookup(embedding_name: str) -> tuple[object, str]:
        # ``embedding_name``: the text after "embedding:" up to the next " embedding:", newlines stripped.
        cut = [i for i in (embedding_name.find(SPECIAL), *(embedding_name.find(c) for c in " \t\r\n")) if i >= 0]
        end = min(cut, default=len(embedding_name))
        name, rest = embedding_name[:end], embedding_name[end:]
        found = find(name) if name else None
        if found is None and name.rstrip(",") != name:  # "embedding:x, ..." as the stock lookup allows
            stripped = name.rstrip(",")
            name, rest = stripped, name[len(stripped):] + rest
            found = find(name) if name else None
        text = seen["text"]
        tail = text[len(text.rstrip("\n")):]
        if tail and text.endswith(own.embedding_identifier + embedding_name + tail):
            rest += tail  # the newlines the stock parser stripped from the end of the prompt (the template's)
        return found, rest

    def tokenize_with_weights(text: str, return_word_ids: bool = False, **kwargs):
        # The stock parser splits at " embedding:" and "\nembedding:", dropping the separator: a space belongs
        # to the word in byte-level BPE (" cat" is one token), a newline is a token of its own (the template's
        # "user\n" before a prompt that starts with the word), so it is kept.
        text = text.replace("\n" + own.embedding_identifier, "\n " + own.embedding_identifier)
        seen["text"] = text
        batches = stock_tokenize(own, text, return_word_ids, **kwargs)
        return [[_as_token(t) for t in batch] for batch in batches]

    own._try_get_embedding = lookup
    own.tokenize_with_weights = tokenize_with_weights
    return own


def _as_token(entry: tuple) -> tuple:
    import torch

    if torch.is_tensor(entry[0]):
        return ({"type": "embedding", "data": entry[0]}, *entry[1:])
    return entry


def token_vector(token):
    """The vector of one ``embedding:`` token of a stock or a private tokenizer's output, else None."""
    import torch

    if torch.is_tensor(token):
        return token
    if isinstance(token, dict) and token.get("type") == "embedding":
        return token.get("data")
    return None


def private_tokenizer(tokenizer, finds: dict[str, Find], folders: list[str] | None = None):
    """A shallow copy of a CLIP's tokenizer whose per-encoder tokenizers for ``finds``' keys are ``word_reader``s."""
    own = copy.copy(tokenizer)
    for key, (attr, sub) in sub_tokenizers(tokenizer).items():
        if key in finds:
            setattr(own, attr, word_reader(sub, finds[key], folders))
    return own


def needs_private(clip) -> tuple[str, ...]:
    """The embedding keys of ``clip`` whose tokenizer does not read ``embedding:`` words yet and that FrozenTune
    can read privately. Refuses a CLIP with such an encoder FrozenTune does not know (never a silent no-op)."""
    subs = sub_tokenizers(clip.tokenizer)
    plain = [key for key, (_, sub) in subs.items() if sub.embedding_directory is None and key not in stock_keys()]
    unknown = [key for key in plain if key not in private_keys()]
    if unknown:
        raise ValueError(f"this CLIP's {', '.join(unknown)} tokenizer does not read embedding: words in ComfyUI "
                         "0.3.75 and FrozenTune does not know its text encoder's prompt template, so it cannot make "
                         "it read them safely (known: Qwen2.5-VL of Qwen-Image, Qwen3 of Z-Image; CLIP and T5 "
                         "tokenizers read them already).")
    return tuple(plain)


def reading_embeddings(clip):
    """``clip``, or a clone of it whose tokenizer reads ``embedding:name`` from the embeddings folders for the
    encoders whose stock tokenizer ignores them (Qwen-Image's Qwen2.5-VL, Z-Image's Qwen3).

    A CLIP whose tokenizers all read the words already (SD1.5, SDXL, Flux, SD3, Chroma, or one that went
    through this once) is returned as it is. The input CLIP and its other clones are never changed.
    """
    keys = needs_private(clip)
    if not keys:
        return clip
    folders = embedding_folders()
    subs = sub_tokenizers(clip.tokenizer)
    out = clip.clone()
    out.tokenizer = private_tokenizer(clip.tokenizer, {k: folder_lookup(subs[k][1], folders) for k in keys}, folders)
    log.info("Embedding words: %s read embedding:name from %s (a private tokenizer; the input CLIP is unchanged)",
             ", ".join(keys), ", ".join(folders) or "no folder")
    return out
