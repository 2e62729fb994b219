"""One rank of the 2-process DDP reconstruction tests (started by tests/test_distributed.py).

    python ddp_reconstruction_worker.py DEVICES OUT [cpu|gpu] [graphs] [qdrop]

cpu: gloo on CPU processes; gpu: NCCL, one GPU per process; graphs: whole-step CUDA graphs (the all-reduce is
captured too); qdrop: QDrop (input mixing and in-block drop, both random) instead of BRECQ.
"""

from __future__ import annotations

import math
import sys

import lightning as L
import torch

from hdrq_lightning.models.shot import build_shot_net
from hdrq_lightning.quant.distributed import ManualSyncDDPStrategy
from hdrq_lightning.quant.fold import fold_batch_norm
from hdrq_lightning.quant.modules import quantize_model
from hdrq_lightning.quant.recipe import Recipe, Runtime
from hdrq_lightning.quant.reconstruction import ReconstructionModule

BRECQ = dict(method="brecq", passes=["weights", "activations"], input_quant_prob=1.0, drop_prob=0.0, iters=6,
             act_iters=4, batch_size=8, checkpoint_every=4)
QDROP = dict(method="qdrop", iters=6, batch_size=8, checkpoint_every=4)


def reconstruct(devices: int, out_path: str, accelerator: str = "cpu", graphs: bool = False,
                qdrop: bool = False) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    fp = fold_batch_norm(build_shot_net("resnet_tiny", 10).eval())
    calibration = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    recipe = Recipe(**(QDROP if qdrop else BRECQ))
    module = ReconstructionModule(fp, quantize_model(fp, recipe.numerics()), calibration, recipe,
                                  runtime=Runtime(cuda_graphs=graphs))
    backend = "gloo" if accelerator == "cpu" else "nccl"
    strategy = ManualSyncDDPStrategy(process_group_backend=backend) if devices > 1 else "auto"
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, max_epochs=math.ceil(module.total_iters / 4))
    trainer.fit(module)
    if trainer.global_rank == 0:
        torch.save({k: v.cpu() for k, v in module.quant_model.state_dict().items()}, out_path)


if __name__ == "__main__":
    reconstruct(int(sys.argv[1]), sys.argv[2], *(sys.argv[3:4] or ["cpu"]), graphs="graphs" in sys.argv[4:],
                qdrop="qdrop" in sys.argv[4:])
