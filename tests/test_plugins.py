"""The seams: model plug-ins (units and quantization facts declared by the network), the public unit walker, model
files that rebuild their network without the current config, and a toy model through the stages untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdrq_lightning.artifacts import StageRun, save_weights
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.models.build import architecture, build_model
from hdrq_lightning.models.io import load_model_file, model_metadata
from hdrq_lightning.models.shot import build_shot_net
from hdrq_lightning.quant.cache import CacheBudget
from hdrq_lightning.quant.facts import QuantFacts, reconstruction_units
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import (
    QuantConfig,
    activation_quantizers,
    calibrate_activations,
    quant_layers,
    quantize_model,
)
from hdrq_lightning.quant.walker import CaptureWalker, UnitWalker
from hdrq_lightning.stages.evaluate import evaluate_run
from hdrq_lightning.stages.merge import run_merge
from hdrq_lightning.stages.quantize import run_quantize


class TwoUnitMLP(nn.Module):
    """A toy model plug-in: flatten -> Linear -> ReLU (unit "body"), Linear (unit "classifier")."""

    def __init__(self, num_classes: int, hidden: int = 48, image_size: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    def reconstruction_units(self) -> list[tuple[str, nn.Module]]:
        return [("body", self.body), ("classifier", self.classifier)]

    def quant_facts(self) -> QuantFacts:
        return QuantFacts(eight_bit_weights=("classifier",), eight_bit_outputs=("body.2",))


def build_two_unit_mlp(num_classes: int, hidden: int = 48, image_size: int = 32) -> TwoUnitMLP:
    return TwoUnitMLP(num_classes, hidden, image_size)


def _bits(model: nn.Module) -> tuple[dict[str, int], dict[str, int]]:
    return ({n: layer.weight_quantizer.bits for n, layer in quant_layers(model)},
            {n: q.bits for n, q in activation_quantizers(model)})


@pytest.mark.parametrize("backbone", ["resnet_tiny", "resnet50"])
def test_shot_net_declares_the_bits_that_call_order_inference_finds(backbone):
    """The SHOT network's declared facts (8-bit first conv and classifier, 8-bit classifier input, quantized
    bottleneck output) give exactly the bit widths of the old first/last-in-call-order rule (torch.fx)."""
    folded = fold_batch_norm(build_shot_net(backbone, 7).eval())
    declared = _bits(quantize_model(folded, QuantConfig(), init_ranges=False))
    folded.quant_facts = None  # a model that declares nothing: first and last layers in call order
    inferred = _bits(quantize_model(folded, QuantConfig(output_quant_layers=("bottleneck",)), init_ranges=False))
    assert declared == inferred
    assert {n for n, b in declared[0].items() if b == 8} == {"backbone.conv1", "classifier"}
    assert {n for n, b in declared[1].items() if b == 8} == {"bottleneck.output_quantizer"}


def test_facts_with_wildcards_and_unknown_names():
    model = TwoUnitMLP(3)
    model.quant_facts = lambda: QuantFacts(eight_bit_weights=("*",))
    weights, _ = _bits(quantize_model(model, QuantConfig(), init_ranges=False))
    assert set(weights.values()) == {8}
    model.quant_facts = lambda: QuantFacts(eight_bit_weights=("no_such_layer",))
    with pytest.raises(ConfigError, match="no_such_layer"):
        quantize_model(model, QuantConfig())


def _walker_setup():
    torch.manual_seed(0)
    fp = fold_batch_norm(build_shot_net("resnet_tiny", 10).eval())
    quant = quantize_model(fp, QuantConfig(w_bits=3, a_bits=3, first_last_8bit=False))
    for _, quantizer in activation_quantizers(quant):
        quantizer.set_range(torch.tensor(0.05), torch.tensor(0.0), signed=False)
        quantizer.set_mode("nearest")
    return fp, quant, torch.randn(20, 3, 32, 32)


@torch.no_grad()
def capture_unit_inputs(model, units, batches):
    """Reference for the walkers: each unit's call ``(args, kwargs)`` per batch, recorded by forward pre-hooks on one
    whole forward of ``model`` in eval mode (no early stop, no caching)."""
    recorded = {name: [] for name, _ in units}

    def hook(name):
        return lambda _, args, kwargs: recorded[name].append((args, kwargs))

    handles = [unit.register_forward_pre_hook(hook(name), with_kwargs=True) for name, unit in units]
    model.eval()
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def test_walker_caches_are_the_models_intermediate_activations_for_a_chain():
    """Every unit's FP input / target and quantized-prefix input, whether walked from the images or carried
    forward, equal the activations of the whole models: for the residual blocks (modules of the model) as forward
    hooks see them when the FP and quantized models run, for the stem and head the model's input and the last
    block's output; the walk leaves the quantized model in eval mode as it found it."""
    fp, quant, images = _walker_setup()
    fp_units, quant_units = reconstruction_units(fp), reconstruction_units(quant)
    blocks = [(name, unit) for name, unit in fp_units if name not in ("stem", "head")]
    fp_seen = capture_unit_inputs(fp, blocks, [images])
    quant_seen = capture_unit_inputs(quant, [(n, u) for n, u in quant_units if n not in ("stem", "head")],
                                     [images])
    with torch.no_grad():
        fp_head_input = fp.backbone.layer4(fp.backbone.layer3(fp.backbone.layer2(fp.backbone.layer1(
            fp_units[0][1](images)))))
    walker = UnitWalker([u for _, u in fp_units], [u for _, u in quant_units], quant, chunk=7)
    quant.train()  # as the engine holds it during training: the walk runs in eval mode and restores this
    for index, (name, unit) in enumerate(fp_units):
        carried = walker.cache(index, "joint", images, CacheBudget(1e18), torch.device("cpu"))
        fresh = UnitWalker([u for _, u in fp_units], [u for _, u in quant_units], quant, chunk=5).cache(
            index, "joint", images, CacheBudget(1e18), torch.device("cpu"))
        if name == "stem":
            fp_input = quant_input = images
        elif name == "head":
            fp_input, quant_input = fp_head_input, None
        else:
            ((fp_input,), _), ((quant_input,), _) = fp_seen[name][0], quant_seen[name][0]
        for cache in (carried, fresh):
            torch.testing.assert_close(cache.fp_input, fp_input, rtol=0, atol=1e-5)
            if quant_input is not None:
                torch.testing.assert_close(cache.quant_input, quant_input, rtol=0, atol=1e-5)
            with torch.no_grad():
                torch.testing.assert_close(cache.fp_target, unit(fp_input), rtol=0, atol=1e-5)
    with torch.no_grad():  # the head's quantized input: the quantized model's features before the head
        q = quant.backbone
        quant_head_input = q.layer4(q.layer3(q.layer2(q.layer1(quant_units[0][1](images)))))
    torch.testing.assert_close(carried.quant_input, quant_head_input, rtol=0, atol=1e-5)
    assert quant.training and all(m.training for m in quant.modules())


