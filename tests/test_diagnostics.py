"""Diagnostics (``lightning_adafisher.diagnostics``): the mathematical invariants behind each
figure, float64 brute-force references, and that the figures are real PNGs of the stated size."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from lightning_adafisher import AdaFisher  # noqa: E402
from lightning_adafisher import functional as fn  # noqa: E402
from lightning_adafisher.diagnostics import kronecker as kr  # noqa: E402
from lightning_adafisher.diagnostics import trajectories as tr  # noqa: E402
from lightning_adafisher.diagnostics import true_fisher as tf  # noqa: E402
from lightning_adafisher.diagnostics._common import DPI, new_figure, save_figure  # noqa: E402
from lightning_adafisher.layers import layer_helper_for  # noqa: E402


def _png_shape(path) -> tuple[int, int]:
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image.shape[0], image.shape[1]


def _random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2 * n, generator=g, dtype=torch.float64)
    return a @ a.T / (2 * n)


# --------------------------------------------------------------------------------------------
# Kronecker structure: Gershgorin, noise, SNR (Eq. 7)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_eigenvalues_lie_in_gershgorin_union(seed):
    spd = _random_spd(12, seed)
    assert kr.in_gershgorin_union(spd).all()
    g = torch.Generator().manual_seed(seed)
    general = torch.randn(9, 9, generator=g, dtype=torch.float64)  # complex eigenvalues
    eig = kr.eigenvalues(general)
    assert eig.is_complex() and kr.in_gershgorin_union(general, eig).all()
    noisy = spd + kr.off_diagonal_noise(12, 0.05, g)
    assert kr.in_gershgorin_union(noisy).all()


def test_gershgorin_discs_of_a_known_matrix():
    m = torch.tensor([[4.0, -1.0, 0.5], [2.0, 3.0, 0.0], [0.0, 1.0, -2.0]], dtype=torch.float64)
    centres, radii = kr.gershgorin_discs(m)
    torch.testing.assert_close(centres, torch.tensor([4.0, 3.0, -2.0], dtype=torch.float64))
    torch.testing.assert_close(radii, torch.tensor([1.5, 2.0, 1.0], dtype=torch.float64))
    # A point far outside every disc is reported outside.
    assert not kr.in_gershgorin_union(m, torch.tensor([10.0], dtype=torch.float64)).any()


def test_snr_of_diagonal_matrix_is_infinite_not_nan():
    d = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    assert kr.snr_db(d) == math.inf
    assert kr.snr_db(d, d.clone()) == math.inf
    assert math.isnan(kr.snr_db(torch.zeros(3, 3, dtype=torch.float64)))  # undefined, documented
    result = kr.analyse(d, sigma=0.0)
    assert result["summary"]["snr_db_clean"] == math.inf
    assert result["summary"]["snr_db_noisy"] == math.inf
    assert not any(isinstance(v, float) and math.isnan(v) for v in result["summary"].values())
    noisy = kr.analyse(d, sigma=1e-3, generator=torch.Generator().manual_seed(0))["summary"]
    assert math.isfinite(noisy["snr_db_noisy"]) and noisy["snr_db_noisy"] > 40


def test_snr_matches_eq7_by_hand():
    m = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    assert kr.snr_db(m) == pytest.approx(10 * math.log10(8 / 1))
    m_hat = m + torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    assert kr.snr_db(m, m_hat) == pytest.approx(10 * math.log10(8 / 4))  # only j > i counts


def test_zero_noise_leaves_eigenvalues_unchanged_and_weyl_bounds_the_shift():
    m = _random_spd(10, 3)
    eig, eig0, noise0 = kr.eigenvalue_shift(m, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(noise0, torch.zeros_like(m))
    assert torch.equal(eig, eig0)
    eig, eig1, noise = kr.eigenvalue_shift(m, 1e-3, torch.Generator().manual_seed(0))
    assert torch.equal(noise, noise.T) and torch.equal(torch.diagonal(noise), torch.zeros(10, dtype=torch.float64))
    assert (noise != 0).sum() == 10 * 9
    assert (eig1 - eig).abs().max() <= torch.linalg.matrix_norm(noise, ord=2) + 1e-12


def test_analyse_normalises_by_the_largest_diagonal_entry():
    m = _random_spd(6, 0) * 1e-7  # S of a mean-reduced loss is tiny
    a = kr.analyse(m, generator=torch.Generator().manual_seed(0))
    b = kr.analyse(m * 1e7, generator=torch.Generator().manual_seed(0))
    assert torch.diagonal(a["matrix"]).max() == pytest.approx(1.0)
    for key in ("snr_db_clean", "snr_db_noisy", "max_eigenvalue_shift", "diagonal_energy_fraction"):
        assert a["summary"][key] == pytest.approx(b["summary"][key], rel=1e-9)
    with pytest.raises(ValueError, match="normalise"):
        kr.analyse(m, normalise="bogus")


class _ConvLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2)
        self.conv2 = nn.Conv2d(6, 3, 2, padding="same", dilation=2, bias=False)
        self.proj = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y = torch.tanh(self.conv2(torch.tanh(self.conv(x))))
        tokens = y.flatten(2).transpose(1, 2)  # [B, T, 3]: tokens count as rows
        return self.head(torch.tanh(self.proj(tokens))).mean(1)


def test_kronecker_factor_diagonals_are_adafishers_raw_statistics():
    torch.manual_seed(0)
    model = _ConvLinear().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 7, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    captured: dict[str, dict] = {}
    hooks = []
    for name in ("conv", "conv2", "proj"):
        module = model.get_submodule(name)
        helper = layer_helper_for(module)

        def fwd(mod, args, out, name=name, helper=helper):
            captured[name] = {"h": helper.input_stats(mod, args[0], "paper")}
            out.register_hook(lambda gr: captured[name].__setitem__("s", helper.output_stats(mod, gr, "paper")))

        hooks.append(module.register_forward_hook(fwd))
    F.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    for name in ("conv", "conv2", "proj"):
        factors = kr.kronecker_factors(model, name, x, y)
        (h_tot, h_cnt), (s_tot, s_cnt) = captured[name]["h"], captured[name]["s"]
        torch.testing.assert_close(torch.diagonal(factors.H), h_tot / h_cnt, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(torch.diagonal(factors.S), s_tot / s_cnt, rtol=1e-12, atol=1e-18)
        for m in (factors.H, factors.S):
            assert torch.equal(m, m.T) or torch.allclose(m, m.T, atol=1e-15)
            assert torch.linalg.eigvalsh(m).min() > -1e-12


def test_conv_input_rows_match_explicit_patches():
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = kr.input_rows(conv, x)
    padded = F.pad(x, (1, 1, 1, 1))
    expected = []
    for b in range(2):
        for i in range(3):
            for j in range(3):
                patch = padded[b, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1)
                expected.append(torch.cat((patch, patch.new_ones(1))))
    torch.testing.assert_close(rows, torch.stack(expected))


def test_plot_factors_png_size(tmp_path):
    m = _random_spd(8, 0)
    panels = [("H", kr.analyse(m)), ("S", kr.analyse(torch.diag(torch.arange(1.0, 5.0, dtype=torch.float64))))]
    fig = kr.plot_factors(panels, title="test")
    path = save_figure(fig, tmp_path / "k.png")
    w, h = fig.get_size_inches()
    assert _png_shape(path) == (round(h * DPI), round(w * DPI))


# --------------------------------------------------------------------------------------------
# True Fisher
# --------------------------------------------------------------------------------------------


def _two_layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def test_true_fisher_matches_per_sample_autograd_loop():
    model = _two_layer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels = tf.sample_labels(model, x, n_samples=3, generator=g)
    assert labels.shape == (3, 6)
    got = tf.true_fisher_diagonal(model, x, labels, chunk_size=4)
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for m in range(labels.shape[0]):
        for i in range(x.shape[0]):
            model.zero_grad()
            (-torch.log_softmax(model(x[i:i + 1]), -1)[0, labels[m, i]]).backward()
            for n, p in model.named_parameters():
                expected[n] += p.grad.square()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n] / labels.numel(), rtol=1e-10, atol=1e-14)


def test_sampled_labels_follow_the_predictive_distribution():
    model = _two_layer()
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = tf.sample_labels(model, x, n_samples=20000, generator=torch.Generator().manual_seed(2))
    probs = torch.softmax(model(x), -1).detach()
    freq = torch.stack([torch.bincount(labels[:, i], minlength=3) for i in range(2)]).double() / 20000
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_kronecker_diagonal_is_exact_for_one_example_in_linear_layers():
    model = _two_layer(1)
    x = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[2]])
    truth = tf.true_fisher_diagonal(model, x, labels)
    kron = tf.kronecker_fisher_diagonal(model, x, labels)
    assert kron.keys() == truth.keys()
    for n in truth:
        torch.testing.assert_close(kron[n], truth[n], rtol=1e-10, atol=1e-16)


class _SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_adafisher_state_diagonal_rescales_to_the_kronecker_diagonal_of_its_batch():
    torch.manual_seed(0)
    model = _SmallConvNet().double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (5,), generator=g)
    expected = tf.kronecker_fisher_diagonal(copy.deepcopy(model), x, y.unsqueeze(0))
    opt = AdaFisher(model, lr=1e-3, variant="paper")
    F.cross_entropy(model(x), y).backward()
    opt.step()  # first statistics step: H ← h, S ← s of this batch
    got = tf.adafisher_fisher_diagonal(opt, model, batch_size=5, x_example=x[:1])
    assert got.keys() == expected.keys() == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-18)
    pre = tf.adafisher_preconditioner(opt, model)
    for n, v in pre.items():
        assert v.min() >= 1e-3 - 1e-12 and v.max() <= 1 + 1e-3 + 1e-12  # F = S'H' + λ
    errors = tf.layer_errors(model, got, got)
    assert all(e["mae"] == 0.0 for e in errors.values())
    with pytest.raises(ValueError, match="paper"):
        tf.adafisher_fisher_diagonal(AdaFisher(model, variant="reference"), model, 5, x[:1])


# --------------------------------------------------------------------------------------------
# Trajectories
# --------------------------------------------------------------------------------------------


def _toy_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def test_trajectories_share_their_first_point_and_record_every_epoch():
    x, y = _toy_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runs = tr.record_trajectories(
            tr.iris_mlp,
            {"Adam": lambda m: torch.optim.Adam(m.parameters(), lr=1e-2),
             "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=1e-2),
             "AdaFisher": lambda m: AdaFisher(m, lr=1e-3, variant="paper")},
            "0.weight", x, y, epochs=3, batch_size=8, seed=5,
        )
    torch.manual_seed(5)
    initial = tr.iris_mlp()
    start = initial[0].weight.detach().reshape(-1).double()
    for t in runs.values():
        assert t.weights.shape == (4, 2) and t.losses.shape == (4,)
        assert torch.equal(t.weights[0], start)
        assert t.losses[0] == pytest.approx(float(F.cross_entropy(initial(x), y).detach()))
        assert not torch.equal(t.weights[-1], t.weights[0])
        # The recorded point is the trained model's weights; the slice at it is its loss.
        assert torch.equal(t.weights[-1], t.model[0].weight.detach().reshape(-1).double())
        here = tr.slice_losses(t.model, "0.weight", x, y, t.weights[-1:])
        assert here.item() == pytest.approx(t.losses[-1].item(), rel=1e-6)


def test_slice_changes_only_the_two_coordinates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = _toy_data()
    y = y.clamp(max=1)
    coords = [("0.weight", (1, 0)), ("2.bias", 1)]
    assert tr.resolve_coordinates(model, coords) == [("0.weight", 2), ("2.bias", 1)]
    point = torch.tensor([[0.7, -0.3]], dtype=torch.float64)
    edited = copy.deepcopy(model)
    with torch.no_grad():
        edited[0].weight[1, 0] = 0.7
        edited[2].bias[1] = -0.3
    expected = float(F.cross_entropy(edited(x), y).detach())
    assert tr.slice_losses(model, coords, x, y, point).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="coordinates"):
        tr.resolve_coordinates(model, "0.weight")  # 6 entries
    with pytest.raises(ValueError, match="out of range"):
        tr.resolve_coordinates(model, [("0.weight", (3, 0)), ("2.bias", 0)])


def test_trajectory_plot_png_size_and_surfaces(tmp_path):
    x, y = _toy_data()
    runs = tr.record_trajectories(
        tr.iris_mlp, {"Adam": lambda m: torch.optim.Adam(m.parameters(), lr=5e-2),
                      "SGD": lambda m: torch.optim.SGD(m.parameters(), lr=5e-1)},
        "0.weight", x, y, epochs=4, seed=0,
    )
    all_w = torch.cat([t.weights for t in runs.values()])
    box = tr.bounding_box(runs)
    sl = tr.slice_surface(runs["Adam"].model, "0.weight", x, y, box, n_points=150, resolution=40)
    assert sl["Z"].shape == (40, 40)
    pa = tr.paper_surface(runs, box, resolution=40)
    # The paper's surface interpolates the recorded losses: exact at the recorded points.
    import numpy as np
    from scipy.interpolate import griddata

    w = all_w.numpy()
    at = griddata(w, torch.cat([t.losses for t in runs.values()]).numpy(), w, method="cubic")
    np.testing.assert_allclose(at, torch.cat([t.losses for t in runs.values()]).numpy(), rtol=1e-6)
    fig = tr.plot_trajectories(runs, sl, pa)
    path = save_figure(fig, tmp_path / "t.png")
    assert _png_shape(path) == (500, 1600)
    assert path.stat().st_size < 200_000


# --------------------------------------------------------------------------------------------
# Histograms (Lightning callback)
# --------------------------------------------------------------------------------------------


def _fit_with_histograms(tmp_path, optimizer: str, logger):
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adafisher import AdaFisherCallback
    from lightning_adafisher.diagnostics import FisherHistogramCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                                     nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            if optimizer == "adam":
                return torch.optim.Adam(self.parameters(), lr=1e-2)
            if optimizer == "sgd":
                return torch.optim.SGD(self.parameters(), lr=1e-2)
            return AdaFisher(self.parameters(), lr=1e-2, variant="paper")

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g))
    recorder = FisherHistogramCallback(every_n_steps=1, out_dir=str(tmp_path), label=optimizer)
    callbacks = [recorder] + ([AdaFisherCallback()] if optimizer == "adafisher" else [])
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=8))
    return module, trainer, recorder


class _Writer:
    def __init__(self):
        self.calls = []

    def add_histogram(self, tag, values, step):
        self.calls.append((tag, values.clone(), step))


def _histogram_logger():
    from lightning.pytorch.loggers.logger import Logger

    class HistogramLogger(Logger):
        def __init__(self):
            super().__init__()
            self.writer = _Writer()

        name = "hist"
        version = 0

        @property
        def experiment(self):
            return self.writer

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return HistogramLogger()


@pytest.mark.parametrize("optimizer", ["adafisher", "adam"])
def test_histogram_callback_records_the_optimizers_diagonal(tmp_path, optimizer):
    logger = _histogram_logger()
    module, trainer, recorder = _fit_with_histograms(tmp_path, optimizer, logger)
    opt = trainer.optimizers[0]
    watched = ["net.0", "net.2", "net.6"]  # first, middle ((4 − 1) // 2 = 1), last of 4 Linears
    assert list(recorder.records) == watched
    assert [step for step, _ in recorder.records["net.0"]] == list(range(1, 9))
    last_values = {}
    for tag, values, step in logger.writer.calls:
        assert tag.startswith(f"fisher_diagonal/{optimizer}/")
        if step == 8:
            last_values[tag.rsplit("/", 1)[1]] = values
    assert sorted(last_values) == watched
    for name in watched:
        layer = module.get_submodule(name)
        p = layer.weight
        if optimizer == "adafisher":
            state = opt.state[p]
            expected = (fn.min_max(state["factor_s"])[:, None] * fn.min_max(state["factor_h"])[None, :-1] + 1e-3)
        else:
            state = opt.state[p]
            expected = state["exp_avg_sq"] / (1 - 0.999 ** float(state["step"]))
        torch.testing.assert_close(last_values[name], expected.reshape(-1).float())
        assert recorder.records[name][-1][1]["mean"] == pytest.approx(float(expected.mean()), rel=1e-5)
    png = tmp_path / "fisher_histograms.png"
    assert _png_shape(png) == (round((3.6 + 0.5) * DPI), round((4.6 * 3 + 0.6) * DPI))
    assert (tmp_path / "fisher_histograms.json").exists()


def test_histogram_callback_skips_loggers_without_histograms(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    _, _, recorder = _fit_with_histograms(tmp_path, "adafisher", CSVLogger(str(tmp_path)))
    assert len(recorder.records["net.0"]) == 8
    _, _, recorder = _fit_with_histograms(tmp_path / "none", "adam", False)
    assert (tmp_path / "none" / "fisher_histograms.png").exists()


def test_histogram_callback_fails_fast_on_an_optimizer_without_a_diagonal(tmp_path):
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    with pytest.raises(MisconfigurationException, match="SGD keeps no preconditioner"):
        _fit_with_histograms(tmp_path, "sgd", False)


# --------------------------------------------------------------------------------------------
# Packaging: optional dependencies stay optional; the CLI dispatches
# --------------------------------------------------------------------------------------------


def test_importing_diagnostics_needs_no_optional_dependency():
    code = (
        "import sys, lightning_adafisher\n"
        "assert 'lightning_adafisher.diagnostics' not in sys.modules\n"
        "from lightning_adafisher.diagnostics import kronecker, trajectories, true_fisher, preconditioner\n"
        "bad = [m for m in ('matplotlib', 'scipy', 'sklearn', 'lightning') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_console_script_dispatches_trajectories(tmp_path, capsys):
    from lightning_adafisher.cli import main

    main(["diagnostics", "trajectories", "--out", str(tmp_path), "--epochs", "2", "--tag", "t",
          "--points", "100"])
    assert "trajectories:" in capsys.readouterr().out
    assert _png_shape(tmp_path / "trajectories_t.png") == (500, 1600)
    import json

    numbers = json.loads((tmp_path / "trajectories_t.json").read_text())
    starts = {tuple(t["weights"][0]) for t in numbers["trajectories"].values()}
    assert len(starts) == 1 and set(numbers["trajectories"]) == {"Adam", "SGD", "AdaFisher"}


def test_new_figure_pixel_size(tmp_path):
    fig = new_figure(3, 2)
    fig.add_subplot().plot([0, 1], [1, 0])
    assert _png_shape(save_figure(fig, tmp_path / "a.png")) == (200, 300)
    assert _png_shape(save_figure(fig, tmp_path / "b.png", colours=None)) == (200, 300)


# --------------------------------------------------------------------------------------------
# The full experiments (each tens of seconds on 2 cores)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["histograms", "kronecker", "true-fisher"])
def test_experiment_commands(tmp_path, command):
    from lightning_adafisher.diagnostics.commands import main

    main([command, "--out", str(tmp_path), "--epochs", "2"])
    pngs = sorted(tmp_path.glob("*.png"))
    jsons = sorted(tmp_path.glob("*.json"))
    assert pngs and jsons
    for png in pngs:
        h, w = _png_shape(png)
        assert h > 100 and w > 100


def test_diagnostics_help_names_the_console_script_and_shows_defaults(capsys):
    from lightning_adafisher.diagnostics.commands import main

    for argv in (["--help"], ["trajectories", "--help"], ["kronecker", "--help"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: lightning-adafisher diagnostics"), text[:200]
        assert "python -m" not in text and "``" not in text
        if argv[0] != "--help":
            assert "--epochs EPOCHS" in text and "(default: " in text
            assert "--lr LR" in text and "(default: 0.001)" in text
