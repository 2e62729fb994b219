"""Callbacks that own the cross-cutting parts of block reconstruction."""

from hdrq_lightning.callbacks.distance import DistanceRegularizer
from hdrq_lightning.callbacks.noise_switch import NoiseToFakeQuantSwitch
from hdrq_lightning.callbacks.schedules import CosineWarmup

__all__ = ["CosineWarmup", "DistanceRegularizer", "NoiseToFakeQuantSwitch"]
