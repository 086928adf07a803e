"""Trains the toy model under FSDP2 (`ModelParallelStrategy`, `fully_shard_tasks`) on 2 CPU processes (gloo)
across an MT2ST drop, then resumes it from its distributed checkpoints. tests/test_fsdp2.py reads what it writes.

Run as a script: Lightning relaunches it for rank 1, and both ranks run the same fits in turn, so that one launch
of two processes covers every check:
- `switch_at=5` over 12 steps (4 per epoch), without and with `release_heads`: the uninterrupted run, with a
  distributed checkpoint at each epoch's end (steps 4 and 8: before and after the switch), the single-task
  export, and per step the all-gathers and reduce-scatters FSDP2 ran and the bytes of each head's shards,
  gradients and optimizer state on this rank; then the run resumed from each checkpoint by a fresh module, and
  from the one before the switch by the module that trained;
- `plateau` on a score that only rank 1's data would trigger;
- `gradnorm`, measuring on the local features.
Each rank writes OUT/rank<r>.pt. Usage: fsdp2_switch.py OUT
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mt2st_lightning import MT2STCallback  # noqa: E402
from mt2st_lightning.examples.models import MLPEncoder, MultiTaskModel  # noqa: E402
from mt2st_lightning.export import _gather_on_rank_zero  # noqa: E402
from mt2st_lightning.sharding import fully_shard_tasks  # noqa: E402
from tests.conftest import TASKS, toy_loader  # noqa: E402

SWITCH_AT = 5
HEAD_HIDDEN = 5  # odd: FSDP2 pads one rank's shard of each head's first layer, whose release must hold too
AUX = ("recon", "parity")


class Sharded(MultiTaskModel):
    """The toy model, sharded by the library's helper: each encoder Linear, each head, then the module itself as
    the root (which holds no parameter here)."""

    def configure_model(self):
        fully_shard_tasks(self, encoder_units=[m for m in self.encoder.net if isinstance(m, torch.nn.Linear)])


def sharded_model() -> Sharded:
    pl.seed_everything(0)
    return Sharded(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=HEAD_HIDDEN)


def local_bytes(tensors) -> int:
    """Bytes this rank holds for `tensors` (a DTensor's local shard: the storage it views), each storage once
    (FSDP2's gradients of one unit may view one buffer)."""
    storages = {}
    for t in tensors:
        if t is None:
            continue
        storage = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage.nbytes()
    return sum(storages.values())


class Probe(pl.Callback):
    """Per step: how many all-gathers and reduce-scatters FSDP2 ran (the profiler's c10d events), and what each
    head holds on this rank."""

    def __init__(self):
        self.collectives, self.bytes, self.snapshots = {}, {}, {}
        self._prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._prof = profile(activities=[ProfilerActivity.CPU])
        self._prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._prof.__exit__(None, None, None)
        names = [e.name for e in self._prof.events() if e.name.startswith("c10d::")]
        step = trainer.global_step - 1
        self.collectives[step] = {
            "all_gather": sum("allgather" in n or "all_gather" in n for n in names),
            "reduce_scatter": sum("reduce_scatter" in n for n in names),
        }
        optimizer = trainer.optimizers[0]
        for task in TASKS:
            params = list(pl_module.head_parameters(task))
            self.bytes[(step, task)] = {
                "tensors": len(params),
                "params": local_bytes(params),
                "grads": local_bytes(p.grad for p in params),
                "optimizer": local_bytes(v for p in params for v in optimizer.state.get(p, {}).values()
                                         if isinstance(v, torch.Tensor) and v.ndim),
            }
        # Local shards after this step's update: the aux heads must not move after the drop.
        self.snapshots[step] = {n: p.to_local().detach().clone() for n, p in pl_module.named_parameters()
                                if not pl_module.released_tasks or not n.startswith(tuple(f"heads.{t}" for t in AUX))}


def trainer(out: Path, callbacks, **kwargs) -> pl.Trainer:
    settings = dict(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, default_root_dir=out,
    )
    return pl.Trainer(callbacks=callbacks, **{**settings, **kwargs})


def full_state(model) -> dict:
    """Every parameter gathered, unsharded, on every rank (the released heads left out)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    skip = tuple(f"heads.{t}" for t in model.released_tasks)
    return {k: v.detach().clone() for k, v in state.items()
            if isinstance(v, torch.Tensor) and not (skip and k.startswith(skip))}


SCORES = {0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], 1: [0.1, 0.3, 0.3, 0.3, 0.3, 0.3]}  # rank 1's stops improving


class LocalScore(Sharded):
    """Logs a score of this rank's own (no sync_dist): only rank 1's would trigger the plateau. Its validation runs
    every active head (a no-grad forward, just before the drop)."""

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self(batch["x"])
        score = SCORES[self.global_rank][self.current_epoch]
        self.log("val/local", score, on_epoch=True, sync_dist=False, batch_size=batch["x"].shape[0])


class WeightsHistory(pl.Callback):
    def __init__(self):
        self.rows = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.rows.append((trainer.global_step, dict(pl_module.task_weights)))


def switch_run(out: Path, release: bool) -> dict:
    """The uninterrupted run, with its checkpoints and export, then the run resumed from each checkpoint."""
    loader = lambda: toy_loader(n=128, batch_size=16, shuffle=True)  # noqa: E731
    model, probe = sharded_model(), Probe()
    callback = MT2STCallback("switch", switch_at=SWITCH_AT, release_heads=release, save_single_task="single.ckpt")
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{step}")
    t = trainer(out, [callback, probe, checkpoints])
    t.fit(model, loader())
    x = toy_loader(n=16, batch_size=16).dataset[list(range(16))]["x"]
    model.eval()
    with torch.no_grad():
        prediction = model(x, tasks=("label",))["label"]
    result = {"uninterrupted": {
        "drop_times": dict(callback.drop_times), "active": model.active_tasks, "released": sorted(model.released_tasks),
        "global_step": t.global_step, "world_size": t.world_size, "collectives": probe.collectives,
        "bytes": probe.bytes, "snapshots": probe.snapshots, "params": full_state(model), "x": x,
        "prediction": prediction, "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }}
    # Testing each checkpoint with the module that trained (and released) it, and with a fresh one.
    tested = {}
    for step in (4, 8):
        ckpt = out / "ckpt" / f"step={step}.ckpt"
        same = t.test(model, toy_loader(n=32, batch_size=16), ckpt_path=ckpt, verbose=False)
        held = {task: local_bytes(model.head_parameters(task)) for task in TASKS}
        fresh = trainer(out / f"test{step}", [], enable_checkpointing=False).test(
            sharded_model(), toy_loader(n=32, batch_size=16), ckpt_path=ckpt, verbose=False
        )
        tested[step] = {"same": same, "fresh": fresh, "head_bytes": held, "released": sorted(model.released_tasks)}
    result["uninterrupted"]["tested"] = tested
    # The export's gather: full tensors on rank 0, nothing kept on the other ranks.
    gathered = _gather_on_rank_zero(t, model.single_task_state_dict())
    result["uninterrupted"]["gathered"] = {k: tuple(v.shape) for k, v in gathered.items()}
    trained = model
    # Resumed from the distributed checkpoint before, then after, the switch, by a fresh module; then before the
    # switch by the module that trained (and dropped, and released) the heads itself.
    runs = [
        ("resumed4", sharded_model, 4), ("resumed8", sharded_model, 8), ("resumed4-same-module", lambda: trained, 4)
    ]
    for name, new_module, step in runs:
        model = new_module()
        callback = MT2STCallback("switch", switch_at=SWITCH_AT, release_heads=release)
        t = trainer(out / name, [callback], enable_checkpointing=False)
        t.fit(model, loader(), ckpt_path=out / "ckpt" / f"step={step}.ckpt")
        result[name] = {
            "drop_times": dict(callback.drop_times), "global_step": t.global_step, "params": full_state(model),
            "released": sorted(model.released_tasks),
            "head_bytes": {task: local_bytes(model.head_parameters(task)) for task in TASKS},
        }
    return result


def plateau_run(out: Path) -> dict:
    """`plateau` on a score only rank 1's data would trigger: both ranks must drop at the same step."""
    callback = MT2STCallback("plateau", monitor="val/local", mode="max", patience=2)
    pl.seed_everything(0)
    model = LocalScore(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=HEAD_HIDDEN)
    t = trainer(out, [callback], enable_checkpointing=False, max_epochs=6, limit_val_batches=1)
    t.fit(model, toy_loader(n=128, batch_size=16, shuffle=True), toy_loader(n=32, batch_size=16))
    dropped = [p for task in model.dropped_tasks for p in model.head_parameters(task)]
    return {
        "drop_times": dict(callback.drop_times), "active": model.active_tasks, "global_step": t.global_step,
        "dropped_are_frozen_shards": bool(dropped) and all(p.__class__.__name__ == "DTensor" and not p.requires_grad
                                                           for p in dropped),
        "dropped_optimizer_state": sum(p in t.optimizers[0].state for p in dropped),
    }


def gradnorm_run(out: Path) -> dict:
    """`gradnorm`, measuring on each rank's local features, reduced across the data-parallel group."""
    callback, history = MT2STCallback("gradnorm", switch_at=7, adapt_every=2), WeightsHistory()
    t = trainer(out, [callback, history], enable_checkpointing=False)
    t.fit(sharded_model(), toy_loader(n=128, batch_size=16, shuffle=True))
    return {"drop_times": dict(callback.drop_times), "weights_history": history.rows}


def main() -> None:
    out = Path(sys.argv[1])
    result = {
        "kept": switch_run(out / "kept", release=False),
        "released": switch_run(out / "released", release=True),
        "plateau": plateau_run(out / "plateau"),
        "gradnorm": gradnorm_run(out / "gradnorm"),
        "single_task_path": str(out / "kept" / "single.ckpt"),
    }
    rank = torch.distributed.get_rank()
    torch.save(result, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
