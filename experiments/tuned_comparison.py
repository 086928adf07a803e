"""Does a tuned Switch beat a tuned STL? (issue 16, part 2)

For one setting: the same number of Optuna trials for STL (``hparams_search=stl_optuna``: learning rate, weight
decay) and for Switch (``hparams_search=switch_optuna``: switch point, auxiliary weight, learning rate), each
tuned on validation with seed 0; then each side's best configuration re-run with seeds the search never used,
evaluated on test. Every run is an ``mt2st-train`` launch, so each step is a command a user can type; this script
only chains them and reads what they wrote (through :mod:`mt2st_lightning.report` and Optuna's study).

    python experiments/tuned_comparison.py paper_embeddings                  # 20 + 20 trials, seeds 3, 4, 5
    python experiments/tuned_comparison.py paper_digits --trials 4 --seeds 3 # a quick check

Writes ``outputs/<setting>/tuned/``: ``comparison.md`` (the table below) and the re-runs in ``stl/`` and
``switch/``; the searches stay in ``outputs/<setting>/searches/{stl,switch}/``, with Optuna's plots (the Switch
search's ``param_slices.png`` is the objective's landscape over ``strategy.switch_at``). A second call re-uses finished searches (the
study continues only if ``--trials`` grew) and re-runs the seeds.

Definitions: the target is the tuned STL re-runs' mean final validation value of the primary metric (the report's
definition of STL's target); "FLOPs to target" is the training FLOPs at a run's first validation check at or
above it (``RunSummary``/``metrics.csv``, as ``mt2st-report`` reads them).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mt2st_lightning.app.search import BEST_FILE
from mt2st_lightning.names import COST_FLOPS_AT_VAL
from mt2st_lightning.report import Stat, collect_runs

SIDES = ("stl", "switch")


def search(setting: str, side: str, trials: int, log_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run (or continue) one side's Optuna search; returns its ``best.yaml``."""
    command = [
        "mt2st-train", "--multirun", f"experiment={setting}", f"hparams_search={side}_optuna",
        f"hydra.sweeper.n_trials={trials}", f"paths.log_dir={log_dir}", *overrides,
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return read_best(log_dir / setting / "searches" / side)


def read_best(search_dir: Path) -> dict[str, Any]:
    """A finished search's ``best.yaml``."""
    with open(search_dir / BEST_FILE) as f:
        return yaml.safe_load(f)


def rerun(setting: str, side: str, best: dict[str, Any], seeds: list[int], out: Path, overrides: list[str]) -> None:
    """Re-run the best configuration of one side with ``seeds``, into ``out``."""
    params = [f"{key}={value}" for key, value in best["best_params"].items()]
    command = [
        "mt2st-train", "--multirun", f"experiment={setting}", f"strategy={side}", *params,
        f"seed={','.join(map(str, seeds))}", f"label=tuned_{side}", f"hydra.sweep.dir={out}", *overrides,
    ]  # fmt: skip
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def compare(out: Path, best: dict[str, dict[str, Any]]) -> str:
    """The comparison table: test and validation values, FLOPs, and FLOPs to two targets set by the tuned STL."""
    runs = {side: collect_runs(out / side) for side in SIDES}
    metric = runs["stl"][0].metric_name if runs["stl"] else "primary metric"
    final, best_val = Stat.of(r.final_val for r in runs["stl"]), Stat.of(r.best_val for r in runs["stl"])
    targets = {"final": final.mean if final else None, "best": best_val.mean if best_val else None}
    lines = [
        f"Targets, from the tuned STL re-runs: their mean final validation {metric} (the report's target), "
        f"{_num(targets['final'])}, and their mean best validation {metric}, {_num(targets['best'])}.",
        "",
        f"| side | search best (val, seed 0) | best params | seeds | test {metric} | best val | train GFLOPs "
        "| GFLOPs to STL's final val (reached) | GFLOPs to STL's best val (reached) | switch step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for side in SIDES:
        rs = runs[side]
        drops = sorted({step for r in rs for step in r.drop_steps().values()})
        params = ", ".join(f"`{k}={_fmt(v)}`" for k, v in best[side]["best_params"].items())
        cells = [
            f"tuned {side}",
            f"{best[side]['best_value']:.4f} (trial {best[side]['best_trial']})",
            params,
            ",".join(str(r.summary.seed) for r in rs),
            _stat(Stat.of(r.summary.test_primary_metric for r in rs), "{:.4f}"),
            _stat(Stat.of(r.best_val for r in rs), "{:.4f}"),
            _stat(Stat.of((r.summary.train_flops or 0) / 1e9 for r in rs), "{:.1f}"),
            *(_flops_to(rs, target) for target in targets.values()),
            ", ".join(f"{s:g}" for s in drops) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flops_to(runs: list[Any], target: float | None) -> str:
    """GFLOPs at the first validation check reaching ``target``, over the runs that reach it."""
    reached = [hit for r in runs if target is not None and (hit := r.first_reach(target)) is not None]
    flops = Stat.of(hit[COST_FLOPS_AT_VAL] / 1e9 for hit in reached if COST_FLOPS_AT_VAL in hit)
    return f"{_stat(flops, '{:.1f}')} ({len(reached)}/{len(runs)})"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stat(stat: Stat | None, fmt: str) -> str:
    return stat.format(fmt.format) if stat is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("setting", help="an experiment preset, e.g. paper_embeddings")
    parser.add_argument("--trials", type=int, default=20, help="trials per side (default 20)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 4, 5], help="re-run seeds (not 0: the search's)")
    parser.add_argument("--log-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--analyse-only", action="store_true", help="write the comparison from the finished runs")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    if 0 in args.seeds:
        parser.error("seed 0 is the searches' seed: re-run with seeds the search never used")
    out = args.log_dir / args.setting / "tuned"
    started = time.time()
    if args.analyse_only:
        best = {side: read_best(args.log_dir / args.setting / "searches" / side) for side in SIDES}
    else:
        best = {side: search(args.setting, side, args.trials, args.log_dir, args.overrides) for side in SIDES}
        for side in SIDES:
            rerun(args.setting, side, best[side], args.seeds, out / side, args.overrides)
    table = compare(out, best)
    # From the studies, not the arguments: --analyse-only reads searches run with any --trials.
    trials = {side: best[side]["finished_trials"] for side in SIDES}
    per_side = f"{trials['stl']}" if len(set(trials.values())) == 1 else f"STL {trials['stl']}, Switch {trials['switch']}"
    (out / "comparison.md").write_text(
        f"# Tuned STL against tuned Switch: {args.setting}\n\n"
        f"{per_side} trials per side; re-run seeds {args.seeds}"
        + ("" if args.analyse_only else f"; {time.time() - started:.0f} s in all")
        + f".\n\n{table}\n"
    )
    print(table)


if __name__ == "__main__":
    sys.exit(main())
