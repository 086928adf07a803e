"""``EmbeddingBiLSTMModel``: the paper's word-embedding setting. A trainable embedding table is the shared
part; sentiment is read by a BiLSTM over it, and the auxiliary tasks act on the table itself:

- ``similarity``: a human similarity score regressed from the cosine of two words' embeddings (the head is the
  affine map from cosine to score);
- ``analogy``: a is to b as c is to d, as classification of d among the batch's answers from ``b - a + c``
  (the head is a projection of the embedding space, initialised to the identity, and a temperature).

The features handed to ``mt2st_loss`` (where the adaptive and ``conflict`` strategies measure) are the
embedding table itself: the only representation all tasks share. Its gradient sums each task's pull on every
word's vector, so two tasks' gradients can be compared where they touch the same words (the rows a step looked
up are different positions for each task, and their gradients would never overlap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mt2st_lightning.examples.models.counted_lstm import CountedBiLSTM
from mt2st_lightning.examples.models.text_tasks import TextTaskModel, check_text_inputs, load_embedding

__all__ = ["EmbeddingBiLSTMModel"]

SUPPORTED = ("sentiment", "similarity", "analogy")


class _BiLSTMClassifier(nn.Module):
    def __init__(self, dim: int, hidden: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.lstm = CountedBiLSTM(dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(self.lstm.out_features, num_classes)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.out(self.dropout(self.lstm(self.dropout(x), mask)))


class CosineRegressor(nn.Module):
    """score = w * cos(e_a, e_b) + b."""

    def __init__(self) -> None:
        super().__init__()
        self.affine = nn.Linear(1, 1)
        with torch.no_grad():
            self.affine.weight.fill_(1.0)
            self.affine.bias.zero_()

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.affine(F.cosine_similarity(a, b, dim=-1).unsqueeze(-1)).squeeze(-1)


class AnalogyHead(nn.Module):
    """Logits of each question's answer among the batch's answers: scaled cosine of P(b - a + c) and P(d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(dim, dim, bias=False)
        nn.init.eye_(self.project.weight)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
        query = F.normalize(self.project(b - a + c), dim=-1)
        keys = F.normalize(self.project(d), dim=-1)
        return self.log_scale.exp() * query @ keys.T


class EmbeddingBiLSTMModel(TextTaskModel):
    """Args: ``tasks`` (from the data module), ``primary``, ``vocab_size``/``embedding_init`` (the data module's
    ``model_inputs``; its ``max_len`` is accepted and not needed), ``embedding_dim`` (the gensim vectors' size),
    ``hidden`` (LSTM units per direction)."""

    def __init__(
        self,
        tasks: Mapping[str, Mapping[str, Any]],
        primary: str = "sentiment",
        vocab_size: int = 0,
        embedding_init: str | None = None,
        max_len: int | None = None,
        embedding_dim: int = 100,
        hidden: int = 64,
        dropout: float = 0.2,
        lr: float = 2e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(tasks, primary, lr, weight_decay)
        self.save_hyperparameters()
        check_text_inputs("EmbeddingBiLSTMModel", SUPPORTED, tasks, vocab_size)
        self.embedding = load_embedding(vocab_size, embedding_dim, embedding_init)
        heads: dict[str, nn.Module] = {primary: _BiLSTMClassifier(embedding_dim, hidden, int(tasks[primary]["out_features"]), dropout)}
        if "similarity" in tasks:
            heads["similarity"] = CosineRegressor()
        if "analogy" in tasks:
            heads["analogy"] = AnalogyHead(embedding_dim)
        self.heads = nn.ModuleDict(heads)
        self.declare_tasks(primary=primary, heads=self.heads)

    def primary_logits(self, tokens: Tensor) -> Tensor:
        return self.heads[self.primary_task](self.embedding(tokens), tokens != 0)

    def training_losses(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        primary = batch["primary"]
        tokens = primary["tokens"]
        active = self.active_tasks
        groups = {"tokens": tokens.reshape(-1)}
        if "similarity" in active:
            pairs = self.stream_batch(batch, "pairs", "similarity")
            groups.update(pair_a=pairs["a"], pair_b=pairs["b"])
        if "analogy" in active:
            questions = self.stream_batch(batch, "analogies", "analogy")
            groups.update({f"q_{k}": questions[k] for k in "abcd"})
        looked_up = self.embedding(torch.cat(list(groups.values())))  # one lookup for every task
        rows = dict(zip(groups, looked_up.split([g.numel() for g in groups.values()])))
        logits = self.heads[self.primary_task](rows["tokens"].view(*tokens.shape, -1), tokens != 0)
        losses = {self.primary_task: F.cross_entropy(logits.float(), primary[self.primary_task])}
        if "similarity" in active:
            predicted = self.heads["similarity"](rows["pair_a"], rows["pair_b"])
            losses["similarity"] = F.mse_loss(predicted.float(), pairs["score"].float())
        if "analogy" in active:
            scores = self.heads["analogy"](*(rows[f"q_{k}"] for k in "abcd"))
            losses["analogy"] = F.cross_entropy(scores.float(), torch.arange(scores.shape[0], device=scores.device))
        return losses, self.embedding.weight, logits
