"""Tooltips stay short: what an input or output does and its range, in two sentences at most.

The figures (measurements, memory, recipes) belong on the node's help page,
``nodes/web/docs/<node id>.md``; a tooltip that reads like a benchmark report hides what the input
does. Limit: 320 characters and two sentences.
"""

from __future__ import annotations

import re

import pytest

MAX_CHARS = 320
MAX_SENTENCES = 2

# Words ending in a period that do not end a sentence.
_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "etc.", "approx.", "cf.", "incl.", "resp.")
# A stop: '.', '?' or '!' (and any closing quote or bracket) followed by whitespace and more text.
# A period inside a word ('0.5', '.safetensors', 'embedding:a.b') has no whitespace after it, so
# it never counts. A lowercase start counts too: 'full: all weights. lora: adapters.' is two.
_STOP = re.compile(r"[.?!][\"')\]]*(?=\s+\S)")


def sentences(text: str) -> int:
    """How many sentences ``text`` has; a last sentence without a final stop counts too."""
    text = text.strip()
    if not text:
        return 0
    stops = 0
    for match in _STOP.finditer(text):
        word = text[: match.start() + 1].split()[-1].lower()
        if match.group().startswith(".") and (word.endswith(_ABBREVIATIONS) or word.endswith("..")):
            continue  # 'e.g. x', or an ellipsis standing for a path: 'loras/...' is a folder
        stops += 1
    return stops + 1


def problems(tooltip: str | None) -> list[str]:
    """What is wrong with one tooltip, in words (empty when it follows the rule)."""
    if not tooltip or not tooltip.strip():
        return ["no tooltip"]
    found = []
    if len(tooltip) > MAX_CHARS:
        found.append(f"{len(tooltip)} characters (at most {MAX_CHARS})")
    n = sentences(tooltip)
    if n > MAX_SENTENCES:
        found.append(f"{n} sentences (at most {MAX_SENTENCES})")
    return found


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Step size.", 1),
        ("Step size", 1),
        ("Step size. 0 = auto.", 2),
        ("Step size. 0 = auto. Not with lora.", 3),
        ("Optional class noun, e.g. 'dog'. It follows the token.", 2),
        ("Scale, i.e. how strong. Range 0.5 to 2.0.", 2),
        ("Writes name.safetensors into models/loras. Overwrites nothing.", 2),
        ("A vs. B comparison of 0.5 and 1.5 weights.", 1),
        ("Which one? The first! Then the rest.", 3),
        ("Strength (0 = off). Higher is stronger.", 2),
        ("The word, 'embedding:name'. The caption then uses it. Leave empty to use the token.", 3),
        ("Rank of the adapters (4, 8, etc.). Higher is larger.", 2),
        ("Sizes 4, 8, etc.", 1),
        ("A name 'loras/...' goes to models/loras/. A counter is appended.", 2),
        ("Use 'loras/...'. A counter is appended.", 2),
        ("full: every weight. lora: adapters. auto: full for SD1.5.", 3),
        ("Strength 1.0 (i.e. unchanged) up to 2.0.", 1),
    ],
)
def test_sentence_count(text, expected):
    assert sentences(text) == expected


def test_the_rule_catches_long_and_wordy_tooltips():
    assert problems("x" * (MAX_CHARS + 1)) == [f"{MAX_CHARS + 1} characters (at most {MAX_CHARS})"]
    assert problems("One. Two. Three.") == ["3 sentences (at most 2)"]
    assert problems("") == ["no tooltip"]
    assert problems(None) == ["no tooltip"]
    assert problems("What it does. Its range, e.g. 0.5 to 2.0.") == []


def test_every_tooltip_of_the_pack_is_short(pack):
    from frozentune.nodes import NODE_CLASSES

    bad = []
    for cls in NODE_CLASSES:
        schema = cls.GET_SCHEMA()
        items = [(f"input {i.id}", i.tooltip) for i in schema.inputs]
        items += [(f"output {o.display_name or o.id}", o.tooltip) for o in schema.outputs]
        for name, tooltip in items:
            for problem in problems(tooltip):
                bad.append(f"{schema.node_id} {name}: {problem}")
    assert not bad, "tooltips over the rule (move the figures to the help page):\n" + "\n".join(bad)
