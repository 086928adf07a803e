"""Where should Switch switch? Digits with the switch at several fractions of the run, beside STL, seeds 0-2,
trained in-process through the library function ``train(cfg)``; then the usual report.

    python experiments/switch_point.py OUT_DIR [hydra overrides ...]
    python experiments/switch_point.py /tmp/switch_point experiment=smoke     # a quick check
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from mt2st_lightning.report import write_report
from mt2st_lightning.app.train import CONFIG_DIR, train

FRACTIONS = (0.1, 0.3, 0.5, 0.7)
SEEDS = (0, 1, 2)


def variants() -> list[tuple[str, list[str]]]:
    """(label, overrides) per table row: STL, then Switch at each fraction."""
    switches = [(f"switch@{f}", ["strategy=switch", f"strategy.switch_at={f}"]) for f in FRACTIONS]
    return [("stl", ["strategy=stl"]), *switches]


def main(out: Path, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for label, strategy in variants():
            for seed in SEEDS:
                run_dir = out / f"{label}_seed{seed}"
                cfg = compose(
                    "train",
                    overrides=[
                        *overrides,
                        *strategy,
                        f"seed={seed}",
                        f"label={label}",
                        f"paths.output_dir={run_dir}",
                        "trainer.enable_progress_bar=false",
                    ],
                )
                train(cfg)
    print(write_report(out).table)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), sys.argv[2:])
