"""Stage `analyze`: error barriers (paper Eq. 2/3), loss surface (Fig. 2) and noise-sample spread (Fig. 3)."""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from hdrq_lightning.analysis import (
    error_barrier,
    filter_normalized_direction,
    interpolate_states,
    loss_surface,
    plot_barrier_curves,
    plot_loss_surface,
    plot_sample_distribution,
    state_evaluator,
)
from hdrq_lightning.artifacts import QUANTIZED_FILE, write_json
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.evaluation import DomainEvaluator, default_device
from hdrq_lightning.merge import get_merge_method
from hdrq_lightning.quant.export import load_integer_file, load_integer_state
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import quant_layers, set_quant_mode
from hdrq_lightning.quant.recipe import Recipe
from hdrq_lightning.stages.common import (
    build_datamodule,
    build_task,
    load_model,
    notice,
    require_finished,
    stage_run,
    start_fresh_if_forced,
)


def _pair(cfg: DictConfig, targets: list[str]) -> list[str]:
    pair = list(cfg.analysis.pair or targets[:2])
    if len(pair) != 2 or not set(pair) <= set(targets):
        raise ConfigError(f"analysis.pair={pair} must name two of the targets {targets}.")
    return pair


def run_analyze(cfg: DictConfig) -> dict:
    dm = build_datamodule(cfg)
    recipe = Recipe.from_config(cfg.quant)
    run = stage_run(cfg, "analysis", recipe.tag)
    if not start_fresh_if_forced(cfg, run):
        return run.metrics()
    pair = _pair(cfg, list(dm.targets))
    quant_runs = [stage_run(cfg, "quantize", recipe.tag, t) for t in pair]
    adapt_runs = [stage_run(cfg, "adapt", t) for t in pair]
    for upstream in (*quant_runs, *adapt_runs):
        require_finished(upstream, cfg, "analyze")
    device = default_device()
    task = build_task(cfg)
    evaluate = DomainEvaluator(dm, pair, cfg.analysis.max_images, device, task)
    lambdas = [i / (cfg.analysis.lambdas - 1) for i in range(cfg.analysis.lambdas)]
    torch.manual_seed(cfg.seed)

    # Eq. 2: FP experts (BN-folded) interpolated in weight space.
    fp_model, other = (fold_batch_norm(load_model(cfg, dm.num_classes, r.weights_path)) for r in adapt_runs)
    fp_states = [{k: v.clone() for k, v in fp_model.state_dict().items()}, other.state_dict()]

    fp_at = state_evaluator(fp_model, evaluate, lambda lam: interpolate_states(fp_states[0], fp_states[1], lam))

    # Eq. 3: quantized endpoints; the model at lambda is the interpolation re-quantized on the interpolated grid.
    experts = [load_integer_file(r.dir / QUANTIZED_FILE)[0] for r in quant_runs]
    quant_model = load_model(cfg, dm.num_classes, quant_runs[0].dir / QUANTIZED_FILE, train=False)
    run.prepare(cfg)  # every input read: a failure above leaves no run dir behind
    grid_merge = get_merge_method("quantized", sampling="none", selection="none")

    def quant_at(lam: float) -> tuple[float, float]:
        load_integer_state(quant_model, grid_merge.merge(experts, weights=[1.0 - lam, lam]))
        return evaluate(quant_model)

    barriers = {"FP": error_barrier(fp_at, lambdas), recipe.tag: error_barrier(quant_at, lambdas)}

    # Fig. 2: loss around the first quantized expert along two filter-normalised directions of its (dequantized)
    # weights; the weights are perturbed in float (a perturbation below the step would round away), activations
    # stay quantized.
    load_integer_state(quant_model, experts[0])
    set_quant_mode(quant_model, weight="float")
    center = {k: v.clone() for k, v in quant_model.state_dict().items()}
    keys = [f"{name}.weight" for name, _ in quant_layers(quant_model)]
    generator = torch.Generator().manual_seed(cfg.seed)
    directions = [filter_normalized_direction(center, generator, keys=keys) for _ in range(2)]
    surface_eval = DomainEvaluator(dm, pair[:1], cfg.analysis.max_images, device, task)

    def surface_loss(state) -> float:
        quant_model.load_state_dict(state)
        return surface_eval(quant_model)[0]

    alphas, betas, losses = loss_surface(surface_loss, center, *directions, span=cfg.analysis.surface_span,
                                         steps=cfg.analysis.surface_steps, keys=keys)
    set_quant_mode(quant_model, weight="nearest")

    # Fig. 3: merged accuracy over noise samples, random draw vs cosine selection.
    random_draws = get_merge_method("quantized", sampling="noise", selection="none",
                                    num_samples=cfg.analysis.noise_samples, seed=cfg.seed)
    samples = {"random sample": [], "cosine selection": []}
    for merged in random_draws.sample_merges(experts):
        samples["random sample"].append(evaluate(load_integer_state(quant_model, merged))[1])
    for trial in range(cfg.analysis.noise_samples):
        selected = get_merge_method("quantized", sampling="noise", selection="cosine",
                                    num_samples=cfg.analysis.selection_pool, seed=cfg.seed + 1 + trial)
        samples["cosine selection"].append(evaluate(load_integer_state(quant_model, selected.merge(experts)))[1])

    title = f"{recipe.method} W{recipe.w_bits}A{recipe.a_bits}, {pair[0]} + {pair[1]}"
    plot_barrier_curves(barriers, run.dir / "barrier.png", title=f"error barrier: {title}")
    plot_loss_surface(alphas, betas, losses, run.dir / "surface.png", title=f"loss surface: {title} ({pair[0]})")
    plot_sample_distribution(samples, run.dir / "samples.png", title=f"merged H-mean over noise samples: {title}")
    result = {
        "stage": "analysis", "method": recipe.method, "w_bits": recipe.w_bits, "a_bits": recipe.a_bits,
        "pair": pair,
        "barrier": {name: curve.to_dict() for name, curve in barriers.items()},
        "surface": {"alphas": alphas.tolist(), "betas": betas.tolist(), "losses": losses.tolist()},
        "samples": samples,
    }
    write_json(run.dir / "analysis.json", result)
    notice.info("analysis %s: FP barrier %.4f, quantized barrier %.4f", recipe.tag, barriers["FP"].barrier,
             barriers[recipe.tag].barrier)
    return run.finish({k: result[k] for k in ("stage", "method", "w_bits", "a_bits", "pair")} |
                      {"barrier": {k: v.barrier for k, v in barriers.items()},
                       "samples_mean": {k: sum(v) / len(v) for k, v in samples.items()}})
