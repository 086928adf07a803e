"""``MT2STCallback``: the hooks that connect a policy to a multi-task LightningModule.

The callback decides nothing itself. Its :class:`~mt2st_lightning.policies.Policy` says what the auxiliary
weights are and which tasks are finished; the callback asks it at each optimizer-step boundary, shows it the
steps and validation metrics it asks to see, writes the weights into the module (``MT2STMixin.task_weights``)
and carries out drops with :func:`~mt2st_lightning.heads.drop_heads`. Its other jobs are pieces of their own:
the arguments (:mod:`~mt2st_lightning.arguments`), the step-record checks (:mod:`~mt2st_lightning.step_record`),
the non-finite guard (:mod:`~mt2st_lightning.guards`), the resumed optimizers (:mod:`~mt2st_lightning.resume`)
and the single-task export (:mod:`~mt2st_lightning.export`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from mt2st_lightning import heads, internals, names, resume, sharding, step_record
from mt2st_lightning.arguments import build_policy, flat_signature
from mt2st_lightning.export import save_single_task
from mt2st_lightning.guards import NonFiniteGuard
from mt2st_lightning.mixin import MT2STMixin, mt2st_module
from mt2st_lightning.policies import Policy
from mt2st_lightning.policies.base import StrategyReducer, checked_weights
from mt2st_lightning.schedules import Schedule

__all__ = ["MT2STCallback"]


class MT2STCallback(Callback):
    r"""Weigh, then drop, a module's auxiliary tasks (MT2ST), as a :class:`~mt2st_lightning.policies.Policy` says.

    Give one of ``strategy`` (a name, with that strategy's parameters), ``schedules`` or ``policy``.

    Args:
        strategy: a name in :data:`~mt2st_lightning.policies.REGISTRY`: ``"stl"``, ``"mtl"``, ``"diminish"``,
            ``"switch"``; adaptive: ``"gradnorm"`` (eq. 13), ``"fisher"`` (eq. 14), ``"noise"`` (eq. 15);
            data-driven: ``"plateau"``, ``"conflict"``.
        policy: your own :class:`~mt2st_lightning.policies.Policy` instance, instead of a named strategy (in
            LightningCLI: ``policy: {class_path: mt2st_lightning.policies.SwitchPolicy, init_args: ...}``).
        schedules: one :class:`~mt2st_lightning.Schedule` per auxiliary task; with an adaptive ``strategy``
            they are the envelope its measured factors scale.
        **params: the strategy's parameters: the keyword arguments of its policy class (e.g. ``switch_at``,
            ``gamma0`` of :class:`~mt2st_lightning.policies.SwitchPolicy`), where each is documented. ``None``
            means *not given*: the strategy uses its default, and a parameter the strategy would ignore is an
            error.
        unit: ``"step"`` counts optimizer steps (``trainer.global_step``), ``"epoch"`` counts epochs.
        on_nonfinite: what a NaN/inf task loss does: ``"raise"`` stops training naming the step it happened at
            (and the task, when the read falls in that step), ``"skip"`` drops that step's update on all ranks, ``"off"`` checks nothing
            (see :mod:`~mt2st_lightning.guards`).
        save_single_task: a file name (relative to the run's log directory) or path: at the end of training,
            if auxiliary heads were dropped, the primary-only model is saved there, loadable with
            ``Model.load_from_checkpoint(path, strict=False)``.
        log_weights: log ``mt2st/weight/<task>`` and ``mt2st/active_tasks`` on Lightning's logging steps, and
            after each measuring step what the policy measured (``Policy.diagnostics``).
        release_heads: also free a dropped head's weights and buffers, so that the model takes the memory of
            a single-task model (also when resuming a checkpoint saved without it). Its checkpoints then hold
            the dropped heads as empty tensors; load them through Lightning, which releases the heads first.
    """

    def __init__(
        self,
        strategy: str | None = None,
        *,
        policy: Policy | None = None,
        schedules: Mapping[str, Schedule] | None = None,
        unit: str = "step",
        on_nonfinite: str = "raise",
        save_single_task: str | None = None,
        log_weights: bool = True,
        release_heads: bool = False,
        **params: Any,
    ) -> None:
        self.policy: Policy = build_policy(strategy, policy, schedules, params)
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        self.strategy: str = self.policy.name
        self.unit = unit
        self.guard = NonFiniteGuard(on_nonfinite, unit)
        self.save_single_task = save_single_task
        self.log_weights = log_weights
        self.release_heads = release_heads
        # State (saved in checkpoints, with the policy's own): the run's planned length in `unit`, resolved
        # once per run; the time each dropped task's head left; the heads released; the optimizers' layout.
        self.total: float | None = None
        self.drop_times: dict[str, int] = {}
        self.released: set[str] = set()
        self._layout: resume.Layout = []
        # Per fit: the state a checkpoint restored (applied in on_train_start, the first hook after any restore),
        # and its optimizer layout until the optimizers are matched to it; the step bookkeeping.
        self._restored: Mapping[str, Any] | None = None
        self._unmatched_layout: resume.Layout | None = None
        self._reducer: StrategyReducer | None = None
        self._time: int | None = None
        self._step: int | None = None
        self._multi_task = True  # any auxiliary task still active (read on every step: kept as a flag)
        self.measuring = False  # this step is one the policy observes (the cost meter reads it)
        self._warned_no_record = False

    # ------------------------------------------------------------------ a fit: checks, restore, plan
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        mt2st_module(pl_module)
        heads.check_can_drop(trainer.strategy, self.release_heads)
        self.total, self.drop_times, self.released, self._layout = None, {}, set(), []
        self._restored = self._unmatched_layout = None
        self.guard.reset()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) > 1 and self.unit == "step":
            raise RuntimeError(
                f"MT2STCallback(unit='step') counts time in optimizer steps, and this module configures "
                f"{len(trainer.optimizers)} optimizers, each of which advances trainer.global_step. Put all "
                "parameters in one optimizer (param groups may differ), or use unit='epoch'."
            )
        sharding.check_head_units(pl_module, trainer.strategy.model)  # type: ignore[arg-type]  # sharded by now
        if internals.fsdp2_units(pl_module):  # sharded with FSDP2: before its distributed restore
            pl_module.track_drops_in_state_dict(unfreeze_on_load=True)  # type: ignore[attr-defined]
        self._match_optimizers(trainer, pl_module)  # a checkpoint restored before setup
        self.guard.read_every(trainer.log_every_n_steps, trainer.accumulate_grad_batches)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Called before load_state_dict: the layout is read from the checkpoint itself.
        self._unmatched_layout = (checkpoint.get("callbacks") or {}).get(self.state_key, {}).get("optimizer_layout")
        self._match_optimizers(trainer, pl_module)  # a checkpoint restored after setup

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("strategy") != self.strategy or state_dict.get("unit") != self.unit:
            raise ValueError(
                f"checkpoint holds MT2ST state for strategy={state_dict.get('strategy')!r}, "
                f"unit={state_dict.get('unit')!r}; this callback has strategy={self.strategy!r}, unit={self.unit!r}"
            )
        self._restored = state_dict

    def _match_optimizers(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Between the optimizers' creation and the loading of their state, in either restore order.
        layout = self._unmatched_layout
        if layout is not None and resume.match_restored_optimizers(trainer, pl_module, layout):  # type: ignore[arg-type]
            self._unmatched_layout = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first hook after every restore (modules, callbacks, optimizers, the step counter), whatever the
        # strategy's order: the plan, the policy's state and the drops are applied here.
        module: MT2STMixin = pl_module  # type: ignore[assignment]
        _stop_unfreezing_on_load(module)
        restored = self._restored
        if restored is None:  # every rank must decide at the same step: rank 0's plan wins
            self.total = trainer.strategy.broadcast(self._planned_total(trainer), src=0)
        else:
            self.total = restored["total"]
        self._reducer = StrategyReducer(trainer.strategy)
        self.policy.bind(module.auxiliary_tasks, self.total, self.unit)
        self.policy.use_shared_parameters(module.shared_parameters())
        if restored is not None:
            self.policy.load_state_dict(restored.get("policy", {}))
            self.drop_times = {task: int(t) for task, t in restored["drop_times"].items()}
        t = self._now(trainer)
        self.released |= resume.restore_drops(trainer, module, self.policy, t, self.unit, restored, self.release_heads)
        self._layout = resume.optimizer_layout(trainer.optimizers, module)
        self._time = self._step = None
        self.measuring = False
        self._multi_task = len(module.active_tasks) > 1
        if t == 0 and self.strategy != "stl":
            at_start = sorted(self.policy.finished(0, module.auxiliary_tasks))
            if at_start:
                rank_zero_warn(
                    f"MT2ST ({self.strategy}): auxiliary task(s) {at_start} are finished at {self.unit} 0 of "
                    f"{self.total}, so this run trains the primary task alone (a fractional switch_at rounds to 0 "
                    "in a very short run?)"
                )

    def _planned_total(self, trainer: pl.Trainer) -> float | None:
        if self.unit == "epoch":
            return float(trainer.max_epochs) if trainer.max_epochs not in (None, -1) else None
        total = trainer.estimated_stepping_batches
        return float(total) if math.isfinite(total) else None

    def _now(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    # ------------------------------------------------------------------ each optimizer-step boundary
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step:  # inside a gradient-accumulation window nothing moves: neither do the weights
            return
        self._step = step
        module: MT2STMixin = pl_module  # type: ignore[assignment]
        t = step if self.unit == "step" else trainer.current_epoch
        if t != self._time:
            self._time = t
            if self._multi_task:  # single-task from here on: nothing left to ask, nothing to pay
                self._ask_policy(trainer, module, t)
        # Logging steps only (as Lightning logs), and the run's first step, so a weight curve starts at step 0.
        if self.log_weights and trainer.loggers and (internals.is_logging_step(trainer) or step == 0):
            self._log({names.weight(task): module.task_weights.get(task, 0.0) for task in module.auxiliary_tasks}
                      | {names.ACTIVE_TASKS: float(len(module.active_tasks))}, trainer)

    def _ask_policy(self, trainer: pl.Trainer, module: MT2STMixin, t: int) -> None:
        aux = module.active_tasks[1:]
        finished = set(self.policy.finished(t, aux))
        if finished:
            tasks = [task for task in aux if task in finished]
            heads.drop_heads(trainer, module, tasks, release=self.release_heads)
            self.drop_times.update((task, t) for task in tasks)
            if self.release_heads:
                self.released.update(tasks)
            if trainer.loggers:
                self._log({names.SWITCH_STEP_PREFIX + task: float(t) for task in tasks}, trainer)
            aux = module.active_tasks[1:]
            self._multi_task = bool(aux)
        self.measuring = False
        if aux:
            module.task_weights = checked_weights(self.policy, t, aux, self.unit)
            self.measuring = self.policy.wants_step(t)

    def _log(self, metrics: dict[str, float], trainer: pl.Trainer) -> None:
        # Straight to the loggers (as LearningRateMonitor does): `self.log` costs ~2 ms a step here, since
        # Lightning re-processes every key logged so far in the epoch.
        step = internals.logging_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ between forward and backward
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        record = pl_module.take_step_record()  # type: ignore[attr-defined]
        if record is None:
            if self.measuring:
                raise step_record.missing_record_error(self.strategy)
            if not self._warned_no_record:
                self._warned_no_record = True
                step_record.warn_missing_record(pl_module)
        if self.guard.active:
            losses, total = (record.losses, record.total) if record else ({"<the training loss>": loss}, loss)
            self.guard.record(trainer, self._time or 0, losses, total)
        if record is None or not self.measuring:
            return
        self.measuring = False
        if not self.guard.all_finite(trainer, record.losses):
            return  # a step the guard skips is never observed ("raise" raises here)
        record = step_record.as_backpropagated(record, loss, trainer, pl_module.automatic_optimization, self.strategy)
        assert self._reducer is not None and self._time is not None
        with sharding.root_kept_gathered(pl_module):  # FSDP2: a measurement's backward would reshard the root
            self.policy.observe_step(self._time, record, self._reducer)
        found = self.policy.diagnostics() if self.log_weights and trainer.loggers else None
        if found:
            self._log({names.policy_metric(self.policy.name, key): value for key, value in found.items()}, trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._reducer is None:
            return
        self.policy.observe_validation(self._now(trainer), trainer.callback_metrics, self._reducer)

    # ------------------------------------------------------------------ after backward, and the end
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.guard.mode == "skip":
            self.guard.skip_update(trainer, optimizer, trainer.global_step)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.check(trainer, self._now(trainer))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.guard.check(trainer, self._now(trainer))  # a non-finite step never reaches a checkpoint silently

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.check(trainer, self._now(trainer))
        if self.save_single_task:
            save_single_task(trainer, pl_module, self.save_single_task)  # type: ignore[arg-type]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            _stop_unfreezing_on_load(pl_module)  # a fit that failed before on_train_start

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "unit": self.unit,
            "total": self.total,
            "drop_times": dict(self.drop_times),
            "released": sorted(self.released),
            "policy": self.policy.state_dict(),
            "optimizer_layout": self._layout,
        }


def _stop_unfreezing_on_load(module: Any) -> None:
    # A restore outside a fit's start (e.g. trainer.test(ckpt_path=...) after it) leaves dropped heads frozen.
    if hasattr(module, "mt2st_drops"):  # tracked on fit start (FSDP2)
        module.track_drops_in_state_dict(unfreeze_on_load=False)


# LightningCLI (jsonargparse) reads this signature: every registered strategy's parameters, typed, in place of
# **params, so that the flat form (`strategy: switch`, `switch_at: 60`) is type-checked like any argument.
MT2STCallback.__init__.__signature__ = flat_signature(MT2STCallback.__init__)  # type: ignore[attr-defined]