class SkipNet(nn.Module):
    """Units that do not chain: the last reads the first unit's output too (a decoder reading an encoder stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.middle = nn.Sequential(nn.ReLU(), nn.Linear(8, 8))
        self.fuse = Fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early = self.stem(x)
        return self.fuse(self.middle(early), skip=early)

    def reconstruction_units(self) -> list[tuple[str, nn.Module]]:
        return [("stem", self.stem), ("middle", self.middle), ("fuse", self.fuse)]


class Fuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.proj(x + 2 * skip)


def test_capture_walker_serves_units_that_do_not_chain():
    """The last unit reads the first unit's output as a keyword argument: the capture walker caches both inputs as
    leaves (FP and quantized-model versions), rebuilds the call, and its target is the model's output."""
    torch.manual_seed(1)
    net = SkipNet().eval()
    quant = quantize_model(net, QuantConfig(w_bits=4, a_bits=4))
    x = torch.randn(9, 6)
    calibrate_activations(quant, [x])
    units, quant_units = reconstruction_units(net), reconstruction_units(quant)
    walker = CaptureWalker(net, quant, units, quant_units, chunk=4)
    with torch.no_grad():
        early, quant_early = net.stem(x), quant.stem(x)
        cache = walker.cache(2, "joint", x, CacheBudget(float("inf")), torch.device("cpu"))
        assert cache.input_names("fp_input") == ["fp_input.0", "fp_input.1"] and cache.spec is not None
        (middle,), kwargs = cache.call([cache.tensor(n) for n in cache.input_names("fp_input")])
        torch.testing.assert_close(middle, net.middle(early))
        torch.testing.assert_close(kwargs["skip"], early)
        (quant_middle,), quant_kwargs = cache.call([cache.tensor(n) for n in cache.input_names("quant_input")])
        torch.testing.assert_close(quant_middle, quant.middle(quant_early))
        torch.testing.assert_close(quant_kwargs["skip"], quant_early)
        torch.testing.assert_close(cache.fp_target, net(x))
        first = walker.cache(0, "joint", x, CacheBudget(float("inf")), torch.device("cpu"))
        assert first.spec is None and torch.equal(first.fp_input, x)


