"""Spike: do experts of a tiny from-scratch ViT merge, so that E-PMQ gets its multi-task, Linear-layer setting?

    python bench/tasks_vit_spike.py --pretext negative --out bench/results    # about 3 CPU-minutes on 2 threads

The protocol of Task Arithmetic's CLIP recipe, on data that installed packages ship (design note epmq.md 3.2):
(1) a base: a timm ViT (32 px, patch 8 (--patch), width 96, depth 4, 4 heads, random init) trained with
bench/vit_recipe.py's recipe (standardisation, 2-px shifts, label smoothing, AdamW, one-cycle) on a pretext that
is none of the tasks (--pretext rotation: 4-way rotation prediction on `negative` digits and on photo crops;
negative: the `negative` digits' labels and rotation of photo crops); (2) one linear head per task fitted on
frozen base features, then frozen; (3) one expert per task: the whole backbone fine-tuned at a small learning rate
with its head frozen; (4) Task Arithmetic and TIES merges of the backbones (scaling chosen on a held-out part of
the train split); (5) RTN, GPTQ and E-PMQ of every backbone Linear (and the patch conv at 8 bit), W4 and W3, 128
calibration images per task, through the project's driver (pmq/sequential.py). The built-in experiment
`vit_tasks` runs the `negative` protocol as stages (data/builtin_tasks.py, adapt/multitask.py).

Tasks: `digit` (clean digits, 10 classes), `textured` (digits on texture photographs, 10), `parity` (rotated
digits, odd/even), `photo` (which of 10 photographs a 32x32 crop comes from; train crops from the left 70% of each
photo, test crops from the right 30%). Digits use the project's seeded train/test split.

It answers the spike's three questions: (a) experts well above base+probe on every task, (b) the merges below the
experts and above chance, (c) GPTQ at W3 loses points that E-PMQ wins back. Writes tasks_vit_spike_<pretext>_p<patch>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402
from hdrq_lightning.data.builtin_tasks import digits_tensors, photo_crops  # noqa: E402
from hdrq_lightning.merge import get_merge_method  # noqa: E402
from hdrq_lightning.pmq import PostMergeQuantizer, get_pmq_method  # noqa: E402
from hdrq_lightning.quant.facts import QuantFacts  # noqa: E402
from hdrq_lightning.quant.modules import QuantConfig, quantize_model  # noqa: E402


class _Stem(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        return self.vit.norm_pre(self.vit.patch_drop(self.vit._pos_embed(self.vit.patch_embed(x))))


class _Tail(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: Tensor) -> Tensor:
        return self.vit.forward_head(self.vit.norm(x), pre_logits=True)


class ViTBackbone(nn.Module):
    """A timm ViT without head as a model plug-in: units = stem, every block, final norm + CLS pooling."""

    def __init__(self, width: int = 96, depth: int = 4, heads: int = 4, patch: int = 8) -> None:
        super().__init__()
        import timm

        self.vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=patch,
                                     embed_dim=width, depth=depth, num_heads=heads, num_classes=0)
        self.num_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.vit(x)

    reconstruction_chain = True

    def reconstruction_units(self) -> list[tuple[str, nn.Module]]:
        return [("stem", _Stem(self.vit)), *[(f"blocks.{i}", b) for i, b in enumerate(self.vit.blocks)],
                ("tail", _Tail(self.vit))]

    def quant_facts(self) -> QuantFacts:
        return QuantFacts(eight_bit_weights=("vit.patch_embed.proj",))


def build_tasks(seed: int) -> dict[str, dict[str, tuple[Tensor, Tensor]]]:
    rng = np.random.default_rng(seed)
    tasks = {}
    for name, domain in (("digit", "clean"), ("textured", "textured"), ("parity", "rotated")):
        train, test = digits_tensors(domain, "train"), digits_tensors(domain, "test")
        if name == "parity":
            train, test = (train[0], train[1] % 2), (test[0], test[1] % 2)
        tasks[name] = {"train": train, "test": test}
    tasks["photo"] = {"train": photo_crops(134, "left", rng), "test": photo_crops(45, "right", rng)}
    return tasks


def pretext(seed: int, kind: str = "rotation") -> list[tuple[Tensor, Tensor]]:
    """The base's training data, none of the tasks. ``rotation``: 4-way rotation prediction (self-supervised) on
    `negative` digits and on photo crops; ``negative``: the `negative` digits' own labels (a supervised, other-domain
    pretext, as CLIP's base has seen labelled data of other kinds) and rotation prediction on photo crops."""
    rng = np.random.default_rng(seed + 1)
    negative, crops = digits_tensors("negative", "train"), photo_crops(134, "left", rng)[0]
    out = [] if kind == "rotation" else [negative]
    for images in ((negative[0], crops) if kind == "rotation" else (crops,)):
        turns = torch.from_numpy(rng.integers(0, 4, len(images)))
        out.append((torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(images, turns)]), turns))
    return out


