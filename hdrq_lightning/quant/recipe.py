"""The numbers that make BRECQ, QDrop and HDRQ presets of one reconstruction engine.

MQBench's observation: input_quant_prob = 1.0 is BRECQ's input, 0.5 is QDrop's mixing. HDRQ = QDrop's mixing and
in-block drop + latent float weights with a learnable step + noise-based quantization + distance regulariser.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant.cache import check_cache_device
from hdrq_lightning.quant.modules import QuantConfig

PASSES = ("joint", "weights", "activations")
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _matches(value: Any, annotation: str) -> bool:
    """Whether ``value`` is of the dataclass field's simple type (``float | None`` allows None; ints are floats)."""
    kinds = [part.strip() for part in annotation.split("|")]
    if value is None:
        return "None" in kinds
    if isinstance(value, bool):
        return "bool" in kinds
    if isinstance(value, int):
        return "int" in kinds or "float" in kinds
    if isinstance(value, float):
        return "float" in kinds
    if isinstance(value, str):
        return "str" in kinds
    return not any(kind in _TYPE_NAMES for kind in kinds)  # lists, tuples and nested recipes: checked elsewhere


def check_field_types(obj: Any, prefix: str) -> None:
    """Raise ConfigError naming the key when a field of simple type got a value of another (e.g. w_bits=abc)."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(f.type, str) and not _matches(value, f.type):
            expected = " or ".join(_TYPE_NAMES.get(k.strip(), k.strip()) for k in f.type.split("|"))
            raise ConfigError(f"{prefix}.{f.name}={value!r} is not {expected}; e.g. {prefix}.{f.name}="
                              f"{f.default if f.default is not MISSING else '...'}.")
def plain_overrides(value: Any, key: str) -> list[dict]:
    """``quant.overrides`` / ``pmq.overrides`` from Hydra (lists of DictConfigs) as plain lists of dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{key}={value!r} must be a list of {{modules: <pattern>, <field>: <value>}} entries.")
    return [dict(entry) if isinstance(entry, dict) else entry for entry in value]


ROUNDINGS = ("adaround", "latent", "nearest")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


@dataclass
class WeightRecipe:
    rounding: str = "adaround"        # adaround (BRECQ/QDrop) | latent (HDRQ: train float weights) | nearest
    per_channel: bool = True
    symmetric: bool = False
    learn_scale: bool = False         # HDRQ learns the weight step
    lr: float = 1e-3                  # AdaRound alpha / latent weights
    scale_lr: float = 1e-4
    schedule: str = "constant"

    def __post_init__(self) -> None:
        check_field_types(self, "quant.weight")


@dataclass
class ActivationRecipe:
    learn_scale: bool = True          # LSQ step
    lr: float = 4e-5
    schedule: str = "cosine"

    def __post_init__(self) -> None:
        check_field_types(self, "quant.activation")


@dataclass
class NoiseRecipe:
    enabled: bool = False
    distribution: str = "histogram"   # histogram (official code) | uniform (paper's U[-1/2, 1/2])
    fakequant_iters: int = 3500       # final iterations with real fake-quant, at reference_iters iterations;
    reference_iters: int = 20000      # scaled proportionally for other iteration counts
    weights: bool = True
    activations: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "quant.noise")

    def switch_iteration(self, iters: int) -> int:
        """Iteration (0-based, within a block) from which fake-quant replaces noise."""
        fakequant = self.fakequant_iters if iters == self.reference_iters else \
            round(self.fakequant_iters * iters / self.reference_iters)
        return max(0, iters - fakequant)


