"""``bench speed`` and ``bench quality`` run end to end on tiny configurations and write
well-formed JSON. Benchmarks are measurements, not timed tests: nothing here asserts on speed."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightning_adafisher import bench
from lightning_adafisher.bench import peers as bench_peers
from lightning_adafisher.bench.speed import MODELS

ROW_KEYS = {
    "optimizer", "median_step_ms", "mean_step_ms", "ratio_to_baseline", "mean_ratio_to_baseline",
    "state_bytes", "state_ratio_to_baseline", "workspace_bytes", "peak_step_bytes",
    "optimizer_step_ms", "statistics_ms", "component_ratio_to_baseline",
    "ops_per_step", "ops_max", "ops_ratio_to_baseline",
}


def _check_speed(result: dict, model: str, batch_size: int, baseline: str) -> None:
    assert result["benchmark"] == "speed"
    assert result["model"] == model and result["batch_size"] == batch_size
    assert result["baseline"] == baseline
    names = [row["optimizer"] for row in result["rows"]]
    assert names[0] == baseline and "fwd_bwd_only" in names
    assert any(name.startswith("adafisher") for name in names)
    for row in result["rows"]:
        assert set(row) == ROW_KEYS
        assert row["median_step_ms"] > 0 and math.isfinite(row["ratio_to_baseline"])
        assert row["peak_step_bytes"] is None  # measured on CUDA only
        name = row["optimizer"]
        if name == "fwd_bwd_only" or name.startswith(("po_", "asdl_")):  # peers: whole steps only
            assert row["optimizer_step_ms"] is None and row["component_ratio_to_baseline"] is None
        else:
            assert row["optimizer_step_ms"] > 0 and row["component_ratio_to_baseline"] > 0
        if name.startswith("adafisher"):
            # k1 gathers statistics on both measured steps; k10 on neither (steps 2-3 of 3)
            every_step = name.endswith("_k1") or "_k1_" in name
            assert row["statistics_ms"] > 0 if every_step else row["statistics_ms"] == 0.0
        elif name == baseline:
            assert row["statistics_ms"] is None
            assert row["component_ratio_to_baseline"] == pytest.approx(1.0)
        if row["optimizer"].startswith("adafisher") and "_eigen_" not in name:
            # one moment plus factor vectors: about half of Adam's two moments
            assert 0.4 < row["state_ratio_to_baseline"] < 0.75
        elif "_eigen_" in name:
            # two moments plus full factors and their eigenvectors: more than Adam's
            assert row["state_ratio_to_baseline"] > 1.0


def _speed_args(tmp_path, *extra: str) -> list[str]:
    return ["speed", "--repeats", "2", "--warmup", "1", "--threads", "1",
            "--device", "cpu", "--out", str(tmp_path / "speed.json"), *extra]


def test_speed_tiny_cnn_writes_json(tmp_path, capsys):
    bench.main(_speed_args(tmp_path, "--model", "tiny", "--batch-size", "4", "--image-size", "8"))
    result = json.loads((tmp_path / "speed.json").read_text())
    _check_speed(result, "tiny", 4, "adam_fused")
    assert "adam_fused" in capsys.readouterr().out


def test_op_counter_skips_views_allocations_and_metadata():
    from lightning_adafisher.bench.ops import count_ops

    x = torch.randn(4, 3)
    counter = count_ops(lambda: (x.view(-1).add(1.0), x.t().sum(), torch.empty(3), x.detach().size()))
    assert dict(counter.counts) == {"add": 1, "sum": 1}
    assert counter.total == 2


def test_cuda_code_path_switches_to_foreach_and_restores():
    from lightning_adafisher import functional
    from lightning_adafisher.bench.ops import cuda_code_path
    from lightning_adafisher.optim import AdaFisher

    opt = AdaFisher(torch.nn.Linear(3, 2), variant="paper")
    before = functional._without_temporary
    with cuda_code_path([opt, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)]):
        assert opt.param_groups[0]["foreach"] is True and opt.defer_skip_check is True
        assert functional._without_temporary(torch.zeros(1 << 21)) is False
    assert opt.param_groups[0]["foreach"] is None and opt.defer_skip_check is None
    assert functional._without_temporary is before


def test_speed_count_ops(tmp_path, capsys):
    bench.main(_speed_args(tmp_path, "--model", "tiny", "--batch-size", "4", "--image-size", "8", "--no-peers",
                           "--count-ops", "--only", "adafisher_paper_k1,adafisher_paper_k10"))
    rows = {row["optimizer"]: row for row in json.loads((tmp_path / "speed.json").read_text())["rows"]}
    adam, plain = rows["adam_fused"], rows["fwd_bwd_only"]
    # fused Adam adds a handful of ops to forward+backward; the same every step
    assert 0 < adam["ops_max"] - plain["ops_max"] <= 4 and adam["ops_per_step"] == adam["ops_max"]
    assert adam["ops_ratio_to_baseline"] == 1.0
    k1, k10 = rows["adafisher_paper_k1"], rows["adafisher_paper_k10"]
    assert k1["ops_per_step"] > adam["ops_max"]  # statistics on every step
    assert k10["ops_per_step"] < k1["ops_per_step"]  # on one step in ten
    assert k1["ops_ratio_to_baseline"] == pytest.approx(k1["ops_max"] / adam["ops_max"])
    assert "compute ops per train step" in capsys.readouterr().out


class _Blocks(torch.nn.Module):
    """``depth`` blocks of one shape each: conv → BatchNorm → ReLU, then LayerNorm → Linear (with
    bias) → GELU over the map's positions as tokens."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        nn = torch.nn
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1, bias=False) for _ in range(depth))
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(depth))
        self.lns = nn.ModuleList(nn.LayerNorm(8) for _ in range(depth))
        self.lins = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        tokens = x.flatten(2).transpose(1, 2)
        for ln, lin in zip(self.lns, self.lins):
            tokens = torch.nn.functional.gelu(lin(ln(tokens)))
        return self.head(tokens.mean(1))


