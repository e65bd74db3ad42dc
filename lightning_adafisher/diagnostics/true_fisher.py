"""Kronecker-factored Fisher diagonal against the true Fisher diagonal (paper App. B.2, Fig. 12).

The *true* Fisher of a classifier is ``F = E_x E_{y ~ p(y|x)} [(∇θ log p(y|x))²]`` (diagonal),
estimated here with labels sampled from the model's own predictive distribution (Monte Carlo,
``n_samples`` labels per input) and exact per-sample gradients (``torch.func``:
``functional_call`` + ``vmap`` + ``grad``).

Which AdaFisher quantity is compared, and why: AdaFisher's ``F = S'·H' + λ``
(docs/numerics.md#the-fisher-diagonal) is built from *min-max normalised* factors, so its
values lie in ``[λ, 1 + λ]`` whatever the Fisher's scale; an absolute error against the true
Fisher would measure that normalisation, not the approximation. The MAE is therefore taken on
the Fisher's own scale, with the *raw* Kronecker diagonal that AdaFisher normalises:

* ``adafisher``: from the optimizer state, ``L·B²·S[o]·H[i]`` with ``H``, ``S`` AdaFisher's
  folded raw factors (EMA over training steps, true labels: the empirical Fisher it actually
  uses), ``B`` the training batch size (``S`` was measured on a mean-reduced loss, so it carries
  ``1/B²``) and ``L`` the rows per example (conv: output positions; KFC's ``Ω = L·h``);
* ``kronecker``: the same product from the evaluation batch itself with the sampled labels,
  which isolates the Kronecker/independence error from the EMA lag and the empirical-vs-true
  label difference.

The ordering AdaFisher's normalised ``F`` induces is compared separately with a Spearman rank
correlation (scale-free). Linear and Conv2d layers only; classification (cross-entropy) only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from lightning_adafisher.diagnostics._common import (
    digits_with_adafisher, new_figure, optional, save_figure, write_json,
)
from lightning_adafisher.diagnostics.kronecker import record_io
from lightning_adafisher.layers import layer_helper_for
from lightning_adafisher.optim import FACTOR_H, FACTOR_S, AdaFisher

__all__ = [
    "sample_labels",
    "true_fisher_diagonal",
    "kronecker_fisher_diagonal",
    "adafisher_fisher_diagonal",
    "adafisher_preconditioner",
    "layer_errors",
    "plot_errors",
    "digits_experiment",
]


@torch.no_grad()
def sample_labels(
    model: nn.Module, x: Tensor, n_samples: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """``[n_samples, N]`` labels drawn from ``softmax(model(x))``."""
    probs = torch.softmax(model(x).to(torch.float64), dim=-1)
    return torch.multinomial(probs, n_samples, replacement=True, generator=generator).T


def true_fisher_diagonal(
    model: nn.Module, x: Tensor, labels: Tensor, chunk_size: int | None = 256
) -> dict[str, Tensor]:
    """``mean_{m, n} (∇θ −log p(labels[m, n] | x[n]))²`` per trainable parameter (by name).

    Per-sample gradients come from ``vmap(grad(...))`` over examples, one label sample at a
    time. The model must not mix examples (no BatchNorm in training mode).
    """
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = dict(model.named_buffers())

    def nll(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0), chunk_size=chunk_size)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for y in labels:
        grads = per_sample(params, x, y)
        for k, g in grads.items():
            total[k] += g.square().sum(0)
    count = labels.numel()
    return {k: v / count for k, v in total.items()}


def _factored_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def kronecker_fisher_diagonal(model: nn.Module, x: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """``L·S[o]·H[i]`` per Linear/Conv2d parameter on the batch ``x`` with ``labels``
    (``[n_samples, N]``), ``S`` from per-example loss gradients, averaged over label samples.

    For one example, one label and a Linear layer this equals the true Fisher diagonal exactly
    (the per-example gradient ``g xᵀ`` is rank one).
    """
    layers = _factored_layers(model)
    names = _param_names(model)
    n = x.shape[0]
    s_sum: dict[str, Tensor] = {}
    h_mean: dict[str, Tensor] = {}
    rows: dict[str, float] = {}
    for y in labels:
        with record_io(layers) as calls, torch.enable_grad():
            loss = F.cross_entropy(model(x), y, reduction="sum")  # G rows: per-example gradients
        called = [name for name in layers if calls[name]]
        outputs = [out for name in called for _, out in calls[name]]
        grads = iter(torch.autograd.grad(loss, outputs))
        for name in called:
            module, helper = layers[name], layer_helper_for(layers[name])
            assert helper is not None
            s_tot, s_cnt = 0.0, 0.0
            h_tot, h_cnt = 0.0, 0.0
            for inp, _ in calls[name]:
                t, c = helper.output_stats(module, next(grads), "paper")
                s_tot, s_cnt = s_tot + t, s_cnt + c
                t, c = helper.input_stats(module, inp.detach(), "paper")
                h_tot, h_cnt = h_tot + t, h_cnt + c
            s_sum[name] = s_sum.get(name, 0.0) + s_tot / s_cnt
            h_mean[name] = h_tot / h_cnt
            rows[name] = h_cnt / n
    result: dict[str, Tensor] = {}
    for name, s in s_sum.items():
        module, helper = layers[name], layer_helper_for(layers[name])
        assert helper is not None
        s = s / len(labels)
        for role, p in helper.parameters(module).items():
            d = helper.denominator(module, role, p, h_mean[name], s, 0.0) * rows[name]
            result[names[id(p)]] = d.detach()
    return result


def _rows_per_example(model: nn.Module, x: Tensor) -> dict[str, float]:
    layers = _factored_layers(model)
    with record_io(layers) as calls, torch.no_grad():
        model(x)
    found = {}
    for name, module in layers.items():
        helper = layer_helper_for(module)
        if calls[name] and helper is not None:
            found[name] = sum(helper.input_stats(module, inp, "paper")[1] for inp, _ in calls[name]) / len(x)
    return found


@torch.no_grad()
def adafisher_fisher_diagonal(
    optimizer: AdaFisher, model: nn.Module, batch_size: int, x_example: Tensor
) -> dict[str, Tensor]:
    """``L·B²·S[o]·H[i]`` from AdaFisher's folded raw factors (paper variant), per Linear/Conv2d
    parameter. ``B``: the training batch size of a mean-reduced loss; ``x_example``: any input
    batch, used to count the rows per example ``L``."""
    if optimizer.variant != "paper":
        raise ValueError("adafisher_fisher_diagonal needs variant='paper' (the reference variant "
                         "keeps normalised factors, without the Fisher's scale)")
    if optimizer.collector is None:
        raise ValueError("AdaFisher is not attached to a model")
    rows = _rows_per_example(model, x_example)
    names = _param_names(model)
    result: dict[str, Tensor] = {}
    for layer in optimizer.collector.layers:
        if not isinstance(layer.module, (nn.Linear, nn.Conv2d)) or layer.name not in rows:
            continue
        state = optimizer.state[layer.primary]
        if FACTOR_H not in state:
            continue
        scale = rows[layer.name] * float(batch_size) ** 2
        for role, p in layer.params.items():
            d = layer.helper.denominator(layer.module, role, p, state[FACTOR_H], state[FACTOR_S], 0.0)
            result[names[id(p)]] = d * scale
    return result


@torch.no_grad()
def adafisher_preconditioner(optimizer: AdaFisher, model: nn.Module) -> dict[str, Tensor]:
    """AdaFisher's actual ``F = S'·H' + λ`` per factored parameter (by name)."""
    names = _param_names(model)
    result: dict[str, Tensor] = {}
    if optimizer.collector is None:
        return result
    for layer in optimizer.collector.layers:
        for p in layer.params.values():
            diagonal = optimizer.fisher_diagonal(p)
            if diagonal is not None:
                result[names[id(p)]] = diagonal
    return result


