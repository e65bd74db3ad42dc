"""Train MLPModule with data parallelism and save each rank's parameters.

Run directly (``python ddp_train.py OUT --devices 2``: Lightning starts the second process) or
under torchrun (``--num-nodes 2 --devices 1``). ``--no-factor-sync`` removes the all-reduce of
the statistics, to show that the equality test can fail.
"""

import argparse
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_adafisher import AdaFisherCallback  # noqa: E402
from tests.lightning_helpers import MLPModule, make_data  # noqa: E402


class NoSync(AdaFisherCallback):
    def on_fit_start(self, trainer, pl_module):
        super().on_fit_start(trainer, pl_module)
        for opt in trainer.optimizers:
            opt.statistics_reducer = None


class RankData(pl.LightningDataModule):
    """Rank r gets samples r, r+W, r+2W, ... in order, so step i of all ranks together sees
    exactly samples 8i..8i+7. (Lightning's automatic sampler always shuffles training data.)"""

    def train_dataloader(self):
        sampler = DistributedSampler(
            make_data(32), num_replicas=self.trainer.world_size, rank=self.trainer.global_rank,
            shuffle=False,
        )
        return DataLoader(make_data(32), batch_size=4, sampler=sampler)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--variant", default="paper")
    parser.add_argument("--no-factor-sync", action="store_true")
    parser.add_argument("--ckpt", default=None, help="resume from this checkpoint")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    model = MLPModule(variant=args.variant)
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, num_nodes=args.num_nodes, strategy="ddp",
        precision="64-true", max_epochs=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[NoSync() if args.no_factor_sync else AdaFisherCallback()],
    )
    trainer.fit(model, datamodule=RankData(), ckpt_path=args.ckpt)
    os.makedirs(args.out, exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
