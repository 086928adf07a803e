"""AuxiliaryStream / combine_streams: endless, seeded per epoch, split across ranks, silent once dropped."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mt2st_lightning import MT2STCallback, MT2STMixin
from mt2st_lightning.examples.data.streams import AuxiliaryStream, combine_streams, stream_costs


def _stream(n=10, batch_size=4, active=("aux",), epoch=0, **kwargs) -> AuxiliaryStream:
    data = TensorDataset(torch.arange(n))
    return AuxiliaryStream(data, tasks=("aux",), batch_size=batch_size, active_tasks=lambda: active,
                           epoch=lambda: epoch, **kwargs)


def _take(stream: AuxiliaryStream, k: int) -> list[list[int]]:
    it = iter(stream)
    return [next(it)[0].tolist() for _ in range(k)]


def test_stream_cycles_through_passes_and_counts_what_it_loads():
    stream = _stream(n=10, batch_size=4)
    batches = _take(stream, 9)  # 3 batches per pass (4, 4, 2): three whole passes
    for p in range(3):
        assert sorted(sum(batches[3 * p : 3 * p + 3], [])) == list(range(10))
    assert batches[:3] != batches[3:6]  # each pass reshuffles
    assert stream.batches_loaded == 9 and stream.samples_loaded == 30 and stream.load_time_s > 0


def test_order_is_a_function_of_seed_and_epoch():
    assert _take(_stream(seed=1), 5) == _take(_stream(seed=1), 5)
    assert _take(_stream(seed=1), 5) != _take(_stream(seed=2), 5)
    assert _take(_stream(seed=1, epoch=0), 5) != _take(_stream(seed=1, epoch=1), 5)
    # A new epoch restarts the numbering: epoch 1 of one stream is epoch 1 of a fresh one.
    epoch = {"e": 0}
    stream = AuxiliaryStream(TensorDataset(torch.arange(10)), ("aux",), 4, lambda: ("aux",), lambda: epoch["e"], seed=1)
    _take(stream, 7)
    epoch["e"] = 1
    assert _take(stream, 5) == _take(_stream(seed=1, epoch=1), 5)


def test_ranks_split_each_pass():
    a = sum(_take(_stream(n=12, batch_size=3, num_replicas=2, rank=0), 2), [])
    b = sum(_take(_stream(n=12, batch_size=3, num_replicas=2, rank=1), 2), [])
    assert sorted(a + b) == list(range(12))


def test_dropped_stream_yields_none_and_loads_nothing():
    active = {"tasks": ("primary", "aux")}
    stream = AuxiliaryStream(TensorDataset(torch.arange(10)), ("aux",), 4, lambda: active["tasks"])
    it = iter(stream)
    next(it)
    active["tasks"] = ("primary",)
    assert next(it) is None and next(it) is None
    assert stream.batches_loaded == 1 and stream.skipped == 2
    assert stream._pass_iterator is None  # the loader's iterator (and any workers) let go


def test_bad_input_errors():
    with pytest.raises(ValueError, match="at least one auxiliary task"):
        AuxiliaryStream(TensorDataset(torch.arange(4)), (), 2, lambda: ())
    with pytest.raises(ValueError, match="fewer than the 4 processes"):
        AuxiliaryStream(TensorDataset(torch.arange(2)), ("aux",), 2, lambda: ("aux",), num_replicas=4)
    with pytest.raises(ValueError, match="other names"):
        combine_streams([1], {"primary": _stream()})


class _StreamModel(MT2STMixin, pl.LightningModule):
    """Primary: regression on x; auxiliary: regression on a stream of its own."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 4)
        self.heads = nn.ModuleDict({"y": nn.Linear(4, 1), "aux": nn.Linear(4, 1)})
        self.declare_tasks(primary="y", heads=self.heads)
        self.seen: list[tuple[int, bool, tuple[str, ...]]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch["primary"]
        self.seen.append((self.global_step, batch["aux_stream"] is not None, self.active_tasks))
        losses = {"y": nn.functional.mse_loss(self.heads["y"](self.encoder(x)).squeeze(1), y)}
        if "aux" in self.active_tasks:
            (u,) = batch["aux_stream"]
            losses["aux"] = self.heads["aux"](self.encoder(u)).pow(2).mean()
        self.log_dict(stream_costs(self.trainer))
        return self.mt2st_loss(losses)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class _StreamData(pl.LightningDataModule):
    def train_dataloader(self):
        primary = DataLoader(TensorDataset(torch.randn(40, 2), torch.randn(40)), batch_size=4)  # 10 steps
        trainer = self.trainer
        self.stream = AuxiliaryStream(
            TensorDataset(torch.randn(6, 2)), ("aux",), 4, active_tasks=lambda: trainer.lightning_module.active_tasks,
            epoch=lambda: trainer.current_epoch, num_replicas=trainer.world_size, rank=trainer.global_rank,
        )
        return combine_streams(primary, {"aux_stream": self.stream})


def test_switch_stops_the_stream_in_a_fit(tmp_path):
    model, data = _StreamModel(), _StreamData()
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[MT2STCallback("switch", switch_at=6)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=data)
    assert len(model.seen) == 20  # the primary loader alone sets the epoch length (10 batches)
    assert all(has for step, has, active in model.seen if step < 6)
    # After the switch, the dropped stream is skipped: at most the switching step's batch and the one
    # Lightning fetched ahead were loaded, and every later step got None.
    assert all("aux" not in active for step, _, active in model.seen if step >= 6)
    assert all(not has for step, has, _ in model.seen if step >= 8)
    assert 6 <= data.stream.batches_loaded <= 8
    assert data.stream.skipped == 20 - data.stream.batches_loaded
    assert trainer.callback_metrics["stream/aux_stream/batches"] == data.stream.batches_loaded


@pytest.mark.slow
def test_ddp_ranks_share_each_pass_and_stop_at_the_same_step(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(root / "tests" / "scripts" / "ddp_streams.py"), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank in ranks:
        assert rank["steps"] == 16 and rank["drop_times"] == {"aux": 5}  # 64 samples / 2 ranks / 4 per batch x 2 epochs
        assert rank["batches_loaded"] + rank["skipped"] == 16 and rank["batches_loaded"] <= 5 + 2
        assert all(step < 5 for step, _ in rank["loaded"][:5])
    # The two ranks' first batches (a pass: 12 samples / 2 ranks / 3 per batch = 2 batches each) split the dataset.
    first_pass = [sorted(sum((ids for _, ids in rank["loaded"][:2]), [])) for rank in ranks]
    assert sorted(first_pass[0] + first_pass[1]) == list(range(12))
    assert ranks[0]["params"] == ranks[1]["params"]


class _RecordingModel(_StreamModel):
    def training_step(self, batch, batch_idx):
        if batch["aux_stream"] is not None:
            self.seen_aux.append((self.global_step, batch["aux_stream"][0].sum().item()))
        return super().training_step(batch, batch_idx)


def test_a_resumed_fit_streams_what_the_uninterrupted_one_did(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_epochs, ckpt_path=None, root=tmp_path):
        torch.manual_seed(0)
        model, data = _RecordingModel(), _StreamData()
        model.seen_aux = []
        torch.manual_seed(0)  # the same primary and stream datasets in every fit
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=0)
        trainer = pl.Trainer(
            max_epochs=max_epochs, callbacks=[MT2STCallback("mtl"), checkpoint], logger=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return model.seen_aux, data.stream

    whole, _ = fit(2, root=tmp_path / "whole")
    fit(1, root=tmp_path / "part")
    resumed, stream = fit(2, ckpt_path=tmp_path / "part" / "last.ckpt", root=tmp_path / "part")
    assert resumed == [s for s in whole if s[0] >= 10]  # epoch 1's stream batches, the same after a resume
    # Lightning hands a CombinedLoader's stateful iterables their state back only when it resumes mid-epoch: at an
    # epoch boundary the stream's own counters start again (SentimentTextDataModule keeps them in its state).
    assert stream.batches_loaded + stream.skipped == 10


def test_one_seeds_passes_are_not_another_seeds():
    seed1 = _take(_stream(n=12, batch_size=12, seed=1), 3)
    seed2 = _take(_stream(n=12, batch_size=12, seed=2), 3)
    assert not set(map(tuple, seed1)) & set(map(tuple, seed2))
