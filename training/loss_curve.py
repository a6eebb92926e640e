"""A loss curve drawn with PIL as a ComfyUI IMAGE (no matplotlib needed)."""

from __future__ import annotations

import numpy as np
import torch


def loss_curve_image(losses: list[float], title: str = "loss", width: int = 512, height: int = 256) -> torch.Tensor:
    """``[1, height, width, 3]`` float image of ``losses`` against step, with a min/max label."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 50, width - 10, 24, height - 20
    draw.rectangle([left, top, right, bottom], outline=(160, 160, 160))
    if losses:
        lo, hi = min(losses), max(losses)
        span = hi - lo if hi > lo else 1.0  # a constant loss draws a flat line, not a division by zero
        n = max(len(losses) - 1, 1)
        points = [(left + (right - left) * i / n, bottom - (bottom - top) * (v - lo) / span)
                  for i, v in enumerate(losses)]
        if len(points) == 1:
            points.append((right, points[0][1]))
        draw.line(points, fill=(30, 90, 200), width=2)
        draw.text((4, top - 4), f"{hi:.3g}", fill=(60, 60, 60))
        draw.text((4, bottom - 10), f"{lo:.3g}", fill=(60, 60, 60))
        draw.text((left, 4), f"{title}: {losses[0]:.4g} -> {losses[-1]:.4g} over {len(losses)} steps",
                  fill=(20, 20, 20))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
