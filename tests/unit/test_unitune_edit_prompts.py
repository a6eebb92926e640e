"""UniTune Edit's prompt and baseline: the tuning caption (token + class word), the token found in any case
and with punctuation around it, nothing added twice (no ComfyUI needed)."""

from __future__ import annotations

import pytest

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; its root import is lazy, so ComfyUI is not needed here
from frozentune.unitune.edit_prompts import edit_prompts  # noqa: E402


@pytest.mark.parametrize(("token", "class_word", "edit", "prompt", "baseline"), [
    # no class word: the paper's setting, the baseline is the bare token
    ("beikkpic", "", "as a watercolor", "beikkpic as a watercolor", "beikkpic"),
    # a class word: both prompts carry the caption the model was tuned on
    ("beikkpic", "dog", "as a watercolor", "beikkpic dog as a watercolor", "beikkpic dog"),
    (" beikkpic ", " golden  retriever ", "in the snow", "beikkpic golden retriever in the snow",
     "beikkpic golden retriever"),
    # the token already in the prompt: punctuation and case do not hide it; the class word goes after it
    ("beikkpic", "", "beikkpic, as a watercolor", "beikkpic, as a watercolor", "beikkpic"),
    ("beikkpic", "", "Beikkpic as a watercolor", "Beikkpic as a watercolor", "beikkpic"),
    ("beikkpic", "dog", "a photo of beikkpic, in the snow", "a photo of beikkpic dog, in the snow", "beikkpic dog"),
    ("beikkpic", "dog", "BEIKKPIC as a watercolor", "BEIKKPIC dog as a watercolor", "beikkpic dog"),
    # the class word already after the token (any case): not added again
    ("beikkpic", "dog", "beikkpic dog as a watercolor", "beikkpic dog as a watercolor", "beikkpic dog"),
    ("beikkpic", "dog", "Beikkpic Dog, in the snow", "Beikkpic Dog, in the snow", "beikkpic dog"),
    ("beikkpic", "golden retriever", "beikkpic golden   retriever", "beikkpic golden   retriever",
     "beikkpic golden retriever"),
    # a longer word that contains the token is not the token
    ("beikkpic", "", "beikkpics in the snow", "beikkpic beikkpics in the snow", "beikkpic"),
    ("beikkpic", "dog", "beikkpic_2 dog", "beikkpic dog beikkpic_2 dog", "beikkpic dog"),
    # a pivotal word
    ("embedding:beikkpic", "", "embedding:beikkpic, in the snow", "embedding:beikkpic, in the snow",
     "embedding:beikkpic"),
    # an empty edit prompt samples the caption itself
    ("beikkpic", "dog", "  ", "beikkpic dog", "beikkpic dog"),
])
def test_prompt_and_baseline(token, class_word, edit, prompt, baseline):
    assert edit_prompts(token, class_word, edit) == (prompt, baseline)


def test_the_token_is_named_once():
    for edit in ("beikkpic, a minion", "Beikkpic a minion", "a minion like beikkpic.", "(beikkpic) a minion"):
        prompt, _ = edit_prompts("beikkpic", "dog", edit)
        assert prompt.lower().count("beikkpic") == 1, prompt
        assert prompt.lower().count("dog") == 1, prompt
