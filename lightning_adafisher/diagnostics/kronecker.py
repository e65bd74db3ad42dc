"""Structure of the full Kronecker factors (paper Sec. 3.1, App. A; Figs. 3, 7, 8, 9; Eq. 7).

AdaFisher keeps only the diagonals of the K-FAC factors of a layer,

* ``H = E[x̄ x̄ᵀ]`` over input rows ``x̄`` (Linear: rows of the input, tokens counted as rows;
  Conv2d: im2col patches, groups stacked as rows; a trailing 1 when the layer has a bias), and
* ``S = E[g gᵀ]`` over rows ``g`` of the gradient of the loss w.r.t. the layer's output
  (Conv2d: one row per (image, output position)),

so ``diag(H)`` and ``diag(S)`` are exactly AdaFisher's raw statistics ``h`` and ``s`` of that
batch (paper variant; docs/numerics.md#raw-statistics-of-one-call). This module builds the
full matrices to check the paper's claim that their energy sits on the diagonal:

* :func:`gershgorin_discs` — every eigenvalue lies in the union of the discs
  ``D(a_ii, Σ_{j≠i} |a_ij|)``; small radii relative to the centres mean diagonal dominance;
* :func:`off_diagonal_noise` / :func:`eigenvalue_shift` — eigenvalues before and after adding
  ``e_ij ~ N(0, σ²)`` (``σ = 1e-3`` in the paper) off the diagonal. The noise is made
  symmetric (``e_ji = e_ij``) so the perturbed factor stays symmetric with real eigenvalues;
* :func:`snr_db` — Eq. 7, ``10·log10(Σ_i |M_ii|² / Σ_{j>i} |M̂_ij|²)``: energy of the clean
  diagonal over the energy of the noisy upper off-diagonal triangle;
* :func:`analyse` / :func:`plot_factors` — the numbers and the heat map, FFT, disc and spectrum
  panels.

``σ`` is absolute, so the factor's scale matters. :func:`analyse` divides the factor by its
largest diagonal entry first (``normalise="max_diag"``), which puts the diagonal in ``[0, 1]``
like AdaFisher's min-max normalised ``H'`` and ``S'``, and makes the results independent of the
loss reduction (``S`` of a mean-reduced loss scales like ``1/N²``).

Shapes: rows are ``[R, d]``; factors ``[d, d]``; everything is computed in float64.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_adafisher import functional as fn
from lightning_adafisher.diagnostics._common import (
    digits_with_adafisher, new_figure, optional, save_figure, write_json,
)

__all__ = [
    "KroneckerFactors",
    "input_rows",
    "output_rows",
    "record_io",
    "kronecker_factors",
    "gershgorin_discs",
    "eigenvalues",
    "in_gershgorin_union",
    "off_diagonal_noise",
    "eigenvalue_shift",
    "snr_db",
    "analyse",
    "plot_factors",
    "digits_experiment",
]

PAPER_SIGMA = 1e-3


# --------------------------------------------------------------------------------------------
# Building the factors
# --------------------------------------------------------------------------------------------


def input_rows(module: nn.Module, x: Tensor) -> Tensor:
    """Rows ``x̄`` whose mean outer product is ``H`` (float64, ones column if bias)."""
    if isinstance(module, nn.Linear):
        rows = x.detach().reshape(-1, x.shape[-1])
    elif isinstance(module, nn.Conv2d):
        x = x.detach()
        if x.dim() == 3:
            x = x.unsqueeze(0)
        pad = fn.conv2d_padding(module.padding, module.kernel_size, module.dilation)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        b, _, positions = cols.shape
        g = module.groups
        cols = cols.view(b, g, -1, positions).permute(0, 1, 3, 2)  # [B, groups, L, C_g·kh·kw]
        rows = cols.reshape(-1, cols.shape[-1])
    else:
        raise TypeError(f"input_rows supports Linear and Conv2d, got {type(module).__name__}")
    rows = rows.to(torch.float64)
    if getattr(module, "bias", None) is not None:
        rows = torch.cat((rows, rows.new_ones(rows.shape[0], 1)), 1)
    return rows


def output_rows(module: nn.Module, g: Tensor) -> Tensor:
    """Rows ``g`` whose mean outer product is ``S`` (float64)."""
    g = g.detach()
    if isinstance(module, nn.Linear):
        return g.reshape(-1, g.shape[-1]).to(torch.float64)
    if isinstance(module, nn.Conv2d):
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).to(torch.float64)
    raise TypeError(f"output_rows supports Linear and Conv2d, got {type(module).__name__}")


@contextmanager
def record_io(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[tuple[Tensor, Tensor]]]]:
    """Record ``(input, output)`` of every call of the given modules (outputs keep their graph,
    so ``torch.autograd.grad(loss, output)`` gives ``G``). Hooks are removed on exit."""
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor, name: str = name) -> None:
            calls[name].append((args[0], output))

        handles.append(module.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class KroneckerFactors:
    """The full factors of one layer on one batch (float64)."""

    layer: str
    H: Tensor
    S: Tensor


def kronecker_factors(
    model: nn.Module,
    layer: str,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
) -> KroneckerFactors:
    """``H = mean_rows(x̄ x̄ᵀ)`` and ``S = mean_rows(g gᵀ)`` of ``model``'s submodule ``layer``
    for the batch ``(x, y)``, with ``G`` the gradient of ``loss_fn(model(x), y)`` w.r.t. the
    layer's output (the same ``G`` AdaFisher's hooks see). The diagonals equal AdaFisher's raw
    ``h`` and ``s`` (paper variant). Parameters' gradients are not touched."""
    module = model.get_submodule(layer)
    with record_io({layer: module}) as calls, torch.enable_grad():
        loss = loss_fn(model(x), y)
    if not calls[layer]:
        raise ValueError(f"layer {layer!r} was not called by the model's forward")
    outputs = [out for _, out in calls[layer]]
    grads = torch.autograd.grad(loss, outputs)
    x_rows = torch.cat([input_rows(module, inp) for inp, _ in calls[layer]])
    g_rows = torch.cat([output_rows(module, g) for g in grads])
    h = x_rows.T @ x_rows / x_rows.shape[0]
    s = g_rows.T @ g_rows / g_rows.shape[0]
    return KroneckerFactors(layer, h, s)


