"""The engine's eager step beside a transcription of the official QDrop step, unit by unit (a benchmark, not a test).

    python bench/eager_vs_official.py --model resnet50 --iters 30 --warmup 8

The official QDrop code (wimh966/QDrop, ``quant/block_recon.py``, ``quant/quant_layer.py``; the HDRQ code builds on
it) is not a dependency and is not copied here: ``OfficialUnit`` re-states what one of its iterations computes, from
reading it: a CPU ``randint`` batch index into GPU caches, QDrop's input mixing with ``rand_like``, the unit with
AdaRound soft-target weights (``floor(W / s) + h(alpha)``, clamp, dequantize; per output channel) and activation
quantizers after every ReLU (``round_ste(x / s) + z``, clamp, dequantize, in-block drop with ``rand_like``, a learnt
scalar step without LSQ's gradient scale), the loss ``|out - target|^2`` summed over channels and averaged, plus the
rounding penalty with the temperature as a Python float, ``backward(retain_graph=True)``, Adam on the alphas, Adam
with a cosine schedule on the steps. Both run on the same unit's calibration caches (built by the engine), with the
same precision settings (torch's defaults unless ``--tf32`` says otherwise), batch 32, W4A4.

Per unit type it prints and writes ms per iteration for both, their ratio, and (``--profile``, after all timings: the
profiler slows every later launch of its process) the number of CUDA kernels and the host (CPU) time per step,
which says whether a step waits on the GPU or on Python and the dispatcher. The whole-model figure is the sum over units (every unit of a type at its type's ms/iter), the
quantity the issue's anchor (the official code: 135-151 ms summed on an H200) is given in.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402
from bench.reconstruction import (  # noqa: E402
    add_workload_arguments,
    build_engine,
    drive_directly,
    parse_workload_arguments,
    synchronize,
    unit_types,
)
from hdrq_lightning.quant.recipe import Runtime  # noqa: E402


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class OfficialActivation(nn.Module):
    """The official activation fake-quantizer in its reconstruction state (learnt step, in-block drop)."""

    def __init__(self, bits: int, prob: float) -> None:
        super().__init__()
        self.levels, self.prob = 2**bits, prob
        self.delta = nn.Parameter(torch.tensor(0.05))
        self.zero_point = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_int = _round_ste(x / self.delta) + self.zero_point
        x_dequant = (torch.clamp(x_int, 0, self.levels - 1) - self.zero_point) * self.delta
        if self.prob < 1.0:
            return torch.where(torch.rand_like(x) < self.prob, x_dequant, x)
        return x_dequant


class OfficialLayer(nn.Module):
    """A convolution or linear layer with the official AdaRound soft-target weight quantizer (per channel)."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, bits: int) -> None:
        super().__init__()
        self.layer, self.levels = layer, 2**bits
        weight = layer.weight.detach()
        rows = weight.flatten(1)
        low, high = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.register_buffer("delta", ((high - low) / (self.levels - 1)).clamp(min=1e-8).view(shape))
        self.register_buffer("zero_point", torch.round(-low.view(shape) / self.delta))
        rest = weight / self.delta - torch.floor(weight / self.delta)
        self.alpha = nn.Parameter(-torch.log((1.2 - 0.1) / (rest + 0.1).clamp(max=1.1) - 1))
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)

    def soft_targets(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * 1.2 - 0.1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.layer.weight
        x_int = torch.floor(w / self.delta) + self.soft_targets()
        weight = (torch.clamp(x_int + self.zero_point, 0, self.levels - 1) - self.zero_point) * self.delta
        if isinstance(self.layer, nn.Conv2d):
            return F.conv2d(x, weight, self.layer.bias, self.layer.stride, self.layer.padding, self.layer.dilation,
                            self.layer.groups)
        return F.linear(x, weight, self.layer.bias)


class OfficialUnit:
    """One unit as the official code reconstructs it: a copy of the FP unit with every conv/linear an
    ``OfficialLayer`` and an ``OfficialActivation`` after every ReLU (the official ResNet block's quantizer places:
    after each inner ReLU and after the block's last ReLU), its optimizers and one ``step``."""

    def __init__(self, fp_unit: nn.Module, cache, bits: int, prob: float, iters: int, batch_size: int) -> None:
        unit = copy.deepcopy(fp_unit).float()
        for child in list(unit.modules()):
            for child_name, grandchild in list(child.named_children()):
                if isinstance(grandchild, (nn.Conv2d, nn.Linear)):
                    setattr(child, child_name, OfficialLayer(grandchild, bits))
                elif isinstance(grandchild, nn.ReLU):
                    setattr(child, child_name, nn.Sequential(grandchild, OfficialActivation(bits, prob)))
        self.unit = unit.train()
        self.layers = [m for m in unit.modules() if isinstance(m, OfficialLayer)]
        self.w_opt = torch.optim.Adam([m.alpha for m in self.layers])
        deltas = [m.delta for m in unit.modules() if isinstance(m, OfficialActivation)]
        self.a_opt = torch.optim.Adam(deltas, lr=4e-5) if deltas else None
        self.a_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.a_opt, T_max=iters) if deltas else None
        # the caches as the official code holds them: quantized input, FP input, FP target
        self.quant_input, self.fp_input = cache.quant_input.contiguous(), cache.fp_input.contiguous()
        self.target = cache.fp_target.contiguous()
        self.iters, self.batch_size, self.prob, self.count = iters, batch_size, prob, 0

    def step(self) -> None:
        idx = torch.randint(0, self.quant_input.size(0), (self.batch_size,))
        device = self.quant_input.device
        cur_inp, cur_sym = self.quant_input[idx].to(device), self.fp_input[idx].to(device)
        cur_inp = torch.where(torch.rand_like(cur_inp) < self.prob, cur_inp, cur_sym)
        cur_out = self.target[idx].to(device)
        self.w_opt.zero_grad()
        if self.a_opt:
            self.a_opt.zero_grad()
        out = self.unit(cur_inp)
        self.count += 1
        rec = (out - cur_out).abs().pow(2.0).sum(1).mean()
        b = 2 + (20 - 2) * max(0.0, 1 - self.count / self.iters)
        round_loss = 0
        for layer in self.layers:
            round_loss += 0.01 * (1 - ((layer.soft_targets() - 0.5).abs() * 2).pow(b)).sum()
        (rec + round_loss).backward(retain_graph=True)
        self.w_opt.step()
        if self.a_opt:
            self.a_opt.step()
            self.a_scheduler.step()


