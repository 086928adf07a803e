"""``mt2st-report`` on small synthetic run folders with known numbers."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from mt2st_lightning import policies
from mt2st_lightning.app.run_format import DEFAULT_PRIMARY_METRIC_NAME, RunSummary
from mt2st_lightning.report import (
    Run,
    Stat,
    collect_runs,
    main,
    markdown_table,
    strategy_order,
    summarize,
    write_report,
)
from tests.test_run_format import VERSION_0_SUMMARY

FULL, SINGLE = "digit+recon", "digit"


def write_run(
    root: Path,
    name: str,
    *,
    strategy: str,
    seed: int,
    flops: float,
    val: list[tuple[int, float, float, float]],
    test_acc: float = 0.9,
    phases: dict | None = None,
    drop_times: dict | None = None,
    weights: dict[int, float] | None = None,
    label: str | None = None,
    unit: str = "step",
    absolute_csv: bool = False,
    test_metrics: dict[str, float] | None = None,
    stream_costs: dict[str, float] | None = None,
    metric_name: str | None = None,
) -> Path:
    """A run folder as mt2st-train writes it. ``val``: (step, val accuracy, cumulative FLOPs, cumulative
    time) per validation; ``weights``: step -> the auxiliary weight logged then."""
    run = root / name
    (run / "csv").mkdir(parents=True)
    rows = [
        {
            "epoch": 0,
            "step": step,
            "mt2st/weight/recon": w,
            "train/loss/digit": 1.0 / (step + 1),
            "cost/flops": flops * (step + 1) / 100,
        }
        for step, w in (weights or {}).items()
    ]
    rows += [
        {"epoch": i, "step": step, "val/primary_metric": acc, "cost/flops_at_val": f, "cost/time_s_at_val": t}
        for i, (step, acc, f, t) in enumerate(val)
    ]
    columns = sorted({k for r in rows for k in r})
    with open(run / "csv" / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    RunSummary(
        label=label or strategy,
        strategy=strategy,
        seed=seed,
        primary_task="digit",
        primary_metric_name=metric_name or DEFAULT_PRIMARY_METRIC_NAME,
        auxiliary_tasks=["recon"],
        best_val_primary_metric=max(acc for _, acc, _, _ in val),
        train_flops=flops,
        train_time_s=10.0,
        phases=phases or {FULL: {"batches": 1, "flops_per_batch": 2}},
        drop_times=drop_times or {},
        mt2st_unit=unit,
        planned_total=float(val[-1][0] + 1),
        total_steps=val[-1][0] + 1,
        epochs=len(val),
        final_val_primary_metric=val[-1][1],
        stream_costs=stream_costs or {},
        val_samples=100.0,
        metrics_csv=str((run / "csv" / "metrics.csv").resolve()) if absolute_csv else "csv/metrics.csv",
        output_dir=str(run),
        settings={},
        fit_wall_time_s=12.0,
        resumed_from=None,
        test_primary_metric=test_acc,
        test_samples=100.0,
        test_metrics={"test/primary_metric": test_acc, "test/loss": 0.5, "test/samples": 100.0, **(test_metrics or {})},
        tested_checkpoint="checkpoints/epoch002.ckpt",
    ).write(run)
    return run


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Two STL seeds (final val 0.75 and 0.875: target 0.8125), two Switch seeds that reach it at the 2nd and
    3rd validation, and one MTL seed that never does. Binary fractions, so that >= is exact."""
    stl_phases = {SINGLE: {"batches": 100, "flops_per_batch": 50}}
    write_run(
        tmp_path,
        "0_stl_seed0",
        strategy="stl",
        seed=0,
        flops=5000,
        test_acc=0.80,
        phases=stl_phases,
        val=[(9, 0.5, 500, 1.0), (19, 0.875, 1000, 2.0), (29, 0.75, 1500, 3.0)],
        drop_times={"recon": 0},
    )
    write_run(
        tmp_path,
        "1_stl_seed1",
        strategy="stl",
        seed=1,
        flops=5000,
        test_acc=0.90,
        phases=stl_phases,
        val=[(9, 0.625, 500, 1.0), (19, 0.6875, 1000, 2.0), (29, 0.875, 1500, 3.0)],
        drop_times={"recon": 0},
    )
    switch_phases = {
        FULL: {"batches": 30, "flops_per_batch": 100},
        SINGLE: {"batches": 70, "flops_per_batch": 50},
    }
    weights = {0: 1.0, 10: 1.0, 20: 1.0, 30: 0.0, 40: 0.0}
    write_run(
        tmp_path,
        "2_switch_seed0",
        strategy="switch",
        seed=0,
        flops=6500,
        test_acc=0.91,
        phases=switch_phases,
        val=[(9, 0.5, 1000, 1.5), (19, 0.8125, 2000, 2.5), (29, 0.9, 2500, 3.5)],
        drop_times={"recon": 30},
        weights=weights,
    )
    write_run(
        tmp_path,
        "3_switch_seed1",
        strategy="switch",
        seed=1,
        flops=6500,
        test_acc=0.93,
        phases=switch_phases,
        val=[(9, 0.5, 1000, 1.5), (19, 0.8, 2000, 2.5), (29, 0.95, 2500, 4.5)],
        drop_times={"recon": 30},
        weights=weights,
        absolute_csv=True,
    )
    write_run(
        tmp_path,
        "4_mtl_seed0",
        strategy="mtl",
        seed=0,
        flops=10000,
        phases={FULL: {"batches": 100, "flops_per_batch": 100}},
        val=[(9, 0.5, 1000, 1.0), (19, 0.6, 2000, 2.0), (29, 0.8, 3000, 3.0)],
    )
    return tmp_path


