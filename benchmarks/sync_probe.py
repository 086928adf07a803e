"""Counts the host-device synchronisations that ``mt2st_lightning``'s own code makes, per training step.

On a GPU, reading a tensor's value on the host (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ...) waits
for the device to finish everything queued so far, which stops the CPU from running ahead. This probe counts
those conversions on the CPU, where nothing actually waits: every such tensor method (and ``torch.equal``,
``torch.allclose``, ``torch.is_nonzero``) is wrapped, and a call is charged to the library when the innermost
frame of the library on the call stack (``mt2st_lightning``, minus the example ``models``/``data``, the app and
the cost meter) exists. So a sync inside Lightning or PyTorch that the library asked for (a
``strategy.reduce_boolean_decision``, a ``GradScaler.get_scale``) counts, and one Lightning makes on its own
(its logging) does not.

Usage::

    python benchmarks/sync_probe.py                   # every strategy, default settings, the toy MLP
    python benchmarks/sync_probe.py --steps 40 switch gradnorm

Prints, per strategy, the syncs in each kind of step: ``ordinary`` (no measurement, no drop, not a logging
step), ``measuring`` (an adaptive policy observed the step), ``boundary`` (a drop happened) and outside any
step (epoch ends, checkpoints). Library use: :func:`count_syncs`.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

#: Tensor methods whose result lives on the host: each one waits for the device.
TENSOR_METHODS = ("item", "__bool__", "__float__", "__int__", "__index__", "__complex__", "tolist", "numpy", "cpu")
TORCH_FUNCTIONS = ("equal", "allclose", "is_nonzero")
#: Modules of the package that are not the library (examples, the app, the cost meter).
NOT_LIBRARY = ("mt2st_lightning.examples.models", "mt2st_lightning.examples.data", "mt2st_lightning.app.train", "mt2st_lightning.report",
               "mt2st_lightning.flops", "mt2st_lightning.app.hydra_callbacks")


def _library_caller() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("mt2st_lightning") and not name.startswith(NOT_LIBRARY):
            return f"{name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return None


@dataclass
class SyncCounter:
    """What :func:`count_syncs` counted: the total, and by ``module:function`` of the library frame."""

    total: int = 0
    where: Counter = field(default_factory=Counter)


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """Count, while the context is open, the host conversions of tensors made on behalf of the library."""
    counter = SyncCounter()
    originals: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        def probe(*args: Any, **kwargs: Any) -> Any:
            caller = _library_caller()
            if caller is not None:
                counter.total += 1
                counter.where[f"{caller} ({name})"] += 1
            return original(*args, **kwargs)

        originals.append((owner, name, original))
        setattr(owner, name, probe)

    for name in TENSOR_METHODS:
        wrap(torch.Tensor, name)
    for name in TORCH_FUNCTIONS:
        wrap(torch, name)
    try:
        yield counter
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


class PerStep(pl.Callback):
    """Reads a :class:`SyncCounter` at the start and end of every training batch (put it first in the
    callback list): the syncs of each step, and those between steps."""

    def __init__(self, counter: SyncCounter) -> None:
        self.counter = counter
        self.steps: list[dict[str, Any]] = []
        self.between = 0
        self._start = 0
        self._mark = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.between += self.counter.total - self._mark
        self._start = self.counter.total
        self._dropped = set(pl_module.dropped_tasks)

    def on_before_backward(self, trainer, pl_module, loss):
        # Before MT2STCallback's own hook, which clears the flag once the policy has observed the step.
        from mt2st_lightning import MT2STCallback

        self._measuring = any(c.measuring for c in trainer.callbacks if isinstance(c, MT2STCallback))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mark = self.counter.total
        self.steps.append(
            {
                "step": trainer.global_step - 1,
                "syncs": self.counter.total - self._start,
                "measuring": self._measuring,
                "boundary": set(pl_module.dropped_tasks) != self._dropped,
            }
        )

    def summary(self) -> dict[str, int]:
        kinds: dict[str, int] = Counter()
        counts: dict[str, int] = Counter()
        for s in self.steps:
            kind = "measuring" if s["measuring"] else "boundary" if s["boundary"] else "ordinary"
            kinds[kind] += s["syncs"]
            counts[kind] += 1
        out = {f"{k}_steps": counts[k] for k in ("ordinary", "measuring", "boundary")}
        out |= {f"{k}_syncs": kinds[k] for k in ("ordinary", "measuring", "boundary")}
        out["between_steps_syncs"] = self.between
        return out


def probe(strategy: str, steps: int = 40, log_every_n_steps: int = 50, **kwargs: Any) -> dict[str, int]:
    """Train the test suite's toy model for ``steps`` optimizer steps under ``strategy`` and count."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mt2st_lightning import MT2STCallback
    from tests.conftest import toy_loader, toy_model

    callback = MT2STCallback(strategy, **kwargs)
    validate = "monitor" in kwargs  # a data-driven switch watches validation metrics (each epoch here)
    with count_syncs() as counter:
        per_step = PerStep(counter)
        trainer = pl.Trainer(
            callbacks=[per_step, callback], accelerator="cpu", devices=1, max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=2 if validate else 0, num_sanity_val_steps=0, log_every_n_steps=log_every_n_steps,
        )
        val = toy_loader(n=32, batch_size=16) if validate else None
        trainer.fit(toy_model(), toy_loader(n=96, batch_size=16), val)
    return per_step.summary()


DEFAULTS: dict[str, dict[str, Any]] = {
    "stl": {},
    "mtl": {},
    "diminish": {"eta": 0.1, "prune_below": 0.2},
    "switch": {"switch_at": 0.5},
    "plateau": {"monitor": "val/loss", "patience": 1, "min_delta": 10.0},
    "gradnorm": {},
    "fisher": {},
    "noise": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("strategies", nargs="*", default=list(DEFAULTS))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| strategy | ordinary steps | syncs per ordinary step | measuring steps | syncs per measuring step | "
          "drop steps | syncs per drop step | syncs outside steps |")
    print("|---|---|---|---|---|---|---|---|")
    for strategy in args.strategies:
        s = probe(strategy, args.steps, **DEFAULTS.get(strategy, {}))
        per = {k: (s[f"{k}_syncs"] / s[f"{k}_steps"] if s[f"{k}_steps"] else 0.0) for k in ("ordinary", "measuring", "boundary")}
        print(f"| {strategy} | {s['ordinary_steps']} | {per['ordinary']:.2f} | {s['measuring_steps']} | "
              f"{per['measuring']:.2f} | {s['boundary_steps']} | {per['boundary']:.2f} | {s['between_steps_syncs']} |")


if __name__ == "__main__":
    main()
