"""Networks the recipes name: CIFAR-style CNN variants, a digits CNN, and the 4-layer GPT-1.

CIFAR variants follow the usual adaptation of ImageNet networks to 32×32 inputs: the stem
convolution becomes 3×3 with stride 1 and the stem max-pool is dropped, so the first stage sees
the full-resolution image.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["build_image_model", "IMAGE_MODELS", "DigitsCNN", "GPT", "gpt1_block_parameter_count"]


def _cifar_resnet(name: str, num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(name, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _cifar_densenet121(num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.densenet121(num_classes=num_classes)
    model.features.conv0 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.features.pool0 = nn.Identity()
    return model


def _cifar_mobilenet_v3(num_classes: int) -> nn.Module:
    import torchvision

    model = torchvision.models.mobilenet_v3_large(num_classes=num_classes)
    model.features[0][0].stride = (1, 1)  # keep 32×32 in the first stage
    return model


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8×8 handwritten digits (the offline quickstart)."""

    def __init__(self, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.ReLU(inplace=True), nn.Linear(64, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


IMAGE_MODELS = (
    "cifar_resnet18", "cifar_resnet50", "cifar_resnet101", "cifar_densenet121",
    "cifar_mobilenet_v3", "digits_cnn", "<any torchvision classification model, e.g. resnet50>",
)


def build_image_model(name: str, num_classes: int) -> nn.Module:
    """A classifier by name: the CIFAR variants above, ``digits_cnn``, or any torchvision model."""
    if name in ("cifar_resnet18", "cifar_resnet50", "cifar_resnet101"):
        return _cifar_resnet(name.removeprefix("cifar_"), num_classes)
    if name == "cifar_densenet121":
        return _cifar_densenet121(num_classes)
    if name == "cifar_mobilenet_v3":
        return _cifar_mobilenet_v3(num_classes)
    if name == "digits_cnn":
        return DigitsCNN(num_classes)
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"Invalid model: {name!r} (expected one of {', '.join(IMAGE_MODELS)})")
    return torchvision.models.get_model(name, num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# GPT-1 (Radford et al. 2018), 4 layers as in the paper's appendix D.3
# --------------------------------------------------------------------------------------------


class Block(nn.Module):
    """Post-LN transformer block: ``x = LN(x + attn(x)); x = LN(x + mlp(x))`` (GPT-1's order)."""

    def __init__(self, d: int, heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"Invalid n_head: {heads} does not divide n_embd {d}")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_1 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d_ff)
        self.fc_out = nn.Linear(d_ff, d)
        self.ln_2 = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        x = self.ln_1(x + y)
        x = self.ln_2(x + self.dropout(self.fc_out(F.gelu(self.fc(x)))))
        return x


class GPT(nn.Module):
    """Decoder-only transformer with GPT-1's layout; the output head is tied to the token
    embedding (computed as ``h @ E_tokᵀ``, so one parameter serves both).

    Defaults are the paper's 4-layer GPT-1: d=768, 12 heads, MLP 3072, context 256.
    """

    def __init__(
        self, vocab_size: int, context_length: int = 256, n_layer: int = 4, n_embd: int = 768,
        n_head: int = 12, d_ff: int = 3072, dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.context_length = context_length
        self.tokens = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Embedding(context_length, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, d_ff, dropout) for _ in range(n_layer))
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.context_length:
            raise ValueError(f"sequence of {t} tokens exceeds the context length {self.context_length}")
        pos = torch.arange(t, device=ids.device)
        x = self.drop(self.tokens(ids) + self.positions(pos))
        for block in self.blocks:
            x = block(x)
        return x @ self.tokens.weight.T

    def load_pretrained_embeddings(self, path: str, freeze: bool = True) -> None:
        """Copy GPT-1 token/position embeddings from a local checkpoint and optionally freeze them.

        Accepts a ``torch.save``-d state dict or a Hugging Face model directory/file
        (``pytorch_model.bin`` or ``model.safetensors``) of ``openai-gpt``: the keys
        ``[transformer.]tokens_embed.weight`` and ``[transformer.]positions_embed.weight``.
        """
        state = _load_state_dict(path)
        tok = _find(state, "tokens_embed.weight", path)
        pos = _find(state, "positions_embed.weight", path)
        if tok.shape != self.tokens.weight.shape:
            raise ValueError(
                f"pretrained token embeddings in {path} have shape {tuple(tok.shape)}, the model "
                f"{tuple(self.tokens.weight.shape)}: use the GPT-1 BPE tokenizer (vocab 40478) "
                "with pretrained embeddings"
            )
        with torch.no_grad():
            self.tokens.weight.copy_(tok)
            self.positions.weight.copy_(pos[: self.context_length])
        self.tokens.weight.requires_grad_(not freeze)
        self.positions.weight.requires_grad_(not freeze)


def _load_state_dict(path: str) -> dict[str, Tensor]:
    import os

    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.exists(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
        else:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"pretrained GPT-1 checkpoint not found: {path}. Download openai-gpt "
            "(https://huggingface.co/openai-community/openai-gpt) and pass its directory."
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _find(state: dict[str, Tensor], suffix: str, path: str) -> Tensor:
    for key, value in state.items():
        if key.endswith(suffix):
            return value
    raise KeyError(f"{path} has no '*{suffix}' entry (is it an openai-gpt checkpoint?)")


def gpt1_block_parameter_count(n_embd: int = 768, d_ff: int = 3072) -> int:
    """Trainable parameters of one block, by formula (the paper's 4 blocks: 28,351,488)."""
    attn = n_embd * 3 * n_embd + 3 * n_embd + n_embd * n_embd + n_embd
    mlp = n_embd * d_ff + d_ff + d_ff * n_embd + n_embd
    return attn + mlp + 4 * n_embd


