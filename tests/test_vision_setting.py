"""The vision setting (issue 8, experiment=paper_vision): torch augmentations, NT-Xent, the residual encoder, the
Fashion-MNIST data module (all labels and low-label with its own image stream), the model's training step, and a
one-batch run of every vision preset from a fresh folder."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hydra import compose, initialize_config_dir

from mt2st_lightning import MT2STCallback
from mt2st_lightning.examples.data.augment import Augment
from mt2st_lightning.examples.data.fashion_mnist import DEFAULT_ROOT
from mt2st_lightning.examples.data.vision import FashionMNISTVisionDataModule
from mt2st_lightning.examples.models.contrastive import nt_xent
from mt2st_lightning.examples.models.resnet import ResNetEncoder
from mt2st_lightning.examples.models.vision import VisionMultiTaskModel
from mt2st_lightning.app.train import CONFIG_DIR
from tests.test_app import fast_dev_run

# Training steps called directly (without a Trainer) log nothing; Lightning warns about that.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")

INSTALL = "sudo apt-get install dataset-fashion-mnist"
needs_data = pytest.mark.skipif(
    not (Path(DEFAULT_ROOT) / "train-images-idx3-ubyte.gz").exists() and not (Path(DEFAULT_ROOT) / "train-images-idx3-ubyte").exists(),
    reason=f"Fashion-MNIST is not installed: {INSTALL}",
)


# ---------------------------------------------------------------------------------------------- augmentations
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 6), low=st.floats(0.3, 1.0), shift=st.floats(0, 0.3))
def test_augment_keeps_shape_and_range(seed, batch, low, shift):
    images = torch.rand(batch, 1, 12, 12, generator=torch.Generator().manual_seed(seed))
    view = Augment(scale=(low, 1.0), shift=shift, flip=True, brightness=0.3, contrast=0.4)(
        images, torch.Generator().manual_seed(seed)
    )
    assert view.shape == images.shape
    assert view.min() >= 0 and view.max() <= 1


def test_augment_identity_and_flip():
    images = torch.rand(4, 1, 8, 8)
    assert torch.allclose(Augment()(images), images)  # nothing asked: the images come back
    # With scale 1, no shift and a flip drawn for every image, the view is the mirror image (to float precision).
    flipped = Augment(flip=True)(images, torch.Generator().manual_seed(0))
    mirrored = [torch.allclose(f, i.flip(-1), atol=1e-5) for f, i in zip(flipped, images)]
    same = [torch.allclose(f, i, atol=1e-5) for f, i in zip(flipped, images)]
    assert all(m or s for m, s in zip(mirrored, same)) and any(mirrored)


def test_augment_refuses_bad_settings():
    with pytest.raises(ValueError, match="scale"):
        Augment(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="image batch"):
        Augment()(torch.rand(3, 8, 8))


# ---------------------------------------------------------------------------------------------- NT-Xent
@settings(max_examples=25, deadline=None)
@given(b=st.integers(2, 8), d=st.integers(2, 16), scale=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_nt_xent_is_scale_invariant_and_bounded_by_identical_embeddings(b, d, scale, seed):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    assert torch.allclose(nt_xent(z1, z2), nt_xent(scale * z1, scale * z2), atol=1e-4)
    same = torch.ones(b, d)
    assert nt_xent(same, same).item() == pytest.approx(math.log(2 * b - 1), rel=1e-5)


def test_nt_xent_rewards_matching_views():
    z = torch.eye(6)  # six orthogonal directions: each view's partner is itself, far from every other image
    assert nt_xent(z, z, temperature=0.05).item() < 1e-3
    assert nt_xent(z, z.roll(1, 0), temperature=0.05).item() > 5  # partners mismatched
    with pytest.raises(ValueError, match="at least 2"):
        nt_xent(torch.ones(1, 3), torch.ones(1, 3))


# ---------------------------------------------------------------------------------------------- encoder
def test_resnet_encoder_pools_to_its_width():
    encoder = ResNetEncoder(channels=(8, 16, 32), stem_stride=2)
    assert encoder(torch.rand(3, 1, 28, 28)).shape == (3, encoder.out_features) == (3, 32)


# ---------------------------------------------------------------------------------------------- data
def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTVisionDataModule(root=str(tmp_path)).setup()


def test_bad_arguments_fail_early():
    with pytest.raises(ValueError, match="unknown auxiliary"):
        FashionMNISTVisionDataModule(aux_tasks=["recon"])
    with pytest.raises(ValueError, match="labelled"):
        FashionMNISTVisionDataModule(labelled=0)


@needs_data
def test_splits_and_batches():
    dm = FashionMNISTVisionDataModule(train_limit=300, val_size=100, batch_size=32)
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 300, "images": 300, "val": 100, "test": 10000}
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (32, 1, 28, 28) and batch["item"].shape == (32,)
    assert 0 <= batch["x"].min() and batch["x"].max() <= 1
    assert set(dm.task_specs) == {"item", "edges", "contrast"}
    # Validation images come from the training file, never from the test file, and not from the training split.
    train_x = dm.splits["train"].tensors["x"].flatten(1)
    val_x = dm.splits["val"].tensors["x"].flatten(1)
    assert not (torch.cdist(val_x[:20], train_x) == 0).any()


# ---------------------------------------------------------------------------------------------- model
def _model(dm: FashionMNISTVisionDataModule) -> VisionMultiTaskModel:
    pl.seed_everything(0)
    return VisionMultiTaskModel(ResNetEncoder(channels=(8, 16), stem_stride=2), dm.task_specs, "item")


def _encoder_rows(model: VisionMultiTaskModel, batch) -> list[int]:
    rows: list[int] = []
    handle = model.encoder.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    loss = model.training_step(batch, 0)
    handle.remove()
    loss.backward()
    return rows


def _vision_specs(aux=("edges", "contrast")):
    return {"item": {"kind": "classification", "out_features": 10}, **{t: {"kind": t, "image_shape": [1, 28, 28]} for t in aux}}


class _Specs:
    def __init__(self, aux=("edges", "contrast")):
        self.task_specs = _vision_specs(aux)


def test_one_encoder_pass_per_step_and_the_contrastive_view_only_while_active():
    model = _model(_Specs())
    batch = {"x": torch.rand(8, 1, 28, 28), "item": torch.randint(0, 10, (8,))}
    assert _encoder_rows(model, batch) == [16]  # the primary's view and the contrastive view, one pass
    assert all(p.grad is not None for h in ("edges", "contrast") for p in model.heads[h].parameters())
    model.drop_task("contrast")
    assert _encoder_rows(model, batch) == [8]
    model.drop_task("edges")
    model.zero_grad()
    assert _encoder_rows(model, batch) == [8]
    assert all(p.grad is None for p in model.heads["edges"].parameters())


def test_low_label_batches_feed_the_auxiliary_tasks_their_own_images():
    model = _model(_Specs())
    batch = {
        "primary": {"x": torch.rand(4, 1, 28, 28), "item": torch.randint(0, 10, (4,))},
        "images": {"x": torch.rand(6, 1, 28, 28), "item": torch.randint(0, 10, (6,))},
    }
    assert _encoder_rows(model, batch) == [4 + 6 + 6]
    model.drop_task("contrast")
    assert _encoder_rows(model, batch) == [4 + 6]
    model.drop_task("edges")
    assert _encoder_rows(model, {"primary": batch["primary"], "images": None}) == [4]


def test_model_refuses_unknown_tasks():
    with pytest.raises(ValueError, match="unknown auxiliary"):
        VisionMultiTaskModel(ResNetEncoder(channels=(8,)), {**_vision_specs(), "recon": {"kind": "regression"}}, "item")


@needs_data
@pytest.mark.slow
def test_low_label_stream_stops_loading_after_the_switch(tmp_path):
    dm = FashionMNISTVisionDataModule(train_limit=640, val_size=64, labelled=64, batch_size=16)
    model = _model(dm)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[MT2STCallback("switch", switch_at=4)], logger=False, enable_checkpointing=False,
        limit_val_batches=1, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    assert trainer.global_step == 8 and model.active_tasks == ("item",)
    costs = trainer.train_dataloader["images"].costs()
    # Steps 0-3 use the stream; Lightning's one-batch prefetch may load one more; the rest load nothing.
    assert 4 <= costs["batches"] <= 5 and costs["skipped"] >= 3


# ---------------------------------------------------------------------------------------------- presets
@needs_data
@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("experiment=paper_vision", "strategy=mtl"),
        # Without the Switch envelope (which would drop the heads at step 0 of 1), so the adaptive row measures
        # and the auxiliary image stream is read.
        ("experiment=paper_vision_low_label", "strategy=gradnorm", "strategy.switch_at=null"),
        # The GPU preset's model and data, on this machine's CPU, with a small batch.
        ("experiment=paper_vision_gpu", "strategy=conflict", "trainer.accelerator=cpu", "data.batch_size=8", "data.num_workers=0"),
    ],
    ids=["paper_vision", "paper_vision_low_label", "paper_vision_gpu"],
)
def test_vision_presets_run_one_batch_from_a_fresh_folder(tmp_path, overrides):
    summary = fast_dev_run(tmp_path / "run", *overrides)
    assert summary["total_steps"] == 1
    assert summary["auxiliary_tasks"] == ["edges", "contrast"]
    assert 0 <= summary["test_primary_metric"] <= 1
    assert (tmp_path / "run" / "run_summary.json").is_file()
    # Only the low-label preset feeds the auxiliary tasks from a stream of their own; its cost is in the summary.
    low_label = "experiment=paper_vision_low_label" in overrides
    assert (summary["stream_costs"].get("stream/images/batches", 0) >= 1) == low_label, summary["stream_costs"]


def test_switch_point_ablation_composes_with_the_vision_presets():
    """experiments/switch_point.py (STL and Switch at 10/30/50/70 %) is the vision setting's switch-point ablation."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("switch_point", Path(__file__).parents[1] / "experiments" / "switch_point.py")
    switch_point = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(switch_point)
    assert switch_point.FRACTIONS == (0.1, 0.3, 0.5, 0.7)
    import hydra

    for preset in ("paper_vision", "paper_vision_low_label"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            for label, overrides in switch_point.variants():
                cfg = compose("train", overrides=[f"experiment={preset}", *overrides, f"label={label}"])
                callback = hydra.utils.instantiate(cfg.strategy)
                assert callback.strategy == label.split("@")[0]
                assert cfg.data.train_limit == 20000