def train(backbone: nn.Module, heads: list[nn.Module], data: list[tuple[Tensor, Tensor]], epochs: int, lr: float,
          train_heads: bool, seed: int, batch: int = 64, shift: int = 2) -> None:
    torch.manual_seed(seed)
    head_params = list({id(p): p for h in heads for p in h.parameters()}.values())
    params = list(backbone.parameters()) + (head_params if train_heads else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * sum((len(y) + batch - 1) // batch for _, y in data)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    backbone.train()
    for _ in range(epochs):
        batches = [(t, idx) for t, (_, y) in enumerate(data) for idx in torch.randperm(len(y)).split(batch)]
        for position in torch.randperm(len(batches)).tolist():
            t, idx = batches[position]
            x, y = data[t][0][idx], data[t][1][idx]
            if shift:  # the recipe of bench/vit_recipe.py: random shifts of up to `shift` pixels per batch
                x = torch.roll(x, shifts=tuple(int(v) for v in torch.randint(-shift, shift + 1, (2,))), dims=(2, 3))
            loss = F.cross_entropy(heads[t](backbone(x)), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    backbone.eval()


@torch.no_grad()
def features(backbone: nn.Module, x: Tensor) -> Tensor:
    backbone.eval()
    return torch.cat([backbone(chunk) for chunk in x.split(256)])


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, data: tuple[Tensor, Tensor]) -> float:
    return round(100.0 * float((head(features(backbone, data[0])).argmax(1) == data[1]).float().mean()), 2)


def probe(base: nn.Module, data: tuple[Tensor, Tensor], classes: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(base.num_features, classes)
    f = features(base, data[0])
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        loss = F.cross_entropy(head(f), data[1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.requires_grad_(False)


def spike_checks(record: dict, names: list[str], classes: dict[str, int]) -> dict[str, bool]:
    """The spike's three questions, with absolute margins: an expert counts only when it is well above chance
    (half-way from chance to 100%) and 5 points above base+probe; a merge must stay 10 points above chance on
    average and 3 points below the experts; E-PMQ must beat GPTQ at W3 under every merge."""
    chance = {n: 100.0 / classes[n] for n in names}
    mean = lambda d: float(np.mean([d[n] for n in names]))  # noqa: E731
    merges = list(record["merges"])
    return {
        "a_experts_well_above_chance_and_base_probe": all(
            record["experts"][n] >= max(chance[n] + (100 - chance[n]) / 2, record["base_probe"][n] + 5)
            for n in names),
        "b_merges_between_chance_and_experts": all(
            mean(chance) + 10 < mean(record["merges"][m]) < mean(record["experts"]) - 3 for m in merges),
        "c_epmq_above_gptq_w3": all(record["pmq"][f"{m}_epmq_w3"]["mean"] > record["pmq"][f"{m}_gptq_w3"]["mean"]
                                    for m in merges),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-epochs", type=int, default=60)
    parser.add_argument("--expert-epochs", type=int, default=10)
    parser.add_argument("--pretext", choices=("rotation", "negative"), default="rotation")
    parser.add_argument("--patch", type=int, default=8)
    parser.add_argument("--expert-lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tasks = build_tasks(args.seed)
    names = list(tasks)
    torch.manual_seed(args.seed)
    base = ViTBackbone(patch=args.patch)
    pre = pretext(args.seed, args.pretext)
    # per-channel standardisation with the pretext images' statistics (the recipe), applied to every image
    pooled = torch.cat([x for x, _ in pre])
    mean, std = pooled.mean((0, 2, 3), keepdim=True), pooled.std((0, 2, 3), keepdim=True)
    pre = [((x - mean) / std, y) for x, y in pre]
    tasks = {n: {split: ((x - mean) / std, y) for split, (x, y) in t.items()} for n, t in tasks.items()}
    rotation_head = nn.Linear(96, 4)
    pre_heads = [rotation_head, rotation_head] if args.pretext == "rotation" else [nn.Linear(96, 10), rotation_head]
    train(base, pre_heads, pre, args.base_epochs, 1e-3, train_heads=True, seed=args.seed)
    print(f"base trained ({time.perf_counter() - started:.0f} s); pretext train acc "
          f"{[accuracy(base, h, d) for h, d in zip(pre_heads, pre)]}", flush=True)
    # held-out part of each train split: chooses the merge scaling
    splits = {}
    for name in names:
        x, y = tasks[name]["train"]
        cut = int(0.85 * len(y))
        splits[name] = {"fit": (x[:cut], y[:cut]), "held": (x[cut:], y[cut:]), "test": tasks[name]["test"]}
    heads = {n: probe(base, splits[n]["fit"], int(splits[n]["fit"][1].max()) + 1, args.seed) for n in names}
    record: dict = {"base_probe": {n: accuracy(base, heads[n], splits[n]["test"]) for n in names}}
    experts = []
    for i, name in enumerate(names):
        expert = copy.deepcopy(base)
        train(expert, [heads[name]], [splits[name]["fit"]], args.expert_epochs, args.expert_lr, train_heads=False,
              seed=args.seed + 10 + i)
        experts.append(expert)
    record["experts"] = {n: accuracy(e, heads[n], splits[n]["test"]) for n, e in zip(names, experts)}
    print(f"experts trained ({time.perf_counter() - started:.0f} s)", flush=True)

    def evaluate(backbone: nn.Module, split: str) -> dict[str, float]:
        scores = {n: accuracy(backbone, heads[n], splits[n][split]) for n in names}
        return {**scores, "mean": round(float(np.mean(list(scores.values()))), 2)}

    def merged_model(method: str, **params) -> nn.Module:
        model = copy.deepcopy(base)
        model.load_state_dict(get_merge_method(method, **params).merge([e.state_dict() for e in experts],
                                                                      base=base.state_dict()))
        return model

    merges = {}
    for method, grid in (("task_arithmetic", [0.3, 0.5, 0.7, 1.0]), ("ties", [0.5, 1.0, 1.5])):
        best = max(grid, key=lambda s: evaluate(merged_model(method, scaling=s), "held")["mean"])
        merges[method] = {"scaling": best, "model": merged_model(method, scaling=best)}
    record["merges"] = {m: {"scaling": v["scaling"], **evaluate(v["model"], "test")} for m, v in merges.items()}
    calibration = [splits[n]["fit"][0][:128] for n in names]
    record["pmq"] = {}
    for merge, value in merges.items():
        for bits in (4, 3):
            for method in ("rtn", "gptq", "epmq"):
                deployed = quantize_model(value["model"], QuantConfig(w_bits=bits, a_bits=None, init_search="minmax"),
                                          init_ranges=False)
                PostMergeQuantizer(deployed, value["model"], experts, calibration, get_pmq_method(method)).run()
                record["pmq"][f"{merge}_{method}_w{bits}"] = evaluate(deployed, "test")
                print(f"{merge} {method} W{bits}: {record['pmq'][f'{merge}_{method}_w{bits}']}", flush=True)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["args"] = vars(args)
    record["checks"] = spike_checks(record, names, {n: int(splits[n]["fit"][1].max()) + 1 for n in names})
    print(json.dumps({k: v for k, v in record.items() if k != "pmq"}, indent=1))
    write_result(args.out, f"tasks_vit_spike_{args.pretext}_p{args.patch}.json", record)

if __name__ == "__main__":
    main()
