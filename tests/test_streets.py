"""The built-in `streets` segmentation benchmark, the segmentation network, HRDA's multi-resolution functions and
the source / HRDA stages through their plug-ins."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from resume import killed_resumed_and_uninterrupted, same_tensors

from hdrq_lightning.artifacts import read_json
from hdrq_lightning.data.streets import STREETS_CLASSES, render_streets
from hdrq_lightning.models.hrda import multires_inference, random_detail_box, slide, training_forward
from hdrq_lightning.models.segnet import build_segnet
from hdrq_lightning.stages.adapt import run_adapt
from hdrq_lightning.stages.source import run_source

SMALL = ["source.iterations=6", "adapt.iterations=4", "adapt.checkpoint_every=2", "data.eval_batch_size=100",
         "adapt.rare_class_sampling.enabled=true"]


def test_render_is_deterministic_cached_and_shifted(tmp_path):
    images, labels = render_streets("city", "test", seed=3)
    again = render_streets("city", "test", seed=3, cache_dir=tmp_path)
    assert np.array_equal(images, again[0]) and np.array_equal(labels, again[1])
    cached = list(tmp_path.glob("streets-v*-city-test-seed3.npz"))
    assert len(cached) == 1
    assert images.shape == (100, 64, 128, 3) and labels.shape == (100, 64, 128)
    assert set(np.unique(labels)) <= set(range(len(STREETS_CLASSES)))
    for domain in ("game", "dusty"):  # every class occurs in every domain's test split
        assert len(np.unique(render_streets(domain, "test")[1])) == len(STREETS_CLASSES)
    # the shift: same layout statistics per class colour family, other rendering
    game = render_streets("game", "test")[0].astype(float)
    assert abs(game.mean() - images.mean()) > 5 or abs(game.std() - images.std()) > 5


def test_segnet_outputs_quarter_resolution_and_multires_limits():
    torch.manual_seed(0)
    model = build_segnet("resnet_tiny", num_classes=10, embed_dim=16, fuse_dim=16, attention_dim=8).eval()
    x = torch.randn(2, 3, 64, 128)
    assert model(x).shape == (2, 10, 16, 32)
    # one detail window covering the whole input equals the single-window slide
    whole = slide(model, x, (64, 128), (64, 128), 10)
    assert torch.allclose(whole, model(x), atol=1e-5)
    # with the attention pushed to 0 the fused logits are the context pass alone; at 1 the detail pass alone
    with torch.no_grad():
        model.attention_head.classifier.bias.fill_(-1e4)
        fused = multires_inference(model, x, 0.5, (32, 32), (16, 16))
        context = torch.nn.functional.interpolate(
            model(torch.nn.functional.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)),
            size=(16, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(fused, context, atol=1e-5)
        model.attention_head.classifier.bias.fill_(1e4)
        fused = multires_inference(model, x, 0.5, (32, 32), (16, 16))
        assert torch.allclose(fused, slide(model, x, (32, 32), (16, 16), 10), atol=1e-5)
    # training: the detail logits land inside the box, context outside
    box = random_detail_box(64, 64, (32, 32), generator=torch.Generator().manual_seed(1))
    assert all(v % 8 == 0 for v in box) and box[2] - box[0] == 32
    fused, detail = training_forward(model, x[:, :, :, :64], box)
    assert fused.shape == (2, 10, 16, 16) and detail.shape == (2, 10, 8, 8)


def test_source_and_hrda_through_the_plugins(streets_cfg, tmp_path):
    source = run_source(streets_cfg("source", *SMALL))
    assert source["metric"] == "mIoU" and set(source["test_acc"]) == {"game", "city", "dusty"}
    adapted = run_adapt(streets_cfg("adapt", *SMALL))
    assert set(adapted) == {"city", "dusty"}
    for target, record in adapted.items():
        assert record["method"] == "hrda" and {"source_only_acc", "adapted_acc"} <= set(record)
        checkpoint = torch.load(tmp_path / "runs" / "streets" / "adapt" / target / "checkpoints" / "last.ckpt",
                                map_location="cpu", weights_only=False)
        assert any(k.startswith("teacher.") for k in checkpoint["state_dict"])  # the EMA teacher is resumable
        assert checkpoint["global_step"] == 4
    assert read_json(tmp_path / "runs" / "streets" / "adapt" / "city" / "metrics.json")["status"] == "done"


@pytest.mark.slow
def test_streets_shift_is_real_and_hrda_recovers_part_of_it(streets_cfg):
    """The benchmark's contract (seed 0, the experiment's settings): source test >= 75 mIoU, source-only clearly
    lower on each target, HRDA >= source-only + 5 on each target."""
    source = run_source(streets_cfg("source"))
    adapted = run_adapt(streets_cfg("adapt"))
    assert source["test_acc"]["game"] >= 75
    for target in ("city", "dusty"):
        assert adapted[target]["source_only_acc"] <= source["test_acc"]["game"] - 10
        assert adapted[target]["adapted_acc"] >= adapted[target]["source_only_acc"] + 5


@pytest.mark.slow
def test_killed_hrda_resumes_to_the_same_weights(streets_cfg, tmp_path):
    """Killed after its first epoch's checkpoint and re-run, HRDA resumes (teacher, optimizer, schedule and step
    counter from the checkpoint; every draw from (seed, step)) and ends with the weights of an uninterrupted run."""
    run_source(streets_cfg("source", "source.iterations=6"))
    resumed, uninterrupted, log = killed_resumed_and_uninterrupted(
        ["adapt", "experiment=streets", "source.iterations=6", "adapt.iterations=60", "adapt.checkpoint_every=20",
         "data.targets=[city]", "trainer.accelerator=cpu", "threads=2"], tmp_path / "runs", "streets/adapt/city",
        "streets/source", tmp_path)
    assert "resuming adapt/city from checkpoint" in log
    assert same_tensors(resumed, uninterrupted)
