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
    """SHOT's self-supervised pseudo labels.

    Features get a constant 1 appended and are L2-normalised; initial centroids are the softmax-weighted feature
    means; each round assigns every sample to the nearest centroid (cosine distance) among the classes that have
    more than ``min_members`` predicted members, then recomputes hard centroids from that assignment.
    """
    features = torch.cat([features, torch.ones(len(features), 1, dtype=features.dtype,
                                               device=features.device)], dim=1)
    features = F.normalize(features, dim=1)
    num_classes = logits.shape[1]
    affinity = F.softmax(logits, dim=1)
    counts = torch.bincount(affinity.argmax(dim=1), minlength=num_classes)
    valid = torch.nonzero(counts > min_members).flatten()
    labels = affinity.argmax(dim=1)
    for _ in range(rounds):
        centroids = affinity.T @ features / (1e-8 + affinity.sum(dim=0)[:, None])
        labels = valid[_cosine_distance(features, centroids[valid]).argmin(dim=1)]
        affinity = F.one_hot(labels, num_classes).to(features.dtype)
    return labels
