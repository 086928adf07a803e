"""MT2ST under FSDP2: Lightning's ModelParallelStrategy with a module sharded by `fully_shard_tasks`.

The 2-process checks share one launch of tests/scripts/fsdp2_switch.py (2 CPU processes over gloo, ~30 s here);
the layout checks and the refusals run in this process, on a one-process gloo group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from mt2st_lightning import MT2STCallback, heads, internals
from mt2st_lightning.examples.models import MLPEncoder, MultiTaskModel
from mt2st_lightning.sharding import check_head_units, fully_shard_tasks
from tests.conftest import TASKS, toy_loader, toy_model

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_switch.py"
ROOT = Path(__file__).resolve().parents[1]
AUX = ("heads.recon", "heads.parity")
SWITCH_AT = 5


# ---------------------------------------------------------------------------------------- 2 processes, one launch
@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
def test_switch_freezes_the_aux_heads_on_both_ranks_and_stops_their_collectives(ranks):
    for state in ranks:
        run = state["kept"]["uninterrupted"]
        assert run["world_size"] == 2 and run["global_step"] == 12
        assert run["drop_times"] == {"recon": SWITCH_AT, "parity": SWITCH_AT}
        assert run["active"] == ("label",)
        assert [n for n, trains in run["requires_grad"].items() if not trains] == [
            n for n in run["requires_grad"] if n.startswith(AUX)
        ]
        snapshots = run["snapshots"]  # this rank's shards after each step's update (step 4: the last with heads)
        for name, shard in snapshots[SWITCH_AT - 1].items():
            moved = [not torch.equal(shard, snapshots[step][name]) for step in range(SWITCH_AT, 12)]
            if name.startswith(AUX):
                assert not any(moved), f"{name} changed after the drop"
            elif shard.numel():
                assert all(moved), f"{name} stopped training at the drop"
        # Per step, each unit that took part (the two encoder Linears, each active head; the root holds no
        # parameter) ran two all-gathers (for its forward, then again for its backward: it reshards after forward)
        # and one reduce-scatter. After the drop the two head units' are gone, and nothing else changed: no
        # prefetch, lazy init or root post-backward gathers or reduce-scatters a dropped head.
        counts = run["collectives"]
        before = {tuple(counts[s].values()) for s in range(SWITCH_AT)}
        after = {tuple(counts[s].values()) for s in range(SWITCH_AT, 12)}
        assert before == {(2 * 5, 5)} and after == {(2 * 3, 3)}, (before, after)
        # Their gradients and optimizer state are freed on every rank; their weights are kept.
        for task in ("recon", "parity"):
            held_before, held_after = run["bytes"][(SWITCH_AT - 1, task)], run["bytes"][(11, task)]
            assert held_before["grads"] > 0 and held_before["optimizer"] > 0
            assert held_after == {**held_before, "grads": 0, "optimizer": 0}
        assert run["bytes"][(11, "label")]["optimizer"] > 0


@pytest.mark.slow
def test_release_heads_frees_each_ranks_shards(ranks):
    for state in ranks:
        run = state["released"]["uninterrupted"]
        assert run["drop_times"] == {"recon": SWITCH_AT, "parity": SWITCH_AT}
        assert run["released"] == ["parity", "recon"]
        for task in ("recon", "parity"):
            before, after = run["bytes"][(SWITCH_AT - 1, task)], run["bytes"][(11, task)]
            # One float32 element of storage is kept per shard (see MT2STMixin._free_shards).
            assert before["params"] > 10 * 4 * before["tensors"]
            assert after == {"tensors": before["tensors"], "params": 4 * before["tensors"], "grads": 0, "optimizer": 0}
        assert run["bytes"][(11, "label")] == state["kept"]["uninterrupted"]["bytes"][(11, "label")]
        # Releasing changes nothing else: the encoder and the primary head end where the run without it ends.
        for name, p in run["params"].items():
            assert torch.equal(p, state["kept"]["uninterrupted"]["params"][name]), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kept", "released"])
@pytest.mark.parametrize("run", ["resumed4", "resumed8", "resumed4-same-module"],
                         ids=["before-switch", "after-switch", "before-switch-by-the-module-that-dropped"])
def test_resume_from_the_distributed_checkpoint_is_exact(ranks, mode, run):
    # The module that dropped (and released) the heads resumes a checkpoint from before the switch too: the heads
    # train again before the optimizer state loads, so that theirs loads with it (and, after a fit, the same
    # module's trainer.test of that checkpoint, which loads into the fit's optimizers, leaves them frozen).
    for state in ranks:
        uninterrupted, resumed = state[mode]["uninterrupted"], state[mode][run]
        assert resumed["global_step"] == 12
        assert resumed["drop_times"] == uninterrupted["drop_times"] == {"recon": SWITCH_AT, "parity": SWITCH_AT}
        assert resumed["released"] == uninterrupted["released"]
        for task in uninterrupted["released"]:  # released again on resume, on each rank, and not re-padded since
            assert resumed["head_bytes"][task] == 4 * 4, f"{task}'s shards hold memory again after the resume"
        assert resumed["params"].keys() == uninterrupted["params"].keys()
        for name, p in uninterrupted["params"].items():  # gathered into full tensors on each rank
            assert torch.equal(resumed["params"][name], p), f"{name} differs in {run}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kept", "released"])
def test_testing_a_checkpoint_with_the_module_that_trained_it(ranks, mode):
    # Under ModelParallelStrategy the weights load before any hook: a released head gets storage again first, and
    # is released again when the checkpoint (saved after the switch) has it released.
    for state in ranks:
        tested = state[mode]["uninterrupted"]["tested"]
        for step in (4, 8):
            assert tested[step]["same"] == tested[step]["fresh"], f"step {step}: the same module tests differently"
        assert tested[4]["released"] == []  # the checkpoint from before the switch has the heads training
        assert tested[8]["released"] == state[mode]["uninterrupted"]["released"]
        for task in tested[8]["released"]:
            assert tested[8]["head_bytes"][task] == 4 * 4  # one element per shard: released again
            assert tested[4]["head_bytes"][task] > 10 * 4 * 4


@pytest.mark.slow
def test_single_task_export_loads_into_an_unsharded_model_and_predicts_the_same(ranks):
    path = Path(ranks[0]["single_task_path"])
    checkpoint = torch.load(path, weights_only=False)
    assert path.is_file()  # one file, not a distributed-checkpoint folder
    assert not any(k.startswith(AUX) or k.startswith("mt2st_drops") for k in checkpoint["state_dict"])
    assert not any(internals.is_dtensor(v) for v in checkpoint["state_dict"].values())
    encoder = MLPEncoder(in_features=16, hidden=32, depth=2)  # a module hyperparameter the model does not save
    model = MultiTaskModel.load_from_checkpoint(path, encoder=encoder, strict=False)
    model.eval()
    run = ranks[0]["kept"]["uninterrupted"]
    with torch.no_grad():
        assert torch.equal(model(run["x"], tasks=("label",))["label"], run["prediction"])


@pytest.mark.slow
def test_the_export_gathers_full_tensors_on_rank_zero_only(ranks):
    full = ranks[0]["kept"]["uninterrupted"]["params"]
    kept = {k: tuple(v.shape) for k, v in full.items() if not k.startswith(AUX)}
    assert ranks[0]["kept"]["uninterrupted"]["gathered"] == kept
    assert ranks[1]["kept"]["uninterrupted"]["gathered"] == {}  # rank 1 took part in the gathers, kept nothing


@pytest.mark.slow
def test_a_plateau_that_one_ranks_data_would_trigger_drops_on_both_ranks_at_once(ranks):
    # Rank 1's score stops improving after epoch 1, rank 0's never: the decision is reduced across the group.
    seen = [state["plateau"] for state in ranks]
    assert seen[0]["drop_times"] == seen[1]["drop_times"] != {}
    assert seen[0]["active"] == seen[1]["active"] == ("label",)
    # The drop froze and freed the shards, which the optimizer holds.
    assert all(run["dropped_are_frozen_shards"] and run["dropped_optimizer_state"] == 0 for run in seen)


@pytest.mark.slow
def test_gradnorm_measures_local_features_and_agrees_across_ranks(ranks):
    histories = [state["gradnorm"]["weights_history"] for state in ranks]
    assert histories[0] == histories[1]
    assert len({tuple(sorted(w.items())) for step, w in histories[0] if step < 7}) > 2, "the weights never moved"
    assert all(state["gradnorm"]["drop_times"] == {"recon": 7, "parity": 7} for state in ranks)


# ---------------------------------------------------------------------------------------- one process, in here
def test_fully_shard_tasks_gives_each_head_a_unit_of_its_own(process_group):
    model = toy_model()
    fully_shard_tasks(model, encoder_units=[m for m in model.encoder.net if isinstance(m, nn.Linear)])
    names = {id(p): n for n, p in model.named_parameters()}
    units = sorted(sorted(names[id(p)].rsplit(".", 1)[0] for p in unit) for unit in internals.fsdp2_units(model))
    assert units == [
        ["encoder.net.1", "encoder.net.1"], ["encoder.net.3", "encoder.net.3"],
        ["heads.label.0", "heads.label.0", "heads.label.2", "heads.label.2"],
        ["heads.parity.0", "heads.parity.0", "heads.parity.2", "heads.parity.2"],
        ["heads.recon.0", "heads.recon.0", "heads.recon.2", "heads.recon.2"],
    ]
    assert all(internals.is_dtensor(p) for p in model.parameters())
    check_head_units(model)


def test_fully_shard_tasks_makes_the_module_the_one_root_which_holds_what_is_left(process_group):
    model = toy_model()
    model.scale = nn.Parameter(torch.ones(1))  # registered on the module itself: the root holds it
    fully_shard_tasks(model)  # no encoder units: the root holds the encoder, each head is a unit of its own
    names = {id(p): n for n, p in model.named_parameters()}
    units = sorted(sorted({names[id(p)].split(".")[0] for p in unit}) for unit in internals.fsdp2_units(model))
    assert units == [["encoder", "scale"], ["heads"], ["heads"], ["heads"]]
    assert isinstance(model, internals.fully_shard_api()[1])
    # Lightning calls the step methods, not forward: each is a forward of the root for FSDP2, wrapped once.
    for name in ("training_step", "validation_step", "test_step", "predict_step"):
        assert getattr(model, name).__wrapped__.__func__ is getattr(type(model), name), name
    fully_shard_tasks(model)  # idempotent, as Lightning asks of configure_model (called again before testing)
    assert len(internals.fsdp2_units(model)) == 4
    assert model.training_step.__wrapped__.__func__ is type(model).training_step  # not wrapped twice


def test_fully_shard_tasks_refuses_a_unit_outside_the_module(process_group):
    with pytest.raises(ValueError, match="is not a submodule"):
        fully_shard_tasks(toy_model(), encoder_units=[nn.Linear(2, 2)])


class ReshardProbe(MultiTaskModel):
    """Records, in each training_step, whether the encoder units' and the heads' parameters are full tensors
    while a head runs, and whether they are shards (DTensors) again once the step's forward is done."""

    def configure_model(self):
        fully_shard_tasks(self, encoder_units=[m for m in self.encoder.net if isinstance(m, nn.Linear)])
        self.seen = []
        # Prepended: before FSDP2's post-forward hook reshards the head.
        self.heads["label"].register_forward_hook(lambda *_: self.seen.append(("in head", self._sharded())),
                                                  prepend=True)

    def _sharded(self) -> dict[str, bool]:
        encoder = [m for m in self.encoder.net if isinstance(m, nn.Linear)]
        units = {"encoder": encoder, "heads": list(self.heads.values())}
        return {part: [all(internals.is_dtensor(p) for p in unit.parameters()) for unit in modules]
                for part, modules in units.items()}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.seen.append(("after forward", self._sharded()))  # before backward: only the root may be gathered
        return loss