# --------------------------------------------------------------------------------------------
# Analysis of one symmetric matrix
# --------------------------------------------------------------------------------------------


def gershgorin_discs(m: Tensor) -> tuple[Tensor, Tensor]:
    """Centres ``m_ii`` and radii ``R_i = Σ_{j≠i} |m_ij|`` (row sums) of the Gershgorin discs."""
    centres = torch.diagonal(m)
    radii = m.abs().sum(1) - centres.abs()
    return centres, radii.clamp_min(0.0)


def _is_symmetric(m: Tensor) -> bool:
    return bool(torch.equal(m, m.T)) or bool(torch.allclose(m, m.T, rtol=1e-12, atol=0.0))


def eigenvalues(m: Tensor) -> Tensor:
    """Eigenvalues, ascending and real for a symmetric ``m`` (``eigvalsh``), complex otherwise."""
    if _is_symmetric(m):
        return torch.linalg.eigvalsh((m + m.T) / 2)
    return torch.linalg.eigvals(m)


def in_gershgorin_union(m: Tensor, eig: Tensor | None = None, rtol: float = 1e-9) -> Tensor:
    """For each eigenvalue, whether it lies in at least one Gershgorin disc of ``m``
    (up to ``rtol`` of the matrix's largest absolute entry, for rounding)."""
    if eig is None:
        eig = eigenvalues(m)
    centres, radii = gershgorin_discs(m)
    slack = rtol * float(m.abs().max()) if m.numel() else 0.0
    dist = (eig.reshape(-1, 1).to(torch.complex128) - centres.reshape(1, -1).to(torch.complex128)).abs()
    return (dist <= radii.reshape(1, -1) + slack).any(1)


