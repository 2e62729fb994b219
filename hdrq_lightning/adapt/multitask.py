"""Training plug-ins of the multi-task network (models/multitask.py) on the built-in tasks (data/builtin_tasks.py):
the task-arithmetic protocol, with a base trained here instead of downloaded.

- ``PretextModule`` (stage `source`): the encoder trained from scratch on the data module's pretext sets (each
  with its own throw-away head), then one linear probe per task fitted on the frozen base features: the base
  model and its per-task heads, the analogue of a CLIP encoder with its zero-shot heads.
- ``FinetuneModule`` (stage `adapt`): one expert per task, the whole encoder fine-tuned on the task's labelled
  train split with the task's head frozen (the heads stay identical in every expert, so every merge keeps them).

The recipe is bench/vit_recipe.py's (a ViT that learns on a 2-core CPU): AdamW, a one-cycle schedule
(``torch.optim.lr_scheduler.OneCycleLR``) with ``warmup_pct`` warm-up, label smoothing, random shifts of up to
``shift`` pixels. Batches are indexed by step (``EpochBatches``): a resumed run continues with exactly the batches
an uninterrupted one would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

from hdrq_lightning.data.seg_datamodule import step_seed
from hdrq_lightning.errors import ConfigError


class EpochBatches(IterableDataset):
    """Batches of shuffled epochs over in-memory tensors, indexed by step: step t is batch ``t % per_epoch`` of
    epoch ``t // per_epoch``'s permutation (seeded by (seed, epoch)), shifted by up to ``shift`` pixels (seeded by
    (seed, t)). Iterates steps ``start() .. iterations - 1`` (``start`` is read when iteration begins: a resumed
    run's restored step). Items: ``(images, labels, groups)``."""

    def __init__(self, images: Tensor, labels: Tensor, groups: Tensor, batch_size: int, iterations: int,
                 start: Callable[[], int], seed: int, shift: int) -> None:
        self.images, self.labels, self.groups = images, labels, groups
        self.batch_size, self.iterations, self.start = batch_size, iterations, start
        self.seed, self.shift = seed, shift
        self.per_epoch = math.ceil(len(labels) / batch_size)

    def batch(self, step: int) -> tuple[Tensor, Tensor, Tensor]:
        epoch, position = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(step_seed(self.seed, epoch, 0)))
        index = order[position * self.batch_size:(position + 1) * self.batch_size]
        images = self.images[index]
        if self.shift:
            generator = torch.Generator().manual_seed(step_seed(self.seed, step, 1))
            offsets = torch.randint(-self.shift, self.shift + 1, (2,), generator=generator)
            images = torch.roll(images, shifts=(int(offsets[0]), int(offsets[1])), dims=(2, 3))
        return images, self.labels[index], self.groups[index]

    def __iter__(self):
        for step in range(int(self.start()), self.iterations):
            yield self.batch(step)


class _TaskTraining(L.LightningModule):
    """AdamW + one-cycle over ``epochs`` passes of step-indexed batches; subclasses say what trains on what."""

    epochs = 1  # Lightning's epochs: one pass over the step-indexed batches, ended by max_steps = iterations

    def __init__(self, model: nn.Module, dm, epochs: int, lr: float, weight_decay: float, warmup_pct: float,
                 label_smoothing: float, shift: int, batch_size: int) -> None:
        super().__init__()
        if not hasattr(model, "heads") or not hasattr(model, "features"):
            raise ConfigError(f"{type(self).__name__} trains the multi-task network (model=vit_tiny_tasks or "
                              f"model=vit_tasks), not a {type(model).__name__}.")
        for key, value, low in [("epochs", epochs, 1), ("batch_size", batch_size, 1), ("shift", shift, 0)]:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{key}={value!r} must be an integer >= {low}.")
        if not (lr > 0 and weight_decay >= 0 and 0 < warmup_pct < 1 and 0 <= label_smoothing < 1):
            raise ConfigError(f"lr={lr} must be > 0, weight_decay={weight_decay} >= 0, warmup_pct={warmup_pct} in "
                              f"(0, 1) and label_smoothing={label_smoothing} in [0, 1).")
        self.model, self.dm = model, dm
        self.data_epochs, self.lr, self.weight_decay, self.warmup_pct = epochs, lr, weight_decay, warmup_pct
        self.label_smoothing, self.shift, self.batch_size = label_smoothing, shift, batch_size
        self.seed = int(getattr(dm, "seed", 0))
        self.iterations = 0  # set by the subclass once its data is known

    def _set_data(self, images: Tensor, labels: Tensor, groups: Tensor, salt: int) -> None:
        self._data = (images, labels, groups, salt)
        self.iterations = self.data_epochs * math.ceil(len(labels) / self.batch_size)

    def trainable(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        images, labels, groups, salt = self._data
        return DataLoader(EpochBatches(images, labels, groups, self.batch_size, self.iterations,
                                       start=lambda: self.global_step, seed=self.seed * 31 + salt, shift=self.shift),
                          batch_size=None, shuffle=False)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable(), lr=self.lr, weight_decay=self.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=max(1, self.iterations),
                                                       pct_start=self.warmup_pct)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def logistic_regression(head: nn.Linear, features: Tensor, labels: Tensor, weight_decay: float, steps: int) -> None:
    """``head`` <- argmin mean CE(head(features), labels) + weight_decay / 2 x ||weight||^2 (bias free), by L-BFGS
    (strong Wolfe line search) from ``head``'s current values, at most ``steps`` iterations."""
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=50, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(features), labels) + 0.5 * weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)


