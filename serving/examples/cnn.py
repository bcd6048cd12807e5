"""A tiny CNN with BatchNorm (non-default eps, so eps handling is exercised)."""

from __future__ import annotations

import torch
from torch import nn


class TinyCNN(nn.Module):
    """Images ``[B, 3, 32, 32]`` (float32) -> class logits ``[B, n_classes]``."""

    def __init__(self, width: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-3)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width, eps=1e-3)
        self.head = nn.Linear(2 * width, n_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(image)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def tiny_cnn(width: int = 16, n_classes: int = 10) -> TinyCNN:
    """The example CNN."""
    return TinyCNN(width, n_classes)
