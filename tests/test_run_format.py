"""``run_summary.json`` (:class:`RunSummary`): one typed, versioned definition that ``mt2st-train`` writes and
``mt2st-report`` reads; a round trip keeps every field, a summary of an earlier version still reads, and a newer
or malformed one is refused with a message that names the file and what is wrong."""

from __future__ import annotations

import json
from dataclasses import fields, replace

import pytest

from mt2st_lightning.app.run_format import (
    DEFAULT_PRIMARY_METRIC_NAME,
    FORMAT_VERSION,
    SUMMARY_FILE,
    RunSummary,
    RunSummaryError,
)

#: A summary as mt2st-train wrote it before the format had a version (commit 9360be0, the first app): no
#: ``format_version``, and none of the fields added since (the metric's name, stream costs, sample counts, the
#: other test metrics, the settings, the checkpoint a launch resumed from).
VERSION_0_SUMMARY = {
    "label": "switch",
    "strategy": "switch",
    "seed": 0,
    "primary_task": "digit",
    "auxiliary_tasks": ["recon", "edges", "moments"],
    "best_val_primary_metric": 0.5,
    "train_flops": 123456,
    "train_time_s": 0.25,
    "phases": {
        "digit+recon+edges+moments": {"batches": 2, "flops_per_batch": 20000, "time_s": 0.1, "median_batch_time_s": 0.05},
        "digit": {"batches": 6, "flops_per_batch": 13909, "time_s": 0.15, "median_batch_time_s": 0.025},
    },
    "drop_times": {"recon": 2, "edges": 2, "moments": 2},
    "mt2st_unit": "step",
    "planned_total": 8.0,
    "total_steps": 8,
    "epochs": 2,
    "final_val_primary_metric": 0.4375,
    "metrics_csv": "csv/metrics.csv",
    "output_dir": "/runs/0_switch_seed0",
    "fit_wall_time_s": 3.5,
    "test_primary_metric": 0.46875,
    "tested_checkpoint": "checkpoints/epoch001.ckpt",
}


def current_summary(**changes) -> RunSummary:
    """A summary of this version: the version-0 one with every field added since."""
    added = {
        "primary_metric_name": "negative loss",
        "stream_costs": {"stream/images/batches": 8.0},
        "val_samples": 269.0,
        "test_samples": 269.0,
        "test_metrics": {"test/primary_metric": 0.46875, "test/loss": 1.25, "test/fid": float("nan")},
        "settings": {"data": {"_target_": "Digits", "batch_size": 32}, "devices": 1, "precision": "32-true"},
        "resumed_from": "/runs/0_switch_seed0/checkpoints/last.ckpt",
    }
    return replace(RunSummary.from_dict(VERSION_0_SUMMARY), **{**added, **changes})


def test_a_summary_reads_back_as_it_was_written(tmp_path):
    summary = current_summary()
    path = summary.write(tmp_path)
    assert path == tmp_path / SUMMARY_FILE
    content = json.loads(path.read_text())
    # The version first, then every field under its own name: the file is the dataclass, and nothing else.
    assert list(content) == ["format_version", *(f.name for f in fields(RunSummary))]
    assert content["format_version"] == FORMAT_VERSION
    read = RunSummary.read(tmp_path)  # the run folder, or the file itself
    assert RunSummary.read(path) == read
    nan_free = {f.name: getattr(read, f.name) for f in fields(read) if f.name != "test_metrics"}
    assert nan_free == {f.name: getattr(summary, f.name) for f in fields(summary) if f.name != "test_metrics"}
    assert read.test_metrics["test/loss"] == 1.25 and read.test_metrics["test/fid"] != read.test_metrics["test/fid"]
    assert RunSummary.from_dict(summary.to_dict()).to_dict().keys() == content.keys()


def test_a_summary_of_version_0_reads_with_the_fields_added_since_as_not_recorded():
    summary = RunSummary.from_dict(VERSION_0_SUMMARY)
    assert summary.primary_metric_name == DEFAULT_PRIMARY_METRIC_NAME  # the only metric before models named theirs
    assert summary.stream_costs is None  # not recorded, unlike {} (no streams)
    assert (summary.val_samples, summary.test_samples, summary.resumed_from) == (None, None, None)
    assert summary.test_metrics == {} and summary.settings == {}
    assert summary.drop_times == {"recon": 2, "edges": 2, "moments": 2} and summary.total_steps == 8
    # Read once, it is a summary of this version: written again, it says so.
    assert summary.to_dict()["format_version"] == FORMAT_VERSION


def test_a_newer_format_is_refused_with_the_upgrade_to_make(tmp_path):
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({**current_summary().to_dict(), "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(RunSummaryError, match=rf"{SUMMARY_FILE} has format_version {FORMAT_VERSION + 1}, newer .*pip install -U"):
        RunSummary.read(tmp_path)


@pytest.mark.parametrize("version", [-1, "1", 1.0, True, None])
def test_a_format_version_that_is_no_whole_number_is_refused(version):
    with pytest.raises(RunSummaryError, match="format_version must be a whole number"):
        RunSummary.from_dict({**current_summary().to_dict(), "format_version": version})


def test_a_missing_or_unknown_field_is_named():
    content = current_summary().to_dict()
    del content["settings"]  # optional in version 0 only
    content["best_val_acc"] = 0.5
    with pytest.raises(RunSummaryError, match=r"run_summary.json \(format_version 1\) lacks settings and has unknown best_val_acc"):
        RunSummary.from_dict(content, source="run_summary.json")
    version_0 = dict(VERSION_0_SUMMARY)
    del version_0["seed"]  # every version-0 writer wrote it
    with pytest.raises(RunSummaryError, match=r"\(format_version 0\) lacks seed:"):
        RunSummary.from_dict(version_0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("seed", "0", r"seed should be int, not '0'"),
        ("seed", 1.5, r"seed should be int, not 1.5"),
        ("total_steps", True, r"total_steps should be int, not True"),  # JSON's true is no count
        ("train_flops", "many", r"train_flops should be float \| None, not 'many'"),
        ("auxiliary_tasks", ["recon", 3], r"auxiliary_tasks \[1\] should be str, not 3"),
        ("phases", {"digit": {"batches": "2"}}, r"phases \['digit'\] \['batches'\] should be float"),
        ("stream_costs", [], r"stream_costs should be dict\[str, float\] \| None, not \[\]"),
    ],
)
def test_a_field_of_the_wrong_type_is_named(tmp_path, field, value, message):
    content = {**current_summary().to_dict(), field: value}
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(content))
    with pytest.raises(RunSummaryError, match=message):
        RunSummary.read(tmp_path)
    # The app cannot write one either: the dataclass checks what it is given.
    with pytest.raises(RunSummaryError, match=message):
        current_summary(**{field: value})


def test_a_file_that_is_no_summary_is_named(tmp_path):
    path = tmp_path / SUMMARY_FILE
    path.write_text("{ truncated")
    with pytest.raises(RunSummaryError, match=rf"{path} is not JSON"):
        RunSummary.read(path)
    path.write_text("[1, 2]")
    with pytest.raises(RunSummaryError, match=rf"{path} holds a JSON list, not an object"):
        RunSummary.read(path)


def test_numbers_of_the_wrong_kind_that_json_cannot_tell_apart_are_accepted():
    # JSON writes 3.0 as 3.0 but a count of FLOPs as an int: a float field holds either.
    summary = current_summary(train_flops=10**15, planned_total=8, best_val_primary_metric=1)
    assert (summary.train_flops, summary.planned_total, summary.best_val_primary_metric) == (10**15, 8, 1)

