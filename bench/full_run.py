"""A whole reconstruction through the Lightning Trainer, timed unit by unit (a benchmark, not a test).

    python bench/full_run.py --model resnet50 --method hdrq --iters 400 --path fast
    python bench/full_run.py --model resnet50 --method qdrop --iters 10000 --devices 2   # data-parallel (DDP)

Runs every unit of the model (stem, all residual blocks, head) for ``--iters`` iterations per unit with the real
callbacks (lr schedule, noise switch, distance regulariser) and the Lightning loop, as `hdrq quantize` does, and
times per unit: building its cache, the first steps after each mode change (compilation and CUDA-graph capture)
and the steady iterations. The whole-model time at 20,000 iterations per unit is then
sum over units of (cache + first steps + steady ms/iter x the remaining iterations), i.e. measured, not
assumed, one-off costs. Writes <out>/full_run_<model>_<method>_<path>.json. With ``--devices N`` (N > 1) the run is
data-parallel as `hdrq quantize trainer=ddp` runs it (the global batch split over N processes, one compile-ahead
worker per rank); every rank writes its own file, ..._rank<r>.json, with its own cache hits. With
``--compile-bundles DIR`` a run with an empty Inductor cache first loads the folder's portable bundles (a new machine
starting warm: run once to write the bundle, then again with another empty ``TORCHINDUCTOR_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch._dynamo.utils import compile_times, counters

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import compile_cache_state, write_result  # noqa: E402
from bench.reconstruction import (  # noqa: E402
    PATHS,
    PRESETS,
    add_workload_arguments,
    build_engine,
    model_config,
    parse_workload_arguments,
)
from hdrq_lightning.callbacks.compile_ahead import CompileAheadCallback  # noqa: E402
from hdrq_lightning.callbacks.compile_bundles import CompileBundlesCallback  # noqa: E402
from hdrq_lightning.quant.distributed import reconstruction_trainer_arguments  # noqa: E402
from hdrq_lightning.quant.recipe import Recipe  # noqa: E402
from hdrq_lightning.quant.reconstruction import ReconstructionModule  # noqa: E402

FIRST_STEPS = 5  # steps after a unit start or a mode switch counted as one-off (warmup, compile, capture)


class UnitTimer:
    """Engine step hook: synchronises and stamps the clock at unit starts, mode switches and their first steps."""

    def __init__(self, module: ReconstructionModule, recipe: Recipe) -> None:
        self.module, self.recipe, self.stamps = module, recipe, []
        module.step_hooks["timer"] = self

    def marks(self, iters: int) -> dict[int, str]:
        switch = self.recipe.noise.switch_iteration(iters) if self.recipe.noise.enabled else None
        # "last": before a unit's last step; that step, the unit's end and the next unit's cache and activation
        # calibration count as the next unit's cache time
        marks = {0: "start", FIRST_STEPS: "steady", iters - 1: "last"}
        if switch is not None and 0 < switch < iters:
            marks |= {switch: "switch", switch + FIRST_STEPS: "steady2"}
        return marks

    def __call__(self, module: ReconstructionModule) -> None:
        phase = module.phase
        label = self.marks(phase.iters).get(module.phase_iteration)
        if label is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.stamps.append((phase.unit, phase.pass_name, label, module.phase_iteration, time.perf_counter()))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--method", default="hdrq", choices=sorted(PRESETS))
    parser.add_argument("--path", default="fast", choices=sorted(PATHS))
    parser.add_argument("--iters", type=int, default=400, help="iterations per unit in this run")
    parser.add_argument("--target-iters", type=int, default=20000, help="iterations per unit to extrapolate to")
    parser.add_argument("--steps-per-batch", type=int, default=50)
    parser.add_argument("--devices", type=int, default=1, help="> 1: data-parallel over this many GPUs (DDP)")
    parser.add_argument("--compile-bundles", default=None,
                        help="a folder of portable compile bundles (quant.runtime.compile_bundles): loaded as the "
                             "run starts (timed in the first unit's cache seconds), this run's added at its end")
    add_workload_arguments(parser)
    args = parse_workload_arguments(parser)
    cache = compile_cache_state()  # before anything compiles
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("hdrq").setLevel(logging.INFO)  # unit starts, the compile-ahead worker
    module, callbacks = build_engine(args.model, args.method, args.path, args.calibration, args.image,
                                     iters=args.iters, act_iters=max(1, args.iters // 4), batch_size=args.batch,
                                     checkpoint_every=args.steps_per_batch * 10,
                                     steps_per_batch=args.steps_per_batch)
    recipe = module.recipe
    # the noise switch keeps the paper's proportion (16,500 noise + 3,500 fake-quant of 20,000)
    switch = recipe.noise.switch_iteration(args.iters) if recipe.noise.enabled else 0
    if min(switch, args.iters - switch) < 2 * FIRST_STEPS and recipe.noise.enabled or args.iters < 2 * FIRST_STEPS:
        raise SystemExit(f"--iters {args.iters} leaves too few steady steps around the noise switch; use >= 100.")
    bundles = CompileBundlesCallback(args.compile_bundles)
    timer = UnitTimer(module, recipe)  # a step hook: runs before the callbacks' hooks (host work only)
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=args.devices, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, max_epochs=math.ceil(module.total_iters / recipe.checkpoint_every),
                        callbacks=[*callbacks, CompileAheadCallback(model_config(args.model)), bundles],
                        **reconstruction_trainer_arguments(args.devices > 1))
    started = time.perf_counter()
    trainer.fit(module)
    if args.device == "cuda":
        torch.cuda.synchronize()
    ended = time.perf_counter()

    # per unit: one-off seconds (cache + first steps of every mode) and steady seconds per iteration per mode
    units, previous_end = [], started
    by_unit: dict[tuple[int, str], list] = {}
    for stamp in timer.stamps:
        by_unit.setdefault((stamp[0], stamp[1]), []).append(stamp)
    extrapolated = 0.0
    for (block, pass_name), marks in by_unit.items():
        phase = next(p for p in module.plan if p.unit == block and p.pass_name == pass_name)
        times = {label: t for _, _, label, _, t in marks}
        cache_s = times["start"] - previous_end
        target = args.target_iters if pass_name != "activations" else args.target_iters // 4
        last = phase.iters - 1
        segments = []  # (one-off seconds, steady seconds, steady iterations, steady iterations at the target)
        if "switch" in times:
            switch, target_switch = recipe.noise.switch_iteration(phase.iters), recipe.noise.switch_iteration(target)
            segments.append((times["steady"] - times["start"], times["switch"] - times["steady"],
                             switch - FIRST_STEPS, target_switch - FIRST_STEPS))
            segments.append((times["steady2"] - times["switch"], times["last"] - times["steady2"],
                             last - switch - FIRST_STEPS, target - 1 - target_switch - FIRST_STEPS))
        else:
            segments.append((times["steady"] - times["start"], times["last"] - times["steady"],
                             last - FIRST_STEPS, target - 1 - FIRST_STEPS))
        one_off = sum(s[0] for s in segments)
        steady_ms = [1000 * s[1] / max(1, s[2]) for s in segments]
        unit_target = cache_s + one_off + sum(ms / 1000 * s[3] for ms, s in zip(steady_ms, segments))
        extrapolated += unit_target
        units.append({"unit": module.unit_names[block], "pass": pass_name, "cache_s": round(cache_s, 2),
                      "first_steps_s": round(one_off, 2), "steady_ms_per_iter": [round(x, 3) for x in steady_ms],
                      "seconds_at_target": round(unit_target, 1)})
        previous_end = times["last"]
        print(units[-1], flush=True)
    finish_s = ended - previous_end  # the last step, finalising the model, the Trainer's teardown
    extrapolated += finish_s
    cuda = args.device == "cuda"
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "args": vars(args),
              "rank": trainer.global_rank, "world": trainer.world_size,
              "wall_seconds": round(ended - started, 1),
              "extrapolated_minutes": round(extrapolated / 60, 2),
              "one_off_minutes": round((sum(u["cache_s"] + u["first_steps_s"] for u in units) + finish_s) / 60, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None, "units": units}
    if module.runtime.compile:  # where the compile time went (dynamo, AOT autograd, Inductor, Triton), slowest first
        rows = [line.rsplit(None, 1) for line in compile_times(repr="str", aggregate=True).splitlines()]
        timed = sorted(((row[0].rstrip(","), float(row[1])) for row in rows if len(row) == 2 and _is_number(row[1])),
                       key=lambda r: -r[1])
        result["compile_seconds"] = {name: round(seconds, 2) for name, seconds in timed[:25]}
        result["compile_caches"] = {f"{group}.{name}": count for group in ("inductor", "aot_autograd")
                                    for name, count in counters[group].items() if "cache" in name}
    suffix = f"_rank{trainer.global_rank}" if trainer.world_size > 1 else ""
    write_result(args.out, f"full_run_{args.model}_{args.method}_{args.path}{suffix}.json",
                 {**result, "cache": (f"{cache}, {bundles.loaded} compile bundles loaded" if bundles.loaded else cache)
                  if module.runtime.compile else "eager: no compile cache"})
    print(json.dumps({k: v for k, v in result.items() if k != "units"}, indent=2))


if __name__ == "__main__":
    main()
