"""Analysis of merge-friendliness: error barriers, loss surfaces and the figures that show them."""

from hdrq_lightning.analysis.barrier import BarrierCurve, error_barrier, interpolate_states, state_evaluator
from hdrq_lightning.analysis.plots import (
    plot_barrier_curves,
    plot_loss_surface,
    plot_method_comparison,
    plot_pmq_anchor,
    plot_sample_distribution,
)
from hdrq_lightning.analysis.surface import filter_normalized_direction, loss_surface

__all__ = [
    "BarrierCurve",
    "error_barrier",
    "filter_normalized_direction",
    "interpolate_states",
    "loss_surface",
    "plot_barrier_curves",
    "plot_loss_surface",
    "plot_method_comparison",
    "plot_pmq_anchor",
    "plot_sample_distribution",
    "state_evaluator",
]
