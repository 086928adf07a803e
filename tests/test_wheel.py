"""A real wheel: built from this checkout, installed (not editable) into a scratch environment, run from a folder
outside the repository. This proves that the package and its Hydra configs ship."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(
    *cmd: str | Path, cwd: Path, pythonpath: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    # Nothing may point back into the checkout: PYTHONPATH holds the installed wheel alone, and the working
    # directory lies outside the checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run(
        [str(c) for c in cmd], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The wheel, installed non-editable into a folder of its own that this interpreter puts first on its path.

    Not a venv made from this interpreter: ``venv --system-site-packages`` made from inside a venv sees the base
    interpreter's packages, not this one's (where torch and lightning are). A ``--target`` folder on PYTHONPATH
    works the same in a venv, a conda environment or a system Python, and comes before the editable install of
    this checkout, which stays visible through site-packages."""
    base = tmp_path_factory.mktemp("wheel")
    assert not base.resolve().is_relative_to(ROOT)
    # hatchling (the build backend, in the test extra) is used as installed: no download at test time.
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ROOT, "-w", base / "dist", cwd=base)
    (wheel,) = (base / "dist").glob("mt2st_lightning-*.whl")
    site = base / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", site, wheel, cwd=base)
    outside = base / "elsewhere"
    outside.mkdir()
    return {"wheel": wheel, "site": site, "train": site / "bin" / "mt2st-train", "cwd": outside}


def _run_installed(installed: dict[str, Path], *cmd: str | Path) -> subprocess.CompletedProcess:
    return _run(*cmd, cwd=installed["cwd"], pythonpath=installed["site"])


@pytest.mark.slow
def test_wheel_holds_the_package_and_every_config(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    configs = {f"mt2st_lightning/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert {"mt2st_lightning/__init__.py", "mt2st_lightning/app/train.py", "mt2st_lightning/report/__init__.py"} <= names


@pytest.mark.slow
def test_installed_wheel_is_what_the_scratch_environment_imports(installed):
    code = "import json, mt2st_lightning, mt2st_lightning.app.train as t; print(json.dumps([mt2st_lightning.__file__, str(t.CONFIG_DIR)]))"
    package, config_dir = json.loads(_run_installed(installed, sys.executable, "-c", code).stdout)
    site = installed["site"].resolve()
    assert Path(package).resolve().is_relative_to(site), f"imported {package}, not the wheel's copy"
    assert Path(config_dir).resolve().is_relative_to(site) and (Path(config_dir) / "train.yaml").is_file()


@pytest.mark.slow
def test_installed_app_prints_its_config_from_outside_the_repository(installed):
    out = _run_installed(installed, installed["train"], "--cfg", "job").stdout
    assert "_target_: mt2st_lightning.MT2STCallback" in out and "_target_: mt2st_lightning.examples.data.DigitsDataModule" in out


@pytest.mark.slow
def test_installed_app_trains_one_batch_from_outside_the_repository(installed):
    _run_installed(installed, installed["train"], "trainer.fast_dev_run=true")
    (summary,) = (installed["cwd"] / "outputs").rglob("run_summary.json")
    run = json.loads(summary.read_text())
    assert run["total_steps"] == 1 and run["test_primary_metric"] is not None
    # Hydra read the configs that the wheel installed, not the checkout's conf/.
    hydra = (summary.parent / ".hydra" / "hydra.yaml").read_text()
    assert str(installed["site"]) in hydra and str(ROOT / "conf") not in hydra
