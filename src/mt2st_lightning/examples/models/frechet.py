"""A Fréchet distance between generated and real images in the feature space of a small classifier trained on the
same data: torchmetrics' ``FrechetInceptionDistance`` with a custom feature extractor.

This is NOT the Inception FID that papers report (no Inception-v3, no ImageNet features): its values are only
comparable between runs that use the same classifier (same data, ``seed`` and settings). torchmetrics takes any
``nn.Module`` that maps an image batch to ``(B, num_features)`` and reads its ``num_features`` attribute; the
distance itself is computed in torch (``torch.linalg.eigvals``), so neither torch-fidelity nor scipy is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ["ClassifierFeatures", "classifier_frechet_distance", "fit_feature_classifier"]


class ClassifierFeatures(nn.Module):
    """A small CNN classifier; calling it returns its penultimate features (what the Fréchet distance compares),
    :meth:`logits` the class scores. Images ``(B, C, H, W)`` in [0, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32, num_features: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_features), nn.ReLU(),
        )
        self.classifier = nn.Linear(num_features, num_classes)
        self.num_features = num_features  # read by FrechetInceptionDistance instead of probing with a dummy image

    def forward(self, images: Tensor) -> Tensor:
        return self.body(images)

    def logits(self, images: Tensor) -> Tensor:
        return self.classifier(self.body(images))


def fit_feature_classifier(
    images: Tensor, labels: Tensor, num_classes: int, epochs: int = 30, batch_size: int = 128, lr: float = 5e-3,
    seed: int = 0, device: torch.device | str = "cpu", **kwargs: int,
) -> ClassifierFeatures:
    """Train a :class:`ClassifierFeatures` on ``images`` (in [0, 1]) and ``labels`` with AdamW; return it frozen, in
    eval mode. ``seed`` fixes its initialisation and batch order without touching the caller's random state, so
    every run of a sweep gets the same classifier."""
    device = torch.device(device)
    # Also when called from a test loop (Lightning tests under inference mode): this is training.
    with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = ClassifierFeatures(images.shape[1], num_classes, **kwargs).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        x, y = images.to(device), labels.to(device)
        model.train()
        for _ in range(epochs):
            for batch in torch.randperm(len(x), device=device).split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model.logits(x[batch]), y[batch]).backward()
                optimizer.step()
    model.eval()
    model.requires_grad_(False)
    return model


def classifier_frechet_distance(extractor: ClassifierFeatures) -> FrechetInceptionDistance:
    """torchmetrics' Fréchet distance over ``extractor``'s features; ``update(images, real=...)`` with images in
    [0, 1], as the extractor takes them."""
    return FrechetInceptionDistance(feature=extractor, normalize=True)
