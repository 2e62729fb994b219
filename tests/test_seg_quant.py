"""Segmentation through quantization and merging: the capture walker (units that do not chain), the segmentation
network's units and quantization facts, BN folding of a deep stem, block reconstruction of units with several
inputs, integer grids of experts and merges, and merge samples as a result."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hdrq_lightning.errors import ConfigError
from hdrq_lightning.evaluation import evaluate_domains
from hdrq_lightning.merge import get_merge_method
from hdrq_lightning.models.segnet import build_segnet
from hdrq_lightning.models.shot import build_shot_net
from hdrq_lightning.quant.cache import CacheBudget
from hdrq_lightning.quant.export import export_integer_state
from hdrq_lightning.quant.facts import reconstruction_units
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import (
    QuantConfig,
    activation_quantizers,
    calibrate_activations,
    quant_layers,
    quantize_model,
)
from hdrq_lightning.quant.recipe import NoiseRecipe, Recipe, WeightRecipe
from hdrq_lightning.quant.reconstruction import ReconstructionModule
from hdrq_lightning.quant.walker import CaptureWalker, UnitWalker
from hdrq_lightning.report import _per_class_h, segmentation_markdown
from hdrq_lightning.stages.evaluate import summarize_samples


def _randomise_norms(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _tiny_segnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomise_norms(build_segnet("resnet_tiny", 5, embed_dim=8, fuse_dim=8, attention_dim=4))


def _quantized(fp: nn.Module, calibration: torch.Tensor, **numerics) -> nn.Module:
    quant = quantize_model(fp, QuantConfig(**numerics))
    calibrate_activations(quant, [calibration], forward=lambda m, x: m.calibration_forward(x))
    return quant


def test_capture_walker_equals_the_chain_walker_on_a_chain():
    """On a chain (the SHOT ResNet) capturing each unit's call from a whole forward gives exactly the tensors that
    carrying outputs forward gives: FP input, quantized-prefix input and FP target of every unit."""
    torch.manual_seed(0)
    fp = fold_batch_norm(_randomise_norms(build_shot_net("resnet_tiny", 6, bottleneck_dim=16)))
    images = torch.randn(10, 3, 32, 32)
    quant = quantize_model(fp, QuantConfig(w_bits=3, a_bits=3))
    calibrate_activations(quant, [images])
    fp_units, quant_units = reconstruction_units(fp), reconstruction_units(quant)
    chain = UnitWalker([u for _, u in fp_units], [u for _, u in quant_units], quant, chunk=4)
    capture = CaptureWalker(fp, quant, fp_units, quant_units, chunk=4)
    for index in range(len(fp_units)):  # the chain walker carries each unit's outputs into the next
        expected = chain.cache(index, "joint", images, CacheBudget(float("inf")), torch.device("cpu"))
        got = capture.cache(index, "joint", images, CacheBudget(float("inf")), torch.device("cpu"))
        assert got.spec is None
        for name in ("fp_input", "quant_input", "fp_target"):
            torch.testing.assert_close(got.tensor(name), expected.tensor(name), rtol=0, atol=1e-5)


def test_capture_walker_refuses_units_the_forward_does_not_run_in_order():
    class Swapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.first(self.second(x))  # "second" runs first

    net = Swapped().eval()
    x = torch.randn(3, 4)
    for unit, message in ((nn.Sequential(net.first, net.second), "does not run after"),
                          (net.unused, "never called")):
        walker = CaptureWalker(net, net, [("u", unit)], [("u", unit)])
        with pytest.raises(ConfigError, match=message):
            walker.cache(0, "joint", x, CacheBudget(float("inf")), torch.device("cpu"))


def test_segnet_units_cover_every_layer_once_and_reproduce_the_forward():
    """Both granularities: every quantized layer lies in exactly one unit; each unit run on its captured FP input
    gives its captured FP target, and the last units' targets are the two heads' logits."""
    fp = fold_batch_norm(_tiny_segnet())
    images = torch.randn(6, 3, 32, 32)
    quant = _quantized(fp, images)
    layers = {name for name, _ in quant_layers(quant)}
    ids = {id(m): n for n, m in quant.named_modules()}
    for granularity, count in (("layer", 17), ("block", 7)):
        units = reconstruction_units(quant, granularity)
        assert len(units) == count
        seen = [ids[id(m)] for _, unit in units for m in unit.modules() if ids.get(id(m)) in layers]
        assert sorted(seen) == sorted(layers)
        fp_units = reconstruction_units(fp, granularity)
        walker = CaptureWalker(fp, quant, fp_units, units, chunk=4)
        for index, (name, unit) in enumerate(fp_units):
            cache = walker.cache(index, "joint", images, CacheBudget(float("inf")), torch.device("cpu"))
            leaves = [cache.tensor(n) for n in cache.input_names("fp_input")]
            torch.testing.assert_close(cache.run(unit, leaves), cache.fp_target, rtol=0, atol=1e-5)
            if granularity == "block" and name in ("head", "attention"):
                assert len(leaves) == 4 and cache.spec is not None  # the four encoder levels
        logits, attention = fp.calibration_forward(images)
        torch.testing.assert_close(cache.fp_target, attention)
        head = walker.cache(count - 2 if granularity == "block" else 10, "joint", images, CacheBudget(float("inf")),
                            torch.device("cpu"))
        torch.testing.assert_close(head.fp_target, logits)


def test_deep_stem_segnet_folds_and_has_the_official_units_and_bits():
    """ResNet-101c (deep stem; the model does not trace with torch.fx as a whole): every BN folds, the output is
    unchanged, 48 units as the official code, and the declared numerics."""
    torch.manual_seed(0)
    net = _randomise_norms(build_segnet("resnet101c", 19))
    folded = fold_batch_norm(net)
    assert not [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(net.calibration_forward(x), folded.calibration_forward(x)):
            assert (a - b).abs().max() <= 1e-4 * a.abs().max()  # float32 over 100 layers
    quant = quantize_model(folded, QuantConfig(w_bits=4, a_bits=4), init_ranges=False)
    names = [name for name, _ in reconstruction_units(quant)]
    assert len(names) == 48 and names[:4] == ["stem.0", "stem.1", "stem.2", "layer1.0"]
    assert names[-6:] == [f"attention.embed.{i}" for i in range(4)] + ["attention.fuse", "attention.classifier"]
    eight = {n for n, layer in quant_layers(quant) if layer.weight_quantizer.bits == 8}
    assert eight == {"encoder.model.conv1.0", "head.classifier", "attention_head.classifier"}
    acts = dict(activation_quantizers(quant))
    for head in ("head", "attention_head"):
        assert acts[f"{head}.fuse.2.output_quantizer"].bits == 8  # the classifier's input
        assert f"{head}.classifier.output_quantizer" not in acts   # logits unquantized
        for i in range(4):
            q = acts[f"{head}.embed.{i}.output_quantizer"]
            assert q.symmetric and q.bits == 4
    assert not any(q.symmetric for n, q in acts.items() if ".embed." not in n)


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_reconstruction_of_segnet_units_ends_on_the_grid(granularity):
    """HDRQ's recipe over the segmentation units (block granularity: heads with four inputs, each mixed with its
    own mask): the loss is finite, the integer export lies on each layer's grid and dequantizes to the model."""
    fp = fold_batch_norm(_tiny_segnet())
    calibration = torch.randn(8, 3, 32, 32)
    quant = _quantized(fp, calibration, w_bits=4, a_bits=4, w_per_channel=False, w_symmetric=True)
    recipe = Recipe(method="hdrq", iters=3, batch_size=4, units=granularity, distance_weight=0.0,
                    weight=WeightRecipe(rounding="latent", per_channel=False, symmetric=True, learn_scale=True),
                    noise=NoiseRecipe(enabled=True))
    engine = ReconstructionModule(fp, quant, calibration, recipe, seed=0)
    engine.start()
    while not engine.finished:
        loss, _ = engine.reconstruction_step()
        assert math.isfinite(float(loss))
    engine.finalize()
    state = export_integer_state(quant)
    for name, layer in quant_layers(quant):
        codes = state[f"{name}.weight_int"]
        q = layer.weight_quantizer
        assert torch.equal(codes, codes.round()) and codes.min() >= q.qmin and codes.max() <= q.qmax
        assert torch.equal(codes, q.integer(layer.weight.detach()).to(codes.dtype))


