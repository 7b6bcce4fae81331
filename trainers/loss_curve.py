"""The loss curve as a ComfyUI IMAGE ``[1, H, W, 3]``, drawn with PIL (no plotting library needed)."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

BACKGROUND = (255, 255, 255)
GRID = (225, 225, 225)
AXIS = (90, 90, 90)
RAW = (160, 190, 235)
SMOOTH = (20, 70, 170)
RESUME = (220, 120, 40)


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (what training dashboards show)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** i))
    return out


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def render_loss_curve(losses: Sequence[float], width: int = 640, height: int = 320,
                      title: str = "training loss", resumed_at: int | None = None) -> torch.Tensor:
    """Draw ``losses`` (one value per optimizer step) with its moving average; returns ``[1, H, W, 3]`` float."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    left, right, top, bottom = 58, 12, 24, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    values = [float(v) for v in losses if math.isfinite(float(v))]
    draw.text((left, 6), f"{title}  ({len(losses)} steps)", fill=AXIS, font=font)
    if not values:
        draw.text((left, top + plot_h // 2), "no finished steps yet", fill=AXIS, font=font)
        return _to_image(img)

    trend = smooth(values, beta=min(0.98, 1.0 - 1.0 / max(2.0, len(values) / 25)))  # ~4% of the run
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo) - 1e-6, hi + 0.5 * abs(hi) + 1e-6
    count = len(values)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)
        return x, top + plot_h * (1.0 - (v - lo) / (hi - lo))

    for k in range(5):
        y = top + plot_h * k / 4
        draw.line([(left, y), (left + plot_w, y)], fill=GRID)
        draw.text((4, y - 6), _fmt(hi - (hi - lo) * k / 4), fill=AXIS, font=font)
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=AXIS)
    if resumed_at is not None and 0 < resumed_at < count:
        x = xy(resumed_at, lo)[0]
        draw.line([(x, top), (x, top + plot_h)], fill=RESUME)
        draw.text((x + 3, top + 2), "resumed", fill=RESUME, font=font)
    for series, colour, line_width in ((values, RAW, 1), (trend, SMOOTH, 2)):
        points = [xy(i, v) for i, v in enumerate(series)]
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        else:
            draw.line(points, fill=colour, width=line_width)
    draw.text((left, height - bottom + 8), "step 1", fill=AXIS, font=font)
    end_label = f"step {count}   last {_fmt(values[-1])}   avg {_fmt(trend[-1])}"
    draw.text((max(left, left + plot_w - 6 * len(end_label)), height - bottom + 8), end_label, fill=AXIS, font=font)
    return _to_image(img)


def _to_image(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).unsqueeze(0)
