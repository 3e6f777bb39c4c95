"""Small SVG figures written as text (no plotting library): line plots, grouped box plots, heat maps.

Each function returns the SVG document as a string; :func:`save` writes it. Coordinates follow SVG (y grows
downwards); the plotting area is inset by fixed margins for the axes, tick labels and titles. Values that
are not finite are skipped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path

import numpy as np

__all__ = ["DASHES", "PALETTE", "line_plot", "box_plot", "heatmaps", "save"]

DASHES = ("", "6,3", "2,2", "8,3,2,3")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 150, 30, 50  # margins: axis labels left/bottom, legend right


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _text(x: float, y: float, s: str, anchor: str = "middle", size: int = 11, rotate: bool = False) -> str:
    rot = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}"{rot}>{escape(s)}</text>'


class _Axes:
    """Linear map of data ``[x0, x1] x [y0, y1]`` onto the plotting area at ``(left, top)`` of size ``w x h``."""

    def __init__(self, left: float, top: float, w: float, h: float, xr: Sequence[float], yr: Sequence[float]):
        self.left, self.top, self.w, self.h = left, top, w, h
        self.x0, self.x1 = float(xr[0]), float(xr[1]) if xr[1] > xr[0] else float(xr[0]) + 1.0
        self.y0, self.y1 = float(yr[0]), float(yr[1]) if yr[1] > yr[0] else float(yr[0]) + 1.0

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * self.w

    def y(self, v: float) -> float:
        return self.top + self.h - (v - self.y0) / (self.y1 - self.y0) * self.h

    def frame(self, xlabel: str, ylabel: str, title: str, xticks: bool = True, grid: bool = True) -> list[str]:
        """Axis box, y ticks (and x ticks), horizontal grid lines, axis labels and title."""
        out = [f'<rect x="{self.left}" y="{self.top}" width="{self.w}" height="{self.h}" fill="none" stroke="#000"/>']
        for t in _ticks(self.y0, self.y1):
            y = self.y(t)
            out.append(f'<line x1="{self.left - 4}" y1="{y:.1f}" x2="{self.left}" y2="{y:.1f}" stroke="#000"/>')
            if grid:
                right = self.left + self.w
                out.append(f'<line x1="{self.left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(_text(self.left - 6, y + 4, _fmt(t), "end"))
        if xticks:
            for t in _ticks(self.x0, self.x1):
                x = self.x(t)
                y0, y1 = self.top + self.h, self.top + self.h + 4
                out.append(f'<line x1="{x:.1f}" y1="{y0}" x2="{x:.1f}" y2="{y1}" stroke="#000"/>')
                out.append(_text(x, self.top + self.h + 16, _fmt(t)))
        out.append(_text(self.left + self.w / 2, self.top + self.h + 34, xlabel, size=12))
        out.append(_text(self.left - 44, self.top + self.h / 2, ylabel, size=12, rotate=True))
        out.append(_text(self.left + self.w / 2, self.top - 10, title, size=13))
        return out


def _document(width: float, height: float, body: Sequence[str]) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif">'
    )
    return "\n".join([head, f'<rect width="{width:.0f}" height="{height:.0f}" fill="#fff"/>', *body, "</svg>"]) + "\n"


def _legend(names: Sequence[str], x: float, y: float, lines: bool = False) -> list[str]:
    """Colour key: a filled square per name, or a short line in the series' colour and dash pattern."""
    out = []
    for i, name in enumerate(names):
        c, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
        yy = y + 16 * i
        if lines:
            dash = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{x:.1f}" y1="{yy - 4:.1f}" x2="{x + 14:.1f}" y2="{yy - 4:.1f}" stroke="{c}"{dash}/>')
        else:
            out.append(f'<rect x="{x:.1f}" y="{yy - 9:.1f}" width="12" height="10" fill="{c}"/>')
        out.append(_text(x + 18, yy, name, "start"))
    return out


