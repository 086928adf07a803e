"""The text models: FLOPs the counter sees, every task's loss reaching the shared features, masked LM, and a
short fit on a generated slice through a switch (the dropped streams stop loading)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from mt2st_lightning import MT2STCallback
from mt2st_lightning.examples.models.counted_lstm import CountedBiLSTM
from mt2st_lightning.examples.models.embedding_bilstm import EmbeddingBiLSTMModel
from mt2st_lightning.examples.models.text_transformer import TextTransformerModel
from tests.test_text_data import make, write_slice

torch.set_num_threads(1)


def test_counted_lstm_flops_are_seen():
    lstm = CountedBiLSTM(10, 8)
    x, mask = torch.randn(4, 6, 10), torch.ones(4, 6, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        lstm(x, mask)
    # Per direction: the input product (4*6 x 10 x 32) and one recurrent product per step (4 x 8 x 32).
    assert counter.get_total_flops() == 2 * 2 * (4 * 6 * 10 * 32 + 6 * 4 * 8 * 32)


@settings(max_examples=15, deadline=None)
@given(length=st.integers(1, 6), pad=st.integers(1, 4))
def test_counted_lstm_ignores_padding(length, pad):
    torch.manual_seed(0)
    lstm = CountedBiLSTM(3, 5)
    x = torch.randn(1, length, 3)
    padded = torch.cat([x, torch.randn(1, pad, 3)], dim=1)
    mask = torch.arange(length + pad).unsqueeze(0) < length
    torch.testing.assert_close(lstm(padded, mask), lstm(x, torch.ones(1, length, dtype=torch.bool)))


def _batch(dm):
    class _Trainer:
        world_size, global_rank, current_epoch = 1, 0, 0
        lightning_module = type("M", (), {"active_tasks": ("sentiment", "similarity", "analogy", "domain", "mlm")})

    dm.trainer = _Trainer()
    batch, _, _ = next(iter(dm.train_dataloader()))
    return batch


@pytest.mark.parametrize("kind", ["bilstm", "transformer"])
def test_every_task_loss_reaches_the_shared_features(tmp_path, kind):
    aux = ("similarity", "analogy") if kind == "bilstm" else ("domain", "mlm")
    dm = make(write_slice(tmp_path / "d"), aux_tasks=aux)
    cls = EmbeddingBiLSTMModel if kind == "bilstm" else TextTransformerModel
    model = cls(tasks=dm.task_specs, **dm.model_inputs, **({"embedding_dim": 16, "hidden": 8} if kind == "bilstm" else {"d_model": 16}))
    losses, features, logits = model.training_losses(_batch(dm))
    assert set(losses) == {"sentiment", *aux} and logits.shape == (8, 2)
    for task, loss in losses.items():
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, features, retain_graph=True)
        assert grad.abs().sum() > 0, task  # measured on the features, every task has a gradient there


def test_masked_tokens_are_real_tokens_only(tmp_path):
    dm = make(write_slice(tmp_path / "d"), aux_tasks=("mlm",))
    model = TextTransformerModel(tasks=dm.task_specs, **dm.model_inputs, d_model=16, mask_rate=0.3)
    tokens = dm.splits["train"].tensors["tokens"][:16]
    masked, chosen = model.mask_tokens(tokens)
    assert chosen.any() and (tokens[chosen] > 2).all()
    assert (masked[~chosen] == tokens[~chosen]).all()
    model.hparams.mask_rate = 1e-9  # nothing drawn: one token is still chosen, so the loss is defined
    assert model.mask_tokens(tokens)[1].sum() == 1
    model.hparams.mask_rate = 0.3
    first, again = (model.mask_tokens(tokens, torch.Generator().manual_seed(0)) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # a seeded generator: same masks


@pytest.mark.slow
def test_the_transformer_reports_its_auxiliary_heads_on_the_test_sentences(tmp_path):
    dm = make(write_slice(tmp_path / "d", per_domain=60), aux_tasks=("domain", "mlm"))
    model = TextTransformerModel(tasks=dm.task_specs, **dm.model_inputs, d_model=16)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[MT2STCallback("switch", switch_at=0.5)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    first, again = (trainer.test(model, datamodule=dm, verbose=False)[0] for _ in range(2))
    assert {"test/aux/domain_acc", "test/aux/mlm_loss", "test/aux/mlm_acc"} <= set(first)
    assert 0 <= first["test/aux/domain_acc"] <= 1 and 0 <= first["test/aux/mlm_acc"] <= 1
    assert first["test/aux/mlm_loss"] > 0
    assert first == again  # the test masks are seeded: two evaluations agree exactly


@pytest.mark.slow
def test_fit_through_a_switch_reports_the_embedding_metrics(tmp_path):
    dm = make(write_slice(tmp_path / "d", per_domain=60), aux_tasks=("similarity", "analogy"))
    model = EmbeddingBiLSTMModel(tasks=dm.task_specs, **dm.model_inputs, embedding_dim=16, hidden=8)
    trainer = pl.Trainer(
        max_epochs=2, callbacks=[MT2STCallback("switch", switch_at=0.5)], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    assert model.active_tasks == ("sentiment",)
    costs = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("stream/")}
    steps = trainer.global_step
    for stream in ("pairs", "analogies"):
        # Loaded up to the switch (and at most two batches more: Lightning fetches ahead), skipped after it.
        assert steps // 2 <= costs[f"stream/{stream}/batches"] <= steps // 2 + 2
        assert costs[f"stream/{stream}/batches"] + costs[f"stream/{stream}/skipped"] == steps
    result = {k: v for per_loader in trainer.test(model, datamodule=dm, verbose=False) for k, v in per_loader.items()}
    assert {"test/primary_metric", "test/aux/similarity_spearman", "test/aux/analogy_acc"} <= set(result)
    assert -1 <= result["test/aux/similarity_spearman"] <= 1


@pytest.mark.parametrize("kind", ["bilstm", "transformer"])
def test_task_gradients_on_the_features_can_be_compared(tmp_path, kind):
    """The features are the embedding table: every auxiliary task's gradient there overlaps the primary's (a
    nonzero cosine), which the conflict strategy needs; per-position features would give exactly 0 for the
    stream-fed tasks."""
    aux = ("similarity", "analogy") if kind == "bilstm" else ("domain", "mlm")
    dm = make(write_slice(tmp_path / "d"), aux_tasks=aux)
    cls = EmbeddingBiLSTMModel if kind == "bilstm" else TextTransformerModel
    model = cls(tasks=dm.task_specs, **dm.model_inputs, **({"embedding_dim": 16, "hidden": 8} if kind == "bilstm" else {"d_model": 16}))
    losses, features, _ = model.training_losses(_batch(dm))
    assert features is model.embedding.weight
    grads = {t: torch.autograd.grad(loss, features, retain_graph=True)[0].flatten() for t, loss in losses.items()}
    for task in aux:
        assert torch.nn.functional.cosine_similarity(grads["sentiment"], grads[task], dim=0).abs() > 1e-4, task
