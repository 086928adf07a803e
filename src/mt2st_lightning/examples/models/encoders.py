"""Shared encoders for the example models. Each maps an image batch ``(B, C, H, W)`` to features
``(B, out_features)``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["ConvEncoder", "MLPEncoder", "TransformerEncoder"]


class MLPEncoder(nn.Module):
    """Flatten, then ``depth`` Linear+ReLU layers of width ``hidden``."""

    def __init__(self, in_features: int = 64, hidden: int = 128, depth: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = hidden
        self.net = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvEncoder(nn.Module):
    """A small CNN: ``len(channels)`` conv blocks (3x3 conv, BatchNorm, ReLU), then global average pooling."""

    def __init__(self, in_channels: int = 1, channels: tuple[int, ...] = (32, 64)) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        width = in_channels
        for c in channels:
            blocks += [nn.Conv2d(width, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            width = c
        self.net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TransformerEncoder(nn.Module):
    """A ViT-style encoder: each image row is a token (``H`` tokens of ``C*W`` features), mean-pooled."""

    def __init__(
        self, image_size: int = 8, in_channels: int = 1, d_model: int = 128, nhead: int = 4, num_layers: int = 2,
        dim_feedforward: int = 256, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(in_channels * image_size, d_model)
        self.pos = nn.Parameter(torch.zeros(1, image_size, d_model))
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.out_features = d_model

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = self.embed(x.permute(0, 2, 1, 3).reshape(b, h, c * w)) + self.pos
        return self.encoder(tokens).mean(dim=1)
