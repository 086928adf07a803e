"""What a run of ``mt2st-train`` leaves in its folder, and the metric keys a model logs for the app and the
report: the one definition that the app writes, the report reads and the example models log to. The run's
summary, ``run_summary.json``, is :class:`RunSummary`: typed, versioned (:data:`FORMAT_VERSION`), and read back
from the files of earlier versions.

Plain Python (no Hydra, no matplotlib), so that the report and the example models import it without the app's
extra.
"""

from __future__ import annotations

import csv
import functools
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_PRIMARY_METRIC_NAME",
    "FORMAT_VERSION",
    "METRICS_FILE",
    "RESUME_POINTER_FILE",
    "RunSummary",
    "RunSummaryError",
    "STREAM_PREFIX",
    "SUMMARY_FILE",
    "TEST_PRIMARY_METRIC",
    "TRAIN_LOSS",
    "VAL_LOSS",
    "VAL_PRIMARY_METRIC",
    "first_reach",
    "read_metrics",
    "task_loss",
    "validation_rows",
]

# ---------------------------------------------------------------------------------------------- files
#: The run's summary, written by the app at the end of a run (``run_summary.json``).
SUMMARY_FILE = "run_summary.json"
#: Lightning's ``CSVLogger`` file, which the report reads the curves from.
METRICS_FILE = "metrics.csv"
#: Written by a resumed launch into its own Hydra folder: the run it continued (in that run's folder).
RESUME_POINTER_FILE = "continues_run.json"

# ---------------------------------------------------------------------------------------------- logged keys
# Logged by the example models (examples/models/), read by the app (checkpoint monitor, summary) and the report.
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_PRIMARY_METRIC = "val/primary_metric"
TEST_PRIMARY_METRIC = "test/primary_metric"
#: What ``primary_metric`` measures unless the model's ``primary_metric_name`` says otherwise (e.g. the diffusion
#: model's negative denoising loss); the report names its columns and plots after it.
DEFAULT_PRIMARY_METRIC_NAME = "accuracy"
#: ``stream/<name>/{batches,samples,load_time_s,skipped}``: what an auxiliary task's own data stream loaded so
#: far in the fit (``examples.data.streams.stream_costs``, logged by the models that train on such streams).
STREAM_PREFIX = "stream/"


def task_loss(task: str, split: str = "train") -> str:
    """The key of one task's logged loss, e.g. ``train/loss/digit``."""
    return f"{split}/loss/{task}"


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv``, each holding only the columns it has a value in."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def validation_rows(metrics: list[dict[str, float]]) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` (:func:`read_metrics`) written at a validation check."""
    return [row for row in metrics if VAL_PRIMARY_METRIC in row]


def first_reach(metrics: list[dict[str, float]], target: float) -> dict[str, float] | None:
    """The first validation row whose primary metric reaches ``target`` (``>=``), or ``None`` if none does. Its
    ``cost/flops_at_val`` and ``cost/time_s_at_val`` are the training cost to that check: the report's "to
    target" columns and the search's ``flops_to_target`` objective."""
    return next((row for row in validation_rows(metrics) if row[VAL_PRIMARY_METRIC] >= target), None)


# ---------------------------------------------------------------------------------------------- the run summary
#: The version of ``run_summary.json`` this package writes. Raise it whenever :class:`RunSummary`'s fields change
#: (one added, renamed or removed, or a meaning changed), and teach :meth:`RunSummary.from_dict` the version
#: before, so that the report still reads the run folders written by it.
FORMAT_VERSION = 1


class RunSummaryError(ValueError):
    """A ``run_summary.json`` that this version of mt2st-lightning cannot read: unreadable, written by a newer
    version, or not in the format its version declares."""


