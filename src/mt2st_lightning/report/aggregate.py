"""From runs to the table's rows: runs grouped by label and settings (in the registry's strategy order), and
each group's mean ± std over seeds, compression against the STL runs and time and FLOPs to their target."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mt2st_lightning import policies
from mt2st_lightning.app.run_format import DEFAULT_PRIMARY_METRIC_NAME
from mt2st_lightning.names import COST_FLOPS_AT_VAL as FLOPS_AT_VAL
from mt2st_lightning.names import COST_TIME_AT_VAL as TIME_AT_VAL
from mt2st_lightning.report.runs import Run

__all__ = [
    "Group",
    "Row",
    "Stat",
    "Summary",
    "group_runs",
    "metric_name",
    "metric_unit",
    "strategy_order",
    "summarize",
]


# ---------------------------------------------------------------------------------------------- grouping
def _flatten(settings: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(settings, dict):
        out: dict[str, Any] = {}
        for key, value in settings.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.dumps(settings, sort_keys=True)}


def _settings_key(settings: dict[str, Any], without: tuple[str, ...] = ()) -> str:
    return json.dumps({k: v for k, v in settings.items() if k not in without}, sort_keys=True)


def _short(value: str) -> str:
    """``"mt2st_lightning.examples.models.ConvEncoder"`` -> ``ConvEncoder``; other values as they are."""
    text = value.strip('"')
    return text.rsplit(".", 1)[-1] if text.count(".") >= 2 and " " not in text else text


@dataclass
class Group:
    """Runs that share a label and every setting: what one table row averages."""

    label: str  # the row's name: the runs' label, plus the settings that tell it apart from its namesakes
    runs: list[Run]


def strategy_order() -> tuple[str, ...]:
    """The order of the table's rows: every strategy in the registry (:data:`mt2st_lightning.policies.REGISTRY`,
    whose keys are :data:`~mt2st_lightning.policies.STRATEGIES`), in its order; other labels follow
    alphabetically. Read at each call, so that a strategy registered after import takes its place too."""
    return tuple(policies.REGISTRY)


def group_runs(runs: Iterable[Run], messages: list[str] | None = None) -> list[Group]:
    """Runs by label and settings, the strategies first in the registry's order (:func:`strategy_order`). A
    label whose runs differ in their settings becomes one row per setting, named by what differs (a message
    says so)."""
    by_label: dict[str, dict[str, list[Run]]] = {}
    for run in runs:
        by_label.setdefault(run.label, {}).setdefault(_settings_key(run.settings), []).append(run)
    known = strategy_order()

    def order(label: str) -> tuple[int, str]:
        return (known.index(label) if label in known else len(known), label)

    groups = []
    for label in sorted(by_label, key=order):
        variants = list(by_label[label].values())
        if len(variants) == 1:
            groups.append(Group(label, variants[0]))
            continue
        flat = [_flatten(v[0].settings) for v in variants]
        differ = sorted({k for f in flat for k in f if len({g.get(k) for g in flat}) > 1})
        if messages is not None:
            messages.append(
                f"Runs labelled {label!r} differ in {', '.join(differ)}: not averaged together, split into "
                f"{len(variants)} rows."
            )
        for runs_, f in zip(variants, flat, strict=True):
            suffix = ", ".join(f"{k}={_short(f[k]) if k in f else '?'}" for k in differ)
            groups.append(Group(f"{label} ({suffix})", runs_))
    return groups


# ---------------------------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Stat:
    """Mean ± sample standard deviation over ``n`` runs (no std for a single run)."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Stat | None:
        xs = [float(v) for v in values if v is not None]
        if not xs:
            return None
        # fmean sums exactly (math.fsum): the same runs give the same mean in any order.
        return cls(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs))

    def format(self, fmt: Any = "{:.3g}".format) -> str:
        return fmt(self.mean) if self.std is None else f"{fmt(self.mean)} ± {fmt(self.std)}"


@dataclass
class Row:
    """One table row: the runs of one label, summarised over seeds."""

    label: str
    strategy: str
    runs: int
    seeds: list[int]
    test_acc: Stat | None
    best_val_acc: Stat | None
    wall_time_s: Stat | None
    train_time_s: Stat | None
    train_flops: Stat | None
    compression: Stat | None
    flops_per_batch_last_phase: Stat | None
    time_to_target_s: Stat | None
    flops_to_target: Stat | None
    reached_target: int
    target: float | None = None  # the val accuracy this row's time/FLOPs to target refer to
    baseline_flops: float | None = None  # the STL FLOPs this row's compression refers to
    other_test_metrics: dict[str, Stat] = field(default_factory=dict)  # e.g. a held-out auxiliary metric
    stream_costs: dict[str, Stat] = field(default_factory=dict)  # what the auxiliary data streams loaded
    rising_at_end: int = 0  # runs whose last validation check set their best value
    #: Per run, in seed order: the first and last optimizer step at which an auxiliary head was dropped (one
    #: step for a switch that drops every head at once), or ``None`` for a run that kept its heads to the end.
    drop_steps: list[tuple[float, float] | None] = field(default_factory=list)

    @property
    def fired(self) -> int:
        """How many of the row's runs dropped an auxiliary head (the switch fired)."""
        return sum(steps is not None for steps in self.drop_steps)


