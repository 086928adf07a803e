"""FSDP2 in the app: the ``trainer=fsdp2_cpu`` and ``trainer=fsdp2`` presets compose, the example models shard
themselves (each head an FSDP2 unit of its own) only when ModelParallelStrategy asks, and a 2-process app run
trains across the switch, reports as a DDP run does and resumes from its distributed checkpoint (a folder)."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from mt2st_lightning import internals
from mt2st_lightning.app.run_format import RESUME_POINTER_FILE
from mt2st_lightning.app.train import check_fsdp2_mesh, train
from mt2st_lightning.examples.models import MLPEncoder, MultiTaskModel
from mt2st_lightning.examples.models.resnet import ResNetEncoder
from mt2st_lightning.examples.models.text_transformer import TextTransformerModel
from mt2st_lightning.examples.models.vision import VisionMultiTaskModel
from tests.test_app import AUX, compose_train, run_cli

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- presets
def test_the_cpu_preset_is_fsdp2_over_two_gloo_processes(tmp_path):
    cfg = compose_train("trainer=fsdp2_cpu", f"paths.output_dir={tmp_path}")
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.num_nodes) == ("cpu", 2, 1)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy) and trainer.num_devices == 2
    assert strategy.process_group_backend == "gloo"
    assert (cfg.trainer.strategy.data_parallel_size, cfg.trainer.strategy.tensor_parallel_size) == (2, 1)


def test_the_gpu_preset_shards_over_every_device_of_the_node():
    cfg = compose_train("trainer=fsdp2", "trainer.devices=8").trainer
    assert cfg.accelerator == "gpu" and cfg.strategy._target_.endswith(".ModelParallelStrategy")
    # data_parallel_size follows trainer.devices: one shard per process, no tensor parallelism.
    assert (cfg.strategy.data_parallel_size, cfg.strategy.tensor_parallel_size, cfg.strategy.process_group_backend) == (8, 1, "nccl")
    assert compose_train("trainer=fsdp2", "trainer.precision=bf16-mixed").trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["trainer.strategy.tensor_parallel_size=2", "trainer.strategy.data_parallel_size=1"], "data_parallel_size=1, tensor_parallel_size=2"),
        (["trainer.num_nodes=2"], r"set trainer.strategy.data_parallel_size=4 \(trainer.devices x trainer.num_nodes\)"),
    ],
)
def test_a_mesh_other_than_one_shard_per_process_is_refused_before_anything_starts(tmp_path, overrides, expected):
    cfg = compose_train("trainer=fsdp2_cpu", f"paths.output_dir={tmp_path}", *overrides)
    with pytest.raises(ValueError, match=expected):
        train(cfg)
    assert not any(tmp_path.iterdir())


def test_a_checkpoint_folder_without_its_metadata_is_refused_before_anything_is_built(tmp_path):
    folder = tmp_path / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)  # e.g. a distributed checkpoint whose save was cut short
    with pytest.raises(FileNotFoundError, match=r"does not exist as a checkpoint \(a folder without meta.pt\)"):
        train(compose_train(f"paths.output_dir={tmp_path / 'out'}", f"ckpt_path={folder}"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("page", ["README.md", "docs/distributed.md"])
def test_the_fsdp2_slurm_command_of_the_docs_matches_nodes_devices_and_the_mesh(page):
    # The FSDP2 run on 2 SLURM nodes x 4 GPUs: one line in the README, three in docs/distributed.md.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the optional extra [slurm]")
    text = (REPO / page).read_text()
    joined = text.replace("\\\n", " ")  # the continuation lines joined
    (command,) = [c for c in re.findall(r"^mt2st-train .*$", joined, flags=re.M) if "trainer=fsdp2" in c and "slurm" in c]
    overrides = [arg for arg in command.split()[1:] if arg != "--multirun"]
    cfg = compose_train(*overrides, hydra_config=True)
    launcher, trainer = cfg.hydra.launcher, cfg.trainer
    assert launcher._target_.endswith("SlurmLauncher") and trainer.strategy._target_.endswith(".ModelParallelStrategy")
    assert launcher.nodes == trainer.num_nodes == 2
    assert launcher.tasks_per_node == launcher.gpus_per_node == trainer.devices == 4
    assert trainer.strategy.data_parallel_size == 8
    check_fsdp2_mesh(trainer)
    assert cfg.strategy.release_heads is True


# ---------------------------------------------------------------------------------------------- the models
@pytest.fixture
def one_process_mesh(monkeypatch):
    """A 1-process gloo group and the mesh ModelParallelStrategy builds over it; the models read it through
    ``LightningModule.device_mesh``, as the strategy sets it before ``configure_model``."""
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
        monkeypatch.setattr(L.LightningModule, "device_mesh", property(lambda self: mesh))
        yield mesh
    finally:
        dist.destroy_process_group()


def _text_model() -> TextTransformerModel:
    tasks = {"sentiment": {"out_features": 2}, "domain": {"out_features": 4}, "mlm": {}}
    return TextTransformerModel(tasks, vocab_size=40, max_len=8, d_model=16, nhead=2, num_layers=2, dim_feedforward=32)


def _vision_model() -> VisionMultiTaskModel:
    tasks = {"label": {"kind": "classification", "out_features": 10}, "edges": {"image_shape": (1, 8, 8)}, "contrast": {}}
    return VisionMultiTaskModel(ResNetEncoder(channels=(4, 8)), tasks, primary="label", edge_hidden=8, projection_dim=4)


def _digits_model() -> MultiTaskModel:
    tasks = {"digit": {"kind": "classification", "out_features": 10}, **{t: {"kind": "regression", "out_features": 3} for t in AUX}}
    return MultiTaskModel(MLPEncoder(in_features=64, hidden=16), tasks, primary="digit", head_hidden=8)


MODELS = {"text_transformer": _text_model, "vision": _vision_model, "digits": _digits_model}


def _head_params(model) -> dict[str, set[str]]:
    """Each task head's parameter names (sharding replaces the parameter objects, not their names)."""
    return {task: _names(model, model.head_parameters(task)) for task in model.tasks}


