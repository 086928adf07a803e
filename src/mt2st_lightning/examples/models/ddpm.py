"""``DDPMModel``: the paper's diffusion setting (Table 4) at small scale: a DDPM noise-prediction network (Ho et
al. 2020) whose shared trunk also feeds two auxiliary heads, reconstruction of the clean image and class
prediction, both from the features of the noisy image.

Primary task ``noise``: predict the noise ``eps`` in ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps`` (mean
squared error). Evaluation: the held-out denoising loss at fixed noise and timesteps (the same draws for every
run), logged as ``{val,test}/denoise_loss``; ``{val,test}/primary_metric`` is its negative, so that the app's
"higher is better" (checkpointing, the report's target) holds. At test time the model also samples images with
ancestral DDPM sampling and logs ``test/frechet_classifier_distance``: a Fréchet distance in the feature space of
a classifier trained on the same data (``models/frechet.py``), not Inception FID.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, SumMetric

from mt2st_lightning.mixin import MT2STMixin
from mt2st_lightning.examples.models.frechet import classifier_frechet_distance, fit_feature_classifier

__all__ = ["DDPMModel", "Denoiser", "cosine_alpha_bar"]


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> Tensor:
    """``abar_t`` for t = 0..T-1 of the cosine schedule (Nichol & Dhariwal 2021), each step's beta clipped at 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


