"""The figures of the reports, drawn with matplotlib: line plots, grouped box plots, heat maps.

matplotlib is an optional extra of the package (``pip install "ran-bundle[figures]"``); it is imported when a
figure is drawn, so the scripts that import this module run without it as long as they draw nothing
(:func:`available` tells). Each drawing function returns a :class:`matplotlib.figure.Figure` (no pyplot, no
global state); :func:`save` writes it as SVG or PNG after the file's suffix, with the text kept as text in SVG
and without a date, so that a figure regenerated from the same numbers is the same file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["INSTALL_HINT", "available", "line_plot", "box_plot", "heatmaps", "save"]

INSTALL_HINT = "the figures need matplotlib: pip install 'ran-bundle[figures]' (or matplotlib==3.11.2)"
_LINESTYLES = ("-", "--", ":", "-.")


def available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return Figure(figsize=(width, height), layout="constrained")


def _colour(i: int) -> str:
    return f"C{i % 10}"


def line_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    step: bool = False,
) -> Figure:
    """One line per named series ``{name: (x, y)}``, with a legend; values that are not finite are skipped.

    Args:
        series: ``{name: (x values, y values)}`` of equal lengths.
        xlabel, ylabel, title: axis labels and title.
        step: draw a staircase (value held until the next x), as for piecewise-constant functions.
    """
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot()
    for i, (name, (x, y)) in enumerate(series.items()):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        style = {"color": _colour(i), "linestyle": _LINESTYLES[i % len(_LINESTYLES)], "label": name}
        ax.plot(x[keep], y[keep], drawstyle="steps-post" if step else "default", linewidth=1.8, **style)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, color="#eeeeee")
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return fig


def box_plot(groups: Mapping[str, Mapping[str, Sequence[float]]], ylabel: str = "", title: str = "") -> Figure:
    """Grouped box plots: one group per key of ``groups`` (e.g. a label), one box per series inside it (e.g. a model).

    A box spans the quartiles with a line at the median; whiskers reach the most extreme values within 1.5 IQR of
    the box, and every value is drawn as a dot (useful when there are few samples). Values that are not finite
    are skipped; a series without values in a group has no box there.

    Args:
        groups: ``{group: {series: values}}``; series keep their first-seen order and colour across groups.
        ylabel, title: axis label and title.
    """
    names: list[str] = []
    for g in groups.values():
        names.extend(n for n in g if n not in names)
    slot = len(names) + 1  # one empty slot between groups
    fig = _figure(max(6.0, 0.22 * slot * len(groups) + 3.0), 4.2)
    ax = fig.add_subplot()
    for gi, g in enumerate(groups.values()):
        for si, name in enumerate(names):
            vals = np.asarray([v for v in g.get(name, []) if np.isfinite(v)], dtype=float)
            if vals.size == 0:
                continue
            x, c = gi * slot + si, _colour(si)
            ax.boxplot(
                vals,
                positions=[x],
                widths=0.7,
                whis=1.5,
                showfliers=False,
                patch_artist=True,
                boxprops={"facecolor": c, "alpha": 0.35, "edgecolor": c},
                medianprops={"color": c, "linewidth": 2},
                whiskerprops={"color": c},
                capprops={"color": c},
            )
            ax.plot(np.full(vals.size, x), vals, "o", color=c, markersize=2.5)
    ax.set_xticks([gi * slot + (len(names) - 1) / 2 for gi in range(len(groups))], list(groups))
    ax.set_xlim(-1, slot * len(groups) - 1)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", color="#eeeeee")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_colour(i), alpha=0.6, label=n) for i, n in enumerate(names)]
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return fig


def heatmaps(
    panels: Mapping[str, np.ndarray],
    x_edges: Sequence[float],
    y_edges: Sequence[float],
    xlabel: str = "",
    ylabel: str = "",
    diverging: bool = False,
    value_label: str = "",
) -> Figure:
    """Side-by-side heat maps of 2D arrays ``(len(x_edges) - 1, len(y_edges) - 1)`` on one colour scale.

    ``panel[i, j]`` is the cell between ``x_edges[i:i + 2]`` (horizontal) and ``y_edges[j:j + 2]`` (vertical,
    growing upwards). Sequential scale (white to blue, 0 to the maximum over panels) or, with ``diverging``,
    symmetric around 0 (blue negative, red positive, up to the largest absolute value).

    Args:
        panels: ``{title: 2D array}``, all of the same shape.
        x_edges, y_edges: bin edges of the two axes.
        xlabel, ylabel: axis labels.
        diverging: use the symmetric blue-white-red scale.
        value_label: label of the colour bar.
    """
    arrays = [np.asarray(a, dtype=float) for a in panels.values()]
    nx, ny = len(x_edges) - 1, len(y_edges) - 1
    if any(a.shape != (nx, ny) for a in arrays):
        raise ValueError(f"every panel must have shape {(nx, ny)}, got {[a.shape for a in arrays]}")
    vmax = max((float(np.nanmax(np.abs(a))) for a in arrays if a.size), default=1.0) or 1.0
    scale = {"cmap": "RdBu_r", "vmin": -vmax, "vmax": vmax} if diverging else {"cmap": "Blues", "vmin": 0, "vmax": vmax}
    fig = _figure(3.2 * len(arrays) + 1.2, 3.6)
    axes = fig.subplots(1, len(arrays), squeeze=False, sharey=True)[0]
    mesh = None
    for k, (ax, title, a) in enumerate(zip(axes, panels, arrays, strict=True)):
        mesh = ax.pcolormesh(np.asarray(x_edges), np.asarray(y_edges), a.T, **scale)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel if k == 0 else "")
    if mesh is not None:
        fig.colorbar(mesh, ax=list(axes), shrink=0.9, label=value_label)
    return fig


def save(fig: Figure, path: str | os.PathLike) -> Path:
    """Write ``fig`` to ``path`` (SVG or PNG after the suffix; parent folders created) and return the path."""
    import matplotlib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"Date": None} if path.suffix.lower() == ".svg" else None
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "ran-bundle"}):
        fig.savefig(path, dpi=150, metadata=metadata)
    return path
