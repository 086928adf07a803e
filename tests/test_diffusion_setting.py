"""The diffusion setting (issue 8, experiment=paper_diffusion): the data module's tasks, the DDPM pieces (noise
schedule, forward process, sampling, the auxiliary heads leaving), the classifier-feature Fréchet distance
(torchmetrics' FrechetInceptionDistance with a custom extractor), and a one-batch run of each diffusion preset."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mt2st_lightning.examples.data import DigitsDataModule
from mt2st_lightning.examples.data.diffusion import DiffusionDataModule
from mt2st_lightning.examples.data.fashion_mnist import DEFAULT_ROOT
from mt2st_lightning.examples.models.ddpm import DDPMModel, Denoiser, cosine_alpha_bar
from mt2st_lightning.examples.models.frechet import ClassifierFeatures, classifier_frechet_distance, fit_feature_classifier
from tests.test_app import fast_dev_run

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _digits(**kwargs) -> DiffusionDataModule:
    return DiffusionDataModule(DigitsDataModule(aux_tasks=[], **kwargs))


# ---------------------------------------------------------------------------------------------- data
def test_task_specs_and_batches():
    dm = _digits(batch_size=16)
    specs = dm.task_specs
    assert specs == {
        "noise": {"kind": "denoising", "image_shape": [1, 8, 8], "labels": "digit"},
        "recon": {"kind": "reconstruction", "image_shape": [1, 8, 8]},
        "class": {"kind": "classification", "out_features": 10, "target": "digit"},
    }
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (16, 1, 8, 8) and batch["digit"].shape == (16,)
    x, y = dm.train_images()
    assert len(x) == len(y) == len(dm.images.splits["train"])


def test_wrapped_module_must_not_compute_pixel_targets():
    with pytest.raises(ValueError, match="aux_tasks=\\[\\]"):
        DiffusionDataModule(DigitsDataModule())
    with pytest.raises(ValueError, match="unknown auxiliary"):
        DiffusionDataModule(DigitsDataModule(aux_tasks=[]), aux_tasks=["edges"])


# ---------------------------------------------------------------------------------------------- DDPM
def test_cosine_schedule_decreases_from_one_towards_zero():
    abar = cosine_alpha_bar(100)
    assert abar.shape == (100,)
    assert (abar[1:] < abar[:-1]).all() and 0.99 < abar[0] <= 1 and abar[-1] < 1e-3


@settings(max_examples=20, deadline=None)
@given(t=st.integers(0, 49), seed=st.integers(0, 2**16))
def test_forward_process_keeps_unit_variance_mixtures(t, seed):
    model = _ddpm(timesteps=50)
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)
    xt = model.noisy(x0, torch.full((4,), t), noise)
    abar = model.alpha_bar[t]
    # x_t is x0 and the noise mixed with weights whose squares sum to 1.
    assert torch.allclose(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-6)


def _ddpm(timesteps: int = 20, tasks: dict | None = None, **kwargs) -> DDPMModel:
    pl.seed_everything(0)
    tasks = tasks or _digits().task_specs
    return DDPMModel(Denoiser(channels=8), tasks, timesteps=timesteps, **kwargs)


def test_training_step_runs_only_the_active_heads():
    model = _ddpm()
    batch = {"x": torch.rand(6, 1, 8, 8), "digit": torch.randint(0, 10, (6,))}
    model.training_step(batch, 0).backward()
    assert all(p.grad is not None for h in ("recon", "class") for p in model.heads[h].parameters())
    model.zero_grad()
    model.drop_task("recon")
    model.drop_task("class")
    record_losses = []
    original = model.mt2st_loss
    model.mt2st_loss = lambda losses, features=None: record_losses.append(set(losses)) or original(losses, features)
    model.training_step(batch, 0).backward()
    assert record_losses == [{"noise"}]
    assert all(p.grad is None for h in ("recon", "class") for p in model.heads[h].parameters())


def test_sampling_gives_images_in_range_reproducibly():
    model = _ddpm(timesteps=10)
    a = model.sample(5, torch.Generator().manual_seed(3))
    b = model.sample(5, torch.Generator().manual_seed(3))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() <= 1


def test_model_refuses_another_primary_task():
    with pytest.raises(ValueError, match="primary task is 'noise'"):
        DDPMModel(Denoiser(channels=8), _digits().task_specs, primary="class")


# ---------------------------------------------------------------------------------------------- Fréchet distance
def test_classifier_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    torch.manual_seed(0)
    extractor = ClassifierFeatures(num_features=8).eval()
    images = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    metric = classifier_frechet_distance(extractor)
    metric.update(images, real=True)
    metric.update(images, real=False)
    same = metric.compute().item()
    metric.reset()
    metric.update(images, real=True)
    metric.update(images * 0.3, real=False)
    shifted = metric.compute().item()
    assert shifted > 0 and abs(same) < 1e-3 * shifted


@pytest.mark.slow
def test_feature_classifier_learns_digits_without_touching_the_callers_random_state():
    dm = _digits()
    x, y = dm.train_images()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    classifier = fit_feature_classifier(x, y, 10, epochs=20, lr=3e-3)
    assert torch.equal(torch.random.get_rng_state(), before)
    dm.images.setup()
    test = dm.images.splits["test"].tensors
    accuracy = (classifier.logits(test["x"]).argmax(-1) == test["digit"]).float().mean().item()
    assert accuracy > 0.8
    assert not any(p.requires_grad for p in classifier.parameters())


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.slow
def test_paper_diffusion_runs_one_batch_from_a_fresh_folder(tmp_path):
    summary = fast_dev_run(  # no Switch envelope: the auxiliary heads run in the one step
        tmp_path / "run", "experiment=paper_diffusion", "strategy=noise", "strategy.switch_at=null", "model.sample_count=20"
    )
    assert summary["total_steps"] == 1 and summary["auxiliary_tasks"] == ["recon", "class"]
    assert summary["drop_times"] == {}
    metrics = summary["test_metrics"]
    assert summary["test_primary_metric"] == pytest.approx(-metrics["test/denoise_loss"])
    assert summary["primary_metric_name"] == "negative denoising loss"
    assert metrics["test/frechet_classifier_distance"] > 0
    assert (tmp_path / "run" / "run_summary.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not Path(DEFAULT_ROOT, "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed: sudo apt-get install dataset-fashion-mnist",
)
def test_paper_diffusion_gpu_builds_and_runs_one_batch_on_the_cpu(tmp_path):
    summary = fast_dev_run(
        tmp_path / "run", "experiment=paper_diffusion_gpu", "strategy=conflict", "trainer.accelerator=cpu",
        "data.images.batch_size=8", "data.images.num_workers=0", "model.sample_count=4", "model.timesteps=20",
        "model.classifier_epochs=1", "data.images.limit=2000",
    )
    assert summary["total_steps"] == 1
    assert summary["test_metrics"]["test/frechet_classifier_distance"] == summary["test_metrics"]["test/frechet_classifier_distance"]