def one_process_fsdp2_trainer(root, **kwargs) -> pl.Trainer:
    """A quiet one-process Trainer under ModelParallelStrategy (FSDP2 over a gloo group of one)."""
    return pl.Trainer(
        accelerator="cpu", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=root, **kwargs,
    )


@pytest.mark.usefixtures("restored_environ")
def test_each_unit_but_the_root_is_sharded_again_from_its_forward_to_its_backward(tmp_path):
    # The point of the single root: FSDP2 does not reshard a root after forward, so were each encoder unit and
    # head a root of its own, the whole model would stay unsharded from forward to backward.
    pl.seed_everything(0)
    model = ReshardProbe(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)
    trainer = one_process_fsdp2_trainer(tmp_path, max_steps=2)
    try:
        trainer.fit(model, toy_loader())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert [when for when, _ in model.seen] == ["in head", "after forward"] * 2
    for when, sharded in model.seen:
        if when == "in head":  # the encoder units ran and are sharded again; the label head is gathered
            assert sharded["encoder"] == [True, True] and sharded["heads"][0] is False, sharded
        else:
            assert sharded == {"encoder": [True, True], "heads": [True, True, True]}, sharded


def test_measuring_on_sharded_parameters_says_to_measure_on_the_features(process_group):
    from mt2st_lightning import adaptive

    model = toy_model()
    fully_shard_tasks(model)
    h = torch.randn(4, 32, requires_grad=True)
    loss = model.heads["recon"](h).square().mean()
    with pytest.raises(ValueError, match=r"FSDP2 shards.*pass features=h to mt2st_loss"):
        adaptive.squared_grad_norms([loss], list(model.shared_parameters()))
    assert adaptive.squared_grad_norms([loss], [h]).shape == (1,)  # the representation mode works


