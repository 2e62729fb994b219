"""The CUDA kernels of one reconstruction step of one unit, by time (a profiling aid, not a test).

    python bench/profile_step.py --model resnet50 --unit layer1.1 --method hdrq --mode noise --path fast

Steps run uncaptured (the graph would hide its kernels from the profiler) after a few warm-up steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reconstruction import PATHS, PRESETS  # noqa: E402
from hdrq_lightning.callbacks import CosineWarmup  # noqa: E402
from hdrq_lightning.models.shot import build_shot_net  # noqa: E402
from hdrq_lightning.quant.fold import fold_batch_norm  # noqa: E402
from hdrq_lightning.quant.modules import quantize_model  # noqa: E402
from hdrq_lightning.quant.recipe import Recipe  # noqa: E402
from hdrq_lightning.quant.reconstruction import ReconstructionModule  # noqa: E402
from hdrq_lightning.stages.quantize import quant_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--unit", default="layer1.1")
    parser.add_argument("--method", default="hdrq", choices=sorted(PRESETS))
    parser.add_argument("--mode", default="noise", choices=["noise", "nearest"])
    parser.add_argument("--path", default="fast", choices=sorted(PATHS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--calibration", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    runtime = dataclasses.replace(PATHS[args.path], cuda_graphs=False)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = runtime.tf32
    fp = fold_batch_norm(build_shot_net(args.model, 65).eval())
    recipe = Recipe(method=args.method, iters=20000, batch_size=32, **PRESETS[args.method])
    quant = quantize_model(fp, quant_config(recipe))
    module = ReconstructionModule(fp, quant, torch.randn(args.calibration, 3, 224, 224), recipe,
                                  runtime=runtime).cuda()
    module.configure_optimizers()
    CosineWarmup(recipe.warmup_fraction).attach(module)
    block = module.block_names.index(args.unit)
    module._step = next(p for p in module.plan if p.block == block).start
    module._enter_phase()
    module.set_block_modes(weight=args.mode, activation=args.mode)
    for _ in range(5):
        module.reconstruction_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            module.reconstruction_step()
        torch.cuda.synchronize()
    print(f"{args.model} {args.unit} {args.method} {args.mode} {args.path}: per step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