def rows_by_label(root: Path) -> dict:
    return {row.label: row for row in summarize(collect_runs(root)).rows}


def test_stat_is_mean_and_sample_std():
    stat = Stat.of([1.0, 2.0, None, 3.0])
    assert (stat.mean, stat.std, stat.n) == (2.0, 1.0, 3)
    assert Stat.of([5.0]) == Stat(5.0, None, 1)
    assert Stat.of([None]) is None
    assert stat.format("{:.1f}".format) == "2.0 ± 1.0"
    assert Stat(5.0, None, 1).format("{:.1f}".format) == "5.0"


def test_collect_runs_reads_summaries_and_relative_or_absolute_metrics(sweep):
    runs = collect_runs(sweep)
    assert [r.dir.name for r in runs] == [
        "0_stl_seed0",
        "1_stl_seed1",
        "2_switch_seed0",
        "3_switch_seed1",
        "4_mtl_seed0",
    ]
    assert all(r.metrics for r in runs)
    assert runs[0].final_val == 0.75 and runs[0].best_val == 0.875


def test_rows_come_in_the_papers_order_with_mean_and_std_over_seeds(sweep):
    rows = rows_by_label(sweep)
    assert list(rows) == ["stl", "mtl", "switch"]
    switch = rows["switch"]
    assert (switch.runs, switch.seeds) == (2, [0, 1])
    assert switch.test_acc.mean == pytest.approx(0.92) and switch.test_acc.std == pytest.approx(
        statistics.stdev([0.91, 0.93])
    )
    assert switch.best_val_acc.mean == pytest.approx(0.925)
    assert switch.flops_per_batch_last_phase == Stat(50.0, 0.0, 2)  # the post-switch phase, not the first one
    assert rows["mtl"].flops_per_batch_last_phase.mean == 100


def test_compression_is_relative_to_the_mean_stl_flops(sweep):
    rows = rows_by_label(sweep)
    assert rows["stl"].compression.mean == 0.0
    assert rows["switch"].compression.mean == pytest.approx(1 - 6500 / 5000)
    assert rows["mtl"].compression.mean == pytest.approx(-1.0)


def test_the_stl_rows_compression_is_exactly_zero_whatever_its_flops(tmp_path):
    for seed, flops in enumerate([1e9 + 1, 3e9 / 7, 12345.678]):
        write_run(tmp_path, f"stl{seed}", strategy="stl", seed=seed, flops=flops, val=[(9, 0.5, 1, 1)])
    write_run(tmp_path, "switch", strategy="switch", seed=0, flops=2e9, val=[(9, 0.5, 1, 1)])
    rows = rows_by_label(tmp_path)
    baseline = statistics.fmean([1e9 + 1, 3e9 / 7, 12345.678])
    assert rows["stl"].compression.mean == 0.0
    assert rows["stl"].compression.std == pytest.approx(
        statistics.stdev([1e9 + 1, 3e9 / 7, 12345.678]) / baseline
    )
    assert rows["switch"].compression.mean == pytest.approx(1 - 2e9 / baseline)


