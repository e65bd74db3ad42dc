"""Write recipes/**/*.yaml from one table of the paper's settings (run from the repo root).

The YAML files are the product (users copy and edit them); this script only keeps the ~40 of
them consistent. ``tests/test_recipes.py`` checks that the committed files equal its output.
Sources: paper Appendix D.2.1 (weight decay, cosine, batch 256), Table 8 (epochs), Table 9
(learning rates), D.2.2 (augmentation), D.3 + Tables 16/17 (GPT-1).
"""

from __future__ import annotations

import sys
from pathlib import Path

CNNS = {
    "resnet18": "cifar_resnet18",
    "resnet50": "cifar_resnet50",
    "resnet101": "cifar_resnet101",
    "densenet121": "cifar_densenet121",
    "mobilenetv3": "cifar_mobilenet_v3",
}

# optimizer name -> (class_path, init_args with comments, epochs (Table 8), note)
CNN_OPTIMIZERS = {
    "adafisher": (
        "lightning_adafisher.AdaFisher",
        [
            ("lr", "0.001", "float: Table 9, CNNs"),
            ("gamma", "0.92", "float: factor EMA decay, the paper's tuned value (D.2.1)"),
            ("damping", "0.001", "float: Tikhonov damping λ (D.2.1)"),
            ("update_interval", "1", "int: statistics every step, as in the paper"),
            ("variant", "paper", "str: paper (Eq. 3-4) | reference (authors' code)"),
        ],
        200,
        "AdaFisher (coupled L2 decay) was used for all CNNs in the paper",
    ),
    "adafisherw_eigen": (
        "lightning_adafisher.AdaFisherW",
        [
            ("lr", "0.003", "float: Adam-scale; not tuned on CIFAR (docs/benchmarks.md)"),
            ("beta", "0.9", "float: first-moment decay"),
            ("beta2", "0.95", "float: second-moment decay (in the eigenbasis)"),
            ("gamma", "0.92", "float: factor EMA decay"),
            ("update_interval", "10", "int: full factors every 10 steps"),
            ("eigen_interval", "10", "int: eigendecomposition every 10 steps"),
            ("max_factor_size", "2048", "int: larger sides keep the identity (Adam there)"),
            ("variant", "eigen", "str: Adam in the eigenbasis of the Kronecker factors"),
        ],
        200,
        "AdaFisherW, eigenbasis variant (not in the paper; docs/numerics.md)",
    ),
    "sgd": (
        "torch.optim.SGD",
        [
            ("lr", "0.1", "float: Table 9, CNNs"),
            ("momentum", "0.9", "float: tuned in {0.1..1.0} by the paper (value not reported; 0.9 is standard)"),
            ("nesterov", "false", "bool"),
        ],
        226,
        "WCT-matched to 200 AdaFisher epochs (Table 8)",
    ),
    "adam": (
        "torch.optim.Adam",
        [("lr", "0.001", "float: Table 9, CNNs")],
        210,
        "WCT-matched to 200 AdaFisher epochs (Table 8)",
    ),
}

HEADER = "# {title}\n# Run: lightning-adafisher fit --config {path}\n# {note}\n"


def _line(key: str, value: object, comment: str, indent: int = 4) -> str:
    return f"{' ' * indent}{key}: {value}".ljust(36) + f"# {comment}\n"


def _args(args: list[tuple[str, str, str]], weight_decay: str, indent: str = "    ") -> str:
    lines = [f"{indent}{key}: {value}".ljust(36) + f"# {comment}" for key, value, comment in args]
    lines.append(f"{indent}weight_decay: {weight_decay}".ljust(36) + "# float: D.2.1")
    return "\n".join(lines)


def _trainer(epochs: int, monitor: str, mode: str, devices: int = 1, strategy: str = "auto",
             precision: str = "32-true", extra: str = "", accelerator: str = "auto",
             log_every: int = 50) -> str:
    return (
        _line("seed_everything", 0, "int: seed for initialisation and data order", 0)
        + "trainer:\n"
        + _line("accelerator", accelerator, "str: auto | gpu | cpu", 2)
        + _line("devices", devices, "int: devices per node (the paper: 1 GPU)", 2)
        + _line("num_nodes", 1, "int: nodes (multi-node: see recipes/README.md)", 2)
        + _line("strategy", strategy, "str: auto | ddp", 2)
        + _line("precision", precision, "str: 32-true | 16-mixed | bf16-mixed", 2)
        + _line("max_epochs", epochs, "int: Table 8/16 epoch count for this optimizer", 2)
        + _line("max_time", "null", 'str|null: "DD:HH:MM:SS" cap for equal-wall-clock comparisons', 2)
        + _line("log_every_n_steps", log_every, "int", 2)
        + extra
        + "  callbacks:\n"
        + "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n      init_args:\n"
        + _line("monitor", monitor, "str: metric that picks the best checkpoint", 8)
        + _line("mode", mode, "str: max | min", 8)
        + _line("save_last", "true", "bool: also keep the last checkpoint for resuming", 8)
        + "    - class_path: lightning.pytorch.callbacks.LearningRateMonitor\n      init_args:\n"
        + _line("logging_interval", "epoch", "str", 8)
    )


