"""Small pictures for TensorBoard, drawn without matplotlib (a demo/dev extra only): colour-mapped
spectrograms with labels, and plots on a log axis with labelled ticks (W's sorted spectrum, the codes'
rank-frequency). TensorBoard shows images scaled down to its card width (340-440 px), so the pictures are
480 px wide with large text and thick lines."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Anchors of matplotlib's "magma" colour map (black -> purple -> orange -> pale yellow), interpolated.
_MAGMA = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66], [245, 125, 21],
                   [250, 193, 39], [252, 253, 191]], dtype=np.float32) / 255.0
FONT_SIZE = 16
_LINE = (31, 119, 180)  # the data
_MARK = (214, 39, 40)  # a threshold or count drawn over it
_GRID = (225, 225, 225)
_TEXT = (0, 0, 0)


def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=FONT_SIZE)  # Pillow's bundled scalable font (Pillow >= 10.1)


def _label_height() -> int:
    return FONT_SIZE + 5


def colormap(gray: torch.Tensor) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) float RGB in [0, 1] through the magma colour map."""
    g = gray.detach().float().clamp(0, 1).cpu().numpy() * (len(_MAGMA) - 1)
    low = np.floor(g).astype(int).clip(0, len(_MAGMA) - 2)
    frac = (g - low)[..., None]
    return _MAGMA[low] * (1 - frac) + _MAGMA[low + 1] * frac


def labelled_rows(panels: list[tuple[str, np.ndarray]], min_width: int = 480) -> torch.Tensor:
    """Stack (label, (H, W, 3) RGB in [0, 1]) panels vertically, each under a text label; a narrow panel
    (half a second of log-mel is ~50 frames) is widened by repeating its columns to at least `min_width`.
    Returns a (3, H, W) tensor for SummaryWriter.add_image."""
    panels = [(label, np.repeat(p, -(-min_width // p.shape[1]), axis=1)) for label, p in panels]
    width = max(p.shape[1] for _, p in panels)
    rows = []
    for label, panel in panels:
        strip = Image.new("RGB", (width, _label_height()), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 1), label, fill=_TEXT, font=_font())
        rows.append(np.asarray(strip, dtype=np.float32) / 255.0)
        padded = np.ones((panel.shape[0], width, 3), dtype=np.float32)
        padded[:, : panel.shape[1]] = panel
        rows.append(padded)
    return torch.from_numpy(np.concatenate(rows, axis=0)).permute(2, 0, 1)


@dataclass(frozen=True)
class Mark:
    """A labelled line across the plot: at y = `value` (axis "y") or at x = `value` (axis "x")."""
    axis: str
    value: float
    label: str


def _decade_label(k: int) -> str:
    return f"{10.0 ** k:g}" if -2 <= k <= 3 else f"1e{k}"


def _short(v: float) -> str:
    """1, 250, 1k, 65.5k, 1.05M: tick labels that fit."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:g}"


def _x_ticks(low: float, high: float, log: bool) -> list[float]:
    if log:  # the powers of ten inside, and the end
        ticks = [10.0 ** k for k in range(math.ceil(math.log10(low)), math.floor(math.log10(high)) + 1)]
        return ticks + ([high] if not ticks or high / ticks[-1] > 2 else [])
    raw = max((high - low) / 5, 1.0)  # about five ticks at 1, 2 or 5 times a power of ten, and the start
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [low] + [float(v) for v in range(step, int(high) + 1, step) if v - low >= step / 2]


def log_plot(y: torch.Tensor, x: torch.Tensor, title: str, x_label: str, x_log: bool = False,
             marks: tuple[Mark, ...] = (), decades: int = 6, counts: bool = False, width: int = 480,
             height: int = 260) -> torch.Tensor:
    """A line plot of `y` (>= 0) against `x` (ascending), y on a log10 axis from the largest value down
    `decades` decades (smaller values, zeros included, drawn at the bottom), x linear or log; labelled
    ticks, the title on top, `marks` as red lines. `counts` (integers): the axis ends one decade below 1,
    labelled 0, where the zeros are drawn. Returns (3, H, W) in [0, 1]."""
    y = y.detach().double().cpu()
    x = x.detach().double().cpu()
    font, text_h = _font(), _label_height()
    top_value = float(y.max()) if y.numel() and float(y.max()) > 0 else 1.0
    top_decade = math.ceil(math.log10(top_value))
    bottom_decade = -1 if counts else top_decade - decades
    decades = top_decade - bottom_decade
    left, right, above, below = 58, 28, text_h + 6, text_h + 22
    plot_w, plot_h = width - left - right, height - above - below

    def to_x(v: float) -> float:
        lo, hi = float(x[0]), float(x[-1])
        if x_log:
            lo, hi, v = math.log10(lo), math.log10(hi), math.log10(max(v, 1e-300))
        return left + (v - lo) / max(hi - lo, 1e-12) * (plot_w - 1)

    def to_y(v: float) -> float:
        decade = math.log10(max(v, 10.0 ** bottom_decade))
        return above + (top_decade - decade) / decades * (plot_h - 1)

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k in range(bottom_decade, top_decade + 1):
        row = to_y(10.0 ** k)
        draw.line([(left, row), (left + plot_w - 1, row)], fill=_GRID)
        label = "0" if counts and k == bottom_decade else _decade_label(k)
        draw.text((left - 4, row), label, fill=_TEXT, font=font, anchor="rm")
    for tick in _x_ticks(float(x[0]), float(x[-1]), x_log):
        col = to_x(tick)
        draw.line([(col, above), (col, above + plot_h - 1)], fill=_GRID)
        draw.text((col, above + plot_h + 2), _short(tick), fill=_TEXT, font=font, anchor="mt")
    draw.text((left + plot_w / 2, height - 2), x_label, fill=_TEXT, font=font, anchor="mb")
    draw.rectangle([left, above, left + plot_w - 1, above + plot_h - 1], outline=(150, 150, 150))
    points = [(to_x(float(a)), to_y(float(b))) for a, b in zip(x, y)]
    if len(points) > 1:
        draw.line(points, fill=_LINE, width=3, joint="curve")
    for mark in marks:
        if mark.axis == "y":
            row = to_y(mark.value)
            draw.line([(left, row), (left + plot_w - 1, row)], fill=_MARK, width=2)
            draw.text((left + 6, row - 2), mark.label, fill=_MARK, font=font, anchor="lb")
        else:
            col = to_x(mark.value)
            draw.line([(col, above), (col, above + plot_h - 1)], fill=_MARK, width=2)
            on_left = col > left + plot_w / 2  # the label on the side with room
            draw.text((col - 4 if on_left else col + 4, above + 4), mark.label, fill=_MARK, font=font,
                      anchor="ra" if on_left else "la")
    draw.text((4, 3), title, fill=_TEXT, font=font)
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)


def rank_frequency(counts: torch.Tensor, points: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks, counts): the code counts sorted from the most used down, at about `points` log-spaced ranks
    (1-based, from 1 to K). Sorted and thinned on the counts' device: only the points travel."""
    ordered = counts.double().sort(descending=True).values
    size = ordered.numel()
    ranks = torch.unique(torch.logspace(0, np.log10(size), min(points, size), device=ordered.device).round().long())
    ranks = ranks.clamp(1, size)
    return ranks.double(), ordered[ranks - 1]
