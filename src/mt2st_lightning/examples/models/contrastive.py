"""``nt_xent``: SimCLR's normalised-temperature cross-entropy between two views of the same batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["nt_xent"]


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """Mean NT-Xent loss of the embeddings ``z1``, ``z2`` (each ``(B, D)``; row i of both comes from image i).

    Each of the 2B embeddings must pick its partner view out of the other 2B - 1 by cosine similarity / temperature
    (Chen et al. 2020, eq. 1). Computed in float32. Bounds: 0 for perfectly separated pairs as the temperature goes
    to 0; ``log(2B - 1)`` when all embeddings point the same way.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be (B, D), got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError("NT-Xent needs at least 2 images per batch (the other images are the negatives)")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))  # an embedding is not its own positive or negative
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, partner)
