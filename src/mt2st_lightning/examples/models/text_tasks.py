"""``TextTaskModel``: what the text models share: the primary task's metrics and the evaluation of the word
embedding on held-out word pairs (Spearman) and analogies (accuracy), from the embedding table alone.

A subclass owns ``self.embedding`` (``nn.Embedding``), declares its heads, and implements
:meth:`training_losses` (one loss per active task, and the shared features the policies measure on) and
:meth:`primary_logits`. Training batches are :func:`~mt2st_lightning.examples.data.streams.combine_streams` dicts;
evaluation batches are the sentences (``tokens``), the held-out pairs (``score``) or analogies (``d``).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Accuracy, MeanMetric, SpearmanCorrCoef, SumMetric

from mt2st_lightning.examples.data.streams import stream_costs
from mt2st_lightning.mixin import MT2STMixin

__all__ = ["TextTaskModel", "check_text_inputs", "load_embedding"]

STAGES = ("val", "test")


def check_text_inputs(model: str, supported: tuple[str, ...], tasks: Mapping[str, Any], vocab_size: int) -> None:
    """Fail before building a text model whose tasks it has no head for, or without the data module's vocabulary."""
    unknown = [t for t in tasks if t not in supported]
    if unknown:
        raise ValueError(f"{model} has heads for {supported}, not {unknown}; set data.aux_tasks")
    if vocab_size < 4:
        raise ValueError(f"vocab_size must come from the data module (its model_inputs), got {vocab_size}")


def load_embedding(vocab_size: int, dim: int, init: str | None) -> nn.Embedding:
    """An ``nn.Embedding`` (row 0 is padding), initialised from a ``.npy`` of word vectors when ``init`` names one."""
    embedding = nn.Embedding(vocab_size, dim, padding_idx=0)
    if init:
        vectors = torch.from_numpy(np.load(init))
        if vectors.shape != (vocab_size, dim):
            raise ValueError(
                f"the word vectors in {init} are {tuple(vectors.shape)}, the embedding is ({vocab_size}, {dim}): set "
                "model.embedding_dim to data.embedding_dim"
            )
        with torch.no_grad():
            embedding.weight.copy_(vectors)
            embedding.weight[0].zero_()
    return embedding


