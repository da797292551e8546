"""A small line plot written with PIL (no plotting library needed): training curves for reports."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def line_plot(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], path: str, title: str = "",
              size: Tuple[int, int] = (640, 400)) -> None:
    """Draw ``name -> (x, y)`` curves on shared axes with a legend; save as PNG."""
    from PIL import Image, ImageDraw
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    if not series or not all(len(x) for x, _ in series.values()):
        raise ValueError(f"line_plot {path}: every series needs a point (got {[len(x) for x, _ in series.values()]})")
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()])
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()])
    ys = ys[np.isfinite(ys)]  # a diverged run's inf or NaN is left out of the axes, as of the curves
    x0, x1 = float(xs.min()), float(xs.max()) or 1.0
    y0, y1 = (float(ys.min()), float(ys.max())) if ys.size else (0.0, 1.0)
    if y1 == y0:
        y1 = y0 + 1.0
    to_px = lambda x, y: (left + (x - x0) / max(x1 - x0, 1e-9) * (w - left - right),
                          h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))
    draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
    for frac in np.linspace(0, 1, 5):
        y = y0 + frac * (y1 - y0)
        _, py = to_px(x0, y)
        draw.text((5, py - 6), f"{y:.3g}", fill=(0, 0, 0))
        x = x0 + frac * (x1 - x0)
        px, _ = to_px(x, y0)
        draw.text((px - 10, h - bottom + 5), f"{x:.0f}", fill=(0, 0, 0))
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = [to_px(a, b) for a, b in zip(x, y) if np.isfinite(b)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:  # one logged step: a dot, where a line needs two
            (px, py), = points
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((left + 10, top + 5 + 14 * i), name, fill=colour)
    draw.text((left, 8), title, fill=(0, 0, 0))
    img.save(path)
