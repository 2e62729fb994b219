"""SHOT source-free adaptation: frozen classifier, information maximisation, clustering pseudo labels."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from hdrq_lightning.adapt.losses import clustering_pseudo_labels, information_maximization_loss
from hdrq_lightning.adapt.schedules import shot_lr_decay, shot_optimizer
from hdrq_lightning.models.shot import ShotNet


class ShotModule(L.LightningModule):
    """Adapts a source :class:`ShotNet` to one unlabelled target domain.

    Target labels are never used for training: ``pseudo_label_loader`` yields (image, label, index) and only
    images and indices are read; labels are for the validation accuracy alone.
    """

    def __init__(self, model: ShotNet, num_classes: int, pseudo_label_loader: DataLoader | None = None,
                 lr: float = 1e-2, backbone_lr_mult: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 1e-3, nesterov: bool = True, cls_weight: float = 0.3,
                 im_weight: float = 1.0, diversity: bool = True, epsilon: float = 1e-5, pseudo_label_rounds: int = 2,
                 lr_gamma: float = 10.0, lr_power: float = 0.75) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "pseudo_label_loader"])
        self.model = model
        self.pseudo_label_loader = pseudo_label_loader
        for p in self.model.classifier.parameters():
            p.requires_grad_(False)
        num_samples = len(pseudo_label_loader.dataset) if pseudo_label_loader is not None else 0
        self.register_buffer("pseudo_labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    @torch.no_grad()
    def refresh_pseudo_labels(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        features, logits, indices = [], [], []
        for images, _, index in self.pseudo_label_loader:
            feats = self.model.features(images.to(self.device))
            features.append(feats)
            logits.append(self.model.classifier(feats))
            indices.append(index.to(self.device))
        self.model.train(was_training)
        labels = clustering_pseudo_labels(torch.cat(features).float(), torch.cat(logits).float(),
                                          rounds=self.hparams.pseudo_label_rounds)
        self.pseudo_labels[torch.cat(indices)] = labels
        return labels

    def on_train_epoch_start(self) -> None:
        if self.hparams.cls_weight > 0:
            self.refresh_pseudo_labels()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, _, index = batch
        logits = self.model(images)
        im_loss = information_maximization_loss(logits, self.hparams.epsilon, self.hparams.diversity)
        loss = self.hparams.im_weight * im_loss
        if self.hparams.cls_weight > 0:
            pseudo = F.cross_entropy(logits, self.pseudo_labels[index])
            loss = loss + self.hparams.cls_weight * pseudo
            self.log("adapt/train/pseudo_ce", pseudo)
        self.log("adapt/train/im", im_loss)
        self.log("adapt/train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels, _ = batch
        self.val_accuracy.update(self.model(images), labels)
        self.log("adapt/val/acc", self.val_accuracy, prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = shot_optimizer(
            [(self.model.backbone.parameters(), hp.backbone_lr_mult), (self.model.head_parameters(), 1.0)],
            hp.lr, hp.momentum, hp.weight_decay, hp.nesterov)
        scheduler = shot_lr_decay(optimizer, self.trainer.estimated_stepping_batches, hp.lr_gamma, hp.lr_power)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
