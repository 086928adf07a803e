"""MT2ST: adaptive multi-task to single-task learning, as a Lightning callback and LightningModule mixin."""

import logging

from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.export import save_single_task
from mt2st_lightning.guards import NonFiniteGuard
from mt2st_lightning.heads import drop_heads
from mt2st_lightning.mixin import MT2STMixin
from mt2st_lightning.policies import ADAPTIVE_STRATEGIES, STRATEGIES, Policy, SchedulePolicy, policy_for, schedules_for
from mt2st_lightning.policies.base import LocalReducer, Reducer, StrategyReducer
from mt2st_lightning.schedules import Constant, Diminish, Product, Schedule, Switch
from mt2st_lightning.step_record import StepRecord

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "STRATEGIES",
    "Constant",
    "Diminish",
    "LocalReducer",
    "MT2STCallback",
    "MT2STMixin",
    "NonFiniteGuard",
    "Policy",
    "Product",
    "Reducer",
    "Schedule",
    "SchedulePolicy",
    "StepRecord",
    "StrategyReducer",
    "Switch",
    "drop_heads",
    "policy_for",
    "save_single_task",
    "schedules_for",
]
__version__ = "0.1.0"

# Drops, exports and skipped steps are announced on the "mt2st_lightning" logger (rank 0 only). As Lightning
# does for its own logger: show INFO lines unless the application configured logging itself.
_logger = logging.getLogger(__name__)
if not _logger.handlers and not logging.getLogger().handlers:
    _logger.setLevel(logging.INFO)
    _logger.addHandler(logging.StreamHandler())
    _logger.propagate = False
