"""``MT2STCallback``: moves a multi-task LightningModule to single-task training.

The only stateful piece of MT2ST and the only one that decides. At each optimizer-step boundary it writes
the auxiliary weights into the module (``MT2STMixin.task_weights``); when a task is finished it drops the
head for real: the forward stops running it, its parameters are frozen with no gradient, its optimizer
state is freed, and the DDP reducer is rebuilt without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from mt2st_lightning import adaptive
from mt2st_lightning.mixin import MT2STMixin, mt2st_module
from mt2st_lightning.schedules import ADAPTIVE_STRATEGIES, STRATEGIES, Param, Schedule, schedules_for

__all__ = ["MT2STCallback"]

Unit = Literal["step", "epoch"]
NonFinitePolicy = Literal["raise", "skip", "off"]


class MT2STCallback(Callback):
    r"""Weigh, then drop, a module's auxiliary tasks (MT2ST).

    Args:
        strategy: ``"stl"``, ``"mtl"``, ``"diminish"``, ``"switch"``, or an adaptive one: ``"gradnorm"``
            (eq. 13), ``"fisher"`` (eq. 14), ``"noise"`` (eq. 15). See :func:`~mt2st_lightning.schedules_for`.
        schedules: instead of a named strategy, one :class:`~mt2st_lightning.Schedule` per auxiliary task.
        gamma0, eta, nu, switch_at, prune_below: the strategy's parameters; each one value, or a mapping from
            auxiliary task to its own value. ``switch_at`` is an int (step or epoch, per ``unit``) or a float
            in (0, 1), a fraction of the run (``Trainer.estimated_stepping_batches`` optimizer steps).
        unit: ``"step"`` counts optimizer steps (``trainer.global_step``), ``"epoch"`` counts epochs.
        budget: the adaptive strategies' ``lambda``: their factors sum to it. With ``strategy="gradnorm"``,
            ``None`` keeps eq. 13's raw ratios ``||g_0|| / ||g_k||`` (normalising cancels ``||g_0||``, so with
            one auxiliary task a budget makes the factor constant).
        adapt_every: the adaptive strategies measure on the first batch of every this many units of time
            (optimizer steps or epochs, per ``unit``); the new factors apply from the next unit on.
            ``gradnorm``/``fisher`` cost one extra backward per active task then.
        adapt_decay: exponential smoothing of the measured statistics, in [0, 1).
        on_nonfinite: what a NaN/inf task loss does: ``"raise"`` stops training with the task named,
            ``"skip"`` drops the step's update (all ranks agree), ``"off"`` checks nothing and so adds no
            host-device synchronisation.
        save_single_task: a file name (relative to the run's log directory) or path: at the end of training,
            if auxiliary heads were dropped, the primary-only model is saved there, loadable with
            ``Model.load_from_checkpoint(path, strict=False)``.
        log_weights: log ``mt2st/weight/<task>`` and ``mt2st/active_tasks`` on Lightning's logging steps.
        release_heads: also free a dropped head's weights and buffers, so that the model takes the memory of
            a single-task model. Its checkpoints then hold the dropped heads as empty tensors; load them
            through Lightning (``load_from_checkpoint``, ``ckpt_path=``), which releases the heads first.
    """

    def __init__(
        self,
        strategy: str | None = None,
        *,
        schedules: Mapping[str, Schedule] | None = None,
        gamma0: Param = 1.0,
        eta: Param = 0.01,
        nu: Param = 1.0,
        switch_at: Param = None,
        prune_below: Param = None,
        unit: Unit = "step",
        budget: float | None = 1.0,
        adapt_every: int = 10,
        adapt_decay: float = 0.9,
        on_nonfinite: NonFinitePolicy = "raise",
        save_single_task: str | None = None,
        log_weights: bool = True,
        release_heads: bool = False,
    ) -> None:
        if strategy is None and schedules is None:
            raise ValueError(f"give MT2STCallback a strategy (one of {', '.join(STRATEGIES)}) or per-task schedules")
        if schedules is not None:
            bad = {t: s for t, s in schedules.items() if not isinstance(s, Schedule)}
            if bad:
                raise TypeError(f"schedules must map task names to Schedule objects, got {bad}")
            if strategy is not None and strategy not in ADAPTIVE_STRATEGIES:
                raise ValueError(
                    f"MT2STCallback got both strategy={strategy!r} and schedules: the schedules define the weights; "
                    f"drop strategy, or pass one of {', '.join(ADAPTIVE_STRATEGIES)} to scale the schedules adaptively"
                )
            strategy = strategy or "custom"
        if strategy not in STRATEGIES and strategy != "custom":
            raise ValueError(f"unknown MT2ST strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        if on_nonfinite not in ("raise", "skip", "off"):
            raise ValueError(f"on_nonfinite must be 'raise', 'skip' or 'off', got {on_nonfinite!r}")
        if not (isinstance(adapt_every, int) and adapt_every >= 1):
            raise ValueError(f"adapt_every must be an int >= 1, got {adapt_every!r}")
        if not 0.0 <= adapt_decay < 1.0:
            raise ValueError(f"adapt_decay must lie in [0, 1), got {adapt_decay}")
        if budget is None:
            if strategy != "gradnorm":
                raise ValueError("budget=None (raw eq. 13 ratios) applies to strategy='gradnorm' only; give a number > 0")
        elif not (math.isfinite(budget) and budget > 0):
            raise ValueError(f"budget must be a finite number > 0, got {budget}")
        self.strategy = strategy
        self._params = dict(gamma0=gamma0, eta=eta, nu=nu, switch_at=switch_at, prune_below=prune_below)
        if schedules is None:
            _check_values(strategy, self._params)
        self._given_schedules = dict(schedules) if schedules is not None else None
        self.unit = unit
        self.budget = None if budget is None else float(budget)
        self.adapt_every = adapt_every
        self.adapt_decay = adapt_decay
        self.on_nonfinite = on_nonfinite
        self.save_single_task = save_single_task
        self.log_weights = log_weights
        self.release_heads = release_heads

        self.schedules: dict[str, Schedule] = {}
        # State (saved in checkpoints).
        self.total: float | None = None  # the run's planned length, in ``unit``, resolved once
        self.drop_times: dict[str, int] = {}  # task -> time (in ``unit``) at which its head was dropped
        self._stats: dict[str, Tensor] = {}  # adaptive statistics, smoothed
        self._factors: dict[str, float] = {}  # adaptive factors in use
        # Per-process bookkeeping (not saved).
        self._last_time: int | None = None
        self._measured_time: int | None = None
        self._skip_update = False
        self._restored = False
        self.measuring = False

    @property
    def is_adaptive(self) -> bool:
        return self.strategy in ADAPTIVE_STRATEGIES

    # ------------------------------------------------------------------ setting up: fail before training
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        module = mt2st_module(pl_module)
        aux = module.auxiliary_tasks
        if self._given_schedules is not None:
            unknown = sorted(set(self._given_schedules) - set(aux))
            missing = sorted(set(aux) - set(self._given_schedules))
            if unknown or missing:
                raise ValueError(
                    f"schedules must cover exactly the module's auxiliary tasks {list(aux)}: "
                    + (f"unknown {unknown}" if unknown else "")
                    + ("; " if unknown and missing else "")
                    + (f"missing {missing}" if missing else "")
                )
            self.schedules = dict(self._given_schedules)
        else:
            self.schedules = schedules_for(self.strategy, aux, **self._params)
        _check_can_drop(trainer.strategy)
        # A fresh plan for every fit; a resumed fit gets its saved state back right after this hook.
        self.total, self.drop_times, self._stats, self._factors = None, {}, {}, {}
        self._restored = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) > 1 and self.unit == "step":
            raise RuntimeError(
                f"MT2STCallback(unit='step') counts schedule time in optimizer steps, and this module configures "
                f"{len(trainer.optimizers)} optimizers, each of which advances trainer.global_step. Put all "
                "parameters in one optimizer (param groups may differ), or use unit='epoch'."
            )
        if not self._restored:  # a resumed run keeps the plan it was started with
            total = self._planned_total(trainer)
            # Every rank must switch at the same step: take rank 0's plan and make sure all ranks agree.
            total = trainer.strategy.broadcast(total, src=0)
            self.total = total
        for schedule in self.schedules.values():
            schedule.validate(self.total)
        self._last_time = None
        self._measured_time = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in on_fit_start: a resumed run's step counter is restored in between.
        module = mt2st_module(pl_module)
        t = self._time(trainer)
        unfinished = sorted(task for task in module.dropped_tasks if not self.schedules[task].finished(t, self.total))
        if unfinished:
            raise ValueError(
                f"the module's auxiliary task(s) {unfinished} were dropped (restored from the checkpoint), but under "
                f"this callback's schedules they are not finished at {self.unit} {t}: resume with the settings the "
                "run was started with"
            )
        at_start = sorted(task for task, sched in self.schedules.items() if sched.finished(0, self.total))
        if t == 0 and at_start and self.strategy != "stl":
            rank_zero_warn(
                f"MT2ST ({self.strategy}): auxiliary task(s) {at_start} are finished at {self.unit} 0 of {self.total}, "
                "so this run trains the primary task alone (a fractional switch_at rounds to 0 in a very short run?)"
            )

    def _planned_total(self, trainer: pl.Trainer) -> float | None:
        if self.unit == "epoch":
            return float(trainer.max_epochs) if trainer.max_epochs not in (None, -1) else None
        total = trainer.estimated_stepping_batches
        return float(total) if math.isfinite(total) else None

    # ------------------------------------------------------------------ each optimizer-step boundary
    def _time(self, trainer: pl.Trainer) -> int:
        return trainer.global_step if self.unit == "step" else trainer.current_epoch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        module: MT2STMixin = pl_module  # type: ignore[assignment]
        t = self._time(trainer)
        if t != self._last_time:
            # Within one gradient-accumulation window the time does not move, so neither do the weights.
            self._last_time = t
            self._update_tasks(trainer, module, t)
        # The adaptive measurement runs on the first batch of its step (or epoch) only; the cost meter reads this.
        self.measuring = (
            self.is_adaptive and t % self.adapt_every == 0 and self._measured_time != t and len(module.active_tasks) > 1
        )
        if self.log_weights and trainer.loggers and trainer._logger_connector.should_update_logs:
            # Straight to the loggers, on logging steps only (as LearningRateMonitor does): `self.log` costs
            # ~2 ms a step here, since Lightning re-processes every key logged so far in the epoch.
            weights = module.task_weights
            metrics = {f"mt2st/weight/{task}": weights.get(task, 0.0) for task in module.auxiliary_tasks}
            metrics["mt2st/active_tasks"] = float(len(weights))
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _update_tasks(self, trainer: pl.Trainer, module: MT2STMixin, t: int) -> None:
        aux = module.active_tasks[1:]
        if not aux:  # single-task from here on: nothing left to weigh or drop, and nothing to pay for it
            return
        finished = [task for task in aux if self.schedules[task].finished(t, self.total)]
        if finished:
            self._drop(trainer, module, finished, t)
            aux = module.active_tasks[1:]
        # Until the first measurement: an equal share of the budget (raw ratios: 1).
        default = self.budget / len(aux) if self.is_adaptive and self.budget is not None and aux else 1.0
        module.task_weights = {task: self.schedules[task](t, self.total) * self._factors.get(task, default) for task in aux}

    def _drop(self, trainer: pl.Trainer, module: MT2STMixin, tasks: list[str], t: int) -> None:
        params = {id(p): p for task in tasks for p in module.drop_task(task, release=self.release_heads)}
        for optimizer in trainer.optimizers:
            for p in params.values():
                optimizer.state.pop(p, None)
        _rebuild_ddp_reducer(trainer.strategy)
        for task in tasks:
            self.drop_times[task] = t
            self._factors.pop(task, None)
        rank_zero_info(
            f"MT2ST ({self.strategy}): auxiliary task(s) {tasks} finished at {self.unit} {t}; their heads left "
            f"the computation. Active tasks: {list(module.active_tasks)}"
        )

    # ------------------------------------------------------------------ between forward and backward
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        module: MT2STMixin = pl_module  # type: ignore[assignment]
        losses = module.last_task_losses
        if losses is None:
            return
        if self.on_nonfinite != "off":
            self._check_finite(trainer, loss, losses)
        if self.measuring:
            self.measuring = False
            self._measured_time = self._last_time
            self._measure(trainer, module, losses)

    def _check_finite(self, trainer: pl.Trainer, loss: Tensor, losses: Mapping[str, Tensor]) -> None:
        # A non-finite task loss makes the weighted total non-finite (0 * inf is nan): one check, one sync.
        total = loss if loss.ndim == 0 else loss.detach().float().sum()  # mt2st_loss returns a float32 scalar
        local_ok = math.isfinite(total.item())
        # Each rank sees its own batch; all of them must take the same decision.
        all_ok = trainer.strategy.reduce_boolean_decision(local_ok, all=True)
        if all_ok:
            return
        bad = [t for t, v in losses.items() if not bool(torch.isfinite(v.detach()).all())]
        where = f"task(s) {bad}" if bad else "another rank's loss"
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                f"MT2ST: non-finite loss in {where} at {self.unit} {self._last_time}. Lower the learning rate or "
                "the auxiliary weights, or pass MT2STCallback(on_nonfinite='skip') to skip such steps."
            )
        self._skip_update = True

    def _measure(self, trainer: pl.Trainer, module: MT2STMixin, losses: Mapping[str, Tensor]) -> None:
        aux = [t for t in module.active_tasks[1:]]
        if not aux:
            return

        def reduce(x: Tensor) -> Tensor:
            return trainer.strategy.reduce(x, reduce_op="mean")

        if self.strategy == "noise":
            values = reduce(torch.stack([losses[t].detach().float().reshape(()) for t in aux]))
            for task, v in zip(aux, values):
                self._stats[f"mean/{task}"] = adaptive.ema(self._stats.get(f"mean/{task}"), v, self.adapt_decay)
                self._stats[f"sq/{task}"] = adaptive.ema(self._stats.get(f"sq/{task}"), v * v, self.adapt_decay)
            variances = torch.stack([self._stats[f"sq/{t}"] - self._stats[f"mean/{t}"] ** 2 for t in aux])
            factors = adaptive.inverse_variance_weights(variances, self.budget)
        else:
            tasks = [module.primary_task, *aux]
            shared = list(module.shared_parameters())
            # Under fp16 autocast, small task gradients underflow unless the loss is scaled, as the
            # training backward is: measure with the GradScaler's scale and divide it out again.
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            sq = adaptive.squared_grad_norms([losses[t] * scale for t in tasks], shared, reduce) / scale**2
            if not bool(torch.isfinite(sq).all()):
                return  # the scaled gradients overflowed: skip this measurement, as GradScaler skips the step
            for task, v in zip(tasks, sq):
                self._stats[f"sqnorm/{task}"] = adaptive.ema(self._stats.get(f"sqnorm/{task}"), v, self.adapt_decay)
            smoothed = torch.stack([self._stats[f"sqnorm/{t}"] for t in tasks])
            if self.strategy == "gradnorm":
                factors = adaptive.grad_norm_ratio_weights(smoothed[0], smoothed[1:], self.budget)
            else:
                factors = adaptive.fisher_trace_weights(smoothed[1:], self.budget)
        # Applied from the next step boundary on: the weights stay constant within this step's window.
        self._factors.update(zip(aux, factors.tolist()))

    # ------------------------------------------------------------------ after backward
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        # Backward is done: let go of the task losses (and the graph nodes they hold) before the next batch.
        pl_module.clear_task_losses()  # type: ignore[attr-defined]
        if self._skip_update:
            # The gradients hold a non-finite contribution: drop them, so that this update changes nothing.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            self._skip_update = False

    # ------------------------------------------------------------------ the end: a deployable model
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module: MT2STMixin = pl_module  # type: ignore[assignment]
        if not self.save_single_task:
            return
        if not module.dropped_tasks:
            rank_zero_warn(
                f"MT2STCallback(save_single_task={self.save_single_task!r}): no auxiliary head was dropped in this "
                "run, so there is no single-task model to save"
            )
            return
        path = Path(self.save_single_task)
        if not path.is_absolute():
            path = Path(trainer.log_dir or trainer.default_root_dir) / path
        checkpoint = {
            "state_dict": module.single_task_state_dict(),
            "hyper_parameters": dict(getattr(pl_module, "hparams", {})),
            "mt2st": {"primary_task": module.primary_task, "dropped_tasks": sorted(module.dropped_tasks)},
            "pytorch-lightning_version": pl.__version__,
        }
        trainer.strategy.save_checkpoint(checkpoint, path)
        rank_zero_info(f"MT2ST: saved the single-task model to {path}")

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "unit": self.unit,
            "total": self.total,
            "drop_times": dict(self.drop_times),
            "stats": {k: v.cpu() for k, v in self._stats.items()},
            "factors": dict(self._factors),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("strategy") != self.strategy or state_dict.get("unit") != self.unit:
            raise ValueError(
                f"checkpoint holds MT2ST state for strategy={state_dict.get('strategy')!r}, "
                f"unit={state_dict.get('unit')!r}; this callback has strategy={self.strategy!r}, unit={self.unit!r}"
            )
        self.total = state_dict["total"]
        self.drop_times = dict(state_dict["drop_times"])
        self._stats = dict(state_dict["stats"])
        self._factors = dict(state_dict["factors"])
        self._restored = True


def _check_values(strategy: str, params: Mapping[str, Param]) -> None:
    """Fail at construction, not at fit time, on any bad value, per-task values included: only the task
    names of a per-task mapping wait until the module is attached."""

    def first(value: Param) -> Any:
        return next(iter(value.values()), None) if isinstance(value, Mapping) else value

    base = {name: first(value) for name, value in params.items()}
    schedules_for(strategy, ["<any task>"], **base)
    for name, value in params.items():
        if isinstance(value, Mapping):
            for v in value.values():
                schedules_for(strategy, ["<any task>"], **{**base, name: v})


def _check_can_drop(strategy: Strategy) -> None:
    """Head dropping rebuilds DDP's reducer; sharded strategies own flattened parameters and cannot drop."""
    sharded = "DeepSpeed" in type(strategy).__name__  # a DDPStrategy subclass that shards parameters
    if not (isinstance(strategy, SingleDeviceStrategy) or (isinstance(strategy, DDPStrategy) and not sharded)):
        raise RuntimeError(
            f"MT2STCallback drops auxiliary heads under single-device training and DDP "
            f"(strategy='ddp', 'ddp_spawn', ...); {type(strategy).__name__} is not supported."
        )
    if getattr(strategy, "_ddp_comm_hook", None) is not None:
        # A stateful hook (PowerSGD's error feedback) is keyed by gradient bucket, and a drop changes the buckets.
        raise RuntimeError(
            "MT2STCallback rebuilds the DDP reducer when it drops a head, which DDP communication hooks "
            "(DDPStrategy(ddp_comm_hook=...)) do not survive; train without the hook"
        )


def _rebuild_ddp_reducer(strategy: Strategy) -> None:
    """Re-wrap the module in DDP so that its reducer only waits for parameters that still need gradients.

    DDP fixes the set of parameters to reduce when it is built; after a head is frozen, plain DDP
    (``find_unused_parameters=False``) would wait for its gradients forever. Rebuilding at a step boundary
    costs one broadcast of the module's state, once per drop, and nothing on later steps.
    """
    if not isinstance(strategy, DDPStrategy) or not isinstance(strategy.model, DistributedDataParallel):
        return
    old = strategy.model
    if hasattr(old, "_remove_autograd_hooks"):
        # The old reducer's hooks stay on the parameters until it is garbage-collected; remove them now.
        old._remove_autograd_hooks()
    strategy.model = old.module
    strategy.configure_ddp()
