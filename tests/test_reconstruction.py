"""The block-reconstruction engine: unit partition, presets, determinism and mid-block resume."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from hdrq_lightning.artifacts import AtomicCheckpointIO
from hdrq_lightning.callbacks import DistanceRegularizer, LearningRateSchedule, NoiseToFakeQuantSwitch
from hdrq_lightning.data.datamodule import DomainDataModule
from hdrq_lightning.models.shot import build_shot_net
from hdrq_lightning.quant.facts import reconstruction_units
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import (
    activation_quantizers,
    calibrate_activations,
    quant_layers,
    quantize_model,
)
from hdrq_lightning.quant.recipe import NoiseRecipe, Recipe, WeightRecipe
from hdrq_lightning.quant.reconstruction import ReconstructionModule
from hdrq_lightning.stages.common import epoch_checkpoint

PRESETS = {
    "brecq": dict(passes=["weights", "activations"], input_quant_prob=1.0, drop_prob=0.0),
    "qdrop": dict(passes=["joint"]),
    "hdrq": dict(passes=["joint"], distance_weight=0.05,
                 weight=WeightRecipe(rounding="latent", symmetric=True, learn_scale=True, lr=1e-4,
                                     schedule="warmup_cosine"),
                 noise=NoiseRecipe(enabled=True)),
}


def recipe(method: str, **overrides) -> Recipe:
    return Recipe(method=method, **{"iters": 12, "act_iters": 6, "batch_size": 8, "checkpoint_every": 5,
                                    **PRESETS[method], **overrides})


def callbacks(r: Recipe, source_state: dict[str, torch.Tensor]) -> list:
    found = [LearningRateSchedule(r.warmup_fraction)]
    if r.noise.enabled:
        found.append(NoiseToFakeQuantSwitch(r.noise))
    if r.distance_weight:
        found.append(DistanceRegularizer(source_state, r.distance_weight))
    return found


class KillAtEpoch(Callback):
    """Dies like a killed job: an exception in the middle of fit, no chance to write anything more."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")


def reconstruct(fp, quant, calibration, r, tmp_path=None, max_epochs=None, ckpt_path=None, seed=0, kill_at=None):
    module = ReconstructionModule(fp, quant, calibration, r, seed=seed)
    source = {k: v + 0.01 for k, v in fp.state_dict().items() if k.endswith("weight")}
    checkpointing = {"enable_checkpointing": False, "plugins": []}
    extra_callbacks = []
    if tmp_path is not None:
        extra_callbacks = [epoch_checkpoint(tmp_path)]
        checkpointing = {"enable_checkpointing": True, "plugins": [AtomicCheckpointIO()]}
    if kill_at is not None:
        extra_callbacks.append(KillAtEpoch(kill_at))
    trainer = L.Trainer(max_epochs=max_epochs or math.ceil(module.total_iters / r.checkpoint_every),
                        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks(r, source) + extra_callbacks,
                        **checkpointing)
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    model = build_shot_net("resnet_tiny", 10).eval()
    for m in model.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    fp = fold_batch_norm(model)
    calibration = torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return model, fp, calibration


def test_units_compose_to_the_model(tiny_models):
    model, fp, calibration = tiny_models
    for net in (model, fp, quantize_model(fp, recipe("qdrop").numerics())):
        x = calibration[:4]
        out = x
        for _, unit in reconstruction_units(net):
            out = unit(out)
        torch.testing.assert_close(out, net(x))
    names = [name for name, _ in reconstruction_units(fp)]
    assert names == ["stem", "layer1.0", "layer2.0", "layer3.0", "layer4.0", "head"]


@pytest.mark.parametrize("method", ["brecq", "qdrop", "hdrq"])
def test_every_preset_runs_and_ends_on_the_grid(tiny_models, method):
    _, fp, calibration = tiny_models
    r = recipe(method)
    quant = quantize_model(fp, r.numerics())
    module = reconstruct(fp, quant, calibration, r)
    assert module.iteration == module.total_iters == sum(p.iters for p in module.plan)
    for _, layer in quant_layers(quant):
        q = layer.weight_quantizer
        assert q.mode == "nearest"
        codes = layer.weight / q.scale + q.zero_point
        torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)  # hard weights lie on the grid
    assert all(q.mode == "nearest" and q.drop_prob == 0 for _, q in activation_quantizers(quant))
    assert not any(p.requires_grad for p in quant.parameters())


def test_reconstruction_reduces_the_output_error_of_round_to_nearest(tiny_models):
    _, fp, calibration = tiny_models
    r = recipe("qdrop", iters=40)
    nearest = quantize_model(fp, r.numerics())
    calibrate_activations(nearest, calibration.split(8))  # round-to-nearest weights, MSE activation ranges
    reconstructed = reconstruct(fp, quantize_model(fp, r.numerics()), calibration, r).quant_model
    with torch.no_grad():
        target = fp(calibration)
        error_nearest = F.mse_loss(nearest.eval()(calibration), target).item()
        error_reconstructed = F.mse_loss(reconstructed(calibration), target).item()
    assert error_reconstructed < 0.8 * error_nearest


