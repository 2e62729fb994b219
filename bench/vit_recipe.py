"""Does a tiny from-scratch ViT learn the built-in digits on a 2-core CPU? (A probe for issue 18's transformer
benchmark, after bench/tasks_vit_spike.py's base did not learn its pretext.)

    python bench/vit_recipe.py --out bench/results     # about 3 CPU-minutes on 2 threads

Supervised digit classification on the `clean` domain (the project's seeded train/test pools, 1,347 / 450 images
at 32 px), timm `vit_tiny_patch16_224` resized by keyword (img_size 32, patch size, width, depth, 4 heads), random
init; the recipe: per-channel standardisation, random shifts of up to 2 px, label smoothing 0.1, AdamW (weight
decay 0.05), one-cycle schedule with 15% warm-up, batch 64. Each configuration's train and test accuracy and
seconds are written to vit_recipe_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402
from hdrq_lightning.data.builtin_tasks import digits_tensors  # noqa: E402


def run(data, patch: int, width: int, depth: int, epochs: int, lr: float, seed: int) -> dict:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=patch,
                              embed_dim=width, depth=depth, num_heads=4, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * ((len(ytr) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(ytr)).split(64):
            shift = (int(torch.randint(-2, 3, ())), int(torch.randint(-2, 3, ())))
            loss = F.cross_entropy(model(torch.roll(xtr[idx], shifts=shift, dims=(2, 3))), ytr[idx],
                                   label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        test = float((model(xte).argmax(1) == yte).float().mean()) * 100
        train = float((model(xtr).argmax(1) == ytr).float().mean()) * 100
    row = {"patch": patch, "width": width, "depth": depth, "epochs": epochs, "lr": lr, "train_acc": round(train, 2),
           "test_acc": round(test, 2), "seconds": round(time.perf_counter() - started, 1)}
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=["8,96,4,80,1e-3", "4,96,4,30,1e-3"],
                        help="patch,width,depth,epochs,lr per run")
    args = parser.parse_args()
    torch.set_num_threads(2)
    (xtr, ytr), (xte, yte) = digits_tensors("clean", "train"), digits_tensors("clean", "test")
    mean, std = xtr.mean((0, 2, 3), keepdim=True), xtr.std((0, 2, 3), keepdim=True)
    data = (((xtr - mean) / std, ytr), ((xte - mean) / std, yte))
    rows = []
    for config in args.configs:
        patch, width, depth, epochs, lr = config.split(",")
        rows.append(run(data, int(patch), int(width), int(depth), int(epochs), float(lr), args.seed))
    write_result(args.out, "vit_recipe_cpu.json", {"task": "clean digits, supervised, from scratch", "runs": rows})


if __name__ == "__main__":
    main()
