"""The package's parts and their extras: the core trains with torch and Lightning alone, and each optional part
(the app, the report, the examples) fails without its extra with an error that names the pip command.

Each check runs in a fresh interpreter in which the optional dependencies cannot be imported: ``sys.modules[name]
= None`` makes ``import name`` raise ``ModuleNotFoundError`` and ``importlib.util.find_spec(name)`` return
``None``, as in an environment where they are not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from mt2st_lightning.extras import EXTRAS

#: What the core must never import: every optional part's dependencies, less those that Lightning itself
#: imports (torchmetrics is one of its dependencies, and torchmetrics imports matplotlib wherever matplotlib is
#: installed, judging by its package metadata, which this blocking cannot hide). `.ci/run` checks the core in a
#: virtual environment that holds torch and Lightning alone, where matplotlib is not installed at all.
OPTIONAL = ("hydra", "omegaconf", "sklearn", "gensim", "optuna")


def _run_without(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    prelude = f"import sys\nfor _name in {modules!r}:\n    sys.modules[_name] = None\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300
    )


def test_the_optional_dependencies_are_the_extras_modules():
    # OPTIONAL above is what the extras install, less what Lightning imports itself.
    assert set(OPTIONAL) == {m for modules in EXTRAS.values() for m in modules} - {"torchmetrics", "matplotlib"}


@pytest.mark.slow
def test_the_core_trains_a_model_of_its_own_without_any_extra():
    result = _run_without(
        OPTIONAL,
        """
        import lightning.pytorch as pl
        import torch
        import torch.nn.functional as F
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        import mt2st_lightning
        from mt2st_lightning import MT2STCallback, MT2STMixin
        from mt2st_lightning.flops import PhaseCostMeter


        class Model(MT2STMixin, pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.encoder = nn.Linear(8, 16)
                self.heads = nn.ModuleDict({"y": nn.Linear(16, 2), "recon": nn.Linear(16, 8)})
                self.declare_tasks(primary="y", heads=self.heads)

            def training_step(self, batch, batch_idx):
                x, y = batch
                h = self.encoder(x).relu()
                losses = {"y": F.cross_entropy(self.heads["y"](h), y)}
                if "recon" in self.active_tasks:
                    losses["recon"] = F.mse_loss(self.heads["recon"](h), x)
                return self.mt2st_loss(losses, features=h)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)


        data = TensorDataset(torch.randn(64, 8), torch.randint(0, 2, (64,)))
        trainer = pl.Trainer(
            max_steps=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, callbacks=[MT2STCallback("gradnorm", switch_at=0.5), PhaseCostMeter()],
        )
        trainer.fit(Model(), DataLoader(data, batch_size=8))
        assert trainer.lightning_module.active_tasks == ("y",)
        loaded = sorted({m.split(".")[0] for m, mod in sys.modules.items() if mod is not None} & set(%r))
        assert not loaded, loaded
        print("ok")
        """
        % (OPTIONAL,),
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize(
    ("blocked", "code", "extra"),
    [
        (("hydra",), "from mt2st_lightning.app import main; main(['--help'])", "app"),
        # Lightning imports matplotlib (through torchmetrics) where it is installed: hide it once they are loaded.
        ((), "from mt2st_lightning.report import main; sys.modules['matplotlib'] = None; main(['.'])", "report"),
        (("sklearn",), "import mt2st_lightning.examples.models", "examples"),
    ],
    ids=["mt2st-train", "mt2st-report", "examples"],
)
def test_a_part_without_its_extra_names_the_pip_command(blocked, code, extra):
    result = _run_without(blocked, code)
    assert result.returncode != 0
    assert f'pip install "mt2st-lightning[{extra}]"' in result.stderr, result.stderr[-2000:]
    # A message, not a traceback from deep inside a dependency.
    assert "MissingExtraError" in result.stderr or "Traceback" not in result.stderr


def test_the_run_format_imports_without_the_app_extra():
    # The report and the example models read it; they must not need Hydra for that.
    result = _run_without(("hydra", "omegaconf"), "import mt2st_lightning.app.run_format, mt2st_lightning.report")
    assert result.returncode == 0, result.stderr[-2000:]
