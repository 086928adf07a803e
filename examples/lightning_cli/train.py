"""MT2ST configured with Lightning's own configuration system, ``LightningCLI``.

``MT2STCallback`` is an ordinary Lightning callback, so it goes under ``trainer.callbacks`` with a
``class_path`` and ``init_args`` like any other (see ``config.yaml``)::

    pip install "mt2st-lightning[cli]"
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml --trainer.max_steps=300
    python examples/lightning_cli/train.py fit --config examples/lightning_cli/config.yaml --print_config  # every key

The data module decides which tasks exist; the model is built for them (``link_arguments``), exactly as the
Hydra app ``mt2st-train`` does. Any ``ImageTasksDataModule`` works as ``data.class_path``.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from mt2st_lightning.examples.data.image_tasks import ImageTasksDataModule
from mt2st_lightning.examples.models import MultiTaskModel


class MT2STLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The model's heads follow the data: one per task the data module provides, the label task primary.
        parser.link_arguments("data", "model.tasks", compute_fn=lambda data: data.task_specs, apply_on="instantiate")
        parser.link_arguments("data.init_args.label_task", "model.primary")


def main(args: list[str] | None = None, run: bool = True) -> MT2STLightningCLI:
    return MT2STLightningCLI(
        MultiTaskModel, ImageTasksDataModule, subclass_mode_data=True, args=args, run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
