"""Small pictures for TensorBoard, drawn without matplotlib (a demo/dev extra only): colour-mapped
spectrograms with labels, and log-scale curves (W's sorted spectrum, the codes' rank-frequency)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

# Anchors of matplotlib's "magma" colour map (black -> purple -> orange -> pale yellow), interpolated.
_MAGMA = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                   [250, 193, 39], [252, 253, 191]], dtype=np.float32) / 255.0
_LABEL_HEIGHT = 12


def colormap(gray: torch.Tensor) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) float RGB in [0, 1] through the magma colour map."""
    g = gray.detach().float().clamp(0, 1).cpu().numpy() * (len(_MAGMA) - 1)
    low = np.floor(g).astype(int).clip(0, len(_MAGMA) - 2)
    frac = (g - low)[..., None]
    return _MAGMA[low] * (1 - frac) + _MAGMA[low + 1] * frac


def labelled_rows(panels: list[tuple[str, np.ndarray]]) -> torch.Tensor:
    """Stack (label, (H, W, 3) RGB in [0, 1]) panels vertically, each under a text label and separated by
    a white line; returns a (3, H, W) tensor for SummaryWriter.add_image."""
    width = max(p.shape[1] for _, p in panels)
    rows = []
    for label, panel in panels:
        strip = Image.new("RGB", (width, _LABEL_HEIGHT), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 0), label, fill=(0, 0, 0))
        rows.append(np.asarray(strip, dtype=np.float32) / 255.0)
        padded = np.ones((panel.shape[0], width, 3), dtype=np.float32)
        padded[:, : panel.shape[1]] = panel
        rows.append(padded)
    return torch.from_numpy(np.concatenate(rows, axis=0)).permute(2, 0, 1)


def log_curve(values: torch.Tensor, title: str, x: torch.Tensor | None = None, decades: int = 6,
              height: int = 160, width: int = 512) -> torch.Tensor:
    """A line plot of positive `values` on a log10 y axis spanning `decades` below the maximum, at
    horizontal positions `x` in [0, 1] (default: evenly spaced, in order), with a grid line per decade and
    a title; (3, H, W) in [0, 1]."""
    v = values.detach().double().cpu().clamp_min(0)
    top = float(v.max()) if v.numel() and float(v.max()) > 0 else 1.0
    y = (torch.log10(v.clamp_min(top * 10.0 ** -decades) / top) + decades) / decades  # 0 .. 1
    if x is None:
        x = torch.arange(v.numel(), dtype=torch.double) / max(1, v.numel() - 1)
    x = x.detach().double().cpu()
    canvas = Image.new("RGB", (width, height + _LABEL_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for decade in range(decades + 1):
        row = _LABEL_HEIGHT + round((height - 1) * decade / decades)
        draw.line([(0, row), (width - 1, row)], fill=(220, 220, 220))
    points = [(float(px) * (width - 1), _LABEL_HEIGHT + (1 - float(py)) * (height - 1)) for px, py in zip(x, y)]
    if len(points) > 1:
        draw.line(points, fill=(31, 119, 180), width=2)
    draw.text((2, 0), f"{title}  (log10 axis: max {top:.3g}, grid every decade)", fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)


def rank_frequency(counts: torch.Tensor, points: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, counts): the code counts sorted from the most used down at about `points` log-spaced ranks,
    x = log(rank) / log(K) in [0, 1]. Sorted and thinned on the counts' device: only the points travel."""
    ordered = counts.double().sort(descending=True).values
    size = ordered.numel()
    ranks = torch.unique(torch.logspace(0, np.log10(size), min(points, size), device=ordered.device).round().long())
    ranks = ranks.clamp(1, size)
    return torch.log(ranks.double()) / max(np.log(size), 1e-9), ordered[ranks - 1]
