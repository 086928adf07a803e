"""The search space of a hyper-parameter search (:mod:`mt2st_lightning.app.search`): ``hydra.sweeper.params`` and
the command line's overrides, written as Hydra's Optuna sweeper writes them and parsed with Hydra's own override
parser into Optuna distributions (sampled keys) and overrides every trial gets as they are (fixed keys).

``interval(a, b)`` (a float; ``int(interval(a, b))`` an int), ``tag(log, interval(a, b))`` (log scale),
``range(a, b[, step])``, ``choice(a, b, ...)`` or ``a,b,...``; any other value is fixed (e.g. ``strategy: switch``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep

from mt2st_lightning.extras import require

__all__ = ["SearchConfigError", "SearchSpace", "import_optuna", "parse_search_space"]


class SearchConfigError(ValueError):
    """A search that cannot start: its space, objective, direction or sizes are wrong. Raised before any trial."""


def import_optuna() -> Any:
    """Optuna, or the error that names the extra installing it (imported when a search starts, not with the app)."""
    require("search", "hparams_search")
    import optuna

    return optuna


@dataclass(frozen=True)
class SearchSpace:
    """What each trial samples (key -> Optuna distribution) and what every trial gets as it is (overrides)."""

    distributions: dict[str, Any]
    #: key -> {sampled value -> its override text}, for the categorical keys (Hydra's own spelling of a choice).
    choice_text: dict[str, dict[Any, str]]
    fixed: list[str]

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """The overrides of one trial: the fixed ones, then one per sampled key."""
        return [*self.fixed, *(f"{key}={self._text(key, params[key])}" for key in self.distributions)]

    def _text(self, key: str, value: Any) -> str:
        if key in self.choice_text:
            return self.choice_text[key][value]
        return repr(value) if isinstance(value, float) else str(value)  # repr: every digit of the sampled float

    def probe(self) -> list[str]:
        """Overrides at the low end of every distribution: composing them checks the keys before any trial."""
        first = {key: dist.choices[0] if hasattr(dist, "choices") else dist.low for key, dist in self.distributions.items()}
        return self.overrides(first)


def parse_search_space(params: Mapping[str, Any] | None, arguments: Sequence[str], config_loader: Any = None) -> SearchSpace:
    """The space of ``hydra.sweeper.params`` and the command line's overrides (which win on the same key)."""
    optuna = import_optuna()
    texts = {str(k): f"{k}={_yaml_text(v)}" for k, v in (params or {}).items()}
    parser = OverridesParser.create(config_loader=config_loader)
    for override in parser.parse_overrides(list(arguments)):
        texts[override.get_key_element()] = override.input_line
    distributions: dict[str, Any] = {}
    choice_text: dict[str, dict[Any, str]] = {}
    fixed: list[str] = []
    for override in parser.parse_overrides(list(texts.values())):
        key = override.get_key_element()
        if not override.is_sweep_override():
            fixed.append(texts[key])
            continue
        if override.is_hydra_override():
            raise SearchConfigError(f"{key}: a search samples the run's config, not Hydra's; fix {key} instead")
        distributions[key] = _distribution(optuna, key, override, choice_text)
    if not distributions:
        raise SearchConfigError(
            "the search space is empty: give hydra.sweeper.params (or the command line) at least one sampled key, "
            "e.g. 'model.lr=tag(log, interval(1e-4, 1e-2))'"
        )
    return SearchSpace(distributions, choice_text, fixed)


def _yaml_text(value: Any) -> str:
    """A value of ``hydra.sweeper.params`` as override text (YAML may have read ``0`` or ``true`` as a number)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    return str(value)


def _distribution(optuna: Any, key: str, override: Override, choice_text: dict[str, dict[Any, str]]) -> Any:
    sweep = override.value()
    log_scale = "log" in sweep.tags
    if isinstance(sweep, IntervalSweep):
        low, high = sweep.start, sweep.end
        if not low < high:
            raise SearchConfigError(f"{key}: interval({low}, {high}) is empty; write interval(low, high) with low < high")
        if log_scale and low <= 0:
            raise SearchConfigError(f"{key}: a log-scale interval needs low > 0, not {low}; raise it or drop tag(log, ...)")
        if isinstance(low, int) and isinstance(high, int):
            return optuna.distributions.IntDistribution(low, high, log=log_scale)
        return optuna.distributions.FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(sweep, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise SearchConfigError(f"{override.input_line}: the range holds no value; check start, stop and step")
        if log_scale:
            raise SearchConfigError(f"{key}: range(...) has a fixed step, it cannot be log-scale; use tag(log, interval(...))")
        if all(isinstance(v, int) for v in values):
            return optuna.distributions.IntDistribution(values[0], values[-1], step=int(sweep.step))
        return optuna.distributions.FloatDistribution(float(values[0]), float(values[-1]), step=float(sweep.step))
    if isinstance(sweep, ChoiceSweep):
        values = list(override.sweep_iterator())
        texts = list(override.sweep_string_iterator())
        if not all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            raise SearchConfigError(f"{key}: a choice may hold numbers, strings, booleans or null, not {values}")
        if len(set(values)) != len(values):
            raise SearchConfigError(f"{key}: choice({', '.join(texts)}) repeats a value")
        choice_text[key] = dict(zip(values, texts))
        return optuna.distributions.CategoricalDistribution(values)
    raise SearchConfigError(f"{override.input_line}: not a sweep a search can sample")
