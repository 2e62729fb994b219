"""`hdrq pipeline` on tiny settings: every stage, the documented summary.json, plots, W&B offline."""

from __future__ import annotations

import json

from tiny import TINY

from hdrq_lightning.cli import main


def test_pipeline_writes_summary_of_the_documented_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("HDRQ_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    main(["pipeline", *TINY, "pipeline.methods=[qdrop,hdrq]", "pipeline.bits=[W3A3]", "logger=wandb",
          "pipeline.pmq.anchor_sweep=[0.1,inf]"])
    out = tmp_path / "runs" / "digits"
    summary = json.loads((out / "summary.json").read_text())
    targets = ["negative", "textured", "rotated"]
    assert set(summary["fp"]["experts"]) == set(targets)
    assert set(summary["fp"]["merged"]["per_domain"]) == set(targets)
    assert 0 <= summary["fp"]["merged"]["hmean"] <= 100
    assert [(r["method"], r["w_bits"], r["a_bits"]) for r in summary["results"]] == [("qdrop", 3, 3), ("hdrq", 3, 3)]
    for result in summary["results"]:
        assert set(result["experts"]) == set(targets) and set(result["merged"]["per_domain"]) == set(targets)
        per_domain = list(result["merged"]["per_domain"].values())
        if min(per_domain) > 0:  # the harmonic mean of what is reported
            expected = len(per_domain) / sum(1 / a for a in per_domain)
            assert abs(result["merged"]["hmean"] - expected) < 1e-2
    table = (out / "summary.md").read_text()
    assert "| Method | W3A3 |" in table and "| hdrq |" in table
    for name in ("comparison.png", "barrier.png", "analysis/hdrq_w3a3/surface.png",
                 "analysis/hdrq_w3a3/samples.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    # post-merge quantization: rows per merge x method, the relaxation, the anchor sweep and its plot
    block = summary["pmq"]
    assert [(r["merge"], r["method"], r["quantize"]) for r in block["rows"]] == [
        ("ties", "gptq", True), ("ties", "epmq", True), ("ties", "epmq", False)]
    assert set(block["fp_merge"]["ties"]["per_domain"]) == set(targets)
    assert [p["mu"] for p in block["anchor_sweep"]["ties"]] == [0.1, float("inf")]
    errors = block["layer_errors"]["ties"]
    assert set(errors) == {"layers", "FP merge", "gptq", "epmq"} and len(errors["gptq"]) == len(errors["layers"])
    assert "| ties | E-PMQ relaxation (float) |" in table and "| ties | GPTQ |" in table
    assert (out / "pmq_anchor.png").read_bytes()[:4] == b"\x89PNG"
    # W&B: offline runs on disk, grouped by experiment (a run per stage, plus the summary run)
    assert list((out / "quantize" / "hdrq_w3a3" / "negative").rglob("offline-run-*"))
    assert list(out.glob("wandb/offline-run-*"))
    assert list((out / "evaluate" / "merge" / "hdrq_w3a3").rglob("offline-run-*"))

    # a second run reuses every finished stage and rewrites the same summary
    main(["pipeline", *TINY, "pipeline.methods=[qdrop,hdrq]", "pipeline.bits=[W3A3]",
          "pipeline.pmq.anchor_sweep=[0.1,inf]"])
    again = json.loads((out / "summary.json").read_text())
    assert again["results"] == summary["results"] and again["pmq"] == summary["pmq"]