def _adafisher_extra_ops(depth: int) -> int:
    """Compute ops one AdaFisher (paper, statistics every step) train step dispatches on the
    code path CUDA runs, beyond the same model's plain forward+backward."""
    import warnings

    import torch.nn.functional as F

    from lightning_adafisher import AdaFisher
    from lightning_adafisher.bench.ops import count_ops, cuda_code_path

    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 5, (4,))
    plain, model = _Blocks(depth), _Blocks(depth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = AdaFisher(model, variant="paper")

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    def fwd_bwd():
        plain.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()

    with cuda_code_path([opt]):
        step()  # the first statistics step (first fold, cached constants)
        counted = count_ops(step).total
    return counted - count_ops(fwd_bwd).total


def test_adafisher_step_ops_are_bounded_and_do_not_grow_per_layer_at_the_step():
    """On a GPU a small step is bound by kernel launches: the hooks cost a few ops per layer
    (conv: Σx² and one bmm of G; BatchNorm and LayerNorm: the copy of the bias gradient they
    hold; Linear: Σx² and ΣG²), and everything at the step (the statistics' finishing ops,
    the fold, the update) is batched over layers of one shape. Deterministic op counts, not
    timing: 102 extra ops at depth 4, 9 more per added block (173 and 27 with the per-layer
    fold, update and finishing ops this bounds against)."""
    four, eight = _adafisher_extra_ops(4), _adafisher_extra_ops(8)
    assert four <= 102
    assert eight - four <= 4 * 9  # hooks only: conv 3, BatchNorm 1, LayerNorm 1, Linear 4


def test_speed_batch_size_sweep(tmp_path):
    bench.main(_speed_args(tmp_path, "--model", "tiny", "--batch-sizes", "2,4", "--image-size", "8"))
    result = json.loads((tmp_path / "speed.json").read_text())
    assert result["benchmark"] == "speed_sweep"
    assert [r["batch_size"] for r in result["results"]] == [2, 4]
    for r in result["results"]:
        _check_speed(r, "tiny", r["batch_size"], "adam_fused")


def test_speed_gpt_uses_adamw_baseline(tmp_path):
    bench.main(_speed_args(tmp_path, "--model", "gpt_tiny", "--batch-size", "2", "--context", "8"))
    result = json.loads((tmp_path / "speed.json").read_text())
    _check_speed(result, "gpt_tiny", 2, "adamw_fused")
    assert result["context"] == 8


def test_speed_rejects_bad_batch_sizes(tmp_path):
    with pytest.raises(SystemExit):
        bench.main(_speed_args(tmp_path, "--model", "tiny", "--batch-sizes", "2,x"))


def test_quality_quick_runs_every_default_workload_and_writes_json_markdown_and_plot(tmp_path, capsys):
    out, md, png = tmp_path / "quality.json", tmp_path / "quality.md", tmp_path / "curves.png"
    bench.main([
        "quality", "--quick", "--optimizers", "adamw,adafisherw_eigen_k1,adafisherw_paper_k1",
        "--out", str(out), "--markdown", str(md), "--plot", str(png),
    ])
    result = json.loads(out.read_text())
    assert result["benchmark"] == "quality"
    assert set(result["tasks"]) == {"digits_cnn", "digits_vit", "chargpt"}
    for name, task in result["tasks"].items():
        metric = "loss" if name == "chargpt" else "accuracy"
        assert task["metric"] == metric
        assert task["target"]["optimizer"] == "adamw"
        assert task["target"]["val"] == task["optimizers"]["adamw"]["val"]["mean"]
        assert set(task["optimizers"]) == {"adamw", "adafisherw_eigen_k1", "adafisherw_paper_k1"}
        for row in task["optimizers"].values():
            assert row["best_lr"] in (1e-3, 1e-2)
            assert set(row["tuning"]) == {"0.001", "0.01"}
            assert set(row["test"]) == {"mean", "std"}
            value = row["test"]["mean"]
            assert (0.0 <= value <= 1.0) if metric == "accuracy" else value > 0.0
            steps = [point["step"] for point in row["curves"][0]]
            assert steps == sorted(steps) and steps[-1] == task["info"]["steps"]
            assert row["to_target"]["runs"] == 1
        # AdamW reaches its own final metric, at the latest at its last evaluation
        assert task["optimizers"]["adamw"]["to_target"]["reached"] == 1
    table = md.read_text()
    assert "| adafisherw_eigen_k1 |" in table and "steps to target" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "### chargpt" in capsys.readouterr().out


def test_warmup_cosine_schedule():
    from lightning_adafisher.bench.quality import warmup_cosine

    factors = [warmup_cosine(k, 100) for k in range(100)]
    assert factors[:5] == [0.2, 0.4, 0.6, 0.8, 1.0]  # 5% warm-up
    assert factors[5] == 1.0 and 0.0 <= factors[-1] < 1e-3
    assert all(a >= b for a, b in zip(factors[5:], factors[6:]))


def test_speed_times_installed_peers_and_reports_the_ones_that_fail(tmp_path, monkeypatch):
    """Peers from PyPI are rows like any other; one that cannot train the model is listed under
    ``skipped`` with its error instead of ending the benchmark."""
    def broken(model, batch):
        opt = bench_peers.torch.optim.SGD(model.parameters(), lr=0.1)

        def step():
            raise RuntimeError("derivative for this op is not implemented")

        return opt, step

    installed = bench_peers.peers()
    monkeypatch.setattr(bench_peers, "peers", lambda: {**installed, "broken_peer": broken})
    bench.main(_speed_args(tmp_path, "--model", "tiny", "--batch-size", "4", "--image-size", "8"))
    result = json.loads((tmp_path / "speed.json").read_text())
    names = [row["optimizer"] for row in result["rows"]]
    assert set(installed) <= set(names) and "broken_peer" not in names
    assert result["skipped"] == {"broken_peer": "step 1: RuntimeError: derivative for this op is not implemented"}
    bench.main(_speed_args(tmp_path, "--model", "tiny", "--batch-size", "4", "--image-size", "8", "--no-peers"))
    names = [row["optimizer"] for row in json.loads((tmp_path / "speed.json").read_text())["rows"]]
    assert not set(installed) & set(names)


def test_peers_of_the_test_environment_are_installed():
    """The test extra installs pytorch-optimizer and asdfghjkl, so the test above covers them."""
    assert set(bench_peers.peers()) == {
        "po_soap_k10", "po_shampoo_k10", "po_adahessian", "asdl_kfac_k10", "asdl_shampoo_k10",
    }


def test_cifar_resnet18_is_the_recipes_model_with_a_32x32_first_stage():
    """`bench speed --model cifar_resnet18` times the network the CIFAR recipes train (3×3 stem,
    no max-pool), not torchvision's ImageNet ResNet-18 (`resnet18`, first stage at 8×8)."""
    import torch
    from torch import nn

    from lightning_adafisher.tasks.models import build_image_model

    model, recipe = MODELS["cifar_resnet18"](), build_image_model("cifar_resnet18", 10)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [(n, p.shape) for n, p in recipe.named_parameters()]
    stage_one = {}
    for name, m in (("cifar", model), ("imagenet", MODELS["resnet18"]())):
        m.layer1.register_forward_hook(lambda mod, a, out, name=name: stage_one.update({name: out.shape[-2:]}))
        with torch.no_grad():
            m.eval()(torch.zeros(1, 3, 32, 32))
    assert stage_one == {"cifar": (32, 32), "imagenet": (8, 8)}
    assert isinstance(model.maxpool, nn.Identity)


def test_updates_reports_rms_and_spread_per_layer_type(tmp_path, capsys):
    out = tmp_path / "updates.json"
    bench.main(["updates", "--steps", "3", "--subset", "60", "--optimizers", "adamw,adafisherw_paper_k1",
                "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["benchmark"] == "updates" and result["steps"] == 3
    cnn, gpt = result["tasks"]["digits_cnn"], result["tasks"]["chargpt"]
    assert set(cnn["adamw"]) == {"BatchNorm", "Conv2d", "Linear"}
    assert set(gpt["adamw"]) == {"Embedding", "LayerNorm", "Linear"}
    for rows in (cnn, gpt):
        for row in rows.values():
            for kind in row.values():
                assert kind["rms"] > 0 and kind["spread"] >= 0
    # Adam's first steps move every entry by about lr: Δp/lr has RMS near (and below) 1
    assert all(0.3 < kind["rms"] <= 1.0 for kind in cnn["adamw"].values())
    assert "| adafisherw_paper_k1 |" in capsys.readouterr().out


def test_speed_only_times_the_named_optimizers_and_the_baseline(tmp_path):
    bench.main(_speed_args(tmp_path, "--model", "tiny", "--batch-size", "4", "--image-size", "8",
                           "--no-peers", "--only", "adafisherw_eigen_k10"))
    names = [row["optimizer"] for row in json.loads((tmp_path / "speed.json").read_text())["rows"]]
    assert names == ["adam_fused", "adafisherw_eigen_k10", "fwd_bwd_only"]
    with pytest.raises(ValueError, match=r"Invalid --only: \['nope'\]"):
        bench.main(_speed_args(tmp_path, "--model", "tiny", "--only", "nope"))


def test_bench_help_shows_defaults_and_no_markup(capsys):
    """``--help`` of every benchmark shows its defaults and plain text, not reStructuredText."""
    for argv in (["--help"], ["speed", "--help"], ["quality", "--help"], ["updates", "--help"]):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert stop.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: lightning-adafisher bench"), text[:200]
        assert "``" not in text and ":mod:" not in text
        if argv[0] != "--help":
            assert "(default: " in text
    with pytest.raises(SystemExit):
        bench.main(["updates", "--help"])
    assert "--lr LR" in (text := capsys.readouterr().out) and "(default: 0.001)" in text


def test_console_script_help_lists_every_subcommand():
    """``lightning-adafisher --help`` lists Lightning's subcommands and this package's own."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    exe = Path(sys.executable).with_name("lightning-adafisher")
    env = dict(os.environ, PYTHONPATH=str(root))
    run = subprocess.run([str(exe), "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "{fit,validate,test,predict,bench,diagnostics}" in run.stdout
    for name in ("fit", "validate", "test", "predict", "bench", "diagnostics"):
        assert f"\n    {name} " in run.stdout, name
