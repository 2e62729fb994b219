"""Merge plug-ins: weighted mean, Task Arithmetic, TIES and the HDRQ merge of quantized experts.

``get_merge_method(name, **params).merge(experts, base=None, weights=None)`` works on flat state
dicts; importing this package registers every built-in method in ``MERGE_METHODS``.
"""

from hdrq_lightning.merge.average import MeanMerge, average_states, merge_batch_norm_buffers
from hdrq_lightning.merge.quantized import (
    QuantizedLayout,
    QuantizedMerge,
    dequantize_state,
    quantized_layout,
)
from hdrq_lightning.merge.registry import MERGE_METHODS, MergeMethod, get_merge_method, merge_method
from hdrq_lightning.merge.task_vectors import (
    TaskArithmeticMerge,
    TiesMerge,
    disjoint_merge,
    keep_top_magnitudes,
)

__all__ = [
    "MERGE_METHODS",
    "MeanMerge",
    "MergeMethod",
    "QuantizedLayout",
    "QuantizedMerge",
    "TaskArithmeticMerge",
    "TiesMerge",
    "average_states",
    "dequantize_state",
    "disjoint_merge",
    "get_merge_method",
    "keep_top_magnitudes",
    "merge_batch_norm_buffers",
    "merge_method",
    "quantized_layout",
]