class TextTaskModel(MT2STMixin, pl.LightningModule):
    """Metrics: ``{train,val,test}/primary_metric`` (sentiment accuracy), ``val/loss``, ``{val,test}/samples``,
    ``{val,test}/aux/similarity_spearman`` and ``{val,test}/aux/analogy_{acc,semantic_acc,syntactic_acc}`` (when
    the data module holds those sets out), and ``stream/<name>/...`` (what each auxiliary stream loaded)."""

    embedding: nn.Embedding

    def __init__(self, tasks: Mapping[str, Mapping[str, Any]], primary: str, lr: float, weight_decay: float) -> None:
        super().__init__()
        if primary not in tasks:
            raise ValueError(f"primary task {primary!r} is not among the tasks {list(tasks)}")
        self.task_specs = {t: dict(s) for t, s in tasks.items()}
        num_classes = int(self.task_specs[primary]["out_features"])
        self.train_metric, self.val_metric, self.test_metric = (
            Accuracy(task="multiclass", num_classes=num_classes) for _ in range(3)
        )
        self.val_samples, self.test_samples = SumMetric(), SumMetric()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.spearman = nn.ModuleDict({s: SpearmanCorrCoef() for s in STAGES})
        self.analogy = nn.ModuleDict({f"{s}_{k}": MeanMetric() for s in STAGES for k in ("acc", "semantic_acc", "syntactic_acc")})

    @abstractmethod
    def training_losses(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """``(losses of the active tasks, shared features, primary logits)`` for a training batch."""

    @abstractmethod
    def primary_logits(self, tokens: Tensor) -> Tensor:
        """The primary head's logits for ``(B, T)`` token ids (0 is padding)."""

    @staticmethod
    def stream_batch(batch: Mapping[str, Any], stream: str, task: str) -> Mapping[str, Tensor]:
        out = batch.get(stream)
        if out is None:
            raise RuntimeError(
                f"task {task!r} is active but the training batch holds no {stream!r} stream batch: the data module "
                f"must give it in aux_tasks (its train_dataloader then streams {stream!r})"
            )
        return out

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses, features, logits = self.training_losses(batch)
        primary = batch["primary"]
        n = primary["tokens"].shape[0]
        self.train_metric(logits.argmax(-1), primary[self.primary_task])
        self.log("train/primary_metric", self.train_metric, on_step=False, on_epoch=True, batch_size=n)
        loss = self.mt2st_loss(losses, features=features)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict({f"train/loss/{t}": v.detach() for t, v in losses.items()}, batch_size=n)
        self.log_dict(stream_costs(self.trainer), batch_size=1)
        return loss

    # ------------------------------------------------------------------ evaluation
    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Mapping[str, Tensor], stage: str) -> None:
        if "tokens" in batch:
            self._evaluate_primary(batch, stage)
        elif "score" in batch:
            self._evaluate_similarity(batch, stage)
        elif "d" in batch:
            self._evaluate_analogy(batch, stage)
        else:
            raise ValueError(f"an evaluation batch must hold tokens, score or d; got {sorted(batch)}")

    def _evaluate_primary(self, batch: Mapping[str, Tensor], stage: str, logits: Tensor | None = None) -> None:
        """The primary task's metrics; ``logits``, when a subclass has already computed them for the batch."""
        if logits is None:
            logits = self.primary_logits(batch["tokens"])
        target = batch[self.primary_task]
        n = target.shape[0]
        metric, samples, mean_loss = (getattr(self, f"{stage}_{k}") for k in ("metric", "samples", "loss"))
        metric(logits.argmax(-1), target)
        samples.update(n)
        mean_loss.update(F.cross_entropy(logits.float(), target), weight=n)
        kw = dict(on_step=False, on_epoch=True, add_dataloader_idx=False)
        self.log(f"{stage}/primary_metric", metric, prog_bar=stage == "val", batch_size=n, **kw)
        self.log(f"{stage}/samples", samples, batch_size=n, **kw)
        self.log(f"{stage}/loss", mean_loss, prog_bar=stage == "val", **kw)

    def _unit_table(self) -> Tensor:
        return F.normalize(self.embedding.weight.float(), dim=1)

    def _evaluate_similarity(self, batch: Mapping[str, Tensor], stage: str) -> None:
        table = self._unit_table()
        cosine = (table[batch["a"]] * table[batch["b"]]).sum(1)
        self.spearman[stage].update(cosine, batch["score"].float())
        self.log(f"{stage}/aux/similarity_spearman", self.spearman[stage], on_step=False, on_epoch=True,
                 add_dataloader_idx=False, batch_size=cosine.shape[0])

    def _evaluate_analogy(self, batch: Mapping[str, Tensor], stage: str) -> None:
        # 3CosAdd over the whole vocabulary, the question's own words and the special tokens excluded.
        table = self._unit_table()
        query = table[batch["b"]] - table[batch["a"]] + table[batch["c"]]
        scores = query @ table.T
        scores[:, :3] = -torch.inf
        for k in ("a", "b", "c"):
            scores.scatter_(1, batch[k].unsqueeze(1), -torch.inf)
        correct = (scores.argmax(1) == batch["d"]).float()
        semantic = batch["semantic"].bool()
        kw = dict(on_step=False, on_epoch=True, add_dataloader_idx=False)
        for key, chosen in (("acc", None), ("semantic_acc", semantic), ("syntactic_acc", ~semantic)):
            values = correct if chosen is None else correct[chosen]
            metric = self.analogy[f"{stage}_{key}"]
            if values.numel():
                metric.update(values)
            if metric.update_count:  # a metric that saw nothing (e.g. no syntactic question) is not logged
                self.log(f"{stage}/aux/analogy_{key}", metric, batch_size=max(values.numel(), 1), **kw)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
