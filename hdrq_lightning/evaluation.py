"""Plain evaluation loops (no Trainer): per-domain accuracy and their harmonic mean."""

from __future__ import annotations

import torch
from torch import nn

from hdrq_lightning.metrics import MultiDomainAccuracy


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate_domains(model: nn.Module, dm, domains: list[str], device: torch.device | None = None) -> dict:
    """{"per_domain": {domain: acc %}, "hmean": %, "mean": %} on each domain's test split.

    The model is evaluated in eval mode; its train/eval mode is restored afterwards.
    """
    device = device or default_device()
    was_training = model.training
    model.eval().to(device)
    # this process sees every test image: no sync with the others (after a DDP run only rank 0 evaluates)
    metric = MultiDomainAccuracy(domains, sync_on_compute=False).to(device)
    for index, domain in enumerate(domains):
        for images, labels, _ in dm.loader(domain, "test"):
            metric.update(model(images.to(device)), labels.to(device), index)
    model.train(was_training)
    result = metric.compute()
    per_domain = result["per_domain"].reshape(-1)  # torchmetrics squeezes a one-domain result to 0-d
    return {"per_domain": {d: round(float(a), 4) for d, a in zip(domains, per_domain)},
            "hmean": round(float(result["hmean"]), 4), "mean": round(float(result["mean"]), 4)}


def domain_accuracy(model: nn.Module, dm, domain: str) -> float:
    """Top-1 accuracy (%) on one domain's test split."""
    return evaluate_domains(model, dm, [domain])["per_domain"][domain]
