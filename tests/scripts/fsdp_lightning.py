"""Train MLPModule sharded with FSDP2 through Lightning's ModelParallelStrategy on 2 CPU ranks.

``python fsdp_lightning.py OUT [--max-steps N] [--save CKPT] [--ckpt CKPT]``: Lightning starts
the second process. Rank 0 writes the whole parameters (``params.pt``); ``--save`` writes a
distributed checkpoint at the end, ``--ckpt`` resumes from one.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_adafisher import AdaFisherCallback  # noqa: E402
from tests.lightning_helpers import MLPModule, NoOptModule  # noqa: E402
from tests.scripts.ddp_train import RankData  # noqa: E402


class ShardedMLP(MLPModule):
    """MLPModule (float64) with every Linear layer and the whole net sharded by ``fully_shard``."""

    def __init__(self, update_interval: int = 1, variant: str = "paper", mesh_2d: bool = False) -> None:
        super().__init__(update_interval=update_interval, variant=variant)
        self.mesh_2d = mesh_2d

    def configure_model(self):
        mesh = self.device_mesh if self.mesh_2d else self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class ShardedNoOptModule(NoOptModule):
    """For LightningCLI with ModelParallelStrategy: the optimizer comes from the YAML, and
    ``configure_model`` shards the net (so the CLI must build the optimizer after it)."""

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if any(True for _ in layer.parameters()):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--update-interval", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--variant", default="paper")
    parser.add_argument("--save", default=None)
    parser.add_argument("--ckpt", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model = ShardedMLP(update_interval=args.update_interval, variant=args.variant)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        precision="32-true",  # the module is float64 already; ModelParallelStrategy refuses 64-true
        max_epochs=2, max_steps=args.max_steps, accumulate_grad_batches=args.accumulate,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[AdaFisherCallback()],
    )
    trainer.fit(model, datamodule=RankData(), ckpt_path=args.ckpt)
    if args.save:
        trainer.save_checkpoint(args.save)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if trainer.global_rank == 0:
        os.makedirs(args.out, exist_ok=True)
        torch.save(full, os.path.join(args.out, "params.pt"))


if __name__ == "__main__":
    main()
