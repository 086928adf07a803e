"""``TextTransformerModel``: the paper's transformer setting on sentences. A small Transformer encoder (token
and position embeddings, pre-norm layers) is shared; sentiment and the sentence's source ``domain`` are read
from its mean-pooled output, and ``mlm`` predicts masked tokens of sentences from a stream of their own.

The primary batch and the masked batch run through the encoder together, as one batch. After the switch the
masked stream is no longer loaded and the encoder runs on the primary batch alone.

The features handed to ``mt2st_loss`` (where the adaptive and ``conflict`` strategies measure) are the token
embedding table, which every task reaches through the whole encoder. The encoder's output would not do: the
masked-LM loss depends only on the masked batch's rows and the primary loss only on the primary batch's, so
their gradients there never overlap and their cosine is always 0. Measuring on the table costs one backward
through the encoder per task on a measuring step.

On the test sentences it also reports each auxiliary head (the paper's Table 3 "aux loss"), for every strategy,
also those that never trained the head: ``test/aux/domain_acc`` and ``test/aux/mlm_loss``/``mlm_acc``, the
masked-LM cross-entropy and accuracy at positions masked with a fixed seed, the same for every run with the same
number of processes (under DDP each rank masks its own share of the sentences with the same seed). A head whose
weights were released (``release_heads=True``) is not evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Accuracy, MeanMetric

from mt2st_lightning.sharding import fully_shard_tasks
from mt2st_lightning.examples.models.text_tasks import TextTaskModel, check_text_inputs, load_embedding

__all__ = ["TextTransformerModel"]

SUPPORTED = ("sentiment", "domain", "mlm")
MASK_ID = 2  # data.text.SPECIALS: <pad>, <unk>, <mask>
TEST_MASK_SEED = 0  # every run masks the same test positions


class LearnedPositions(nn.Module):
    """A learned vector per position, added to each token's: ``(B, T, d) -> (B, T, d)``, ``T <= max_len``. A module
    of its own (not a parameter of the model itself), so that under FSDP2 it is gathered when it is called."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, max_len, d_model))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.weight[:, : x.shape[1]]


