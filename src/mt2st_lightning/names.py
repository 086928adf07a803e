"""The metric keys the core logs, each defined here once: ``MT2STCallback`` logs the ``mt2st/...`` keys,
``PhaseCostMeter`` the ``cost/...`` keys. (The keys a model logs for the app and the report, ``train/``,
``val/``, ``test/``, live with the run format: :mod:`mt2st_lightning.app.run_format`.)
"""

from __future__ import annotations

__all__ = [
    "ACTIVE_TASKS",
    "COST_FLOPS",
    "COST_FLOPS_AT_VAL",
    "COST_FLOPS_PER_BATCH",
    "COST_TIME",
    "COST_TIME_AT_VAL",
    "SWITCH_STEP_PREFIX",
    "WEIGHT_PREFIX",
    "policy_metric",
    "weight",
]

# Logged by MT2STCallback.
WEIGHT_PREFIX = "mt2st/weight/"
ACTIVE_TASKS = "mt2st/active_tasks"
#: ``mt2st/dropped_at/<task>``: the step (or epoch) at which a task's head was dropped.
SWITCH_STEP_PREFIX = "mt2st/dropped_at/"

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
