"""BatchNorm folding and weight-norm removal keep the eval-mode function and leave no foldable BN."""

import warnings

import pytest
import torch
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.nn.utils import parametrizations

from hdrq_lightning.quant.fold import fold_batch_norm, remove_weight_norm_

torch.set_num_threads(1)


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running statistics and affine parameters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(size, generator=generator) * 0.2)
    return model.eval()


def _norms(model: nn.Module) -> list[str]:
    return [
        name for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]


def _assert_same_function(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


class _ShotNet(nn.Module):
    """SHOT-style head: backbone -> Linear -> BatchNorm1d -> weight-normed Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 6, 3, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.bottleneck = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.classifier = parametrizations.weight_norm(nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.bn(self.bottleneck(self.backbone(x))))


@pytest.mark.parametrize("block", [BasicBlock, Bottleneck])
def test_fold_timm_resnet_keeps_outputs(block: type) -> None:
    torch.manual_seed(0)
    model = _randomise_norms(
        ResNet(block=block, layers=[1, 1, 1, 1], channels=(8, 16, 32, 64), num_classes=5)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every BN of a ResNet is foldable: no warning expected
        folded = fold_batch_norm(model)
    assert _norms(folded) == []
    assert not folded.training
    assert _norms(model), "the input model must be left untouched"
    _assert_same_function(model, folded, torch.randn(2, 3, 32, 32))


def test_fold_shot_head_with_weight_norm() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(_ShotNet())
    folded = fold_batch_norm(model)
    assert _norms(folded) == []
    assert type(folded.classifier) is nn.Linear  # weight norm removed: a plain layer
    _assert_same_function(model, folded, torch.randn(4, 3, 8, 8))


def test_fold_plain_sequential() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)))
    folded = fold_batch_norm(model)
    assert isinstance(folded[1], nn.Identity)
    assert folded[0].bias is not None
    _assert_same_function(model, folded, torch.randn(6, 5))


class _Untraceable(nn.Module):
    """Data-dependent control flow defeats torch.fx: folding must pair by registration order."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            return x
        return self.bn1(self.conv1(x))


def test_fold_falls_back_to_registration_order() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(_Untraceable())
    with pytest.warns(UserWarning, match="does not trace"):
        folded = fold_batch_norm(model)
    assert _norms(folded) == []
    _assert_same_function(model, folded, torch.randn(2, 3, 6, 6))


class _NormAfterActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(torch.relu(self.conv(x)))


def test_unfoldable_norm_is_kept_and_reported() -> None:
    model = _randomise_norms(_NormAfterActivation())
    with pytest.warns(UserWarning, match="bn"):
        folded = fold_batch_norm(model)
    assert _norms(folded) == ["bn"]
    _assert_same_function(model, folded, torch.randn(2, 3, 5, 5))


def test_remove_legacy_weight_norm() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # the legacy API is deprecated but still met in checkpoints
        warnings.simplefilter("ignore", FutureWarning)
        layer = torch.nn.utils.weight_norm(nn.Linear(4, 3))
    x = torch.randn(5, 4)
    expected = layer(x).detach()
    remove_weight_norm_(layer)
    assert "weight_g" not in dict(layer.named_parameters())
    torch.testing.assert_close(layer(x), expected)
