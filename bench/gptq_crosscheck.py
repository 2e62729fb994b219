"""Cross-check of the project's GPTQ core (pmq/gptq.py) against llm-compressor's (a maintained implementation;
not a dependency of the project: run once, from a scratch install).

    pip download --no-deps -d /tmp/wh llmcompressor==0.14.0.1 compressed-tensors==0.20.1 loguru
    pip install --no-deps --target /tmp/ctmin /tmp/wh/*.whl      # (plus what compressed-tensors asks for)
    PYTHONPATH=/tmp/ctmin python bench/gptq_crosscheck.py --out bench/results

Loads only ``llmcompressor/modifiers/gptq/{helpers,gptq_quantize}.py`` (the package's ``__init__`` pulls in
transformers, datasets and friends; without transformers installed a stub module provides the class names that
compressed-tensors and helpers.py import, which this path never uses). On random layers (a Linear-like and a conv-like shape, asymmetric and
symmetric per-channel grids, 3 and 4 bits, act-order off and on) both solvers get the same Hessian (H = X^T X)
and the same per-row scale and zero point, and the dequantized results are compared: max |difference| and the
share of codes that differ (float32 rounding ties can flip a code, which then propagates through the error
feedback). Writes gptq_crosscheck.json.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import write_result  # noqa: E402
from hdrq_lightning.pmq.gptq import Grid, gptq_quantize  # noqa: E402
from hdrq_lightning.quant.quantizers import WeightQuantizer  # noqa: E402


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of ``root`` and its submodules give stub modules whose attributes are empty classes."""

    def __init__(self, root: str) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda name: type(name, (torch.nn.Module,), {})
        return module

    def exec_module(self, module) -> None:
        pass


def load_llmcompressor_gptq():
    """``quantize_weight`` and ``QuantizationArgs`` without importing llmcompressor's package ``__init__``."""
    spec = importlib.util.find_spec("llmcompressor")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llmcompressor is not importable: see the module docstring for the scratch install.")
    root = Path(list(spec.submodule_search_locations)[0])
    if importlib.util.find_spec("transformers") is None:
        # compressed-tensors imports a few HF names at import time and helpers.py matches HF's Conv1D: stub
        # modules (transformers and any submodule) whose every attribute is an empty class; never used here
        sys.meta_path.insert(0, _StubFinder("transformers"))
    for name, path in (("llmcompressor", root), ("llmcompressor.modifiers", root / "modifiers"),
                       ("llmcompressor.modifiers.gptq", root / "modifiers" / "gptq")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    modules = {}
    for leaf in ("helpers", "gptq_quantize"):
        name = f"llmcompressor.modifiers.gptq.{leaf}"
        module_spec = importlib.util.spec_from_file_location(name, root / "modifiers" / "gptq" / f"{leaf}.py")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        module_spec.loader.exec_module(module)
        modules[leaf] = module
    from compressed_tensors.quantization import QuantizationArgs

    return modules["gptq_quantize"].quantize_weight, QuantizationArgs


def case(rows: int, columns: int, bits: int, symmetric: bool, act_order: bool, seed: int, quantize_weight,
         QuantizationArgs, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=g)
    x = torch.randn(4 * columns, columns, generator=g) @ (torch.eye(columns) + 0.3 * torch.randn(columns, columns,
                                                                                                  generator=g))
    h = (x.T @ x) / len(x)
    quantizer = WeightQuantizer(bits, per_channel=True, symmetric=symmetric)
    quantizer.init_range(w, search="minmax")
    scale, zero = quantizer.effective_scale().reshape(-1), quantizer.zero_point.reshape(-1)
    ours, _ = gptq_quantize(w.to(device), h.to(device), Grid(scale.to(device), zero.to(device), quantizer.qmin,
                                                              quantizer.qmax), act_order=act_order)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="channel",
                            actorder="static" if act_order else None)
    # compressed-tensors stores an unsigned zero point as a signed one: q = clamp(round(w/s) + z, -2^(b-1), ...)
    ct_zero = (zero - (0 if symmetric else 2 ** (bits - 1))).to(torch.int8 if bits <= 8 else torch.int32)
    theirs, _, fallback = quantize_weight(w[None].clone().to(device), h[None].clone().to(device),
                                          scale[None, :, None].to(device), ct_zero[None, :, None].to(device), None, args,
                                          blocksize=128, percdamp=0.01)
    theirs = theirs[0].float()
    ours_codes = torch.round(ours.cpu() / scale[:, None] + zero[:, None])
    theirs_codes = torch.round(theirs.cpu() / scale[:, None] + zero[:, None])
    loss = lambda q: float(torch.trace((q.cpu() - w) @ h @ (q.cpu() - w).T))  # noqa: E731
    return {"rows": rows, "columns": columns, "bits": bits, "symmetric": symmetric, "act_order": act_order,
            "max_abs_difference": float((ours.cpu() - theirs.cpu()).abs().max()),
            "codes_differing": float((ours_codes != theirs_codes).float().mean()),
            "objective_ours": loss(ours), "objective_llmcompressor": loss(theirs),
            "llmcompressor_fallback": bool(fallback[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    quantize_weight, QuantizationArgs = load_llmcompressor_gptq()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for rows, columns in ((64, 96), (32, 288)):
        for bits, symmetric in ((4, False), (3, False), (4, True)):
            for act_order in (False, True):
                results.append(case(rows, columns, bits, symmetric, act_order, len(results), quantize_weight,
                                    QuantizationArgs, device))
                print(json.dumps(results[-1]), flush=True)
    import llmcompressor.modifiers.gptq.gptq_quantize as reference

    write_result(args.out, "gptq_crosscheck.json", {"device": str(device),
                                                     "reference": str(Path(reference.__file__)), "cases": results})

if __name__ == "__main__":
    main()
