"""HRDA's pieces against direct computations: EMA, ClassMix, the confidence weight, fusion, slide inference, the
paper's network and the mmcv importer."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdrq_lightning.adapt.segmentation import HrdaModule, pixel_loss
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.hrda import slide, training_forward
from hdrq_lightning.models.segnet import build_segnet, import_mmcv_state, mmcv_key


def _module(**kwargs) -> HrdaModule:
    torch.manual_seed(0)
    model = build_segnet("resnet_tiny", num_classes=4, embed_dim=8, fuse_dim=8, attention_dim=8)
    dm = types.SimpleNamespace(seed=0, mean=None, std=None)
    return HrdaModule(model, dm, "city", **kwargs)


def test_ema_update_follows_its_formula(monkeypatch):
    module = _module(ema_alpha=0.9)
    teacher0 = [p.clone() for p in module.teacher.parameters()]
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(1.0)
    student = [p.clone() for p in module.model.parameters()]
    module.update_teacher()  # step 0: the teacher stays the initial student
    assert all(torch.equal(t, t0) for t, t0 in zip(module.teacher.parameters(), teacher0))
    for step, expected_alpha in ((1, 0.5), (3, 0.75), (50, 0.9)):
        monkeypatch.setattr(HrdaModule, "global_step", property(lambda self, step=step: step))
        before = [p.clone() for p in module.teacher.parameters()]
        module.update_teacher()
        assert HrdaModule.ema_alpha_at(step, 0.9) == pytest.approx(expected_alpha)
        for t, b, s in zip(module.teacher.parameters(), before, student):
            assert torch.allclose(t, expected_alpha * b + (1 - expected_alpha) * s)


def test_classmix_masks_take_half_the_classes():
    module = _module(classes_from="image")
    torch.manual_seed(1)
    labels = torch.tensor([[[0, 1], [2, 255]], [[3, 3], [3, 3]]])
    masks = module.class_masks(labels)
    first = torch.unique(labels[0][masks[0]])
    assert len(first) == 2 and set(first.tolist()) <= {0, 1, 2}  # ceil(3 / 2) of the image's own classes
    assert masks[1].all() or not masks[1].any()
    module.classes_from = "batch"  # the official code: the batch's classes (255 included), half per image
    masks = module.class_masks(labels)
    for image, mask in zip(labels, masks):
        assert torch.equal(mask, torch.isin(image, image[mask]))  # whole classes, never part of one


def test_confidence_weight_is_the_share_of_confident_pixels():
    module = _module(pseudo_threshold=0.9)
    logits = torch.full((2, 4, 2, 2), -10.0)
    logits[:, 1] = 10.0  # confident class 1 ...
    logits[0, :, 0, 0] = 0.0  # ... except one pixel (uniform)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[1, :, 4:] = False  # padding
    module.teacher.forward = lambda x: logits
    module.teacher.features = lambda x: [x]
    module.teacher.decode = lambda levels: logits
    module.teacher.attention = lambda levels: torch.full_like(logits, -1e4)  # context only
    pseudo, weights = module.pseudo_labels(torch.zeros(2, 3, 8, 8), valid)
    probabilities = torch.softmax(F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False), 1)
    confident = ((probabilities.max(1).values >= 0.9) & valid).sum()
    assert 0 < confident < valid.sum()  # the uniform corner is not confident
    assert weights.max() == pytest.approx(float(confident) / valid.numel())
    assert torch.all(weights[1, :, 4:] == 0) and torch.all(pseudo[1, :, 4:] == 255)
    assert torch.equal(pseudo[valid], probabilities.argmax(1)[valid])
    module.margins = (1, 2, 0, 3)
    _, weights = module.pseudo_labels(torch.zeros(2, 3, 8, 8), valid)
    assert torch.all(weights[:, :1] == 0) and torch.all(weights[:, -2:] == 0) and torch.all(weights[:, :, -3:] == 0)


def test_fusion_equals_the_direct_computation():
    torch.manual_seed(2)
    model = build_segnet("resnet_tiny", num_classes=3, embed_dim=8, fuse_dim=8, attention_dim=8).eval()
    crop = torch.randn(1, 3, 64, 64)
    box = (16, 24, 48, 56)
    fused, detail = training_forward(model, crop, box, 0.5)
    context_in = F.interpolate(crop, scale_factor=0.5, mode="bilinear", align_corners=False)
    levels = model.features(context_in)
    context = F.interpolate(model.decode(levels), size=(16, 16), mode="bilinear", align_corners=False)
    attention = torch.sigmoid(F.interpolate(model.attention(levels), size=(16, 16), mode="bilinear",
                                            align_corners=False))
    hr = model(crop[:, :, 16:48, 24:56])
    expected = context.clone()
    a = attention[:, :, 4:12, 6:14]
    expected[:, :, 4:12, 6:14] = a * hr + (1 - a) * context[:, :, 4:12, 6:14]
    assert torch.allclose(fused, expected, atol=1e-5) and torch.allclose(detail, hr, atol=1e-6)


def test_sliding_windows_equal_the_whole_image_for_a_translation_equivariant_model():
    class Pointwise(nn.Module):  # a 1x1 conv then 4x4 average pooling: translation-equivariant at stride 4
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x):
            return F.avg_pool2d(self.conv(x), 4)

    model = Pointwise()
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert torch.allclose(slide(model, x, (16, 32), (8, 16), 5), model(x), atol=1e-5)


def test_loss_is_the_mean_over_all_pixels_with_ignored_ones_as_zero():
    logits = torch.randn(1, 3, 2, 2)
    labels = torch.tensor([[[0, 255], [2, 1]]])
    per_pixel = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    assert pixel_loss(logits, labels) == pytest.approx(float(per_pixel.sum() / 4))


def test_paper_network_levels_and_dilations():
    model = build_segnet("resnet101c", num_classes=19)
    encoder = model.encoder.model
    assert model.encoder.out_channels == [256, 512, 1024, 2048]
    assert [type(m).__name__ for m in encoder.conv1] == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["Conv2d"]
    assert [encoder.conv1[i].out_channels for i in (0, 3, 6)] == [32, 32, 64]  # ResNetV1c's deep stem
    assert (encoder.layer3[0].conv2.dilation, encoder.layer3[1].conv2.dilation) == ((1, 1), (2, 2))
    assert (encoder.layer4[0].conv2.dilation, encoder.layer4[1].conv2.dilation) == ((2, 2), (4, 4))
    assert model.head.embed[0].out_features == 786 and model.head.fuse[0].out_channels == 128
    assert model.attention_head.embed[0].out_features == 256
    with torch.no_grad():
        levels = model.eval().features(torch.randn(1, 3, 64, 64))
    assert [tuple(level.shape[-2:]) for level in levels] == [(16, 16), (8, 8), (8, 8), (8, 8)]


def test_mmcv_import_round_trip():
    """A synthetic mmcv-style state dict (written from a SegNet by the inverse of the key map) imports back to
    the same tensors under the same SegNet keys."""
    model = build_segnet("resnet_tiny", num_classes=4, embed_dim=8, fuse_dim=8, attention_dim=8)
    state = model.state_dict()
    inverse = {"conv1.0": "0", "conv1.1": "1", "conv1.3": "3", "conv1.4": "4", "conv1.6": "6", "bn1": "7"}
    mmcv = {"ema_model.head.x": torch.zeros(1), "imnet_model.backbone.y": torch.zeros(1)}
    for key, value in state.items():
        if key.startswith("encoder.model."):
            rest = key.removeprefix("encoder.model.")
            for ours, theirs in inverse.items():
                if rest.startswith(ours + "."):
                    rest = f"stem.{theirs}." + rest.removeprefix(ours + ".")
                    break
            mmcv[f"model.backbone.{rest}"] = value
            continue
        head, rest = key.split(".", 1)
        prefix = "decode_head.head." if head == "head" else "decode_head.scale_attention."
        part, tail = rest.split(".", 1)
        if part == "embed":
            index, leaf = tail.split(".", 1)
            rest = f"embed_layers.{index}.proj.{leaf}"
        elif part == "fuse":
            index, leaf = tail.split(".", 1)
            rest = f"fuse_layer.{'conv' if index == '0' else 'bn'}.{leaf}"
        else:
            rest = f"conv_seg.{tail}"
        mmcv[f"model.{prefix}{rest}"] = value
    imported = import_mmcv_state({"state_dict": mmcv})
    assert imported.keys() == state.keys() and all(torch.equal(imported[k], state[k]) for k in state)
    fresh = build_segnet("resnet_tiny", num_classes=4, embed_dim=8, fuse_dim=8, attention_dim=8)
    fresh.load_state_dict(imported)
    with pytest.raises(ConfigError, match="no SegNet counterpart"):
        mmcv_key("model.decode_head.aux.conv_seg.weight")
    with torch.no_grad():
        assert math.isfinite(float(fresh(torch.randn(1, 3, 32, 32)).sum()))


def test_rare_class_sampling_follows_the_softmax_of_rarity():
    import numpy as np

    from hdrq_lightning.data.seg_datamodule import RareClassSampler

    counts = np.array([[9000, 100, 0], [9000, 0, 50], [8000, 400, 0], [9000, 0, 0]])  # class 0 common, 1 and 2 rare
    sampler = RareClassSampler(counts, temperature=0.01, min_pixels=60)
    frequency = counts.sum(0) / counts.sum()
    assert list(sampler.classes) == [0, 1]  # class 2 never reaches 60 pixels in an image
    logits = (1 - frequency[[0, 1]]) / 0.01
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose(sampler.probabilities, expected)
    generator = torch.Generator().manual_seed(0)
    draws = [sampler.sample(generator) for _ in range(400)]
    assert all(index in (0, 2) for c, index in draws if c == 1)  # images holding > 60 pixels of class 1
    assert sum(c == 1 for c, _ in draws) > 390  # the rare class dominates at T = 0.01


def test_feature_distance_on_thing_classes_and_not_in_the_checkpoint():
    torch.manual_seed(4)
    reference = build_segnet("resnet_tiny", num_classes=4, embed_dim=8, fuse_dim=8, attention_dim=8).eval()
    module = _module(feature_distance=0.5, thing_classes=(1,), reference=reference)
    module.model.eval()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :32] = 1  # the top half is a "thing"
    context = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    with torch.no_grad():
        student, ref = module.model.features(context)[-1], reference.features(context)[-1]
        distance = (student - ref).pow(2).sum(1).sqrt()
        mask = F.interpolate(labels[:, None].float(), size=distance.shape[-2:], mode="nearest")[:, 0] == 1
        expected = 0.5 * distance[mask].mean()
        assert torch.allclose(module._feature_distance(images, labels), expected, atol=1e-6)
        assert module._feature_distance(images, torch.zeros_like(labels)) == 0  # no thing pixel: no term
    assert not any("reference" in key for key in module.state_dict())
    with pytest.raises(ConfigError, match="feature_distance"):
        _module(feature_distance=0.5)


def test_activation_checkpointing_changes_no_number_and_counts_each_batch_once():
    """The encoder with activation checkpointing (blocks recomputed in the backward pass) gives the same loss and
    gradients as without, and its BatchNorm running statistics and counters are updated once per forward."""
    import copy

    from hdrq_lightning.models.segnet import build_segnet

    torch.manual_seed(0)
    plain = build_segnet("resnet_tiny", 5, embed_dim=8, fuse_dim=8, attention_dim=4).train()
    recomputed = copy.deepcopy(plain)
    recomputed.encoder.checkpointing = True
    x = torch.randn(2, 3, 32, 32)
    results = []
    for model in (plain, recomputed):
        torch.manual_seed(1)  # the same dropout draws
        loss = model(x).square().mean() + model.attention(model.features(x)).mean()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                        {n: b.clone() for n, b in model.named_buffers()}))
    (loss_a, grads_a, buffers_a), (loss_b, grads_b, buffers_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6)
    for name in buffers_a:
        torch.testing.assert_close(buffers_a[name], buffers_b[name], rtol=0, atol=0)
    assert int(buffers_b["encoder.model.bn1.num_batches_tracked"]) == 2  # two forwards, not three
    assert int(buffers_b["encoder.model.layer1.0.bn1.num_batches_tracked"]) == 2
