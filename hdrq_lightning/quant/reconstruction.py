"""The reconstruction engine lives in ``quant/engine/``; this module keeps the old import path working."""

from hdrq_lightning.quant.engine import Phase, ReconstructionModule, build_plan

__all__ = ["Phase", "ReconstructionModule", "build_plan"]
