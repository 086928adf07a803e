"""Example multi-task models: shared encoders and a generic multi-task LightningModule."""

from mt2st_lightning.examples.models.encoders import ConvEncoder, MLPEncoder, TransformerEncoder
from mt2st_lightning.examples.models.multitask import MultiTaskModel, TaskSpec

__all__ = ["ConvEncoder", "MLPEncoder", "MultiTaskModel", "TaskSpec", "TransformerEncoder"]