def _scheduler(epochs: int) -> str:
    return (
        "lr_scheduler:\n  class_path: torch.optim.lr_scheduler.CosineAnnealingLR\n  init_args:\n"
        + _line("T_max", epochs, "int: cosine to 0 over the run, stepped per epoch (D.2.1)")
    )


def cifar(dataset: str, cnn: str, opt: str) -> tuple[str, str]:
    classes = 10 if dataset == "cifar10" else 100
    class_path, args, epochs, note = CNN_OPTIMIZERS[opt]
    wd = "0.00001" if cnn == "mobilenetv3" else "0.0005"
    if opt == "adafisherw_eigen":
        wd = "0.05"  # decoupled: applied as lr·wd per step (AdamW's scale)
    path = f"recipes/{dataset}/{cnn}_{opt}.yaml"
    text = HEADER.format(
        title=f"{dataset.upper()} · {cnn} (CIFAR stem) · {class_path.rsplit('.', 1)[-1]}",
        path=path, note=note,
    )
    text += _trainer(epochs, "val_acc", "max")
    text += "model:\n  class_path: lightning_adafisher.tasks.ImageClassifier\n  init_args:\n"
    text += _line("model", CNNS[cnn], "str: network (tasks/models.py)")
    text += _line("num_classes", classes, "int")
    text += "data:\n  class_path: lightning_adafisher.tasks.CIFARDataModule\n  init_args:\n"
    text += _line("root", "data/cifar", "str: holds cifar-10-batches-py/ or cifar-100-python/")
    text += _line("dataset", dataset, "str: cifar10 | cifar100")
    text += """    batch_size: 256                 # int: D.2.2
    num_workers: 4                  # int: data loader processes
    cutout: true                    # bool: Cutout 16 px (D.2.2)
"""
    decay_note = "# float: decoupled (AdamW scale); not tuned on CIFAR" if opt == "adafisherw_eigen" else "# float: D.2.1"
    text += f"optimizer:\n  class_path: {class_path}\n  init_args:\n{_args(args, wd).replace('# float: D.2.1', decay_note)}\n"
    text += _scheduler(epochs)
    return path, text


def imagenet(opt: str, batch: int) -> tuple[str, str]:
    devices = batch // 256
    class_path, args, _, _ = CNN_OPTIMIZERS[opt]
    epochs = 90
    path = f"recipes/imagenet/resnet50_{opt}_b{batch}.yaml"
    note = (
        "Batch 256 on one GPU (the paper's setting)" if devices == 1
        else f"Data-parallel: {devices} GPUs × 256 = global batch {batch} (paper Table 3, distributed AdaFisher)"
    )
    text = HEADER.format(title=f"ImageNet-1k · ResNet-50 · {class_path.rsplit('.', 1)[-1]} · batch {batch}", path=path, note=note)
    text += _trainer(epochs, "val_acc", "max", devices=devices, strategy="ddp" if devices > 1 else "auto")
    text += """model:
  class_path: lightning_adafisher.tasks.ImageClassifier
  init_args:
    model: resnet50                 # str: torchvision ResNet-50 (ImageNet stem)
    num_classes: 1000               # int
data:
  class_path: lightning_adafisher.tasks.ImageNetDataModule
  init_args:
    root: data/imagenet             # str: holds train/ and val/ ImageFolder trees
    batch_size: 256                 # int: per device (global = devices × 256)
    num_workers: 8                  # int
    image_size: 224                 # int: RandomResizedCrop / CenterCrop size (D.2.2)
    resize_size: 256                # int: eval resize before the centre crop (D.2.2)
"""
    text += f"optimizer:\n  class_path: {class_path}\n  init_args:\n{_args(args, '0.0001')}\n"
    text += _scheduler(epochs)
    return path, text