def time_steps(step, iters: int, warmup: int, device: str) -> float:
    """ms per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return 1000 * (time.perf_counter() - started) / iters


def kernels_and_host_ms(step, steps: int, device: str, table: str | None = None) -> tuple[float, float]:
    """(CUDA kernels per step, host ms per step) of ``step`` under the profiler (CPU runs: aten ops, host ms);
    ``table``: print the kernels by count under that title."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        host = time.perf_counter() - started
        synchronize(device)
    if device == "cuda":
        launches = sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)
    else:
        launches = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    if table:
        print(f"--- {table}: per {steps} steps")
        print(prof.key_averages().table(sort_by="count", row_limit=40, max_name_column_width=60))
    return launches / steps, 1000 * host / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--paths", nargs="+", default=["eager"], choices=["eager", "eager_masks", "graphs", "fast"],
                        help="the engine's paths timed beside the official step (graphs: eager kernels in CUDA graphs; "
                             "eager_masks: eager with the mask kernels, mask_kernel=true)")
    parser.add_argument("--profile", action="store_true", help="also count kernels and host time per step")
    parser.add_argument("--table", default="layer3.plain", help="unit type whose kernels are listed (--profile)")
    parser.add_argument("--tf32", default="default", choices=["default", "on", "off"],
                        help="default: torch's (TF32 convolutions, FP32 matmuls), as the official code runs")
    parser.add_argument("--name", default=None, help="result file name (default: eager_vs_official_<model>.json)")
    add_workload_arguments(parser)
    args = parse_workload_arguments(parser)
    engines = {}
    for path in args.paths:  # ours on each path; the official transcription once
        module, callbacks = build_engine(args.model, "qdrop", path, args.calibration, args.image, iters=20000,
                                         batch_size=args.batch, tf32=None)
        engines[path] = drive_directly(module, callbacks, args.device)
    Runtime(tf32={"default": None, "on": True, "off": False}[args.tf32]).apply_precision()
    module = engines[args.paths[0]]
    counts, first = unit_types(module.unit_names)
    rows, sides = {}, [*args.paths, "official"]
    for kind, unit in first.items():  # timings first: the profiler (CUPTI) slows every later launch of the process
        phase = next(p for p in module.plan if p.unit == unit)
        row = {"units": counts[kind]}
        for path, engine in engines.items():
            engine.seek(phase.start, enter=True)
            row[f"{path}_ms"] = round(time_steps(engine.reconstruction_step, args.iters, args.warmup, args.device), 3)
        official = OfficialUnit(module.fp_units[unit], module.cache, 4, module.recipe.input_quant_prob, 20000,
                                args.batch)
        row["official_ms"] = round(time_steps(official.step, args.iters, args.warmup, args.device), 3)
        for path in args.paths:
            row[f"{path}_over_official"] = round(row[f"{path}_ms"] / row["official_ms"], 3)
        rows[kind] = row
        print(f"{args.model} {kind}: {row}", flush=True)
    if args.profile:
        for kind, unit in first.items():
            phase = next(p for p in module.plan if p.unit == unit)
            module.seek(phase.start, enter=True)
            steps, listed = max(3, args.iters // 5), kind == args.table
            official = OfficialUnit(module.fp_units[unit], module.cache, 4, module.recipe.input_quant_prob, 20000,
                                    args.batch)
            for side, step in ((args.paths[0], module.reconstruction_step), ("official", official.step)):
                for _ in range(args.warmup):
                    step()
                k, host = kernels_and_host_ms(step, steps, args.device, listed and f"{side} {kind}")
                rows[kind] |= {f"{side}_kernels": round(k, 1), f"{side}_host_ms": round(host, 3)}
            print(f"{args.model} {kind} profiled: {rows[kind]}", flush=True)
    summed = {side: round(sum(r["units"] * r[f"{side}_ms"] for r in rows.values()), 1) for side in sides}
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "tf32": args.tf32, "precision": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                               "cudnn": torch.backends.cudnn.allow_tf32},
              "args": vars(args), "summed_ms_per_iter": summed,
              "over_official": {path: round(summed[path] / summed["official"], 3) for path in args.paths},
              "minutes_at_20k": {side: round(ms * 20000 / 1000 / 60, 1) for side, ms in summed.items()},
              "units": rows}
    print(summed, result["over_official"], flush=True)
    write_result(args.out, args.name or f"eager_vs_official_{args.model}.json", result)


if __name__ == "__main__":
    main()
