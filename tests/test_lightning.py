"""AdaFisher inside Lightning: accumulation, DDP, AMP, resume, manual optimization, mixin, CLI."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_adafisher import AdaFisherCallback, AdaFisherW
from tests.lightning_helpers import (
    HP, MixinConvModule, MLPModule, conv_data, make_data, make_mlp,
)

ROOT = Path(__file__).resolve().parents[1]


def _trainer(tmp_path=None, **kw) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_epochs=2,
    )
    if tmp_path is not None:
        defaults["default_root_dir"] = str(tmp_path)
    defaults.update(kw)
    return pl.Trainer(**defaults)


def plain_full_batch(epochs: int = 2, batch: int = 8, variant: str = "paper", interval: int = 1):
    """The same training in plain PyTorch with batches of 8 (the ground truth)."""
    model = make_mlp()
    opt = AdaFisherW(model, update_interval=interval, variant=variant, eigen_interval=1, **HP)
    for _ in range(epochs):
        for x, y in DataLoader(make_data(32), batch_size=batch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    return model


def _assert_same_params(a: dict, b: dict, atol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


def _net_state(module) -> dict:
    return {k.removeprefix("net."): v for k, v in module.state_dict().items()}


@pytest.mark.parametrize("variant", ["paper", "reference", "eigen"])
def test_accumulation_equals_full_batch(variant):
    module = MLPModule(variant=variant)
    trainer = _trainer(precision="64-true", accumulate_grad_batches=2, callbacks=[AdaFisherCallback()])
    trainer.fit(module, DataLoader(make_data(32), batch_size=4))
    expected = plain_full_batch(variant=variant)
    _assert_same_params(_net_state(module), expected.state_dict())
    opt = trainer.optimizers[0]
    assert opt.state["adafisher"]["steps"] == 8
    assert opt.state[module.net[0].weight]["factor_updates"] == 8


def test_hooks_removed_after_fit():
    module = MLPModule()
    trainer = _trainer(precision="64-true", max_epochs=1, callbacks=[AdaFisherCallback()])
    trainer.fit(module, DataLoader(make_data(8), batch_size=4))
    assert all(len(m._forward_hooks) == 0 for m in module.modules())


def test_callback_without_adafisher_optimizer_is_an_error():
    class AdamModule(MLPModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters())

    trainer = _trainer(precision="64-true", callbacks=[AdaFisherCallback()])
    with pytest.raises(MisconfigurationException, match=r"found no AdaFisher/AdaFisherW among the trainer's optimizers \(found: Adam\)"):
        trainer.fit(AdamModule(), DataLoader(make_data(8), batch_size=4))


def test_sharded_strategies_are_refused():
    FSDPStrategy = type("FSDPStrategy", (), {})
    trainer = type("T", (), {"strategy": FSDPStrategy()})()
    with pytest.raises(MisconfigurationException, match="does not support the sharded strategy FSDPStrategy"):
        AdaFisherCallback().setup(trainer, None, "fit")


class FSDPStrategy(SingleDeviceStrategy):
    """A CPU strategy under a sharded strategy's class name (the refusal goes by the name)."""


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_sharded_strategy_name_is_refused_only_for_fit(stage):
    class Evaluated(MLPModule):
        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_loss", F.cross_entropy(self(x), y))

        def predict_step(self, batch, batch_idx):
            return self(batch[0]).argmax(-1)

    module, loader = Evaluated(), DataLoader(make_data(8), batch_size=4)
    trainer = _trainer(precision="64-true", strategy=FSDPStrategy(torch.device("cpu")),
                       callbacks=[AdaFisherCallback()])
    out = getattr(trainer, stage)(module, loader)
    if stage == "predict":
        assert [p.shape for p in out] == [torch.Size([4]), torch.Size([4])]
    else:
        key = f"{'val' if stage == 'validate' else 'test'}_loss"
        expected = F.cross_entropy(module(make_data(8).tensors[0]), make_data(8).tensors[1])
        assert out[0][key] == pytest.approx(expected.item(), rel=1e-12)
    with pytest.raises(MisconfigurationException, match=(
        r"AdaFisherCallback does not support the sharded strategy FSDPStrategy: its statistics "
        r"hooks need whole parameters. Use strategy='ddp', or shard with FSDP2: "
        r"ModelParallelStrategy\(data_parallel_size=N, tensor_parallel_size=1\) and "
        r"torch.distributed.fsdp.fully_shard in configure_model.")):
        _trainer(precision="64-true", strategy=FSDPStrategy(torch.device("cpu")),
                 callbacks=[AdaFisherCallback()]).fit(Evaluated(), loader)


