"""Runtime options of the engine change how it runs, never what it computes (CPU; the GPU side is in
test_fast_path.py)."""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
from engines import started_engine, tiny_model_and_calibration

from hdrq_lightning.callbacks import LearningRateSchedule, NoiseToFakeQuantSwitch
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant.cache import UnitCache, cache_budget_bytes
from hdrq_lightning.quant.modules import quantize_model
from hdrq_lightning.quant.quantizers import ActivationQuantizer
from hdrq_lightning.quant.recipe import NoiseRecipe, Recipe, Runtime, WeightRecipe
from hdrq_lightning.quant.reconstruction import ReconstructionModule

HDRQ = dict(method="hdrq", distance_weight=0.0, noise=NoiseRecipe(enabled=True),
            weight=WeightRecipe(rounding="latent", symmetric=True, learn_scale=True, lr=1e-4,
                                schedule="warmup_cosine"))


@pytest.fixture(scope="module")
def setup():
    return tiny_model_and_calibration()


def _engine(setup, recipe: Recipe, runtime: Runtime) -> ReconstructionModule:
    return started_engine(*setup, recipe, runtime)


def _drive(module: ReconstructionModule) -> list[float]:
    losses = []
    while not module.finished:
        losses.append(module.reconstruction_step()[0].item())
    return losses


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("extra", [dict(method="qdrop"), HDRQ], ids=["qdrop", "hdrq"])
def test_host_resident_cache_gives_the_same_run(setup, extra):
    """A cache kept in host memory (over the budget) draws and computes exactly what a device cache does."""
    recipe = Recipe(iters=6, batch_size=4, **extra)
    device = _engine(setup, recipe, Runtime(cache_device="device"))
    host = _engine(setup, recipe, Runtime(cache_device="host"))
    assert host._cache.host_names == ["fp_target"]  # the first unit reads the calibration images in place
    assert device._cache.host_names == []
    losses_device, losses_host = _drive(device), _drive(host)
    assert losses_host == losses_device
    _assert_same_state(device.quant_model, host.quant_model)


def test_budget_places_tensors_greedily(setup):
    """Within a budget each tensor goes to the device as it is computed while the running total fits."""
    recipe = Recipe(iters=2, batch_size=4, method="qdrop")
    module = _engine(setup, recipe, Runtime())
    module.reconstruction_step()
    module.reconstruction_step()  # into unit 1: inputs carried from the stem
    cache = module._cache
    one_tensor = cache.quant_input.numel() * cache.quant_input.element_size()
    budgeted = _engine(setup, recipe, Runtime(cache_budget_gib=2.2 * one_tensor / 2**30))
    budgeted.reconstruction_step()
    budgeted.reconstruction_step()
    # unit 1 (64 -> 32 channels): the carried fp_input (1 tensor) and quant_input (1) fit, fp_target (0.5) not
    assert budgeted._cache.host_names == ["fp_target"]
    assert cache_budget_bytes(torch.device("cpu"), "auto", None) == math.inf
    assert cache_budget_bytes(torch.device("cpu"), "host", None) == 0


def test_cuda_graphs_on_cpu_run_eagerly(setup):
    recipe = Recipe(iters=4, batch_size=4, method="qdrop")
    eager = _engine(setup, recipe, Runtime())
    graphs = _engine(setup, recipe, Runtime(cuda_graphs=True))
    assert _drive(graphs) == _drive(eager)
    _assert_same_state(eager.quant_model, graphs.quant_model)


def _fit(setup, recipe: Recipe, runtime: Runtime) -> ReconstructionModule:
    fp, calibration = setup
    module = ReconstructionModule(fp, quantize_model(fp, recipe.numerics()), calibration, recipe, runtime=runtime)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        max_epochs=math.ceil(module.total_iters / recipe.checkpoint_every),
                        callbacks=[LearningRateSchedule(recipe.warmup_fraction), NoiseToFakeQuantSwitch(recipe.noise)])
    trainer.fit(module)
    assert module.finished
    assert trainer.global_step == module.total_iters  # Lightning counts every engine step
    return module


