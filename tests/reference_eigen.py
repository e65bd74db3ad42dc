"""A float64 reference of ``variant="eigen"`` written from docs/numerics.md, independent of the
package: factors from explicit rows (im2col by Python loops), ``eigh`` on the unscaled factors,
every moment and rotation written out as matrices, Adam for everything that is not a Linear or
Conv2d. Deliberately plain; only tests import it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.reference import conv_rows, forward_backward


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """One row per input vector the weight multiplies (a ones entry last if the layer has a bias)."""
    if isinstance(module, nn.Conv2d):
        rows, _ = conv_rows(module, x)
    else:
        rows = x.reshape(-1, x.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return rows


def output_rows(module: nn.Module, g: Tensor) -> Tensor:
    if isinstance(module, nn.Conv2d):
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


def covariance(rows: Tensor) -> Tensor:
    out = torch.zeros(rows.shape[1], rows.shape[1], dtype=rows.dtype)
    for r in rows:
        out += torch.outer(r, r)
    return out / rows.shape[0]


class ReferenceEigen:
    """Steps a model as the eigenbasis variant is documented to, one matrix at a time."""

    def __init__(
        self, model: nn.Module, *, lr: float, beta: float, beta2: float, eps: float, gamma: float,
        weight_decay: float, update_interval: int, eigen_interval: int, decoupled: bool,
        max_factor_size: int = 10**9, gradient_factors: bool = True,
    ) -> None:
        self.model = model
        self.lr, self.b1, self.b2, self.eps, self.gamma, self.wd = lr, beta, beta2, eps, gamma, weight_decay
        self.interval, self.eigen_interval, self.decoupled = update_interval, eigen_interval, decoupled
        self.layers: dict[str, nn.Module] = {}
        self.sides: dict[str, tuple[bool, bool]] = {}
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                n_h = m.weight[0].numel() + (m.bias is not None)
                n_s = m.weight.shape[0]
                sides = (n_h <= max_factor_size, n_s <= max_factor_size)
                if any(sides):
                    self.layers[name], self.sides[name] = m, sides
        owned = {f"{name}.{role}" if name else role for name in self.layers for role in ("weight", "bias")}
        self.matrices: dict[str, tuple[int, int]] = {}
        """Gradient-factored parameters: their matrix shape (singleton dims dropped)."""
        for pname, p in model.named_parameters():
            dims = [d for d in p.shape if d != 1]
            if gradient_factors and pname not in owned and len(dims) == 2:
                sides = (dims[1] <= max_factor_size, dims[0] <= max_factor_size)
                if any(sides):
                    self.matrices[pname], self.sides[pname] = (dims[0], dims[1]), sides
        self.A: dict[str, Tensor] = {}
        self.G: dict[str, Tensor] = {}
        self.QA: dict[str, Tensor] = {}
        self.QG: dict[str, Tensor] = {}
        self.folds: dict[str, int] = {}
        self.refreshed_at: dict[str, int] = {}
        self.state: dict[str, dict[str, Tensor]] = {}
        self.t = 0

    def step(self, loss_fn) -> None:
        self.t += 1
        params, pgrads, inputs, ograds = forward_backward(self.model, self.layers, loss_fn)
        names = list(ograds)
        if (self.t - 1) % self.interval == 0:
            for name in names:
                module = self.layers[name]
                a = covariance(input_rows(module, inputs[name]))
                g = covariance(output_rows(module, ograds[name]))
                if name in self.A:
                    a = self.gamma * self.A[name] + (1 - self.gamma) * a
                    g = self.gamma * self.G[name] + (1 - self.gamma) * g
                self.A[name], self.G[name] = a, g
                self.folds[name] = self.folds.get(name, 0) + 1
            for pname, shape in self.matrices.items():
                m = pgrads[pname].reshape(shape)
                a, g = m.T @ m, m @ m.T
                if pname in self.A:
                    a = self.gamma * self.A[pname] + (1 - self.gamma) * a
                    g = self.gamma * self.G[pname] + (1 - self.gamma) * g
                self.A[pname], self.G[pname] = a, g
                self.folds[pname] = self.folds.get(pname, 0) + 1
        due = (self.t - 1) % self.eigen_interval == 0
        for name in self.A:
            if self.folds[name] == self.refreshed_at.get(name, 0):
                continue
            if not due and name in self.QA:
                continue
            n_h, n_s = self.A[name].shape[0], self.G[name].shape[0]
            qa = torch.linalg.eigh(self.A[name])[1] if self.sides[name][0] else torch.eye(n_h, dtype=torch.float64)
            qg = torch.linalg.eigh(self.G[name])[1] if self.sides[name][1] else torch.eye(n_s, dtype=torch.float64)
            st = self.state.get(name)
            if st is not None:
                old_a = self.QA.get(name, torch.eye(n_h, dtype=torch.float64))
                old_g = self.QG.get(name, torch.eye(n_s, dtype=torch.float64))
                st["m"] = qg.T @ old_g @ st["m"] @ old_a.T @ qa
            self.QA[name], self.QG[name] = qa, qg
            self.refreshed_at[name] = self.folds[name]
        with torch.no_grad():
            done = set()
            for name, module in self.layers.items():
                self._layer(name, module, pgrads)
                done.update(f"{name}.{role}" if name else role for role in ("weight", "bias"))
            for pname, shape in self.matrices.items():
                p = params[pname]
                grad = pgrads[pname] if self.decoupled else pgrads[pname] + self.wd * p
                self._apply(p, self._rotated_adam(pname, grad.reshape(shape)).reshape(p.shape))
                done.add(pname)
            for pname, p in params.items():
                if pname not in done:
                    self._adam(pname, p, pgrads[pname])

    def _layer(self, name: str, module: nn.Module, pgrads: dict[str, Tensor]) -> None:
        w = module.weight
        gw = pgrads[f"{name}.weight"]
        if not self.decoupled:
            gw = gw + self.wd * w
        cols = [gw.reshape(w.shape[0], -1)]
        if module.bias is not None:
            gb = pgrads[f"{name}.bias"]
            if not self.decoupled:
                gb = gb + self.wd * module.bias
            cols.append(gb.reshape(-1, 1))
        d = self._rotated_adam(name, torch.cat(cols, 1))
        n_w = w[0].numel()
        self._apply(w, d[:, :n_w].reshape(w.shape))
        if module.bias is not None:
            self._apply(module.bias, d[:, n_w])

    def _rotated_adam(self, name: str, grad: Tensor) -> Tensor:
        n_s, n_h = grad.shape
        qa = self.QA.get(name, torch.eye(n_h, dtype=torch.float64))
        qg = self.QG.get(name, torch.eye(n_s, dtype=torch.float64))
        r = qg.T @ grad @ qa
        st = self.state.setdefault(name, dict(m=torch.zeros_like(r), v=torch.zeros_like(r), t=torch.tensor(0)))
        st["t"] += 1
        t = int(st["t"])
        st["m"] = self.b1 * st["m"] + (1 - self.b1) * r
        st["v"] = self.b2 * st["v"] + (1 - self.b2) * r * r
        u = (st["m"] / (1 - self.b1**t)) / ((st["v"] / (1 - self.b2**t)).sqrt() + self.eps)
        return qg @ u @ qa.T

    def _apply(self, p: Tensor, d: Tensor) -> None:
        if self.decoupled:
            p.copy_(p - self.lr * (d + self.wd * p))
        else:
            p.copy_(p - self.lr * d)

    def _adam(self, pname: str, p: Tensor, g: Tensor) -> None:
        if not self.decoupled:
            g = g + self.wd * p
        st = self.state.setdefault(pname, dict(m=torch.zeros_like(p), v=torch.zeros_like(p), t=torch.tensor(0)))
        st["t"] += 1
        t = int(st["t"])
        st["m"] = self.b1 * st["m"] + (1 - self.b1) * g
        st["v"] = self.b2 * st["v"] + (1 - self.b2) * g * g
        u = (st["m"] / (1 - self.b1**t)) / ((st["v"] / (1 - self.b2**t)).sqrt() + self.eps)
        self._apply(p, u)
