"""``MT2STCallback``'s arguments: the policy they name, and the flat signature configuration tools read.

A strategy's parameters are declared once, as the typed keyword arguments of its policy class in
:data:`~mt2st_lightning.policies.REGISTRY`. The callback takes them as ``**params`` and forwards them to
:func:`~mt2st_lightning.policies.policy_for`; :func:`flat_signature` gives its ``__init__`` a signature that
lists every registered strategy's parameters, typed, so that LightningCLI (jsonargparse) type-checks the flat
form (``init_args: {strategy: switch, switch_at: 60}``) as it checks any other argument. A strategy
registered after ``mt2st_lightning`` is imported works from Python and Hydra at once, and from LightningCLI as
``policy: {class_path: ..., init_args: ...}``.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

from mt2st_lightning.policies import REGISTRY, Policy, policy_for
from mt2st_lightning.policies.params import parameters_of
from mt2st_lightning.schedules import Schedule

__all__ = ["build_policy", "flat_signature", "strategy_parameters"]


def build_policy(
    strategy: str | None,
    policy: Policy | None,
    schedules: Mapping[str, Schedule] | None,
    params: Mapping[str, Any],
) -> Policy:
    """The policy ``MT2STCallback(strategy, policy=, schedules=, **params)`` describes. A parameter given as
    ``None`` counts as not given (the strategy's default applies), as a config file's ``null`` does."""
    given = {name: value for name, value in params.items() if value is not None}
    if policy is not None:
        if strategy is not None or schedules is not None or given:
            extra = [n for n, v in (("strategy", strategy), ("schedules", schedules)) if v is not None] + list(given)
            raise ValueError(f"MT2STCallback(policy=...) is the whole decision; drop {', '.join(extra)}")
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a mt2st_lightning.policies.Policy, got {type(policy).__name__}")
        return policy
    if strategy is None and schedules is None:
        raise ValueError(f"give MT2STCallback a strategy (one of {', '.join(REGISTRY)}), schedules or a policy")
    return policy_for(strategy, schedules=schedules, **given)


def _union_members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) is Union:
        return typing.get_args(hint)
    return (hint,)


def strategy_parameters(registry: Mapping[str, type[Policy]] | None = None) -> list[inspect.Parameter]:
    """Every parameter of every strategy in ``registry`` (default: ``REGISTRY``), once, in registry order:
    keyword-only, default ``None`` (*not given*), typed as the union of what each strategy declares for it
    (``int`` before ``float`` where a strategy puts it so), plus ``None``."""
    hints: dict[str, list[Any]] = {}
    for cls in (REGISTRY if registry is None else registry).values():
        declared = typing.get_type_hints(cls.__init__)
        for name in parameters_of(cls):
            members = hints.setdefault(name, [])
            for member in _union_members(declared.get(name, Any)):
                if member not in members:
                    members.append(member)
    out = []
    for name, members in hints.items():
        annotation = Any if Any in members else Union[(*[m for m in members if m is not type(None)], None)]
        out.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
    return out


def flat_signature(init: Callable[..., None], registry: Mapping[str, type[Policy]] | None = None) -> inspect.Signature:
    """``init``'s signature with its ``**params`` replaced by :func:`strategy_parameters`, each annotation
    evaluated (a tool reading the signature need not resolve ``from __future__`` strings)."""
    signature = inspect.signature(init)
    resolved = typing.get_type_hints(init)
    own = [p.replace(annotation=resolved.get(p.name, p.annotation)) for p in signature.parameters.values()]
    names = {p.name for p in own}
    flat = [p for p in strategy_parameters(registry) if p.name not in names]
    at = next(i for i, p in enumerate(own) if p.kind is inspect.Parameter.VAR_KEYWORD)
    # The strategy's parameters right after strategy/policy/schedules; the callback's own options follow.
    keyword_only = inspect.Parameter.KEYWORD_ONLY
    first_option = next(
        (i for i, p in enumerate(own) if p.kind is keyword_only and p.name not in ("policy", "schedules")), at
    )
    params = own[:first_option] + flat + [p for p in own[first_option:] if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=params, return_annotation=None)