@dataclass
class Runtime:
    """How the engine runs, not what it computes: none of these enter the checkpoint's recipe check."""

    compile: bool = False             # torch.compile (Inductor) each unit's loss: fused quantizer kernels
    compile_ahead: bool = True        # with compile on CUDA: a worker process compiles the next units' graphs
    cuda_graphs: bool = False         # capture the whole step (batch, loss, backward, Adam) in one CUDA graph
    graph_warmup: int = 3             # eager steps of each unit and mode before its graph is captured
    channels_last: bool = False       # NHWC caches and weights (tensor-core friendly convolutions)
    tf32: bool | None = None          # null: torch's defaults, as the official code runs (TF32 convolutions,
                                      # FP32 matmuls); true: TF32 for both; false: strict FP32 for both
    bf16: bool = False                # bfloat16 autocast of the unit's convolutions (quantizers stay fp32)
    fused_optimizer: bool = True      # fused Adam on CUDA
    adam_kernel: bool = True          # captured steps: Adam by a per-tensor Triton kernel (all SMs busy on small
                                      # units); false: torch's fused Adam there too
    mask_kernel: bool | None = None   # CUDA: QDrop's drop masks and input mixing by Triton kernels (4 elements per
                                      # Philox call; same distribution, other draws); false: torch.rand(...) < p;
                                      # null: the kernels where the step is captured (cuda_graphs), torch's masks
                                      # elsewhere (an uncaptured step is host-bound: a Triton launch from Python
                                      # costs more host time than the draw it saves). Resolved when built.
    steps_per_batch: int = 1          # engine iterations per Lightning batch (amortises the loop's overhead)
    cache_device: str = "auto"        # unit caches: auto (GPU within the budget, else pinned host) | device | host
    cache_budget_gib: float | None = None  # GPU memory the caches may use; null: 60% of the free memory
    log_every: int = 25               # iterations between logged losses (each log is a device sync)
    compile_bundles: str | None = None  # with compile: a folder of portable compile bundles, loaded before the
                                      # engine compiles, this run's added when it ends (callbacks/compile_bundles.py)

    def __post_init__(self) -> None:
        check_field_types(self, "quant.runtime")
        check_cache_device(self.cache_device)
        if self.compile_bundles is not None and Path(self.compile_bundles).expanduser().is_file():
            raise ConfigError(f"quant.runtime.compile_bundles={self.compile_bundles!r} is a file; give a folder "
                              "(its *.bin bundles are loaded, this run's is added to it).")
        if self.mask_kernel is None:  # resolved here, not per use: a copy with cuda_graphs off (the compile-ahead
            self.mask_kernel = self.cuda_graphs  # worker's twin) keeps compiling the engine's graphs
        for name in ("steps_per_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quant.runtime.{name} must be a positive integer.")
        if self.graph_warmup < 1:
            raise ConfigError("quant.runtime.graph_warmup must be at least 1 (optimizer state is created eagerly).")

    def apply_precision(self) -> None:
        """Set this process's TF32 switches as ``tf32`` says (null leaves torch's, i.e. the process's, settings)."""
        if self.tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Runtime:
        cfg = dict(cfg or {})
        known = {f.name for f in fields(cls)}
        if set(cfg) - known:
            raise ConfigError(f"unknown keys {sorted(set(cfg) - known)} in quant.runtime; valid: {sorted(known)}.")
        return cls(**cfg)