class _WithUnsupported(MLPModule):
    """A raw parameter (identity preconditioner: a warning at attach) and a NaN loss at batch 1, the last
    (non-finite statistics: a warning at the step)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x) * self.scale, y)
        return loss * float("nan") if batch_idx == 1 else loss


@pytest.mark.parametrize("rank", [0, 1])
def test_optimizer_warnings_print_on_rank_zero_only(rank, monkeypatch):
    import lightning_adafisher.optim

    # what torch.distributed says under DDP, without starting processes
    monkeypatch.setattr(lightning_adafisher.optim, "is_rank_zero", lambda: rank == 0)
    trainer = _trainer(precision="64-true", max_epochs=1, callbacks=[AdaFisherCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(_WithUnsupported(), DataLoader(make_data(8), batch_size=4))
    ours = [str(w.message) for w in caught if str(w.message).startswith("AdaFisher")]
    if rank == 0:
        assert len(ours) == 2, ours
        assert ours[0] == ("AdaFisher: 1 parameter(s) have no supported layer and use the identity "
                           "preconditioner: scale")
        assert ours[1].startswith("AdaFisher: statistics containing inf/NaN were not folded")
    else:
        assert ours == []


def test_callback_counters_survive_resume(tmp_path):
    scaler = lambda: MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**14))  # noqa: E731
    loader = lambda: DataLoader(make_data(32, dtype=torch.float32), batch_size=8)  # noqa: E731

    straight = AdaFisherCallback()
    _trainer(max_epochs=2, plugins=[scaler()], callbacks=[straight]).fit(_AmpModule(overflow_at=1), loader())
    assert (straight._discarded, straight._statistics_steps) == (2, 8)  # batch 1 of each epoch

    first = AdaFisherCallback()
    t1 = _trainer(tmp_path, max_epochs=1, plugins=[scaler()], callbacks=[first])
    t1.fit(_AmpModule(overflow_at=1), loader())
    first._comm_seconds = 0.25  # (single device: nothing to communicate) to see it restored
    t1.save_checkpoint(tmp_path / "e1.ckpt")
    saved = torch.load(tmp_path / "e1.ckpt", weights_only=False)["callbacks"]["AdaFisherCallback"]
    assert saved == {"discarded": 1, "statistics_steps": 4, "comm_seconds": 0.25}

    resumed = AdaFisherCallback()
    t2 = _trainer(tmp_path, max_epochs=2, plugins=[scaler()], callbacks=[resumed])
    t2.fit(_AmpModule(overflow_at=1), loader(), ckpt_path=str(tmp_path / "e1.ckpt"))
    assert (resumed._discarded, resumed._statistics_steps) == (2, 8)
    assert resumed._comm_seconds == 0.25
    assert resumed.state_dict() == {"discarded": 2, "statistics_steps": 8, "comm_seconds": 0.25}


def test_adafisher_without_callback_warns():
    trainer = _trainer(precision="64-true", max_epochs=1)
    with pytest.warns(UserWarning, match="AdaFisher has no statistics hooks"):
        trainer.fit(MLPModule(), DataLoader(make_data(8), batch_size=4))


# --- checkpoint and resume -------------------------------------------------------------------


def test_resume_equals_uninterrupted(tmp_path):
    def module():
        return MixinConvModule(update_interval=3, gamma=0.8, weight_decay=1e-2, no_decay_bias_and_norm=True)

    loader = lambda: DataLoader(conv_data(40), batch_size=8)  # 5 steps/epoch: interval phase shifts  # noqa: E731
    straight = module()
    _trainer(precision="64-true", max_epochs=2).fit(straight, loader())

    class StopAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    first = module()  # same max_epochs (the cosine schedule's length), stopped after epoch 1
    t1 = _trainer(tmp_path, precision="64-true", max_epochs=2, callbacks=[StopAfterFirstEpoch()])
    t1.fit(first, loader())
    assert t1.optimizers[0].state["adafisher"]["steps"] == 5
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)

    resumed = MixinConvModule(seed=99, update_interval=3, gamma=0.8, weight_decay=1e-2, no_decay_bias_and_norm=True)
    t2 = _trainer(tmp_path, precision="64-true", max_epochs=2)
    t2.fit(resumed, loader(), ckpt_path=str(ckpt))
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), (k, (a - b).abs().max().item())
    opt = t2.optimizers[0]
    assert opt.state["adafisher"]["steps"] == 10
    assert opt.state[resumed.net.conv.weight]["factor_updates"] == 4  # steps 1, 4, 7, 10


def test_checkpoint_holds_factors_keyed_like_torch(tmp_path):
    module = MixinConvModule(scheduler="none")
    trainer = _trainer(tmp_path, precision="64-true", max_epochs=1)
    trainer.fit(module, DataLoader(conv_data(16), batch_size=8))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    ckpt = torch.load(tmp_path / "c.ckpt", weights_only=False)
    state = ckpt["optimizer_states"][0]["state"]
    assert state["adafisher"]["steps"] == 2
    assert "factor_h" in state[0] and "factor_s" in state[0]  # net.conv.weight is parameter 0


# --- mixed precision -------------------------------------------------------------------------


class _AmpModule(MLPModule):
    def __init__(self, overflow_at: int | None = None, variant: str = "paper"):
        super().__init__(variant=variant)
        self.net = self.net.float()
        self.overflow_at = overflow_at

    def configure_optimizers(self):
        # eigen: both of the first layer's sides (7, 16) keep full factors
        return AdaFisherW(self.parameters(), variant=self.variant, **dict(HP, max_factor_size=64))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x.float()), y)
        if batch_idx == self.overflow_at:
            loss = loss * float("inf")
        return loss


class _Snapshot(pl.Callback):
    """Factor state after each batch."""

    def __init__(self):
        self.factors = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.factors.append(
            {k: opt.state[pl_module.net[0].weight][k].clone() for k in ("factor_h", "factor_s")}
        )


def _amp_run(precision_plugin_or_str, overflow_at=None, batches=3, variant="paper"):
    module = _AmpModule(overflow_at, variant)
    snap = _Snapshot()
    kw = dict(plugins=[precision_plugin_or_str]) if not isinstance(precision_plugin_or_str, str) else dict(precision=precision_plugin_or_str)
    trainer = _trainer(max_epochs=1, callbacks=[AdaFisherCallback(), snap], **kw)
    trainer.fit(module, DataLoader(make_data(8 * batches, dtype=torch.float32), batch_size=8))
    return module, trainer, snap


@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_16_mixed_statistics_match_fp32_up_to_rounding(variant):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    _, _, amp = _amp_run(MixedPrecision("16-mixed", "cpu", scaler), variant=variant)
    _, _, fp32 = _amp_run("32-true", variant=variant)
    # Eigen: the first batch only. Its steps (Adam in the eigenbasis) move near-null directions
    # by about lr whatever their size, so fp16's rounding reaches the next batches' statistics
    # (measured: 7% and 16% of the largest entry after batches 2 and 3).
    pairs = list(zip(amp.factors, fp32.factors))
    for a, b in pairs if variant == "paper" else pairs[:1]:
        # raw (un-normalised) factors: without unscaling, s would be 2^28 times larger. Full
        # factors have entries near zero: there, tolerance relative to the largest entry.
        for key in ("factor_s", "factor_h"):
            atol = 0.0 if variant == "paper" else 2e-2 * b[key].abs().max().item()
            torch.testing.assert_close(a[key], b[key], rtol=2e-2, atol=atol)


@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_16_mixed_overflow_step_leaves_factors_untouched(variant):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    _, trainer, snap = _amp_run(MixedPrecision("16-mixed", "cpu", scaler), overflow_at=1, batches=4,
                                variant=variant)
    opt = trainer.optimizers[0]
    assert opt.state["adafisher"]["steps"] == 3  # the overflow step was skipped
    for k in ("factor_h", "factor_s"):
        assert torch.equal(snap.factors[1][k], snap.factors[0][k])  # untouched by the skipped step
        assert not torch.equal(snap.factors[2][k], snap.factors[1][k])  # the next step folds again
    assert opt.collector is None or opt.collector.pending == {}
    assert opt.state["adafisher"]["skipped_statistics"] == {}  # discarded, never folded


def test_bf16_mixed_trains_with_float32_factors():
    module, trainer, snap = _amp_run("bf16-mixed", batches=4)
    assert all(f["factor_s"].dtype == torch.float32 for f in snap.factors)
    assert all(torch.isfinite(f["factor_s"]).all() for f in snap.factors)
    assert trainer.optimizers[0].state["adafisher"]["steps"] == 4


def test_gradient_clipping_happens_before_preconditioning():
    module = MLPModule()
    trainer = _trainer(precision="64-true", max_epochs=1, gradient_clip_val=1e-3, callbacks=[AdaFisherCallback()])
    trainer.fit(module, DataLoader(make_data(8), batch_size=8))
    # one step: m̂ = g (clipped); the first moment holds (1-β)·g_clipped
    opt = trainer.optimizers[0]
    moments = [opt.state[p]["exp_avg"] / (1 - 0.9) for p in module.parameters()]
    assert torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments])) == pytest.approx(1e-3, rel=1e-5)  # clip_grad_norm_ divides by (norm + 1e-6)


# --- manual optimization ---------------------------------------------------------------------


class _ManualModule(MLPModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):  # accumulate two halves, then step
            self.manual_backward(F.cross_entropy(self(xs), ys) / 2)
        opt.step()
        opt.zero_grad()


def test_manual_optimization_equals_plain():
    module = _ManualModule()
    _trainer(precision="64-true", callbacks=[AdaFisherCallback()]).fit(module, DataLoader(make_data(32), batch_size=8))
    _assert_same_params(_net_state(module), plain_full_batch().state_dict())


# --- mixin -----------------------------------------------------------------------------------


def test_mixin_configures_adafisherw_cosine_groups_and_callback():
    module = MixinConvModule(lr=0.02, weight_decay=0.1, gamma=0.9, no_decay_bias_and_norm=True)
    trainer = _trainer(precision="64-true", max_epochs=1)
    trainer.fit(module, DataLoader(conv_data(32), batch_size=8))
    opt = trainer.optimizers[0]
    assert isinstance(opt, AdaFisherW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert all(g["gamma"] == 0.9 for g in opt.param_groups)
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert id(module.net.conv.bias) in no_decay and id(module.net.bn.weight) in no_decay
    assert id(module.net.conv.weight) not in no_decay
    assert any(isinstance(c, AdaFisherCallback) for c in trainer.callbacks)
    assert opt.state[module.net.conv.weight]["factor_updates"] == 4
    # cosine over 4 steps: lr after 4 steps is 0.02 · (1 + cos(π)) / 2 = 0
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


class _StopAfter(pl.Callback):
    """Records the lr after each batch and stops after ``n`` batches."""

    def __init__(self, n: int):
        self.n, self.lrs = n, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        if len(self.lrs) == self.n:
            trainer.should_stop = True


@pytest.mark.parametrize("length", [dict(max_epochs=-1), dict(max_epochs=None, max_time="00:00:10:00")])
def test_mixin_without_finite_length_keeps_lr_constant(length):
    stop = _StopAfter(6)
    trainer = _trainer(precision="64-true", callbacks=[stop], **length)
    with pytest.warns(UserWarning, match=r"AdaFisherMixin: the run has no finite length .* training at "
                                         r"constant lr. Set Trainer\(max_steps=...\) or max_epochs"):
        trainer.fit(MixinConvModule(lr=0.02), DataLoader(conv_data(16), batch_size=8))
    assert trainer.global_step == 6  # three epochs of two steps, then stopped
    assert stop.lrs == [0.02] * 6
    assert trainer.lr_scheduler_configs == []
    # with a length, the cosine schedule: lr_t = 0.02 · (1 + cos(π t / 6)) / 2 after step t
    stop = _StopAfter(6)
    trainer = _trainer(precision="64-true", callbacks=[stop], max_epochs=-1, max_steps=6)
    trainer.fit(MixinConvModule(lr=0.02), DataLoader(conv_data(16), batch_size=8))
    assert stop.lrs == pytest.approx([0.02 * (1 + math.cos(math.pi * t / 6)) / 2 for t in range(1, 7)],
                                     rel=1e-12, abs=1e-15)


def test_mixin_rejects_unknown_scheduler():
    with pytest.raises(ValueError, match="Invalid scheduler: 'step'"):
        MixinConvModule(scheduler="step")


def test_diagnostics_are_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = MLPModule()
    trainer = _trainer(
        precision="64-true", max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=1,
        callbacks=[AdaFisherCallback(log_diagnostics=True)],
    )
    trainer.fit(module, DataLoader(make_data(16), batch_size=8))
    text = next(Path(tmp_path).rglob("metrics.csv")).read_text()
    header = text.splitlines()[0].split(",")
    for key in ("adafisher/Linear/H_min", "adafisher/Linear/S_max", "adafisher/discarded_step_fraction",
                "adafisher/collect_seconds", "adafisher/communicate_seconds"):
        assert key in header


# --- CLI -------------------------------------------------------------------------------------


def test_cli_yaml_with_class_path_adafisherw(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"""
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 3
  logger: false
  enable_progress_bar: false
  default_root_dir: {tmp_path}