class _TimeEmbedding(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, 2 * dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class _ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(min(8, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        return self.conv2(F.silu(self.norm2(h))) + self.skip(x)


class Denoiser(nn.Module):
    """A one-level U-Net: ``(x_t, t) -> features (B, channels, H, W)`` at the input's resolution (the heads turn
    them into noise, image or class predictions). Time enters every residual block through a sinusoidal
    embedding."""

    def __init__(self, in_channels: int = 1, channels: int = 32) -> None:
        super().__init__()
        time_dim = 2 * channels
        self.time = _TimeEmbedding(channels)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.down = _ResBlock(channels, channels, time_dim)
        self.downsample = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1)
        self.mid = nn.ModuleList([_ResBlock(2 * channels, 2 * channels, time_dim) for _ in range(2)])
        self.upsample = nn.Conv2d(2 * channels, channels, 3, padding=1)
        self.up = _ResBlock(2 * channels, channels, time_dim)
        self.out_features = channels

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time(t)
        skip = self.down(self.stem(x), temb)
        h = self.downsample(skip)
        for block in self.mid:
            h = block(h, temb)
        h = self.upsample(F.interpolate(h, size=skip.shape[-2:], mode="nearest"))
        return F.silu(self.up(torch.cat([h, skip], dim=1), temb))


def _image_head(channels: int, out_channels: int) -> nn.Module:
    return nn.Conv2d(channels, out_channels, 3, padding=1)


class DDPMModel(MT2STMixin, pl.LightningModule):
    """A DDPM with auxiliary heads (see the module docstring). ``tasks``: ``DiffusionDataModule.task_specs``.

    ``timesteps``: the diffusion length T (cosine schedule). ``sample_count`` images are generated at test time
    (with the generator seeded by ``sample_seed`` plus the process's rank) for the Fréchet distance, against the
    test split's images; ``0`` skips it. ``classifier_epochs``: training of the feature classifier, on the
    training split, with its own fixed seed (identical for every run).
    """

    #: ``primary_metric`` is minus the denoising loss (higher is better), and the report says so.
    primary_metric_name = "negative denoising loss"

    def __init__(
        self,
        denoiser: nn.Module,
        tasks: Mapping[str, Mapping[str, Any]],
        primary: str = "noise",
        timesteps: int = 100,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        sample_count: int = 300,
        sample_seed: int = 0,
        classifier_epochs: int = 30,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["denoiser"])
        if primary != "noise" or "noise" not in tasks:
            raise ValueError(f"DDPMModel's primary task is 'noise' (noise prediction); got primary={primary!r}, tasks {list(tasks)}")
        unknown = [t for t in tasks if t not in ("noise", "recon", "class")]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; DDPMModel has 'noise', 'recon' and 'class'")
        if timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {timesteps}")
        if not hasattr(denoiser, "out_features"):
            raise TypeError(f"the denoiser {type(denoiser).__name__} must expose `out_features` (its feature channels)")
        self.image_shape = tuple(int(s) for s in tasks["noise"]["image_shape"])
        # The batch key of the class labels (the class head's targets; the feature classifier's test accuracy).
        self.label_key = tasks.get("class", tasks["noise"]).get("target", tasks["noise"].get("labels"))
        channels, width = self.image_shape[0], denoiser.out_features
        self.denoiser = denoiser
        heads: dict[str, nn.Module] = {"noise": _image_head(width, channels)}
        if "recon" in tasks:
            heads["recon"] = _image_head(width, channels)
        if "class" in tasks:
            heads["class"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, int(tasks["class"]["out_features"])))
        self.heads = nn.ModuleDict(heads)
        self.declare_tasks(primary="noise", heads=self.heads)
        self.register_buffer("alpha_bar", cosine_alpha_bar(timesteps), persistent=False)
        self.val_denoise, self.test_denoise = MeanMetric(), MeanMetric()
        self.val_samples, self.test_samples = SumMetric(), SumMetric()
        # Kept out of the module tree: not trained, not checkpointed, not moved by Lightning (see on_test_start).
        self.__dict__["frechet"] = None

    # ------------------------------------------------------------------------------------------ diffusion
    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t`` of clean images ``x0`` (in [-1, 1]) at timesteps ``t`` with ``noise``."""
        abar = self.alpha_bar[t].view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_noise(self, xt: Tensor, t: Tensor) -> Tensor:
        return self.heads["noise"](self.denoiser(xt, t))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` images in [0, 1] by ancestral sampling (Ho et al. 2020, algorithm 2, sigma_t^2 = beta_t)."""
        abar = self.alpha_bar
        x = torch.randn(n, *self.image_shape, device=self.device, generator=generator)
        for step in reversed(range(len(abar))):
            t = torch.full((n,), step, device=self.device, dtype=torch.long)
            abar_prev = abar[step - 1] if step > 0 else abar.new_tensor(1.0)
            beta = 1 - abar[step] / abar_prev
            eps = self.predict_noise(x, t)
            x = (x - beta / (1 - abar[step]).sqrt() * eps) / (1 - beta).sqrt()
            if step > 0:
                x = x + beta.sqrt() * torch.randn(x.shape, device=self.device, generator=generator)
        return ((x.clamp(-1, 1) + 1) / 2)

    # ------------------------------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        active = self.active_tasks
        x0 = batch["x"] * 2 - 1
        t = torch.randint(0, len(self.alpha_bar), (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        h = self.denoiser(self.noisy(x0, t, noise), t)
        losses = {"noise": F.mse_loss(self.heads["noise"](h).float(), noise)}
        if "recon" in active:
            losses["recon"] = F.mse_loss(self.heads["recon"](h).float(), x0)
        if "class" in active:
            losses["class"] = F.cross_entropy(self.heads["class"](h).float(), batch[self.label_key])
        n = x0.shape[0]
        loss = self.mt2st_loss(losses, features=h)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/loss/{k}": v.detach() for k, v in losses.items()}, batch_size=n)
        return loss

    # ------------------------------------------------------------------------------------------ evaluation
    def _denoise_loss(self, batch: Mapping[str, Tensor], batch_idx: int, stage: str) -> None:
        x0 = batch["x"] * 2 - 1
        # The same timesteps and noise for a given batch in every run and every evaluation.
        g = torch.Generator(device=x0.device).manual_seed(1_000_003 * (batch_idx + 1) + self.global_rank)
        t = torch.randint(0, len(self.alpha_bar), (x0.shape[0],), device=x0.device, generator=g)
        noise = torch.randn(x0.shape, device=x0.device, generator=g)
        per_image = F.mse_loss(self.predict_noise(self.noisy(x0, t, noise), t).float(), noise, reduction="none")
        getattr(self, f"{stage}_denoise").update(per_image.flatten(1).mean(1))
        getattr(self, f"{stage}_samples").update(x0.shape[0])

    def _log_evaluation(self, stage: str) -> None:
        loss = getattr(self, f"{stage}_denoise").compute()  # synced over DDP ranks
        self.log(f"{stage}/denoise_loss", loss)
        self.log(f"{stage}/loss", loss)
        self.log(f"{stage}/primary_metric", -loss, prog_bar=True)
        self.log(f"{stage}/samples", getattr(self, f"{stage}_samples").compute())
        getattr(self, f"{stage}_denoise").reset()
        getattr(self, f"{stage}_samples").reset()

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._denoise_loss(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_start(self) -> None:
        if not self.hparams.sample_count:
            return
        datamodule = self.trainer.datamodule
        if not hasattr(datamodule, "train_images"):
            raise TypeError(
                "DDPMModel's Fréchet distance trains its feature classifier on datamodule.train_images(); use "
                "DiffusionDataModule, or set model.sample_count=0"
            )
        images, labels = datamodule.train_images()
        classifier = fit_feature_classifier(
            images, labels, int(labels.max()) + 1, epochs=self.hparams.classifier_epochs, device=self.device
        )
        self.__dict__["frechet"] = classifier_frechet_distance(classifier).to(self.device)
        self.__dict__["classifier"] = classifier

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._denoise_loss(batch, batch_idx, "test")
        if self.frechet is not None:
            self.frechet.update(batch["x"], real=True)
            if self.label_key is None:
                return
            with torch.no_grad():
                hits = (self.classifier.logits(batch["x"]).argmax(-1) == batch[self.label_key]).float()
            self.__dict__.setdefault("classifier_hits", []).append(hits)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")
        if self.frechet is None:
            return
        generator = torch.Generator(device=self.device).manual_seed(self.hparams.sample_seed + self.global_rank)
        for chunk in torch.arange(self.hparams.sample_count).split(500):
            self.frechet.update(self.sample(len(chunk), generator), real=False)
        self.log("test/frechet_classifier_distance", self.frechet.compute())
        hits = torch.cat(self.__dict__.pop("classifier_hits", []) or [torch.zeros(0, device=self.device)])
        self.log("test/feature_classifier_acc", hits.mean() if len(hits) else torch.tensor(float("nan")))
        self.frechet.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
