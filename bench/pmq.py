"""Post-merge quantization of a whole network, timed (a benchmark, not a test).

    python bench/pmq.py --model resnet50 --experts 3 --calibration 128 --image-size 224 --w-bits 4
    python bench/pmq.py --model resnet_tiny --image-size 32 --calibration 128        # the digits network, random

Builds a SHOT network of ``--model`` with random weights as the source, ``--experts`` experts as the source plus
random task vectors (BatchNorm statistics perturbed too, so that folding gives each expert its own biases),
folds BN, merges them with Task Arithmetic (lambda 0.5), and runs RTN, GPTQ and E-PMQ (``--methods``) over the
calibration images (Gaussian noise, ``--calibration`` per expert) through hdrq_lightning's own driver
(pmq/sequential.py). Times each method end to end (moments, solves, GPTQ, stream forwards; no evaluation) and the
share spent in the GPTQ solver, and writes <out>/pmq_<device>_<model>_w<bits>.json. Random weights: the times are
what matters here, not accuracies.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402
from bench.reconstruction import synchronize  # noqa: E402
from hdrq_lightning.merge import get_merge_method  # noqa: E402
from hdrq_lightning.models.shot import build_shot_net  # noqa: E402
from hdrq_lightning.pmq import PostMergeQuantizer, get_pmq_method  # noqa: E402
from hdrq_lightning.pmq import gptq as gptq_module  # noqa: E402
from hdrq_lightning.quant.fold import fold_batch_norm  # noqa: E402
from hdrq_lightning.quant.modules import QuantConfig, quantize_model  # noqa: E402

PARAMS = {"rtn": {}, "gptq": {}, "epmq": {}}


def experts_of(model: str, count: int, classes: int, seed: int) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    torch.manual_seed(seed)
    source = build_shot_net(model, classes).eval()
    with torch.no_grad():  # BN statistics that are not the identity, so folding does something
        for m in source.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    experts = []
    for _ in range(count):
        expert = copy.deepcopy(source)
        with torch.no_grad():
            for name, tensor in expert.state_dict().items():
                if tensor.is_floating_point() and "num_batches" not in name:
                    tensor.add_(0.05 * tensor.std().nan_to_num() * torch.randn_like(tensor))
        experts.append(expert)
    return fold_batch_norm(source), [fold_batch_norm(e) for e in experts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--classes", type=int, default=65)
    parser.add_argument("--calibration", type=int, default=128, help="images per expert")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "epmq"])
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as the GPTQ reference
    source, experts = experts_of(args.model, args.experts, args.classes, seed=0)
    merged = copy.deepcopy(source)
    merged.load_state_dict(get_merge_method("task_arithmetic", scaling=0.5).merge(
        [e.state_dict() for e in experts], base=source.state_dict()))
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(args.calibration, 3, args.image_size, args.image_size, generator=g)
                   for _ in experts]
    results = {}
    for name in args.methods:
        deployed = quantize_model(merged, QuantConfig(w_bits=args.w_bits, a_bits=None, init_search="minmax"),
                                  init_ranges=False)
        solver_time = [0.0]
        original = gptq_module.gptq_quantize

        def timed(*a, original=original, solver_time=solver_time, **k):
            synchronize(device.type)
            start = time.perf_counter()
            out = original(*a, **k)
            synchronize(device.type)
            solver_time[0] += time.perf_counter() - start
            return out

        import hdrq_lightning.pmq.sequential as sequential
        sequential.gptq_quantize = timed
        synchronize(device.type)
        start = time.perf_counter()
        quantizer = PostMergeQuantizer(deployed, merged, experts, calibration, get_pmq_method(name, **PARAMS[name]),
                                       device=device, chunk=args.chunk)
        rows = quantizer.run()
        synchronize(device.type)
        seconds = time.perf_counter() - start
        sequential.gptq_quantize = original
        results[name] = {"seconds": round(seconds, 2), "gptq_solver_seconds": round(solver_time[0], 2),
                         "layers": len(rows), "fallbacks": sum(1 for r in rows if r.gptq and r.gptq.fallback),
                         "largest_columns": max(r.columns for r in rows)}
        print(f"{name}: {seconds:.1f} s ({solver_time[0]:.1f} s in the GPTQ solver), {len(rows)} layers", flush=True)
        del deployed, quantizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    tag = "h200" if "H200" in label else device.type
    write_result(args.out, f"pmq_{tag}_{args.model}_w{args.w_bits}.json", {
        "device": label, "model": args.model, "experts": args.experts, "calibration_per_expert": args.calibration,
        "image_size": args.image_size, "w_bits": args.w_bits, "results": results,
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None})

if __name__ == "__main__":
    main()
