"""The Hydra app (``mt2st-train``): configs composed from ``conf/``, sweeps, crash-safe checkpoints, resume in
the same run folder, and the run summary that ``mt2st-report`` reads.

Needs the ``[app]`` extra (hydra-core, omegaconf). Importing this package imports neither: the run format
(:mod:`mt2st_lightning.app.run_format`) is plain Python, so that the report reads it without Hydra.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    """``mt2st-train``: the Hydra app's entry point (a clear error, naming the extra, when Hydra is missing)."""
    from mt2st_lightning.extras import require

    require("app", "mt2st-train")
    import sys

    from mt2st_lightning.app.train import main as hydra_main

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    hydra_main()
