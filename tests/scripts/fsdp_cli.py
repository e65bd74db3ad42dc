"""``lightning-adafisher fit`` with ModelParallelStrategy: the YAML's optimizer trains the
parameters that ``configure_model``'s ``fully_shard`` left (pytorch-lightning#19110).

``python fsdp_cli.py CONFIG OUT``: rank 0 writes ``result.json`` (whether the optimizer holds the
model's sharded parameters, how far they moved).
"""

import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

from lightning_adafisher import fsdp  # noqa: E402
from lightning_adafisher.cli import run_cli  # noqa: E402


def main() -> None:
    config, out = sys.argv[1], sys.argv[2]
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cli = run_cli([
        "fit", "--config", config, "--test_after_fit", "false", "--trainer.default_root_dir", out,
    ])
    model, opt = cli.model, cli.trainer.optimizers[0]
    trained = [p for group in opt.param_groups for p in group["params"]]
    own = list(model.parameters())
    result = {
        "optimizer": type(opt).__name__,
        "holds_model_parameters": len(trained) == len(own) and all(a is b for a, b in zip(trained, own)),
        "sharded": all(fsdp.is_sharded(p) for p in trained),
        "steps": opt.state["adafisher"]["steps"],
        "factors": sum("factor_h" in opt.state[p] for p in trained),
    }
    if cli.trainer.global_rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "result.json"), "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