def gpt(dataset: str, opt: str) -> tuple[str, str]:
    if opt == "adafisherw":
        class_path, lr, epochs = "lightning_adafisher.AdaFisherW", "0.0001", 50
        extra_args = [
            ("lr", lr, "float: Table 17"),
            ("gamma", "0.92", "float: factor EMA decay"),
            ("damping", "0.001", "float: Tikhonov damping λ"),
            ("update_interval", "1", "int: statistics every step"),
            ("variant", "paper", "str: the paper's algorithm (Eq. 3-4)"),
        ]
    elif opt == "adafisherw_eigen":
        class_path, lr, epochs = "lightning_adafisher.AdaFisherW", "0.0001", 50
        extra_args = [
            ("lr", lr, "float: Adam-scale; not tuned on this task"),
            ("beta2", "0.95", "float: second-moment decay (in the eigenbasis)"),
            ("gamma", "0.92", "float: factor EMA decay"),
            ("update_interval", "10", "int: full factors every 10 steps"),
            ("eigen_interval", "10", "int: eigendecomposition every 10 steps"),
            ("max_factor_size", "2048", "int: larger sides (the MLP's 3072) keep the identity"),
            ("variant", "eigen", "str: Adam in the eigenbasis of the Kronecker factors"),
        ]
    else:
        class_path, lr, epochs = "torch.optim.AdamW", "0.00005", 55
        extra_args = [("lr", lr, "float: Table 17 (ElNokrashy et al. 2022)")]
    name = {"wikitext2": "WikiText-2", "ptb": "PTB"}[dataset]
    path = f"recipes/lm/gpt1_{dataset}_{opt}.yaml"
    text = HEADER.format(
        title=f"{name} · GPT-1, 4 layers (paper D.3) · {class_path.rsplit('.', 1)[-1]}",
        path=path, note="Test perplexity is reported at the best validation checkpoint (the CLI tests after fit)",
    )
    text += _trainer(epochs, "val_ppl", "min")
    text += """model:
  class_path: lightning_adafisher.tasks.CausalLM
  init_args:
    vocab_size: null                # int|null: null = the data module's tokenizer size
    context_length: 256             # int: tokens per sequence
    n_layer: 4                      # int: D.3.2 (GPT-1 has 12; the paper uses 4)
    n_embd: 768                     # int
    n_head: 12                      # int
    d_ff: 3072                      # int: MLP width (GELU)
    dropout: 0.1                    # float
    pretrained_embeddings: null     # str|null: local openai-gpt checkpoint (paper: pretrained, frozen)
    freeze_pretrained: true         # bool: freeze loaded embeddings (D.3.2)
data:
  class_path: lightning_adafisher.tasks.TextDataModule
  init_args:
"""
    text += _line("dataset", dataset, "str: wikitext2 | ptb")
    text += """    root: data/text                 # str: see recipes/README.md for the expected layout
    tokenizer_path: null            # str|null: GPT-1 BPE (vocab.json + merges.txt); null = train a BPE
    bpe_vocab_size: 8000            # int: size of the BPE trained when tokenizer_path is null
    context_length: 256             # int: must equal model.context_length
    batch_size: 32                  # int: D.3.3
"""
    text += f"optimizer:\n  class_path: {class_path}\n  init_args:\n{_args(extra_args, '0.1')}\n"
    text = text.replace("# float: D.2.1", "# float: D.3.3")
    text += _scheduler(epochs)
    return path, text


def quickstart(opt: str) -> tuple[str, str]:
    if opt == "adafisherw":
        path, class_path = "recipes/quickstart.yaml", "lightning_adafisher.AdaFisherW"
        args = [
            ("lr", "0.003", "float: the eigen variant's default"),
            ("gamma", "0.92", "float: factor EMA decay"),
            ("update_interval", "1", "int: statistics every step"),
            ("variant", "eigen", "str: eigen (default) | paper (Eq. 3-4) | reference"),
        ]
    else:
        path, class_path = "recipes/quickstart_adamw.yaml", "torch.optim.AdamW"
        args = [("lr", "0.001", "float")]
    epochs = 20
    text = HEADER.format(
        title=f"Offline quickstart · small CNN on scikit-learn's handwritten digits · {class_path.rsplit('.', 1)[-1]}",
        path=path, note="Real data that ships with scikit-learn; about a minute on 2 CPU cores; prints test accuracy",
    )
    text += _trainer(
        epochs, "val_acc", "max", accelerator="cpu", log_every=10,
        extra=_line("enable_progress_bar", "false", "bool: keep the log readable", 2),
    ).replace("int: Table 8/16 epoch count for this optimizer", "int: epochs (about a minute on 2 CPU cores)")
    text += """model:
  class_path: lightning_adafisher.tasks.ImageClassifier
  init_args:
    model: digits_cnn               # str: 2 conv + BN layers, 2 linear layers
    num_classes: 10                 # int
data:
  class_path: lightning_adafisher.tasks.DigitsDataModule
  init_args:
    batch_size: 64                  # int
    val_fraction: 0.1               # float: held out from the training split
    test_fraction: 0.2              # float: test split reported after fit
    seed: 0                         # int: split seed
"""
    text += f"optimizer:\n  class_path: {class_path}\n  init_args:\n{_args(args, '0.0005').replace('# float: D.2.1', '# float')}\n"
    text += _scheduler(epochs)
    return path, text


def all_recipes() -> dict[str, str]:
    recipes = dict(quickstart(o) for o in ("adafisherw", "adamw"))
    for dataset in ("cifar10", "cifar100"):
        for cnn in CNNS:
            for opt in CNN_OPTIMIZERS:
                path, text = cifar(dataset, cnn, opt)
                recipes[path] = text
    for opt, batch in (("adafisher", 256), ("adafisher", 512), ("adafisher", 1024), ("adam", 256), ("sgd", 256)):
        path, text = imagenet(opt, batch)
        recipes[path] = text
    for dataset in ("wikitext2", "ptb"):
        for opt in ("adafisherw", "adafisherw_eigen", "adamw"):
            path, text = gpt(dataset, opt)
            recipes[path] = text
    return recipes


def main(root: str = ".") -> None:
    for path, text in all_recipes().items():
        target = Path(root) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    print(f"wrote {len(all_recipes())} recipes under {Path(root) / 'recipes'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
