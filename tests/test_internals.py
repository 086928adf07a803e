"""One test per private Lightning/PyTorch internal that ``mt2st_lightning.internals`` wraps: each fails when the
internal changes, so that an upgrade breaks here, by name, rather than somewhere in training. And no other core
module touches a private name of a foreign object."""

from __future__ import annotations

import ast
import inspect
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel

from mt2st_lightning import MT2STCallback, heads, internals
from tests.conftest import toy_loader, toy_model, toy_trainer


class Probe(pl.Callback):
    """Reads the two logging internals at each training batch's start, as MT2STCallback does."""

    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append((trainer.global_step, internals.is_logging_step(trainer), internals.logging_step(trainer)))


def test_is_logging_step_follows_log_every_n_steps(tmp_path):
    # trainer._logger_connector.should_update_logs
    probe = Probe()
    toy_trainer(tmp_path, [probe, MT2STCallback("mtl")], max_epochs=2, log_every_n_steps=4).fit(toy_model(), toy_loader())
    assert [step for step, logging, _ in probe.rows if logging] == [3, 7, 11]
    probe = Probe()
    toy_trainer(tmp_path, [probe], max_steps=3, max_epochs=None, log_every_n_steps=0).fit(toy_model(), toy_loader())
    assert not any(logging for _, logging, _ in probe.rows)


def test_logging_step_is_the_step_lightning_logs_at(tmp_path):
    # trainer.fit_loop.epoch_loop._batches_that_stepped: equals the optimizer steps taken, across epochs
    probe = Probe()
    toy_trainer(tmp_path, [probe], max_epochs=2, accumulate_grad_batches=2).fit(toy_model(), toy_loader())
    assert all(step == logged for step, _, logged in probe.rows)
    assert probe.rows[-1][0] == 5


def test_ddp_remove_autograd_hooks_exists_and_takes_no_arguments():
    # DistributedDataParallel._remove_autograd_hooks, called on the old wrapper before the reducer rebuild
    method = getattr(DistributedDataParallel, "_remove_autograd_hooks", None)
    assert callable(method)
    assert list(inspect.signature(method).parameters) == ["self"]
    calls = []

    class Wrapper:
        def _remove_autograd_hooks(self):
            calls.append(True)

    internals.remove_ddp_autograd_hooks(Wrapper())  # type: ignore[arg-type]
    assert calls == [True]


def test_ddp_comm_hook_reads_the_registered_hook():
    # DDPStrategy._ddp_comm_hook
    def hook(state, bucket):
        return bucket.buffer()

    assert internals.ddp_comm_hook(DDPStrategy(ddp_comm_hook=hook)) is hook
    assert internals.ddp_comm_hook(DDPStrategy()) is None


@pytest.mark.parametrize(
    ("strategy", "relaunches"),
    [("ddp", True), ("ddp_spawn", False), ("fsdp2", True)],  # fsdp2: trainer=fsdp2_cpu is refused in a --multirun too
)
def test_relaunches_script_recognises_the_subprocess_launcher(strategy, relaunches):
    # lightning.pytorch.strategies.launchers._SubprocessScriptLauncher
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False)
    assert internals.relaunches_script(trainer.strategy) is relaunches


def test_sharded_ddp_subclasses_are_recognised_by_name():
    # DeepSpeedStrategy subclasses DDPStrategy: check_can_drop tells it apart by its class name
    from lightning.pytorch.strategies import DeepSpeedStrategy

    assert issubclass(DeepSpeedStrategy, DDPStrategy)
    with pytest.raises(RuntimeError, match="does not drop heads under DeepSpeed"):
        heads.check_can_drop(DeepSpeedStrategy.__new__(DeepSpeedStrategy))


def test_saves_distributed_checkpoint_reads_the_argument():
    # ModelParallelStrategy._save_distributed_checkpoint
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert internals.saves_distributed_checkpoint(ModelParallelStrategy()) is True
    assert internals.saves_distributed_checkpoint(ModelParallelStrategy(save_distributed_checkpoint=False)) is False


