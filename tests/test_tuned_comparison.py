"""experiments/tuned_comparison.py: both searches, the re-runs with unused seeds, and the comparison they give."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).parents[1] / "experiments" / "tuned_comparison.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_seed_zero_is_refused_for_the_reruns(tmp_path):
    result = _run("smoke", "--seeds", "0", "1", "--log-dir", str(tmp_path))
    assert result.returncode != 0
    assert "seed 0 is the searches' seed" in result.stderr
    assert not (tmp_path / "smoke").exists()  # refused before any search started


@pytest.mark.slow
def test_two_searches_then_reruns_then_the_table(tmp_path):
    result = _run("smoke", "--trials", "2", "--seeds", "1", "--log-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    setting = tmp_path / "smoke"
    for side in ("stl", "switch"):
        best = yaml.safe_load((setting / "searches" / side / "best.yaml").read_text())
        assert best["completed_trials"] == 2
        reruns = sorted((setting / "tuned" / side).glob("*/run_summary.json"))
        assert len(reruns) == 1
        summary = yaml.safe_load(reruns[0].read_text())  # JSON is YAML
        assert (summary["seed"], summary["strategy"], summary["label"]) == (1, side, f"tuned_{side}")
        for key, value in best["best_params"].items():  # the re-run trained with the search's best values
            group, name = key.split(".")
            assert summary["settings"][group][name] == pytest.approx(value), key
    table = (setting / "tuned" / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tuned ")]
    assert [row.split(" | ")[0] for row in rows] == ["| tuned stl", "| tuned switch"]
    assert "strategy.switch_at=" in rows[1] and "model.weight_decay=" in rows[0]

    again = _run("smoke", "--analyse-only", "--seeds", "1", "--log-dir", str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert [line for line in again.stdout.splitlines() if line.startswith("| tuned ")] == rows
