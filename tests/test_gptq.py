"""The GPTQ core and E-PMQ's objective, against identities and brute force (no reference code needed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdrq_lightning.pmq.gptq import Grid, gptq_quantize, round_to_nearest
from hdrq_lightning.pmq.objective import TaskMoments, anchored_target, layer_rows
from hdrq_lightning.quant.quantizers import WeightQuantizer


def _problem(rows=6, columns=20, tokens=64, bits=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, columns, generator=g, dtype=torch.float64) @ torch.randn(columns, columns, generator=g,
                                                                                       dtype=torch.float64)
    quantizer = WeightQuantizer(bits, per_channel=True)
    quantizer.init_range(w.float(), search="minmax")
    grid = Grid(quantizer.scale.reshape(-1).double(), quantizer.zero_point.reshape(-1).double(), quantizer.qmin,
                quantizer.qmax)
    return w, x.T @ x, grid, quantizer


def _reference_gptq(w, h, grid, damp=0.01):
    """A plain transcription of IST-DASLab/gptq's fasterquant (block = all columns, no act-order), numpy float64."""
    W, H = w.numpy().copy(), h.numpy().copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * np.mean(np.diag(H)) * np.eye(len(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor of H^-1
    Q = np.zeros_like(W)
    scale, zero = grid.scale.numpy(), grid.zero_point.numpy()
    for i in range(W.shape[1]):
        col = W[:, i]
        q = (np.clip(np.round(col / scale + zero), grid.qmin, grid.qmax) - zero) * scale
        Q[:, i] = q
        err = (col - q) / Hinv[i, i]
        W[:, i:] -= np.outer(err, Hinv[i, i:])
    return torch.from_numpy(Q)


def test_matches_a_transcription_of_the_reference_loop():
    w, h, grid, _ = _problem()
    q, info = gptq_quantize(w, h, grid, block_size=7, dtype=torch.float64)
    assert torch.allclose(q, _reference_gptq(w, h, grid), atol=1e-9)
    assert not info.fallback and info.damp_used == pytest.approx(0.01 * float(torch.diagonal(h).mean()))


def test_scaled_identity_hessian_is_round_to_nearest():
    w, _, grid, _ = _problem()
    q, _ = gptq_quantize(w, 3.7 * torch.eye(w.shape[1], dtype=torch.float64), grid, dtype=torch.float64)
    assert torch.equal(q, round_to_nearest(w, grid))


@pytest.mark.parametrize("act_order", [False, True])
def test_block_sizes_agree_and_losses_sum_to_the_objective(act_order):
    w, h, grid, _ = _problem(columns=23)
    results = [gptq_quantize(w, h, grid, block_size=b, act_order=act_order, dtype=torch.float64)
               for b in (1, 7, 128)]
    for q, _ in results[1:]:
        assert torch.allclose(q, results[0][0], atol=1e-10)
    q, info = results[0]
    damped = h + info.damp_used * torch.eye(len(h), dtype=h.dtype)
    trace = 0.5 * torch.trace((q - w) @ damped @ (q - w).T)
    assert info.loss == pytest.approx(float(trace), rel=1e-8)


def test_never_worse_than_round_to_nearest_on_average_and_near_exhaustive_search():
    """4 columns, 2 bits: exhaustive search over the 4^4 codes per row gives the optimum of tr((Q-W)H(Q-W)^T)
    (rows are independent). GPTQ is greedy: never below the optimum, below RTN on average and in most cases (not
    in every case: a greedy column order can lose to plain rounding)."""
    gaps_gptq, gaps_rtn = [], []
    for seed in range(60):
        w, h, grid, _ = _problem(rows=3, columns=4, tokens=6, bits=2, seed=seed)
        h = h + 1e-3 * torch.eye(4, dtype=h.dtype)
        loss = lambda q, w=w, h=h: float(torch.trace((q - w) @ h @ (q - w).T))  # noqa: E731
        best = 0.0
        for r in range(w.shape[0]):
            values = [(c - grid.zero_point[r]) * grid.scale[r] for c in range(grid.qmin, grid.qmax + 1)]
            best += min(float((torch.stack(list(v)) - w[r]) @ h @ (torch.stack(list(v)) - w[r]))
                        for v in itertools.product(values, repeat=4))
        q, _ = gptq_quantize(w, h, grid, damp=0.0, dtype=torch.float64)
        assert loss(q) >= best - 1e-9
        gaps_gptq.append(loss(q) - best)
        gaps_rtn.append(loss(round_to_nearest(w, grid)) - best)
    gaps_gptq, gaps_rtn = np.array(gaps_gptq), np.array(gaps_rtn)
    assert gaps_gptq.mean() < gaps_rtn.mean() and np.mean(gaps_gptq <= gaps_rtn + 1e-12) > 0.6


def test_dead_columns_are_zeroed_and_a_failing_cholesky_falls_back_to_rtn():
    w, h, grid, _ = _problem()
    h[3, :] = h[:, 3] = 0
    q, info = gptq_quantize(w, h, grid, dtype=torch.float64)
    assert info.dead_columns == 1 and torch.all(q[:, 3] == grid.column(torch.zeros(len(w), dtype=w.dtype)))
    broken = -torch.eye(w.shape[1], dtype=torch.float64)  # negative definite: no damping rescues it
    q, info = gptq_quantize(w, broken, grid, damp_retries=2, dtype=torch.float64)
    assert info.fallback and torch.equal(q, round_to_nearest(w, grid))


def test_frozen_bias_column_absorbs_the_error_and_is_not_rounded():
    w, h, grid, _ = _problem(columns=10)
    x_rows = torch.randn(50, 9, dtype=torch.float64)
    x_aug = torch.cat([x_rows, torch.ones(50, 1, dtype=torch.float64)], 1)
    h = x_aug.T @ x_aug
    q, _ = gptq_quantize(w, h, grid, frozen=1, act_order=True, damp=0.0, dtype=torch.float64)
    on_grid = round_to_nearest(q, grid, frozen=1)
    assert torch.allclose(q[:, :9], on_grid[:, :9], atol=1e-12) and not torch.allclose(q[:, 9], w[:, 9])
    # the mean output error is what a free bias removes: the column gets the optimal correction (undamped)
    error = (x_aug @ (w - q).T).mean(0)
    assert error.abs().max() < 1e-8


def test_codes_are_the_integer_export_of_the_quantizer():
    w, h, grid, quantizer = _problem()
    q, _ = gptq_quantize(w.float(), h, grid)
    codes = quantizer.integer(q)
    assert torch.equal(((codes - quantizer.zero_point) * quantizer.effective_scale()), q)


def test_conv_rows_are_the_explicit_patches_and_batches_accumulate():
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    x = torch.randn(5, 3, 9, 9)
    rows = layer_rows(conv, x)
    # explicit patches: every output position's receptive field, flattened as weight.flatten(1)
    padded = F.pad(x, (1, 1, 1, 1))
    patches = [padded[n, :, i:i + 3, j:j + 3].reshape(-1) for n in range(5) for i in range(0, 9, 2)
               for j in range(0, 9, 2)]
    assert torch.allclose(rows, torch.stack(patches), atol=1e-6)
    out = conv(x).permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.allclose(rows @ conv.weight.flatten(1).T + conv.bias, out, atol=1e-5)
    whole, parts = TaskMoments(27, True, False, torch.device("cpu")), TaskMoments(27, True, False, torch.device("cpu"))
    whole.add(rows)
    for chunk in rows.split(7):
        parts.add(chunk)
    assert torch.allclose(whole.S, parts.S) and whole.count == parts.count


def _moments(tasks=3, d=8, tokens=40, seed=0, affine=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(tasks):
        m = TaskMoments(d, affine, True, torch.device("cpu"))
        x = torch.randn(tokens, d, generator=g, dtype=torch.float64)
        m.add(x, x + 0.3 * torch.randn(tokens, d, generator=g, dtype=torch.float64))
        out.append(m)
    return out


def test_objective_equals_the_completed_square_up_to_a_constant():
    """J(Q) - tr((Q - W*) H (Q - W*)^T) is the same for every Q: GPTQ on (W*, H) minimises J."""
    g = torch.Generator().manual_seed(1)
    moments = _moments()
    experts = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    merged = sum(experts) / 3
    for beta in (1.0, 0.4):
        target = anchored_target(moments, experts, merged, merged, alpha=0.4, beta=beta, strength=0.3)
        differences = []
        for _ in range(5):
            Q = torch.randn(5, 8, generator=g, dtype=torch.float64)
            D = Q - target.weight
            differences.append(target.objective.value(Q) - float(torch.trace(D @ target.hessian @ D.T)))
        assert np.ptp(differences) < 1e-9 * max(1.0, abs(differences[0]))


def test_objective_value_against_samples():
    """J evaluated from moments equals the sample average it stands for."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 6, generator=g, dtype=torch.float64)
    e = torch.randn(30, 6, generator=g, dtype=torch.float64)
    m = TaskMoments(6, False, True, torch.device("cpu"))
    m.add(x, e)
    W, M, Q = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    target = anchored_target([m], [W], M, M, alpha=0.3, beta=0.7, strength=0.0, scale="absolute")
    xtau = 0.3 * e + 0.7 * x
    direct = ((0.7 * xtau @ W.T + 0.3 * x @ M.T - x @ Q.T) ** 2).sum(1).mean()
    weight = 1 / float(torch.linalg.matrix_norm(x.T @ x / 30))
    assert target.objective.value(Q) == pytest.approx(weight * float(direct), rel=1e-10)


def test_anchor_limits_and_the_gptq_special_case():
    g = torch.Generator().manual_seed(3)
    moments = _moments()
    experts = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    merged = sum(experts) / 3
    # mu -> infinity: W* -> the anchor; GPTQ on it is round-to-nearest of the anchor
    huge = anchored_target(moments, experts, merged, merged, alpha=0.25, beta=1.0, strength=1e9)
    assert torch.allclose(huge.weight, merged, atol=1e-6)
    inf = anchored_target(moments, experts, merged, merged, alpha=0.25, beta=1.0, strength=math.inf)
    quantizer = WeightQuantizer(3)
    quantizer.init_range(merged.float(), search="minmax")
    grid = Grid(quantizer.scale.reshape(-1).double(), quantizer.zero_point.reshape(-1).double(), quantizer.qmin,
                quantizer.qmax)
    assert torch.equal(gptq_quantize(inf.weight, inf.hessian, grid, dtype=torch.float64)[0],
                       round_to_nearest(merged, grid))
    # alpha = 0, one task whose expert is the merge: W* is the merge (E-PMQ reduces to GPTQ)
    one = anchored_target(moments[:1], [merged], merged, merged, alpha=0.0, beta=1.0, strength=0.0)
    assert torch.allclose(one.weight, merged, atol=1e-8)
    # alpha = 0 gives G = S
    S, G, _ = moments[0].expectations(0.0)
    assert torch.equal(S, G)


def test_deployed_input_errors_against_samples():
    from hdrq_lightning.pmq.objective import deployed_input_errors

    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    moments = []
    for x in rows:
        m = TaskMoments(6, False, False, torch.device("cpu"))
        m.add(x)
        moments.append(m)
    experts = [torch.randn(3, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    Q = torch.randn(3, 6, generator=g, dtype=torch.float64)
    direct = [float((x @ (W - Q).T).norm() / (x @ W.T).norm()) for x, W in zip(rows, experts)]
    assert deployed_input_errors(moments, experts, Q) == pytest.approx(direct, rel=1e-10)
