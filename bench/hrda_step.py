"""One real-size HRDA training step of the paper's network, timed, eager vs bf16, without and with activation
checkpointing (a benchmark, not a test).

    python bench/hrda_step.py --steps 12 --warmup 4 --out bench/results

The official R101 setting: SegNet (resnet101c at output stride 8, DAFormer MLP head 786/128, attention 256), batch 2
source + 2 target crops of 1024x1024, context at 0.5, detail 512 (pseudo labels by detail slides of stride 256),
through ``HrdaModule.training_step`` under a Lightning Trainer (manual optimization: source backward, teacher
pseudo labels, ClassMix, mixed backward, AdamW), random weights and random images (the cost does not depend on them).
Reports ms per step (steady, after ``--warmup``) and the peak GPU memory, fp32 and bf16 autocast, and writes
<out>/hrda_step_<gpu>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402
from hdrq_lightning.adapt.segmentation import HrdaModule  # noqa: E402
from hdrq_lightning.models.segnet import build_segnet  # noqa: E402


class RandomBatches(torch.utils.data.IterableDataset):
    def __init__(self, steps: int, batch: int, size: int, classes: int) -> None:
        self.steps, self.batch, self.size, self.classes = steps, batch, size, classes

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        for _ in range(self.steps):
            image = torch.randn(self.batch, 3, self.size, self.size, generator=g)
            labels = torch.randint(0, self.classes, (self.batch, self.size, self.size), generator=g)
            yield {"source": (image, labels, torch.arange(self.batch)),
                   "target": (torch.randn(self.batch, 3, self.size, self.size, generator=g),
                              torch.ones(self.batch, self.size, self.size, dtype=torch.bool), torch.arange(self.batch))}


class StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.stamps = warmup, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def measure(bf16: bool, steps: int, warmup: int, size: int, detail: int, checkpointing: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build_segnet("resnet101c", num_classes=19)
    dm = types.SimpleNamespace(seed=0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), source="gta5",
                               step_loader=lambda streams, iterations, start, batch_size=None, **_: torch.utils.data.DataLoader(
                                   RandomBatches(iterations, 2, size, 19), batch_size=None))
    module = HrdaModule(model, dm, "cityscapes", iterations=steps, lr=6e-5, warmup=1500, ema_alpha=0.999,
                        detail_size=(detail, detail), detail_stride=(detail // 2, detail // 2), bf16=bf16,
                        activation_checkpointing=checkpointing)
    timer = StepTimer(warmup)
    trainer = L.Trainer(accelerator="gpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, callbacks=[timer],
                        enable_model_summary=False)
    trainer.fit(module)
    steady = [b - a for a, b in zip(timer.stamps[warmup:], timer.stamps[warmup + 1:])]
    return {"bf16": bf16, "activation_checkpointing": checkpointing, "ms_per_step": round(1000 * sum(steady) / len(steady), 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "steady_steps": len(steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--crop", type=int, default=1024)
    parser.add_argument("--detail", type=int, default=512)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/hrda_step.py needs a CUDA device.")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    results = [measure(bf16, args.steps, args.warmup, args.crop, args.detail, checkpointing)
               for checkpointing in (False, True) for bf16 in (False, True)]
    for r in results:
        print(json.dumps(r), flush=True)
    gpu = torch.cuda.get_device_name()
    write_result(args.out, f"hrda_step_{'h200' if 'H200' in gpu else 'gpu'}.json",
                 {"gpu": gpu, "crop": args.crop, "detail": args.detail, "batch": "2 + 2", "results": results})

if __name__ == "__main__":
    main()
