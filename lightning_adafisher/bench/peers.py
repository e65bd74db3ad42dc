"""Second-order peers from PyPI for ``bench speed``, each timed only when its package is installed.

* ``pytorch-optimizer``: ``SOAP`` (eigenbases every 10 steps), ``Shampoo`` (matrix roots
  recomputed every 10 steps) and ``AdaHessian`` (Hutchinson Hessian diagonal every step: the
  backward builds a graph).
* ``asdfghjkl`` (``pip install --pre asdfghjkl``, imported as ``asdl``): K-FAC and Shampoo
  gradient makers, curvature and preconditioner refreshed every 10 steps, with SGD momentum
  applying the preconditioned gradient (how that package is used).

``pip install -e ".[bench]"`` installs both. Every factory gets the model and the batch and
returns the optimizer (for its state bytes) and a closure doing one whole training step.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Batch", "Factory", "peers", "plain_step"]

PEER_INTERVAL = 10
"""Steps between curvature/preconditioner refreshes of the peers (AdaFisher's k10 rows match)."""


class Batch(NamedTuple):
    x: Tensor
    y: Tensor

    @staticmethod
    def loss(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy over the last dim (images: [B, C]; language models: [B, T, V])."""
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


Step = Callable[[], None]
Factory = Callable[[nn.Module, Batch], tuple[torch.optim.Optimizer, Step]]


def plain_step(
    model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, create_graph: bool = False,
    step_seconds: list[float] | None = None,
) -> Step:
    """zero_grad + forward + backward + ``opt.step()``; ``step_seconds`` collects the time of
    ``opt.step()`` alone (on CPU; on CUDA it is the host's launch time)."""

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        Batch.loss(model(batch.x), batch.y).backward(create_graph=create_graph)
        start = time.perf_counter()
        opt.step()
        if step_seconds is not None:
            step_seconds.append(time.perf_counter() - start)

    return step


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _pytorch_optimizer() -> dict[str, Factory]:
    import pytorch_optimizer as po

    def shampoo(model: nn.Module, batch: Batch):
        opt = po.Shampoo(model.parameters(), lr=1e-3, preconditioning_compute_steps=PEER_INTERVAL)
        return opt, plain_step(model, opt, batch)

    def adahessian(model: nn.Module, batch: Batch):
        opt = po.AdaHessian(model.parameters(), lr=0.1)
        return opt, plain_step(model, opt, batch, create_graph=True)

    def soap(model: nn.Module, batch: Batch):
        # SOAP's own defaults (precondition_frequency 10): the eigen variant's closest peer
        opt = po.SOAP(model.parameters(), lr=3e-3)
        return opt, plain_step(model, opt, batch)

    return {
        f"po_shampoo_k{PEER_INTERVAL}": shampoo, "po_adahessian": adahessian,
        f"po_soap_k{PEER_INTERVAL}": soap,
    }


def _asdl() -> dict[str, Factory]:
    import asdl

    def maker(cls: type) -> Factory:
        def make(model: nn.Module, batch: Batch):
            # Speed is what is measured; a small lr and a firm damping keep the repeated steps on
            # one batch from diverging (a Cholesky failure ends a peer's row).
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            config = asdl.PreconditioningConfig(
                data_size=batch.x.shape[0], damping=1e-2,
                preconditioner_upd_interval=PEER_INTERVAL, curvature_upd_interval=PEER_INTERVAL,
            )
            grad_maker = cls(model, config)

            def step() -> None:
                opt.zero_grad(set_to_none=True)
                out = grad_maker.setup_model_call(model, batch.x)
                grad_maker.setup_loss_call(Batch.loss, out, batch.y)
                grad_maker.forward_and_backward()
                opt.step()

            return opt, step

        return make

    return {
        f"asdl_kfac_k{PEER_INTERVAL}": maker(asdl.KfacGradientMaker),
        f"asdl_shampoo_k{PEER_INTERVAL}": maker(asdl.ShampooGradientMaker),
    }


def peers() -> dict[str, Factory]:
    """The peers whose packages are installed (none is a dependency of this project)."""
    rows: dict[str, Factory] = {}
    if _installed("pytorch_optimizer"):
        rows.update(_pytorch_optimizer())
    if _installed("asdl"):
        rows.update(_asdl())
    return rows
