"""``ResNetEncoder``: a small residual CNN (ResNet's basic blocks) for small images, pooled to one vector."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["BasicBlock", "ResNetEncoder"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and an identity (or 1x1 projection) shortcut, as in ResNet-18."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNetEncoder(nn.Module):
    """A 3x3 stem (``stem_stride`` 2 halves the resolution at once: 4x fewer FLOPs in every later layer), then one
    stage per entry of ``channels`` (``blocks`` basic blocks each; every stage after the first halves the
    resolution), then global average pooling: ``(B, C, H, W) -> (B, channels[-1])``."""

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (32, 64, 128), blocks: int = 1, stem_stride: int = 1
    ) -> None:
        super().__init__()
        if not channels or blocks < 1:
            raise ValueError("channels needs at least one stage and blocks must be >= 1")
        width = channels[0]
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        ]
        for i, c in enumerate(channels):
            for j in range(blocks):
                layers.append(BasicBlock(width, c, stride=2 if i > 0 and j == 0 else 1))
                width = c
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
