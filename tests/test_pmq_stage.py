"""The `pmq` stage end to end on tiny digits experts: integer file round trip, mu = inf is RTN, resume equality."""

from __future__ import annotations

import pytest
import torch

from hdrq_lightning.artifacts import read_json
from hdrq_lightning.errors import ConfigError
from hdrq_lightning.quant.export import load_integer_file
from hdrq_lightning.stages.adapt import run_adapt
from hdrq_lightning.stages.evaluate import evaluate_run
from hdrq_lightning.stages.pmq import Interrupted, run_pmq
from hdrq_lightning.stages.source import run_source

SMALL = ["pmq.calibration_size=32", "pmq.chunk=16"]


def _codes(path):
    state, _ = load_integer_file(path)
    return {k: v for k, v in state.items() if k.endswith(".weight_int")}


def test_pmq_stage_end_to_end(compose_cfg, tmp_path):
    run_source(compose_cfg("source"))
    run_adapt(compose_cfg("adapt"))
    runs = tmp_path / "runs" / "digits" / "pmq"

    cfg = compose_cfg("pmq", "pmq=epmq", "pmq.w_bits=3", *SMALL)
    result = run_pmq(cfg)
    run_dir = runs / "task_arithmetic_epmq_w3"
    assert result["status"] == "done" and set(result["per_domain"]) == {"negative", "textured", "rotated"}
    assert {"per_domain", "hmean", "mean"} <= set(result["fp_merge"])
    layers = read_json(run_dir / "layers.json")
    written = _codes(run_dir / "quantized.safetensors")
    assert sorted(r["layer"] for r in layers) == sorted(k.removesuffix(".weight_int") for k in written)
    assert all(r["fallback"] is False for r in layers)
    assert {r["bits"] for r in layers} == {3, 8}
    assert all(len(r["expert_error"]["solution"]) == 3 for r in layers)
    # the integer file round-trips through `hdrq evaluate` to the in-memory model's accuracy
    evaluated = evaluate_run(cfg, "pmq", "task_arithmetic_epmq_w3")
    assert evaluated["per_domain"] == result["per_domain"]

    # mu = inf: round-to-nearest of the merged weights (the same codes as the rtn method)
    run_pmq(compose_cfg("pmq", "pmq=epmq", "pmq.w_bits=3", "pmq.params.anchor_strength=inf", "pmq.tag=inf", *SMALL))
    run_pmq(compose_cfg("pmq", "pmq=rtn", "pmq.w_bits=3", *SMALL))
    inf = _codes(runs / "task_arithmetic_epmq_w3_inf" / "quantized.safetensors")
    rtn = _codes(runs / "task_arithmetic_rtn_w3" / "quantized.safetensors")
    assert inf.keys() == rtn.keys() and all(torch.equal(inf[k], rtn[k]) for k in inf)

    # killed after unit 2 and resumed: bit-identical to the uninterrupted run
    resumed = compose_cfg("pmq", "pmq=epmq", "pmq.w_bits=3", "pmq.tag=resumed", *SMALL)
    with pytest.raises(Interrupted):
        run_pmq(resumed, stop_after_unit=2)
    assert (runs / "task_arithmetic_epmq_w3_resumed" / "checkpoints" / "pmq_state.safetensors").is_file()
    again = run_pmq(resumed)
    assert again["per_domain"] == result["per_domain"]
    straight = load_integer_file(run_dir / "quantized.safetensors")[0]
    state = load_integer_file(runs / "task_arithmetic_epmq_w3_resumed" / "quantized.safetensors")[0]
    assert straight.keys() == state.keys() and all(torch.equal(straight[k], state[k]) for k in state)
    assert read_json(runs / "task_arithmetic_epmq_w3_resumed" / "layers.json") == layers

    # label-free selection: every candidate solved and scored on held-out train images; the lowest divergence wins
    chosen = run_pmq(compose_cfg("pmq", "pmq=epmq", "pmq.w_bits=3", "pmq.tag=select", "pmq.select.holdout=16",
                                 "pmq.select.grid={anchor_strength:[0.1,inf]}", *SMALL))
    candidates = chosen["selection"]["candidates"]
    assert [c["params"]["anchor_strength"] for c in candidates] == [0.1, float("inf")]
    best = min(candidates, key=lambda c: c["divergence"])
    assert chosen["params"]["anchor_strength"] == best["params"]["anchor_strength"]
    inf_codes = _codes(runs / "task_arithmetic_epmq_w3_inf" / "quantized.safetensors")
    selected = _codes(runs / "task_arithmetic_epmq_w3_select" / "quantized.safetensors")
    assert all(torch.equal(selected[k], inf_codes[k]) for k in selected) == (best["params"]["anchor_strength"] > 1)

    # weight+activation (merge-then-quantize beside quantize-then-merge at equal W/A) and the float relaxation
    wa = run_pmq(compose_cfg("pmq", "pmq=gptq", "pmq.w_bits=4", "pmq.a_bits=4", "pmq.merge.method=ties", *SMALL))
    assert wa["a_bits"] == 4 and any(k.endswith("output_quantizer.scale") for k in load_integer_file(
        runs / "ties_gptq_w4a4" / "quantized.safetensors")[0])
    relaxed = run_pmq(compose_cfg("pmq", "pmq=epmq", "pmq.quantize=false", *SMALL))
    assert (runs / "task_arithmetic_epmq_w4_float" / "merged.safetensors").is_file() and relaxed["quantize"] is False
    assert evaluate_run(cfg, "pmq", "task_arithmetic_epmq_w4_float")["per_domain"] == relaxed["per_domain"]


@pytest.mark.parametrize("override, message", [
    ("pmq.w_bits=9", "pmq.w_bits=9"),
    ("pmq.params.input_mix=1.5", "input_mix=1.5"),
    ("pmq.params.anchor_strength=-1", "anchor_strength=-1"),
    ("pmq.params.unknown=1", "Unknown parameter"),
    ("pmq.merge.method=quantized", "integer experts"),
    ("pmq.method=foo", "pmq.method='foo'"),
])
def test_bad_values_are_one_paragraph(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        run_pmq(compose_cfg("pmq", "pmq=epmq", "+" + override if "unknown" in override else override))
