"""Model factories the capture-ingest tests name with --model (real user-style modules)."""

from __future__ import annotations

import torch
from torch import nn


def build_mlp(config=None) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))


def build_mlp64() -> nn.Module:
    return build_mlp().double()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2)
        self.head = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


def build_cnn() -> nn.Module:
    return SmallCNN()


def not_a_model():
    return "definitely not a module"


class TokenModel(nn.Module):
    """Embedding -> Linear -> Linear over (batch, seq) token ids: one sample per (sequence, position)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)
        self.out = nn.Linear(3, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(self.emb(x))))


def build_token_model() -> nn.Module:
    return TokenModel()


def build_from_config(config) -> nn.Module:
    """An HF-style factory: the architecture comes from the checkpoint's config.json."""
    torch.manual_seed(0)
    h = config["hidden_size"]
    return nn.Sequential(nn.Linear(5, h), nn.Tanh(), nn.Linear(h, 3))
