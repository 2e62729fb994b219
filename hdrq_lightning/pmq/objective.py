"""E-PMQ's per-layer objective: calibration moments, the anchored target ``W*`` and its Hessian.

Per layer with weight ``W`` [rows, d] (a convolution's ``weight.flatten(1)``, inputs unfolded), tasks t, the
deployed input ``x~`` (merged model, earlier layers already quantized) and expert t's own input ``x^e`` on the
same images, the target input ``x^tau = alpha x^e + (1 - alpha) x~`` and

    J(Q) = sum_t w_t E_t || beta W_t x^tau + (1 - beta) W_m x~ - Q x~ ||^2  +  mu || Q - A ||^2

(beta = 1: expert targets with the weight-space anchor, the paper's "merged-weight anchoring"; beta < 1: the
output-space anchor toward the merged layer's own output; beta = 0, mu = 0 is GPTQ's own objective). Completing
the square, ``J(Q) = tr((Q - W*) H (Q - W*)^T) + const`` with

    H  = sum_t w_t S_t + mu I,       S_t = E_t[x~ x~^T]
    W* = (beta sum_t w_t W_t G_t + (1 - beta) W_m sum_t w_t S_t + mu A) H^-1,   G_t = E_t[x^tau x~^T]

so GPTQ run on ``(W*, H)`` is GPTQ's own solver of J. With ``affine`` the inputs get a trailing constant 1 and the
weights their bias column, so bias and weights are fitted together (BN-folded domain experts keep their domain's
statistics in the bias). Moments accumulate in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdrq_lightning.errors import ConfigError


def layer_rows(layer: nn.Module, x: Tensor) -> Tensor:
    """The inputs of ``layer`` as rows [tokens, d] in the column order of ``weight.flatten(1)``: a Linear's last
    dim, a Conv2d's unfolded patches (as the GPTQ reference)."""
    weight = layer.weight
    if weight.dim() == 2:
        return x.reshape(-1, weight.shape[1])
    if weight.dim() == 4:
        if getattr(layer, "groups", 1) != 1:
            raise ConfigError(f"{type(layer).__name__} with groups={layer.groups}: grouped convolutions are not "
                              "supported by the post-merge quantizers yet (their columns are per group).")
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    raise ConfigError(f"{type(layer).__name__} has a {weight.dim()}-d weight; post-merge quantization handles "
                      "Linear (2-d) and Conv2d (4-d) layers.")


class TaskMoments:
    """Uncentred moments of one layer on one task, accumulated batch by batch in float64.

    ``deployed``: S = sum x~ x~^T; with ``expert`` inputs also C = sum x^e x~^T and E = sum x^e x^e^T (paired
    rows: the same images in the same order). ``affine`` appends a constant 1 to every row.
    """

    def __init__(self, columns: int, affine: bool, with_expert: bool, device: torch.device) -> None:
        d = columns + int(affine)
        self.affine, self.count = affine, 0
        zeros = lambda: torch.zeros(d, d, dtype=torch.float64, device=device)  # noqa: E731
        self.S = zeros()
        self.C = zeros() if with_expert else None
        self.E = zeros() if with_expert else None

    def _rows(self, rows: Tensor) -> Tensor:
        rows = rows.double()
        return torch.cat([rows, rows.new_ones(len(rows), 1)], 1) if self.affine else rows

    def add(self, deployed: Tensor, expert: Tensor | None = None) -> None:
        x = self._rows(deployed)
        self.S += x.T @ x
        if self.C is not None:
            if expert is None or expert.shape != deployed.shape:
                raise ValueError("expert rows must pair with the deployed rows")
            e = self._rows(expert)
            self.C += e.T @ x
            self.E += e.T @ e
        self.count += len(x)

    def expectations(self, alpha: float) -> tuple[Tensor, Tensor, Tensor]:
        """(S_t, G_t, T_t) = E[x~ x~^T], E[x^tau x~^T], E[x^tau x^tau^T] for the input mix ``alpha``."""
        if self.count == 0:
            raise ValueError("no calibration rows reached this layer")
        S = self.S / self.count
        if self.C is None:
            if alpha != 0:
                raise ValueError("an input mix alpha > 0 needs the expert inputs")
            return S, S, S
        C, E = self.C / self.count, self.E / self.count
        G = alpha * C + (1 - alpha) * S
        T = alpha**2 * E + alpha * (1 - alpha) * (C + C.T) + (1 - alpha) ** 2 * S
        return S, G, T


def deployed_input_errors(moments: list[TaskMoments], experts: list[Tensor], Q: Tensor) -> list[float]:
    """Per task ||W_t x~ - Q x~|| / ||W_t x~||: the layer's deviation from expert t on the deployed input (the
    same yardstick for every method: it needs only S_t, which every method with statistics collects). It is
    ``Objective.relative_errors`` at input mix 0 (G_t = T_t = S_t)."""
    S = [m.S / m.count for m in moments]
    experts64 = [W.double() for W in experts]
    return Objective(S, S, S, experts64, [1.0] * len(S), 1.0, Q.double(), Q.double(), 0.0).relative_errors(Q)


