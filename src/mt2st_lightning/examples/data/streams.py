"""Auxiliary data streams: batches for auxiliary tasks drawn from another dataset than the primary task's
(word pairs, unlabelled images, every sentence for masked LM).

A data module's ``train_dataloader`` returns :func:`combine_streams`: Lightning's ``CombinedLoader`` over the
primary ``DataLoader`` and one :class:`AuxiliaryStream` per auxiliary dataset, in ``min_size`` mode. The
primary loader alone sets the epoch's length (a stream has no length, so ``min_size`` takes the primary's);
each stream cycles through its dataset as often as the epoch needs. Every training batch is then a dict
``{"primary": <primary batch>, <stream name>: <stream batch or None>, ...}``.

Once every task a stream serves has been dropped (``MT2STCallback`` switched), the stream yields ``None``
without loading anything and lets go of its ``DataLoader`` iterator (and so of its worker processes): the
dropped task's data cost leaves with its head. Lightning fetches one batch ahead, so the stream may still load
the batch of the switching step and the one after it; the module ignores batches of dropped tasks.

The stream counts what it loads (batches, samples, seconds spent waiting on its loader): :func:`stream_costs`
reads those counters from the trainer, for the module to log beside ``PhaseCostMeter``'s FLOPs. The loading time
is outside the meter's per-batch time (as the primary loader's is).

Data order and DDP: each stream samples with torch's ``DistributedSampler`` over this process's share of the
dataset (``num_replicas``/``rank`` from the trainer), and the k-th pass of training epoch ``e`` is shuffled with a
seed drawn from ``(seed, e, k)``: the order is a function of ``(seed, epoch)``, on one process as on many,
so a run resumed at an epoch boundary sees the batches the uninterrupted run saw. The drop decision is the same
on every rank (the callback agrees on it), so all ranks stop loading at the same step.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from typing import Any

from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mt2st_lightning.app.run_format import STREAM_PREFIX

__all__ = ["MAX_PASSES_PER_EPOCH", "AuxiliaryStream", "combine_streams", "pass_seed", "stream_costs"]

#: Passes over a stream's dataset within one training epoch, at most (a guard against a tiny stream dataset).
MAX_PASSES_PER_EPOCH = 10_000


def pass_seed(seed: int, epoch: int, index: int) -> int:
    """The shuffling seed of pass ``index`` of training epoch ``epoch``: distinct for distinct triples (``seed + k``
    would make seed 1's second pass seed 2's first)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{epoch}/{index}".encode()).digest()[:7], "little")