@dataclass
class Recipe:
    method: str = "hdrq"
    w_bits: int = 4
    a_bits: int = 4
    iters: int = 20000                # per block (per pass for BRECQ's weight pass)
    act_iters: int = 5000             # BRECQ's activation pass
    batch_size: int = 32
    passes: list[str] = field(default_factory=lambda: ["joint"])
    input_quant_prob: float = 0.5     # P(block input element comes from the quantized prefix): 1 BRECQ, 0.5 QDrop
    drop_prob: float = 0.5            # P(in-block activation element stays FP) during reconstruction
    adaround_reg_weight: float = 0.01
    adaround_beta: tuple[float, float] = (20.0, 2.0)
    adaround_warmup: float = 0.2
    warmup_fraction: float = 0.2      # linear warmup share of warmup_cosine schedules
    distance_weight: float = 0.0      # HDRQ: lambda of lambda * sum ||W - W_source||
    first_last_8bit: bool = True
    init_search: str = "mse"
    checkpoint_every: int = 500       # iterations between checkpoints (Lightning epochs of the engine)
    units: str = "layer"              # unit granularity of models that offer two (layer: official, block: coarser)
    overrides: list[dict] = field(default_factory=list)  # per-module numerics exceptions (QuantConfig.overrides)
    weight: WeightRecipe = field(default_factory=WeightRecipe)
    activation: ActivationRecipe = field(default_factory=ActivationRecipe)
    noise: NoiseRecipe = field(default_factory=NoiseRecipe)

    def __post_init__(self) -> None:
        check_field_types(self, "quant")
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 8:
                raise ConfigError(f"quant.{name}={bits} is out of range; use a bit width from 2 to 8.")
        if not set(self.passes) <= set(PASSES) or not self.passes:
            raise ConfigError(f"quant.passes={self.passes} is invalid; use a list of {PASSES}.")
        if self.weight.rounding not in ROUNDINGS:
            raise ConfigError(f"quant.weight.rounding={self.weight.rounding!r}; use one of {ROUNDINGS}.")
        for name, schedule in (("weight", self.weight.schedule), ("activation", self.activation.schedule)):
            if schedule not in SCHEDULES:
                raise ConfigError(f"quant.{name}.schedule={schedule!r}; use one of {SCHEDULES}.")
        if self.noise.enabled and self.weight.rounding == "adaround":
            raise ConfigError("noise-based quantization trains latent weights: set quant.weight.rounding=latent "
                              "(AdaRound learns rounding offsets, which noise would bypass).")
        if self.units not in ("layer", "block"):
            raise ConfigError(f"quant.units={self.units!r} is unknown; use layer (the official units) or block.")
        for name in ("iters", "act_iters", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"quant.{name} must be a positive integer.")
        for name in ("input_quant_prob", "drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"quant.{name}={getattr(self, name)} is not a probability; use a value in [0, 1] "
                                  "(QDrop: 0.5; BRECQ: input_quant_prob=1, drop_prob=0).")

    def numerics(self) -> QuantConfig:
        """The model-independent numerics of this recipe (the model adds its own exceptions: quant/facts.py)."""
        return QuantConfig(w_bits=self.w_bits, a_bits=self.a_bits, w_per_channel=self.weight.per_channel,
                           w_symmetric=self.weight.symmetric, w_learn_scale=self.weight.learn_scale,
                           first_last_8bit=self.first_last_8bit, init_search=self.init_search,
                           overrides=tuple(self.overrides))

    @property
    def tag(self) -> str:
        return f"{self.method}_w{self.w_bits}a{self.a_bits}"

    def phase_iters(self, pass_name: str) -> int:
        return self.act_iters if pass_name == "activations" else self.iters

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Recipe:
        cfg = dict(cfg)
        nested = {"weight": WeightRecipe, "activation": ActivationRecipe, "noise": NoiseRecipe}
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known - {"calibration_size", "runtime", "distance_anchor"}
        if unknown:
            raise ConfigError(f"unknown quant config keys {sorted(unknown)}; valid keys: {sorted(known)}.")
        kwargs: dict[str, Any] = {}
        for key, value in cfg.items():
            if key not in known:
                continue
            if key in nested:
                sub_known = {f.name for f in fields(nested[key])}
                bad = set(value) - sub_known
                if bad:
                    raise ConfigError(f"unknown keys {sorted(bad)} in quant.{key}; valid: {sorted(sub_known)}.")
                value = nested[key](**value)
            elif key == "adaround_beta":
                value = tuple(value)
            elif key == "passes":
                value = list(value)
            elif key == "overrides":
                value = plain_overrides(value, "quant.overrides")
            kwargs[key] = value
        return cls(**kwargs)