def _range(values: Sequence[float], pad: float = 0.05) -> tuple[float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    return lo - pad * span, hi + pad * span


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    width: int = 560,
    height: int = 320,
    step: bool = False,
) -> str:
    """One polyline per named series ``{name: (x, y)}``, with a legend.

    Args:
        series: ``{name: (x values, y values)}`` of equal lengths.
        xlabel, ylabel, title: axis labels and title.
        width, height: size of the figure in pixels.
        step: draw a staircase (value held until the next x), as for piecewise-constant functions.
    """
    xs = [float(v) for x, _ in series.values() for v in x]
    ys = [float(v) for _, y in series.values() for v in y]
    ax = _Axes(_LEFT, _TOP, width - _LEFT - _RIGHT, height - _TOP - _BOTTOM, _range(xs, 0), _range(ys))
    body = ax.frame(xlabel, ylabel, title)
    for i, (x, y) in enumerate(series.values()):
        pts = [(float(a), float(b)) for a, b in zip(x, y, strict=True) if np.isfinite(a) and np.isfinite(b)]
        if step:
            pts = [p for k, (a, b) in enumerate(pts) for p in ([(a, pts[k - 1][1])] if k else []) + [(a, b)]]
        path = " ".join(f"{ax.x(a):.1f},{ax.y(b):.1f}" for a, b in pts)
        c, dash = PALETTE[i % len(PALETTE)], DASHES[i % len(DASHES)]
        dash = f' stroke-dasharray="{dash}"' if dash else ""
        body.append(f'<polyline points="{path}" fill="none" stroke="{c}" stroke-width="1.8"{dash}/>')
    body += _legend(list(series), width - _RIGHT + 12, _TOP + 12, lines=True)
    return _document(width, height, body)


def box_plot(
    groups: Mapping[str, Mapping[str, Sequence[float]]],
    ylabel: str = "",
    title: str = "",
    height: int = 340,
    box_width: int = 14,
) -> str:
    """Grouped box plots: one group per key of ``groups`` (e.g. a label), one box per model inside it.

    A box spans the quartiles with a line at the median; whiskers reach the most extreme values within
    1.5 IQR of the box, and every value is drawn as a dot (useful when there are few samples).

    Args:
        groups: ``{group: {series: values}}``; series keep their first-seen order and colour across groups.
        ylabel, title: axis label and title.
        height: figure height in pixels (the width follows the number of boxes).
        box_width: width of one box in pixels.
    """
    names: list[str] = []
    for g in groups.values():
        names.extend(n for n in g if n not in names)
    slot = box_width + 6
    group_w = max(slot * len(names) + 20, max((7 * len(g) + 12 for g in groups), default=0))
    width = _LEFT + group_w * len(groups) + _RIGHT
    values = [float(v) for g in groups.values() for vals in g.values() for v in vals]
    ax = _Axes(_LEFT, _TOP, group_w * len(groups), height - _TOP - _BOTTOM - 20, (0, 1), _range(values))
    body = ax.frame("", ylabel, title, xticks=False)
    for gi, (gname, g) in enumerate(groups.items()):
        gx = _LEFT + gi * group_w + (group_w - slot * len(names)) / 2
        body.append(_text(_LEFT + (gi + 0.5) * group_w, ax.top + ax.h + 16, gname))
        for si, name in enumerate(names):
            vals = np.asarray([v for v in g.get(name, []) if np.isfinite(v)], dtype=float)
            if vals.size == 0:
                continue
            c = PALETTE[si % len(PALETTE)]
            x = gx + si * slot
            q1, med, q3 = np.percentile(vals, [25, 50, 75])
            iqr = q3 - q1
            lo = vals[vals >= q1 - 1.5 * iqr].min()
            hi = vals[vals <= q3 + 1.5 * iqr].max()
            xm = x + box_width / 2
            body.append(f'<line x1="{xm:.1f}" y1="{ax.y(lo):.1f}" x2="{xm:.1f}" y2="{ax.y(hi):.1f}" stroke="{c}"/>')
            top, bottom = ax.y(q3), ax.y(q1)
            body.append(
                f'<rect x="{x:.1f}" y="{top:.1f}" width="{box_width}" height="{max(bottom - top, 1):.1f}" '
                f'fill="{c}" fill-opacity="0.35" stroke="{c}"/>'
            )
            body.append(
                f'<line x1="{x:.1f}" y1="{ax.y(med):.1f}" x2="{x + box_width:.1f}" y2="{ax.y(med):.1f}" '
                f'stroke="{c}" stroke-width="2"/>'
            )
            body += [f'<circle cx="{xm:.1f}" cy="{ax.y(v):.1f}" r="2" fill="{c}"/>' for v in vals]
    body += _legend(names, width - _RIGHT + 12, _TOP + 12)
    return _document(width, height, body)