def test_time_and_flops_to_target(sweep):
    summary = summarize(collect_runs(sweep))
    assert summary.target == 0.8125  # mean of the STL runs' final 0.75 and 0.875
    rows = {row.label: row for row in summary.rows}
    # Switch: seed 0 reaches 0.8125 at its 2nd validation (>= counts), seed 1 at its 3rd.
    assert rows["switch"].reached_target == 2
    assert rows["switch"].time_to_target_s.mean == pytest.approx((2.5 + 4.5) / 2)
    assert rows["switch"].time_to_target_s.std == pytest.approx(math.sqrt(2))
    assert rows["switch"].flops_to_target.mean == pytest.approx(2250)
    # STL: seed 0 passes the target at 0.875 on its way down to 0.75; seed 1 only at the end.
    assert rows["stl"].reached_target == 2 and rows["stl"].flops_to_target.mean == pytest.approx(1250)
    assert rows["mtl"].reached_target == 0 and rows["mtl"].time_to_target_s is None


def test_markdown_table(sweep):
    table = markdown_table(summarize(collect_runs(sweep)))
    lines = table.splitlines()
    assert lines[0].startswith("| strategy | runs | test acc (%) |") and "compression vs STL (%)" in lines[0]
    cells = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in lines[2:]}
    assert cells["stl"][7] == "0.0 ± 0.0"
    assert cells["switch"][7] == "-30.0 ± 0.0"
    assert cells["switch"][2] == "92.0 ± 1.4"
    assert cells["switch"][10] == "3.50 ± 1.41"
    assert cells["mtl"][10] == "not reached"


def test_partly_reached_targets_say_how_many_runs(tmp_path):
    write_run(tmp_path, "stl", strategy="stl", seed=0, flops=100, val=[(9, 0.9, 10, 1.0)])
    write_run(tmp_path, "a", strategy="switch", seed=0, flops=100, val=[(9, 0.95, 10, 1.0)])
    write_run(tmp_path, "b", strategy="switch", seed=1, flops=100, val=[(9, 0.5, 10, 1.0)])
    table = markdown_table(summarize(collect_runs(tmp_path)))
    assert "1.00 (1/2 runs)" in table


def test_without_stl_compression_and_target_are_blank(tmp_path):
    write_run(tmp_path, "a", strategy="switch", seed=0, flops=100, val=[(9, 0.9, 10, 1.0)])
    report = write_report(tmp_path)
    row = report.summary.rows[0]
    assert row.compression is None and row.time_to_target_s is None and report.summary.target is None
    assert "compression is relative to nothing" in report.markdown_path.read_text()
    with open(report.csv_path, newline="") as f:
        (record,) = csv.DictReader(f)
    assert record["compression_mean"] == "" and record["time_to_target_s_mean"] == ""


def test_labels_group_variants_of_one_strategy(tmp_path):
    write_run(tmp_path, "stl", strategy="stl", seed=0, flops=100, val=[(9, 0.9, 10, 1.0)])
    write_run(
        tmp_path, "early", strategy="switch", label="switch@0.1", seed=0, flops=110, val=[(9, 0.9, 10, 1.0)]
    )
    write_run(
        tmp_path, "late", strategy="switch", label="switch@0.5", seed=0, flops=150, val=[(9, 0.9, 10, 1.0)]
    )
    rows = rows_by_label(tmp_path)
    assert list(rows) == ["stl", "switch@0.1", "switch@0.5"]
    assert rows["switch@0.5"].compression.mean == pytest.approx(-0.5)