@pytest.mark.parametrize("method", ["brecq", "hdrq"])
def test_resume_mid_block_equals_uninterrupted_run(tiny_models, tmp_path, method):
    _, fp, calibration = tiny_models
    r = recipe(method)
    initial = quantize_model(fp, r.numerics())
    full = reconstruct(fp, copy.deepcopy(initial), calibration, r).quant_model.state_dict()

    # killed after 3 epochs of 5 iterations: iteration 15, inside unit 1 (iterations 12..23) of the first pass;
    # only the checkpoints written during training exist
    with pytest.raises(RuntimeError, match="killed"):
        reconstruct(fp, copy.deepcopy(initial), calibration, r, tmp_path=tmp_path, kill_at=3)
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["reconstruction"]["step_count"] == 15
    resumed = reconstruct(fp, copy.deepcopy(initial), calibration, r, tmp_path=tmp_path,
                          ckpt_path=str(tmp_path / "last.ckpt")).quant_model.state_dict()
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], atol=0, rtol=0, msg=key)


def test_checkpoint_of_another_recipe_is_refused(tiny_models, tmp_path):
    _, fp, calibration = tiny_models
    r = recipe("qdrop")
    reconstruct(fp, quantize_model(fp, r.numerics()), calibration, r, tmp_path=tmp_path, max_epochs=1)
    other = recipe("qdrop", iters=13)
    with pytest.raises(Exception, match="different quant recipe"):
        reconstruct(fp, quantize_model(fp, other.numerics()), calibration, other, tmp_path=tmp_path,
                    ckpt_path=str(tmp_path / "last.ckpt"))


@pytest.mark.slow
def test_w4a4_on_digits_is_close_to_fp_for_every_preset():
    torch.manual_seed(0)
    dm = DomainDataModule("digits")
    model = build_shot_net("resnet_tiny", 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for _ in range(4):
        model.train()
        for images, labels, _ in dm.loader("clean", "train", augment=True, shuffle=True, drop_last=True):
            loss = F.cross_entropy(model(images), labels, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    fp = fold_batch_norm(model.eval())
    calibration = torch.cat([x for x, _, _ in dm.calibration_loader("clean", size=256)])

    def accuracy(net):
        with torch.no_grad():
            hits = sum((net(x).argmax(1) == y).sum().item() for x, y, _ in dm.loader("clean", "test"))
        return 100.0 * hits / len(dm.dataset("clean", "test"))

    fp_acc = accuracy(fp)
    assert fp_acc > 80
    for method in ("brecq", "qdrop", "hdrq"):
        r = recipe(method, iters=150, act_iters=75, batch_size=32, checkpoint_every=150)
        quant = reconstruct(fp, quantize_model(fp, r.numerics()), calibration, r).quant_model
        assert accuracy(quant) > fp_acc - 5, method


@pytest.mark.parametrize("method", ["brecq", "qdrop", "hdrq"])
def test_qdrop_drops_in_the_current_unit_only_under_the_trainer(tiny_models, method):
    """The models stay in eval mode under a Trainer (it does not switch submodules), so the current unit's activation
    quantizers are put in training mode themselves: QDrop's random drop then acts in every step of the unit, and
    nowhere else. Checked on the live engine before steps of every unit."""
    _, fp, calibration = tiny_models
    r = recipe(method)
    seen = []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if module.finished:
                return
            current = {id(q) for _, q in activation_quantizers(module.quant_units[module.phase.unit])}
            for _, quantizer in activation_quantizers(module.quant_model):
                dropping = quantizer.training and quantizer.drop_prob > 0
                assert dropping == (id(quantizer) in current and r.drop_prob > 0 and module.phase.pass_name !=
                                    "weights"), (module.phase, quantizer)
            if r.drop_prob > 0 and current and module.phase.pass_name != "weights":
                block, inputs = module.quant_units[module.phase.unit], module._cache.quant_input[:4]
                with torch.no_grad():  # the drop is random: two forwards differ
                    seen.append(not torch.equal(block(inputs), block(inputs)))

    module = ReconstructionModule(fp, quantize_model(fp, r.numerics()), calibration, r)
    trainer = L.Trainer(max_epochs=math.ceil(module.total_iters / r.checkpoint_every), accelerator="cpu",
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, enable_checkpointing=False, callbacks=[*callbacks(r, {}), Probe()])
    trainer.fit(module)
    assert not module.quant_model.training
    assert (len(seen) > 0 and all(seen)) if method != "brecq" else seen == []
