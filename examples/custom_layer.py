"""Teach AdaFisher a layer type it does not know: a ``LayerHelper`` and ``register_layer_helper``.

    python examples/custom_layer.py

``Dense`` below is a module of our own (not an ``nn.Linear`` subclass), so AdaFisher would give
its parameters the identity preconditioner. ``DenseHelper`` tells it which parameters get
Kronecker factors, how long the factors are and how one call's input ``x`` and output gradient
``G`` become raw statistics (``docs/numerics.md#raw-statistics-of-one-call``). The script then
trains three steps and checks the optimizer's normalised factors and Fisher diagonal against a
float64 reference computed here by brute force from the recorded ``x`` and ``G``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_adafisher import AdaFisher, LayerHelper, register_layer_helper


class Dense(nn.Module):
    """``y = x Wᵀ + b`` over the last dim of ``x``: a stand-in for any custom layer."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T + self.bias


class DenseHelper(LayerHelper):
    """How AdaFisher reads a ``Dense``: the statistics of a linear layer with a bias.

    ``roles`` (default ``("weight", "bias")``) names the factored parameters. The default
    ``kron_factors`` gives the weight ``[out, in]`` the Fisher diagonal ``S'[o]·H'[i] + λ`` and
    the bias ``S'[o]·H'[-1] + λ``, which is what a linear layer needs, so only the statistics
    are written here.
    """

    def factor_sizes(self, module: nn.Module) -> tuple[int, int]:
        d_out, d_in = module.weight.shape
        return d_in + 1, d_out  # H: inputs plus the bias' constant 1; S: outputs

    def input_stats(self, module: nn.Module, x: Tensor, variant: str) -> tuple[Tensor, float]:
        # (total, count): Σ over rows of x̄², x̄ = [x, 1]; AdaFisher divides by the count.
        rows = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        return rows.square().sum(0), float(rows.shape[0])

    def output_stats(self, module: nn.Module, g: Tensor, variant: str) -> tuple[Tensor, float]:
        rows = g.reshape(-1, g.shape[-1]).to(torch.promote_types(g.dtype, torch.float32))
        return rows.square().sum(0), float(rows.shape[0])


def min_max(v: Tensor) -> Tensor:
    span = v.max() - v.min()
    return (v - v.min()) / span if span > 0 else torch.ones_like(v)


def main() -> None:
    register_layer_helper(Dense, DenseHelper())
    torch.manual_seed(0)
    model = nn.Sequential(Dense(6, 5), nn.Tanh(), Dense(5, 3)).double()
    gamma, damping = 0.9, 1e-3
    opt = AdaFisher(model, lr=1e-2, variant="paper", gamma=gamma, damping=damping, update_interval=1)
    assert opt.identity_parameters() == [], "every parameter has factors now"

    # Brute force: record each Dense's x and G with hooks of our own, fold them in float64.
    layers = [m for m in model if isinstance(m, Dense)]
    seen: dict[Dense, dict[str, Tensor]] = {}

    def record(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        seen[module] = {"x": args[0].detach()}
        output.register_hook(lambda g: seen[module].__setitem__("g", g.detach()))

    for layer in layers:
        layer.register_forward_hook(record)
    factors: dict[Dense, tuple[Tensor, Tensor]] = {}
    for step in range(1, 4):
        x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for layer in layers:
            xb = torch.cat([seen[layer]["x"], torch.ones(16, 1, dtype=torch.float64)], dim=1)
            h, s = xb.square().mean(0), seen[layer]["g"].square().mean(0)
            if layer in factors:  # paper variant: EMA of the raw statistics, then min-max
                h_old, s_old = factors[layer]
                h, s = gamma * h_old + (1 - gamma) * h, gamma * s_old + (1 - gamma) * s
            factors[layer] = (h, s)
            want_h, want_s = min_max(h), min_max(s)
            got_h, got_s = opt.layer_factors(layer)
            torch.testing.assert_close(got_h, want_h, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(got_s, want_s, rtol=1e-10, atol=1e-12)
            want_f = torch.outer(want_s, want_h[:-1]) + damping
            torch.testing.assert_close(opt.fisher_diagonal(layer.weight), want_f, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(opt.fisher_diagonal(layer.bias), want_s * want_h[-1] + damping,
                                       rtol=1e-10, atol=1e-12)
    print(f"custom layer: after {opt.steps_taken} steps both Dense layers' factors match the float64 "
          "reference")


if __name__ == "__main__":
    main()
