"""Figures of the analysis: barrier curves, loss surfaces, merge-sample distributions, method comparison.

Figures are drawn on a bare Agg canvas (no pyplot, no global backend switch) and written atomically:
a temporary file in the target folder is renamed over the target, so a crash never leaves half a PNG.
"""

from __future__ import annotations

import math
import os
import textwrap
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hdrq_lightning.analysis.barrier import BarrierCurve
from hdrq_lightning.errors import ConfigError

REFERENCE_METHOD = "FP"


def _set_title(axes: Axes, title: str, width: int = 56) -> None:
    """A title wrapped to the figure's width (a long one would be clipped at the edges)."""
    axes.set_title(textwrap.fill(title, width), fontsize=10)


def _save_png(
    draw: Callable[[Figure, Axes], None], path: str | os.PathLike, size: tuple[float, float]
) -> Path:
    """Draw on a fresh figure and write it to ``path`` as PNG through a temporary file and os.replace."""
    target = Path(path)
    if target.suffix.lower() != ".png":
        raise ConfigError(f"Plots are written as PNG; give a path ending in .png, got '{target}'.")
    target.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(figure)
    draw(figure, figure.add_subplot())
    # A unique name opened with "xb" (not mkstemp) so the PNG gets the usual umask permissions, not 0600.
    temporary = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "xb") as stream:
            figure.savefig(stream, format="png", dpi=150)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return target


def plot_barrier_curves(
    curves: Mapping[str, BarrierCurve], path: str | os.PathLike, title: str = "", metric: str = "loss",
    loss_name: str = "test cross-entropy",
) -> Path:
    """One line per method along the interpolation coefficient; each label carries the method's barrier."""
    if metric not in ("loss", "accuracy"):
        raise ConfigError(f"metric must be 'loss' or 'accuracy', got '{metric}'.")
    if not curves:
        raise ConfigError("No barrier curves to plot; pass at least one {method: BarrierCurve}.")
    for name, curve in curves.items():
        if metric == "accuracy" and curve.accuracies is None:
            raise ConfigError(f"Curve '{name}' has no accuracies; plot metric='loss' or evaluate accuracies.")

    def draw(figure: Figure, axes: Axes) -> None:
        for name, curve in curves.items():
            values = curve.losses if metric == "loss" else curve.accuracies
            axes.plot(curve.lambdas, values, marker="o", label=f"{name} (barrier {curve.barrier:.3g})")
        axes.set_xlabel(r"interpolation coefficient $\lambda$")
        axes.set_ylabel(loss_name if metric == "loss" else "accuracy (%)")
        _set_title(axes, title)
        axes.grid(alpha=0.3)
        axes.legend()

    return _save_png(draw, path, size=(6.0, 4.0))


def plot_loss_surface(
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray,
    losses: Sequence[Sequence[float]] | np.ndarray,
    path: str | os.PathLike,
    title: str = "",
    value_range: tuple[float, float] | None = None,
) -> Path:
    """Filled contours and contour lines of ``losses[i, j]`` at ``(alphas[i], betas[j])``; the center is starred.

    ``value_range`` fixes the colour scale (e.g. the range over several methods' surfaces, so that their plots can
    be compared by colour); default: this surface's own range.
    """
    x_coords = np.asarray(alphas, dtype=np.float64)
    y_coords = np.asarray(betas, dtype=np.float64)
    grid = np.ma.masked_invalid(np.asarray(losses, dtype=np.float64))
    if grid.shape != (x_coords.size, y_coords.size):
        raise ConfigError(
            f"losses has shape {grid.shape} but the grid is {x_coords.size} x {y_coords.size}; "
            "pass the three outputs of loss_surface unchanged."
        )
    if grid.count() == 0:
        raise ConfigError(
            "Every loss on the grid is NaN or infinite; shrink span or check the evaluated model."
        )
    low, high = (float(grid.min()), float(grid.max())) if value_range is None else map(float, value_range)
    levels = np.linspace(low, high, 21) if high > low else np.array([low - 0.5, low + 0.5])

    def draw(figure: Figure, axes: Axes) -> None:
        filled = axes.contourf(x_coords, y_coords, grid.T, levels=levels, cmap="viridis", extend="both")
        if high > low:
            lines = axes.contour(
                x_coords, y_coords, grid.T, levels=levels[::2], colors="black", linewidths=0.6
            )
            axes.clabel(lines, fontsize=6, fmt="%.3g")
        figure.colorbar(filled, ax=axes, label="loss")
        axes.plot([0.0], [0.0], marker="*", color="red", markersize=12, linestyle="none")
        axes.set_xlabel(r"direction x ($\alpha$)")
        axes.set_ylabel(r"direction y ($\beta$)")
        axes.xaxis.set_major_locator(MaxNLocator(5))
        axes.yaxis.set_major_locator(MaxNLocator(5))
        _set_title(axes, title)

    return _save_png(draw, path, size=(5.5, 4.5))


def plot_sample_distribution(
    samples: Mapping[str, Sequence[float]], path: str | os.PathLike, title: str = ""
) -> Path:
    """Histograms on shared bins of merged harmonic-mean accuracy over noise samples (paper Fig. 3)."""
    groups = {name: np.asarray(values, dtype=np.float64) for name, values in samples.items()}
    if not groups or any(values.size == 0 for values in groups.values()):
        raise ConfigError(
            "Every sample group needs at least one value, e.g. {'random sample': [61.2, 60.8]}."
        )
    edges = np.histogram_bin_edges(np.concatenate(list(groups.values())), bins="auto")

    def draw(figure: Figure, axes: Axes) -> None:
        for name, values in groups.items():
            label = f"{name} (mean {values.mean():.2f}, n={values.size})"
            patches = axes.hist(values, bins=edges, alpha=0.45, label=label)[2]
            axes.axvline(values.mean(), color=patches[0].get_facecolor(), alpha=1.0, linestyle="--")
        axes.set_xlabel("merged harmonic mean")
        axes.set_ylabel("number of samples")
        _set_title(axes, title)
        # below the axes: inside, it covers the tallest bars
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1, fontsize=8, frameon=False)

    return _save_png(draw, path, size=(6.0, 4.6))


