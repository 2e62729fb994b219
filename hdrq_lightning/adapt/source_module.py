"""Source training of the SHOT network (label-smoothed cross-entropy, SHOT's SGD schedule)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from hdrq_lightning.adapt.schedules import shot_lr_decay, shot_optimizer
from hdrq_lightning.models.shot import ShotNet


class SourceModule(L.LightningModule):
    """Trains a :class:`ShotNet` on labelled source data; validation accuracy selects the best epoch."""

    def __init__(self, model: ShotNet, num_classes: int, lr: float = 1e-2, backbone_lr_mult: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-3, nesterov: bool = True,
                 label_smoothing: float = 0.1, lr_gamma: float = 10.0, lr_power: float = 0.75) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        loss = F.cross_entropy(self.model(images), labels, label_smoothing=self.hparams.label_smoothing)
        self.log("source/train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels, _ = batch
        self.val_accuracy.update(self.model(images), labels)
        self.log("source/val/acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = shot_optimizer(
            [(self.model.backbone.parameters(), hp.backbone_lr_mult),
             ([*self.model.head_parameters(), *self.model.classifier.parameters()], 1.0)],
            hp.lr, hp.momentum, hp.weight_decay, hp.nesterov)
        scheduler = shot_lr_decay(optimizer, self.trainer.estimated_stepping_batches, hp.lr_gamma, hp.lr_power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
