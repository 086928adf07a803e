"""What a resumed fit needs besides the weights: its drops carried out again, and its optimizers matched.

``MT2STCallback`` saves, in its own ``state_dict``, when each head was dropped and which were released, and
carries them out again in ``on_train_start``, the first hook after every restore whatever the strategy's order
(:func:`restore_drops`): a resume never depends on freezing and un-freezing heads across hooks.

A checkpoint saved after a drop holds optimizer state for an optimizer built while the dropped heads still
trained. A resumed fit loads the checkpoint's heads dropped (frozen), so an optimizer built with the common
``filter(lambda p: p.requires_grad, module.parameters())`` leaves their parameters out, and Lightning could no
longer load the saved optimizer state into it (the parameter groups differ in size). As Lightning's
``BaseFinetuning`` restores its optimizers' parameter groups from its own saved metadata, ``MT2STCallback``
saves each optimizer's layout (its groups' parameter names, :func:`optimizer_layout`) and, on resume, puts the
dropped heads' parameters back where they were (:func:`match_optimizers`), after the optimizers are built and
before Lightning loads their state, whichever order the strategy restores in. The heads stay frozen: they are
in the optimizer as they were in the run that saved it, without gradients.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import nn
from torch.optim import Optimizer

from mt2st_lightning import heads

if TYPE_CHECKING:
    from mt2st_lightning.mixin import MT2STMixin
    from mt2st_lightning.policies import Policy

__all__ = ["Layout", "match_optimizers", "match_restored_optimizers", "optimizer_layout", "restore_drops"]

#: Per optimizer, per parameter group, the names of its parameters (``None``: an optimizer holding a parameter
#: that is not the module's, whose layout cannot be named).
Layout = list[list[list[str]] | None]


def optimizer_layout(optimizers: Sequence[Optimizer], module: nn.Module) -> Layout:
    names = {id(p): name for name, p in module.named_parameters()}
    layout: Layout = []
    for optimizer in optimizers:
        groups = [[names.get(id(p)) for p in group["params"]] for group in optimizer.param_groups]
        layout.append(None if any(None in group for group in groups) else groups)  # type: ignore[misc]
    return layout


def match_optimizers(optimizers: Sequence[Optimizer], module: nn.Module, layout: Layout, dropped: Iterable[Any]) -> int:
    """Put the ``dropped`` parameters that an optimizer left out back into their saved places; returns how many
    were put back. A group that differs from its saved layout in anything else is left as it is (Lightning then
    says what does not match)."""
    if len(layout) != len(optimizers):
        return 0
    named = dict(module.named_parameters())
    dropped_ids = {id(p) for p in dropped}
    restored = 0
    for optimizer, groups in zip(optimizers, layout):
        if groups is None or len(groups) != len(optimizer.param_groups):
            continue
        for group, saved in zip(optimizer.param_groups, groups):
            if any(name not in named for name in saved):
                continue
            want = [named[name] for name in saved]
            have = {id(p) for p in group["params"]}
            missing = [p for p in want if id(p) not in have]
            if missing and all(id(p) in dropped_ids for p in missing) and len(have) + len(missing) == len(want):
                group["params"] = want
                restored += len(missing)
    return restored


def match_restored_optimizers(trainer: pl.Trainer, module: MT2STMixin, layout: Layout) -> bool:
    """:func:`match_optimizers` for a fit whose optimizers exist (returns whether they did): called from both
    hooks that can come between their creation and the loading of their state."""
    if not trainer.optimizers or trainer.state.fn != "fit":
        return False
    dropped = [p for task in module.dropped_tasks for p in module.head_parameters(task)]
    match_optimizers(trainer.optimizers, module, layout, dropped)  # type: ignore[arg-type]
    return True


def restore_drops(
    trainer: pl.Trainer,
    module: MT2STMixin,
    policy: Policy,
    t: int,
    unit: str,
    restored: Mapping[str, Any] | None,
    release_heads: bool,
) -> set[str]:
    """Carry out again the drops a checkpoint's callback state records (with the module's own, e.g. from an
    earlier fit), after checking that ``policy`` finishes those tasks at ``t``; returns the released tasks."""
    from_checkpoint = set(restored["drop_times"]) if restored is not None else set()
    dropped = sorted(from_checkpoint | set(module.dropped_tasks))
    if not dropped:
        return set()
    unfinished = sorted(set(dropped) - set(policy.finished(t, dropped)))
    if unfinished:
        restored_too = set(unfinished) <= from_checkpoint
        how = (
            "restored from the checkpoint" if restored_too
            else "by an earlier fit of this module, not from a checkpoint"
        )
        raise ValueError(
            f"the module's auxiliary task(s) {unfinished} were dropped ({how}), but this callback's {policy.name!r} "
            f"policy does not finish them at {unit} {t}: "
            + ("resume with the settings the run was started with" if restored_too
               else "train a fresh module, or resume that fit with trainer.fit(..., ckpt_path=...)")
        )
    released = set(restored.get("released", ())) if restored is not None else set()
    release = [task for task in dropped if release_heads or task in released]
    acted = heads.drop_heads(trainer, module, [task for task in dropped if task not in release], release=False)
    acted += heads.drop_heads(trainer, module, release, release=True)
    if not acted:  # a strategy that restores after setup wrapped the model in DDP while the heads still trained
        heads.rebuild_ddp_reducer(trainer.strategy)
    return set(release)
