"""MT2ST: adaptive multi-task to single-task learning, as a Lightning callback and LightningModule mixin."""

from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.mixin import MT2STMixin
from mt2st_lightning.policies import ADAPTIVE_STRATEGIES, STRATEGIES, Policy, policy_for, schedules_for
from mt2st_lightning.schedules import Constant, Diminish, Product, Schedule, Switch

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "STRATEGIES",
    "Constant",
    "Diminish",
    "MT2STCallback",
    "MT2STMixin",
    "Policy",
    "Product",
    "Schedule",
    "Switch",
    "policy_for",
    "schedules_for",
]
__version__ = "0.1.0"
