"""Plain evaluation loops (no Trainer) driven by a task object (tasks/): per-domain scores and their harmonic mean,
and a fixed-batch evaluator of loss and score for the analysis."""

from __future__ import annotations

import math

import torch
from torch import nn

from hdrq_lightning.metrics import harmonic_mean
from hdrq_lightning.tasks import ClassificationTask


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def evaluate_domains(model: nn.Module, dm, domains: list[str], device: torch.device | None = None,
                     task=None) -> dict:
    """{"per_domain": {domain: score %}, "hmean": %, "mean": %} on each domain's test split (the task's metric,
    default: classification accuracy).

    The model is evaluated in eval mode; its train/eval mode is restored afterwards.
    """
    task = task or ClassificationTask()
    device = device or default_device()
    was_training = model.training
    model.eval().to(device)
    metric = task.metric(domains).to(device)
    for index, domain in enumerate(domains):
        select_task(model, domain)
        for images, labels, _ in dm.loader(domain, "test"):
            metric.update(task.predict(model, images.to(device)), labels.to(device), index)
    model.train(was_training)
    result = metric.compute()
    per_domain = result["per_domain"].reshape(-1)  # torchmetrics squeezes a one-domain result to 0-d
    out = {"per_domain": {d: round(float(a), 4) for d, a in zip(domains, per_domain)},
           "hmean": round(float(result["hmean"]), 4), "mean": round(float(result["mean"]), 4)}
    if "per_class" in result:  # segmentation: IoU per class and domain (None: absent from labels and predictions)
        per_class = result["per_class"].reshape(len(domains), -1)
        out["per_class"] = {d: [None if math.isnan(float(v)) else round(float(v), 4) for v in row]
                            for d, row in zip(domains, per_class)}
    return out


def select_task(model: nn.Module, domain: str) -> None:
    """A network with a head per task (models/multitask.py) answers with the head of ``domain``."""
    select = getattr(model, "select_task", None)
    if callable(select):
        select(domain)


def domain_accuracy(model: nn.Module, dm, domain: str, task=None) -> float:
    """The task's score (%) on one domain's test split (classification: top-1 accuracy)."""
    return evaluate_domains(model, dm, [domain], task=task)["per_domain"][domain]


class DomainEvaluator:
    """The task's loss and score of a model on fixed test batches of a few domains (loaded once): the analysis
    evaluates hundreds of models (interpolation paths, loss surfaces, noise samples) on the same images."""

    def __init__(self, dm, domains: list[str], max_images: int | None, device: torch.device, task=None) -> None:
        self.device, self.task = device, task or ClassificationTask()
        self.batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for domain in domains:
            batches, seen = [], 0
            for images, labels, _ in dm.loader(domain, "test"):
                if max_images is not None and seen >= max_images:
                    break
                batches.append((images.to(device), labels.to(device)))
                seen += len(labels)
            self.batches[domain] = batches

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> tuple[float, float]:
        """(mean over domains of the loss per sample, harmonic mean over domains of the score in %)."""
        model.eval().to(self.device)
        losses, scores = [], []
        for domain, batches in self.batches.items():
            select_task(model, domain)
            total, loss, correct = 0, 0.0, 0
            for images, labels in batches:
                logits = self.task.predict(model, images)
                loss += self.task.loss(logits, labels, reduction="sum").item()
                hit, count = self.task.hits(logits, labels)
                correct, total = correct + hit, total + count
            losses.append(loss / total)
            scores.append(100.0 * correct / total)
        return sum(losses) / len(losses), harmonic_mean(scores)
