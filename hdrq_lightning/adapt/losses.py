"""SHOT's objectives: information maximisation and clustering pseudo labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def information_maximization_loss(logits: torch.Tensor, epsilon: float = 1e-5,
                                  diversity: bool = True) -> torch.Tensor:
    """Mean per-sample entropy minus the entropy of the batch-mean prediction (SHOT's IM loss)."""
    probs = F.softmax(logits, dim=1)
    loss = -(probs * torch.log(probs + epsilon)).sum(dim=1).mean()
    if diversity:
        mean_probs = probs.mean(dim=0)
        loss = loss + (mean_probs * torch.log(mean_probs + epsilon)).sum()
    return loss


def _cosine_distance(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    return 1.0 - F.normalize(features, dim=1) @ F.normalize(centroids, dim=1).T


@torch.no_grad()
def clustering_pseudo_labels(features: torch.Tensor, logits: torch.Tensor, rounds: int = 2,
                             min_members: int = 0) -> torch.Tensor:
    """SHOT's self-supervised pseudo labels (``obtain_label`` of the official code).

    Features get a constant 1 appended and are L2-normalised; initial centroids are the softmax-weighted feature
    means. Each round, as SHOT, first finds the classes that currently have more than ``min_members`` members
    (round 1: by the argmax prediction; later rounds: by the previous round's assignment), assigns every sample to
    the nearest of those classes' centroids (cosine distance), then recomputes hard centroids from that
    assignment. A class emptied in one round is thus out of the next: its centroid would be zero, at cosine
    distance exactly 1, closer than any centroid with negative cosine.
    """
    features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype,
                                               device=features.device)], dim=1)
    features = F.normalize(features, dim=1)
    num_classes = logits.shape[1]
    affinity = F.softmax(logits, dim=1)
    labels = affinity.argmax(dim=1)
    for _ in range(rounds):
        centroids = affinity.T @ features / (1e-8 + affinity.sum(dim=0)[:, None])
        counts = torch.bincount(labels, minlength=num_classes)
        valid = torch.nonzero(counts > min_members).flatten()
        labels = valid[_cosine_distance(features, centroids[valid]).argmin(dim=1)]
        affinity = F.one_hot(labels, num_classes).to(features.dtype)
    return labels