class TextTransformerModel(TextTaskModel):
    """Args: ``tasks``, ``primary``, ``vocab_size``/``max_len``/``embedding_init`` (the data module's
    ``model_inputs``), ``d_model``, ``nhead``, ``num_layers``, ``dim_feedforward``, ``dropout``, ``mask_rate``
    (share of a sentence's tokens the masked-LM task hides: 80% become ``<mask>``, 10% a random word, 10% stay)."""

    def __init__(
        self,
        tasks: Mapping[str, Mapping[str, Any]],
        primary: str = "sentiment",
        vocab_size: int = 0,
        max_len: int = 48,
        embedding_init: str | None = None,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 128,
        dropout: float = 0.1,
        mask_rate: float = 0.15,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(tasks, primary, lr, weight_decay)
        self.save_hyperparameters()
        check_text_inputs("TextTransformerModel", SUPPORTED, tasks, vocab_size)
        if not 0 < mask_rate < 1:
            raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate}")
        self.embedding = load_embedding(vocab_size, d_model, embedding_init)
        self.position = LearnedPositions(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        heads = {primary: nn.Linear(d_model, int(tasks[primary]["out_features"]))}
        if "domain" in tasks:
            heads["domain"] = nn.Linear(d_model, int(tasks["domain"]["out_features"]))
        if "mlm" in tasks:
            heads["mlm"] = nn.Linear(d_model, vocab_size)
        self.heads = nn.ModuleDict(heads)
        self.declare_tasks(primary=primary, heads=self.heads)
        if "domain" in tasks:
            self.test_domain_acc = Accuracy(task="multiclass", num_classes=int(tasks["domain"]["out_features"]))
        if "mlm" in tasks:
            self.test_mlm_loss, self.test_mlm_acc = MeanMetric(), MeanMetric()
        self.__dict__["test_mask_generator"] = None  # a plain attribute: not a module, not in the checkpoint

    def encode(self, tokens: Tensor) -> Tensor:
        x = self.position(self.embedding(tokens))
        return self.norm(self.encoder(x, src_key_padding_mask=tokens == 0))

    @staticmethod
    def pool(h: Tensor, tokens: Tensor) -> Tensor:
        real = (tokens != 0).unsqueeze(-1).to(h.dtype)
        return (h * real).sum(1) / real.sum(1).clamp_min(1.0)

    def primary_logits(self, tokens: Tensor) -> Tensor:
        return self.heads[self.primary_task](self.pool(self.encode(tokens), tokens))

    def mask_tokens(self, tokens: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(masked tokens, positions chosen)``; at least one position per batch is chosen. The draws come from
        ``generator`` (a CPU generator) when given, else from the global RNG on the tokens' device."""

        def draw(fn: Any, *args: Any) -> Tensor:
            if generator is None:
                return fn(*args, tokens.shape, device=tokens.device)
            return fn(*args, tokens.shape, generator=generator).to(tokens.device)

        real = tokens > MASK_ID
        chosen = real & (draw(torch.rand) < self.hparams.mask_rate)
        if not chosen.any():
            chosen = real & (real.cumsum(1) == 1) & (torch.arange(len(tokens), device=tokens.device) == 0).unsqueeze(1)
        kind = draw(torch.rand)
        masked = torch.where(chosen & (kind < 0.8), torch.full_like(tokens, MASK_ID), tokens)
        random_words = draw(torch.randint, MASK_ID + 1, self.embedding.num_embeddings)
        masked = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_words, masked)
        return masked, chosen

    def training_losses(self, batch: Mapping[str, Any]) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        primary = batch["primary"]
        tokens = primary["tokens"]
        active = self.active_tasks
        inputs = tokens
        if "mlm" in active:
            sentences = self.stream_batch(batch, "sentences", "mlm")["tokens"]
            masked, chosen = self.mask_tokens(sentences)
            width = max(tokens.shape[1], masked.shape[1])
            inputs = torch.cat([F.pad(tokens, (0, width - tokens.shape[1])), F.pad(masked, (0, width - masked.shape[1]))])
        encoded = self.encode(inputs)
        h = encoded[: len(tokens), : tokens.shape[1]]
        pooled = self.pool(h, tokens)
        logits = self.heads[self.primary_task](pooled)
        losses = {self.primary_task: F.cross_entropy(logits.float(), primary[self.primary_task])}
        if "domain" in active:
            losses["domain"] = F.cross_entropy(self.heads["domain"](pooled).float(), primary["domain"])
        if "mlm" in active:
            hidden = encoded[len(tokens) :, : masked.shape[1]][chosen]
            losses["mlm"] = F.cross_entropy(self.heads["mlm"](hidden).float(), sentences[chosen])
        return losses, self.embedding.weight, logits

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp2``, ``fsdp2_cpu``): shard with FSDP2, each encoder layer
        as a unit and each head as its own, so that a dropped head's shards (the masked-LM head's vocabulary-wide
        projection above all) can be freed (:func:`~mt2st_lightning.sharding.fully_shard_tasks`);
        otherwise nothing."""
        if self.device_mesh is not None:  # set by ModelParallelStrategy only
            fully_shard_tasks(self, encoder_units=self.encoder.layers)

    # ------------------------------------------------------------------ held-out auxiliary metrics
    def on_test_epoch_start(self) -> None:
        self.__dict__["test_mask_generator"] = torch.Generator().manual_seed(TEST_MASK_SEED)

    def _evaluate_primary(self, batch: Mapping[str, Tensor], stage: str, logits: Tensor | None = None) -> None:
        if stage != "test":
            super()._evaluate_primary(batch, stage, logits)
            return
        # One encoder pass serves the primary head and the domain head, as in training.
        tokens = batch["tokens"]
        pooled = self.pool(self.encode(tokens), tokens)
        super()._evaluate_primary(batch, stage, self.heads[self.primary_task](pooled))
        self._evaluate_auxiliary_heads(batch, pooled)

    def _evaluate_auxiliary_heads(self, batch: Mapping[str, Tensor], pooled: Tensor) -> None:
        tokens = batch["tokens"]
        kw = dict(on_step=False, on_epoch=True, add_dataloader_idx=False)
        usable = set(self.heads) - set(self.released_tasks)
        if "domain" in usable and "domain" in batch:
            logits = self.heads["domain"](pooled)
            self.test_domain_acc(logits.argmax(-1), batch["domain"])
            self.log("test/aux/domain_acc", self.test_domain_acc, batch_size=len(tokens), **kw)
        if "mlm" in usable:
            generator = self.test_mask_generator or torch.Generator().manual_seed(TEST_MASK_SEED)
            masked, chosen = self.mask_tokens(tokens, generator)
            n = int(chosen.sum())
            if n == 0:  # a batch of padding only: nothing to predict
                return
            logits = self.heads["mlm"](self.encode(masked)[chosen]).float()
            target = tokens[chosen]
            self.test_mlm_loss.update(F.cross_entropy(logits, target), weight=n)
            self.test_mlm_acc.update((logits.argmax(-1) == target).float().mean(), weight=n)
            self.log("test/aux/mlm_loss", self.test_mlm_loss, batch_size=n, **kw)
            self.log("test/aux/mlm_acc", self.test_mlm_acc, batch_size=n, **kw)