class PretextModule(_TaskTraining):
    """The base: the encoder on the pretext sets (``dm.pretext_sets()``), each set with its own head (kept in this
    module, not in the network), then ``fit_probes``: each task's head fitted on the frozen base features."""

    def __init__(self, model: nn.Module, dm, epochs: int = 60, lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_pct: float = 0.15, label_smoothing: float = 0.1, shift: int = 2, batch_size: int = 64,
                 probe_steps: int = 300, probe_weight_decay: float = 1e-3) -> None:
        super().__init__(model, dm, epochs, lr, weight_decay, warmup_pct, label_smoothing, shift, batch_size)
        if not hasattr(dm, "pretext_sets"):
            raise ConfigError("source=pretext trains the base on the data module's pretext sets; this data has none "
                              "(use data=builtin_tasks, or give the base model as a file: pmq.models.base).")
        if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 0 or probe_weight_decay < 0:
            raise ConfigError(f"probe_steps={probe_steps!r} must be an integer >= 0 and probe_weight_decay="
                              f"{probe_weight_decay} >= 0.")
        self.probe_steps, self.probe_weight_decay = probe_steps, probe_weight_decay
        sets = dm.pretext_sets()
        width = model.encoder.num_features
        self.pretext_heads = nn.ModuleList(nn.Linear(width, len(items.classes)) for _, items in sets)
        self._set_data(torch.cat([items.images for _, items in sets]), torch.cat([items.labels for _, items in sets]),
                       torch.cat([torch.full((len(items),), g) for g, (_, items) in enumerate(sets)]), salt=0)

    def trainable(self) -> list[nn.Parameter]:
        return [*self.model.encoder.parameters(), *self.pretext_heads.parameters()]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels, groups = batch
        features = self.model.features(images)
        loss = features.new_zeros(())
        for g, head in enumerate(self.pretext_heads):
            member = groups == g
            if member.any():
                loss = loss + F.cross_entropy(head(features[member]), labels[member],
                                              label_smoothing=self.label_smoothing) * member.sum() / len(labels)
        self.log("source/train/loss", loss, prog_bar=True)
        return loss

    def on_fit_end(self) -> None:
        self.fit_probes()

    @torch.no_grad()
    def _features(self, images: Tensor) -> Tensor:
        return torch.cat([self.model.features(chunk.to(self.device)) for chunk in images.split(256)])

    def fit_probes(self) -> None:
        """Each task's head: the L2-regularised logistic regression (``probe_weight_decay`` / 2 x ||W||^2, bias
        free) of the frozen encoder's features of the task's train split, solved by L-BFGS from zero (at most
        ``probe_steps`` iterations; a convex problem: no seed, no learning rate)."""
        was_training = self.model.training
        self.model.eval()
        for task in self.dm.targets:
            train = self.dm.dataset(task, "train")
            features, labels = self._features(train.images), train.labels.to(self.device)
            head = self.model.heads[task]
            with torch.no_grad():
                head.weight.zero_()
                head.bias.zero_()
            if self.probe_steps == 0:
                continue
            with torch.enable_grad():
                logistic_regression(head, features, labels, self.probe_weight_decay, self.probe_steps)
        self.model.train(was_training)


class FinetuneModule(_TaskTraining):
    """One expert: the encoder fine-tuned on ``target``'s labelled train split, the task's head frozen."""

    def __init__(self, model: nn.Module, dm, target: str, epochs: int = 10, lr: float = 3e-4,
                 weight_decay: float = 0.05, warmup_pct: float = 0.15, label_smoothing: float = 0.1, shift: int = 2,
                 batch_size: int = 64) -> None:
        super().__init__(model, dm, epochs, lr, weight_decay, warmup_pct, label_smoothing, shift, batch_size)
        model.select_task(target)
        model.heads.requires_grad_(False)
        train = dm.dataset(target, "train")
        self._set_data(train.images, train.labels, torch.zeros(len(train), dtype=torch.long),
                       salt=1 + list(dm.targets).index(target))

    def trainable(self) -> list[nn.Parameter]:
        return list(self.model.encoder.parameters())

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, labels, _ = batch
        loss = F.cross_entropy(self.model(images), labels, label_smoothing=self.label_smoothing)
        self.log("adapt/train/loss", loss, prog_bar=True)
        return loss
