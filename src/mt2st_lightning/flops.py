"""FLOPs and wall time of training, per phase: a thin layer over ``torch.utils.flop_counter``.

A *phase* is the set of tasks whose heads run. The FLOPs of one training batch (forward and backward) are
counted with ``FlopCounterMode`` on the first real batch of each phase, not estimated, and every later batch
of that phase is charged the same count: the computation of a phase does not depend on the data.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.names import (
    COST_FLOPS,
    COST_FLOPS_AT_VAL,
    COST_FLOPS_PER_BATCH,
    COST_TIME,
    COST_TIME_AT_VAL,
)

__all__ = ["PhaseCostMeter", "count_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """The FLOPs ``fn()`` performs (matrix products, convolutions, attention), forward and backward."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _phase_of(pl_module: pl.LightningModule, schedulers: list[MT2STCallback]) -> str:
    tasks = getattr(pl_module, "active_tasks", None)
    phase = "+".join(tasks) if tasks else "all"
    # An adaptive strategy's measuring step runs extra backward passes: a phase of its own.
    if any(c.measuring for c in schedulers):
        phase += "/measuring"
    return phase


class PhaseCostMeter(Callback):
    """Logs cumulative training FLOPs and time, measured per phase.

    Logged every step: ``cost/flops`` (cumulative, this process), ``cost/time_s`` (cumulative time inside
    training batches) and ``cost/flops_per_batch``. Place it after ``MT2STCallback`` in the callback list, so
    that a batch's phase is known when it starts.

    Its state (the counts so far, and the fit's wall time up to the checkpoint) is saved in checkpoints, so a
    resumed run reports the whole run's cost, from step 0.
    """

    def __init__(self, log: bool = True) -> None:
        self.log = log
        self.flops_per_batch: dict[str, int] = {}
        self.batches: dict[str, int] = {}
        self.time_s: dict[str, float] = {}
        self.batch_times: dict[str, list[float]] = {}
        self.total_flops = 0
        self.total_time_s = 0.0
        self._counter: FlopCounterMode | None = None
        self._phase = ""
        self._t0 = 0.0
        self._schedulers: list[MT2STCallback] = []
        #: Wall time the run had spent in earlier fits, up to the checkpoint this fit resumed from.
        self.wall_time_before_resume_s = 0.0
        self._fit_start = time.perf_counter()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._fit_start = time.perf_counter()
        # Found once here; each batch reads their `measuring` flag.
        self._schedulers = [c for c in trainer.callbacks if isinstance(c, MT2STCallback)]
        if any(trainer.callbacks.index(c) > trainer.callbacks.index(self) for c in self._schedulers):
            raise ValueError(
                "PhaseCostMeter must come after MT2STCallback in Trainer(callbacks=[...]): it reads the phase "
                "(the active tasks) that MT2STCallback sets at the start of each batch"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._phase = _phase_of(pl_module, self._schedulers)
        if self._phase not in self.flops_per_batch:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._t0
        phase = self._phase
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_batch[phase] = int(self._counter.get_total_flops())
            self._counter = None
        flops = self.flops_per_batch[phase]
        self.batches[phase] = self.batches.get(phase, 0) + 1
        self.time_s[phase] = self.time_s.get(phase, 0.0) + elapsed
        self.batch_times.setdefault(phase, []).append(elapsed)
        self.total_flops += flops
        self.total_time_s += elapsed
        if self.log:
            pl_module.log_dict(
                {COST_FLOPS: float(self.total_flops), COST_TIME: self.total_time_s, COST_FLOPS_PER_BATCH: float(flops)},
                on_step=True, on_epoch=False, batch_size=1,
            )

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The cost so far, in the same logged row as the validation metrics: time-to-target reads it there.
        # Under DDP, the slowest rank's time (every rank counts the same FLOPs): one all-reduce per validation.
        if self.log and not trainer.sanity_checking:
            pl_module.log_dict(
                {COST_FLOPS_AT_VAL: float(self.total_flops), COST_TIME_AT_VAL: self.total_time_s},
                sync_dist=True, reduce_fx="max",
            )

    def summary(self) -> dict[str, Any]:
        """Per phase: tasks, batches, FLOPs per batch, total time and median batch time."""
        return {
            "total_flops": self.total_flops,
            "total_time_s": self.total_time_s,
            "phases": {
                phase: {
                    "batches": self.batches[phase],
                    "flops_per_batch": self.flops_per_batch[phase],
                    "time_s": self.time_s[phase],
                    "median_batch_time_s": statistics.median(self.batch_times[phase]),
                }
                for phase in self.batches
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "flops_per_batch": dict(self.flops_per_batch),
            "batches": dict(self.batches),
            "time_s": dict(self.time_s),
            "batch_times": {k: list(v) for k, v in self.batch_times.items()},
            "total_flops": self.total_flops,
            "total_time_s": self.total_time_s,
            "wall_time_s": self.wall_time_before_resume_s + time.perf_counter() - self._fit_start,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        self.wall_time_before_resume_s = float(state.pop("wall_time_s", 0.0))
        for key, value in state.items():
            setattr(self, key, value)
