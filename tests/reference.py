"""A float64 reference of AdaFisher written from docs/numerics.md, independent of the package.

Statistics are computed by brute force (explicit im2col rows built with Python loops, explicit
sums), factors folded and parameters updated one by one with the formulas as written.
Deliberately slow and plain; only tests import it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# --------------------------------------------------------------------------------------------
# Raw statistics, brute force
# --------------------------------------------------------------------------------------------


def linear_h(x: Tensor, bias: bool) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    return (rows * rows).sum(0) / rows.shape[0]


def linear_s(g: Tensor) -> Tensor:
    rows = g.reshape(-1, g.shape[-1])
    return (rows * rows).sum(0) / rows.shape[0]


def _conv_pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if conv.padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


def conv_rows(conv: nn.Conv2d, x: Tensor) -> tuple[Tensor, int]:
    """Explicit im2col: one row per (image, output position, group); returns rows and L."""
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x, _conv_pad(conv), mode=mode)
    b, c_in, hp, wp = xp.shape
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    cg = c_in // conv.groups
    lh = (hp - dh * (kh - 1) - 1) // sh + 1
    lw = (wp - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for bi in range(b):
        for oy in range(lh):
            for ox in range(lw):
                for grp in range(conv.groups):
                    patch = []
                    for c in range(grp * cg, (grp + 1) * cg):
                        for i in range(kh):
                            for j in range(kw):
                                patch.append(xp[bi, c, oy * sh + i * dh, ox * sw + j * dw])
                    rows.append(torch.stack(patch))
    return torch.stack(rows), lh * lw


def conv_h(conv: nn.Conv2d, x: Tensor, variant: str) -> Tensor:
    rows, positions = conv_rows(conv, x)
    if conv.bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
    total = (rows * rows).sum(0)
    if variant == "reference":
        kh, kw = conv.kernel_size
        return total / (x.shape[0] * positions * (conv.in_channels // conv.groups) * kh * kw)
    return total / rows.shape[0]


def conv_s(g: Tensor) -> Tensor:
    b, c, lh, lw = g.shape
    out = torch.zeros(c, dtype=g.dtype)
    for ci in range(c):
        out[ci] = (g[:, ci] ** 2).sum() / (b * lh * lw)
    return out


def batchnorm_h(x: Tensor) -> Tensor:
    b, c, hh, ww = x.shape
    a = torch.stack([x[:, ci].sum() / (hh * ww) ** 2 for ci in range(c)])
    return torch.stack([(a * a).sum(), torch.tensor(float(c), dtype=x.dtype)]) / b**2


def batchnorm_s(g: Tensor) -> Tensor:
    return torch.stack([g[:, ci].sum() ** 2 for ci in range(g.shape[1])]) / g.shape[0]


def layernorm_h(x: Tensor) -> Tensor:
    b = x.shape[0]
    # sum over every dim except dim 1; D = product of the summed non-batch dims
    d = math.prod(x.shape[2:]) if x.dim() > 2 else 1
    a = torch.stack([x[:, i].sum() for i in range(x.shape[1])]) / d**2
    return torch.stack([(a * a).sum(), torch.tensor(float(a.numel()), dtype=x.dtype)]) / b**2


def layernorm_s(g: Tensor) -> Tensor:
    flat = g.reshape(-1, g.shape[-1])
    return torch.stack([flat[:, j].sum() ** 2 for j in range(flat.shape[1])]) / g.shape[0]


def raw_stats(module: nn.Module, x: Tensor, g: Tensor, variant: str) -> tuple[Tensor, Tensor]:
    if isinstance(module, nn.Conv2d):
        return conv_h(module, x, variant), conv_s(g)
    if isinstance(module, nn.Linear):
        return linear_h(x, module.bias is not None), linear_s(g)
    if isinstance(module, nn.BatchNorm2d):
        return batchnorm_h(x), batchnorm_s(g)
    if isinstance(module, nn.LayerNorm):
        return layernorm_h(x), layernorm_s(g)
    raise TypeError(type(module))


# --------------------------------------------------------------------------------------------
# Folding and the update
# --------------------------------------------------------------------------------------------


def mm(v: Tensor) -> Tensor:
    lo, hi = v.min(), v.max()
    if hi == lo:
        return torch.ones_like(v)
    return (v - lo) / (hi - lo)


def mm_eps(v: Tensor) -> Tensor:
    v = torch.where(v == math.inf, 1.0, torch.where(v == -math.inf, 0.0, v))
    return (v - v.min()) / (v.max() - v.min() + 1e-6)


def forward_backward(model: nn.Module, layers: dict[str, nn.Module], loss_fn):
    """One forward and backward: ``(params, their gradients, each called layer's input x, the
    gradient G of its output)``, all keyed by name (layers in call order)."""
    inputs, outputs = {}, {}

    def capture(name):
        def hook(module, args, out):
            # Hand the model a copy so that in-place ops downstream (ReLU(inplace=True))
            # cannot rebind the tensor whose gradient G is taken below.
            inputs[name], outputs[name] = args[0].detach(), out
            return out.clone()

        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in layers.items()]
    loss = loss_fn(model)
    for h in handles:
        h.remove()
    names = list(outputs)
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()) + [outputs[n] for n in names])
    return params, dict(zip(params, grads[: len(params)])), inputs, dict(zip(names, grads[len(params):]))


class ReferenceAdaFisher:
    """Steps a model exactly as docs/numerics.md says, with statistics gathered by brute force."""

    def __init__(
        self, model: nn.Module, *, lr: float, beta: float, gamma: float, damping: float,
        weight_decay: float, update_interval: int, variant: str, decoupled: bool,
    ) -> None:
        self.model = model
        self.hp = dict(lr=lr, beta=beta, gamma=gamma, damping=damping, wd=weight_decay)
        self.interval, self.variant, self.decoupled = update_interval, variant, decoupled
        self.layers = {
            name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm))
        }
        self.H: dict[str, Tensor] = {}
        self.S: dict[str, Tensor] = {}
        self.m = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
        self.t = 0

    def step(self, loss_fn) -> None:  # loss_fn(model) -> scalar loss
        self.t += 1
        statistics_step = (self.t - 1) % self.interval == 0
        params, pgrads, inputs, ograds = forward_backward(self.model, self.layers, loss_fn)
        names = list(ograds)
        if statistics_step:
            for name in names:
                h, s = raw_stats(self.layers[name], inputs[name], ograds[name], self.variant)
                g = self.hp["gamma"]
                if self.variant == "paper":
                    if name not in self.H:
                        self.H[name], self.S[name] = h, s
                    else:
                        self.H[name] = g * self.H[name] + (1 - g) * h
                        self.S[name] = g * self.S[name] + (1 - g) * s
                else:
                    H0 = self.H.get(name, torch.ones_like(h))
                    S0 = self.S.get(name, torch.ones_like(s))
                    self.H[name] = 0.1 * g * H0 + 0.01 * g * mm_eps(h)
                    self.S[name] = 0.1 * g * S0 + 0.01 * g * mm_eps(s)
        with torch.no_grad():
            for pname, p in params.items():
                self._update(pname, p, pgrads[pname])

    def fisher(self, pname: str, p: Tensor) -> Tensor:
        lam = self.hp["damping"]
        owner, _, role = pname.rpartition(".")
        if owner not in self.layers or owner not in self.H:
            ident = 1.0 + lam if self.variant == "paper" else 1.0
            return torch.full_like(p, ident)
        H, S = self.H[owner], self.S[owner]
        if self.variant == "paper":
            H, S = mm(H), mm(S)
        module = self.layers[owner]
        F_ = torch.empty_like(p)
        if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
            entry = H[0] if role == "weight" else H[1]
            for c in range(p.shape[0]):
                F_[c] = S[c] * entry + lam
        elif role == "bias":
            for o in range(p.shape[0]):
                F_[o] = S[o] * H[-1] + lam
        else:
            flat = F_.view(p.shape[0], -1)
            for o in range(flat.shape[0]):
                for i in range(flat.shape[1]):
                    flat[o, i] = S[o] * H[i] + lam
        return F_

    def _update(self, pname: str, p: Tensor, g: Tensor) -> None:
        lr, beta, wd = self.hp["lr"], self.hp["beta"], self.hp["wd"]
        if not self.decoupled:
            g = g + wd * p
        m = self.m[pname] = beta * self.m[pname] + (1 - beta) * g
        m_hat = m / (1 - beta**self.t)
        F_ = self.fisher(pname, p)
        if self.decoupled:
            p.copy_(p - lr * (m_hat / F_ + wd * p))
        else:
            p.copy_(p - lr * m_hat / F_)
