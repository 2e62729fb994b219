"""Metrics with count states (summed across processes): per-domain accuracy and mIoU, harmonic means."""

from hdrq_lightning.metrics.accuracy import MultiDomainAccuracy, harmonic_mean, harmonic_mean_tensor
from hdrq_lightning.metrics.segmentation import MultiDomainMeanIoU, segmentation_miou

__all__ = [
    "MultiDomainAccuracy",
    "MultiDomainMeanIoU",
    "harmonic_mean",
    "harmonic_mean_tensor",
    "segmentation_miou",
]