# ------------------------------------------------------------------------------ FSDP2 (fully_shard)
@pytest.mark.usefixtures("process_group")
def test_fully_shard_api_is_the_function_and_its_module_class():
    # torch.distributed.fsdp.{fully_shard, FSDPModule} (torch.distributed._composable.fsdp before torch 2.6)
    fully_shard, fsdp_module = internals.fully_shard_api()
    layer = torch.nn.Linear(4, 4)
    assert fully_shard(layer) is layer and isinstance(layer, fsdp_module)
    assert callable(fully_shard.state)  # what fsdp2_units reads the units through


@pytest.mark.usefixtures("process_group")
def test_fsdp2_units_lists_each_fully_shard_calls_parameters():
    # fully_shard.state(m)._fsdp_param_groups[i].fsdp_params[j].sharded_param
    fully_shard, _ = internals.fully_shard_api()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fully_shard(model[0])
    fully_shard([model[1], model[2]])  # one unit of two modules
    fully_shard(model)  # the root: nothing left to hold
    units = internals.fsdp2_units(model)
    assert sorted(len(unit) for unit in units) == [2, 4]  # the root holds no parameter: no group
    registered = {id(p) for p in model.parameters()}
    assert all(id(p) in registered for unit in units for p in unit)  # the sharded parameters the module holds


@pytest.mark.usefixtures("process_group")
def test_register_fsdp_forward_method_gathers_the_root_around_the_method():
    # torch.distributed.fsdp.register_fsdp_forward_method (torch.distributed._composable.fsdp before torch 2.6)
    fully_shard, _ = internals.fully_shard_api()

    class Root(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(4))

        def step(self):
            return internals.is_dtensor(self.weight)

    plain, root = Root(), fully_shard(Root())
    internals.register_fsdp_forward_method(plain, "step")  # not an FSDP2 unit: nothing changes
    assert plain.step() is False and "step" not in vars(plain)
    assert root.step() is True  # outside a forward: the shard
    internals.register_fsdp_forward_method(root, "step")
    assert root.step() is False  # gathered around the method, as around forward


@pytest.mark.usefixtures("process_group")
def test_fsdp2_reshards_after_backward_reads_what_fsdp_module_sets():
    # fully_shard.state(unit)._fsdp_param_groups[i].reshard_after_backward, set by set_reshard_after_backward
    fully_shard, _ = internals.fully_shard_api()
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    fully_shard(model[0])
    fully_shard(model)
    assert internals.fsdp2_reshards_after_backward(model) is True  # FSDP2's default
    model.set_reshard_after_backward(False, recurse=False)
    assert internals.fsdp2_reshards_after_backward(model) is False
    assert internals.fsdp2_reshards_after_backward(model[0]) is True  # the root's own parameters only


def test_register_fsdp_forward_method_says_which_torch_it_needs(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)
    monkeypatch.setitem(sys.modules, "torch.distributed._composable.fsdp", None)
    with pytest.raises(ImportError, match=r"register_fsdp_forward_method needs torch>=2.4 .*pip install 'torch>=2.4'"):
        internals.register_fsdp_forward_method(torch.nn.Linear(2, 2), "forward")


def test_fully_shard_api_says_which_torch_it_needs(monkeypatch):
    # Neither torch.distributed.fsdp.fully_shard (torch >= 2.6) nor torch.distributed._composable.fsdp (2.4, 2.5)
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", None)
    monkeypatch.setitem(sys.modules, "torch.distributed._composable.fsdp", None)
    with pytest.raises(ImportError, match=r"FSDP2 \(fully_shard\) needs torch>=2.4 .*pip install 'torch>=2.4'"):
        internals.fully_shard_api()