def test_steps_per_batch_changes_nothing_but_the_loop(setup):
    recipe = Recipe(iters=6, batch_size=4, checkpoint_every=4, **HDRQ)
    one = _fit(setup, recipe, Runtime(steps_per_batch=1))
    four = _fit(setup, copy.deepcopy(recipe), Runtime(steps_per_batch=4))
    _assert_same_state(one.quant_model, four.quant_model)


def test_runtime_options_are_checked(setup):
    fp, calibration = setup
    recipe = Recipe(iters=2, batch_size=4, checkpoint_every=10, method="qdrop")
    with pytest.raises(ConfigError, match="multiple of quant.runtime.steps_per_batch"):
        ReconstructionModule(fp, quantize_model(fp, recipe.numerics()), calibration, recipe,
                             runtime=Runtime(steps_per_batch=4))
    with pytest.raises(ConfigError, match="cache_device"):
        Runtime(cache_device="disk")
    with pytest.raises(ConfigError, match="steps_per_batch"):
        Runtime(steps_per_batch=0)
    with pytest.raises(ConfigError, match="unknown keys"):
        Runtime.from_config({"graphs": True})


def test_mask_kernels_default_to_captured_steps_only():
    """quant.runtime.mask_kernel=null: the kernels where the step is captured, torch's masks in an uncaptured step
    (host-bound: a Triton launch from Python costs more host time than it saves; eager_vs_official measured 164.3
    against 152.4 ms summed). Resolved when built, so the compile-ahead worker's uncaptured twin compiles the
    engine's graphs, kernels included."""
    import dataclasses

    from hdrq_lightning.callbacks import compile_ahead

    assert Runtime().mask_kernel is False and Runtime(compile=True).mask_kernel is False
    assert Runtime(cuda_graphs=True).mask_kernel is True
    assert Runtime(mask_kernel=True).mask_kernel is True and Runtime(cuda_graphs=True, mask_kernel=False).mask_kernel \
        is False
    fast = Runtime(compile=True, cuda_graphs=True)
    assert compile_ahead.ahead_runtime(fast).mask_kernel is True  # the twin runs uncaptured, same graphs
    assert dataclasses.replace(fast, cuda_graphs=False).mask_kernel is True
    assert Runtime.from_config({"mask_kernel": None, "cuda_graphs": True}).mask_kernel is True


def test_activation_quantizer_keeps_grid_arithmetic_in_float32_under_bf16():
    """bf16 inputs (autocast convolutions) are quantized in float32: same output and LSQ step gradient as the
    float32 computation on the same values, returned in bf16 for the next convolution."""
    torch.manual_seed(0)
    values = (torch.rand(4096) * 7.3).to(torch.bfloat16)
    grads = torch.randn(4096).to(torch.bfloat16).float()  # exact in both dtypes
    results = []
    for x in (values, values.float()):
        quantizer = ActivationQuantizer(bits=4, learn_scale=True)
        quantizer.set_range(torch.tensor(0.43), torch.tensor(0.0), signed=False)
        quantizer.set_mode("nearest")
        out = quantizer(x)
        assert out.dtype == x.dtype
        (out.float() * grads).sum().backward()
        results.append((out.float(), quantizer.scale.grad.clone()))
    (out_bf16, grad_bf16), (out_fp32, grad_fp32) = results
    torch.testing.assert_close(out_bf16, out_fp32.to(torch.bfloat16).float(), rtol=0, atol=0)
    torch.testing.assert_close(grad_bf16, grad_fp32, rtol=1e-6, atol=1e-7)


def test_every_runtime_option_is_in_the_config(compose_cfg):
    """conf/quant/base.yaml lists every Runtime field, so each can be set from the command line."""
    import dataclasses

    cfg = compose_cfg("quantize")
    assert set(cfg.quant.runtime) == {f.name for f in dataclasses.fields(Runtime)}
    assert Runtime.from_config(cfg.quant.runtime) == Runtime()


