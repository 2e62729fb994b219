"""The block-reconstruction engine (BRECQ, QDrop and HDRQ are recipes of it), split by concern:

- ``plan.py``: the units x passes of a recipe as ranges of global iterations;
- ``phases.py``: entering and leaving a unit (its cache from the unit walker, quantizer modes, param groups);
- ``step.py``: a step's batch (QDrop mixing per input), loss and update, compiled on the fast path;
- ``graphs.py``: the whole step captured in one CUDA graph per unit and mode;
- ``rounding.py``: weight rounding plug-ins (AdaRound, latent weights, nearest);
- ``module.py``: the LightningModule shell (state, Lightning hooks, checkpoints).

The unit walker (``quant/walker.py``) and the caches (``quant/cache.py``) are public: sequential GPTQ uses them too.
"""

from hdrq_lightning.quant.engine.module import ReconstructionModule
from hdrq_lightning.quant.engine.plan import Phase, build_plan
from hdrq_lightning.quant.engine.rounding import ROUNDINGS, Rounding, rounding_plugin

__all__ = ["ROUNDINGS", "Phase", "ReconstructionModule", "Rounding", "build_plan", "rounding_plugin"]