def test_merged_segmentation_experts_lie_on_the_merged_grid():
    """Two quantized experts (different weights, per-tensor symmetric grids) merged with noise sampling: every
    merged code is an integer of the merged grid, within the bits' range."""
    images = torch.randn(6, 3, 32, 32)
    experts = [export_integer_state(_quantized(fold_batch_norm(_tiny_segnet(seed)), images, w_per_channel=False,
                                               w_symmetric=True)) for seed in (0, 1)]
    merged = get_merge_method("quantized", sampling="noise", num_samples=5, seed=3).merge(experts)
    for key, codes in merged.items():
        if key.endswith(".weight_int"):
            layer = key[: -len(".weight_int")]
            low, high = merged[f"{layer}.weight_qmin"], merged[f"{layer}.weight_qmax"]
            assert torch.equal(codes, codes.round())
            assert (codes >= low).all() and (codes <= high).all()
            step = merged[f"{layer}.weight_scale"]
            mean_step = (experts[0][f"{layer}.weight_scale"] + experts[1][f"{layer}.weight_scale"]) / 2
            torch.testing.assert_close(step, mean_step)


def test_merge_sample_statistics_are_the_per_sample_mean_and_std():
    records = [{"seed": s, "per_domain": {"a": a, "b": b}, "hmean": 2 * a * b / (a + b), "mean": (a + b) / 2,
                "per_class": {"a": [a, None], "b": [b, 1.0]}}
               for s, (a, b) in enumerate([(40.0, 50.0), (42.0, 47.0), (41.0, 52.0)])]
    out = summarize_samples(records)
    a = torch.tensor([40.0, 42.0, 41.0], dtype=torch.float64)
    assert out["per_domain"]["a"] == pytest.approx(41.0)
    assert out["merge_samples"]["per_domain"]["a"]["std"] == pytest.approx(float(a.std()), abs=1e-4)
    hs = [r["hmean"] for r in records]
    assert out["hmean"] == pytest.approx(sum(hs) / 3, abs=1e-4)  # the mean of per-sample H, as the paper
    assert out["per_class"]["a"] == [pytest.approx(41.0), None]
    assert out["merge_samples"]["n"] == 3 and out["merge_samples"]["seeds"] == [0, 1, 2]
    # per-class H of the report: mean over samples of the per-sample harmonic mean
    merged = {"per_class": out["per_class"], "merge_samples": out["merge_samples"]}
    h = _per_class_h(merged, ["a", "b"])
    assert h[0] == pytest.approx(sum(2 * x * y / (x + y) for x, y in [(40, 50), (42, 47), (41, 52)]) / 3)
    assert h[1] is None


