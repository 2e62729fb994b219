"""Batch-norm folding and weight-norm removal: the float model every quantizer starts from.

BRECQ, QDrop and HDRQ quantize the BN-folded network, so the folded weights are the ones that get
rounded, merged and regularised towards the source model.
"""

import copy
import warnings

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def symbolic_graph(model: nn.Module) -> fx.Graph | None:
    """The torch.fx graph of ``model`` (standard modules as leaves), or None if it does not trace."""
    try:
        return fx.symbolic_trace(model).graph
    except Exception:  # any tracing failure means "use the registration-order fallback"
        return None


def _legacy_weight_norm_hooks(module: nn.Module) -> list[_LegacyWeightNorm]:
    return [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, _LegacyWeightNorm)]


def _own_class(module: nn.Module) -> None:
    """Give a parametrized module a private copy of its generated class.

    A deep copy shares the generated class with the original, and removing a parametrization deletes
    the tensor's property from that class, which would break the original model.
    """
    cls = type(module)
    namespace = {key: value for key, value in vars(cls).items() if key not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, namespace)


def remove_weight_norm_(model: nn.Module) -> nn.Module:
    """Replace (parametrization or legacy) weight norm by a plain weight holding its effective value."""
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight") and any(
            isinstance(p, _WeightNorm) for p in module.parametrizations["weight"]
        ):
            _own_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        for hook in _legacy_weight_norm_hooks(module):
            torch.nn.utils.remove_weight_norm(module, hook.name)
    return model


def _deepcopy(model: nn.Module) -> nn.Module:
    """Deep copy that also works with legacy weight norm (whose computed weight is not a graph leaf)."""
    memo = {
        id(getattr(module, hook.name)): getattr(module, hook.name).detach().clone()
        for module in model.modules()
        for hook in _legacy_weight_norm_hooks(module)
    }
    return copy.deepcopy(model, memo)


def _foldable(layer: nn.Module, norm: nn.Module) -> bool:
    if not isinstance(norm, _BATCH_NORMS) or norm.running_mean is None:
        return False
    if isinstance(layer, nn.Conv2d):
        return isinstance(norm, nn.BatchNorm2d) and layer.out_channels == norm.num_features
    if isinstance(layer, nn.Linear):
        return isinstance(norm, nn.BatchNorm1d) and layer.out_features == norm.num_features
    return False


def _pairs_from_graph(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """(layer, norm) names where the norm's only input is the output of a layer used by nothing else."""
    modules = dict(model.named_modules())
    module_calls = [node for node in graph.nodes if node.op == "call_module"]
    call_counts: dict[str, int] = {}
    for node in module_calls:
        call_counts[node.target] = call_counts.get(node.target, 0) + 1
    pairs = []
    for node in module_calls:
        producer = node.args[0] if node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_module":
            continue
        if len(producer.users) != 1 or call_counts[producer.target] != 1 or call_counts[node.target] != 1:
            continue
        if _foldable(modules[producer.target], modules[node.target]):
            pairs.append((producer.target, node.target))
    return pairs


@torch.no_grad()
def _fold_into(layer: nn.Conv2d | nn.Linear, norm: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """Absorb the eval-mode affine map of ``norm`` into ``layer``'s weight and bias (in float64)."""
    factor = norm.weight.double() if norm.affine else torch.ones_like(norm.running_var, dtype=torch.float64)
    factor = factor / torch.sqrt(norm.running_var.double() + norm.eps)
    shift = norm.bias.double() if norm.affine else torch.zeros_like(factor)
    old_bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(factor)
    new_bias = (old_bias - norm.running_mean.double()) * factor + shift
    dtype = layer.weight.dtype
    layer.weight.copy_((layer.weight.double() * factor.view(-1, *[1] * (layer.weight.dim() - 1))).to(dtype))
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias.to(dtype))
    else:
        layer.bias.copy_(new_bias.to(dtype))


def _pairs(module: nn.Module, prefix: str, guessed: list[str]) -> list[tuple[str, str]]:
    """Fold pairs of ``module`` from its torch.fx graph; a module that does not trace pairs its direct children
    by registration order and each child is tried the same way (so a traceable encoder inside an untraceable
    model, e.g. a deep stem whose last conv feeds a BN outside its Sequential, still folds by its graph)."""
    graph = symbolic_graph(module)
    if graph is not None:
        return [(prefix + layer, prefix + norm) for layer, norm in _pairs_from_graph(module, graph)]
    pairs = []
    children = list(module.named_children())
    for (layer_name, layer), (norm_name, norm) in zip(children, children[1:]):
        if _foldable(layer, norm):
            pairs.append((prefix + layer_name, prefix + norm_name))
            guessed.append(f"{prefix}{layer_name} -> {prefix}{norm_name}")
    for name, child in children:
        if any(p for p in child.children()):
            pairs += _pairs(child, f"{prefix}{name}.", guessed)
    return pairs


def fold_batch_norm(model: nn.Module) -> nn.Module:
    """Eval-mode deep copy with weight norm removed and every foldable BatchNorm folded into its producer.

    Pairs come from torch.fx tracing; a module that does not trace falls back to registration order among its
    children, whose own submodules are traced again. Folded norms become ``nn.Identity``; the others stay and
    are reported with a warning.
    """
    folded = remove_weight_norm_(_deepcopy(model)).eval()
    guessed: list[str] = []
    pairs = list(dict.fromkeys(_pairs(folded, "", guessed)))
    if guessed:
        warnings.warn(
            f"{type(model).__name__} does not trace with torch.fx everywhere; where it does not, BatchNorm layers "
            f"are paired with the Conv2d/Linear registered right before them: {guessed}.",
            stacklevel=2,
        )
    for layer_name, norm_name in pairs:
        _fold_into(folded.get_submodule(layer_name), folded.get_submodule(norm_name))
        folded.set_submodule(norm_name, nn.Identity())
    left = [name for name, module in folded.named_modules() if isinstance(module, _BATCH_NORMS)]
    if left:
        warnings.warn(
            f"BatchNorm layers {left} have no producing Conv2d/Linear (or running statistics) and were left "
            "unfolded; they run in float after quantization.",
            stacklevel=2,
        )
    return folded