def test_a_model_file_rebuilds_its_network_without_the_current_config(tmp_path, monkeypatch):
    """A quantized file records its architecture and numerics: it loads with no model config at hand, and no range
    search runs (the ranges come from the file)."""
    torch.manual_seed(2)
    config = {"_target_": "hdrq_lightning.models.shot.build_shot_net", "backbone": "resnet_tiny",
              "num_classes": 6, "bottleneck_dim": 32}
    folded = fold_batch_norm(build_model(config).eval())
    numerics = QuantConfig(w_bits=3, a_bits=4)
    quant = quantize_model(folded, numerics)
    images = torch.randn(8, 3, 32, 32)
    from hdrq_lightning.quant.export import export_integer_state


    calibrate_activations(quant, [images])
    path = tmp_path / "quantized.safetensors"
    from hdrq_lightning.models.io import save_model_file

    save_model_file(export_integer_state(quant), path, model_metadata("quantized", config, numerics))
    import hdrq_lightning.quant.modules as modules

    calls = []
    original = modules.initialize_weight_ranges
    monkeypatch.setattr(modules, "initialize_weight_ranges", lambda *a, **k: calls.append(a) or original(*a, **k))
    loaded = load_model_file(path)
    assert calls == []
    torch.testing.assert_close(loaded(images), quant.eval()(images), rtol=0, atol=1e-5)


TOY = ["model._target_=test_plugins.build_two_unit_mlp", "~model.backbone", "~model.bottleneck_dim",
       "+model.hidden=48", "data.targets=[negative,textured]"]


def test_a_toy_model_plugin_runs_through_quantize_merge_and_evaluate(compose_cfg, tmp_path):
    """A new network arrives as a file and a config override: its source and adapt runs are written as the stages
    write them, then the quantize, merge and evaluate stages run on it unchanged."""
    torch.manual_seed(3)
    cfg = compose_cfg("quantize", *TOY, "quant=qdrop")
    source = TwoUnitMLP(10)
    arch = architecture(cfg.model, 10)
    for stage, key, model in [("source", "clean", source), ("adapt", "negative", TwoUnitMLP(10)),
                              ("adapt", "textured", TwoUnitMLP(10))]:
        run = StageRun(tmp_path / "runs/digits" / stage / key, root=tmp_path / "runs/digits" / stage)
        run.prepare(compose_cfg(stage, *TOY))
        save_weights(model.state_dict(), run.weights_path, model_metadata("fp", arch, stage=stage))
        run.finish({"stage": stage})
    results = run_quantize(cfg)
    assert set(results) == {"negative", "textured"}
    assert all(0 <= r["quant_acc"] <= 100 for r in results.values())
    run_merge(compose_cfg("merge", *TOY, "quant=qdrop"))
    evaluated = evaluate_run(compose_cfg("evaluate", *TOY, "quant=qdrop"), "merge", "qdrop_w4a4")
    assert set(evaluated["per_domain"]) == {"negative", "textured"}
    merged = load_model_file(tmp_path / "runs/digits/merge/qdrop_w4a4/merged.safetensors")
    assert isinstance(merged, TwoUnitMLP)
    weights, _ = _bits(merged)
    assert weights == {"body.1": 4, "classifier": 8}


def test_a_model_loaded_for_training_is_in_training_mode_and_for_inference_in_eval(compose_cfg, tmp_path):
    """Lightning keeps the modes it finds: a stage that trains on a loaded model (SHOT adaptation updates the
    BatchNorm statistics) must get it in training mode, as a freshly built model is."""
    from hdrq_lightning.stages.common import build_model as build_stage_model
    from hdrq_lightning.stages.common import load_model

    cfg = compose_cfg("adapt")
    model = build_stage_model(cfg, 10)
    path = save_weights(model.state_dict(), tmp_path / "model.safetensors",
                        model_metadata("fp", architecture(cfg.model, 10)))
    trained = load_model(cfg, 10, path)
    assert trained.training and all(m.training for m in trained.modules())
    inferred = load_model(cfg, 10, path, train=False)
    assert not any(m.training for m in inferred.modules())
