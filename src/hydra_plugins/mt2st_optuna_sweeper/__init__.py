"""The ``mt2st_optuna`` Hydra sweeper (``conf/hydra/sweeper/mt2st_optuna.yaml``): hyper-parameter search with
Optuna, ``mt2st-train --multirun hparams_search=<preset>``.

Hydra instantiates sweepers only from the ``hydra_plugins`` namespace package, and imports every module in it
whenever a Hydra app starts: this module stays thin (Hydra only) and hands the work to
:class:`mt2st_lightning.app.search.OptunaSearch`, imported when a search starts.
"""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

__all__ = ["MT2STOptunaSweeper"]


class MT2STOptunaSweeper(Sweeper):
    """Hydra's view of :class:`~mt2st_lightning.app.search.OptunaSearch` (its arguments are the config's)."""

    def __init__(self, **config: Any) -> None:
        from mt2st_lightning.app.search import OptunaSearch

        self.search = OptunaSearch(**config)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.search.sweep(arguments)
