"""SentimentTextDataModule on a generated slice in the format of vaderSentiment's rated sentences (no install
needed), and on the real files when experiments/setup_data.sh installed them."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from mt2st_lightning.examples.data.streams import AuxiliaryStream
from mt2st_lightning.examples.data.text import DOMAINS, SentimentTextDataModule, data_dir, load_analogies, tokenize

POSITIVE, NEGATIVE = ["good", "great", "fine", "happy"], ["bad", "awful", "poor", "sad"]
NOUNS = ["movie", "phone", "city", "day", "cat", "dog", "king", "queen", "man", "woman"]


def write_slice(root: Path, per_domain: int = 40, seed: int = 0) -> Path:
    """Four *_GroundTruth.txt files (id, mean rating, sentence), as in hutto_ICWSM_2014, plus pair and
    analogy files; returns the folder."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for stem in DOMAINS:
        lines = []
        for i in range(per_domain):
            positive = rng.random() < 0.5
            word = rng.choice(POSITIVE if positive else NEGATIVE)
            score = rng.uniform(0.5, 3.5) * (1 if positive else -1)
            lines.append(f"{i}\t{score:.3f}\tThe {rng.choice(NOUNS)} was {word}, said the {rng.choice(NOUNS)}.")
        lines.append(f"{per_domain}\t0\tA neutral {rng.choice(NOUNS)}.")  # rated exactly 0: left out
        (root / f"{stem}_GroundTruth.txt").write_text("\r\n".join(lines) + "\r\n")
    pairs = ["# Word 1\tWord 2\tHuman (mean)", "good\tgreat\t9.0", "bad\tawful\t8.5", "good\tbad\t1.0",
             "cat\tdog\t7.0", "king\tqueen\t8.0", "man\twoman\t8.2", "day\tcity\t1.5", "happy\tsad\t1.2",
             "phone\tmovie\t2.0", "fine\tpoor\t1.1", "zebra\tgood\t3.0"]  # zebra: not in the vocabulary
    (root / "pairs.tsv").write_text("\n".join(pairs) + "\n")
    analogies = [": family", "king queen man woman", "man woman king queen", "cat dog king queen",
                 ": gram1-adjective", "good great bad awful", "bad awful good great", "happy sad good bad",
                 "good bad zebra horse"]
    (root / "analogies.txt").write_text("\n".join(analogies) + "\n")
    return root


def make(root: Path, **kwargs) -> SentimentTextDataModule:
    kwargs.setdefault("aux_tasks", ("similarity", "analogy", "domain", "mlm"))
    return SentimentTextDataModule(
        root=str(root), similarity_files=[str(root / "pairs.tsv")], analogy_file=str(root / "analogies.txt"),
        batch_size=8, aux_batch_size=4, max_len=12, min_count=1, heldout_fraction=0.3, **kwargs,
    )


def test_splits_vocabulary_and_tasks(tmp_path):
    dm = make(write_slice(tmp_path / "d"))
    specs = dm.task_specs
    assert specs["sentiment"] == {"kind": "classification", "out_features": 2}
    assert specs["domain"]["out_features"] == 4 and specs["similarity"]["kind"] == "regression"
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 4 * 40  # the zero-rated sentences are left out
    assert dm.vocab[:3] == ["<pad>", "<unk>", "<mask>"]
    tokens = dm.splits["train"].tensors["tokens"]
    assert tokens.shape[1] == 12 and (tokens[:, 0] != 0).all()
    # Pairs and analogies: only those inside the vocabulary, split into training and held-out parts.
    assert len(dm.pairs["train"]) + len(dm.pairs["heldout"]) == 10
    assert len(dm.analogies["train"]) + len(dm.analogies["heldout"]) == 6
    semantic = torch.cat([dm.analogies[k].tensors["semantic"] for k in ("train", "heldout")])
    assert semantic.sum() == 3
    assert dm.model_inputs == {"vocab_size": len(dm.vocab), "max_len": 12, "embedding_init": None}


def test_vocabulary_comes_from_the_training_split_only(tmp_path):
    root = write_slice(tmp_path / "d")
    path = root / "tweets_GroundTruth.txt"
    path.write_text(path.read_text() + "999\t2.0\tquixotic\r\n")
    dm = make(root, aux_tasks=())
    dm.setup()
    in_train = any(dm.vocab[i] == "quixotic" for i in dm.splits["train"].tensors["tokens"].flatten().tolist())
    assert ("quixotic" in dm.vocab) == in_train


