"""Auxiliary targets computed from the pixels of an image batch ``(N, 1, H, W)`` in [0, 1].

They are functions of the image, never of the label, so an auxiliary head has to learn something about
the input that the primary task may or may not share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AUX_TARGETS", "edge_map", "moments", "reconstruction"]


def reconstruction(images: Tensor) -> Tensor:
    """The image itself, flattened: an autoencoding target."""
    return images.flatten(1)


def edge_map(images: Tensor) -> Tensor:
    """Sobel gradient magnitude at every pixel, flattened."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype, device=images.device)
    kernels = torch.stack([kx, kx.T]).unsqueeze(1)
    g = F.conv2d(images, kernels, padding=1)
    return g.pow(2).sum(1).sqrt().flatten(1)


def moments(images: Tensor) -> Tensor:
    """The ink's centroid (row, column) and second central moments (row, column, cross), 5 values."""
    n, _, h, w = images.shape
    mass = images.sum((1, 2, 3)).clamp_min(1e-6)
    rows = torch.arange(h, dtype=images.dtype).view(1, 1, h, 1) / (h - 1)
    cols = torch.arange(w, dtype=images.dtype).view(1, 1, 1, w) / (w - 1)
    r = (images * rows).sum((1, 2, 3)) / mass
    c = (images * cols).sum((1, 2, 3)) / mass
    dr, dc = rows - r.view(n, 1, 1, 1), cols - c.view(n, 1, 1, 1)
    rr = (images * dr * dr).sum((1, 2, 3)) / mass
    cc = (images * dc * dc).sum((1, 2, 3)) / mass
    rc = (images * dr * dc).sum((1, 2, 3)) / mass
    return torch.stack([r, c, rr, cc, rc], dim=1)


#: name -> (function, values per image)
AUX_TARGETS = {"recon": reconstruction, "edges": edge_map, "moments": moments}