@dataclass
class Summary:
    """The table's rows and what they are measured against (``None`` without STL runs, or when rows of
    different settings have different STL baselines: then each row holds its own)."""

    rows: list[Row]
    target: float | None  # the STL runs' mean final validation accuracy
    stl_flops: float | None  # the STL runs' mean training FLOPs: the compression baseline
    messages: list[str] = field(default_factory=list)  # how unlike runs were kept apart
    metric: str = DEFAULT_PRIMARY_METRIC_NAME  # what the runs' primary metric measures ("primary metric" if they disagree)

    @property
    def metric_unit(self) -> str:
        return metric_unit(self.metric)


# Runs of another strategy compare against the STL runs that share these settings, not their strategy's.
_BASELINE_FREE = ("strategy",)


def summarize(runs: Sequence[Run]) -> Summary:
    """One row per label and setting. Compression and the target come from the runs with strategy ``stl`` that
    share the row's data, model, planned length, precision and number of processes."""
    baselines: dict[str, tuple[float | None, float | None]] = {}
    for key in {_settings_key(r.settings, _BASELINE_FREE) for r in runs}:
        stl = [r for r in runs if r.strategy == "stl" and _settings_key(r.settings, _BASELINE_FREE) == key]
        stl_flops = Stat.of(r.summary.train_flops for r in stl)
        stl_final = Stat.of(r.final_val for r in stl)
        baselines[key] = (
            stl_final.mean if stl_final is not None else None,
            stl_flops.mean if stl_flops is not None and stl_flops.mean > 0 else None,
        )

    messages: list[str] = []
    rows = []
    for group in group_runs(runs, messages):
        runs_ = group.runs
        target, baseline = baselines[_settings_key(runs_[0].settings, _BASELINE_FREE)]
        flops = Stat.of(r.summary.train_flops for r in runs_)
        reached = [hit for r in runs_ if target is not None and (hit := r.first_reach(target)) is not None]
        rows.append(
            Row(
                label=group.label,
                strategy=runs_[0].strategy,
                runs=len(runs_),
                seeds=sorted(r.summary.seed for r in runs_),
                test_acc=Stat.of(r.summary.test_primary_metric for r in runs_),
                best_val_acc=Stat.of(r.best_val for r in runs_),
                wall_time_s=Stat.of(r.summary.fit_wall_time_s for r in runs_),
                train_time_s=Stat.of(r.summary.train_time_s for r in runs_),
                train_flops=flops,
                compression=_compression(flops, baseline),
                flops_per_batch_last_phase=Stat.of(r.flops_per_batch_last_phase for r in runs_),
                time_to_target_s=Stat.of(hit.get(TIME_AT_VAL) for hit in reached),
                flops_to_target=Stat.of(hit.get(FLOPS_AT_VAL) for hit in reached),
                reached_target=len(reached),
                target=target,
                baseline_flops=baseline,
                other_test_metrics=_stats_by_key([r.other_test_metrics for r in runs_]),
                stream_costs=_stats_by_key([r.stream_costs for r in runs_]),
                rising_at_end=sum(r.rising_at_end for r in runs_),
                drop_steps=[_drop_span(r) for r in sorted(runs_, key=lambda r: r.summary.seed)],
            )
        )
    used = {(row.target, row.baseline_flops) for row in rows}
    target, stl_flops = used.pop() if len(used) == 1 else (None, None)
    if len(used) > 0:
        messages.append(
            "Rows of different settings have different STL runs to compare with: each row's compression and "
            "target are against the STL runs of its own settings (summary.csv: target_val_acc, stl_flops)."
        )
    return Summary(rows, target, stl_flops, messages, metric_name(runs))


def metric_unit(metric: str) -> str:
    """How a primary metric is shown: an accuracy in %, anything else x 100 (the table prints every one x 100)."""
    return "%" if metric == DEFAULT_PRIMARY_METRIC_NAME else "x100"


def metric_name(runs: Iterable[Run]) -> str:
    """The primary metric's name shared by ``runs``; ``"primary metric"`` when they name different ones."""
    names = {run.metric_name for run in runs}
    return names.pop() if len(names) == 1 else "primary metric"


def _stats_by_key(values: Sequence[Mapping[str, float]]) -> dict[str, Stat]:
    """Mean ± std per key over the runs that have a finite value for it (a NaN, e.g. an accuracy over no
    samples, is left out rather than spread over the row)."""
    keys = sorted({k for v in values for k in v})
    stats = {k: Stat.of(x if x is not None and math.isfinite(x) else None for x in (v.get(k) for v in values)) for k in keys}
    return {k: stat for k, stat in stats.items() if stat is not None}


def _drop_span(run: Run) -> tuple[float, float] | None:
    """The first and last step at which ``run`` dropped an auxiliary head; ``None`` if it dropped none."""
    steps = run.drop_steps().values()
    return (min(steps), max(steps)) if steps else None


def _compression(flops: Stat | None, baseline: float | None) -> Stat | None:
    """``1 - FLOPs/baseline`` over a group's runs: linear, so its mean is ``1 - mean/baseline`` (exactly 0
    for the STL runs themselves) and its std ``std/baseline``."""
    if flops is None or baseline is None:
        return None
    return Stat(1.0 - flops.mean / baseline, None if flops.std is None else flops.std / baseline, flops.n)