def test_checkpoints_store_plain_learning_rates(setup):
    """A captured step keeps its lr in a device tensor; the checkpoint keeps a number (loads anywhere)."""
    recipe = Recipe(iters=4, batch_size=4, method="qdrop")
    module = _engine(setup, recipe, Runtime())
    group = module._active[0]
    group["lr"] = torch.tensor(0.25)  # as on the CUDA-graph path
    checkpoint = {"optimizer_states": [module._optimizer.state_dict()]}
    module.on_save_checkpoint(checkpoint)
    saved = [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]]
    assert all(isinstance(lr, float) for lr in saved) and 0.25 in saved
    assert isinstance(group["lr"], torch.Tensor)  # the live group is untouched


def test_device_learning_rates_are_written_only_when_they_change(setup):
    """The schedule writes a captured step's lr tensor in place, and skips the write (a kernel launch per step
    on a GPU) when the value is unchanged, as for constant schedules."""
    module = _engine(setup, Recipe(iters=4, batch_size=4, method="qdrop"), Runtime())
    group = module._active[0]
    group["lr"] = torch.tensor(0.0)
    module.set_lr(group, 0.5)
    assert group["lr"].item() == 0.5
    group["lr"].fill_(9.0)  # a write the engine does not know about
    module.set_lr(group, 0.5)  # unchanged: skipped
    assert group["lr"].item() == 9.0
    module.set_lr(group, 0.25)
    assert group["lr"].item() == 0.25


def test_unit_adam_steps_the_active_groups_as_adam_steps_all(setup):
    """The engine's optimizer looks only at the current unit's groups; the update equals plain Adam's over all
    groups (the others hold no gradients), and the other groups' parameters and state are untouched."""
    from hdrq_lightning.quant.engine.module import UnitAdam

    torch.manual_seed(0)
    params = [torch.randn(5, requires_grad=True) for _ in range(3)]
    grads = [torch.randn(5) for _ in range(3)]

    def run(kind):
        copies = [p.detach().clone().requires_grad_(True) for p in params]
        optimizer = kind([{"params": [copies[0]], "lr": 0.1}, {"params": [copies[1]], "lr": 0.2},
                          {"params": [copies[2]], "lr": 0.3}])
        if kind is UnitAdam:
            for unit, group in enumerate(optimizer.param_groups):
                group.update(unit=unit, kind="weight")
            optimizer.only = (1, frozenset({"weight"}))
        for _ in range(3):
            optimizer.zero_grad()
            copies[1].grad = grads[1].clone()
            optimizer.step()
        return copies, optimizer

    plain, _ = run(torch.optim.Adam)
    unit, optimizer = run(UnitAdam)
    for a, b in zip(plain, unit):
        assert torch.equal(a, b)
    assert len(optimizer.param_groups) == 3 and list(optimizer.state) == [unit[1]]
    unit[0].grad = torch.ones(5)  # a gradient outside the active groups is neither used nor cleared
    optimizer.step()
    optimizer.zero_grad()
    assert torch.equal(unit[0], plain[0]) and torch.equal(unit[0].grad, torch.ones(5))

    optimizer.load_state_dict(optimizer.state_dict())  # new group dicts, picked by their keys all the same
    before = unit[1].detach().clone()
    unit[1].grad = grads[1].clone()
    optimizer.step()
    assert not torch.equal(unit[1], before) and torch.equal(unit[0], plain[0])

    module = _engine(setup, Recipe(iters=4, batch_size=4, method="qdrop"), Runtime())
    unit_index, kinds = module._optimizer.only
    assert unit_index == module.phase.unit and {g["kind"] for g in module._active} <= kinds and module._active
    assert len(module._optimizer.param_groups) > len(module._active)