def _names(model, params) -> set[str]:
    name = {id(p): n for n, p in model.named_parameters()}
    return {name[id(p)] for p in params}


def _units(model) -> list[set[str]]:
    return [_names(model, unit) for unit in internals.fsdp2_units(model)]


@pytest.mark.parametrize("name", list(MODELS))
def test_the_example_models_shard_each_head_as_a_unit_of_its_own_under_fsdp2(name, one_process_mesh):
    _, fsdp_module = internals.fully_shard_api()
    model = MODELS[name]()
    heads = _head_params(model)
    model.configure_model()
    assert all(isinstance(model.task_head(task), fsdp_module) for task in model.tasks)
    units = _units(model)
    for task, params in heads.items():
        assert params in units, f"the head of {task!r} is not exactly one FSDP2 unit"
    assert all(internals.is_dtensor(p) for p in model.parameters())  # every parameter sharded, none left out
    if name == "text_transformer":  # each encoder layer a unit of its own
        assert all(isinstance(layer, fsdp_module) for layer in model.encoder.layers)
    model.configure_model()  # Lightning calls it again before testing (fit, then test): nothing changes
    assert _units(model) == units


@pytest.mark.parametrize("name", list(MODELS))
def test_the_example_models_stay_unsharded_without_a_device_mesh(name):
    model = MODELS[name]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.configure_model()  # one device or DDP: device_mesh is None
    _, fsdp_module = internals.fully_shard_api()
    assert not any(isinstance(m, fsdp_module) for m in model.modules())
    assert not any(internals.is_dtensor(p) for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------- 2-process runs
def _summary(run: Path) -> dict:
    return json.loads((run / "run_summary.json").read_text())


@pytest.mark.slow
def test_paper_transformer_trains_sharded_from_the_app(tmp_path):
    from mt2st_lightning.examples.data.text import data_dir

    if not (data_dir() / "hutto_ICWSM_2014").is_dir():
        pytest.skip("the rated sentences are not installed (bash experiments/setup_data.sh)")
    result = run_cli(
        "experiment=paper_transformer",
        "trainer=fsdp2_cpu",
        "trainer.max_steps=4",
        "trainer.limit_train_batches=4",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "strategy.switch_at=2",
        "data.embedding_init=null",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = _summary(tmp_path / "run")
    assert summary["drop_times"] == {"domain": 2, "mlm": 2} and summary["total_steps"] == 4
    assert {"test/aux/domain_acc", "test/aux/mlm_loss"} <= set(summary["test_metrics"])


@pytest.mark.slow
def test_fsdp2_cpu_fails_resumes_from_its_distributed_checkpoint_and_reports_like_a_ddp_run(tmp_path, monkeypatch):
    # Two 2-process launches (about 25 s each alone): a run that fails at step 6, and its resume to the end.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    run = tmp_path / "run"
    common = [
        "experiment=smoke", "trainer=fsdp2_cpu", "+strategy.release_heads=true",
        # The whole validation and test splits: 269 samples each, split over the 2 processes.
        "trainer.limit_val_batches=null", "trainer.limit_test_batches=null",
    ]
    crash = ["+callbacks.crash._target_=tests.test_app.CrashAtStep", "+callbacks.crash.step=6"]
    failed = run_cli(*common, *crash, f"hydra.run.dir={run}", cwd=tmp_path, timeout=240)
    assert failed.returncode != 0 and "simulated failure" in failed.stderr
    # Checkpoints are distributed: a folder each, one shard file per process and the trainer's state (meta.pt).
    last = run / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    assert torch.load(last / "meta.pt", weights_only=False)["global_step"] == 4  # the end of the first epoch
    assert f"resume it with ckpt_path={last}" in failed.stdout + failed.stderr
    assert not (run / "run_summary.json").exists()

    # The resumed run continues in the failed run's folder (the launch's own folder points to it), drops where the
    # uninterrupted run dropped, and tests its best checkpoint, a folder too.
    resumed = run_cli(*common, f"ckpt_path={last}", f"hydra.run.dir={tmp_path / 'resume'}", cwd=tmp_path, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = _summary(run)
    assert summary["total_steps"] == 8 and summary["settings"]["devices"] == 2
    assert summary["drop_times"] == {task: 2 for task in AUX}
    assert [p["batches"] for p in summary["phases"].values()] == [2, 6]  # the cost from step 0
    assert summary["val_samples"] == summary["test_samples"] == 269
    assert summary["resumed_from"] == str(last.resolve())
    assert summary["tested_checkpoint"].startswith("checkpoints/epoch") and (run / summary["tested_checkpoint"]).is_dir()
    assert json.loads((tmp_path / "resume" / RESUME_POINTER_FILE).read_text())["run_dir"] == str(run)
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").read_text().splitlines()))
    assert [int(r["step"]) for r in rows if r.get("mt2st/weight/recon")] == list(range(8))
    # Global rank 0 alone writes the summary; rank 1 logs to a file of its own.
    assert [p.name for p in tmp_path.rglob("run_summary.json")] == ["run_summary.json"]
    assert (run / "train_ddp_process_1.log").is_file()
    assert not (run / "checkpoints" / "on_exception.ckpt").exists()  # removed when the resumed fit ended