def test_table_one_markdown_has_both_parts_and_the_paper_beside():
    classes = ["road", "car"]
    entry = lambda v: {"per_domain": {"c": v, "i": v - 1}, "hmean": v - 0.5,  # noqa: E731
                       "per_class": {"c": [v, None], "i": [v - 1, v]}}
    summary = {"experiment": "x", "source": "g", "targets": ["c", "i"], "task": "segmentation", "classes": classes,
               "source_only": {"c": 1.0, "i": 2.0},
               "fp": {"experts": {"c": 60.0, "i": 50.0}, "experts_per_class": {"c": [1.0, 2.0], "i": [3.0, None]},
                      "merged": entry(55.0)},
               "results": [{"method": "hdrq", "w_bits": 4, "a_bits": 4, "experts": {"c": 58.0, "i": 48.0},
                            "experts_per_class": {"c": [1.0, 2.0], "i": [3.0, 4.0]}, "merged": entry(44.0)}],
               "reference": {"rows": {"hdrq_w4a4": [58.23, 48.68, 44.44, 47.17, 45.75]}}}
    text = segmentation_markdown(summary)
    assert "(a) Each expert" in text and "(b) The merged model" in text
    assert "| hdrq | W4A4 | H |" in text and "| FP | W32A32 | i | 3.00 | - | **50.00** |" in text
    assert "58.00 / 58.23 (-0.23)" in text


def test_evaluate_domains_reports_per_class_iou():
    class Data:
        def loader(self, domain, split):
            labels = torch.tensor([[[0, 1], [1, 255]]])
            return [(torch.zeros(1, 3, 2, 2), labels, None)]

    class Fixed(nn.Module):
        def forward(self, x):
            logits = torch.zeros(1, 3, 2, 2)
            logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = logits[0, 0, 1, 0] = 1.0  # predicts 0, 1, 0, (ignored)
            return logits

    from hdrq_lightning.tasks import SegmentationTask

    result = evaluate_domains(Fixed(), Data(), ["d"], torch.device("cpu"), SegmentationTask(3, inference="whole"))
    # class 0: predicted at 2 pixels, labelled at 1 -> IoU 1/2; class 1: 1/2; class 2: absent -> None
    assert result["per_class"]["d"] == [50.0, 50.0, None]
    assert result["per_domain"]["d"] == pytest.approx(50.0)


STREETS_TINY = ["experiment=streets", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
                "source.iterations=6", "adapt.iterations=4", "adapt.checkpoint_every=2", "data.eval_batch_size=100",
                "quant.iters=2", "quant.act_iters=1", "quant.calibration_size=8", "quant.batch_size=4",
                "quant.checkpoint_every=1", "analysis.lambdas=3", "analysis.surface_steps=3",
                "analysis.noise_samples=2", "analysis.selection_pool=2", "analysis.max_images=8",
                "evaluate.merge_samples=2", "pipeline.merge_num_samples={hdrq:3}", "task.inference=whole"]


