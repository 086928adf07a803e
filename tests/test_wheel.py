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


def _run(*cmd: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    # Nothing may point back into the checkout: no PYTHONPATH, and a working directory outside it.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [str(c) for c in cmd], check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, Path]:
    """The wheel, and a venv that sees the system's torch/lightning (--system-site-packages) but holds its own,
    non-editable mt2st_lightning from that wheel."""
    base = tmp_path_factory.mktemp("wheel")
    assert not base.resolve().is_relative_to(ROOT)
    # hatchling (the build backend, in the test extra) is used as installed: no download at test time.
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", ROOT, "-w", base / "dist", cwd=base)
    (wheel,) = (base / "dist").glob("mt2st_lightning-*.whl")
    venv = base / "venv"
    _run(sys.executable, "-m", "venv", "--system-site-packages", venv, cwd=base)
    python = venv / "bin" / "python"
    # --ignore-installed: the editable install of this checkout is visible through the system site-packages.
    _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", wheel, cwd=base)
    outside = base / "elsewhere"
    outside.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "train": venv / "bin" / "mt2st-train", "cwd": outside}


@pytest.mark.slow
def test_wheel_holds_the_package_and_every_config(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    configs = {f"mt2st_lightning/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert {"mt2st_lightning/__init__.py", "mt2st_lightning/app/train.py", "mt2st_lightning/report/__init__.py"} <= names


@pytest.mark.slow
def test_installed_wheel_is_what_the_scratch_environment_imports(installed):
    code = "import json, mt2st_lightning, mt2st_lightning.app.train as t; print(json.dumps([mt2st_lightning.__file__, str(t.CONFIG_DIR)]))"
    package, config_dir = json.loads(_run(installed["python"], "-c", code, cwd=installed["cwd"]).stdout)
    site = installed["venv"].resolve()
    assert Path(package).resolve().is_relative_to(site), f"imported {package}, not the wheel's copy"
    assert Path(config_dir).resolve().is_relative_to(site) and (Path(config_dir) / "train.yaml").is_file()


@pytest.mark.slow
def test_installed_app_prints_its_config_from_outside_the_repository(installed):
    out = _run(installed["train"], "--cfg", "job", cwd=installed["cwd"]).stdout
    assert "_target_: mt2st_lightning.MT2STCallback" in out and "_target_: mt2st_lightning.examples.data.DigitsDataModule" in out


@pytest.mark.slow
def test_installed_app_trains_one_batch_from_outside_the_repository(installed):
    _run(installed["train"], "trainer.fast_dev_run=true", cwd=installed["cwd"])
    (summary,) = (installed["cwd"] / "outputs").rglob("run_summary.json")
    run = json.loads(summary.read_text())
    assert run["total_steps"] == 1 and run["test_primary_metric"] is not None
    # Hydra read the configs that the wheel installed, not the checkout's conf/.
    hydra = (summary.parent / ".hydra" / "hydra.yaml").read_text()
    assert str(installed["venv"] / "lib") in hydra and str(ROOT / "conf") not in hydra
