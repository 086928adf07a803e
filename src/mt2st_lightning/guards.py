"""``NonFiniteGuard``: what a NaN/inf task loss does, without a host-device synchronisation on an ordinary step.

Reading a GPU tensor's value on the host (``.item()``, ``bool(t)``) waits for the device to finish, which stops
the CPU from queueing the next step ahead. So the guard keeps what it needs on the device and reads it rarely:

- ``"raise"`` (default): each micro-batch's weighted total (the float32 tensor ``mt2st_loss`` returned) is kept,
  detached, in a short list: no kernel, no copy, and no task loss kept alive past its step (keeping every task's
  loss until the read cost the benchmark's MLP 1.3% of its multi-task step; ``benchmarks/RESULTS.md``). A NaN/inf
  task loss makes the total non-finite (``0 * inf`` is nan): one finiteness check of the totals covers every task.
  The guard reads them, in one ``.item()``, every ``Trainer(log_every_n_steps=...)`` optimizer steps (at most
  :data:`CHECK_EVERY` micro-batches apart), at the end of each training epoch, before every checkpoint is written
  and before a policy observes a step. A non-finite loss therefore stops training up to that many steps *after* it
  happened (never after a checkpoint of the damage was saved). The error names the step at which it happened and
  the step at which it was found; it names the task too when the read falls in the micro-batch that went wrong
  (every step with ``log_every_n_steps=1``), and otherwise the tasks whose weighted losses made the total. Under
  DDP the ranks agree through one all-reduce at the read, except before a checkpoint written after an exception
  (Lightning's ``OnExceptionCheckpoint``), which one rank can reach alone: that read checks this rank's own
  losses, with no collective.
- ``"skip"``: a non-finite loss on any rank drops that optimizer step's update on every rank. The flag stays on
  the device for every micro-batch of the step; the ranks agree by all-reducing the flag tensor, and the flag is
  read on the host **once per optimizer step**, before the optimizer runs: a general optimizer (momentum,
  Adam's moments and step count, weight decay) cannot be told on the device to leave its parameters and state
  untouched, so this mode pays one synchronisation per optimizer step (and one more on a measuring step, so
  that a policy never observes a skipped micro-batch).
- ``"off"``: nothing is checked or kept.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from torch import Tensor

__all__ = ["CHECK_EVERY", "NonFiniteGuard", "NonFiniteLossError"]

#: The "raise" mode reads its flag at the latest after this many micro-batches (also with log_every_n_steps=0).
CHECK_EVERY = 64
MODES = ("raise", "skip", "off")

log = logging.getLogger("mt2st_lightning")


class NonFiniteLossError(FloatingPointError):
    """The guard's error: a task loss was NaN/inf, and the weights have taken that step's update since."""


class NonFiniteGuard:
    """Watches every micro-batch's task losses for NaN/inf; see the module's docstring for what each mode costs.

    Args:
        mode: ``"raise"``, ``"skip"`` or ``"off"``.
        unit: the callback's unit of time (``"step"`` or ``"epoch"``), for messages.
    """

    def __init__(self, mode: str = "raise", unit: str = "step") -> None:
        if mode not in MODES:
            raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'off', got {mode!r}")
        self.mode = mode
        self.unit = unit
        self.active = mode != "off"
        #: "raise" reads after this many micro-batches (see :meth:`read_every`).
        self.capacity = CHECK_EVERY
        # "raise": (time, task names, detached weighted total) per micro-batch since the last read.
        self._pending: list[tuple[int, tuple[str, ...], Tensor]] = []
        # "skip": the device flag of the current optimizer step, and the decision once it has been read.
        self._bad: Tensor | None = None
        self._decided: bool | None = None

    def read_every(self, steps: int, micro_batches_per_step: int = 1) -> None:
        """``"raise"``: read every ``steps`` optimizer steps of ``micro_batches_per_step`` micro-batches (``steps``
        0: every :data:`CHECK_EVERY` micro-batches), never more than :data:`CHECK_EVERY` micro-batches apart."""
        self.capacity = max(1, min(CHECK_EVERY, (steps or CHECK_EVERY) * max(1, micro_batches_per_step)))

    def reset(self) -> None:
        self._pending.clear()
        self._bad, self._decided = None, None

    # ---------------------------------------------------------------- each micro-batch, before backward
    def record(self, trainer: pl.Trainer, t: int, losses: Mapping[str, Tensor], total: Tensor) -> None:
        """Keep this micro-batch's total (``"raise"``) or fold it into the step's flag (``"skip"``); no sync.
        ``losses`` are only looked at if a read in this micro-batch finds its total non-finite."""
        if self.mode == "raise":
            self._pending.append((t, tuple(losses), total.detach()))
            if len(self._pending) >= self.capacity:
                self._read(trainer, t, losses)
        elif self.mode == "skip":
            if self._decided is not None:  # the first micro-batch of a new optimizer step
                self._bad, self._decided = None, None
            # A non-finite task loss makes the weighted total non-finite (0 * inf is nan): one flag suffices.
            bad = torch.isfinite(total.detach()).logical_not_()
            self._bad = bad if self._bad is None else self._bad.logical_or_(bad)

    # ---------------------------------------------------------------- "raise": the delayed read
    def check(self, trainer: pl.Trainer, now: int) -> None:
        """Read the kept totals (one sync) and raise if any rank saw a non-finite one. Under DDP the ranks agree
        through one all-reduce, so every rank must call it at the same point, except after an exception (the
        trainer's status is ``INTERRUPTED``): a checkpoint saved then may be saved by one rank alone, so this
        rank checks its own losses only, and no collective can wait for a rank that never comes."""
        if self.mode == "raise" and self._pending:
            self._read(trainer, now)

    def _read(self, trainer: pl.Trainer, now: int, current: Mapping[str, Tensor] | None = None) -> None:
        pending, self._pending = self._pending, []
        finite = torch.isfinite(torch.stack([total for _, _, total in pending]))  # promotes fp16/bf16 mixes
        n_bad = finite.logical_not().sum()
        if trainer.world_size > 1 and trainer.state.status != TrainerStatus.INTERRUPTED:
            n_bad = trainer.strategy.reduce(n_bad.float(), reduce_op="sum")
        if n_bad.item() == 0:
            return
        # Found: from here on the cost does not matter (a second sync, the per-task analysis).
        ok = finite.tolist()
        where, why = "on another rank", ""
        if not all(ok):
            first = ok.index(False)
            t, tasks, _ = pending[first]
            where = f"at {self.unit} {t}"
            if current is not None and first == len(pending) - 1:
                # The micro-batch that went wrong is the one at hand: its task losses say which.
                bad = [task for task, loss in current.items() if not bool(torch.isfinite(loss).all())]
                if bad:
                    where = f"in task(s) {bad} at {self.unit} {t}"
                else:
                    why = f" (the weighted total of task(s) {list(tasks)} overflowed; each loss was finite)"
            else:
                why = (
                    f" (in the weighted total of task(s) {list(tasks)}: the guard keeps one total per "
                    "micro-batch; Trainer(log_every_n_steps=1) reads every step, and names the task)"
                )
        raise NonFiniteLossError(
            f"MT2ST: non-finite loss {where}, found at {self.unit} {now}{why}: the guard reads its flag on the "
            f"device only every log_every_n_steps optimizer steps (at most {CHECK_EVERY} micro-batches apart), at "
            "epoch ends and before checkpoints, so training went on until then. "
            "Lower the learning rate or the auxiliary weights, or pass MT2STCallback(on_nonfinite='skip') to "
            "skip such steps."
        )

    # ---------------------------------------------------------------- "skip": one read per optimizer step
    def all_finite(self, trainer: pl.Trainer, losses: Mapping[str, Tensor] | None = None) -> bool:
        """Whether every rank's losses in this optimizer step so far are finite (one sync; all-reduce under DDP).
        ``"raise"`` raises instead of answering ``False``; given the micro-batch's ``losses`` (the one recorded
        last), its error names the task if that micro-batch went wrong."""
        if self.mode == "raise":
            if self._pending:
                self._read(trainer, self._pending[-1][0], losses)
            return True
        if self.mode == "off" or self._bad is None:
            return True
        bad = self._bad.float()
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce(bad, reduce_op="sum")
        return bool(bad.item() == 0)

    def skip_update(self, trainer: pl.Trainer, optimizer: Any, t: int) -> bool:
        """``"skip"``: before the optimizer step, decide (once per step, the same on every rank) whether to drop
        the update; if so, drop every gradient so that the optimizer changes nothing."""
        if self.mode != "skip":
            return False
        if self._decided is None:
            self._decided = not self.all_finite(trainer)
            if self._decided and trainer.is_global_zero:
                log.warning("MT2ST: non-finite loss at %s %s on some rank: this step's update is skipped", self.unit, t)
        if self._decided:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        return self._decided
