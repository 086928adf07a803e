"""experiment=paper_embeddings and experiment=paper_transformer: one batch (trainer.fast_dev_run) each, from a
fresh output folder, with the setting's adaptive row kept on (switch_at=null), so that every auxiliary stream
and the measuring step run through the app. Skipped when the data is not installed."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from mt2st_lightning.examples.data.text import data_dir
from mt2st_lightning.app.train import CONFIG_DIR
from tests.test_app import fast_dev_run

SENTENCES = data_dir() / "hutto_ICWSM_2014" / "tweets_GroundTruth.txt"
INSTALL = "bash experiments/setup_data.sh"


@pytest.mark.slow
@pytest.mark.skipif(not SENTENCES.is_file(), reason=f"the rated sentences are not installed ({SENTENCES}): {INSTALL}")
@pytest.mark.parametrize(
    ("preset", "adaptive", "aux"),
    [("paper_embeddings", "gradnorm", ["similarity", "analogy"]), ("paper_transformer", "fisher", ["domain", "mlm"])],
)
def test_preset_runs_one_batch_from_a_fresh_folder(tmp_path, preset, adaptive, aux):
    pytest.importorskip("gensim", reason=f"needs gensim: {INSTALL}")
    out = tmp_path / "run"
    summary = fast_dev_run(out, f"experiment={preset}", f"strategy={adaptive}", "strategy.switch_at=null")
    assert summary["strategy"] == adaptive and summary["auxiliary_tasks"] == aux
    assert summary["total_steps"] == 1 and summary["train_flops"] > 0
    (phase,) = summary["phases"]
    assert phase.startswith("+".join(["sentiment", *aux]))
    assert 0 <= summary["test_primary_metric"] <= 1
    if preset == "paper_embeddings":
        assert {"test/aux/similarity_spearman", "test/aux/analogy_acc"} <= set(summary["test_metrics"])
        streams = ("pairs", "analogies")
    else:
        assert {"test/aux/domain_acc", "test/aux/mlm_loss", "test/aux/mlm_acc"} <= set(summary["test_metrics"])
        streams = ("sentences",)
    # What each auxiliary stream loaded in its one step (Lightning may fetch one batch ahead).
    for stream in streams:
        assert 1 <= summary["stream_costs"][f"stream/{stream}/batches"] <= 2, summary["stream_costs"]
    assert json.loads((out / "run_summary.json").read_text())["strategy"] == adaptive


@pytest.mark.parametrize("preset", ["paper_embeddings", "paper_transformer", "paper_embeddings_gpu", "paper_transformer_gpu"])
def test_presets_compose_with_their_sweep(preset):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"], return_hydra_config=True)
    adaptive = "gradnorm" if "embeddings" in preset else "fisher"
    assert cfg.hydra.sweeper.params.strategy == f"stl,mtl,diminish,switch,{adaptive},plateau,conflict"
    assert cfg.hydra.sweeper.params.seed == "0,1,2"
    assert cfg.data._target_ == "mt2st_lightning.examples.data.text.SentimentTextDataModule"
    if preset.endswith("_gpu"):
        assert cfg.trainer.accelerator == "gpu" and cfg.data.limit is None
    else:
        assert cfg.data.limit == 4000 and cfg.trainer.max_epochs == 8