def test_epoch_drop_times_map_to_the_epochs_first_logged_step(tmp_path):
    write_run(
        tmp_path,
        "a",
        strategy="switch",
        seed=0,
        flops=1,
        unit="epoch",
        drop_times={"recon": 1},
        val=[(9, 0.5, 1, 1), (19, 0.6, 2, 2)],
    )
    (run,) = collect_runs(tmp_path)
    assert run.drop_steps() == {"recon": 19.0}


def test_write_report_writes_tables_and_plots(sweep):
    report = write_report(sweep)
    assert {p.name for p in report.plots} == {"curves_vs_step.png", "curves_vs_flops.png", "aux_weights.png"}
    for path in report.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (sweep / "summary.md").read_text()
    assert report.table in markdown and "![aux_weights](aux_weights.png)" in markdown
    with open(sweep / "summary.csv", newline="") as f:
        records = {r["strategy"]: r for r in csv.DictReader(f)}
    assert float(records["stl"]["compression_mean"]) == 0.0
    assert float(records["switch"]["flops_to_target_mean"]) == pytest.approx(2250)
    assert records["mtl"]["reached_target"] == "0"


def test_cli(sweep, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    main([str(sweep), "--out", str(out)])
    assert "| stl | 2 |" in capsys.readouterr().out
    assert (out / "summary.md").is_file()


def test_cli_on_a_folder_without_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path)])
    assert exit_info.value.code == 2
    assert "no run_summary.json below" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- unlike runs
def _settings(**changes) -> dict:
    settings = {"data": {"_target_": "mt2st_lightning.examples.data.DigitsDataModule"}, "model": {"encoder": {"_target_": "mt2st_lightning.examples.models.MLPEncoder"}},
                "strategy": {"strategy": "switch"}, "planned_total": 500.0, "unit": "step", "precision": "32-true", "devices": 1}
    for key, value in changes.items():
        settings[key] = value
    return settings


def _with_settings(run: Path, settings: dict) -> None:
    replace(RunSummary.read(run), settings=settings).write(run)


def test_runs_of_one_label_with_other_settings_are_split_with_a_message(tmp_path, capsys):
    cnn = {"encoder": {"_target_": "mt2st_lightning.examples.models.ConvEncoder"}}
    for name, seed, flops, settings in [
        ("stl_mlp", 0, 100, _settings(strategy={"strategy": "stl"})),
        ("stl_cnn", 0, 1000, _settings(strategy={"strategy": "stl"}, model=cnn)),
        ("mlp0", 0, 150, _settings()),
        ("mlp1", 1, 150, _settings()),
        ("cnn", 0, 1500, _settings(model=cnn)),
        ("ddp", 0, 150, _settings(devices=2)),
    ]:
        strategy = "stl" if name.startswith("stl") else "switch"
        _with_settings(write_run(tmp_path, name, strategy=strategy, seed=seed, flops=flops, val=[(9, 0.9, 10, 1.0)]), settings)
    summary = summarize(collect_runs(tmp_path))
    rows = {row.label: row for row in summary.rows}
    assert set(rows) == {
        "stl (model.encoder._target_=MLPEncoder)", "stl (model.encoder._target_=ConvEncoder)",
        "switch (devices=1, model.encoder._target_=MLPEncoder)", "switch (devices=1, model.encoder._target_=ConvEncoder)",
        "switch (devices=2, model.encoder._target_=MLPEncoder)",
    }
    assert [row.runs for row in summary.rows if row.label.startswith("switch (devices=1, model.encoder._target_=MLP")] == [2]
    # Each row is compared with the STL runs of its own data, model, length, precision and devices.
    assert rows["switch (devices=1, model.encoder._target_=MLPEncoder)"].compression.mean == pytest.approx(-0.5)
    assert rows["switch (devices=1, model.encoder._target_=ConvEncoder)"].compression.mean == pytest.approx(-0.5)
    assert rows["switch (devices=2, model.encoder._target_=MLPEncoder)"].compression is None  # no 2-device STL run
    assert any("Runs labelled 'switch' differ in devices, model.encoder._target_" in m for m in summary.messages)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "not averaged together, split into 3 rows" in out
    assert "| switch (devices=1, model.encoder._target_=MLPEncoder) | 2 |" in out  # every row shows its run count