def test_register_load_state_dict_pre_hook_runs_before_the_module_loads():
    # nn.Module.register_load_state_dict_pre_hook (torch >= 2.5), else ._register_load_state_dict_pre_hook
    seen = []
    layer = torch.nn.Linear(2, 2)
    internals.register_load_state_dict_pre_hook(layer, lambda module, state_dict, prefix, *rest: seen.append(
        (module is layer, prefix, float(module.weight.sum()))))
    with torch.no_grad():
        layer.weight.zero_()
    layer.load_state_dict({"weight": torch.ones(2, 2), "bias": torch.ones(2)})
    assert seen == [(True, "", 0.0)] and float(layer.weight.sum()) == 4.0


def test_register_state_dict_post_hook_changes_the_entries_in_place():
    # nn.Module.register_state_dict_post_hook (torch >= 2.5), else ._register_state_dict_hook
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))

    def zeros(module, state_dict, prefix, local_metadata):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[key] = torch.zeros_like(state_dict[key])

    internals.register_state_dict_post_hook(model[0], zeros)
    state = model.state_dict()
    assert list(state) == ["0.weight", "0.bias"] and all(not v.any() for v in state.values())
    assert model[0].weight.abs().sum() > 0  # the module's own tensors are untouched


@pytest.mark.usefixtures("process_group")
def test_fsdp2_modules_lists_the_fully_shard_units_outermost_first():
    # isinstance(m, FSDPModule), FSDPModule from fully_shard_api(): what fully_shard turned into a unit
    fully_shard, _ = internals.fully_shard_api()
    inner, plain = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model = torch.nn.Sequential(inner, plain)
    assert internals.fsdp2_modules(model) == [] and not internals.is_fsdp2_module(model)
    fully_shard(inner)
    fully_shard(model)
    assert internals.fsdp2_modules(model) == [model, inner]
    assert internals.is_fsdp2_module(inner) and not internals.is_fsdp2_module(plain)


@pytest.mark.usefixtures("process_group")
def test_is_dtensor_tells_shards_from_plain_tensors():
    # torch.distributed.tensor.DTensor (torch.distributed._tensor before torch 2.5)
    fully_shard, _ = internals.fully_shard_api()
    layer = torch.nn.Linear(2, 2)
    assert not internals.is_dtensor(layer.weight)
    fully_shard(layer)
    assert internals.is_dtensor(layer.weight)


def test_rebuild_leaves_a_plain_module_alone():
    # strategy.model / strategy.configure_ddp(): only a DDP wrapper is rebuilt (tests/test_ddp.py rebuilds one)
    strategy = DDPStrategy()
    strategy.model = torch.nn.Linear(2, 2)
    assert heads.rebuild_ddp_reducer(strategy) is False


# ------------------------------------------------------------------------------ one module holds them all
CORE = Path(internals.__file__).parent
TESTS = Path(__file__).read_text()


def _core_files():
    """The core library's modules (the app, the report and the examples are packages of their own)."""
    return [p for p in sorted(CORE.rglob("*.py")) if p.relative_to(CORE).parts[0] not in ("app", "report", "examples")]


def test_every_internal_has_its_test_here():
    untested = [name for name in internals.__all__ if f"internals.{name}(" not in TESTS]
    assert not untested, f"add a test of mt2st_lightning.internals.{untested} to tests/test_internals.py"


def test_no_other_core_module_touches_a_private_foreign_name():
    own: set[str] = set()  # private names the package defines itself (its own helpers and attributes)
    trees = {path: ast.parse(path.read_text()) for path in _core_files()}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.startswith("_"):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                own.add(node.attr)
    found = []
    for path, tree in trees.items():
        if path.name == "internals.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("mt2st_lightning"):
                found += [f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                receiver = node.value.id if isinstance(node.value, ast.Name) else None
                if receiver not in ("self", "cls") and node.attr not in own:
                    found.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not found, f"private Lightning/PyTorch access outside mt2st_lightning/internals.py: {found}"
