"""The CUDA kernels of one reconstruction step of one unit, by time (a profiling aid, not a test).

    python bench/profile_step.py --model resnet50 --unit layer1.1 --method hdrq --mode noise --path fast

Steps run uncaptured (the graph would hide its kernels from the profiler) after a few warm-up steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.reconstruction import PATHS, PRESETS, build_engine, drive_directly  # noqa: E402


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
    parser.add_argument("--sources", type=int, default=0,
                        help="also print the source of the N slowest Inductor kernels (read from its cache folder)")
    args = parser.parse_args()
    module, callbacks = build_engine(args.model, args.method, args.path, args.calibration, iters=20000,
                                     batch_size=32, cuda_graphs=False)
    module = drive_directly(module, callbacks, "cuda")
    phase = next(p for p in module.plan if p.unit == module.unit_names.index(args.unit))
    noise = module.recipe.noise
    # the noise switch (a step hook) sets the mode from the iteration: start where the wanted mode runs
    switch = noise.switch_iteration(phase.iters) if args.mode == "nearest" and noise.enabled else 0
    module.seek(phase.start + switch, enter=True)
    for _ in range(5):
        module.reconstruction_step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            module.reconstruction_step()
        torch.cuda.synchronize()
    print(f"{args.model} {args.unit} {args.method} {args.mode} {args.path}: per step")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.sources:
        print_kernel_sources(prof, args.sources)


def print_kernel_sources(prof, count: int) -> None:
    """The generated source of the ``count`` Triton kernels (``triton_*``) with the most CUDA time."""
    import os

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    events = sorted((e for e in prof.key_averages() if e.key.startswith("triton_")),
                    key=lambda e: -e.device_time_total)[:count]
    files = list(Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir()).rglob("*.py"))
    for event in events:
        for path in files:
            text = path.read_text(errors="replace")
            start = text.find(f"def {event.key}(")
            if start >= 0:
                decorator = text.rfind("@triton", 0, start)
                print(f"\n# {event.key}: {event.device_time_total / 1000:.3f} ms in all ({path.name})")
                end = text.find("'''", start)  # the end of the kernel's source string in Inductor's module
                print(text[decorator if decorator >= 0 else start:end if end >= 0 else None])
                break


if __name__ == "__main__":
    main()
