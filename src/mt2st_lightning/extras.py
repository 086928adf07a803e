"""The optional parts of the package and the pip extra each needs: a missing one is an error that names the
command that installs it, raised before anything else of that part runs."""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "MissingExtraError", "require"]

#: extra -> the top-level modules it installs (pyproject.toml's [project.optional-dependencies]).
EXTRAS: dict[str, tuple[str, ...]] = {
    "app": ("hydra", "omegaconf"),
    "report": ("matplotlib",),
    "examples": ("sklearn", "torchmetrics"),
    "text": ("gensim",),
    "search": ("optuna",),
}


class MissingExtraError(ImportError):
    """An optional part of mt2st-lightning was used without the extra that installs its dependencies."""


def require(extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` unless every module of ``extra`` is importable; ``what`` names the part
    that needs it (a command or a module) in the message."""
    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingExtraError(
            f"{what} needs the [{extra}] extra ({', '.join(missing)} not installed): "
            f'pip install "mt2st-lightning[{extra}]"'
        )
