"""``MT2STMixin``: the LightningModule's side of MT2ST.

The module declares its tasks and computes one loss per *active* task; the mixin weighs them. It takes no
decisions: ``MT2STCallback`` writes ``task_weights`` and drops finished heads, the module only reads
``active_tasks`` so that a dropped head's forward never runs. ``mt2st_loss`` also builds the step's
:class:`~mt2st_lightning.step_record.StepRecord`, which the callback takes explicitly with
:meth:`MT2STMixin.take_step_record`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mt2st_lightning import internals
from mt2st_lightning.step_record import StepRecord

__all__ = ["MT2STMixin"]

_CHECKPOINT_KEY = "mt2st"
_DROP_STATE_PREFIX = "mt2st_drops."  # the state-dict keys of MT2STMixin.track_drops_in_state_dict


class MT2STMixin:
    """Mix into a ``LightningModule`` that has a shared encoder and one head per task.

    Example::

        class MyModel(MT2STMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.encoder = nn.Sequential(...)
                self.heads = nn.ModuleDict({"label": ..., "recon": ...})
                self.declare_tasks(primary="label", heads=self.heads)

            def training_step(self, batch, batch_idx):
                h = self.encoder(batch["x"])
                losses = {t: self.loss_fn[t](self.heads[t](h), batch[t]) for t in self.active_tasks}
                return self.mt2st_loss(losses, features=h)
    """

    def declare_tasks(self, primary: str, heads: Mapping[str, nn.Module]) -> None:
        """Declare the primary task and the heads of all tasks (primary included), keyed by task name.

        ``heads`` must be registered on the module already (e.g. an ``nn.ModuleDict`` attribute); the mixin
        keeps a reference, not a second registration.
        """
        if not isinstance(self, nn.Module):
            raise TypeError("MT2STMixin must be mixed into a LightningModule: class M(MT2STMixin, L.LightningModule)")
        if primary not in heads:
            raise ValueError(f"primary task {primary!r} has no head; heads are declared for {list(heads)}")
        registered = {id(m) for m in self.modules()}
        for task, head in heads.items():
            if id(head) not in registered:
                raise ValueError(
                    f"the head of task {task!r} is not a submodule of {type(self).__name__}; assign the heads "
                    "to the module first (self.heads = nn.ModuleDict(...)), then call declare_tasks"
                )
        _check_untied(self, {task: head for task, head in heads.items() if task != primary})
        # Plain attributes, set through __dict__ so that nn.Module does not register the heads a second time.
        self.__dict__["_mt2st_primary"] = primary
        self.__dict__["_mt2st_heads"] = dict(heads)
        self.__dict__["_mt2st_dropped"] = set()
        self.__dict__["_mt2st_released"] = set()
        self.__dict__["_mt2st_weights"] = {task: 1.0 for task in heads}
        self.__dict__["_mt2st_record"] = None
        self.__dict__["_mt2st_grad_flags"] = {}  # task -> each head parameter's requires_grad before its drop
        self.__dict__["_mt2st_guarded"] = set()  # heads that refuse to run while released (_refuse_released_head)
        if "_mt2st_load_hook" not in self.__dict__:  # declare_tasks may run twice; one hook is enough
            self.__dict__["_mt2st_load_hook"] = internals.register_load_state_dict_pre_hook(
                self, _ignore_untracked_drop_state
            )
        # Read several times a step: kept as tuples, recomputed only when a head is dropped.
        self.__dict__["_mt2st_tasks"] = (primary, *(t for t in heads if t != primary))
        self._refresh_active_tasks()

    def _refresh_active_tasks(self) -> None:
        self.__dict__["_mt2st_active"] = tuple(t for t in self.tasks if t not in self.__dict__["_mt2st_dropped"])
        self.__dict__["_mt2st_active_set"] = frozenset(self.__dict__["_mt2st_active"])

    # ---------------------------------------------------------------- what the module and the callback read
    def _require_declared(self) -> None:
        if "_mt2st_heads" not in self.__dict__:
            raise RuntimeError(
                f"{type(self).__name__} uses MT2STMixin but never called self.declare_tasks(primary=..., heads=...)"
                " in __init__"
            )

    @property
    def primary_task(self) -> str:
        self._require_declared()
        return self.__dict__["_mt2st_primary"]

    @property
    def tasks(self) -> tuple[str, ...]:
        """All declared tasks, primary first."""
        self._require_declared()
        return self.__dict__["_mt2st_tasks"]

    @property
    def auxiliary_tasks(self) -> tuple[str, ...]:
        return self.tasks[1:]

    @property
    def active_tasks(self) -> tuple[str, ...]:
        """The tasks whose heads still run: the primary and every auxiliary task not dropped."""
        self._require_declared()
        return self.__dict__["_mt2st_active"]

    @property
    def dropped_tasks(self) -> frozenset[str]:
        self._require_declared()
        return frozenset(self.__dict__["_mt2st_dropped"])

    @property
    def task_weights(self) -> dict[str, float]:
        """The current loss weight of each active task (the primary's is always 1)."""
        self._require_declared()
        weights = self.__dict__["_mt2st_weights"]
        return {t: weights[t] for t in self.active_tasks}

    @task_weights.setter
    def task_weights(self, weights: Mapping[str, float]) -> None:
        self._require_declared()
        unknown = set(weights) - set(self.auxiliary_tasks)
        if unknown:
            raise ValueError(f"task_weights may set auxiliary tasks {list(self.auxiliary_tasks)} only, got {sorted(unknown)}")
        self.__dict__["_mt2st_weights"].update({t: float(w) for t, w in weights.items()})

    @property
    def released_tasks(self) -> frozenset[str]:
        """Dropped tasks whose head weights were freed too (``release_heads=True``)."""
        self._require_declared()
        return frozenset(self.__dict__["_mt2st_released"])

    def take_step_record(self) -> StepRecord | None:
        """The :class:`StepRecord` of the last ``mt2st_loss`` call in training, handed over once: the module
        lets go of it (and of the graph and features it holds), and a second call returns ``None`` until the
        next ``mt2st_loss``. ``None`` also when ``training_step`` did not call ``mt2st_loss``."""
        record = self.__dict__.get("_mt2st_record")
        self.__dict__["_mt2st_record"] = None
        return record

    def task_head(self, task: str) -> nn.Module:
        """The head module declared for ``task`` (e.g. to shard it as a unit of its own)."""
        self._require_declared()
        heads = self.__dict__["_mt2st_heads"]
        if task not in heads:
            raise KeyError(f"unknown task {task!r}; declared tasks are {list(self.tasks)}")
        return heads[task]

    def head_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.task_head(task).parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters outside every head: the shared encoder. The adaptive strategies measure gradients here."""
        self._require_declared()
        in_heads = {id(p) for h in self.__dict__["_mt2st_heads"].values() for p in h.parameters()}
        return (p for p in self.parameters() if id(p) not in in_heads and p.requires_grad)  # type: ignore[attr-defined]

    # ---------------------------------------------------------------- the loss
    def mt2st_loss(self, losses: Mapping[str, Tensor], features: Tensor | None = None) -> Tensor:
        """``L_0 + sum_k gamma_k * L_k`` in float32, over exactly the active tasks.

        Each loss is a scalar tensor. ``features``: the shared representation ``h`` the heads were applied to;
        given, gradient-based policies measure with respect to it through the heads only (no encoder backward).
        In training (with autograd enabled) the call also builds the step's :class:`StepRecord`, which
        ``MT2STCallback`` takes with :meth:`take_step_record` before backward.
        """
        active = self.active_tasks  # raises if the tasks were never declared
        if losses.keys() != self.__dict__["_mt2st_active_set"]:  # one set comparison on the happy path
            self._raise_for_loss_names(losses)
        weights = self.__dict__["_mt2st_weights"]
        try:
            total = losses[active[0]].float()
            for task in active[1:]:
                total = total + weights[task] * losses[task].float()
        except (AttributeError, TypeError):  # a Python number instead of a tensor
            self._raise_for_loss_values(losses)
            raise
        if total.ndim:  # a non-scalar loss broadcast into the total
            self._raise_for_loss_values(losses)
        if torch.is_grad_enabled():
            # Primary first, in declaration order: policies read the first loss as the primary's.
            ordered = losses if next(iter(losses)) == active[0] else {task: losses[task] for task in active}
            self.__dict__["_mt2st_record"] = StepRecord(ordered, features, total)
        return total

    def _raise_for_loss_values(self, losses: Mapping[str, Any]) -> None:
        for task, value in losses.items():
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"the loss of task {task!r} is a {type(value).__name__}, not a tensor: compute it with torch "
                    "so that it carries gradients (e.g. F.mse_loss(...), not loss.item())"
                )
            if value.ndim:
                raise ValueError(
                    f"the loss of task {task!r} has shape {tuple(value.shape)}; each task loss must be a scalar "
                    "tensor: reduce it (e.g. .mean()) before mt2st_loss"
                )

    def _raise_for_loss_names(self, losses: Mapping[str, Tensor]) -> None:
        active = self.active_tasks
        given = set(losses)
        unknown = given - set(self.tasks)
        if unknown:
            raise KeyError(f"loss given for unknown task(s) {sorted(unknown)}; declared tasks are {list(self.tasks)}")
        dropped = given & self.__dict__["_mt2st_dropped"]
        if dropped:
            raise KeyError(
                f"loss given for dropped task(s) {sorted(dropped)}: their heads have left the computation; "
                "compute losses only for `self.active_tasks`"
            )
        missing = [t for t in active if t not in given]
        if missing:
            what = "the primary task" if self.primary_task in missing else "active task(s)"
            raise KeyError(f"no loss for {what} {missing}; compute one loss for each of `self.active_tasks` = {list(active)}")
        raise AssertionError("unreachable: the loss names differ from the active tasks")

    # ---------------------------------------------------------------- dropping a head
    def drop_task(self, task: str, release: bool = False) -> list[nn.Parameter]:
        """Take an auxiliary head out of the computation for good: freeze it and free its gradients.

        With ``release``, the head's weights and buffers are freed too (replaced by empty tensors), so that
        the module holds what a single-task model holds; checkpoints then store the head as empty tensors,
        and ``on_load_checkpoint`` releases it again before the weights are loaded. Under FSDP2 each rank shrinks
        the storage of its shards to one element instead (their shapes stay; the buffers stay), checkpoints hold
        zeros in their place, and loading a checkpoint gives the shards storage again first. A released head
        refuses to run (a clear error, before FSDP2 would all-gather it) until a checkpoint gives it weights again.

        Returns the head's parameters so that the caller can free their optimizer state. Called by
        ``MT2STCallback``; the module itself never decides to drop.
        """
        self._require_declared()
        if task == self.primary_task:
            raise ValueError(f"cannot drop the primary task {task!r}")
        if task not in self.__dict__["_mt2st_heads"]:
            raise KeyError(f"unknown auxiliary task {task!r}; auxiliary tasks are {list(self.auxiliary_tasks)}")
        head = self.__dict__["_mt2st_heads"][task]
        _register_shards(head)
        params = list(head.parameters())
        if task not in self.__dict__["_mt2st_dropped"]:  # the user's own flags, restored if the head comes back
            self.__dict__["_mt2st_grad_flags"][task] = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        self.__dict__["_mt2st_dropped"].add(task)
        self._refresh_active_tasks()
        self.__dict__["_mt2st_weights"][task] = 0.0
        if release:
            if any(internals.is_dtensor(p) for p in params):
                self._free_shards(task, head, params)
            else:
                for tensor in (*params, *head.buffers()):
                    # `.data` swaps the storage and keeps the Parameter object, which optimizers still reference.
                    tensor.data = tensor.data.new_empty(0)
            self.__dict__["_mt2st_released"].add(task)
            if task not in self.__dict__["_mt2st_guarded"]:
                self.__dict__["_mt2st_guarded"].add(task)
                # Prepended: it must run before FSDP2's own pre-forward hook, which would all-gather the freed
                # shards (one element each: garbage, or a crash) before any check in the head's forward.
                head.register_forward_pre_hook(functools.partial(_refuse_released_head, self, task), prepend=True)
        return params

    def _free_shards(self, task: str, head: nn.Module, params: list[nn.Parameter]) -> None:
        """Release an FSDP2 head: shrink the storage of each of this rank's shards to one element. FSDP2 keeps its
        own reference to a shard's (padded) storage, which the Parameter views: shrinking the storage frees both,
        and keeps the shapes that FSDP2 and checkpoints read. One element, not none: FSDP2 re-pads a shard from its
        data (at the first forward, on ``module.to(...)``) unless its storage is the one it holds, which it tells by
        a non-null data pointer. The head's buffers (replicated, not sharded, and small) stay."""
        freed = self.__dict__.setdefault("_mt2st_freed_shards", {}).setdefault(task, [])
        for p in params:
            storage = p.to_local().untyped_storage()
            if storage.nbytes() > p.element_size():
                freed.append((p, storage.nbytes()))
                storage.resize_(p.element_size())
        hooked = self.__dict__.setdefault("_mt2st_shard_hooks", set())
        if task not in hooked:  # once per head, for the module's lifetime: both hooks check what is freed
            hooked.add(task)
            internals.register_state_dict_post_hook(head, _zeros_for_freed_shards)
            internals.register_load_state_dict_pre_hook(head, functools.partial(_reallocate_before_load, self, task))

    def single_task_state_dict(self) -> dict[str, Tensor]:
        """The module's state without the dropped heads: what a deployed single-task model needs. Under FSDP2 its
        tensors are this rank's shards (``save_single_task`` gathers them)."""
        self._require_declared()
        heads = [self.__dict__["_mt2st_heads"][t] for t in self.__dict__["_mt2st_dropped"]]
        drop = {id(t) for head in heads for t in (*head.parameters(), *head.buffers())}
        # By name: a released FSDP2 head's entries are placeholders (_zeros_for_freed_shards), not its tensors.
        named = (*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False))  # type: ignore[attr-defined]
        dropped = {name for name, t in named if id(t) in drop}
        state = self.state_dict(keep_vars=True)  # type: ignore[attr-defined]
        return {k: v.detach() for k, v in state.items() if k not in dropped and not k.startswith(_DROP_STATE_PREFIX)}

    # ---------------------------------------------------------------- checkpoints (LightningModule hooks)
    def _drop_state(self) -> dict[str, Any]:
        return {
            "primary_task": self.primary_task,
            "dropped_tasks": sorted(self.dropped_tasks),
            "released_tasks": sorted(self.__dict__["_mt2st_released"]),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[_CHECKPOINT_KEY] = self._drop_state()
        super().on_save_checkpoint(checkpoint)  # type: ignore[misc]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(_CHECKPOINT_KEY)
        if state is not None:
            self._apply_drop_state(state, checkpoint.get("state_dict", {}))
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]

    def _apply_drop_state(self, state: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> None:
        # Make the module's heads what they were when the checkpoint was saved, before its weights load.
        self._require_declared()
        if state["primary_task"] != self.primary_task:
            raise ValueError(
                f"checkpoint was trained with primary task {state['primary_task']!r}, "
                f"this module declares {self.primary_task!r}"
            )
        dropped, released = set(state["dropped_tasks"]), set(state.get("released_tasks", ()))
        for task in sorted(self.dropped_tasks - dropped):  # e.g. testing a "best" checkpoint from before the switch
            self._undrop_task(task)
        for task in sorted(self.__dict__["_mt2st_released"] - released):
            self._reallocate_head(task, state_dict)
        for task in sorted(dropped):
            self.drop_task(task, release=task in released)  # a released head is stored as empty tensors

    def track_drops_in_state_dict(self, unfreeze_on_load: bool = False) -> None:
        """Carry the drops inside the module's state dict too (``mt2st_drops._extra_state``), for strategies that
        load the weights and the optimizer state from a distributed checkpoint before any hook runs (FSDP2 under
        ``ModelParallelStrategy``). Loading the state dict then freezes the heads the state has dropped first, so
        that optimizer state is asked for the parameters that still train only, as the checkpoint holds it.

        ``unfreeze_on_load``: also un-freeze the heads that the loaded state has training (a fit's restore, whose
        optimizers are new: the module that dropped them resumes a checkpoint from before its drop, and their
        optimizer state loads too). Off elsewhere: ``trainer.test(model, ckpt_path=...)`` after a fit loads into
        the fit's optimizers, which hold no state for the dropped heads. ``MT2STCallback`` turns it on on fit
        start, before the restore, and off on train start, after it. Idempotent."""
        if not isinstance(getattr(self, "mt2st_drops", None), _DropState):
            self.mt2st_drops = _DropState(self)
        self.mt2st_drops.unfreeze_on_load = unfreeze_on_load

    def _undrop_task(self, task: str) -> None:
        # Back as the user left it: each head parameter's requires_grad as it was before the drop.
        flags = self.__dict__["_mt2st_grad_flags"].get(task)
        for i, p in enumerate(self.head_parameters(task)):
            p.requires_grad_(True if flags is None else flags[i])
        self.__dict__["_mt2st_dropped"].discard(task)
        self._refresh_active_tasks()
        self.__dict__["_mt2st_weights"][task] = 1.0  # the callback sets the weight at the next step boundary

    def _reallocate_head(self, task: str, state_dict: Mapping[str, Tensor]) -> None:
        """Give a released head storage again, shaped as in ``state_dict``, which then fills it."""
        head = self.__dict__["_mt2st_heads"][task]
        freed = self.__dict__.get("_mt2st_freed_shards", {}).pop(task, None)
        if freed is not None:  # FSDP2: each shard's storage back at its size (padding included); the load fills it
            for p, nbytes in freed:
                p.to_local().untyped_storage().resize_(nbytes)
            self.__dict__["_mt2st_released"].discard(task)
            return
        names = {id(v): k for k, v in self.state_dict(keep_vars=True).items()}  # type: ignore[attr-defined]
        for tensor in (*head.parameters(), *head.buffers()):
            saved = state_dict.get(names.get(id(tensor), ""))
            if saved is None:
                raise KeyError(f"the checkpoint holds no weights for the released head of task {task!r}")
            tensor.data = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
        self.__dict__["_mt2st_released"].discard(task)


class _DropState(nn.Module):
    """The owner's drops as the extra state of a parameterless submodule (see
    :meth:`MT2STMixin.track_drops_in_state_dict`); a JSON string, which distributed checkpoints store whole."""

    def __init__(self, owner: MT2STMixin) -> None:
        super().__init__()
        self.__dict__["owner"] = owner  # not registered: the owner is this module's parent
        self.unfreeze_on_load = False

    def get_extra_state(self) -> str:
        return json.dumps(self.owner._drop_state())

    def set_extra_state(self, state: str) -> None:
        # Called while the state dict loads (after the heads' weights: this module is registered last), before the
        # optimizer state does: the heads train as they did when the state was saved, so that optimizer state is
        # asked for exactly the parameters it holds state for. The heads are only frozen or un-frozen here: the
        # module's on_load_checkpoint, which comes after, releases them as the checkpoint has them, as on every
        # strategy.
        dropped = set(json.loads(state)["dropped_tasks"])
        if self.unfreeze_on_load:
            for task in sorted(self.owner.dropped_tasks - dropped):
                self.owner._undrop_task(task)
        for task in sorted(dropped - self.owner.dropped_tasks):
            self.owner.drop_task(task)


def _register_shards(head: nn.Module) -> None:
    """Have FSDP2 register the shards of ``head``'s units again (``FSDPModule.reshard``), so that a drop freezes,
    frees and releases the parameters the optimizer and the checkpoints hold. A unit that does not reshard after
    forward (sharded with ``reshard_after_forward=False``, or a head called on its own, which makes it an FSDP2
    root) keeps its gathered, full parameters registered after a forward without a backward (a no-grad forward:
    a validation_step that runs every head, a user's call). Nothing to do without FSDP2."""
    for unit in internals.fsdp2_modules(head):
        unit.reshard()


def _ignore_untracked_drop_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A load-state-dict pre-hook of every MT2ST module: the state dict of a module that tracked its drops
    (``track_drops_in_state_dict``, under FSDP2) loads, ``strict=True`` too, into one that does not (e.g. the
    unsharded model), which then ignores that entry: the checkpoint's ``"mt2st"`` entry carries the same drops."""
    if not isinstance(getattr(module, "mt2st_drops", None), _DropState):
        state_dict.pop(prefix + _DROP_STATE_PREFIX + "_extra_state", None)


def _refuse_released_head(owner: MT2STMixin, task: str, head: nn.Module, args: Any) -> None:
    """A forward pre-hook of a head that was released once: a clear error instead of a computation on freed
    weights (a shape error unsharded; under FSDP2, an all-gather of one-element shards)."""
    if task in owner.released_tasks:
        raise RuntimeError(
            f"the head of task {task!r} was released when it was dropped (MT2STCallback(release_heads=True)): its "
            "weights are freed, so it cannot run. Call only the heads of `self.active_tasks` (in validation_step, "
            "test_step and predict_step too), load a checkpoint from before the drop, or train with "
            "release_heads=False to keep the dropped heads' weights"
        )


def _is_freed_shard(tensor: Any) -> bool:
    """An FSDP2 shard whose storage is too small for it (``MT2STMixin._free_shards``)."""
    if not internals.is_dtensor(tensor):
        return False
    local = tensor.to_local()
    needed = (local.storage_offset() + local.numel()) * local.element_size()
    return local.numel() > 0 and local.untyped_storage().nbytes() < needed


def _zeros_for_freed_shards(head: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A state-dict post-hook of an FSDP2 head that may be released: zeros of each freed shard's shape stand in for
    its weights (held only while the state dict is), so that a distributed checkpoint keeps the module's layout and
    loads into a fresh module, which releases the head again when its drops load (``on_load_checkpoint``)."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and _is_freed_shard(value):
            state_dict[key] = torch.zeros_like(value)


def _reallocate_before_load(owner: MT2STMixin, task: str, head: nn.Module, *args: Any) -> None:
    """A load-state-dict pre-hook of an FSDP2 head that may be released: under ``ModelParallelStrategy`` a
    checkpoint's weights load before any hook runs (e.g. testing a checkpoint with the module that released the
    head), so the freed shards get storage again first; ``on_load_checkpoint`` then releases the head again if the
    checkpoint has it released."""
    if task in owner.released_tasks:
        owner._reallocate_head(task, {})


def _check_untied(module: nn.Module, aux_heads: Mapping[str, nn.Module]) -> None:
    """Dropping a head freezes (and may free) its parameters: none of them may also belong to another part."""
    owner = {}
    for task, head in aux_heads.items():
        for p in head.parameters():
            if id(p) in owner:
                raise ValueError(f"the heads of tasks {owner[id(p)]!r} and {task!r} share a parameter; untie them")
            owner[id(p)] = task
    # Where each auxiliary head sits in the module tree: a parameter of it may only be reached under those paths.
    # Checking paths, not module identity, also catches a shared *submodule* (e.g. one projection used in the
    # primary head and inside an auxiliary head's nn.Sequential).
    head_of = {id(head): task for task, head in aux_heads.items()}
    prefixes: dict[str, list[str]] = {task: [] for task in aux_heads}
    for name, sub in module.named_modules(remove_duplicate=False):
        if id(sub) in head_of:
            prefixes[head_of[id(sub)]].append(name + ".")
    for name, sub in module.named_modules(remove_duplicate=False):
        for pname, p in sub.named_parameters(recurse=False):
            task = owner.get(id(p))
            path = f"{name}.{pname}" if name else pname
            if task is not None and not any(path.startswith(prefix) for prefix in prefixes[task]):
                raise ValueError(
                    f"{path} is tied to a parameter of the auxiliary head {task!r} (a shared parameter or submodule"
                    f"{f' {name!r}' if name else ''}): dropping that head would freeze it too. Untie them (or do "
                    "not declare that head as auxiliary)"
                )


def mt2st_module(module: Any) -> MT2STMixin:
    """``module`` as an ``MT2STMixin``, or a clear error that says how to make it one."""
    if not isinstance(module, MT2STMixin):
        raise TypeError(
            f"MT2STCallback needs a LightningModule that mixes in MT2STMixin, got {type(module).__name__}; "
            f"declare it as `class {type(module).__name__}(MT2STMixin, L.LightningModule)` and call "
            "self.declare_tasks(primary=..., heads=...) in __init__"
        )
    module._require_declared()
    return module

