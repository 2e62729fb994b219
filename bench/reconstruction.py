"""Speed of the reconstruction engine per unit type, eager vs fast path (a benchmark, not a test).

    python bench/reconstruction.py --models resnet50 resnet101 --methods brecq qdrop hdrq

For every model, method and path it drives the engine directly (no Trainer, but with the lr-schedule and
noise-switch step hooks) on each distinct unit type (stem, the first block of every stage, a plain block of
every stage, head) with random timm weights, 224 px, batch 32 and 1024 calibration images. Paths:
  eager      fp32, no compilation, no graphs, unfused Adam (what the reference code does)
  graphs     the whole step captured in one CUDA graph (eager kernels), channels-last, TF32, fused Adam
  fast       graphs + Inductor-compiled unit loss (fused quantizer kernels)
  fast_bf16  fast + bfloat16 autocast of the convolutions
It reports ms per iteration (HDRQ: in its noise mode and in its final fake-quant mode), the cache + calibration
time of the unit, the time of the first steps (compilation and capture), the peak GPU memory, the whole-model
time extrapolated to 20,000 iterations per unit (BRECQ: + 5,000 activation iterations; HDRQ: 16,500 noise +
3,500 fake-quant; every unit is charged its type's first steps, i.e. a cold compilation each: an upper bound,
bench/full_run.py measures the real one-off costs) and the arithmetic floor: the unit's forward+backward FLOPs over the GPU's measured matmul
throughput. Writes <out>/reconstruction.json and <out>/reconstruction.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdrq_lightning.callbacks import engine_callbacks  # noqa: E402
from hdrq_lightning.models.build import build_model  # noqa: E402
from hdrq_lightning.quant.fold import fold_batch_norm  # noqa: E402
from hdrq_lightning.quant.modules import quantize_model  # noqa: E402
from hdrq_lightning.quant.recipe import Recipe, Runtime  # noqa: E402
from hdrq_lightning.quant.reconstruction import ReconstructionModule  # noqa: E402

METHODS = ("brecq", "qdrop", "hdrq")


def preset(method: str) -> dict[str, Any]:
    """The quant preset as the CLI composes it: conf/quant/base.yaml with conf/quant/<method>.yaml on top (their
    ``defaults: [base, _self_]``), without the runtime and calibration keys (the bench sets those)."""
    conf = Path(__file__).resolve().parent.parent / "conf" / "quant"
    own = OmegaConf.load(conf / f"{method}.yaml")
    own.pop("defaults", None)
    merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(conf / "base.yaml"), own), resolve=True)
    return {k: v for k, v in merged.items() if k not in ("runtime", "calibration_size")}


PRESETS = {method: preset(method) for method in METHODS}
PATHS = {
    "eager": Runtime(compile=False, channels_last=False, tf32=None, fused_optimizer=False),  # as `hdrq quantize`
    # the eager path with the mask kernels (its default between 5a73cda and the auto setting: slower, host-bound)
    "eager_masks": Runtime(compile=False, channels_last=False, tf32=None, fused_optimizer=False, mask_kernel=True),
    # the paths measured before the mask kernels keep torch's masks (mask_kernel=False), so their names keep
    # meaning what bench/results measured; "eager" follows `hdrq quantize`'s defaults (torch's masks uncaptured)
    "graphs": Runtime(cuda_graphs=True, channels_last=True, tf32=True, fused_optimizer=True, mask_kernel=False),
    "fast": Runtime(compile=True, cuda_graphs=True, channels_last=True, tf32=True, fused_optimizer=True,
                    mask_kernel=False),
    "fast_bf16": Runtime(compile=True, cuda_graphs=True, channels_last=True, tf32=True, bf16=True,
                         fused_optimizer=True, mask_kernel=False),
    # + QDrop's masks by kernels.keep_mask (four elements per Philox call; other draws)
    "fast_bf16_masks": Runtime(compile=True, cuda_graphs=True, channels_last=True, tf32=True, bf16=True,
                               fused_optimizer=True, mask_kernel=True),
}


def unit_type(name: str, index_in_stage: int) -> str:
    if name in ("stem", "head"):
        return name
    return f"{name.split('.')[0]}.{'first' if index_in_stage == 0 else 'plain'}"


def unit_types(unit_names: list[str]) -> tuple[Counter, dict[str, int]]:
    """(units per type, index of each type's first unit) of a model's unit names (stem, stage.first/plain, head)."""
    counts, first = Counter(), {}
    for index, name in enumerate(unit_names):
        stage = name.split(".")[0]
        position = sum(1 for n in unit_names[:index] if n.split(".")[0] == stage) if "." in name else 0
        kind = unit_type(name, position)
        counts[kind] += 1
        first.setdefault(kind, index)
    return counts, first


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(dtype: torch.dtype, tf32: bool, device: str, size: int = 8192, repeats: int = 20) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def unit_flops(module: ReconstructionModule) -> int:
    """Forward + backward FLOPs of one step of the current unit (counted by torch's FlopCounterMode)."""
    unit = module.quant_units[module.phase.unit]
    inputs = module.cache.quant_input[: module.recipe.batch_size].clone().requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        out = unit(inputs)
        out.float().pow(2).sum().backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def build_engine(model_name: str, method: str, path: str, calibration: int, image: int = 224,
                 **overrides: Any) -> tuple[ReconstructionModule, list]:
    """The engine on a random-weight timm model (W4A4, seed 0) and its callbacks (lr schedule, noise switch,
    distance regulariser). ``overrides`` set Recipe fields and Runtime fields (on top of the path's runtime)."""
    torch.manual_seed(0)
    runtime_fields = {f.name for f in dataclasses.fields(Runtime)}
    runtime = dataclasses.replace(PATHS[path], **{k: v for k, v in overrides.items() if k in runtime_fields})
    runtime.apply_precision()
    fp = fold_batch_norm(build_model(model_config(model_name)).eval())
    preset = PRESETS[method]
    if model_name in SEGMENTATION_MODELS:  # the official segmentation setting: per-tensor symmetric weights
        preset = {**preset, "weight": {**preset.get("weight", {}), "per_channel": False, "symmetric": True}}
    recipe = Recipe.from_config({**preset, "w_bits": 4, "a_bits": 4,
                                 **{k: v for k, v in overrides.items() if k not in runtime_fields}})
    module = ReconstructionModule(fp, quantize_model(fp, recipe.numerics()),
                                  torch.randn(calibration, 3, image, image), recipe, runtime=runtime)
    callbacks = engine_callbacks(recipe, {k: v for k, v in fp.state_dict().items() if k.endswith("weight")})
    return module, callbacks


# Segmentation networks by their conf/model file: the paper's (ResNet-101c + both DAFormer heads) and the built-in one.
SEGMENTATION_MODELS = {"seg_r101": ("seg_r101", 19), "seg_tiny": ("seg_tiny", 10)}


def model_config(model_name: str) -> dict[str, Any]:
    """The architecture the compile-ahead worker rebuilds (as the quantize stage gives it): a SHOT network of a
    timm ResNet (65 classes), or a segmentation network (``seg_r101``, ``seg_tiny``)."""
    if model_name in SEGMENTATION_MODELS:
        conf, num_classes = SEGMENTATION_MODELS[model_name]
        node = OmegaConf.load(Path(__file__).resolve().parent.parent / "conf" / "model" / f"{conf}.yaml")
        return {**OmegaConf.to_container(node, resolve=True), "num_classes": num_classes}
    return {"_target_": "hdrq_lightning.models.shot.build_shot_net", "backbone": model_name, "num_classes": 65}


def drive_directly(module: ReconstructionModule, callbacks: list, device: str) -> ReconstructionModule:
    """Prepare ``module`` to be stepped without a Trainer, with its callbacks' step hooks and loss terms."""
    module = module.to(device)
    module.configure_optimizers()
    for callback in callbacks:
        callback.attach(module)
    return module


def bench_model(args: argparse.Namespace, model_name: str, method: str, path: str, floor_tflops: float) -> dict:
    module, callbacks = build_engine(model_name, method, path, args.calibration, args.image, iters=20000,
                                     batch_size=args.batch)
    module = drive_directly(module, callbacks, args.device)
    recipe = module.recipe
    counts, first_unit = unit_types(module.unit_names)
    modes = ["noise", "nearest"] if recipe.noise.enabled else ["nearest"]
    rows = {}
    for kind, block in first_unit.items():
        phase = next(p for p in module.plan if p.unit == block)
        for mode in modes:
            switch = recipe.noise.switch_iteration(phase.iters) if mode == "nearest" and recipe.noise.enabled else 0
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(args.device)
            started = time.perf_counter()
            module.seek(phase.start + switch, enter=True)
            synchronize(args.device)
            enter_seconds = time.perf_counter() - started
            flops = unit_flops(module)
            started = time.perf_counter()
            for _ in range(args.warmup):
                module.reconstruction_step()
            synchronize(args.device)
            first_seconds = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(args.iters):
                module.reconstruction_step()
            synchronize(args.device)
            ms = 1000 * (time.perf_counter() - started) / args.iters
            row = {"units": counts[kind], "ms_per_iter": round(ms, 3), "enter_s": round(enter_seconds, 2),
                   "first_steps_s": round(first_seconds, 2),
                   "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
                   "gflop_per_iter": round(flops / 1e9, 2),
                   "floor_ms": round(flops / (floor_tflops * 1e12) * 1000, 3)}
            rows[kind if mode == "nearest" else f"{kind}:noise"] = row
            print(f"{model_name} {method} {path} {kind} {mode}: {row}", flush=True)
    iters = {"joint": 20000, "weights": 20000, "activations": 5000}
    noise_iters = recipe.noise.switch_iteration(20000) if recipe.noise.enabled else 0
    total_iter_s = floor_s = overhead_s = 0.0
    for kind, row in rows.items():
        if kind.endswith(":noise"):
            n = noise_iters
        else:
            n = sum(iters[p] for p in recipe.passes) - noise_iters
        total_iter_s += row["units"] * row["ms_per_iter"] / 1000 * n
        floor_s += row["units"] * row["floor_ms"] / 1000 * n
        # every unit (and pass, and HDRQ mode) builds its cache and compiles/captures its step once
        overhead_s += row["units"] * (row["enter_s"] + row["first_steps_s"]) * (2 if method == "brecq" else 1)
    return {"model": model_name, "method": method, "path": path, "units": rows,
            "extrapolated_minutes": round((total_iter_s + overhead_s) / 60, 1),
            "overhead_minutes": round(overhead_s / 60, 1),
            "floor_minutes": round(floor_s / 60, 1), "peak_gib": max((r["peak_gib"] or 0) for r in rows.values())}


def markdown(results: list[dict], device: str, throughput: dict) -> str:
    lines = [f"Device: {device}; measured matmul throughput: " +
             ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in throughput.items()), "",
             "| model | method | path | ms/iter per unit type | whole model, 20k it/unit (min) | of which caching + "
             "first steps (min) | floor (min) | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_unit = ", ".join(f"{k} {v['ms_per_iter']:.2f}" for k, v in r["units"].items())
        lines.append(f"| {r['model']} | {r['method']} | {r['path']} | {per_unit} | {r['extrapolated_minutes']} | "
                     f"{r['overhead_minutes']} | {r['floor_minutes']} | {r['peak_gib']} |")
    by_key = {(r["model"], r["method"], r["path"]): r for r in results}
    lines += ["", "| model | method | path | eager / path, per iteration (mean over unit types) | whole model |",
              "|---|---|---|---|---|"]
    for (model, method, path), r in by_key.items():
        eager = by_key.get((model, method, "eager"))
        if path != "eager" and eager is not None:
            ratios = [eager["units"][k]["ms_per_iter"] / v["ms_per_iter"] for k, v in r["units"].items()
                      if k in eager["units"]]
            lines.append(f"| {model} | {method} | {path} | {sum(ratios) / len(ratios):.2f}x | "
                         f"{eager['extrapolated_minutes'] / r['extrapolated_minutes']:.2f}x |")
    return "\n".join(lines) + "\n"


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine benchmarks' shared options: batch, calibration set, image size, output dir, device."""
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")


def parse_workload_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse, refusing --device cuda without a GPU."""
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog} needs a CUDA GPU (or --device cpu for a smoke run).")
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet101"])
    parser.add_argument("--methods", nargs="+", default=["brecq", "qdrop", "hdrq"])
    parser.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=sorted(PATHS))
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    add_workload_arguments(parser)
    args = parse_workload_arguments(parser)
    size = 8192 if args.device == "cuda" else 512
    throughput = {"fp32": matmul_tflops(torch.float32, False, args.device, size),
                  "tf32": matmul_tflops(torch.float32, True, args.device, size),
                  "bf16": matmul_tflops(torch.bfloat16, False, args.device, size)}
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for model_name in args.models:
        for method in args.methods:
            for path in args.paths:
                runtime = PATHS[path]
                # tf32 null: TF32 convolutions (torch default)
                floor = throughput["bf16" if runtime.bf16 else "fp32" if runtime.tf32 is False else "tf32"]
                results.append(bench_model(args, model_name, method, path, floor))
                if args.device == "cuda":
                    torch.cuda.empty_cache()
                # written after every configuration, so a run cut short still leaves its numbers
                (out / "reconstruction.json").write_text(json.dumps(
                    {"device": device, "throughput_tflops": throughput, "args": vars(args), "results": results},
                    indent=2))
                (out / "reconstruction.md").write_text(markdown(results, device, throughput))
    print(markdown(results, device, throughput))


if __name__ == "__main__":
    main()