def _colour(v: float, vmax: float, diverging: bool) -> str:
    """White -> blue (sequential, ``v / vmax`` in [0, 1]) or blue <- white -> red (diverging, [-1, 1])."""
    t = 0.0 if vmax <= 0 or not np.isfinite(v) else float(np.clip(v / vmax, -1.0, 1.0))
    if diverging and t > 0:
        r, g, b = 255, 255 * (1 - t), 255 * (1 - t)
    else:
        t = abs(t)
        r, g, b = 255 * (1 - t), 255 * (1 - 0.6 * t), 255
    return f"rgb({r:.0f},{g:.0f},{b:.0f})"


def heatmaps(
    panels: Mapping[str, np.ndarray],
    x_edges: Sequence[float],
    y_edges: Sequence[float],
    xlabel: str = "",
    ylabel: str = "",
    diverging: bool = False,
    cell: int = 6,
) -> str:
    """Side-by-side heat maps of 2D arrays ``(len(x_edges) - 1, len(y_edges) - 1)``, one colour scale.

    ``panel[i, j]`` is the cell between ``x_edges[i:i + 2]`` (horizontal) and ``y_edges[j:j + 2]`` (vertical,
    growing upwards). Sequential scale (white to blue, 0 to the maximum over panels) or, with ``diverging``,
    symmetric around 0 (blue negative, red positive, up to the largest absolute value).

    Args:
        panels: ``{title: 2D array}``, all of the same shape.
        x_edges, y_edges: bin edges of the two axes.
        xlabel, ylabel: axis labels.
        diverging: use the symmetric blue-white-red scale.
        cell: size of one cell in pixels.
    """
    arrays = [np.asarray(a, dtype=float) for a in panels.values()]
    nx, ny = len(x_edges) - 1, len(y_edges) - 1
    if any(a.shape != (nx, ny) for a in arrays):
        raise ValueError(f"every panel must have shape {(nx, ny)}, got {[a.shape for a in arrays]}")
    vmax = max((float(np.nanmax(np.abs(a))) for a in arrays if a.size), default=1.0)
    pw, ph = nx * cell, ny * cell
    width = _LEFT + len(arrays) * (pw + _LEFT) + 20
    height = _TOP + ph + _BOTTOM + 30
    body: list[str] = []
    for k, (title, a) in enumerate(zip(panels, arrays, strict=True)):
        left = _LEFT + k * (pw + _LEFT)
        ax = _Axes(left, _TOP, pw, ph, (x_edges[0], x_edges[-1]), (y_edges[0], y_edges[-1]))
        for i in range(nx):
            for j in range(ny):
                if a[i, j] == 0:
                    continue
                x, y = ax.x(x_edges[i]), ax.y(y_edges[j + 1])
                fill = _colour(a[i, j], vmax, diverging)
                body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{cell}" height="{cell}" fill="{fill}"/>')
        body += ax.frame(xlabel, ylabel if k == 0 else "", title, grid=False)
    lo = f"-{_fmt(vmax)} (blue) to {_fmt(vmax)} (red)" if diverging else f"0 (white) to {_fmt(vmax)} (blue)"
    scale = f"colour scale: {lo}"
    body.append(_text(_LEFT, height - 8, scale, "start", size=10))
    return _document(width, height, body)


def save(svg: str, path: str | os.PathLike) -> Path:
    """Write ``svg`` to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(svg)
    return path
