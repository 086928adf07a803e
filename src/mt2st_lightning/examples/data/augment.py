"""Batch image augmentations in plain torch (no torchvision), run on whatever device the batch is on.

One random affine warp per image (scale, shift, horizontal flip) through ``affine_grid``/``grid_sample``, then an
optional brightness/contrast jitter. Randomness comes from ``generator`` (or torch's global generator of the
batch's device, which ``seed_everything`` seeds), so a seeded run draws the same views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment"]


@dataclass(frozen=True)
class Augment:
    """A random view of an image batch ``(B, C, H, W)`` with values in [0, 1].

    ``scale``: range of the zoom factor (1: none; 0.6: a crop of 60 % of the side, resized up);
    ``shift``: the largest translation, as a fraction of the image side; ``flip``: mirror half the images
    left-right; ``brightness``/``contrast``: the largest relative change (0: none).
    """

    scale: tuple[float, float] = (1.0, 1.0)
    shift: float = 0.0
    flip: bool = False
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if self.shift < 0 or self.brightness < 0 or not 0 <= self.contrast < 1:
            raise ValueError("shift and brightness must be >= 0, contrast in [0, 1)")

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"expected an image batch (B, C, H, W), got shape {tuple(images.shape)}")
        b, device = images.shape[0], images.device

        def uniform(low: float, high: float) -> Tensor:
            return low + (high - low) * torch.rand(b, device=device, generator=generator, dtype=images.dtype)

        out = images
        if self.scale != (1.0, 1.0) or self.shift or self.flip:
            s = uniform(*self.scale)
            sign = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flip else torch.ones_like(s)
            # affine_grid maps output to input coordinates in [-1, 1]: a factor s < 1 samples a crop (zoom in).
            theta = torch.zeros(b, 2, 3, device=device, dtype=images.dtype)
            theta[:, 0, 0], theta[:, 1, 1] = s * sign, s
            theta[:, 0, 2], theta[:, 1, 2] = uniform(-2 * self.shift, 2 * self.shift), uniform(-2 * self.shift, 2 * self.shift)
            grid = F.affine_grid(theta, list(images.shape), align_corners=False)
            out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.brightness or self.contrast:
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            c = uniform(1 - self.contrast, 1 + self.contrast).view(b, 1, 1, 1)
            shift = uniform(-self.brightness, self.brightness).view(b, 1, 1, 1)
            out = ((out - mean) * c + mean + shift).clamp(0, 1)
        return out
