"""A tiny CNN for scikit-learn's 8x8 digits, and its Lightning wrapper (the module trained)."""

from __future__ import annotations

import torch
from torch import nn


class DigitsCNN(nn.Module):
    """conv(1->2, 3x3) -> ReLU -> conv(2->4, 3x3) -> ReLU -> linear(256 -> 10)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        return self.fc(h.flatten(1))


def build() -> nn.Module:
    """The factory ``ingest --model`` calls."""
    return DigitsCNN()