@dataclass(frozen=True)
class RunSummary:
    """What one run of ``mt2st-train`` did and measured: ``run_summary.json`` in the run's folder.

    The one definition of that file: the app builds and writes it, the report reads it
    (:meth:`read` checks every field's type, and reads the files of earlier versions, see :meth:`from_dict`).
    """

    # ------------------------------------------------------------------ what ran
    label: str  # the report's row name: the config's ``label``, else the strategy
    strategy: str
    seed: int
    primary_task: str
    #: What ``primary_metric`` measures (the model's ``primary_metric_name``): the report's headers and plots.
    primary_metric_name: str
    auxiliary_tasks: list[str]
    # ------------------------------------------------------------------ the fit
    best_val_primary_metric: float | None  # the checkpoint monitor's best value (None unless it monitors it)
    #: Training batches only, on this process (rank 0 under DDP): the cost MT2ST changes.
    train_flops: float | None
    train_time_s: float | None
    #: Per phase (the set of active tasks joined by ``+``), in the order the phases ran, as
    #: ``PhaseCostMeter.summary()`` reports it (``batches``, ``flops_per_batch``, ...); the last is post-switch.
    phases: dict[str, dict[str, float]]
    drop_times: dict[str, float]  # task -> the step (or epoch, see mt2st_unit) at which its head was dropped
    mt2st_unit: str  # "step" or "epoch"
    planned_total: float | None  # the run's planned length in mt2st_unit
    total_steps: int
    epochs: int
    final_val_primary_metric: float | None
    #: ``stream/<name>/<cost>``: what each auxiliary data stream loaded over the fit. ``None`` only in a summary
    #: of a version that did not record it (then the report reads the last values logged in ``metrics.csv``).
    stream_costs: dict[str, float] | None
    val_samples: float | None
    metrics_csv: str | None  # relative to the run's folder (a moved sweep folder still reads), or absolute
    output_dir: str
    #: What changes the result besides the label and the seed (data, model, strategy parameters, planned length,
    #: precision, processes): the report does not average runs that differ here.
    settings: dict[str, Any]
    #: The whole run's wall time, a resumed fit's included (validation and checkpointing too).
    fit_wall_time_s: float
    resumed_from: str | None  # the checkpoint the last launch resumed from
    # ------------------------------------------------------------------ the test (None, {}: not tested)
    test_primary_metric: float | None
    test_samples: float | None
    test_metrics: dict[str, float]  # every metric the test logged, over all its dataloaders
    tested_checkpoint: str | None  # relative to the run's folder, or "in-memory weights"

    def __post_init__(self) -> None:
        problem = _first_type_problem({f.name: getattr(self, f.name) for f in fields(self)})
        if problem is not None:
            raise RunSummaryError(f"RunSummary.{problem}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The file's content: ``format_version`` first, then every field."""
        return {"format_version": FORMAT_VERSION, **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "run summary") -> RunSummary:
        """A summary from its file's content, of this version or an earlier one; ``source`` names it in errors.

        A content without ``format_version`` (version 0) was written before the format had one (mt2st-train
        of November 2026): it lacks the fields added since, which read as "not recorded" (see
        ``_ADDED_AFTER_VERSION_0``). A newer version than :data:`FORMAT_VERSION` is refused: upgrade the package.
        """
        content = dict(data)
        version = content.pop("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise RunSummaryError(f"{source}: format_version must be a whole number >= 0, not {version!r}")
        if version > FORMAT_VERSION:
            raise RunSummaryError(
                f"{source} has format_version {version}, newer than the {FORMAT_VERSION} this mt2st-lightning "
                'reads: upgrade it (pip install -U "mt2st-lightning[report]") to read this run'
            )
        if version == 0:
            content = {**{k: v() for k, v in _ADDED_AFTER_VERSION_0.items()}, **content}
        names = set(_field_types())
        missing, unknown = sorted(names - set(content)), sorted(set(content) - names)
        if missing or unknown:
            problems = ([f"lacks {', '.join(missing)}"] if missing else []) + (
                [f"has unknown {', '.join(unknown)}"] if unknown else []
            )
            raise RunSummaryError(
                f"{source} (format_version {version}) {' and '.join(problems)}: it was not written by mt2st-train, "
                "or was edited; fix or remove it"
            )
        problem = _first_type_problem(content)
        if problem is not None:
            raise RunSummaryError(f"{source} (format_version {version}): {problem}; fix or remove it")
        return cls(**content)

    def write(self, run_dir: str | Path) -> Path:
        """Write ``run_summary.json`` into ``run_dir``; its path."""
        path = Path(run_dir) / SUMMARY_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> RunSummary:
        """The summary in ``path``: a ``run_summary.json``, or the run folder that holds one."""
        path = Path(path)
        if path.is_dir():
            path = path / SUMMARY_FILE
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise RunSummaryError(f"{path} is not JSON ({error}): remove it, or rerun the run") from None
        if not isinstance(content, dict):
            raise RunSummaryError(f"{path} holds a JSON {type(content).__name__}, not an object")
        return cls.from_dict(content, source=str(path))


#: The fields a version-0 summary may lack (added before the format had a version), and what they read as:
#: accuracy was the only primary metric, stream costs were not recorded (None), nor sample counts, other test
#: metrics, settings (the report groups such runs by label alone) or the checkpoint a launch resumed from.
_ADDED_AFTER_VERSION_0: dict[str, Callable[[], Any]] = {
    "primary_metric_name": lambda: DEFAULT_PRIMARY_METRIC_NAME,
    "stream_costs": lambda: None,
    "val_samples": lambda: None,
    "test_samples": lambda: None,
    "test_metrics": dict,
    "settings": dict,
    "resumed_from": lambda: None,
}


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(RunSummary)


def _first_type_problem(values: Mapping[str, Any]) -> str | None:
    """``"<field> should be <type>, not <value>"`` for the first field of ``values`` of the wrong type."""
    hints = _field_types()
    for name, value in values.items():
        problem = _type_problem(value, hints[name])
        if problem is not None:
            return f"{name} {problem}"
    return None


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` is not of type ``hint`` (the few types a JSON summary holds), or ``None`` if it is."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return None
    if origin is types.UnionType:
        problems = [_type_problem(value, option) for option in args]
        return None if None in problems else f"should be {_type_name(hint)}, not {value!r}"
    if origin is list:
        if not isinstance(value, list):
            return f"should be a list, not {value!r}"
        return next((f"[{i}] {p}" for i, item in enumerate(value) if (p := _type_problem(item, args[0]))), None)
    if origin is dict:
        if not isinstance(value, dict):
            return f"should be a mapping, not {value!r}"
        for key, item in value.items():
            problem = "key should be a string" if not isinstance(key, str) else _type_problem(item, args[1])
            if problem is not None:
                return f"[{key!r}] {problem}"
        return None
    if hint is type(None):
        return None if value is None else f"should be None, not {value!r}"
    # JSON has one number type: a float field holds ints too. A bool is not a number here.
    allowed = (int, float) if hint is float else hint
    if isinstance(value, bool) and hint is not bool or not isinstance(value, allowed):
        return f"should be {_type_name(hint)}, not {value!r}"
    return None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("NoneType", "None")