class RootFeatures(MultiTaskModel):
    """Measures on a parameter the root holds (as the text transformer measures on its embedding table): each
    task's gradient reaches it through the encoder units and through `mix`, whose backward reads its weight,
    which the root holds too."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.ones(4))  # along the inputs' last dimension
        self.mix = nn.Linear(4, 4)

    def configure_model(self):
        fully_shard_tasks(self, encoder_units=[m for m in self.encoder.net if isinstance(m, nn.Linear)])

    def training_step(self, batch, batch_idx):
        h = self.encoder(self.mix(batch["x"] * self.scale))
        losses = {t: self.task_loss(t, self.heads[t](h), batch[t]) for t in self.active_tasks}
        return self.mt2st_loss(losses, features=self.scale)


@pytest.mark.usefixtures("restored_environ")
def test_measuring_each_tasks_gradient_on_a_root_parameter(tmp_path):
    # One backward per task before the step's own: FSDP2 reshards the root after each unless it is kept gathered.
    pl.seed_everything(0)
    model = RootFeatures(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)
    callback = MT2STCallback("gradnorm", switch_at=3, adapt_every=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        callbacks=[callback], max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    try:
        trainer.fit(model, toy_loader())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert callback.drop_times == {"recon": 3, "parity": 3}
    assert internals.is_dtensor(model.scale) and model.scale.grad is not None  # trained, resharded
    assert internals.fsdp2_reshards_after_backward(model)  # as it was before the measurements


def test_a_head_left_gathered_by_a_no_grad_forward_is_dropped_as_shards(process_group):
    model = toy_model(head_hidden=8)
    fully_shard_tasks(model, reshard_after_forward=False)  # every unit stays gathered after its forward
    with torch.no_grad():
        model(torch.randn(4, 16))  # e.g. a validation_step that runs every head: no backward reshards them
    head = model.heads["recon"]
    assert not any(internals.is_dtensor(p) for p in head.parameters())
    model.drop_task("recon", release=True)
    params = list(head.parameters())
    assert all(internals.is_dtensor(p) and not p.requires_grad for p in params)  # the shards the optimizer holds
    assert all(p.to_local().untyped_storage().nbytes() == p.element_size() for p in params)  # released


def test_a_released_head_refuses_to_run_instead_of_gathering_freed_shards(process_group):
    model = toy_model(head_hidden=8)
    fully_shard_tasks(model)
    x = torch.randn(4, 16)
    model(x)  # every head gathers once: FSDP2 is initialised as in a training run
    model.drop_task("recon", release=True)
    assert all(internals.is_dtensor(p) for p in model.heads["recon"].parameters())
    with pytest.raises(RuntimeError, match=r"the head of task 'recon' was released .* Call only the heads of "
                                           r"`self.active_tasks`"):
        model(x, tasks=model.tasks)  # e.g. a validation_step that runs every head
    assert set(model(x)) == {"label", "parity"}  # the heads that remain run
    with pytest.raises(RuntimeError, match="the head of task 'recon' was released"):
        model.heads["recon"](torch.randn(4, 32))


class ShardedWithEncoder(MultiTaskModel):
    """Shards the `recon` head in one unit with the encoder: a drop could free nothing."""

    def configure_model(self):
        fully_shard, _ = internals.fully_shard_api()
        mesh = self.device_mesh["data_parallel"]
        for task in ("label", "parity"):
            fully_shard(self.heads[task], mesh=mesh)
        fully_shard([self.encoder, self.heads["recon"]], mesh=mesh)


@pytest.mark.usefixtures("restored_environ")
def test_a_head_sharded_with_the_encoder_is_refused_before_training(tmp_path):
    pl.seed_everything(0)
    model = ShardedWithEncoder(MLPEncoder(in_features=16, hidden=32, depth=2), TASKS, primary="label", head_hidden=8)
    trainer = one_process_fsdp2_trainer(tmp_path, callbacks=[MT2STCallback("switch", switch_at=2)], max_steps=3)
    try:
        with pytest.raises(RuntimeError, match=r"cannot drop the auxiliary head 'recon': it is sharded in one FSDP "
                                               r"unit together with encoder\.net\.1\.weight"):
            trainer.fit(model, toy_loader())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class FakeMesh:
    """What check_can_drop reads of ModelParallelStrategy.device_mesh."""

    def __init__(self, data_parallel: int, tensor_parallel: int):
        self.sizes = {"data_parallel": data_parallel, "tensor_parallel": tensor_parallel}
        self.mesh_dim_names = tuple(self.sizes)

    def __getitem__(self, dim):
        return type("Dim", (), {"size": lambda _, n=self.sizes[dim]: n})()

    def size(self):
        return self.sizes["data_parallel"] * self.sizes["tensor_parallel"]


def model_parallel(data_parallel: int, tensor_parallel: int, **kwargs) -> ModelParallelStrategy:
    strategy = ModelParallelStrategy(data_parallel_size=data_parallel, tensor_parallel_size=tensor_parallel, **kwargs)
    strategy._device_mesh = FakeMesh(data_parallel, tensor_parallel)  # set by setup_environment in a real run
    return strategy


def test_tensor_parallelism_is_refused():
    heads.check_can_drop(model_parallel(2, 1))
    heads.check_can_drop(model_parallel(2, 1), release_heads=True)
    with pytest.raises(RuntimeError, match=r"tensor parallelism \(tensor_parallel_size=2\) is not supported"
                                           r".*ModelParallelStrategy\(data_parallel_size=4, tensor_parallel_size=1\)"):
        heads.check_can_drop(model_parallel(2, 2))


def test_a_full_checkpoint_file_is_warned_about():
    # Lightning loads ModelParallelStrategy(save_distributed_checkpoint=False)'s file tensor by tensor, without the
    # drops the module's state dict carries: resuming after a drop fails in torch (checked by hand: "Missing
    # optimizer state for parameter 'heads.recon.0.weight'"), so the callback says so before training.
    with pytest.warns(UserWarning, match="a checkpoint saved after a drop cannot be resumed"):
        heads.check_can_drop(model_parallel(2, 1, save_distributed_checkpoint=False))


def test_deepspeed_is_refused_with_a_pointer_to_fsdp2():
    with pytest.raises(RuntimeError, match=r"does not drop heads under DeepSpeed.*ModelParallelStrategy.*"
                                           r"fully_shard_tasks"):
        heads.check_can_drop(DeepSpeedStrategy.__new__(DeepSpeedStrategy))


def test_fsdp1_needs_use_orig_params_and_keeps_the_weights():
    heads.check_can_drop(FSDPStrategy())  # Lightning's default: use_orig_params=True
    with pytest.raises(RuntimeError, match=r"needs FSDPStrategy\(use_orig_params=True\)"):
        heads.check_can_drop(FSDPStrategy(use_orig_params=False))
    with pytest.raises(RuntimeError, match=r"release_heads=True\) is not supported under strategy='fsdp'"):
        heads.check_can_drop(FSDPStrategy(), release_heads=True)
