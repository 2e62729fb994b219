"""HDRQ's noise in every form the engine runs it: eager, Inductor-compiled and (on CUDA) replayed from a CUDA graph.

    python bench/noise_fidelity.py --out bench/results          # on a GPU: writes noise_fidelity_<gpu>.json

For post-ReLU activations on the unsigned 4-bit grid (about half exact zeros) it checks that every zero stays
exactly 0 (clip-boundary elements are pinned); for a tensor whose rounding residuals are skewed (80% of
``x - round(x)`` positive) it compares the noise with the rounding error ``round(x) - x`` that it stands for, and
with its mirror: mean, and the two-sample Kolmogorov-Smirnov distance on a subsample. A check, not a timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hdrq_lightning.quant.quantizers import fake_quantize_noise  # noqa: E402


def noise_form(name: str, t: torch.Tensor, w: torch.Tensor, fn) -> dict:
    device = t.device
    scale, one, zero = (torch.tensor(v, device=device) for v in (0.25, 1.0, 0.0))
    relu = fn(t, scale, zero)
    zeros = t == 0
    noise = fn(w, one, zero) - w
    error = torch.round(w) - w
    sample = torch.randperm(len(w), device=device)[:200_000]

    def ks(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(float(stats.ks_2samp(a[sample].cpu().numpy(), b[sample].cpu().numpy()).statistic), 4)

    return {"form": name, "zeros_kept": bool(torch.equal(relu[zeros], torch.zeros_like(relu[zeros]))),
            "zero_fraction": round(zeros.float().mean().item(), 3), "noise_mean": round(noise.mean().item(), 4),
            "rounding_error_mean": round(error.mean().item(), 4), "ks_vs_rounding_error": ks(noise, error),
            "ks_vs_mirror": ks(noise, -error)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 22)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default=None, help="folder for noise_fidelity_<device>.json (default: print only)")
    args = parser.parse_args()
    torch.manual_seed(0)
    n, device = args.elements, args.device
    t = torch.relu(torch.randn(n, device=device)) * 1.5
    offsets = 0.45 * torch.rand(n, device=device) * torch.where(torch.rand(n, device=device) < 0.8, 1.0, -1.0)
    w = torch.randint(1, 14, (n,), device=device).float() + offsets

    def eager(a: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return fake_quantize_noise(a, s, z, 0, 15, "histogram")

    forms = [noise_form("eager", t, w, eager)]
    if args.compile:
        forms.append(noise_form("compiled", t, w, torch.compile(eager, dynamic=False)))
    if device.startswith("cuda"):  # the fast path captures the whole step in a CUDA graph
        static, scale, zero = t.clone(), torch.tensor(0.25, device=device), torch.tensor(0.0, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                eager(static, scale, zero)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = eager(static, scale, zero)
        graph.replay()
        torch.cuda.synchronize()
        forms.append({"form": "cuda_graph", "zeros_kept": bool(torch.equal(out[t == 0], torch.zeros_like(out[t == 0])))})
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "elements": n, "forms": forms}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        name = result["device"].lower().replace("nvidia ", "").replace(" ", "_")
        Path(args.out, f"noise_fidelity_{name}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
