"""MT2ST: adaptive multi-task to single-task learning, as a Lightning callback and LightningModule mixin."""

from mt2st_lightning.callback import MT2STCallback
from mt2st_lightning.mixin import MT2STMixin
from mt2st_lightning.schedules import (
    ADAPTIVE_STRATEGIES,
    STRATEGIES,
    Constant,
    Diminish,
    Product,
    Schedule,
    Switch,
    schedules_for,
)

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "STRATEGIES",
    "Constant",
    "Diminish",
    "MT2STCallback",
    "MT2STMixin",
    "Product",
    "Schedule",
    "Switch",
    "schedules_for",
]
__version__ = "0.1.0"
