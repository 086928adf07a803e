"""``python -m mt2st_lightning.report DIR``: the same as ``mt2st-report DIR``."""

from mt2st_lightning.report.cli import main

main()
