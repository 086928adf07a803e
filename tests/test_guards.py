"""The non-finite guard: no host-device sync on an ordinary step, a delayed but named error, skips on all ranks."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus

from mt2st_lightning import MT2STCallback
from mt2st_lightning.guards import NonFiniteGuard, NonFiniteLossError
from tests.conftest import nan_model, toy_loader, toy_model, toy_trainer

_spec = importlib.util.spec_from_file_location("sync_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "sync_probe.py")
sync_probe = sys.modules.setdefault("sync_probe", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(sync_probe)


# ---------------------------------------------------------------------------------------- syncs per step
@pytest.mark.parametrize(
    ("strategy", "kwargs"),
    [
        ("stl", {}),
        ("mtl", {}),
        ("diminish", {"eta": 0.1, "prune_below": 0.2}),  # pruned at step 17
        ("switch", {"switch_at": 0.5}),
        ("plateau", {"monitor": "val/loss", "patience": 1, "min_delta": 10.0}),  # drops after the first validation
    ],
)
def test_default_settings_add_no_sync_to_an_ordinary_step(strategy, kwargs):
    counts = sync_probe.probe(strategy, steps=24, **kwargs)
    assert counts["ordinary_steps"] >= 20
    assert counts["ordinary_syncs"] == 0, counts
    assert counts["boundary_syncs"] == 0, counts  # a drop needs none either, on one device
    if strategy in ("diminish", "switch", "plateau"):
        assert counts["boundary_steps"] == 1, counts  # the drop happened within the probe


@pytest.mark.parametrize("strategy", ["gradnorm", "fisher", "noise", "conflict"])
def test_measuring_strategies_sync_on_their_measuring_steps_only(strategy):
    counts = sync_probe.probe(strategy, steps=24, adapt_every=5)
    assert counts["measuring_steps"] == 5  # steps 0, 5, 10, 15, 20
    assert counts["measuring_syncs"] > 0
    assert counts["ordinary_syncs"] == 0, counts


def test_the_probe_counts_a_sync_in_library_code():
    from mt2st_lightning import guards

    with sync_probe.count_syncs() as counter:
        guards.torch.tensor(1.0).item()  # from a test module: not the library's
        assert counter.total == 0
        NonFiniteGuard("skip").all_finite(type("T", (), {"world_size": 1})())  # nothing flagged: no read
        assert counter.total == 0
        guard = NonFiniteGuard("skip")
        guard._bad = torch.tensor(False)
        guard.all_finite(type("T", (), {"world_size": 1})())
    assert counter.total == 1 and "mt2st_lightning.guards:all_finite (item)" in counter.where


# ---------------------------------------------------------------------------------------- "raise": late, named, before checkpoints
def test_raise_names_the_step_and_the_tasks_of_its_total(tmp_path):
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl")], max_epochs=3, log_every_n_steps=5)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit(nan_model(), toy_loader())
    message = str(error.value)
    # The NaN happened at step 2; the guard read its flag at the next logging step, 4 ((4 + 1) % 5 == 0). It keeps
    # one total per micro-batch, so it names the step exactly and the tasks that made up that step's total.
    assert "non-finite loss at step 2, found at step 4 (in the weighted total of task(s) ['label', 'recon', " \
        "'parity']" in message
    assert "log_every_n_steps=1" in message  # and it says how to have the task named
    assert "another rank" not in message  # one device: there is no other rank
    assert trainer.global_step == 4


def test_raise_names_the_task_when_it_reads_the_step_that_went_wrong(tmp_path):
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl")], max_epochs=3, log_every_n_steps=1)
    named = r"non-finite loss in task\(s\) \['parity'\] at step 2, found at step 2"
    with pytest.raises(FloatingPointError, match=named):
        trainer.fit(nan_model(), toy_loader())
    assert trainer.global_step == 2  # read before backward: step 2's update never happened


def test_raise_names_the_task_on_a_measuring_step():
    # A policy observes only checked steps: the read before it falls in the micro-batch it would observe, whose
    # losses the callback hands over.
    guard = NonFiniteGuard("raise")
    one = SimpleNamespace(world_size=1)
    guard.record(one, 1, {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, torch.tensor(2.0))
    assert guard.all_finite(one) and not guard._pending
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(float("inf"))}
    guard.record(one, 2, losses, losses["a"] + 0.0 * losses["b"])
    with pytest.raises(NonFiniteLossError, match=r"task\(s\) \['b'\] at step 2, found at step 2"):
        guard.all_finite(one, losses)


def test_raise_says_when_the_total_of_finite_losses_overflowed():
    guard = NonFiniteGuard("raise")
    one = SimpleNamespace(world_size=1)
    losses = {"a": torch.tensor(3e38), "b": torch.tensor(3e38)}
    guard.record(one, 5, losses, losses["a"] + losses["b"])
    with pytest.raises(NonFiniteLossError, match=r"at step 5, found at step 5 \(the weighted total of task\(s\) "
                       r"\['a', 'b'\] overflowed; each loss was finite\)"):
        guard.all_finite(one, losses)


def test_raise_keeps_the_total_of_a_step_not_its_task_losses():
    # Keeping every task loss alive until the read cost the benchmark's small model 1.5% of its step: the guard
    # keeps the detached total (the storage mt2st_loss allocated anyway) and nothing of the task losses.
    guard = NonFiniteGuard("raise")
    weight = torch.ones((), requires_grad=True)
    losses = {"a": weight * 2.0, "b": weight * 3.0}
    total = losses["a"] + 0.5 * losses["b"]
    guard.record(SimpleNamespace(world_size=1), 7, losses, total)
    ((t, tasks, kept),) = guard._pending
    assert (t, tasks) == (7, ("a", "b"))
    assert not kept.requires_grad and kept.untyped_storage().data_ptr() == total.untyped_storage().data_ptr()


def _ddp_trainer(status: TrainerStatus, other_rank_bad: int = 0) -> SimpleNamespace:
    reduced = []

    def reduce(tensor, reduce_op):
        reduced.append(reduce_op)
        return tensor + other_rank_bad

    return SimpleNamespace(world_size=2, state=SimpleNamespace(status=status),
                           strategy=SimpleNamespace(reduce=reduce), reduced=reduced)


@pytest.mark.parametrize(("value", "other_rank_bad", "error"), [
    (1.0, 0, None), (float("nan"), 0, "at step 3, found at step 4"), (1.0, 1, "on another rank, found at step 4"),
])
def test_the_ranks_agree_at_a_read_while_training_runs(value, other_rank_bad, error):
    trainer = _ddp_trainer(TrainerStatus.RUNNING, other_rank_bad)
    guard = NonFiniteGuard("raise")
    guard.record(trainer, 3, {"a": torch.tensor(value)}, torch.tensor(value))
    if error is None:
        guard.check(trainer, 4)
    else:
        with pytest.raises(NonFiniteLossError, match=error):
            guard.check(trainer, 4)
    assert trainer.reduced == ["sum"]  # one all-reduce, on every rank


@pytest.mark.parametrize("value", [1.0, float("nan")])
def test_no_collective_in_a_read_after_an_exception(value):
    # OnExceptionCheckpoint saves from the rank that failed, alone: an all-reduce there would wait forever.
    trainer = _ddp_trainer(TrainerStatus.INTERRUPTED)
    guard = NonFiniteGuard("raise")
    guard.record(trainer, 3, {"a": torch.tensor(value)}, torch.tensor(value))
    if value == value:
        guard.check(trainer, 4)
    else:
        with pytest.raises(NonFiniteLossError, match="at step 3, found at step 4"):
            guard.check(trainer, 4)  # this rank's own NaN still stops the save
    assert trainer.reduced == []


def test_a_checkpoint_saved_after_an_exception_never_holds_an_unread_nan(tmp_path):
    class FailAt(pl.Callback):  # an unrelated error, after the NaN of step 2 and before the guard's next read
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                raise RuntimeError("unrelated failure")

    on_exception = OnExceptionCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl"), FailAt(), on_exception], max_epochs=3,
                          log_every_n_steps=50, enable_checkpointing=True)
    with pytest.raises(NonFiniteLossError, match=r"at step 2, found at step 3 \(in the weighted total") as error:
        trainer.fit(nan_model(), toy_loader())
    assert isinstance(error.value.__context__, RuntimeError)  # raised while Lightning handled the first error
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))


def test_raise_stops_before_a_checkpoint_holds_the_damage(tmp_path):
    every_step = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl"), every_step], max_epochs=3, enable_checkpointing=True)
    with pytest.raises(FloatingPointError, match=r"at step 2, found at step 3"):
        trainer.fit(nan_model(), toy_loader())
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # the checkpoint of step 3 was never written


def test_raise_reads_at_the_latest_every_check_every_micro_batches(tmp_path, monkeypatch):
    from mt2st_lightning import guards

    monkeypatch.setattr(guards, "CHECK_EVERY", 4)
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl")], max_epochs=3, log_every_n_steps=0)
    with pytest.raises(FloatingPointError, match=r"at step 2, found at step 3"):
        trainer.fit(nan_model(), toy_loader())


def test_off_keeps_nothing(tmp_path):
    callback = MT2STCallback("mtl", on_nonfinite="off")
    trainer = toy_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(nan_model(), toy_loader())  # trains on: nothing checked
    assert callback.guard._pending == [] and callback.guard._bad is None


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise', 'skip' or 'off'"):
        NonFiniteGuard("ignore")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks real host-device synchronisations")
@pytest.mark.parametrize("strategy", ["mtl", "switch"])
def test_no_cuda_sync_in_the_callbacks_hooks_on_an_ordinary_step(tmp_path, strategy):
    # PyTorch's own sync detector, switched on around MT2STCallback's per-step hooks and mt2st_loss only
    # (Lightning's loop syncs on its own, e.g. for logging): any sync in them raises.
    class Strict(MT2STCallback):
        def _strict(self, hook, *args):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return hook(*args)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step not in (0, 4):  # not the first step, not the drop (it rebuilds, frees)
                return self._strict(super().on_train_batch_start, trainer, pl_module, batch, batch_idx)
            return super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

        def on_before_backward(self, trainer, pl_module, loss):
            return self._strict(super().on_before_backward, trainer, pl_module, loss)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            return self._strict(super().on_before_optimizer_step, trainer, pl_module, optimizer)

    kwargs = {"switch_at": 4} if strategy == "switch" else {}
    trainer = toy_trainer(tmp_path, [Strict(strategy, **kwargs)], accelerator="cuda", max_steps=10, max_epochs=None,
                          log_every_n_steps=50)
    trainer.fit(toy_model(), toy_loader())
    assert trainer.global_step == 10


def test_the_failure_checkpoint_does_not_save_the_weights_a_nan_has_damaged(tmp_path):
    from mt2st_lightning.app.failure_checkpoint import FailureCheckpoint

    failure = FailureCheckpoint(dirpath=tmp_path / "ckpt")
    trainer = toy_trainer(tmp_path, [MT2STCallback("mtl"), failure], max_epochs=3, log_every_n_steps=5,
                          enable_checkpointing=True)
    with pytest.raises(FloatingPointError):
        trainer.fit(nan_model(), toy_loader())
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()
