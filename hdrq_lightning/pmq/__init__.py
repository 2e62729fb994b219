"""Post-merge quantization: GPTQ and E-PMQ on a merged model (gptq.py: the solver; objective.py: moments and the
anchored target; methods.py: the method plug-ins; sequential.py: the forward-order driver). nn.MultiheadAttention
reaches it with callable projections (models/attention.py, applied by models/build.py)."""

from hdrq_lightning.pmq.gptq import GptqInfo, Grid, gptq_quantize, round_to_nearest
from hdrq_lightning.pmq.methods import PMQ_METHODS, PmqMethod, get_pmq_method, pmq_method
from hdrq_lightning.pmq.objective import TaskMoments, anchored_target, layer_rows
from hdrq_lightning.pmq.sequential import PostMergeQuantizer

__all__ = ["GptqInfo", "Grid", "PMQ_METHODS", "PmqMethod", "PostMergeQuantizer", "TaskMoments", "anchored_target",
           "get_pmq_method", "gptq_quantize", "layer_rows", "pmq_method", "round_to_nearest"]
