"""A synthetic ControlNet dataset made at run time: hint = white disk mask, target = red disk at the same place.

Used by the ControlNet-Zero tests, the learning check, the bench and the example workflow's demo
dataset (written into the server's input folder). Seeded, standard library + torch + PIL only.
"""

from __future__ import annotations

from pathlib import Path

import torch

CAPTION = "a red disk on a gray background"
DEMO_FOLDER = "controlnet_zero_disks"  # under ComfyUI's input folder; the example workflow trains on it
BACKGROUND = (0.55, 0.55, 0.55)
DISK = (0.85, 0.1, 0.1)


def disks(count: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(targets, hints), ``[count, size, size, 3]`` floats in [0, 1]; disks at random places and radii."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    targets, hints = [], []
    for _ in range(count):
        r = size * (0.12 + 0.13 * torch.rand((), generator=gen))
        cx, cy = (r + (size - 2 * r) * torch.rand(2, generator=gen))
        mask = ((x - cx) ** 2 + (y - cy) ** 2 <= r ** 2)[..., None]
        targets.append(torch.where(mask, torch.tensor(DISK), torch.tensor(BACKGROUND)))
        hints.append(mask.float().expand(size, size, 3))
    return torch.stack(targets), torch.stack(hints)


def _png(t: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray((t.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), "RGB").save(path)


def write_folder(root: Path, count: int = 8, size: int = 64, seed: int = 0, caption: str = CAPTION) -> Path:
    """``root/images/disk_NNN.png`` + ``.txt`` captions and ``root/conditioning/disk_NNN.png`` (RGB masks)."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "conditioning").mkdir(parents=True, exist_ok=True)
    targets, hints = disks(count, size, seed)
    for i, (target, hint) in enumerate(zip(targets, hints, strict=True)):
        _png(target, root / "images" / f"disk_{i:03d}.png")
        _png(hint, root / "conditioning" / f"disk_{i:03d}.png")
        (root / "images" / f"disk_{i:03d}.txt").write_text(caption)
    return root


DEMO_HINT = "controlnet_zero_disk_hint.png"  # top-level input file, so the stock LoadImage lists it


def write_demo_inputs(input_dir: Path, count: int = 16, size: int = 128) -> Path:
    """The example workflow's dataset folder and one held-out hint image, in a ComfyUI input folder."""
    input_dir = Path(input_dir)
    root = write_folder(input_dir / DEMO_FOLDER, count=count, size=size, seed=0)
    _png(disks(1, size, seed=99)[1][0], input_dir / DEMO_HINT)
    return root
