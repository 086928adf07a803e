"""``MT2STCallback``: the hooks that connect a policy to a multi-task LightningModule.

The callback decides nothing itself. Its :class:`~mt2st_lightning.policies.Policy` says what the auxiliary
weights are and which tasks are finished; the callback asks it at each optimizer-step boundary, shows it the
steps and validation metrics it asks to see, writes the weights into the module (``MT2STMixin.task_weights``)
and carries out drops with :func:`~mt2st_lightning.heads.drop_heads`. The non-finite guard
(:mod:`~mt2st_lightning.guards`) and the single-task export (:mod:`~mt2st_lightning.export`) are pieces of
their own that it calls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from mt2st_lightning import heads, names
from mt2st_lightning.export import save_single_task
from mt2st_lightning.guards import NonFiniteGuard
from mt2st_lightning.mixin import MT2STMixin, mt2st_module
from mt2st_lightning.policies import STRATEGIES, Policy, policy_for
from mt2st_lightning.policies.base import StrategyReducer
from mt2st_lightning.schedules import Schedule
from mt2st_lightning.step_record import StepRecord

__all__ = ["MT2STCallback"]

# Type hints that LightningCLI (jsonargparse) parses: int before float, so that `switch_at: 5` stays an int.
PerTask = Union[int, float, Mapping[str, Union[int, float, None]], None]
Bound = Union[int, float, None]


class MT2STCallback(Callback):
    r"""Weigh, then drop, a module's auxiliary tasks (MT2ST), as a :class:`~mt2st_lightning.policies.Policy` says.

    Give one of ``strategy`` (a name, with that strategy's parameters), ``schedules`` or ``policy``.

    Args:
        strategy: ``"stl"``, ``"mtl"``, ``"diminish"``, ``"switch"``; adaptive: ``"gradnorm"`` (eq. 13),
            ``"fisher"`` (eq. 14), ``"noise"`` (eq. 15); data-driven: ``"plateau"``, ``"conflict"``.
        policy: your own :class:`~mt2st_lightning.policies.Policy` instance, instead of a named strategy.
        schedules: one :class:`~mt2st_lightning.Schedule` per auxiliary task; with an adaptive ``strategy``
            they are the envelope its measured factors scale.
        gamma0, eta, nu, switch_at, prune_below, budget, adapt_every, adapt_decay, measure_on, monitor, mode,
            patience, min_delta, min_step, max_step, threshold, window: the strategy's parameters (see the
            README's strategy table). ``None`` means *not given*: the strategy uses its default, and a
            parameter the strategy would ignore is an error. Numeric ones are one value or a ``{task: value}``
            mapping. ``switch_at`` is an int (step or epoch, per ``unit``) or a float in (0, 1), a fraction of
            the run. ``budget="raw"`` keeps ``gradnorm``'s raw eq. 13 ratios.
        unit: ``"step"`` counts optimizer steps (``trainer.global_step``), ``"epoch"`` counts epochs.
        on_nonfinite: what a NaN/inf task loss does: ``"raise"`` stops training naming the task and step (read
            with a delay, without a host-device synchronisation per step; see :mod:`~mt2st_lightning.guards`),
            ``"skip"`` drops that step's update on all ranks (one synchronisation per optimizer step),
            ``"off"`` checks nothing.
        save_single_task: a file name (relative to the run's log directory) or path: at the end of training,
            if auxiliary heads were dropped, the primary-only model is saved there, loadable with
            ``Model.load_from_checkpoint(path, strict=False)``.
        log_weights: log ``mt2st/weight/<task>`` and ``mt2st/active_tasks`` on Lightning's logging steps, and
            after each measuring step what the policy measured (``Policy.diagnostics``; e.g. ``conflict``'s
            ``mt2st/conflict/cosine/<task>``).
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
        gamma0: PerTask = None,
        eta: PerTask = None,
        nu: PerTask = None,
        switch_at: PerTask = None,
        prune_below: PerTask = None,
        budget: Union[int, float, str, None] = None,
        adapt_every: int | None = None,
        adapt_decay: Union[int, float, None] = None,
        measure_on: str | None = None,
        monitor: str | None = None,
        mode: str | None = None,
        patience: int | None = None,
        min_delta: Union[int, float, None] = None,
        min_step: Bound = None,
        max_step: Bound = None,
        threshold: Union[int, float, None] = None,
        window: int | None = None,
        unit: str = "step",
        on_nonfinite: str = "raise",
        save_single_task: str | None = None,
        log_weights: bool = True,
        release_heads: bool = False,
    ) -> None:
        given = {
            name: value
            for name, value in dict(
                gamma0=gamma0, eta=eta, nu=nu, switch_at=switch_at, prune_below=prune_below, budget=budget,
                adapt_every=adapt_every, adapt_decay=adapt_decay, measure_on=measure_on, monitor=monitor, mode=mode,
                patience=patience, min_delta=min_delta, min_step=min_step, max_step=max_step, threshold=threshold,
                window=window,
            ).items()
            if value is not None
        }
        if given.get("budget") == "raw":
            given["budget"] = None  # the policies' spelling of "no budget"
        if policy is not None:
            if strategy is not None or schedules is not None or given:
                extra = [n for n, v in (("strategy", strategy), ("schedules", schedules)) if v is not None] + list(given)
                raise ValueError(f"MT2STCallback(policy=...) is the whole decision; drop {', '.join(extra)}")
            if not isinstance(policy, Policy):
                raise TypeError(f"policy must be a mt2st_lightning.policies.Policy, got {type(policy).__name__}")
        elif strategy is None and schedules is None:
            raise ValueError(f"give MT2STCallback a strategy (one of {', '.join(STRATEGIES)}), schedules or a policy")
        else:
            policy = policy_for(strategy, schedules=schedules, **given)
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        self.policy: Policy = policy
        self.strategy: str = policy.name
        self.unit = unit
        self.guard = NonFiniteGuard(on_nonfinite, unit)
        self.on_nonfinite = on_nonfinite
        self.save_single_task = save_single_task
        self.log_weights = log_weights
        self.release_heads = release_heads
        # State (saved in checkpoints, with the policy's own).
        self.total: float | None = None  # the run's planned length, in ``unit``, resolved once per run
        self.drop_times: dict[str, int] = {}  # task -> time (in ``unit``) at which its head was dropped
        # Per-fit bookkeeping (not saved).
        self.measuring = False  # this step is one the policy observes (the cost meter reads it)
        self._time: int | None = None
        self._step: int | None = None
        self._multi_task = True  # any auxiliary task still active (read on every step: kept as a flag)
        self._restored_state: Mapping[str, Any] | None = None
        self._reducer: StrategyReducer | None = None
        self._warned_no_record = False

    # ------------------------------------------------------------------ setting up: fail before training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        mt2st_module(pl_module)
        heads.check_can_drop(trainer.strategy)
        # A fresh plan for every fit; a resumed fit gets its saved state back right after this hook.
        self.total, self.drop_times, self._restored_state = None, {}, None
        self.guard.reset()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Resuming a fit: the module froze the heads the checkpoint had dropped, but the run that saved it built
        # its optimizer while they still trained. Thaw them while this fit builds its optimizer (so that
        # `filter(lambda p: p.requires_grad, ...)` sees the same parameters, and the saved optimizer state fits);
        # on_fit_start freezes them again.
        if trainer.state.fn == "fit" and isinstance(pl_module, MT2STMixin):
            for task in pl_module.dropped_tasks:
                pl_module.thaw_dropped_head(task)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = mt2st_module(pl_module)
        if len(trainer.optimizers) > 1 and self.unit == "step":
            raise RuntimeError(
                f"MT2STCallback(unit='step') counts time in optimizer steps, and this module configures "
                f"{len(trainer.optimizers)} optimizers, each of which advances trainer.global_step. Put all "
                "parameters in one optimizer (param groups may differ), or use unit='epoch'."
            )
        if module.freeze_dropped_heads():  # thawed by on_load_checkpoint for the optimizer's sake
            heads.rebuild_ddp_reducer(trainer.strategy)
        if self._restored_state is None:  # a resumed run keeps the plan it was started with
            # Every rank must decide at the same step: rank 0's plan wins.
            self.total = trainer.strategy.broadcast(self._planned_total(trainer), src=0)
        self._reducer = StrategyReducer(trainer.strategy)
        self.policy.bind(module.auxiliary_tasks, self.total, self.unit)
        self.policy.use_shared_parameters(module.shared_parameters())
        if self._restored_state is not None:
            self.policy.load_state_dict(self._restored_state.get("policy", {}))
        self._time = self._step = None
        self.measuring = False
        self._multi_task = len(module.active_tasks) > 1
        self.guard.read_every(trainer.log_every_n_steps, trainer.accumulate_grad_batches)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: a resumed run's step counter is restored in between.
        module: MT2STMixin = pl_module  # type: ignore[assignment]
        t = self._now(trainer)
        dropped = sorted(module.dropped_tasks)
        if dropped:
            unfinished = sorted(set(dropped) - set(self.policy.finished(t, dropped)))
            if unfinished:
                how = (
                    "restored from the checkpoint" if self._restored_state is not None
                    else "by an earlier fit of this module, not from a checkpoint"
                )
                raise ValueError(
                    f"the module's auxiliary task(s) {unfinished} were dropped ({how}), but this callback's "
                    f"{self.strategy!r} policy does not finish them at {self.unit} {t}: "
                    + (
                        "resume with the settings the run was started with"
                        if self._restored_state is not None
                        else "train a fresh module, or resume that fit with trainer.fit(..., ckpt_path=...)"
                    )
                )
            if self.release_heads:  # e.g. resuming a checkpoint saved without release_heads
                heads.drop_heads(trainer, module, dropped, release=True)
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
        if self.log_weights and trainer.loggers and (heads.is_logging_step(trainer) or step == 0):
            self._log({names.weight(task): module.task_weights.get(task, 0.0) for task in module.auxiliary_tasks}
                      | {names.ACTIVE_TASKS: float(len(module.active_tasks))}, trainer)

    def _ask_policy(self, trainer: pl.Trainer, module: MT2STMixin, t: int) -> None:
        aux = module.active_tasks[1:]
        finished = set(self.policy.finished(t, aux))
        if finished:
            self._drop(trainer, module, [task for task in aux if task in finished], t)
            aux = module.active_tasks[1:]
            self._multi_task = bool(aux)
        self.measuring = False
        if aux:
            weights = self.policy.weights(t, aux)
            bad = {task: w for task, w in weights.items() if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0)}
            if set(weights) != set(aux) or bad:
                raise ValueError(
                    f"policy {self.strategy!r} must give a finite weight >= 0 to each active auxiliary task {list(aux)} "
                    f"at {self.unit} {t}, gave {dict(weights)}"
                )
            module.task_weights = weights
            self.measuring = self.policy.wants_step(t)

    def _drop(self, trainer: pl.Trainer, module: MT2STMixin, tasks: Sequence[str], t: int) -> None:
        heads.drop_heads(trainer, module, tasks, release=self.release_heads)
        for task in tasks:
            self.drop_times[task] = t
        if trainer.loggers:
            self._log({names.SWITCH_STEP_PREFIX + task: float(t) for task in tasks}, trainer)

    def _log(self, metrics: dict[str, float], trainer: pl.Trainer) -> None:
        # Straight to the loggers (as LearningRateMonitor does): `self.log` costs ~2 ms a step here, since
        # Lightning re-processes every key logged so far in the epoch.
        step = heads.logging_step(trainer)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    # ------------------------------------------------------------------ between forward and backward
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        record = pl_module.take_step_record()  # type: ignore[attr-defined]
        if record is None:
            self._no_record(trainer, pl_module, loss)
            return
        if self.guard.active:
            self.guard.record(trainer, self._time or 0, record.losses, record.total)
        if self.measuring:
            self.measuring = False
            self._observe(trainer, pl_module, record, loss)

    def _no_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.measuring:
            raise RuntimeError(
                f"MT2ST ({self.strategy}) observes this step's task losses, but training_step did not compute its "
                "loss with self.mt2st_loss(losses): return self.mt2st_loss(losses) (the weighted total) from "
                "training_step"
            )
        if self.guard.active:
            self.guard.record(trainer, self._time or 0, {"<the training loss>": loss}, loss)
        if not self._warned_no_record:
            self._warned_no_record = True
            rank_zero_warn(
                f"{type(pl_module).__name__}.training_step did not call self.mt2st_loss(losses), so MT2ST's auxiliary "
                "weights are not applied to its loss; return self.mt2st_loss(losses) from training_step"
            )

    def _observe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, record: StepRecord, loss: Tensor) -> None:
        if not self.guard.all_finite(trainer):
            return  # a step the guard skips is never observed ("raise" raises here)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        if not _backpropagates(loss, record.total, scale, pl_module.automatic_optimization and trainer.accumulate_grad_batches):
            raise RuntimeError(
                f"MT2ST ({self.strategy}) measures the task losses given to mt2st_loss, but the loss Lightning "
                "backpropagates is not the total mt2st_loss returned: return self.mt2st_loss(losses) unchanged "
                "from training_step (put any extra loss term into `losses` as a task of its own)"
            )
        if scale != 1.0:
            # Under fp16 the policy scales the losses as the training backward does, and divides the scale out.
            record = replace(record, loss_scale=scale)
        assert self._reducer is not None and self._time is not None
        self.policy.observe_step(self._time, record, self._reducer)
        if self.log_weights and trainer.loggers:
            found = self.policy.diagnostics()
            if found:
                self._log({names.policy_metric(self.policy.name, key): value for key, value in found.items()}, trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._reducer is None:
            return
        self.policy.observe_validation(self._now(trainer), trainer.callback_metrics, self._reducer)

    # ------------------------------------------------------------------ after backward
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.guard.mode == "skip":
            self.guard.skip_update(trainer, optimizer, trainer.global_step)

    # ------------------------------------------------------------------ before anything is saved, and the end
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.check(trainer, self._now(trainer))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.guard.check(trainer, self._now(trainer))  # a non-finite step never reaches a checkpoint silently

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.guard.check(trainer, self._now(trainer))
        if self.save_single_task:
            save_single_task(trainer, pl_module, self.save_single_task)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "unit": self.unit,
            "total": self.total,
            "drop_times": dict(self.drop_times),
            "policy": self.policy.state_dict(),
            "release_heads": self.release_heads,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("strategy") != self.strategy or state_dict.get("unit") != self.unit:
            raise ValueError(
                f"checkpoint holds MT2ST state for strategy={state_dict.get('strategy')!r}, "
                f"unit={state_dict.get('unit')!r}; this callback has strategy={self.strategy!r}, unit={self.unit!r}"
            )
        if "policy" not in state_dict and state_dict.get("stats"):
            raise ValueError(
                "this checkpoint was saved by mt2st-lightning 0.1 before policies, with adaptive statistics this "
                "version cannot read; restart the run, or resume it with the version that saved it"
            )
        self.total = state_dict["total"]
        self.drop_times = dict(state_dict["drop_times"])
        self._restored_state = state_dict


def _backpropagates(loss: Tensor, total: Tensor, scale: float, accumulate: int) -> bool:
    """Whether ``loss`` is ``total`` as Lightning backpropagates it: itself, or divided by the gradient
    accumulation factor and multiplied by the GradScaler's scale, at most two operations above it in the graph.
    Checked on measuring steps only (the value comparison reads the device)."""
    if loss is total:
        return True
    target, frontier, derived = total.grad_fn, [loss.grad_fn], False
    for _ in range(2):
        frontier = [f for fn in frontier if fn is not None for f, _ in fn.next_functions]
        derived |= target is not None and any(f is target for f in frontier)
    expected = total.detach().float() * (scale / max(int(accumulate), 1))
    return derived and bool(torch.allclose(loss.detach().float(), expected, rtol=1e-4, atol=0.0, equal_nan=True))