def test_streets_pipeline_writes_table_one_with_merge_samples(tmp_path, monkeypatch):
    """`hdrq pipeline experiment=streets` (tiny settings): summary.json with the FP row and each method's experts
    and merged model, per-class IoU per target, merge-sample statistics; summary.md as Table 1."""
    from hdrq_lightning.artifacts import read_json
    from hdrq_lightning.cli import main

    monkeypatch.setenv("HDRQ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    main(["pipeline", *STREETS_TINY, "pipeline.methods=[hdrq]", "pipeline.bits=[W4A4]"])
    out = tmp_path / "runs" / "streets"
    summary = read_json(out / "summary.json")
    targets, classes = ["city", "dusty"], summary["classes"]
    assert summary["task"] == "segmentation" and len(classes) == 10
    assert [(r["method"], r["w_bits"]) for r in summary["results"]] == [("hdrq", 4)]
    assert set(summary["fp"]["experts_per_class"]) == set(targets)
    assert "merge_samples" not in summary["fp"]["merged"]  # an FP merge has no randomness
    for row in summary["results"]:
        assert all(len(row["experts_per_class"][t]) == len(classes) for t in targets)
        merged = row["merged"]
        stats = merged["merge_samples"]
        assert stats["n"] == 2 and stats["seeds"] == [0, 1]
        for t in targets:
            values = [s["per_domain"][t] for s in stats["per_sample"]]
            assert merged["per_domain"][t] == pytest.approx(sum(values) / 2, abs=1e-3)
            assert len(merged["per_class"][t]) == len(classes)
    assert read_json(out / "merge" / "hdrq_w4a4" / "metrics.json")["params"]["num_samples"] == 3  # per method
    table = (out / "summary.md").read_text()
    assert "(a) Each expert on its own target" in table and "| hdrq | W4A4 | H |" in table
    assert "error barrier" in table and (out / "barrier.png").is_file()



def test_merge_sample_s_is_the_merge_with_seed_plus_s_and_shards_are_reused(streets_cfg):
    """Sample s is the merge stage's model with merge.params.seed + s (checked against the merge stage run with that
    seed); sample jobs of a sweep (shards) write their samples, which the aggregating call reuses."""
    from hdrq_lightning.artifacts import read_json
    from hdrq_lightning.stages.adapt import run_adapt
    from hdrq_lightning.stages.evaluate import evaluate_run
    from hdrq_lightning.stages.merge import run_merge
    from hdrq_lightning.stages.quantize import run_quantize
    from hdrq_lightning.stages.source import run_source

    small = STREETS_TINY[1:] + ["quant=qdrop", "quant.w_bits=4", "quant.a_bits=4", "merge=quantized"]
    run_source(streets_cfg("source", *small))
    run_adapt(streets_cfg("adapt", *small))
    run_quantize(streets_cfg("quantize", *small))
    # the merge stage with seed 2 writes the model that sample 2 of the seed-0 merge must be
    run_merge(streets_cfg("merge", *small, "merge.params.seed=2"))
    direct = evaluate_run(streets_cfg("evaluate", *small, "merge.params.seed=2", "evaluate.merge_samples=1"),
                          "merge", "qdrop_w4a4")
    run_merge(streets_cfg("merge", *small, "merge.params.seed=0", "force=true"))
    # two shard jobs (as a sweep runs them), then the aggregating call reuses their samples
    for k in (0, 1):
        evaluate_run(streets_cfg("evaluate", *small, "evaluate.merge_samples=3", f"evaluate.sample_shard={k}/2"),
                     "merge", "qdrop_w4a4")
    with pytest.raises(ConfigError, match="sample_shard"):  # shard jobs must not clear each other's samples
        evaluate_run(streets_cfg("evaluate", *small, "evaluate.merge_samples=3", "evaluate.sample_shard=0/2",
                                 "force=true"), "merge", "qdrop_w4a4")
    folder = streets_cfg("evaluate", *small).paths.runs_dir
    samples = sorted((Path(folder) / "streets" / "evaluate" / "merge" / "qdrop_w4a4" / "samples").glob("*.json"))
    assert [p.name for p in samples] == ["0000.json", "0001.json", "0002.json"]
    stamps = [p.stat().st_mtime_ns for p in samples]
    result = evaluate_run(streets_cfg("evaluate", *small, "evaluate.merge_samples=3"), "merge", "qdrop_w4a4")
    assert [p.stat().st_mtime_ns for p in samples] == stamps  # reused, not recomputed
    assert result["merge_samples"]["seeds"] == [0, 1, 2]
    two = read_json(samples[2])
    assert two["per_domain"] == direct["per_domain"] and two["per_class"] == direct["per_class"]
