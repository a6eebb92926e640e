"""The prompts UniTune Edit samples with: the edit prompt and its prompt-guidance baseline.

The model was tuned on one caption (the token, plus the class word if one was given), so the baseline is
that caption and the edit prompt must contain it too. CLIP's tokenizer lowercases and splits punctuation
off, so "Beikkpic," is the token: finding it by splitting on spaces would add it a second time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TuningCaption:
    """What a tuned MODEL was tuned on (attached by UniTune Fine-Tune and UniTune Load), for UniTune Edit."""

    word: str  # the token, or "embedding:<name>" for a pivotal result
    class_word: str = ""


def _phrase(text: str) -> str:
    """A regex for ``text`` as whole words: any case (below), any run of whitespace between its words."""
    return r"(?<!\w)" + r"\s+".join(re.escape(part) for part in text.split()) + r"(?!\w)"


def edit_prompts(token: str, class_word: str, edit_prompt: str) -> tuple[str, str]:
    """``(prompt, baseline)``: the baseline is the tuning caption ``token class_word``; the prompt is that
    caption followed by the edit prompt, or the edit prompt as written when it names the token already (as
    a whole word, any case, punctuation around it), with the class word put right after the token when no
    occurrence of the token is followed by it."""
    token, class_word, edit = token.strip(), " ".join(class_word.split()), edit_prompt.strip()
    baseline = f"{token} {class_word}".strip()
    found = list(re.finditer(_phrase(token), edit, flags=re.IGNORECASE))
    if not found:
        return f"{baseline} {edit}".strip(), baseline
    if class_word and not any(re.match(r"\s+" + _phrase(class_word), edit[m.end():], flags=re.IGNORECASE)
                              for m in found):
        end = found[0].end()
        edit = f"{edit[:end]} {class_word}{edit[end:]}"
    return edit, baseline