def test_killed_and_failed_runs_are_listed_as_incomplete(sweep, capsys):
    killed = sweep / "5_switch_seed2"
    (killed / ".hydra").mkdir(parents=True)
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / "last.ckpt").write_bytes(b"")
    (killed / "csv").mkdir()
    (killed / "csv" / "metrics.csv").write_text("epoch,step,train/loss\n0,0,2.0\n0,4,1.5\n")
    failed_early = sweep / "6_mtl_seed1"
    (failed_early / ".hydra").mkdir(parents=True)
    relaunch = sweep / "relaunch"  # a resume's own Hydra folder: part of the run it continued
    (relaunch / ".hydra").mkdir(parents=True)
    (relaunch / "continues_run.json").write_text(json.dumps({"run_dir": str(killed)}))
    report = write_report(sweep)
    assert [(r.dir.name, r.last_step, r.has_last_checkpoint) for r in report.incomplete] == [
        ("5_switch_seed2", 4, True), ("6_mtl_seed1", None, False)
    ]
    assert len(collect_runs(sweep)) == 5  # the table holds the finished runs only
    markdown = report.markdown_path.read_text()
    assert "Incomplete runs" in markdown and f"resume with ckpt_path={killed / 'checkpoints' / 'last.ckpt'}" in markdown
    main([str(sweep)])
    out = capsys.readouterr().out
    assert "5_switch_seed2: last logged step 4" in out and "6_mtl_seed1: no metrics logged; no checkpoint" in out


def test_the_console_names_every_file_the_report_writes(sweep, capsys):
    main([str(sweep)])
    out = capsys.readouterr().out
    for name in ("summary.md", "summary.csv", "curves_vs_step.png", "curves_vs_flops.png", "aux_weights.png"):
        assert f"  {sweep / name}\n" in out, name



def test_the_weight_plot_says_where_its_weights_start_and_draws_runs_without_a_common_step(tmp_path):
    from mt2st_lightning.report import weights_figure

    # Seeds logged at different steps (no step in common): each panel still draws its runs, and says that its
    # weights start at the first logged step.
    write_run(tmp_path, "a", strategy="switch", seed=0, flops=1, val=[(9, 0.5, 1, 1)], weights={4: 1.0, 14: 0.0}, drop_times={"recon": 10})
    write_run(tmp_path, "b", strategy="switch", seed=1, flops=1, val=[(9, 0.5, 1, 1)], weights={5: 1.0, 15: 0.0}, drop_times={"recon": 10})
    fig = weights_figure(collect_runs(tmp_path))
    (ax,) = [ax for ax in fig.axes if ax.get_visible()]
    assert "weights logged from step 4" in ax.get_title() and "heads dropped at step 10" in ax.get_title()
    assert "2 runs" in ax.get_title()
    assert [list(line.get_xdata()) for line in ax.lines if len(set(line.get_xdata())) > 1] == [[4.0, 14.0]]  # not the drop line
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["weight of 'recon'", "auxiliary heads dropped"]
    assert ax.get_xlabel() == "training step (optimizer steps)" and "unitless" in ax.get_ylabel()


def test_the_curves_of_runs_without_a_training_loss_still_draw_their_drops(tmp_path):
    # Validation rows only (no training loss to put on a log axis), and a drop to mark.
    from mt2st_lightning.report.plots import plot_curves

    write_run(tmp_path, "a", strategy="switch", seed=0, flops=1, val=[(9, 0.5, 1, 1), (19, 0.6, 2, 2)], drop_times={"recon": 10})
    paths = plot_curves(collect_runs(tmp_path), tmp_path)
    assert [p.name for p in paths] == ["curves_vs_step.png", "curves_vs_flops.png"] and all(p.exists() for p in paths)


def test_the_curves_show_accuracy_in_percent_with_one_legend_and_the_drops(sweep):
    report = write_report(sweep)
    assert {p.name for p in report.plots} >= {"curves_vs_step.png", "curves_vs_flops.png"}
    from mt2st_lightning.report import group_runs
    from mt2st_lightning.report.plots import _drop_points

    groups = group_runs(collect_runs(sweep))
    assert _drop_points(next(g for g in groups if g.label == "switch"), "step") == [30.0]
    # FLOPs axis: the cumulative training FLOPs before the drop step, in GFLOP.
    assert _drop_points(next(g for g in groups if g.label == "switch"), "flops") == [pytest.approx(6500 * 21 / 100 / 1e9)]


