"""Post-merge quantizers as plug-ins (like merge/registry.py): ``rtn``, ``gptq`` and ``epmq``.

A method is a class with a ``name``, a ``Params`` dataclass (its parameters, with defaults, checked on
construction) and ``target(...)``: from a layer's calibration moments, the target weight ``W*`` and Hessian ``H``
that its solver then puts on the grid (``solver``: ``gptq`` or ``rtn``). ``@pmq_method("name")`` registers one;
``get_pmq_method("name", **params)`` builds it. The sequential driver (pmq/sequential.py) names no method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.pmq.objective import Target, TaskMoments, anchored_target
from hdrq_lightning.registry import Registry, checked_params

PMQ_METHODS: Registry = Registry("post-merge method")  # name -> PmqMethod subclass


@dataclass
class GptqParams:
    """GPTQ's solver settings (the reference's defaults): columns per lazy block, damping relative to mean diag H,
    act-order, Cholesky retries at x10 damping before falling back to round-to-nearest."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False
    damp_retries: int = 2

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} must be a positive number of columns.")
        if self.damp < 0 or self.damp_retries < 0:
            raise ConfigError(f"damp={self.damp} and damp_retries={self.damp_retries} must be >= 0.")


class PmqMethod:
    """Base of the post-merge quantizers."""

    name: ClassVar[str]
    Params: ClassVar[type]
    solver: ClassVar[str] = "gptq"
    needs_statistics: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        self.params = checked_params(self.Params, params, PMQ_METHODS.kind, self.name)

    @property
    def affine(self) -> bool:
        return bool(getattr(self.params, "affine", False))

    @property
    def input_mix(self) -> float:
        return float(getattr(self.params, "input_mix", 0.0))

    @property
    def gptq(self) -> GptqParams:
        p = self.params
        return GptqParams(p.block_size, p.damp, p.act_order, p.damp_retries)

    def target(self, moments: list[TaskMoments], experts: list[Tensor], merged: Tensor, anchor: Tensor) -> Target:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


def pmq_method(name: str):
    """Class decorator that registers a :class:`PmqMethod` under ``name``."""
    return PMQ_METHODS.register(name)


def get_pmq_method(name: str, **params: Any) -> PmqMethod:
    return PMQ_METHODS.build(name, **params)


@pmq_method("rtn")
class RoundToNearest(PmqMethod):
    """Round-to-nearest of the merged weights on their min-max (or MSE) grid: no calibration statistics."""

    solver = "rtn"
    needs_statistics = False

    @dataclass
    class Params:
        pass


@pmq_method("gptq")
class Gptq(PmqMethod):
    """GPTQ on the merged model (the PMQ baseline): targets are the merged layer's own output on the deployed
    input of every task, pooled (W* = W_m, H = the pooled second moment), no anchor."""

    @dataclass
    class Params(GptqParams):
        pass

    def target(self, moments: list[TaskMoments], experts: list[Tensor], merged: Tensor, anchor: Tensor) -> Target:
        return anchored_target(moments, experts, merged, anchor, alpha=0.0, beta=0.0, strength=0.0,
                               weighting="tokens")


@pmq_method("epmq")
class Epmq(PmqMethod):
    """E-PMQ: expert-guided targets with merged-weight anchoring, solved by GPTQ (pmq/objective.py).

    ``input_mix`` (alpha): share of the expert's own features in the target input (0: expert weights on the
    deployed input; FeatCal uses 0.25); ``affine``: bias fitted with the weights; ``anchor_space``: ``weight``
    (mu ||Q - A||^2, the paper's wording) or ``output`` (targets blended with the merged layer's own output,
    weight ``expert_share``; 0 is GPTQ); ``anchor_strength`` (mu; ``inf`` rounds the anchor); ``anchor_scale``:
    mu relative to mean diag H or absolute (FeatCal's lambda); ``token_aware``: mu x max(1, columns / tokens);
    ``anchor_blend`` (rho): A = W_base + rho (W_merged - W_base), 1 = the merged weights (FeatCal: 2.2);
    ``task_weighting``: frobenius (FeatCal), uniform or tokens.
    """

    @dataclass
    class Params(GptqParams):
        input_mix: float = 0.25
        affine: bool = True
        anchor_space: str = "weight"
        anchor_strength: float = 1.0
        anchor_scale: str = "relative"
        token_aware: bool = False
        anchor_blend: float = 1.0
        expert_share: float = 0.5
        task_weighting: str = "frobenius"

        def __post_init__(self) -> None:
            super().__post_init__()
            try:  # Hydra passes `inf` as a float; YAML's `.inf` may arrive as a string
                self.anchor_strength = float(str(self.anchor_strength).lstrip(".") if isinstance(
                    self.anchor_strength, str) else self.anchor_strength)
            except ValueError:
                raise ConfigError(f"anchor_strength={self.anchor_strength!r} is not a number (inf: round the "
                                  "anchor).") from None
            if not 0.0 <= self.input_mix <= 1.0:
                raise ConfigError(f"input_mix={self.input_mix} must lie in [0, 1] (0: expert weights on the "
                                  "deployed input, 1: the experts' own features).")
            if not 0.0 <= self.expert_share <= 1.0:
                raise ConfigError(f"expert_share={self.expert_share} must lie in [0, 1] (0 is GPTQ).")
            if self.anchor_strength < 0 or math.isnan(self.anchor_strength):
                raise ConfigError(f"anchor_strength={self.anchor_strength} must be >= 0 (0: no anchor, .inf: "
                                  "round-to-nearest of the anchor).")
            for key, value, choices in (("anchor_space", self.anchor_space, ("weight", "output")),
                                        ("anchor_scale", self.anchor_scale, ("relative", "absolute")),
                                        ("task_weighting", self.task_weighting, ("frobenius", "uniform", "tokens"))):
                if value not in choices:
                    raise ConfigError(f"{key}={value!r} is unknown; use one of {list(choices)}.")

    @property
    def beta(self) -> float:
        return 1.0 if self.params.anchor_space == "weight" else self.params.expert_share

    def target(self, moments: list[TaskMoments], experts: list[Tensor], merged: Tensor, anchor: Tensor) -> Target:
        p = self.params
        return anchored_target(moments, experts, merged, anchor, alpha=p.input_mix, beta=self.beta,
                               strength=p.anchor_strength, scale=p.anchor_scale, token_aware=p.token_aware,
                               weighting=p.task_weighting)