def off_diagonal_noise(
    n: int, sigma: float, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Symmetric ``E`` with zero diagonal and ``e_ij = e_ji ~ N(0, σ²)`` for ``i < j``."""
    if sigma < 0:
        raise ValueError(f"Invalid sigma: {sigma}")
    upper = torch.randn(n, n, generator=generator, dtype=dtype).triu(1) * sigma
    return upper + upper.T


def eigenvalue_shift(
    m: Tensor, sigma: float = PAPER_SIGMA, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """``(eig(M), eig(M + E), E)`` for symmetric ``M``, eigenvalues ascending. By Weyl's
    inequality every paired shift is at most ``‖E‖₂``."""
    noise = off_diagonal_noise(m.shape[0], sigma, generator, m.dtype)
    return eigenvalues(m), eigenvalues(m + noise), noise


def snr_db(m: Tensor, m_hat: Tensor | None = None) -> float:
    """Eq. 7: ``10·log10(Σ_i |M_ii|² / Σ_{j>i} |M̂_ij|²)`` with ``M̂ = M`` by default.

    ``+inf`` when the (noisy) upper triangle is exactly zero and the diagonal is not (a diagonal
    matrix); ``nan`` only for an all-zero matrix, whose SNR is undefined.
    """
    m_hat = m if m_hat is None else m_hat
    signal = float(torch.diagonal(m).abs().square().sum())
    noise = float(m_hat.triu(1).abs().square().sum())
    if noise == 0.0:
        return math.inf if signal > 0.0 else math.nan
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def analyse(
    m: Tensor,
    sigma: float = PAPER_SIGMA,
    generator: torch.Generator | None = None,
    normalise: str = "max_diag",
) -> dict[str, Any]:
    """Every number of the figures for one symmetric factor ``m``.

    Returns a dict with the scale applied, the (normalised) matrix and its noisy copy,
    eigenvalues, Gershgorin discs and summary numbers: dimension, diagonal share of the
    squared Frobenius norm, SNR (clean and noisy), fraction of eigenvalues in the disc union,
    median radius / centre, largest eigenvalue shift, and the shift of the eigenvalues above
    the mean eigenvalue (Kaiser's criterion for a covariance).
    """
    if normalise not in ("max_diag", "none"):
        raise ValueError(f"Invalid normalise: {normalise!r} (expected 'max_diag' or 'none')")
    m = m.to(torch.float64)
    scale = float(torch.diagonal(m).abs().max()) if normalise == "max_diag" else 1.0
    if scale == 0.0:
        scale = 1.0
    m = m / scale
    eig, eig_noisy, noise = eigenvalue_shift(m, sigma, generator)
    centres, radii = gershgorin_discs(m)
    shift = (eig_noisy - eig).abs()
    kaiser = eig > eig.mean()
    inside = in_gershgorin_union(m, eig)
    diag_energy = float(torch.diagonal(m).square().sum())
    total_energy = float(m.square().sum())
    ratio = radii / centres.abs().clamp_min(torch.finfo(m.dtype).tiny)
    summary = {
        "dim": m.shape[0],
        "scale": scale,
        "sigma": sigma,
        "diagonal_energy_fraction": diag_energy / total_energy if total_energy > 0 else math.nan,
        "snr_db_clean": snr_db(m),
        "snr_db_noisy": snr_db(m, m + noise),
        "eigenvalues_in_disc_union": float(inside.double().mean()),
        "median_radius_over_centre": float(ratio.median()),
        "diagonally_dominant_rows": float((radii < centres.abs()).double().mean()),
        "max_eigenvalue_shift": float(shift.max()),
        "noise_spectral_norm": float(torch.linalg.matrix_norm(noise, ord=2)),
        "kaiser_count": int(kaiser.sum()),
        "kaiser_max_relative_shift": float((shift[kaiser] / eig[kaiser].abs()).max()) if kaiser.any() else 0.0,
        "eigenvalue_range": [float(eig.min()), float(eig.max())],
    }
    return {
        "matrix": m, "noisy": m + noise, "eig": eig, "eig_noisy": eig_noisy,
        "centres": centres, "radii": radii, "summary": summary,
    }


# --------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------


def _heat(ax: Any, fig: Any, image: Any, title: str, cmap: str = "viridis") -> None:
    # "antialiased" (matplotlib's default) low-pass filters matrices larger than the panel.
    im = ax.imshow(image, cmap=cmap, interpolation="antialiased")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _discs(ax: Any, result: dict[str, Any]) -> None:
    patches = optional("matplotlib.patches")
    centres, radii = result["centres"].numpy(), result["radii"].numpy()
    for c, r in zip(centres, radii):
        ax.add_patch(patches.Circle((c, 0.0), r, fill=False, lw=0.6, alpha=0.5, color="tab:blue"))
    eig = result["eig"].numpy()
    ax.plot(centres, [0.0] * len(centres), "o", color="black", ms=3, label="centres $m_{ii}$")
    ax.plot(eig, [0.0] * len(eig), "x", color="red", ms=5, label="eigenvalues")
    lo, hi = float((centres - radii).min()), float((centres + radii).max())
    lo, hi = min(lo, float(eig.min())), max(hi, float(eig.max()))
    half = max(hi - lo, 1e-12) / 2
    mid = (hi + lo) / 2
    ax.set_xlim(mid - 1.05 * half, mid + 1.05 * half)
    ax.set_ylim(-1.05 * half, 1.05 * half)
    ax.set_aspect("equal")
    ax.axhline(0.0, color="grey", lw=0.4)
    s = result["summary"]
    ax.set_title(f"Gershgorin discs (median R/centre {s['median_radius_over_centre']:.2g})", fontsize=9)
    ax.set_xlabel("Re")
    ax.set_ylabel("Im")
    ax.legend(fontsize=7, loc="upper left")


def _spectrum(ax: Any, result: dict[str, Any]) -> None:
    # Exact zeros (dead units, rank-deficient batches) are drawn at the bottom of the axis.
    floor = 1e-9 * float(result["eig"].abs().max().clamp_min(1e-300))
    eig = result["eig"].flip(0).abs().clamp_min(floor).numpy()
    noisy = result["eig_noisy"].flip(0).abs().clamp_min(floor).numpy()
    ax.semilogy(eig, "o", ms=4, mfc="none", color="black", label="clean")
    ax.semilogy(noisy, "x", ms=4, color="red", label=f"noisy σ={result['summary']['sigma']:g}")
    ax.axhline(float(result["eig"].mean()), color="tab:blue", ls="--", lw=0.8, label="mean (Kaiser)")
    s = result["summary"]
    ax.set_title(f"|eigenvalues|, max shift {s['max_eigenvalue_shift']:.2g}", fontsize=9)
    ax.set_xlabel("index (descending)")
    ax.set_ylim(bottom=floor * 0.5)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_factors(panels: list[tuple[str, dict[str, Any]]], title: str = "") -> Any:
    """One row per ``(label, analyse(...) result)``: heat map, log-magnitude FFT (centred),
    Gershgorin discs, eigenvalue magnitudes with and without noise. Returns a ``Figure``."""
    np = optional("numpy")
    rows = len(panels)
    fig = new_figure(14, 3.1 * rows + 0.4)
    axes = fig.subplots(rows, 4, squeeze=False)
    for (label, result), ax in zip(panels, axes):
        s = result["summary"]
        m = result["matrix"].numpy()
        _heat(ax[0], fig, m, f"{label}  (d={s['dim']}, diag share {s['diagonal_energy_fraction']:.2f})")
        spectrum = np.log10(np.abs(np.fft.fftshift(np.fft.fft2(m))) + 1e-12)
        _heat(ax[1], fig, spectrum, f"log10 |FFT|   SNR clean {s['snr_db_clean']:.1f} dB, "
              f"noisy {s['snr_db_noisy']:.1f} dB", cmap="magma")
        _discs(ax[2], result)
        _spectrum(ax[3], result)
    if title:
        fig.suptitle(title)
    return fig


# --------------------------------------------------------------------------------------------
# The experiment: a small CNN on scikit-learn's digits, trained with AdaFisher
# --------------------------------------------------------------------------------------------


def digits_experiment(
    out: str | Path,
    layers: tuple[str, ...] = ("2", "8"),
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    eval_batch: int = 256,
    sigma: float = PAPER_SIGMA,
    seed: int = 0,
) -> dict[str, Any]:
    """Train :func:`~lightning_adafisher.diagnostics._common.digits_cnn` with AdaFisher (paper
    variant) and analyse the full ``H`` and ``S`` of ``layers`` on a fixed batch of
    ``eval_batch`` training images at the middle and the end of training. Writes
    ``kronecker_<layer>.png`` per layer and ``kronecker.json``."""

    x_train, y_train, model, opt = digits_with_adafisher(seed, lr)
    xb, yb = x_train[:eval_batch], y_train[:eval_batch]
    order = torch.Generator().manual_seed(seed)
    checkpoints = {max(epochs // 2, 1): "middle", epochs: "end"}
    captured: dict[str, dict[str, KroneckerFactors]] = {}
    step = 0
    steps_at: dict[str, int] = {}
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x_train), generator=order).split(batch_size):
            opt.zero_grad()
            F.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
            step += 1
        if epoch in checkpoints:
            when = checkpoints[epoch]
            steps_at[when] = step
            model.eval()  # keeps AdaFisher's hooks out (they count training-mode calls only)
            captured[when] = {name: kronecker_factors(model, name, xb, yb) for name in layers}
            model.train()
    out = Path(out)
    numbers: dict[str, Any] = {
        "settings": {"model": str(model), "epochs": epochs, "batch_size": batch_size, "lr": lr,
                     "eval_batch": eval_batch, "sigma": sigma, "seed": seed, "normalise": "max_diag",
                     "noise": "symmetric, off-diagonal", "steps": steps_at},
        "layers": {},
    }
    for name in layers:
        module = model.get_submodule(name)
        panels = []
        per_layer: dict[str, Any] = {}
        for factor in ("H", "S"):
            for when in captured:
                g = torch.Generator().manual_seed(seed)
                result = analyse(getattr(captured[when][name], factor), sigma, g)
                panels.append((f"{factor}, {when} (step {steps_at[when]})", result))
                per_layer[f"{factor}_{when}"] = result["summary"]
        numbers["layers"][name] = {"module": str(module), **per_layer}
        fig = plot_factors(panels, title=f"layer {name}: {module}  —  digits CNN, AdaFisher lr={lr:g}")
        save_figure(fig, out / f"kronecker_{name}.png")
    write_json(numbers, out / "kronecker.json")
    return numbers