def _markdown_and_csv(root: Path) -> tuple[str, dict[str, dict[str, str]]]:
    """The report's summary.md text and its summary.csv rows by strategy."""
    report = write_report(root)
    with open(report.csv_path) as f:
        return report.markdown_path.read_text(), {r["strategy"]: r for r in csv.DictReader(f)}


def _drop_column(markdown: str) -> dict[str, str]:
    """The "heads dropped at step" cell of each row of a summary.md's main table."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    at = header.index("heads dropped at step")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
    return {cells[0]: cells[at] for cells in rows if len(cells) == len(header)}


def test_the_table_says_where_each_rows_heads_were_dropped_or_that_they_never_were(sweep):
    markdown, records = _markdown_and_csv(sweep)
    # The fixture: both STL seeds without heads from step 0, both Switch seeds at step 30, MTL never.
    assert _drop_column(markdown) == {"stl": "2/2 at 0", "switch": "2/2 at 30", "mtl": "never"}
    assert (records["switch"]["fired_runs"], records["switch"]["drop_steps"]) == ("2", "30 30")
    assert (records["mtl"]["fired_runs"], records["mtl"]["drop_steps"]) == ("0", "never")


def test_a_data_driven_row_lists_each_seeds_drop_step_and_how_many_fired(tmp_path):
    val = [(99, 0.5, 500, 1.0), (299, 0.6, 1000, 2.0)]  # checks around every drop step below
    # Seeds written out of order: the cell and the CSV list them by seed. Seed 1 never fired; seed 3 dropped
    # its two heads at different steps (a per-task switch, e.g. conflict).
    runs = {"a": (2, {"recon": 250}), "b": (0, {"recon": 150}), "c": (1, None), "d": (3, {"recon": 60, "edges": 230})}
    for name, (seed, drops) in runs.items():
        write_run(tmp_path, name, strategy="plateau", seed=seed, flops=10, val=val, drop_times=drops, weights={0: 1.0, 299: 0.0})
    markdown, records = _markdown_and_csv(tmp_path)
    assert _drop_column(markdown) == {"plateau": "3/4 at 150, 250, 60-230"}
    assert records["plateau"]["seeds"] == "0 1 2 3"
    assert (records["plateau"]["fired_runs"], records["plateau"]["drop_steps"]) == ("3", "150 never 250 60-230")
    (row,) = summarize(collect_runs(tmp_path)).rows
    assert row.fired == 3 and row.drop_steps == [(150.0, 150.0), None, (250.0, 250.0), (60.0, 230.0)]


def test_drop_steps_of_epoch_runs_are_reported_in_optimizer_steps(tmp_path):
    val = [(9, 0.5, 1, 1), (19, 0.6, 2, 2)]
    write_run(
        tmp_path, "a", strategy="plateau", seed=0, flops=1, unit="epoch", drop_times={"recon": 1}, val=val, weights={0: 1.0, 19: 0.0}
    )
    markdown, _ = _markdown_and_csv(tmp_path)
    assert _drop_column(markdown) == {"plateau": "1/1 at 19"}


def test_other_test_metrics_get_a_table_and_csv_columns_of_their_own(tmp_path):
    val = [(9, 0.5, 500, 1.0)]
    write_run(tmp_path, "a", strategy="stl", seed=0, flops=100, val=val, test_metrics={"test/aux/spearman": 0.25})
    write_run(tmp_path, "b", strategy="stl", seed=1, flops=100, val=val, test_metrics={"test/aux/spearman": 0.75})
    write_run(tmp_path, "c", strategy="mtl", seed=0, flops=100, val=val, test_metrics={"test/fid": 3.0})
    write_run(tmp_path, "d", strategy="mtl", seed=1, flops=100, val=val, test_metrics={"test/fid": math.nan})
    summary = summarize(collect_runs(tmp_path))
    rows = {row.label: row for row in summary.rows}
    assert set(rows["stl"].other_test_metrics) == {"test/aux/spearman"}  # not the primary metric, loss, samples
    assert rows["stl"].other_test_metrics["test/aux/spearman"] == Stat(0.5, statistics.stdev([0.25, 0.75]), 2)
    assert rows["mtl"].other_test_metrics == {"test/fid": Stat(3.0, None, 1)}  # the NaN run is left out

    text, records = _markdown_and_csv(tmp_path)
    assert "| strategy | test/aux/spearman | test/fid |" in text
    assert "| stl | 0.5 ± 0.3536 |  |" in text and "| mtl |  | 3 |" in text
    assert float(records["stl"]["test/aux/spearman_mean"]) == 0.5 and records["stl"]["test/fid_mean"] == ""
    assert float(records["mtl"]["test/fid_mean"]) == 3.0


def test_no_other_test_metrics_no_second_table(sweep):
    assert "Other test metrics" not in write_report(sweep).markdown_path.read_text()


def test_stl_runs_still_rising_at_their_last_check_are_flagged(sweep, tmp_path):
    # seed 1's last check (0.875) beats its earlier ones; seed 0's (0.75) does not.
    rows = rows_by_label(sweep)
    assert rows["stl"].rising_at_end == 1 and rows["switch"].rising_at_end == 2
    assert "STL may not have converged: in 1 of its 2 runs (stl)" in write_report(sweep).markdown_path.read_text()

    flat = [(9, 0.5, 500, 1.0), (19, 0.75, 1000, 2.0), (29, 0.75, 1500, 3.0)]  # a tie is not a new best
    write_run(tmp_path / "flat", "s", strategy="stl", seed=0, flops=100, val=flat)
    assert "may not have converged" not in write_report(tmp_path / "flat").markdown_path.read_text()


def test_what_the_auxiliary_streams_loaded_gets_a_table_of_its_own(tmp_path):
    val = [(9, 0.5, 500, 1.0)]
    for seed, batches in ((0, 10.0), (1, 20.0)):
        costs = {"stream/images/batches": batches, "stream/images/load_time_s": 0.5}
        write_run(tmp_path, f"s{seed}", strategy="switch", seed=seed, flops=100, val=val, stream_costs=costs)
    write_run(tmp_path, "stl", strategy="stl", seed=0, flops=100, val=val)  # no stream: blank cells
    rows = rows_by_label(tmp_path)
    assert rows["switch"].stream_costs["stream/images/batches"] == Stat(15.0, statistics.stdev([10.0, 20.0]), 2)
    assert rows["stl"].stream_costs == {}
    text, records = _markdown_and_csv(tmp_path)
    assert "| strategy | stream/images/batches | stream/images/load_time_s |" in text
    assert "| switch | 15 ± 7.071 | 0.5 ± 0 |" in text and "| stl |  |  |" in text
    assert float(records["switch"]["stream/images/batches_mean"]) == 15.0


def test_stream_costs_of_older_summaries_come_from_the_metrics(tmp_path):
    rows = [{"step": 3.0, "stream/images/batches": 4.0}, {"step": 7.0, "stream/images/batches": 8.0}, {"step": 9.0}]
    older = Run(tmp_path, RunSummary.from_dict(VERSION_0_SUMMARY), rows)  # written before it held stream_costs
    assert older.stream_costs == {"stream/images/batches": 8.0}  # the last logged cumulative count
    newer = Run(tmp_path, replace(older.summary, stream_costs={}), rows)
    assert newer.stream_costs == {}  # the summary's own record wins


def test_a_named_primary_metric_names_the_columns_the_target_and_the_plots(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    val = [(9, -0.5, 500, 1.0), (19, -0.25, 1000, 2.0)]
    for seed in (0, 1):
        write_run(tmp_path, f"s{seed}", strategy="stl", seed=seed, flops=100, val=val, metric_name="negative loss",
                  weights={0: 0.0, 10: 0.0})
    labels: list[list[str]] = []
    save = Figure.savefig

    def spy(fig, *args, **kwargs):
        labels.append([ax.get_ylabel() for ax in fig.axes])
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    summary = summarize(collect_runs(tmp_path))
    assert summary.metric == "negative loss"
    text = write_report(tmp_path).markdown_path.read_text()
    assert "| test negative loss (x100) | best val negative loss (x100) |" in text and "acc (%)" not in text
    assert "Target = -25.0 (x100) val negative loss" in text
    assert "validation negative loss of 'digit' (x100)" in [" ".join(label.split()) for label in labels[0]]

    write_run(tmp_path, "older", strategy="mtl", seed=0, flops=100, val=val)  # no name: accuracy
    assert summarize(collect_runs(tmp_path)).metric == "primary metric"  # runs that disagree are not named


def test_runs_without_a_metric_name_are_accuracy(sweep):
    summary = summarize(collect_runs(sweep))
    assert summary.metric == "accuracy"
    assert "| test acc (%) | best val acc (%) |" in markdown_table(summary)


# ---------------------------------------------------------------------------------------------- the registry's order
def test_rows_follow_the_registrys_order_and_other_labels_follow_alphabetically(tmp_path):
    for label in ("aaa", "conflict", "plateau", "switch", "stl", "zeta"):
        write_run(tmp_path, label, strategy=label if label in policies.STRATEGIES else "switch", label=label,
                  seed=0, flops=100, val=[(9, 0.5, 10, 1.0)])
    # plateau before conflict, as registered (alphabetically, conflict would come first).
    assert list(rows_by_label(tmp_path)) == ["stl", "switch", "plateau", "conflict", "aaa", "zeta"]


def test_a_newly_registered_strategy_takes_its_place_in_the_order(tmp_path, monkeypatch):
    write_run(tmp_path, "aaa", strategy="switch", label="aaa", seed=0, flops=100, val=[(9, 0.5, 10, 1.0)])
    write_run(tmp_path, "toy", strategy="toy", seed=0, flops=100, val=[(9, 0.5, 10, 1.0)])
    assert list(rows_by_label(tmp_path)) == ["aaa", "toy"]  # not a strategy: alphabetical, after the known ones
    # Registered after the report was imported, and nothing in the report changes (it reads the name alone: any
    # policy class stands in for the toy one).
    monkeypatch.setitem(policies.REGISTRY, "toy", policies.SwitchPolicy)
    assert strategy_order()[-1] == "toy"
    assert list(rows_by_label(tmp_path)) == ["toy", "aaa"]


# ---------------------------------------------------------------------------------------------- summary formats
def test_runs_written_before_the_summary_had_a_version_are_reported(sweep):
    older = sweep / "5_switch_seed2"
    (older / "csv").mkdir(parents=True)
    (older / "csv" / "metrics.csv").write_text("epoch,step,val/primary_metric,cost/flops_at_val,cost/time_s_at_val\n0,9,0.5,1000,1.5\n")
    (older / "run_summary.json").write_text(json.dumps({**VERSION_0_SUMMARY, "seed": 2, "train_flops": 6500}))
    rows = rows_by_label(sweep)
    # One row with the newer switch runs: a version-0 summary has no settings, and neither do these.
    assert rows["switch"].seeds == [0, 1, 2]
    assert rows["switch"].test_acc.n == 3 and rows["switch"].compression.mean == pytest.approx(1 - 6500 / 5000)


def test_a_summary_of_a_newer_version_stops_the_report_with_a_message(sweep, capsys):
    newer = sweep / "5_newer"
    newer.mkdir()
    content = json.loads((sweep / "0_stl_seed0" / "run_summary.json").read_text())
    (newer / "run_summary.json").write_text(json.dumps({**content, "format_version": 99}))
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"mt2st-report: error: {newer / 'run_summary.json'} has format_version 99" in err and "pip install -U" in err


def test_reading_and_tabulating_runs_needs_no_matplotlib(sweep):
    # Lightning imports matplotlib through torchmetrics where it is installed: hide it once Lightning is loaded,
    # as in an environment without the [report] extra, then read and tabulate without drawing.
    code = f"""
import sys
import lightning
for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    del sys.modules[name]
sys.modules["matplotlib"] = None
from mt2st_lightning.report import collect_runs, markdown_table, summarize
print(markdown_table(summarize(collect_runs({str(sweep)!r}))))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| switch | 2 |" in result.stdout
