"""Settings shared by tests that run stages."""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# Small settings that exercise every stage of the digits experiment in seconds.
TINY = [
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
    "source.epochs=1",
    "adapt.epochs=1",
    "quant.iters=12",
    "quant.act_iters=6",
    "quant.calibration_size=64",
    "quant.checkpoint_every=5",
    "analysis.lambdas=3",
    "analysis.surface_steps=3",
    "analysis.noise_samples=2",
    "analysis.selection_pool=2",
    "analysis.max_images=64",
    "pmq.calibration_size=32",
    "pipeline.pmq.merges=[ties]",
    "pipeline.pmq.methods=[gptq,epmq]",
]

# One digits target: what the finished-runs fixtures (conftest.py) and the tests using them run.
ONE_TARGET = "data.targets=[negative]"