def _comparison_table(rows: Sequence[Mapping]) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """Methods and bit configs in order of first appearance, and the hmean of each (method, bits) pair."""
    methods: list[str] = []
    bit_configs: list[str] = []
    table: dict[tuple[str, str], float] = {}
    for row in rows:
        if not {"method", "bits", "hmean"} <= set(row):
            raise ConfigError(
                f"Row {dict(row)} lacks 'method', 'bits' or 'hmean'; give all three in every row."
            )
        method, bits = str(row["method"]), str(row["bits"])
        if (method, bits) in table:
            raise ConfigError(f"Method '{method}' appears twice for bits '{bits}'; keep one row per pair.")
        table[(method, bits)] = float(row["hmean"])
        if method not in methods:
            methods.append(method)
        if method != REFERENCE_METHOD and bits not in bit_configs:
            bit_configs.append(bits)
    return methods, bit_configs, table


def plot_method_comparison(rows: Sequence[Mapping], path: str | os.PathLike, title: str = "") -> Path:
    """Grouped bars of merged harmonic mean: one group per bit config, one bar per method, FP as a line."""
    methods, bit_configs, table = _comparison_table(rows)
    reference = {value for (method, _), value in table.items() if method == REFERENCE_METHOD}
    if len(reference) > 1:
        raise ConfigError(f"The '{REFERENCE_METHOD}' rows disagree ({sorted(reference)}); give one FP value.")
    reference_value = reference.pop() if reference else None
    quantized = [method for method in methods if method != REFERENCE_METHOD]
    if not quantized or not bit_configs:
        raise ConfigError(
            "No quantized method rows to plot; add rows like {'method': 'HDRQ', 'bits': 'W4A4', ...}."
        )

    def draw(figure: Figure, axes: Axes) -> None:
        width = 0.8 / len(quantized)
        positions = np.arange(len(bit_configs))
        for index, method in enumerate(quantized):
            heights = [table.get((method, bits), math.nan) for bits in bit_configs]
            bars = axes.bar(
                positions + (index - (len(quantized) - 1) / 2) * width, heights, width, label=method
            )
            labels = ["" if math.isnan(height) else f"{height:.2f}" for height in heights]
            axes.bar_label(bars, labels=labels, fontsize=7)
        if reference_value is not None:
            axes.axhline(
                reference_value,
                color="black",
                linestyle="--",
                linewidth=1.0,
                label=f"{REFERENCE_METHOD} ({reference_value:.2f})",
            )
        tallest = max([value for value in table.values() if not math.isnan(value)], default=1.0)
        axes.set_ylim(0.0, 1.12 * tallest)
        axes.set_xticks(positions, bit_configs)
        axes.set_xlabel("bit width (W/A)")
        axes.set_ylabel("merged harmonic mean")
        _set_title(axes, title)
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))

    return _save_png(draw, path, size=(max(6.0, 1.6 * len(bit_configs) + 3.5), 4.0))


def plot_pmq_anchor(curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike,
                    references: Mapping[str, Mapping[str, float]] | None = None, title: str = "") -> Path:
    """E-PMQ's mean accuracy against the anchor strength mu, one line per merge method, on a log axis; mu = 0 and
    mu = inf (round-to-nearest of the anchor) drawn at the two ends and labelled. ``references``: per merge
    method, horizontal lines (e.g. {"FP merge": 53.1, "GPTQ": 52.7})."""
    if not curves or not any(curves.values()):
        raise ConfigError("No anchor-sweep points to plot; give {merge method: [(mu, accuracy), ...]}.")
    finite = sorted({mu for points in curves.values() for mu, _ in points if 0 < mu < math.inf})
    low = finite[0] / 10 if finite else 0.01
    high = finite[-1] * 10 if finite else 100.0

    def position(mu: float) -> float:
        return low if mu == 0 else high if math.isinf(mu) else mu

    def draw(figure: Figure, axes: Axes) -> None:
        colours = [f"C{i}" for i in range(10)]
        for index, (merge, points) in enumerate(curves.items()):
            colour = colours[index % len(colours)]
            ordered = sorted(points, key=lambda p: position(p[0]))
            axes.plot([position(mu) for mu, _ in ordered], [acc for _, acc in ordered], marker="o", color=colour,
                      label=f"E-PMQ, {merge}")
            for style, (name, value) in zip(("--", ":", "-."), (references or {}).get(merge, {}).items()):
                axes.axhline(value, color=colour, linestyle=style, linewidth=1.0, label=f"{name}, {merge} ({value:.2f})")
        axes.set_xscale("log")
        ticks = [low, *finite, high]
        axes.set_xticks(ticks, ["0", *[f"{mu:g}" for mu in finite], "inf\n(RTN)"])
        axes.set_xlabel("anchor strength mu (relative to mean diag H)")
        axes.set_ylabel("mean accuracy over targets (%)")
        _set_title(axes, title)
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)

    return _save_png(draw, path, size=(9.0, 4.2))