def test_training_batches_carry_every_stream(tmp_path):
    dm = make(write_slice(tmp_path / "d"))
    dm.setup("fit")

    class _Trainer:  # what the streams read from the trainer
        world_size, global_rank, current_epoch = 1, 0, 0
        lightning_module = type("M", (), {"active_tasks": ("sentiment", "similarity", "analogy", "domain", "mlm")})

    dm.trainer = _Trainer()
    loader = dm.train_dataloader()
    assert set(loader.iterables) == {"primary", "sentences", "pairs", "analogies"}
    assert all(isinstance(loader.iterables[k], AuxiliaryStream) for k in ("sentences", "pairs", "analogies"))
    batch, _, _ = next(iter(loader))
    assert batch["primary"]["tokens"].shape == (8, 12) and set(batch["primary"]) == {"tokens", "sentiment", "domain"}
    assert set(batch["pairs"]) == {"a", "b", "score"} and batch["pairs"]["score"].max() <= 1
    assert set(batch["analogies"]) == {"a", "b", "c", "d", "semantic"}
    val = dm.val_dataloader()
    assert len(val) == 3  # sentences, held-out pairs, held-out analogies


def test_bad_input_tells_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="setup_data.sh"):
        SentimentTextDataModule(root=str(tmp_path / "missing")).task_specs
    with pytest.raises(ValueError, match="GloVe"):
        SentimentTextDataModule(embedding_init="glove")
    with pytest.raises(ValueError, match="unknown auxiliary task"):
        SentimentTextDataModule(aux_tasks=("paraphrase",))
    root = write_slice(tmp_path / "d")
    (root / "pairs.tsv").write_text("zebra\thorse\t5.0\n")
    with pytest.raises(ValueError, match="lower min_count"):
        make(root, aux_tasks=("similarity",)).setup()


def test_tokenize_and_analogy_sections(tmp_path):
    assert tokenize("It's GREAT!! 10/10 :)") == ["it's", "great", "!", "!", "10", "/", "10", ":", ")"]
    path = tmp_path / "q.txt"
    path.write_text(": capital-common-countries\nAthens Greece Baghdad Iraq\n: gram2-opposite\nacceptable unacceptable aware unaware\n")
    assert load_analogies(path) == [("athens", "greece", "baghdad", "iraq", True), ("acceptable", "unacceptable", "aware", "unaware", False)]


def test_gensim_vectors_are_cached_and_fill_the_embedding(tmp_path, monkeypatch):
    pytest.importorskip("gensim", reason="needs gensim: bash experiments/setup_data.sh (or pip install 'mt2st-lightning[text]')")
    monkeypatch.setenv("MT2ST_DATA_DIR", str(tmp_path / "cache"))
    root = write_slice(tmp_path / "d")
    dm = make(root, aux_tasks=(), embedding_init="cbow", embedding_dim=8, vector_epochs=2)
    path = Path(dm.model_inputs["embedding_init"])
    assert path.parent == tmp_path / "cache" / "vectors" and path.is_file()
    import numpy as np

    vectors = np.load(path)
    assert vectors.shape == (len(dm.vocab), 8)
    assert (vectors[:3] == 0).all() and (np.abs(vectors[3:]).sum(1) > 0).all()
    mtime = path.stat().st_mtime_ns
    assert make(root, aux_tasks=(), embedding_init="cbow", embedding_dim=8, vector_epochs=2).model_inputs["embedding_init"] == str(path)
    assert path.stat().st_mtime_ns == mtime  # read from the cache, not trained again


REAL = data_dir() / "hutto_ICWSM_2014"


@pytest.mark.skipif(not (REAL / "tweets_GroundTruth.txt").is_file(),
                    reason=f"the rated sentences are not installed in {REAL}: bash experiments/setup_data.sh")
def test_real_rated_sentences():
    pytest.importorskip("gensim", reason="needs gensim: bash experiments/setup_data.sh")
    dm = SentimentTextDataModule(aux_tasks=("similarity", "analogy"))
    dm.setup()
    total = sum(len(s) for s in dm.splits.values())
    assert 23_000 < total < 23_700  # 23,699 rated sentences, a few rated exactly 0 left out
    assert 500 < len(dm.pairs["train"]) and 1000 < len(dm.analogies["train"])


def test_stream_counters_travel_in_the_data_module_state(tmp_path):
    root = write_slice(tmp_path / "d")

    class _Trainer:
        world_size, global_rank, current_epoch = 1, 0, 0
        lightning_module = type("M", (), {"active_tasks": ("sentiment", "similarity")})

    dm = make(root, aux_tasks=("similarity",))
    dm.setup("fit")
    dm.trainer = _Trainer()
    it = iter(dm.train_dataloader())
    for _ in range(3):
        next(it)
    state = dm.state_dict()
    assert state["stream_counters"]["pairs"]["batches_loaded"] == 3
    resumed = make(root, aux_tasks=("similarity",))
    resumed.load_state_dict(state)
    resumed.setup("fit")
    resumed.trainer = _Trainer()
    assert resumed.train_dataloader().iterables["pairs"].batches_loaded == 3
