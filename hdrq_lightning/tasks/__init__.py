"""Tasks: what evaluation, analysis and the report need to know about the problem a model solves."""

from hdrq_lightning.tasks.classification import ClassificationTask
from hdrq_lightning.tasks.segmentation import SegmentationTask

__all__ = ["ClassificationTask", "SegmentationTask"]
