"""Crash safety of ``mt2st-train``: a run killed with SIGKILL mid-epoch loses at most one epoch, and resuming it
from ``checkpoints/last.ckpt`` finishes the same run (same steps, same drops, same final parameters)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from mt2st_lightning.report import collect_runs, find_incomplete_runs


class KillAtStep(L.Callback):
    """Kills its own process with SIGKILL at an optimizer step, as the OOM killer or a lost node would: no
    exception, no hook, no flush runs after it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------- the test
ROOT = Path(__file__).resolve().parents[1]
# 4 epochs of 5 batches: 20 steps, the auxiliary heads leave at step 6 (switch_at 0.3).
RUN = ("experiment=smoke", "trainer.max_epochs=4", "trainer.limit_train_batches=5", "test=false")
STEPS_PER_EPOCH = 5
KILL_AT = 13  # in the third epoch (steps 10-14), after the switch


def train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "mt2st_lightning.app.train", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=180, check=False,
    )


def metric_rows(run: Path, column: str) -> list[tuple[int, float]]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return [(int(r["step"]), float(r[column])) for r in csv.DictReader(f) if r.get(column)]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_into_the_uninterrupted_run(tmp_path):
    full, killed, relaunch = tmp_path / "full", tmp_path / "killed", tmp_path / "relaunch"
    done = train_cli(*RUN, f"hydra.run.dir={full}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    kill = ["+callbacks.kill._target_=tests.test_crash_resume.KillAtStep", f"+callbacks.kill.step={KILL_AT}"]
    dead = train_cli(*RUN, *kill, f"hydra.run.dir={killed}", cwd=tmp_path)
    assert dead.returncode == -signal.SIGKILL
    last = killed / "checkpoints" / "last.ckpt"
    saved_at = torch.load(last, weights_only=False)["global_step"]
    assert saved_at == 10 and KILL_AT - saved_at <= STEPS_PER_EPOCH  # at most one epoch of steps lost
    # The report lists it, as incomplete.
    assert [r.dir for r in find_incomplete_runs(tmp_path)] == [killed] and [r.dir for r in collect_runs(tmp_path)] == [full]

    resumed = train_cli(*RUN, f"ckpt_path={last}", f"hydra.run.dir={relaunch}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (relaunch / "run_summary.json").exists() and (relaunch / "continues_run.json").is_file()

    want = json.loads((full / "run_summary.json").read_text())
    got = json.loads((killed / "run_summary.json").read_text())  # the run continued in its own folder
    assert got["total_steps"] == want["total_steps"] == 20
    assert got["drop_times"] == want["drop_times"] == {"recon": 6, "edges": 6, "moments": 6}
    assert got["train_flops"] == want["train_flops"]  # the whole run's FLOPs, from step 0
    assert [p["batches"] for p in got["phases"].values()] == [6, 14]
    assert got["fit_wall_time_s"] > 0 and got["resumed_from"] == str(last)
    # The final parameters are the uninterrupted run's, exactly (the same batches in the same order).
    mine, theirs = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for d in (killed, full))
    assert mine.keys() == theirs.keys()
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name
    # ...and the metric history from step 0, every step once: the killed run's rows after its checkpoint
    # were replaced by the resumed run's.
    for column in ("train/loss", "val/primary_metric", "mt2st/weight/recon", "cost/flops"):
        assert metric_rows(killed, column) == metric_rows(full, column), column
    assert (killed / "train.log").read_text().count("Resuming run") == 1
    assert find_incomplete_runs(tmp_path) == []
