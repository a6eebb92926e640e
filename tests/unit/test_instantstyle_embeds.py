"""InstantStyle embeds without ComfyUI: the file round trip, combining, per-block weight parsing."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from harness.comfy_env import import_pack

import_pack()  # the pack as package `frozentune`; its root import is lazy, so ComfyUI is not needed here
from frozentune.instantstyle import blocks  # noqa: E402
from frozentune.instantstyle import embeds as E  # noqa: E402


def random_embeds(rows: int, seed: int, kind: str = "image_embeds", width: int = 1280) -> E.StyleEmbeds:
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, width) if kind == "image_embeds" else (rows, 5, width)
    return E.StyleEmbeds(torch.randn(shape, generator=gen) * 3, kind, "test")


@pytest.mark.parametrize("kind", E.KINDS)
def test_embeds_round_trip_through_a_file_bitwise(tmp_path, kind):
    embeds, negative = random_embeds(3, 1, kind), random_embeds(1, 2, kind)
    before = embeds.features.clone()
    path = E.save(tmp_path / "sub" / "style.safetensors", embeds, negative)
    back, back_negative = E.load(path)
    assert torch.equal(back.features, embeds.features) and back.features.dtype == torch.float32
    assert torch.equal(back_negative.features, negative.features)
    assert (back.kind, back_negative.kind) == (kind, kind)
    assert torch.equal(embeds.features, before)  # saving never touches the value
    only, none = E.load(E.save(tmp_path / "alone.safetensors", embeds))
    assert torch.equal(only.features, embeds.features) and none is None
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic write left nothing behind
    if kind == "image_embeds":  # the help page's figure: one SDXL bigG image is 1280 fp32 values, ~5 KiB
        one = E.save(tmp_path / "one.safetensors", random_embeds(1, 3))
        assert 5120 < one.stat().st_size < 6 * 1024


def test_bad_embeds_files_are_refused_naming_the_file_and_the_fix(tmp_path):
    safetensors.torch.save_file({"features": torch.zeros(1, 8)}, str(tmp_path / "other.safetensors"),
                                metadata={"format": "something else"})
    with pytest.raises(ValueError, match=r"other\.safetensors is not an InstantStyle embeds file.*Save Embeds"):
        E.load(tmp_path / "other.safetensors")
    safetensors.torch.save_file({"features": torch.zeros(8)}, str(tmp_path / "flat.safetensors"),
                                metadata={"format": E.FILE_FORMAT, "kind": "image_embeds"})
    with pytest.raises(ValueError, match=r"flat\.safetensors is damaged: image_embeds embeds need shape \[N, W\]"):
        E.load(tmp_path / "flat.safetensors")
    nan = torch.zeros(1, 8)
    nan[0, 3] = float("nan")
    safetensors.torch.save_file({"features": nan}, str(tmp_path / "nan.safetensors"),
                                metadata={"format": E.FILE_FORMAT, "kind": "image_embeds"})
    with pytest.raises(ValueError, match=r"nan\.safetensors: tensor 'features' holds 1 NaN"):
        E.load(tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match="negative_embeds are penultimate"):
        E.save(tmp_path / "mixed.safetensors", random_embeds(1, 1), random_embeds(1, 2, "penultimate"))


def test_combine_concat_average_weighted_are_their_formulas():
    a, b = random_embeds(2, 3), random_embeds(1, 4)
    assert torch.equal(E.combine([a, b], "concat").features, torch.cat([a.features, b.features]))
    assert torch.equal(E.combine([a, b], "average").features,
                       torch.cat([a.features, b.features]).mean(dim=0, keepdim=True))
    weighted = E.combine([a, b], "weighted", [0.75, 0.25]).features
    expected = (0.75 * a.features.mean(dim=0, keepdim=True) + 0.25 * b.features) / 1.0
    torch.testing.assert_close(weighted, expected, rtol=0, atol=1e-6)
    assert weighted.shape == (1, 1280)
    with pytest.raises(ValueError, match="sum to 0"):
        E.combine([a, b], "weighted", [1.0, -1.0])
    with pytest.raises(ValueError, match="embeds_2 are penultimate"):
        E.combine([a, random_embeds(1, 5, "penultimate")], "concat")
    with pytest.raises(ValueError, match="embeds_2 are image_embeds \\(1024,\\)"):
        E.combine([a, random_embeds(1, 5, width=1024)], "average")


def test_batch_rows_repeat_the_last_image():
    e = random_embeds(2, 6)
    rows = E.to_rows(e, 4)
    assert torch.equal(rows, e.features[[0, 1, 1, 1]])


def test_embeds_must_fit_the_adapter():
    E.check_fits(random_embeds(1, 1), "plain", 1280, "ad")
    with pytest.raises(ValueError, match="penultimate features .*encode them again"):
        E.check_fits(random_embeds(1, 1, "penultimate"), "plain", 1280, "ad")
    with pytest.raises(ValueError, match="1024-d but ad reads 1280-d"):
        E.check_fits(random_embeds(1, 1, width=1024), "plain", 1280, "ad")


def test_per_block_weights_parse_with_the_block_they_follow():
    assert blocks.parse_weighted("output 1:1.0, input 8:0.5") == [(("output", 1, None), 1.0), (("input", 8, None), 0.5)]
    assert blocks.parse_weighted("output 1 3=-0.25; up_blocks.0.attentions.1:2") == [
        (("output", 1, 3), -0.25), ("up_blocks.0.attentions.1", 2.0)]
    assert blocks.parse_weighted("output:1, middle 0") == [(("output", 1, None), 1.0), (("middle", 0, None), 1.0)]
    for bad in ("output 1:abc", "banana:1", "output 1:nan"):
        with pytest.raises(ValueError, match="custom block"):
            blocks.parse_weighted(bad)
