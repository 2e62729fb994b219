"""Plain evaluation loops (no Trainer): accuracy of a classifier on a loader."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device | None = None) -> float:
    """Top-1 accuracy in percent; the model is evaluated in eval mode and its mode restored afterwards."""
    device = device or default_device()
    was_training = model.training
    model.eval().to(device)
    metric = MulticlassAccuracy(num_classes, average="micro").to(device)
    for images, labels, _ in loader:
        metric.update(model(images.to(device)), labels.to(device))
    model.train(was_training)
    return round(100.0 * metric.compute().item(), 4)