class AuxiliaryStream:
    """An endless iterable of batches of ``dataset`` for the auxiliary ``tasks``; ``None`` once none is active.

    Args:
        dataset: the stream's own samples.
        tasks: the auxiliary tasks fed by this stream; it stops loading when all of them are dropped.
        batch_size: samples per batch (on this process).
        active_tasks: returns the tasks still active (e.g. ``lambda: trainer.lightning_module.active_tasks``).
        epoch: returns the current training epoch (e.g. ``lambda: trainer.current_epoch``), read at the start of
            every epoch.
        seed: the sampler's seed (the run's data-order seed).
        num_replicas, rank: this process's share of the dataset under DDP (1 and 0 on one process).
        num_workers, collate_fn: passed to the inner ``DataLoader``.
    """

    def __init__(
        self,
        dataset: Dataset,
        tasks: Collection[str],
        batch_size: int,
        active_tasks: Callable[[], Collection[str]],
        epoch: Callable[[], int] = lambda: 0,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> None:
        if not tasks:
            raise ValueError("an AuxiliaryStream must serve at least one auxiliary task")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(dataset) < num_replicas:  # type: ignore[arg-type]
            raise ValueError(
                f"the stream's dataset has {len(dataset)} samples, fewer than the {num_replicas} processes "  # type: ignore[arg-type]
                "that share it; give it more samples or drop its task"
            )
        self.tasks = frozenset(tasks)
        self.batch_size = batch_size
        self.active_tasks = active_tasks
        self.epoch = epoch
        # Private names: Lightning calls `set_epoch` on the `sampler` of every loader in a CombinedLoader, and the
        # stream seeds its passes itself.
        self._seed = seed
        self._sampler = DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self._loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self._sampler, num_workers=num_workers,
            persistent_workers=False, collate_fn=collate_fn,
        )
        # What the stream cost so far (this process): batches and samples loaded, seconds waiting on the loader.
        self.batches_loaded = 0
        self.samples_loaded = 0
        self.load_time_s = 0.0
        self.skipped = 0  # steps that got None: the tasks were dropped
        self._pass_iterator: Iterator[Any] | None = None
        self._pass = 0
        self._epoch = 0

    def is_needed(self) -> bool:
        """Whether any task this stream serves is still active."""
        return not self.tasks.isdisjoint(self.active_tasks())

    def __iter__(self) -> AuxiliaryStream:
        # The start of a training epoch: the order restarts as a function of (seed, epoch).
        self._epoch = int(self.epoch())
        self._pass = 0
        self._pass_iterator = None
        return self

    def __next__(self) -> Any:
        if not self.is_needed():
            self._pass_iterator = None  # lets the DataLoader's workers go: nothing more is loaded for this stream
            self.skipped += 1
            return None
        start = time.perf_counter()
        batch = self._next_batch()
        self.load_time_s += time.perf_counter() - start
        self.batches_loaded += 1
        self.samples_loaded += _batch_len(batch)
        return batch

    def _next_batch(self) -> Any:
        for _ in range(2):  # a fresh pass when the current one is used up
            if self._pass_iterator is None:
                if self._pass >= MAX_PASSES_PER_EPOCH:
                    raise RuntimeError(
                        f"an AuxiliaryStream cycled through its dataset {MAX_PASSES_PER_EPOCH} times in one epoch; "
                        "give the stream a larger batch or dataset, or the primary loader fewer batches per epoch"
                    )
                self._sampler.seed = pass_seed(self._seed, self._epoch, self._pass)  # DistributedSampler's own seed
                self._pass += 1
                self._pass_iterator = iter(self._loader)
            try:
                return next(self._pass_iterator)
            except StopIteration:
                self._pass_iterator = None
        raise RuntimeError("the stream's DataLoader yielded no batch on a fresh pass (an empty dataset?)")

    def costs(self) -> dict[str, float]:
        return {
            "batches": float(self.batches_loaded),
            "samples": float(self.samples_loaded),
            "load_time_s": self.load_time_s,
            "skipped": float(self.skipped),
        }

    # Lightning saves the state of a CombinedLoader's stateful iterables and hands it back when it resumes
    # mid-epoch (not at an epoch boundary: a data module that wants the counters across that keeps them in its
    # own state_dict, as SentimentTextDataModule does).
    def state_dict(self) -> dict[str, Any]:
        return {"batches_loaded": self.batches_loaded, "samples_loaded": self.samples_loaded,
                "load_time_s": self.load_time_s, "skipped": self.skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.batches_loaded = int(state["batches_loaded"])
        self.samples_loaded = int(state["samples_loaded"])
        self.load_time_s = float(state["load_time_s"])
        self.skipped = int(state["skipped"])


def _batch_len(batch: Any) -> int:
    if isinstance(batch, Mapping):
        batch = next(iter(batch.values()))
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    return int(len(batch))


def combine_streams(primary: Iterable, streams: Mapping[str, AuxiliaryStream]) -> CombinedLoader:
    """The training loader: ``{"primary": batch, name: stream batch or None, ...}`` per step, as many steps as
    ``primary`` has batches."""
    if "primary" in streams:
        raise ValueError("'primary' names the primary loader; give the auxiliary streams other names")
    return CombinedLoader({"primary": primary, **streams}, mode="min_size")


def stream_costs(trainer: Any) -> dict[str, float]:
    """``stream/<name>/{batches,samples,load_time_s,skipped}`` of every :class:`AuxiliaryStream` in the trainer's
    training loader (empty when it has none), for ``self.log_dict`` in ``training_step``."""
    iterables = getattr(trainer, "train_dataloader", None)  # the CombinedLoader's iterables, during fit
    if not isinstance(iterables, Mapping):
        return {}
    return {
        f"{STREAM_PREFIX}{name}/{key}": value
        for name, stream in iterables.items()
        if isinstance(stream, AuxiliaryStream)
        for key, value in stream.costs().items()
    }
