"""ControlNet-Zero datasets: folder and manifest layouts, and a clear error for every bad input."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from harness import comfy_env, disks

R = 64


@pytest.fixture(scope="module")
def ds():
    comfy_env.import_pack()
    from frozentune.controlnet_zero import dataset

    return dataset


@pytest.fixture()
def folder(tmp_path):
    return disks.write_folder(tmp_path / "set", count=3, size=R)


def test_folder_pairs_load_as_rgb_uint8_at_the_training_size(ds, folder):
    pairs = ds.scan_folder(folder)
    assert [p.image.name for p in pairs] == ["disk_000.png", "disk_001.png", "disk_002.png"]
    assert all(p.caption == disks.CAPTION for p in pairs)
    targets, hints = ds.load_pairs(pairs, R)
    assert targets.shape == hints.shape == (3, R, R, 3) and hints.dtype == torch.uint8
    expected_targets, expected_hints = disks.disks(3, R, seed=0)
    assert torch.equal(hints, (expected_hints * 255).round().to(torch.uint8))
    assert (targets.float() / 255 - expected_targets).abs().max() <= 1 / 255


def test_jsonl_manifest_is_read(ds, folder):
    rows = [{"image": f"images/disk_{i:03d}.png", "conditioning_image": f"conditioning/disk_{i:03d}.png",
             "text": f"caption {i}"} for i in range(3)]
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = ds.scan_folder(folder)
    assert [p.caption for p in pairs] == ["caption 0", "caption 1", "caption 2"]


@pytest.mark.parametrize("mutate, message", [
    (lambda root: (root / "conditioning" / "disk_001.png").unlink(), r"no hint of the same name.*disk_001"),
    (lambda root: (root / "images" / "disk_002.png").unlink(), r"no image of the same name.*disk_002"),
    (lambda root: (root / "images" / "disk_000.txt").unlink(), r"no caption file.*disk_000.txt"),
    (lambda root: __import__("shutil").rmtree(root / "conditioning"), r"no conditioning/ folder"),
    (lambda root: (root / "train.jsonl").write_text('{"image": "images/disk_000.png"}\n'),
     r"line 1 lacks conditioning_image, text"),
    (lambda root: (root / "train.jsonl").write_text('{"image": "images/x.png", "conditioning_image": '
                                                    '"conditioning/disk_000.png", "text": ""}\n'),
     r"image .*x.png' does not exist"),
])
def test_incomplete_folders_are_refused_with_the_file_named(ds, folder, mutate, message):
    mutate(folder)
    with pytest.raises(ValueError, match=message):
        ds.scan_folder(folder)


def test_missing_folder_is_refused(ds, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ds.scan_folder(tmp_path / "nowhere")


def test_hint_of_another_size_is_refused(ds, folder):
    Image.new("RGB", (32, 32)).save(folder / "conditioning" / "disk_001.png")
    with pytest.raises(ValueError, match=r"disk_001.png is 64x64 but its hint disk_001.png is 32x32"):
        ds.load_pairs(ds.scan_folder(folder), R)


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_non_rgb_hint_is_refused(ds, folder, mode):
    Image.new(mode, (R, R)).save(folder / "conditioning" / "disk_002.png")
    with pytest.raises(ValueError, match=rf"disk_002.png is {mode}, not RGB"):
        ds.load_pairs(ds.scan_folder(folder), R)


def test_unreadable_file_is_refused(ds, folder):
    (folder / "images" / "disk_000.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read .*disk_000.png"):
        ds.load_pairs(ds.scan_folder(folder), R)


def test_image_batches_are_checked(ds):
    images = torch.rand(2, R, R, 3)
    with pytest.raises(ValueError, match="2 images but 1 hints"):
        ds.from_images(images, torch.rand(1, R, R, 3), "", R)
    with pytest.raises(ValueError, match="4 channels, not RGB"):
        ds.from_images(images, torch.rand(2, R, R, 4), "", R)
    with pytest.raises(ValueError, match="images are 64x64 but hints are 32x32"):
        ds.from_images(images, torch.rand(2, 32, 32, 3), "", R)
    with pytest.raises(ValueError, match="3 lines for 2 images"):
        ds.from_images(images, torch.rand(2, R, R, 3), "a\nb\nc", R)
    _, _, caps = ds.from_images(images, torch.rand(2, R, R, 3), "first\nsecond", R)
    assert caps == ["first", "second"]
    assert ds.split_captions("one for all", 3) == ["one for all"] * 3


def test_resolution_must_be_a_multiple_of_64(ds):
    with pytest.raises(ValueError, match="multiple of 64"):
        ds.check_resolution(100)