def test_unit_adam_kernel_step_falls_back_to_step_where_the_kernel_does_not_apply():
    """kernel_step (what a captured step calls) runs torch's update for what the Triton kernel does not take: CPU
    tensors, a float learning rate; the result is step's, bit for bit (the kernel itself: tests/test_kernels.py)."""
    from hdrq_lightning.quant.engine.module import UnitAdam

    torch.manual_seed(1)
    start = torch.randn(6, 4)
    results = []
    for name in ("step", "kernel_step"):
        param = start.clone().requires_grad_(True)
        optimizer = UnitAdam([{"params": [param], "lr": 0.05, "unit": 0, "kind": "weight"}])
        optimizer.only = (0, frozenset({"weight"}))
        for i in range(3):
            param.grad = torch.full_like(param, float(i + 1))
            getattr(optimizer, name)()
        results.append(param.detach())
    assert torch.equal(*results) and not torch.equal(results[0], start)


@pytest.mark.parametrize("tf32", [None, True, False])
def test_tf32_null_keeps_the_process_settings(tf32):
    """quant.runtime.tf32: null leaves torch's settings (TF32 convolutions, FP32 matmuls by default, as the
    official code runs); true and false set both switches."""
    # (the process's settings are restored exactly by conftest's autouse fixture: assigning allow_tf32 back would
    # leave fp32_precision 'ieee' where it was 'none', another compile-cache key for every later test)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    Runtime(tf32=tf32).apply_precision()
    expected = (False, True) if tf32 is None else (tf32, tf32)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == expected


def test_mixed_input_keeps_the_cache_layout_and_the_logical_order_draw(setup):
    """QDrop's input mixing is drawn in logical order (layout-independent) but applied in the cache's layout: with
    channels-last caches the mixed input is channels-last (no transpose before the unit, none saved for its
    backward) and equals, element by element, the NCHW run's."""
    recipe = Recipe(method="qdrop", iters=4, batch_size=4)
    batches = {}
    for channels_last in (False, True):
        module = _engine(setup, recipe, Runtime(channels_last=channels_last))
        module.seek(next(p for p in module.plan if p.unit == 1).start, enter=True)  # the stem's two inputs agree
        module._reseed(3)
        indices = module._draw_indices()
        inputs, _ = module._batch(module.phase.pass_name, indices, {}, module._local_slice())
        batches[channels_last] = inputs
    assert batches[True].is_contiguous(memory_format=torch.channels_last) and batches[False].is_contiguous()
    assert torch.equal(batches[True], batches[False])
    quant, fp = (module._cache.gather_device(module._cache.input_names(kind)[0], indices)
                 for kind in ("quant_input", "fp_input"))
    assert not torch.equal(batches[True], quant) and not torch.equal(batches[True], fp)  # really mixed


def test_row_gather_of_the_cache_is_index_select_in_the_cache_layout():
    """gather_device's row gather (a copy kernel on a 2-D view) gives index_select's rows in the cache's layout:
    contiguous, channels-last, a one-row cache whose batch stride is arbitrary (it stays dense) and a strided one
    (index_select's path)."""
    x = torch.randn(5, 3, 4, 6)
    single = torch.randn(1, 3, 4, 6).as_strided((1, 3, 4, 6), (999, 1, 18, 3))  # channels-last, stride(0) unused
    indices = torch.tensor([4, 0, 0, 2])
    cases = [(x, indices), (x.contiguous(memory_format=torch.channels_last), indices),
             (single, torch.tensor([0, 0, 0])), (x[:, :, ::2], indices)]
    for tensor, rows in cases:
        cache = UnitCache("joint", 0, tensor, tensor, tensor[:, 0], torch.device("cpu"))
        gathered = cache.gather_device("quant_input", rows)
        assert torch.equal(gathered, tensor.index_select(0, rows))
        if tensor.is_contiguous() or tensor.is_contiguous(memory_format=torch.channels_last):
            assert gathered.stride()[1:] == tensor.stride()[1:]