model:
  class_path: tests.lightning_helpers.NoOptModule
  init_args:
    hidden: 12
data:
  class_path: tests.lightning_helpers.TinyData
optimizer:
  class_path: lightning_adafisher.AdaFisherW
  init_args:
    lr: 0.01
    weight_decay: 0.001
    update_interval: 2
"""
    )
    exe = Path(sys.executable).with_name("lightning-adafisher")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([str(exe), "fit", "--config", str(config)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = next(Path(tmp_path).rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert state["param_groups"][0]["update_interval"] == 2
    assert state["state"]["adafisher"]["steps"] == 3
    # the callback was added by the CLI: the first Linear's weight has folded factors (steps 1, 3)
    assert state["state"][0]["factor_updates"] == 2
    assert "AdaFisher has no statistics hooks" not in run.stderr


# --- data parallel (subprocesses) ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def _run_ddp(out: Path, *extra: str) -> None:
    env = dict(os.environ, MASTER_PORT=str(_free_port()), PYTHONWARNINGS="ignore")
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests/scripts/ddp_train.py"), str(out), "--devices", "2", *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["paper", "eigen"])
def test_ddp_two_ranks_equal_full_batch(tmp_path, variant):
    _run_ddp(tmp_path / "sync", "--variant", variant)
    ranks = _load_ranks(tmp_path / "sync")
    expected = plain_full_batch(variant=variant).state_dict()
    for rank in ranks:
        _assert_same_params({k.removeprefix("net."): v for k, v in rank.items()}, expected)


@pytest.mark.distributed
def test_single_device_checkpoint_resumes_under_ddp(tmp_path):
    """Epoch 1 on one device (batches of 8), epoch 2 on two ranks (4 + 4): the plain 2 epochs."""

    class StopAfterFirstEpoch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    module = MLPModule()
    trainer = _trainer(tmp_path, precision="64-true", max_epochs=2,
                       callbacks=[AdaFisherCallback(), StopAfterFirstEpoch()])
    trainer.fit(module, DataLoader(make_data(32), batch_size=8))
    trainer.save_checkpoint(tmp_path / "single.ckpt")
    _run_ddp(tmp_path / "resumed", "--ckpt", str(tmp_path / "single.ckpt"))
    expected = plain_full_batch().state_dict()
    for rank in _load_ranks(tmp_path / "resumed"):
        _assert_same_params({k.removeprefix("net."): v for k, v in rank.items()}, expected)


@pytest.mark.distributed
def test_ddp_without_factor_sync_diverges(tmp_path):
    _run_ddp(tmp_path / "nosync", "--no-factor-sync")
    r0, r1 = _load_ranks(tmp_path / "nosync")
    expected = plain_full_batch().state_dict()
    assert any(not torch.allclose(r0[k], r1[k], atol=1e-6) for k in r0)
    assert any(not torch.allclose(r0[k], expected[k.removeprefix("net.")], atol=1e-6) for k in r0)


@pytest.mark.distributed
def test_two_nodes_over_loopback_with_torchrun(tmp_path):
    port = str(_free_port())
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    procs = [
        subprocess.Popen(
            [str(torchrun), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
             "--master_addr=127.0.0.1", f"--master_port={port}",
             str(ROOT / "tests/scripts/ddp_train.py"), str(tmp_path / "nodes"),
             "--devices", "1", "--num-nodes", "2"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for r in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    r0, r1 = _load_ranks(tmp_path / "nodes")
    expected = plain_full_batch().state_dict()
    for rank in (r0, r1):
        _assert_same_params({k.removeprefix("net."): v for k, v in rank.items()}, expected)


# --- exact resume mid-epoch (the recipes' data modules) --------------------------------------


class _DigitsMLP(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(),
                                       torch.nn.Linear(16, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return AdaFisherW(self.parameters(), variant="paper", lr=1e-2, update_interval=2)


def _assert_equal_nested(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def _digits_fit(tmp_path, ckpt_path=None, every=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_adafisher.tasks.data_vision import DigitsDataModule

    callbacks = [AdaFisherCallback()]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                         filename="{step}"))
    module = _DigitsMLP()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=callbacks, enable_checkpointing=bool(every))
    # 1438 training images in batches of 128: 12 steps per epoch, the last one of 30
    trainer.fit(module, DigitsDataModule(batch_size=128, val_fraction=0.0, seed=3), ckpt_path=ckpt_path)
    return module, trainer


@pytest.mark.parametrize("step", [5, 12, 15])  # mid-epoch 1, end of epoch 1, mid-epoch 2
def test_recipe_data_resumes_mid_epoch_exactly(tmp_path, step):
    straight, t0 = _digits_fit(tmp_path / "straight", every=step)
    ckpt = tmp_path / "straight" / f"step={step}.ckpt"
    assert torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": (step - 1) // 12, "batches": (step - 1) % 12 + 1}
    ]
    resumed, t1 = _digits_fit(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert t1.global_step == t0.global_step == 24
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), (k, (a - b).abs().max().item())
    _assert_equal_nested(t0.optimizers[0].state_dict(), t1.optimizers[0].state_dict())


# --- the histogram callback's loggers: TensorBoard, CSV as the fallback ----------------------


def test_histogram_callback_writes_tensorboard_histograms(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_adafisher.diagnostics import FisherHistogramCallback
    from lightning_adafisher.diagnostics.preconditioner import preconditioner_diagonal

    class Snapshot(pl.Callback):  # the diagonal at each recorded step, read the callback's way
        def __init__(self):
            self.values = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (1, 3):
                diag = preconditioner_diagonal(trainer.optimizers[0], pl_module.net[2])
                self.values[trainer.global_step] = diag.detach().float().reshape(-1).double()

    snap = Snapshot()
    recorder = FisherHistogramCallback(every_n_steps=2, out_dir="", label="af")
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = _trainer(tmp_path, precision="64-true", max_epochs=1, logger=logger,
                       callbacks=[AdaFisherCallback(), recorder, snap])
    trainer.fit(MLPModule(variant="paper"), DataLoader(make_data(32), batch_size=8))  # 4 steps
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"histograms": 0})
    events.Reload()
    assert sorted(events.Tags()["histograms"]) == ["fisher_diagonal/af/net.0", "fisher_diagonal/af/net.2"]
    written = events.Histograms("fisher_diagonal/af/net.2")
    assert [h.step for h in written] == [1, 3]  # every_n_steps=2: after steps 1 and 3
    for h in written:
        expected = snap.values[h.step]
        assert h.histogram_value.num == 3 * 16 == expected.numel()
        assert h.histogram_value.min == pytest.approx(float(expected.min()), rel=1e-6)
        assert h.histogram_value.max == pytest.approx(float(expected.max()), rel=1e-6)
        assert h.histogram_value.sum == pytest.approx(float(expected.sum()), rel=1e-6)
        assert h.histogram_value.sum_squares == pytest.approx(float(expected.square().sum()), rel=1e-6)
        assert sum(h.histogram_value.bucket) == 48
    assert not (tmp_path / "tb" / "version_0" / "metrics.csv").exists()


def test_histogram_callback_logs_summaries_to_csv_without_histograms(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lightning_adafisher.diagnostics import FisherHistogramCallback

    recorder = FisherHistogramCallback(every_n_steps=2, out_dir="", label="af")
    trainer = _trainer(tmp_path, precision="64-true", max_epochs=1, logger=CSVLogger(str(tmp_path)),
                       callbacks=[AdaFisherCallback(), recorder])
    trainer.fit(MLPModule(variant="paper"), DataLoader(make_data(32), batch_size=8))
    rows = list(csv.DictReader(next(Path(tmp_path).rglob("metrics.csv")).open()))
    for layer in ("net.0", "net.2"):
        logged = [(int(r["step"]), float(r[f"fisher_diagonal/af/{layer}/mean"])) for r in rows
                  if r.get(f"fisher_diagonal/af/{layer}/mean")]
        assert logged == [(step, pytest.approx(s["mean"], rel=1e-12)) for step, s in recorder.records[layer]]
        assert [step for step, _ in logged] == [1, 3]
        last = next(r for r in rows if r["step"] == "3" and r.get(f"fisher_diagonal/af/{layer}/q50"))
        assert float(last[f"fisher_diagonal/af/{layer}/q50"]) == pytest.approx(recorder.records[layer][-1][1]["q50"])
