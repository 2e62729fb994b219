"""Per-domain accuracy, mIoU and harmonic means against direct computations, plus a 2-process DDP sync."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.metrics import MultiDomainAccuracy, MultiDomainMeanIoU, harmonic_mean, segmentation_miou

DOMAINS = ["art", "clipart", "product"]
NUM_CLASSES = 5
IGNORE = 255


def _classification_data(seed: int, count: int = 60) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(count, NUM_CLASSES, generator=generator)
    target = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
    target[::3] = logits[::3].argmax(1)  # make accuracies differ from chance
    domain = torch.randint(0, len(DOMAINS), (count,), generator=generator)
    return logits, target, domain


def _segmentation_data(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, NUM_CLASSES, 6, 7, generator=generator)
    target = torch.randint(0, NUM_CLASSES - 1, (4, 6, 7), generator=generator)  # class 4 never labelled
    agree = torch.rand(4, 6, 7, generator=generator) < 0.5
    target = torch.where(agree, logits.argmax(1), target)
    target[torch.rand(4, 6, 7, generator=generator) < 0.2] = IGNORE
    domain = torch.tensor([0, 1, 1, 0])
    return logits, target, domain


def _brute_force_miou(labels: Tensor, target: Tensor) -> tuple[float, list[float]]:
    """Per-class IoU over non-ignored pixels; classes absent from labels and predictions are skipped."""
    valid = target != IGNORE
    ious = []
    for cls in range(NUM_CLASSES):
        predicted, actual = (labels == cls) & valid, (target == cls) & valid
        union = int((predicted | actual).sum())
        ious.append(float("nan") if union == 0 else 100.0 * int((predicted & actual).sum()) / union)
    present = [iou for iou in ious if not math.isnan(iou)]
    return sum(present) / len(present), ious


def test_harmonic_mean_matches_direct_formula() -> None:
    values = [73.5, 59.2, 83.9]
    assert math.isclose(harmonic_mean(values), 3 / sum(1 / value for value in values), rel_tol=1e-12)
    assert math.isclose(harmonic_mean(torch.tensor(values)), statistics.harmonic_mean(values), rel_tol=1e-6)
    assert harmonic_mean([50.0, 0.0, 70.0]) == 0.0
    with pytest.raises(ConfigError):
        harmonic_mean([])


def test_multi_domain_accuracy_matches_direct_computation() -> None:
    logits, target, domain = _classification_data(0)
    metric = MultiDomainAccuracy(DOMAINS)
    metric.update(logits[:25], target[:25], domain[:25])  # logits, per-sample domains
    metric.update(logits[25:].argmax(1), target[25:], domain[25:])  # labels
    metric.update(logits[:10], target[:10], 2)  # one domain for the batch
    result = metric.compute()
    all_labels = torch.cat([logits.argmax(1), logits[:10].argmax(1)])
    all_targets = torch.cat([target, target[:10]])
    all_domains = torch.cat([domain, torch.full((10,), 2)])
    expected = []
    for index in range(len(DOMAINS)):
        members = all_domains == index
        expected.append(
            100.0 * float((all_labels[members] == all_targets[members]).sum()) / int(members.sum())
        )
    torch.testing.assert_close(result["per_domain"], torch.tensor(expected))
    assert math.isclose(float(result["hmean"]), statistics.harmonic_mean(expected), rel_tol=1e-5)
    assert math.isclose(float(result["mean"]), sum(expected) / 3, rel_tol=1e-5)


def test_multi_domain_accuracy_rejects_an_unknown_domain_index() -> None:
    with pytest.raises(ConfigError, match="out of range"):
        MultiDomainAccuracy(DOMAINS).update(
            torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 3
        )


def test_multi_domain_miou_matches_brute_force() -> None:
    logits, target, domain = _segmentation_data(0)
    metric = MultiDomainMeanIoU(["cityscapes", "idd"], num_classes=NUM_CLASSES, ignore_index=IGNORE)
    metric.update(logits[:2], target[:2], domain[:2])
    metric.update(logits[2:].argmax(1), target[2:], domain[2:])
    result = metric.compute()
    labels = logits.argmax(1)
    expected = []
    for index in range(2):
        miou, ious = _brute_force_miou(labels[domain == index], target[domain == index])
        expected.append(miou)
        torch.testing.assert_close(result["per_class"][index], torch.tensor(ious), equal_nan=True)
    torch.testing.assert_close(result["per_domain"], torch.tensor(expected))
    assert math.isclose(float(result["hmean"]), statistics.harmonic_mean(expected), rel_tol=1e-5)


def test_segmentation_miou_matches_brute_force() -> None:
    logits, target, _ = _segmentation_data(1)
    metric = segmentation_miou(num_classes=NUM_CLASSES, ignore_index=IGNORE)
    metric.update(logits.argmax(1), target)
    expected, _ = _brute_force_miou(logits.argmax(1), target)
    assert math.isclose(100.0 * float(metric.compute()), expected, rel_tol=1e-5)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Each rank updates its own shard; compute() must see all shards."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        logits, target, domain = _classification_data(0)
        accuracy = MultiDomainAccuracy(DOMAINS)
        accuracy.update(logits[rank::world_size], target[rank::world_size], domain[rank::world_size])
        seg_logits, seg_target, seg_domain = _segmentation_data(0)
        miou = MultiDomainMeanIoU(["cityscapes", "idd"], num_classes=NUM_CLASSES, ignore_index=IGNORE)
        miou.update(seg_logits[rank::world_size], seg_target[rank::world_size], seg_domain[rank::world_size])
        torch.save({"accuracy": accuracy.compute(), "miou": miou.compute()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# spawning two interpreters that import torchmetrics takes ~10 s
def test_metrics_synchronise_across_two_processes(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    logits, target, domain = _classification_data(0)
    accuracy = MultiDomainAccuracy(DOMAINS)
    accuracy.update(logits, target, domain)
    seg_logits, seg_target, seg_domain = _segmentation_data(0)
    miou = MultiDomainMeanIoU(["cityscapes", "idd"], num_classes=NUM_CLASSES, ignore_index=IGNORE)
    miou.update(seg_logits, seg_target, seg_domain)
    single = {"accuracy": accuracy.compute(), "miou": miou.compute()}
    for rank in range(2):
        distributed = torch.load(tmp_path / f"rank{rank}.pt")
        for metric_name, values in single.items():
            for key, value in values.items():
                torch.testing.assert_close(distributed[metric_name][key], value, equal_nan=True)


def test_classification_task_scores_and_loss_against_a_loop():
    """The task object's metric, hits and summed loss equal a plain loop over the samples."""
    from hdrq_lightning.tasks import ClassificationTask

    task = ClassificationTask()
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    metric = task.metric(["a", "b"])
    metric.update(logits[:20], labels[:20], 0)
    metric.update(logits[20:], labels[20:], 1)
    result = metric.compute()
    for domain, rows in ((0, range(20)), (1, range(20, 50))):
        correct = sum(int(logits[i].argmax()) == int(labels[i]) for i in rows)
        assert abs(float(result["per_domain"][domain]) - 100.0 * correct / len(rows)) < 1e-4
    assert task.hits(logits, labels) == (sum(int(logits[i].argmax()) == int(labels[i]) for i in range(50)), 50)
    expected = sum(-math.log(float(torch.softmax(logits[i], 0)[labels[i]])) for i in range(50))
    assert abs(task.loss(logits, labels, reduction="sum").item() - expected) < 1e-3
