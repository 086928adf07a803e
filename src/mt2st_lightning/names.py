"""Metric names shared by the library, the app and the report: each one defined here, once.

The callback logs the ``mt2st/...`` keys, the example models the ``train/``/``val/``/``test/`` keys,
``PhaseCostMeter`` the ``cost/...`` keys; ``mt2st-report`` reads them back from ``metrics.csv``.
"""

from __future__ import annotations

__all__ = [
    "ACTIVE_TASKS",
    "COST_FLOPS",
    "COST_FLOPS_AT_VAL",
    "COST_FLOPS_PER_BATCH",
    "COST_TIME",
    "COST_TIME_AT_VAL",
    "DEFAULT_PRIMARY_METRIC_NAME",
    "STREAM_PREFIX",
    "SWITCH_STEP_PREFIX",
    "TEST_PRIMARY_METRIC",
    "TRAIN_LOSS",
    "VAL_LOSS",
    "VAL_PRIMARY_METRIC",
    "WEIGHT_PREFIX",
    "policy_metric",
    "task_loss",
    "weight",
]

# Logged by MT2STCallback.
WEIGHT_PREFIX = "mt2st/weight/"
ACTIVE_TASKS = "mt2st/active_tasks"
#: ``mt2st/dropped_at/<task>``: the step (or epoch) at which a task's head was dropped.
SWITCH_STEP_PREFIX = "mt2st/dropped_at/"

# Logged by the example models (models/multitask.py) and read by the app and the report.
TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"
VAL_PRIMARY_METRIC = "val/primary_metric"
TEST_PRIMARY_METRIC = "test/primary_metric"
#: What ``primary_metric`` measures unless the model's ``primary_metric_name`` says otherwise (e.g. the diffusion
#: model's negative denoising loss); the report names its columns and plots after it.
DEFAULT_PRIMARY_METRIC_NAME = "accuracy"

#: ``stream/<name>/{batches,samples,load_time_s,skipped}``: what an auxiliary task's own data stream loaded so
#: far in the fit (``data.streams.stream_costs``, logged by the models that train on such streams).
STREAM_PREFIX = "stream/"

# Logged by PhaseCostMeter.
COST_FLOPS = "cost/flops"
COST_TIME = "cost/time_s"
COST_FLOPS_PER_BATCH = "cost/flops_per_batch"
COST_FLOPS_AT_VAL = "cost/flops_at_val"
COST_TIME_AT_VAL = "cost/time_s_at_val"


def weight(task: str) -> str:
    """The key of an auxiliary task's logged weight."""
    return f"{WEIGHT_PREFIX}{task}"


def policy_metric(policy: str, key: str) -> str:
    """The key under which the callback logs a policy's diagnostic, e.g. ``mt2st/conflict/cosine/edges``."""
    return f"mt2st/{policy}/{key}"


def task_loss(task: str, split: str = "train") -> str:
    """The key of one task's logged loss, e.g. ``train/loss/digit``."""
    return f"{split}/loss/{task}"
