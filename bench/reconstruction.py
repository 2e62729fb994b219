"""Speed of the reconstruction engine per unit type, eager vs fast path (a benchmark, not a test).

    python bench/reconstruction.py --models resnet50 resnet101 --methods brecq qdrop hdrq

For every model, method and path (eager: fp32, no compilation; fast: torch.compile + channels-last + TF32 +
fused Adam; "compiled": the same without CUDA graphs) it drives the engine directly (no Trainer) on each distinct unit type (stem, the first block of
every stage, a plain block of every stage, head) with random timm weights, 224 px, batch 32 and 1024 calibration
images, and reports ms per iteration, the cache + calibration time of the unit, the peak GPU memory, the
whole-model time extrapolated to 20,000 iterations per unit (BRECQ: + 5,000 activation iterations; HDRQ timed
in its noise phase, the slower one) and the
arithmetic floor: the unit's forward+backward FLOPs over the GPU's measured matmul throughput.
Writes <out>/reconstruction.json and <out>/reconstruction.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdrq_lightning.models.shot import build_shot_net  # noqa: E402
from hdrq_lightning.quant.fold import fold_batch_norm  # noqa: E402
from hdrq_lightning.quant.modules import quantize_model  # noqa: E402
from hdrq_lightning.quant.recipe import NoiseRecipe, Recipe, Runtime, WeightRecipe  # noqa: E402
from hdrq_lightning.quant.reconstruction import ReconstructionModule  # noqa: E402
from hdrq_lightning.stages.quantize import quant_config  # noqa: E402

PRESETS = {
    "brecq": dict(passes=["weights", "activations"], input_quant_prob=1.0, drop_prob=0.0),
    "qdrop": dict(passes=["joint"]),
    "hdrq": dict(passes=["joint"], distance_weight=0.05, noise=NoiseRecipe(enabled=True),
                 weight=WeightRecipe(rounding="latent", symmetric=True, learn_scale=True, lr=1e-4,
                                     schedule="warmup_cosine")),
}
PATHS = {
    "eager": Runtime(compile=False, channels_last=False, tf32=False, fused_optimizer=False),
    "compiled": Runtime(compile=True, channels_last=True, tf32=True, fused_optimizer=True),
    "fast": Runtime(compile=True, cuda_graphs=True, channels_last=True, tf32=True, fused_optimizer=True),
}


def unit_type(name: str, index_in_stage: int) -> str:
    if name in ("stem", "head"):
        return name
    return f"{name.split('.')[0]}.{'first' if index_in_stage == 0 else 'plain'}"


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
    cache = module._cache
    unit = module.quant_blocks[module.phase.block]
    inputs = cache.quant_input[: module.recipe.batch_size].clone().requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        out = unit(inputs)
        out.float().pow(2).sum().backward()
    module._optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_model(args: argparse.Namespace, model_name: str, method: str, path: str, floor_tflops: float) -> dict:
    torch.manual_seed(0)
    runtime = PATHS[path]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = runtime.tf32
    fp = fold_batch_norm(build_shot_net(model_name, 65).eval())
    recipe = Recipe(method=method, w_bits=4, a_bits=4, iters=20000, batch_size=args.batch, **PRESETS[method])
    quant = quantize_model(fp, quant_config(recipe))
    calibration = torch.randn(args.calibration, 3, args.image, args.image)
    module = ReconstructionModule(fp, quant, calibration, recipe, runtime=runtime).to(args.device)
    module.configure_optimizers()
    counts = Counter()
    first_unit: dict[str, int] = {}
    for index, name in enumerate(module.block_names):
        stage = name.split(".")[0]
        position = sum(1 for n in module.block_names[:index] if n.split(".")[0] == stage) if "." in name else 0
        kind = unit_type(name, position)
        counts[kind] += 1
        first_unit.setdefault(kind, index)
    rows = {}
    for kind, block in first_unit.items():
        phase = next(p for p in module.plan if p.block == block)
        module._step = phase.start
        module._cache = None
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize(args.device)
        started = time.perf_counter()
        module._enter_phase()
        if recipe.noise.enabled:  # what NoiseToFakeQuantSwitch does for the first 82.5% of the iterations
            module.set_block_modes(weight="noise", activation="noise")
        synchronize(args.device)
        enter_seconds = time.perf_counter() - started
        flops = unit_flops(module)
        for _ in range(args.warmup):
            module.reconstruction_step()
        synchronize(args.device)
        started = time.perf_counter()
        for _ in range(args.iters):
            module.reconstruction_step()
        synchronize(args.device)
        ms = 1000 * (time.perf_counter() - started) / args.iters
        rows[kind] = {"units": counts[kind], "ms_per_iter": round(ms, 3), "enter_s": round(enter_seconds, 2),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
                      "gflop_per_iter": round(flops / 1e9, 2),
                      "floor_ms": round(flops / (floor_tflops * 1e12) * 1000, 3)}
        print(f"{model_name} {method} {path} {kind}: {rows[kind]}", flush=True)
    passes = 2 if method == "brecq" else 1
    iters = {"joint": 20000, "weights": 20000, "activations": 5000}
    total_iter_s = sum(r["units"] * r["ms_per_iter"] / 1000 * sum(iters[p] for p in recipe.passes) for r in rows.values())
    total_enter_s = sum(r["units"] * r["enter_s"] for r in rows.values()) * passes
    floor_s = sum(r["units"] * r["floor_ms"] / 1000 * sum(iters[p] for p in recipe.passes) for r in rows.values())
    return {"model": model_name, "method": method, "path": path, "units": rows,
            "extrapolated_minutes": round((total_iter_s + total_enter_s) / 60, 1),
            "floor_minutes": round(floor_s / 60, 1), "peak_gib": max((r["peak_gib"] or 0) for r in rows.values())}


def markdown(results: list[dict], device: str, throughput: dict) -> str:
    lines = [f"Device: {device}; measured matmul throughput: " +
             ", ".join(f"{k} {v:.0f} TFLOP/s" for k, v in throughput.items()), "",
             "| model | method | path | ms/iter per unit type | whole model, 20k it/unit (min) | floor (min) | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        per_unit = ", ".join(f"{k} {v['ms_per_iter']:.2f}" for k, v in r["units"].items())
        lines.append(f"| {r['model']} | {r['method']} | {r['path']} | {per_unit} | {r['extrapolated_minutes']} | "
                     f"{r['floor_minutes']} | {r['peak_gib']} |")
    by_key = {(r["model"], r["method"], r["path"]): r for r in results}
    lines += ["", "| model | method | eager / fast (whole model) |", "|---|---|---|"]
    for (model, method, path), r in by_key.items():
        if path == "fast" and (model, method, "eager") in by_key:
            eager = by_key[(model, method, "eager")]
            lines.append(f"| {model} | {method} | {eager['extrapolated_minutes'] / r['extrapolated_minutes']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "resnet101"])
    parser.add_argument("--methods", nargs="+", default=["brecq", "qdrop", "hdrq"])
    parser.add_argument("--paths", nargs="+", default=["eager", "fast"], choices=sorted(PATHS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench/reconstruction.py needs a CUDA GPU (or --device cpu for a smoke run).")
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
                floor = throughput["tf32"] if PATHS[path].tf32 else throughput["fp32"]
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
