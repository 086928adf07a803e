"""Plain DDP (`strategy="ddp"`, find_unused_parameters=False) on 2 CPU processes across a head drop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_switch.py"
ROOT = Path(__file__).resolve().parents[1]


def run_ddp(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def load_ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [("switch", "switch_at=5"), ("gradnorm", "switch_at=7", "adapt_every=2"), ("switch", "switch_at=5", "release_heads=true")],
    ids=["switch", "gradnorm", "switch-released"],
)
def test_ddp_switch_mid_run_keeps_ranks_identical(tmp_path, args):
    result = run_ddp(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    switch_at = int(args[1].split("=")[1])
    for state in ranks:
        assert state["world_size"] == 2 and state["global_step"] == 12
        assert state["drop_times"] == {"recon": switch_at, "parity": switch_at}  # every rank, the same step
        assert state["active"] == ("label",)
        # The DDP wrapper was rebuilt at the drop (built over the 4 + 4 tensors of the encoder and the primary
        # head that still train); the --no-rebuild test below shows that plain DDP fails without it.
        assert state["ddp"] and state["rebuilt"]
        assert state["trainable"] == 8
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"{name} differs between ranks"
        if "release_heads=true" in args and name.startswith(("heads.recon", "heads.parity")):
            assert p.numel() == 0, f"{name} was not released"
    # The weights themselves, not only the parameters (DDP's gradient all-reduce keeps those equal even when
    # the ranks' weights differ): the measurements are reduced across ranks, which see different batches.
    assert ranks[0]["weights_history"] == ranks[1]["weights_history"]
    if args[0] == "gradnorm":
        before_switch = {tuple(sorted(w.items())) for step, w in ranks[0]["weights_history"] if step < switch_at}
        assert len(before_switch) > 2, "gradnorm's measurements never moved the weights"


@pytest.mark.slow
def test_plain_ddp_fails_without_the_reducer_rebuild(tmp_path):
    # Why the rebuild exists: DDP (find_unused_parameters=False) waits for the dropped heads' gradients.
    result = run_ddp(tmp_path, "switch", "switch_at=5", "--no-rebuild")
    assert result.returncode != 0
    assert "did not receive grad" in result.stderr or "unused parameters" in result.stderr


@pytest.mark.slow
def test_rank_0s_plan_wins(tmp_path):
    # Rank 1 computes a 20-step run, rank 0 a 12-step one: switch_at=0.4 must mean step 5 on both.
    result = run_ddp(tmp_path, "switch", "switch_at=0.4", "--rank1-plans-longer", timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    for state in load_ranks(tmp_path):
        assert state["total"] == 12.0
        assert state["drop_times"] == {"recon": 5, "parity": 5}


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    result = run_ddp(tmp_path, "mtl", "on_nonfinite=skip", "--nan-on-rank1-at=2", timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = load_ranks(tmp_path)
    for state in ranks:
        assert state["global_step"] == 12
        assert all(torch.isfinite(p).all() for p in state["params"].values())
    for name, p in ranks[0]["params"].items():
        assert torch.equal(p, ranks[1]["params"][name]), f"{name} differs between ranks"
