"""Train a small float64 model with ``fully_shard`` (FSDP2) on every rank of ``torchrun``.

``torchrun --nproc-per-node=2 fsdp_train.py OUT [--update-interval K] [--accumulate A]``: each
optimizer step, rank r of W takes its contiguous 1/W of every micro-batch of :func:`batches`;
rank 0 writes the whole parameters (``params.pt``) and every rank its optimizer state bytes
(``bytes{rank}.json``); ``--count-host-reads``: every rank also the host reads of each
``optimizer.step()`` (``reads{rank}.json``, counted by ``tests.test_optim._HostReads``). ``--variant eigen`` and ``--mesh-2d`` must fail: rank 0 writes the message to ``error.txt``.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from lightning_adafisher import AdaFisherW  # noqa: E402
from lightning_adafisher import fsdp  # noqa: E402

HP = dict(lr=0.01, gamma=0.8, damping=0.1, weight_decay=0.01)


def make_model(width: int = 5, seed: int = 0) -> nn.Module:
    """Uneven row counts on purpose (width 5: 3 + 2 rows, 3 rows: 2 + 1, 1 row: 1 + 0). Linear
    layers only: their statistics pool exactly over micro-batches and ranks (a norm layer's do
    not, with or without sharding)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3),
        nn.Tanh(), nn.Linear(3, 1),
    ).double()


def batches(steps: int, accumulate: int, batch: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield [
            (torch.randn(batch, 6, generator=g, dtype=torch.float64),
             torch.randn(batch, 1, generator=g, dtype=torch.float64))
            for _ in range(accumulate)
        ]


def train(model, opt, steps, accumulate, rank=0, world=1, reads=None):
    """``reads``: a list to append each step's host reads to (``[count, ops]``)."""
    for k, micro in enumerate(batches(steps, accumulate)):
        for x, y in micro:
            n = len(x) // world
            xs, ys = x[rank * n : (rank + 1) * n], y[rank * n : (rank + 1) * n]
            (F.mse_loss(model(xs), ys) / accumulate).backward()
        if reads is None:
            opt.step()
        else:
            from tests.test_optim import _HostReads

            # the first step builds shape-keyed constants from host values (as in test_optim)
            with _HostReads(shapes_from_data=k > 0) as counted:
                opt.step()
            reads.append([counted.count, counted.ops])
        opt.zero_grad()


def state_bytes(opt) -> int:
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if fsdp.is_sharded(v) else v
                total += v.numel() * v.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--update-interval", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--width", type=int, default=5)
    parser.add_argument("--variant", default="paper")
    parser.add_argument("--foreach", action="store_true", help="the multi-tensor update (CUDA's default)")
    parser.add_argument("--mesh-2d", action="store_true", help="HSDP on a 1 x 2 mesh (refused)")
    parser.add_argument("--count-host-reads", action="store_true", help="write reads{rank}.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(args.width)
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")) if args.mesh_2d else None
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        opt = AdaFisherW(
            model, update_interval=args.update_interval, variant=args.variant,
            foreach=args.foreach or None, **HP,
        )
    except ValueError as err:
        if rank == 0:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "error.txt"), "w") as f:
                f.write(str(err))
        dist.barrier()
        dist.destroy_process_group()
        return
    opt.statistics_reducer = fsdp.statistics_reducer(opt)
    reads = [] if args.count_host_reads else None
    if args.count_host_reads:
        opt.defer_skip_check = True  # the CUDA default: the skip check's flags are read later
    train(model, opt, args.steps, args.accumulate, rank, world, reads)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        torch.save(full, os.path.join(args.out, "params.pt"))
    with open(os.path.join(args.out, f"bytes{rank}.json"), "w") as f:
        json.dump({"state_bytes": state_bytes(opt)}, f)
    if reads is not None:
        with open(os.path.join(args.out, f"reads{rank}.json"), "w") as f:
            json.dump(reads, f)
    dist.barrier()  # no rank tears gloo down while the other still has work in flight
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
