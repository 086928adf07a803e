"""The measuring machinery: data, the hand-written baselines, Lightning fits with clocks and probes.

Nothing here knows which variants exist: ``variants.py`` lists them and ``run.py`` drives the rounds.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import random
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers.logger import DummyLogger
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics import Accuracy, MeanSquaredError

from mt2st_lightning import MT2STCallback
from mt2st_lightning.examples.data import DigitsDataModule
from mt2st_lightning.examples.models import MultiTaskModel

from variants import ModelSpec, Variant, resolve_callback

PRIMARY = "digit"

# Lightning's chatter (and MT2ST's "heads left the computation" info line) would flood the output.
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")


# ============================================================================== data
class _Batches(Dataset):
    """``length`` pre-collated batches, cycling over a fixed list: one epoch, no collation cost, no shuffling.

    Every variant sees batch ``i % len(batches)`` at step ``i``: the same data in the same order.
    """

    def __init__(self, batches: Sequence[dict[str, Tensor]], length: int) -> None:
        self.batches = list(batches)
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self.batches[i % len(self.batches)]


@dataclass
class Data:
    batches: list[dict[str, Tensor]]
    task_specs: dict[str, dict[str, Any]]

    def loader(self, steps: int) -> DataLoader:
        return DataLoader(_Batches(self.batches, steps), batch_size=None, shuffle=False, num_workers=0)


def digits_data(batch_size: int, seed: int = 0) -> Data:
    """The real 8x8 digits (training split) with the three pixel-derived auxiliary targets, pre-batched."""
    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup("fit")
    train = dm.splits["train"].tensors
    n = len(train["x"])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    batches = []
    for start in range(0, n - batch_size + 1, batch_size):  # full batches only: every step has the same shape
        idx = order[start : start + batch_size]
        batches.append({k: v[idx].contiguous() for k, v in train.items()})
    return Data(batches, dm.task_specs)


# ============================================================================== the modules
def _loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    # What MultiTaskModel.task_loss does.
    if kind == "classification":
        return F.cross_entropy(output.float(), target)
    return F.mse_loss(output.float(), target.float())


def _metric(spec: Mapping[str, Any]):
    if spec["kind"] == "classification":
        return Accuracy(task="multiclass", num_classes=spec["out_features"])
    return MeanSquaredError()


class PlainMultiTask(pl.LightningModule):
    """The hand-written baseline: the same encoder and heads, losses summed with fixed weights, no mixin and no
    callback. With ``tasks == (primary,)`` it is the plain single-task model. Its ``training_step`` does what
    ``MultiTaskModel.training_step`` does (the same logging and primary metric), minus MT2ST."""

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module], specs: Mapping[str, Any], primary: str,
                 weights: Mapping[str, float] | None = None, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        self.kinds = {t: specs[t]["kind"] for t in heads}
        self.primary = primary
        self.aux = tuple(t for t in heads if t != primary)
        self.weights = {t: float((weights or {}).get(t, 1.0)) for t in self.aux}
        self.lr, self.weight_decay = lr, weight_decay
        self.train_metric = _metric(specs[primary])

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        h = self.encoder(batch["x"])
        outputs = {t: self.heads[t](h) for t in self.heads}
        losses = {t: _loss(self.kinds[t], out, batch[t]) for t, out in outputs.items()}
        p = self.primary
        preds = outputs[p].argmax(-1) if self.kinds[p] == "classification" else outputs[p]
        self.train_metric(preds, batch[p])
        n = batch["x"].shape[0]
        self.log("train/primary_metric", self.train_metric, on_step=False, on_epoch=True, prog_bar=False, batch_size=n)
        total = losses[p].float()
        for t in self.aux:
            total = total + self.weights[t] * losses[t].float()
        self.log("train/loss", total, prog_bar=True, batch_size=n)
        self.log_dict({f"train/loss/{t}": v.detach() for t, v in losses.items()}, batch_size=n)
        return total

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


def build_module(model: ModelSpec, variant: Variant, data: Data, seed: int, compile_encoder: bool = False) -> pl.LightningModule:
    """The variant's LightningModule. All variants of one model start from the same weights: the plain ones copy
    the encoder and heads of a freshly seeded ``MultiTaskModel``."""
    torch.manual_seed(seed)
    mt = MultiTaskModel(model.make_encoder(), data.task_specs, primary=PRIMARY, head_hidden=model.head_hidden, lr=1e-3)
    if variant.module == "mt2st":
        module: pl.LightningModule = mt
    else:
        tasks = (PRIMARY,) if variant.module == "plain-stl" else tuple(mt.tasks)
        module = PlainMultiTask(copy.deepcopy(mt.encoder), {t: copy.deepcopy(mt.heads[t]) for t in tasks},
                                data.task_specs, PRIMARY, lr=1e-3)
    if compile_encoder:
        module.encoder = torch.compile(module.encoder)
    return module


# ============================================================================== clocks and probes
@dataclass
class StepLog:
    """What one fit recorded, one entry per training step."""

    step: list[int] = field(default_factory=list)
    t_start: list[float] = field(default_factory=list)  # first callback's on_train_batch_start
    t_end: list[float] = field(default_factory=list)  # last callback's on_train_batch_end
    t_next: list[float] = field(default_factory=list)  # the next step's first on_train_batch_start, on arrival
    c_start: list[float] = field(default_factory=list)  # the same three instants on this thread's CPU clock
    c_end: list[float] = field(default_factory=list)
    c_next: list[float] = field(default_factory=list)
    active_aux: list[int] = field(default_factory=list)  # auxiliary heads that ran in the step
    flops: dict[int, int] = field(default_factory=dict)
    state_bytes: dict[str, int] = field(default_factory=dict)
    cuda_peak_bytes: int | None = None
    syncs: list[int] = field(default_factory=list)  # CUDA synchronisations per loop iteration (GPU only)

    def window(self, i: int, clock: str = "cpu") -> float:
        """on_train_batch_start (first callback) .. on_train_batch_end (last callback) of step i."""
        return self.c_end[i] - self.c_start[i] if clock == "cpu" else self.t_end[i] - self.t_start[i]

    def iteration(self, i: int, clock: str = "cpu") -> float:
        """on_train_batch_start of step i .. of step i+1: all the loop does for a step, including the logger
        connector's end-of-batch work and the fetch of the next batch (not the wait for the baton).

        ``clock="cpu"``: this thread's CPU time (``time.thread_time``), which leaves out the time the thread
        was preempted by other processes; ``"wall"``: ``time.perf_counter``."""
        return self.c_next[i] - self.c_start[i] if clock == "cpu" else self.t_next[i] - self.t_start[i]


def _aux_running(pl_module: pl.LightningModule) -> int:
    active = getattr(pl_module, "active_tasks", None)
    if active is not None:
        return len(active) - 1
    return len(getattr(pl_module, "aux", ()))


class Baton:
    """Lockstep: several fits, one thread each, take turns one training step at a time; only the holder runs, so
    the fits never compete for the cores, and the handover is outside the clocks.

    The slots form ``units`` (a row next to its baseline). Every cycle visits each unit once, in a fresh random
    order of the units and a random direction within each unit: a row's step i and its baseline's step i run
    back to back, and no slot keeps a fixed place in the cycle (the step that follows a different model type
    runs a little slower: the interpreter's caches are cold)."""

    def __init__(self, units: Sequence[Sequence[int]], seed: int = 0) -> None:
        self.units = [list(u) for u in units]
        self.n = sum(len(u) for u in self.units)
        self.rng = random.Random(seed)
        self.done: set[int] = set()
        self.cond = threading.Condition()
        self._new_cycle()
        self.turn = self.order[0]

    def _new_cycle(self) -> None:
        units = [u if self.rng.random() < 0.5 else u[::-1] for u in self.units]
        self.rng.shuffle(units)
        self.order = [k for u in units for k in u]
        self.pos = 0

    def wait(self, slot: int) -> None:
        with self.cond:
            while self.turn != slot:
                self.cond.wait()

    def _advance(self) -> None:
        if len(self.done) == self.n:
            return
        while True:
            self.pos += 1
            if self.pos >= len(self.order):
                self._new_cycle()
            if self.order[self.pos] not in self.done:
                break
        self.turn = self.order[self.pos]
        self.cond.notify_all()

    def pass_and_wait(self, slot: int) -> None:
        with self.cond:
            self._advance()
            while self.turn != slot:
                self.cond.wait()

    def finish(self, slot: int) -> None:
        with self.cond:
            self.done.add(slot)
            if self.turn == slot:
                self._advance()


class _First(Callback):
    """Placed first in ``callbacks``: its hooks run before MT2STCallback's."""

    def __init__(self, probe: "Probe") -> None:
        self.p = probe

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.p.start(trainer, pl_module)


class _Last(Callback):
    """Placed last in ``callbacks``: its hooks run after MT2STCallback's."""

    def __init__(self, probe: "Probe") -> None:
        self.p = probe

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.p.end(trainer, pl_module)


class _Empty(Callback):
    """A callback with no hook of its own (ablation)."""


class _DropAt(Callback):
    """Drops every auxiliary head at the start of optimizer step ``step``, as MT2STCallback's switch would, but
    with the mixin alone: no optimizer state freed, no guard, no weight logging (ablation)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for task in pl_module.auxiliary_tasks:
                pl_module.drop_task(task)


def _is_sync_warning(record: Any) -> bool:
    return "synchroniz" in str(record.message)


class Probe:
    """The step clock, and optionally a FLOP counter, a training-state meter, a CUDA peak-memory meter and a
    CUDA synchronisation counter. Use ``callbacks = [probe.first, *others, probe.last]`` for every variant."""

    def __init__(self, log: StepLog, *, cuda_sync: bool = False, count_flops: bool = False,
                 measure_state_at: int | None = None, cuda_peak_from: int | None = None,
                 sync_records: list | None = None, sync_from: int | None = None,
                 baton: Baton | None = None, slot: int = 0) -> None:
        self.log = log
        self.cuda_sync = cuda_sync
        self.count_flops = count_flops
        self.measure_state_at = measure_state_at
        self.cuda_peak_from = cuda_peak_from
        self.sync_records = sync_records
        self.sync_from = sync_from
        self.baton, self.slot = baton, slot
        self._counter: FlopCounterMode | None = None
        self._syncs_seen = 0
        self.first, self.last = _First(self), _Last(self)

    def _sync_count(self) -> int:
        return sum(1 for r in self.sync_records if _is_sync_warning(r)) if self.sync_records is not None else 0

    def start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda_sync:
            torch.cuda.synchronize()
        now, cpu = time.perf_counter(), time.thread_time()
        if self.log.t_start:
            self.log.t_next.append(now)
            self.log.c_next.append(cpu)
        step = trainer.global_step
        if self.cuda_peak_from is not None and step == self.cuda_peak_from:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if self.sync_from is not None:
            if step == self.sync_from:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")  # from here on every synchronising op warns once
            count = self._sync_count()
            if step > self.sync_from:
                self.log.syncs.append(count - self._syncs_seen)
            self._syncs_seen = count
        if self.baton is not None:
            self.baton.pass_and_wait(self.slot)
        if self.count_flops:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self.log.step.append(step)
        self.log.c_start.append(time.thread_time())
        self.log.t_start.append(time.perf_counter())

    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda_sync:
            torch.cuda.synchronize()
        self.log.t_end.append(time.perf_counter())
        self.log.c_end.append(time.thread_time())
        self.log.active_aux.append(_aux_running(pl_module))
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.log.flops[self.log.step[-1]] = int(self._counter.get_total_flops())
            self._counter = None
        if self.measure_state_at is not None and self.log.step[-1] == self.measure_state_at:
            self.log.state_bytes = training_state_bytes(pl_module, trainer.optimizers)

    def finish(self) -> None:
        if self.sync_from is not None:
            torch.cuda.set_sync_debug_mode("default")  # before the synchronize below
        if self.cuda_peak_from is not None:
            torch.cuda.synchronize()
            self.log.cuda_peak_bytes = torch.cuda.max_memory_allocated()


# ============================================================================== host conversions on the CPU
class _LoggingSteps(Callback):
    """Which steps are Lightning logging steps (``log_every_n_steps``), as MT2STCallback sees them."""

    def __init__(self) -> None:
        self.steps: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer._logger_connector.should_update_logs:  # the flag MT2STCallback and LearningRateMonitor read
            self.steps.add(trainer.global_step)


@dataclass
class SyncCount:
    """Conversions of tensors to Python values made on behalf of mt2st_lightning (``sync_probe.count_syncs``), by
    kind of step. On a GPU each is a host-device synchronisation (some convert a tensor already on the host)."""

    steps: dict[str, int]  # kind -> number of steps of that kind
    syncs: dict[str, int]  # kind -> conversions in those steps
    outside: int  # conversions between steps (epoch end, train end)
    where: dict[str, int]  # "module:function (method)" -> conversions, all steps

    def per_step(self, kind: str) -> float | None:
        return self.syncs[kind] / self.steps[kind] if self.steps[kind] else None

    @property
    def mean(self) -> float:
        """Conversions per step over the whole fit, everything included."""
        return (sum(self.syncs.values()) + self.outside) / max(sum(self.steps.values()), 1)


SYNC_KINDS = ("ordinary", "logging", "measuring", "drop")


def count_library_syncs(model: ModelSpec, variant: Variant, data: Data, opts: FitOptions) -> SyncCount:
    """One fit of the variant under ``sync_probe.count_syncs`` (CORE-A's probe): the conversions per step, with
    the steps split into ordinary ones, Lightning logging steps (the non-finite guard reads its flag there),
    measuring steps (an adaptive policy observed the step) and drop steps (a head left)."""
    from sync_probe import PerStep, count_syncs

    logging_steps = _LoggingSteps()
    with count_syncs() as counter:
        per_step = PerStep(counter)
        run_fit(model, variant, data, opts, early=[per_step, logging_steps])
    steps = dict.fromkeys(SYNC_KINDS, 0)
    syncs = dict.fromkeys(SYNC_KINDS, 0)
    for st in per_step.steps:
        kind = ("measuring" if st["measuring"] else "drop" if st["boundary"]
                else "logging" if st["step"] in logging_steps.steps else "ordinary")
        steps[kind] += 1
        syncs[kind] += st["syncs"]
    return SyncCount(steps, syncs, per_step.between, dict(counter.where))


# ============================================================================== memory held by training state
def training_state_bytes(module: nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> dict[str, int]:
    """Bytes of the storages behind parameters, existing ``.grad`` tensors, optimizer state tensors and buffers,
    each storage counted once (by device and data pointer). The storage, not ``numel``: a parameter that
    ``release_heads`` emptied counts 0, one that shares a storage counts it once. A sharded tensor (FSDP2's
    DTensor) counts the storage of this rank's shard."""
    seen: set[tuple[str, int]] = set()

    def nbytes(tensors: Iterator[Tensor]) -> int:
        total = 0
        for t in tensors:
            if isinstance(t, DTensor):
                t = t.to_local()
            if not isinstance(t, Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            key = (str(t.device), s.data_ptr())
            if s.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += s.nbytes()
        return total

    params = list(module.parameters())
    out = {
        "params": nbytes(iter(params)),
        "grads": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(v for opt in optimizers for state in opt.state.values() for v in state.values()),
        "buffers": nbytes(module.buffers()),
    }
    out["total"] = sum(out.values())
    return out


# ============================================================================== fits
@dataclass
class FitOptions:
    steps: int
    accelerator: str = "cpu"
    precision: str = "32-true"
    compile_encoder: bool = False
    seed: int = 0


def make_trainer(opts: FitOptions, callbacks: list[Callback], root: str) -> pl.Trainer:
    return pl.Trainer(
        accelerator=opts.accelerator, devices=1, precision=opts.precision, max_steps=opts.steps,
        # A logger that writes nothing: both sides pay Lightning's logging path (every 50 steps, the default)
        # and MT2STCallback's weight logging runs, without file I/O in the clock.
        logger=DummyLogger(), enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=root, callbacks=callbacks,
    )


@dataclass
class _Fit:
    variant: Variant
    module: pl.LightningModule
    trainer: pl.Trainer
    probe: Probe
    log: StepLog
    loader: DataLoader


def _prepare(model: ModelSpec, variant: Variant, data: Data, opts: FitOptions, root: str, timed: bool = True,
             early: Sequence[Callback] = (), **probe_kwargs: Any) -> _Fit:
    module = build_module(model, variant, data, opts.seed, opts.compile_encoder)
    log = StepLog()
    # On a GPU the clock synchronises at its two instants; the probe fits (FLOPs, memory, synchronisations) are
    # not timed and must not synchronise: the sync counter would count the clock's own synchronisations.
    probe = Probe(log, cuda_sync=timed and opts.accelerator == "gpu", **probe_kwargs)
    extra: list[Callback] = []
    if variant.module == "mt2st" and variant.with_callback:
        extra.append(MT2STCallback(**resolve_callback(variant, opts.steps)))
    if variant.predrop:
        for task in module.auxiliary_tasks:
            module.drop_task(task)
    if variant.empty_callback:
        extra.append(_Empty())
    if variant.drop_at is not None:
        extra.append(_DropAt(variant.drop_at))
    trainer = make_trainer(opts, [probe.first, *early, *extra, probe.last], root)
    return _Fit(variant, module, trainer, probe, log, data.loader(opts.steps))


def run_fit(model: ModelSpec, variant: Variant, data: Data, opts: FitOptions, early: Sequence[Callback] = (),
            **probe_kwargs: Any) -> StepLog:
    """One ``Trainer.fit`` of the variant, alone (FLOPs, memory, synchronisations). ``early``: callbacks placed
    before MT2STCallback's (after the clock's first one)."""
    with contextlib.ExitStack() as stack:
        root = stack.enter_context(tempfile.TemporaryDirectory())
        if probe_kwargs.get("sync_from") is not None:
            records = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            probe_kwargs["sync_records"] = records
        fit = _prepare(model, variant, data, opts, root, timed=False, early=early, **probe_kwargs)
        gc.collect()
        fit.trainer.fit(fit.module, fit.loader)
        fit.probe.finish()
    return fit.log


def run_lockstep(model: ModelSpec, units: Sequence[Sequence[tuple[str, Variant]]], data: Data, opts: FitOptions,
                 seed: int = 0) -> dict[str, StepLog]:
    """One fit per slot ``(key, variant)``, all in lockstep (see ``Baton``); returns the step log of each key.
    A variant may fill several slots (one copy of a baseline in each unit)."""
    slots = [slot for unit in units for slot in unit]
    index, k = [], 0
    for unit in units:
        index.append(list(range(k, k + len(unit))))
        k += len(unit)
    baton = Baton(index, seed)
    with tempfile.TemporaryDirectory() as root:
        fits = [_prepare(model, v, data, opts, f"{root}/{k}", baton=baton, slot=k) for k, (_, v) in enumerate(slots)]
        fit_in_lockstep(fits, baton, [key for key, _ in slots])
    return {key: f.log for (key, _), f in zip(slots, fits)}


def fit_in_lockstep(fits: Sequence[Any], baton: Baton, names: Sequence[str]) -> None:
    """Run each prepared fit (``.trainer``, ``.module``, ``.loader``, made with ``baton`` and its slot) in a thread
    of its own, the baton letting one step run at a time; re-raises the first fit's error."""
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            baton.wait(k)
            fits[k].trainer.fit(fits[k].module, fits[k].loader)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
        finally:
            baton.finish(k)

    gc.collect()
    threads = [threading.Thread(target=work, args=(k,), name=f"fit-{name}") for k, name in enumerate(names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