def task_weights(moments: list[TaskMoments], scheme: str) -> list[float]:
    """w_t: ``frobenius`` 1/||S_t||_F (FeatCal), ``uniform`` 1/T, ``tokens`` n_t / sum n (pooled data, GPTQ)."""
    if scheme == "uniform":
        return [1.0 / len(moments)] * len(moments)
    if scheme == "tokens":
        total = sum(m.count for m in moments)
        return [m.count / total for m in moments]
    if scheme == "frobenius":
        norms = [float(torch.linalg.matrix_norm(m.S / m.count)) for m in moments]
        return [1.0 / n if n > 0 else 0.0 for n in norms]
    raise ConfigError(f"task_weighting={scheme!r} is unknown; use frobenius, uniform or tokens.")


@dataclass
class Target:
    """The solved layer: ``weight`` (W* [rows, d(+1)]), ``hessian`` (H), the absolute ``mu`` used, and the
    objective's pieces for the report."""

    weight: Tensor
    hessian: Tensor
    mu: float
    objective: Objective


@dataclass
class Objective:
    """J(Q) and per-task relative output errors ||W_t x^tau - Q x~|| / ||W_t x^tau||, evaluated from moments."""

    S: list[Tensor]
    G: list[Tensor]
    T: list[Tensor]
    experts: list[Tensor]  # W_t (augmented when affine)
    weights: list[float]
    beta: float
    merged: Tensor
    anchor: Tensor
    mu: float

    def __post_init__(self) -> None:
        # per task: tr(W_t T_t W_t^T) and P_t = W_t G_t, shared by every Q evaluated
        self._reference = [float(((W @ T) * W).sum()) for W, T in zip(self.experts, self.T)]
        self._cross = [W @ G for W, G in zip(self.experts, self.G)]

    def value(self, Q: Tensor) -> float:
        """J(Q), from the moments: sum_t w_t E_t||b W_t x^tau + R x~||^2 + mu ||Q - A||^2 with R = (1 - b) W_m - Q."""
        b = self.beta
        R = (1 - b) * self.merged - Q.double()
        total = 0.0
        for S, P, reference, w in zip(self.S, self._cross, self._reference, self.weights):
            total += w * (b * b * reference + 2 * b * float((P * R).sum()) + float(((R @ S) * R).sum()))
        if self.mu and math.isfinite(self.mu):
            total += self.mu * float(((Q.double() - self.anchor) ** 2).sum())
        return total

    def relative_errors(self, Q: Tensor) -> list[float]:
        """Per task ||W_t x^tau - Q x~|| / ||W_t x^tau|| (the expert-relative deviation of the layer)."""
        Q = Q.double()
        out = []
        for S, P, reference in zip(self.S, self._cross, self._reference):
            error = reference - 2 * float((P * Q).sum()) + float(((Q @ S) * Q).sum())
            out.append(math.sqrt(max(error, 0.0) / reference) if reference > 0 else 0.0)
        return out


def anchored_target(moments: list[TaskMoments], experts: list[Tensor], merged: Tensor, anchor: Tensor,
                    alpha: float, beta: float, strength: float, scale: str = "relative",
                    token_aware: bool = False, weighting: str = "frobenius") -> Target:
    """W* and H of the anchored objective (module docstring) for weights given as [rows, d] (augmented with their
    bias column when the moments are affine).

    ``strength``: mu, relative to mean diag(sum_t w_t S_t) (``scale="relative"``) or absolute; ``inf`` gives
    W* = A and H = I (GPTQ then rounds A to nearest). ``token_aware`` multiplies mu by max(1, live columns /
    fewest tokens of a task) where a layer has fewer calibration rows than live input columns.
    """
    if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta <= 1.0:
        raise ConfigError(f"input mix {alpha} and expert share {beta} must lie in [0, 1].")
    if strength < 0:
        raise ConfigError(f"anchor strength {strength} must be >= 0 (0: no anchor, inf: round the anchor).")
    weights = task_weights(moments, weighting)
    S, G, T = zip(*(m.expectations(alpha) for m in moments))
    experts64 = [W.double() for W in experts]
    merged64, anchor64 = merged.double(), anchor.double()
    S_sum = sum(w * s for w, s in zip(weights, S))
    d = S_sum.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=S_sum.device)
    mean_diag = float(torch.diagonal(S_sum).mean())
    if math.isinf(strength):
        mu = math.inf
    else:
        mu = strength * (mean_diag if scale == "relative" else 1.0)
        if scale not in ("relative", "absolute"):
            raise ConfigError(f"anchor scale={scale!r} is unknown; use relative or absolute.")
        if token_aware and mu > 0:
            live = int((torch.diagonal(S_sum) > 0).sum())
            mu *= max(1.0, live / max(1, min(m.count for m in moments)))
    objective = Objective(list(S), list(G), list(T), experts64, weights, beta, merged64, anchor64, mu)
    if math.isinf(mu):
        return Target(anchor64.clone(), eye, mu, objective)
    H = S_sum + mu * eye
    if beta == 0 and mu == 0:  # GPTQ's own objective: the merged weight is the exact minimiser
        return Target(merged64.clone(), H, mu, objective)
    B = (beta * sum(w * W @ g for w, W, g in zip(weights, experts64, G))
         + (1 - beta) * merged64 @ S_sum + mu * anchor64)
    solve_h = H if mu > 0 else H + 1e-8 * max(mean_diag, 1e-30) * eye  # FeatCal's eps for a singular sum
    try:
        W_star = torch.linalg.solve(solve_h, B.T).T  # H is symmetric: W* H = B  <=>  H W*^T = B^T
    except RuntimeError:
        W_star = B @ torch.linalg.pinv(solve_h)
    return Target(W_star, H, mu, objective)