def _by_layer(model: nn.Module, diag: dict[str, Tensor]) -> dict[str, Tensor]:
    """Concatenate each layer's parameters (weight, then bias), keyed by layer name."""
    grouped: dict[str, list[Tensor]] = {}
    for name, _ in model.named_parameters():
        if name in diag:
            grouped.setdefault(name.rpartition(".")[0], []).append(diag[name].reshape(-1).to(torch.float64))
    return {k: torch.cat(v) for k, v in grouped.items()}


def layer_errors(model: nn.Module, estimate: dict[str, Tensor], truth: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per layer: ``mae`` = mean |estimate − truth| over the layer's entries, ``relative_mae`` =
    mae / mean(truth), and ``mean_true`` / ``mean_estimate``."""
    est, tru = _by_layer(model, estimate), _by_layer(model, truth)
    out = {}
    for layer, e in est.items():
        t = tru[layer]
        mae = float((e - t).abs().mean())
        mean_true = float(t.mean())
        out[layer] = {"mae": mae, "relative_mae": mae / mean_true if mean_true > 0 else float("nan"),
                      "mean_true": mean_true, "mean_estimate": float(e.mean())}
    return out


def _spearman(model: nn.Module, estimate: dict[str, Tensor], truth: dict[str, Tensor]) -> dict[str, float]:
    stats = optional("scipy.stats")
    est, tru = _by_layer(model, estimate), _by_layer(model, truth)
    return {layer: float(stats.spearmanr(e.numpy(), tru[layer].numpy()).statistic) for layer, e in est.items()}


# --------------------------------------------------------------------------------------------
# Plot and experiment
# --------------------------------------------------------------------------------------------


def plot_errors(numbers: dict[str, Any], scatter: dict[str, Any] | None = None) -> Any:
    """MAE and relative MAE per layer over epochs (solid: AdaFisher state; dashed: Kronecker
    diagonal of the evaluation batch), and optionally a log-log scatter of estimate vs truth."""
    np = optional("numpy")
    epochs = numbers["epochs"]
    layers = list(epochs[-1]["adafisher"].keys())
    types = numbers.get("layer_types", {})
    panels = 3 if scatter is not None else 2
    fig = new_figure(5.4 * panels, 5.4)
    axes = fig.subplots(1, panels)
    for k, layer in enumerate(layers):
        colour = f"C{k}"
        for key, style, what in (("adafisher", "-o", "AdaFisher state"), ("kronecker", "--s", "Kronecker, eval batch")):
            pts = [(e["epoch"], e[key][layer]) for e in epochs if layer in e.get(key, {})]
            xs = [p for p, _ in pts]
            axes[0].semilogy(xs, [v["mae"] for _, v in pts], style, color=colour, ms=3,
                             label=f"{types.get(layer, layer)} ({what})")
            axes[1].plot(xs, [v["relative_mae"] for _, v in pts], style, color=colour, ms=3)
    axes[0].set_title("MAE vs true Fisher diagonal", fontsize=10)
    axes[1].set_title("MAE / mean of the true Fisher diagonal", fontsize=10)
    for ax in axes[:2]:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncol=4, fontsize=8)
    if scatter is not None:
        ax = axes[2]
        kept = []
        for k, (layer, (est, tru)) in enumerate(scatter["points"].items()):
            both = (est > 0) & (tru > 0)  # zeros (dead units) cannot be drawn on log axes
            kept.append(np.concatenate([est[both], tru[both]]))
            ax.loglog(tru[both], est[both], ".", ms=2, alpha=0.5, color=f"C{k}",
                      label=f"{types.get(layer, layer)} ({int((~both).sum())} zeros not drawn)")
        values = np.concatenate(kept)
        lo, hi = float(np.quantile(values, 0.002)), float(values.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
        ax.set_xlim(lo / 3, hi * 3)
        ax.set_ylim(lo / 3, hi * 3)
        ax.set_xlabel("true Fisher diagonal")
        ax.set_ylabel("AdaFisher raw diagonal (state)")
        ax.set_title(scatter["title"], fontsize=10)
        ax.legend(fontsize=7, markerscale=4)
        ax.grid(alpha=0.3)
    return fig


def digits_experiment(
    out: str | Path,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    eval_size: int = 512,
    n_samples: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Train :func:`~lightning_adafisher.diagnostics._common.digits_cnn` with AdaFisher (paper
    variant, ``drop_last`` so every step has ``batch_size`` examples); before training and
    after each epoch compare, on ``eval_size`` fixed training images with ``n_samples`` sampled
    labels each, the true Fisher diagonal with both Kronecker estimates (module docstring).
    Writes ``true_fisher.png`` and ``true_fisher.json`` under ``out``."""
    x_train, y_train, model, opt = digits_with_adafisher(seed, lr)
    x_eval = x_train[:eval_size]
    order = torch.Generator().manual_seed(seed)
    sampler = torch.Generator().manual_seed(seed + 1)
    records: list[dict[str, Any]] = []
    scatter = None

    def measure(epoch: int) -> None:
        nonlocal scatter
        model.eval()  # AdaFisher's hooks only count training-mode calls; the net has no BN/dropout
        labels = sample_labels(model, x_eval, n_samples, sampler)
        truth = true_fisher_diagonal(model, x_eval, labels)
        rec: dict[str, Any] = {"epoch": epoch, "kronecker": layer_errors(
            model, kronecker_fisher_diagonal(model, x_eval, labels), truth)}
        state = adafisher_fisher_diagonal(opt, model, batch_size, x_eval[:1])
        if state:
            rec["adafisher"] = layer_errors(model, state, truth)
            rec["spearman_adafisher_F"] = _spearman(model, adafisher_preconditioner(opt, model), truth)
            est, tru = _by_layer(model, state), _by_layer(model, truth)
            scatter = {"points": {k: (est[k].numpy(), tru[k].numpy()) for k in est},
                       "title": f"after epoch {epoch}: one dot per weight/bias"}
        with torch.no_grad():
            rec["train_loss"] = float(F.cross_entropy(model(x_train), y_train))
        records.append(rec)
        model.train()

    measure(0)
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x_train), generator=order).split(batch_size):
            if len(idx) < batch_size:
                continue  # drop_last: AdaFisher's S carries 1/B² of this step's batch size
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
        measure(epoch)
    numbers = {
        "settings": {"model": str(model), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                     "eval_size": eval_size, "label_samples_per_input": n_samples, "seed": seed,
                     "optimizer": "AdaFisher, paper variant, defaults except lr"},
        "layer_types": {n: f"{n}: {type(m).__name__}" for n, m in model.named_modules()
                        if isinstance(m, (nn.Linear, nn.Conv2d))},
        "epochs": records,
    }
    fig = plot_errors(numbers, scatter)
    fig.suptitle(f"digits CNN, AdaFisher lr={lr:g}, batch {batch_size}: Kronecker-factored vs true "
                 f"Fisher diagonal ({eval_size} images × {n_samples} sampled labels)")
    out = Path(out)
    save_figure(fig, out / "true_fisher.png")
    write_json(numbers, out / "true_fisher.json")
    return numbers
