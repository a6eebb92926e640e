"""ControlNet-Zero datasets: folder and manifest layouts, a clear error for every bad input, paths kept inside input/."""

from __future__ import annotations

import json
import os
from pathlib import Path

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

# --- paths stay inside ComfyUI's input folder or FROZENTUNE_DATA_DIRS (issue 12, item 2): the dataset folder, the
# manifest and every path in it resolve through storage.user_paths; anything else is refused before the file
# system is touched, with a message that reads the same whether the path exists or not, and messages list only
# names inside the allowed folders. The CLI passes no roots.


@pytest.fixture()
def input_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FROZENTUNE_DATA_DIRS", raising=False)
    folder = tmp_path / "input"
    disks.write_folder(folder / "set", count=2, size=R)
    return folder


def roots(input_dir):
    from frozentune.storage import user_paths

    return user_paths.roots(input_dir)


def refusal(ds, value, input_dir) -> str:
    with pytest.raises(ValueError) as error:
        ds.scan_folder(value, roots=roots(input_dir))
    return str(error.value).replace(repr(value), "<value>")


def outside(tmp_path) -> Path:
    """A real dataset outside the input folder, with a private-looking file name."""
    root = disks.write_folder(tmp_path / "elsewhere", count=2, size=R)
    (root / "images" / "private_photo.png").write_bytes((root / "images" / "disk_000.png").read_bytes())
    return root


def test_folders_outside_input_are_refused_alike_whether_or_not_they_exist(ds, input_dir, tmp_path, monkeypatch):
    real = outside(tmp_path)
    values = ["/etc", "~", "~/x", "../../../../etc", str(real), str(tmp_path / "no_such_folder"), "set/../../elsewhere"]
    touched = []
    for name in ("scandir", "listdir", "stat", "lstat"):  # the lexical check must come first
        plain = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _plain=plain, **k: (touched.append(a[:1]), _plain(*a, **k))[1])
    messages = {refusal(ds, v, input_dir) for v in values}
    monkeypatch.undo()
    assert len(messages) == 1, messages
    message = messages.pop()
    assert "refused" in message and "input folder" in message and "FROZENTUNE_DATA_DIRS" in message
    assert "exist" not in message and "private_photo" not in message
    assert not [t for t in touched if t and str(real) in str(t[0])], "the file system was asked about the path"


def test_relative_folder_is_inside_input_and_an_admin_folder_is_allowed(ds, input_dir, tmp_path, monkeypatch):
    assert len(ds.scan_folder("set", roots=roots(input_dir))) == 2
    real = outside(tmp_path)
    (real / "images" / "private_photo.png").unlink()
    monkeypatch.setenv("FROZENTUNE_DATA_DIRS", str(tmp_path / "elsewhere"))
    assert len(ds.scan_folder(str(real), roots=roots(input_dir))) == 2
    assert len(ds.scan_folder(str(real))) == 2, "the CLI (no roots) reads where its owner says"


def manifest(folder: Path, rows: list[dict]) -> None:
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.mark.parametrize("image", ["/etc/passwd", "/no/such/file.png", "../../outside.png", "{outside}"])
def test_manifest_paths_outside_input_are_refused_alike(ds, input_dir, tmp_path, image):
    real = outside(tmp_path)
    image = image.replace("{outside}", str(real / "images" / "disk_000.png"))
    manifest(input_dir / "set", [{"image": image, "conditioning_image": "conditioning/disk_000.png", "text": "x"}])
    message = refusal(ds, "set", input_dir)
    assert message.startswith("train.jsonl line 1 image ") and "is refused" in message
    assert "does not exist" not in message and "cannot identify" not in message


def test_manifest_paths_inside_input_still_read(ds, input_dir):
    manifest(input_dir / "set", [{"image": "images/disk_000.png", "conditioning_image": "conditioning/disk_000.png",
                                  "text": "x"}])
    assert [p.image.name for p in ds.scan_folder("set", roots=roots(input_dir))] == ["disk_000.png"]
    manifest(input_dir / "set", [{"image": "images/gone.png", "conditioning_image": "conditioning/disk_000.png",
                                  "text": "x"}])
    with pytest.raises(ValueError, match="line 1: image .*gone.png' does not exist"):  # inside input: may say so
        ds.scan_folder("set", roots=roots(input_dir))


def test_a_link_in_the_dataset_pointing_outside_is_refused(ds, input_dir, tmp_path):
    real = outside(tmp_path)
    image = input_dir / "set" / "images" / "disk_001.png"
    image.unlink()
    image.symlink_to(real / "images" / "private_photo.png")
    with pytest.raises(ValueError, match=r"image disk_001.png .*is refused"):
        ds.scan_folder("set", roots=roots(input_dir))
    (input_dir / "linked").symlink_to(real, target_is_directory=True)
    message = refusal(ds, "linked", input_dir)
    assert "private_photo" not in message
