"""SHOT's losses and pseudo labels against independent (loop / numpy) computations."""

import numpy as np
import pytest
import torch

from hdrq_lightning.adapt.losses import clustering_pseudo_labels, information_maximization_loss
from hdrq_lightning.adapt.schedules import shot_lr_decay, shot_optimizer


def test_information_maximization_matches_numpy():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits, 1).numpy().astype(np.float64)
    eps = 1e-5
    entropy = np.mean([-sum(p[i, c] * np.log(p[i, c] + eps) for c in range(4)) for i in range(6)])
    mean = p.mean(0)
    diversity = sum(mean[c] * np.log(mean[c] + eps) for c in range(4))
    assert information_maximization_loss(logits, eps).item() == pytest.approx(entropy + diversity, rel=1e-5)
    assert information_maximization_loss(logits, eps, diversity=False).item() == pytest.approx(entropy, rel=1e-5)


def _brute_force_labels(features: np.ndarray, logits: np.ndarray, rounds: int) -> np.ndarray:
    """Loop version of SHOT's obtain_label: soft centroids, then hard re-assignment rounds."""
    n, k = logits.shape
    feats = np.concatenate([features, np.ones((n, 1))], 1)
    feats = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    counts = np.bincount(probs.argmax(1), minlength=k)
    valid = [c for c in range(k) if counts[c] > 0]
    weights = probs
    labels = probs.argmax(1)
    for _ in range(rounds):
        centroids = {}
        for c in valid:
            centroids[c] = sum(weights[i, c] * feats[i] for i in range(n)) / (1e-8 + weights[:, c].sum())
        labels = np.empty(n, dtype=int)
        for i in range(n):
            # a class left without members has a zero centroid: cosine similarity 0 (distance 1)
            distances = {c: 1 - feats[i] @ centroids[c] / max(np.linalg.norm(centroids[c]), 1e-12)
                         for c in valid}
            labels[i] = min(distances, key=distances.get)
        weights = np.eye(k)[labels]
    return labels


@pytest.mark.parametrize("rounds", [1, 2])
def test_pseudo_labels_match_brute_force_nearest_centroid(rounds):
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 8, generator=g) * 3
    truth = torch.randint(0, 5, (60,), generator=g)
    features = centers[truth] + torch.randn(60, 8, generator=g)
    logits = torch.randn(60, 6, generator=g)  # 6 classes, noisy predictions; some classes may be empty
    labels = clustering_pseudo_labels(features.double(), logits.double(), rounds=rounds)
    expected = _brute_force_labels(features.double().numpy(), logits.double().numpy(), rounds)
    assert labels.tolist() == expected.tolist()


def test_pseudo_labels_recover_clusters():
    g = torch.Generator().manual_seed(2)
    centers = torch.eye(4) * 10
    truth = torch.arange(4).repeat(25)
    features = centers[truth] + 0.5 * torch.randn(100, 4, generator=g)
    logits = 4 * torch.nn.functional.one_hot(truth, 4).float() + 3 * torch.randn(100, 4, generator=g)
    labels = clustering_pseudo_labels(features, logits)
    assert (labels == truth).float().mean() > 0.95
    assert (labels == truth).float().mean() >= (logits.argmax(1) == truth).float().mean()


def test_shot_lr_decay_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = shot_optimizer([([param], 0.1)], lr=1e-2, momentum=0.9, weight_decay=0.0, nesterov=True)
    scheduler = shot_lr_decay(optimizer, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-3)
    assert lrs[50] == pytest.approx(1e-3 * (1 + 10 * 0.5) ** -0.75)
