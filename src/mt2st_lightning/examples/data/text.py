"""Sentiment of human-rated sentences, with auxiliary tasks that bring their own data.

The sentences are the ground truth of Hutto & Gilbert (ICWSM 2014), shipped in vaderSentiment's source
distribution (``additional_resources/hutto_ICWSM_2014.tar.gz``, MIT licence): 10,605 movie-review snippets,
3,708 Amazon review snippets, 5,190 New York Times editorial snippets and 4,200 tweets, each with the mean of
about 20 human sentiment ratings in [-4, 4]. ``experiments/setup_data.sh`` extracts them; the data module finds
them under ``root`` (default ``$MT2ST_DATA_DIR/hutto_ICWSM_2014``, ``$MT2ST_DATA_DIR`` defaulting to
``~/.cache/mt2st``).

Tasks (the primary task and the auxiliary tasks named in ``aux_tasks``):

- ``sentiment`` (primary): the sign of the mean rating (sentences rated exactly 0 are left out).
- ``domain``: the sentence's source (movie, amazon, nyt, tweet), from the primary batch.
- ``mlm``: masked-token prediction; a stream of its own over the training sentences (the model masks).
- ``similarity``: human word-similarity ratings, WordSim-353 and SimLex-999 (gensim's test data), scaled to
  [0, 1]; a stream of word pairs.
- ``analogy``: Google's ``questions-words.txt`` (gensim's test data); a stream of (a, b, c, d) questions.

Word pairs and analogies are kept where every word is in the vocabulary (the training sentences' words seen
``min_count`` times); ``heldout_fraction`` of them is held out: the model reports Spearman and analogy
accuracy there. Training batches come from :func:`~mt2st_lightning.examples.data.streams.combine_streams`; a dropped
task's stream stops loading.

``embedding_init`` (``cbow``, ``skipgram``, ``fasttext`` or ``null``) trains word vectors with gensim on the
training sentences, once (cached under ``$MT2ST_DATA_DIR/vectors``), and hands their file to the model
(:attr:`model_inputs`). GloVe cannot be trained by gensim nor downloaded here (no network at run time).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import CombinedLoader
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from mt2st_lightning.examples.data.image_tasks import DictDataset
from mt2st_lightning.examples.data.streams import AuxiliaryStream, combine_streams

__all__ = [
    "DOMAINS", "EMBEDDING_INITS", "TEXT_AUX_TASKS", "SentimentTextDataModule", "load_analogies", "load_rated_sentences",
    "load_word_pairs", "tokenize",
]

INSTALL_HINT = "bash experiments/setup_data.sh   (or: pip install 'mt2st-lightning[text]' and see that script)"
#: file stem -> domain name, in the order of the domain labels
DOMAINS = {"movieReviewSnippets": "movie", "amazonReviewSnippets": "amazon", "nytEditorialSnippets": "nyt", "tweets": "tweet"}
TEXT_AUX_TASKS = ("domain", "mlm", "similarity", "analogy")
EMBEDDING_INITS = ("cbow", "skipgram", "fasttext")
#: the stream each stream-fed auxiliary task draws from
STREAM_OF = {"mlm": "sentences", "similarity": "pairs", "analogy": "analogies"}
PAD, UNK, MASK = "<pad>", "<unk>", "<mask>"
SPECIALS = (PAD, UNK, MASK)
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?|[0-9]+|[^\sa-z0-9]")


def data_dir() -> Path:
    return Path(os.environ.get("MT2ST_DATA_DIR", "~/.cache/mt2st")).expanduser()


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with an inner apostrophe), numbers and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def load_rated_sentences(root: Path) -> list[tuple[str, float, int]]:
    """``(sentence, mean rating, domain index)`` from the four ``*_GroundTruth.txt`` files under ``root``."""
    rows = []
    for domain, stem in enumerate(DOMAINS):
        path = root / f"{stem}_GroundTruth.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the rated sentences of vaderSentiment's source distribution are not installed. "
                f"Run `{INSTALL_HINT}`, or point data.root (or $MT2ST_DATA_DIR) at the extracted hutto_ICWSM_2014 folder"
            )
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.strip().split("\t", 2)
            if len(parts) == 3 and parts[2].strip():
                rows.append((parts[2].strip(), float(parts[1]), domain))
    return rows


def _gensim_test_data(name: str) -> Path:
    try:
        from gensim.test.utils import datapath
    except ImportError as error:
        raise ImportError(f"the word-similarity and analogy tasks read gensim's test data; run `{INSTALL_HINT}`") from error
    return Path(datapath(name))


def load_word_pairs(paths: Sequence[Path]) -> list[tuple[str, str, float]]:
    """``(word, word, similarity in [0, 1])`` from tab-separated files rated 0..10 (WordSim-353, SimLex-999)."""
    pairs = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            parts = line.split("\t")
            if line.startswith("#") or len(parts) < 3:
                continue
            pairs.append((parts[0].lower(), parts[1].lower(), float(parts[2]) / 10.0))
    return pairs


def load_analogies(path: Path) -> list[tuple[str, str, str, str, bool]]:
    """``(a, b, c, d, semantic)`` from ``questions-words.txt``: a is to b as c is to d; the ``gram*`` sections
    are syntactic, the others semantic."""
    out, semantic = [], True
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith(":"):
            semantic = not line[1:].strip().startswith("gram")
            continue
        words = line.lower().split()
        if len(words) == 4:
            out.append((*words, semantic))  # type: ignore[arg-type]
    return out


def train_word_vectors(
    algorithm: str, sentences: list[list[str]], vocab: list[str], dim: int, epochs: int, seed: int, cache: Path
) -> Path:
    """Word vectors for ``vocab`` (``len(vocab) x dim``, float32 ``.npy``) trained by gensim on ``sentences``;
    cached by everything that determines them. Words gensim did not see get zeros (the specials)."""
    if algorithm not in EMBEDDING_INITS:
        raise ValueError(f"embedding_init must be one of {EMBEDDING_INITS} or null, got {algorithm!r}")
    key = hashlib.sha1(repr((algorithm, dim, epochs, seed, vocab, sentences)).encode()).hexdigest()[:16]
    path = cache / f"{algorithm}-d{dim}-e{epochs}-s{seed}-{key}.npy"
    if path.is_file():
        return path
    try:
        from gensim.models import FastText, Word2Vec
    except ImportError as error:
        raise ImportError(f"embedding_init={algorithm} trains vectors with gensim; run `{INSTALL_HINT}`") from error
    # One worker: gensim is deterministic for a seed only single-threaded.
    common = dict(sentences=sentences, vector_size=dim, window=5, min_count=1, workers=1, seed=seed, epochs=epochs)
    model = FastText(**common) if algorithm == "fasttext" else Word2Vec(sg=int(algorithm == "skipgram"), **common)
    vectors = np.zeros((len(vocab), dim), dtype=np.float32)
    for i, word in enumerate(vocab):
        if word in model.wv.key_to_index or algorithm == "fasttext":
            vectors[i] = model.wv[word]
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(partial, vectors)
    partial.replace(path)  # atomic: parallel runs of a sweep never read half a file
    return path


def _split(n: int, fractions: Sequence[float], seed: int) -> list[Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    cuts, start, parts = [int(n * f) for f in fractions], 0, []
    for cut in cuts:
        parts.append(order[start : start + cut])
        start += cut
    parts.append(order[start:])
    return parts


class SentimentTextDataModule(pl.LightningDataModule):
    """Binary sentiment of rated sentences (primary task ``sentiment``) with the auxiliary tasks ``aux_tasks``.

    Args:
        root: the extracted ``hutto_ICWSM_2014`` folder (``None``: ``$MT2ST_DATA_DIR/hutto_ICWSM_2014``).
        aux_tasks: any of ``domain``, ``mlm``, ``similarity``, ``analogy``.
        max_len: tokens per sentence (longer ones are cut, shorter ones padded).
        min_count: a word enters the vocabulary when it occurs this often in the training sentences.
        limit: keep this many sentences, drawn at random with ``split_seed`` (``None``: all).
        batch_size: sentences per primary batch; ``aux_batch_size``: items per auxiliary-stream batch.
        heldout_fraction: share of the in-vocabulary word pairs and analogies held out for evaluation.
        similarity_files, analogy_file: the word-pair and analogy files (``None``: gensim's WordSim-353 and
            SimLex-999, and ``questions-words.txt``).
        embedding_init, embedding_dim, vector_epochs, vector_seed: gensim vectors for the embedding (see the
            module's doc); the seed is fixed, not the run's, so that every strategy starts from the same vectors.
    """

    def __init__(
        self,
        root: str | None = None,
        aux_tasks: Sequence[str] = ("similarity", "analogy"),
        max_len: int = 48,
        min_count: int = 2,
        limit: int | None = None,
        batch_size: int = 64,
        aux_batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        heldout_fraction: float = 0.3,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        embedding_init: str | None = None,
        embedding_dim: int = 100,
        vector_epochs: int = 10,
        vector_seed: int = 0,
        num_workers: int = 0,
        label_task: str = "sentiment",
        similarity_files: Sequence[str] | None = None,
        analogy_file: str | None = None,
    ) -> None:
        super().__init__()
        unknown = [t for t in aux_tasks if t not in TEXT_AUX_TASKS]
        if unknown:
            raise ValueError(f"unknown auxiliary task(s) {unknown}; available: {list(TEXT_AUX_TASKS)}")
        if embedding_init is not None and embedding_init not in EMBEDDING_INITS:
            raise ValueError(
                f"embedding_init must be one of {EMBEDDING_INITS} or null, got {embedding_init!r} (GloVe cannot be "
                "trained by gensim nor downloaded here)"
            )
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError("val_fraction and test_fraction must be in (0, 1) and sum to less than 1")
        if not 0 < heldout_fraction < 1:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
        if label_task != "sentiment":
            raise ValueError(f"the primary task of this data module is 'sentiment', got label_task={label_task!r}")
        self.root = Path(root).expanduser() if root else data_dir() / "hutto_ICWSM_2014"
        self.aux_tasks = tuple(aux_tasks)
        self.label_task = label_task
        self.max_len, self.min_count, self.limit = max_len, min_count, limit
        self.batch_size, self.aux_batch_size = batch_size, aux_batch_size
        self.val_fraction, self.test_fraction, self.heldout_fraction = val_fraction, test_fraction, heldout_fraction
        self.split_seed, self.shuffle_seed, self.num_workers = split_seed, shuffle_seed, num_workers
        self.embedding_init, self.embedding_dim = embedding_init, embedding_dim
        self.vector_epochs, self.vector_seed = vector_epochs, vector_seed
        self.similarity_files = list(similarity_files) if similarity_files else None
        self.analogy_file = analogy_file
        self.vocab: list[str] = []
        self.splits: dict[str, DictDataset] = {}
        self.pairs: dict[str, DictDataset] = {}  # "train" / "heldout"
        self.analogies: dict[str, DictDataset] = {}
        self._prepared = False
        self._streams: dict[str, AuxiliaryStream] = {}
        self._stream_counters: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ what the app reads
    @property
    def task_specs(self) -> dict[str, dict[str, Any]]:
        self._prepare()
        specs = {self.label_task: {"kind": "classification", "out_features": 2}}
        shapes = {
            "domain": ("classification", len(DOMAINS)),
            "mlm": ("classification", len(self.vocab)),
            "similarity": ("regression", 1),
            "analogy": ("classification", len(self.vocab)),
        }
        for task in self.aux_tasks:
            kind, n = shapes[task]
            specs[task] = {"kind": kind, "out_features": n}
        return specs

    @property
    def model_inputs(self) -> dict[str, Any]:
        """What the model needs besides its tasks: the vocabulary size, the sentence length and the word-vector
        file (or ``None``). ``mt2st-train`` passes these to the model's constructor."""
        self._prepare()
        return {"vocab_size": len(self.vocab), "max_len": self.max_len, "embedding_init": self._vectors}

    # ------------------------------------------------------------------ loading
    def _prepare(self) -> None:
        if self._prepared:
            return
        rows = [r for r in load_rated_sentences(self.root) if r[1] != 0.0]
        if self.limit is not None:
            rows = random.Random(self.split_seed).sample(rows, min(self.limit, len(rows)))
        tokens = [tokenize(text) for text, _, _ in rows]
        val, test, train = _split(len(rows), (self.val_fraction, self.test_fraction), self.split_seed)
        counts = Counter(w for i in train.tolist() for w in tokens[i])
        self.vocab = [*SPECIALS, *sorted(w for w, c in counts.items() if c >= self.min_count)]
        index = {w: i for i, w in enumerate(self.vocab)}
        ids = torch.zeros(len(rows), self.max_len, dtype=torch.long)  # PAD is 0
        for i, words in enumerate(tokens):
            row = [index.get(w, 1) for w in words[: self.max_len]]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        sentiment = torch.tensor([int(score > 0) for _, score, _ in rows])
        domain = torch.tensor([d for _, _, d in rows])
        for name, idx in (("train", train), ("val", val), ("test", test)):
            self.splits[name] = DictDataset({"tokens": ids[idx], "sentiment": sentiment[idx], "domain": domain[idx]})
        if "similarity" in self.aux_tasks:
            files = self.similarity_files or [_gensim_test_data("wordsim353.tsv"), _gensim_test_data("simlex999.txt")]
            pairs = load_word_pairs([Path(f) for f in files])
            kept = [(index[a], index[b], s) for a, b, s in pairs if a in index and b in index]
            self.pairs = self._held_out(kept, ("a", "b", "score"), (torch.long, torch.long, torch.float32), "word pairs")
        if "analogy" in self.aux_tasks:
            questions = load_analogies(Path(self.analogy_file) if self.analogy_file else _gensim_test_data("questions-words.txt"))
            kept = [(*(index[w] for w in q[:4]), q[4]) for q in questions if all(w in index for w in q[:4])]
            self.analogies = self._held_out(
                kept, ("a", "b", "c", "d", "semantic"), (torch.long,) * 4 + (torch.bool,), "analogy questions"
            )
        train_sentences = [tokens[i] for i in train.tolist()]
        self._vectors = (
            str(train_word_vectors(
                self.embedding_init, train_sentences, self.vocab, self.embedding_dim, self.vector_epochs,
                self.vector_seed, data_dir() / "vectors",
            ))
            if self.embedding_init
            else None
        )
        self._prepared = True

    def _held_out(self, rows: list[tuple], names: tuple[str, ...], dtypes: tuple, what: str) -> dict[str, DictDataset]:
        if len(rows) < 4:
            raise ValueError(
                f"only {len(rows)} {what} have all their words in the vocabulary ({len(self.vocab)} words): lower "
                "min_count or raise limit, or leave the task out of aux_tasks"
            )
        heldout, train = _split(len(rows), (self.heldout_fraction,), self.split_seed)
        columns = [torch.tensor([r[k] for r in rows], dtype=dtype) for k, dtype in enumerate(dtypes)]
        return {
            "train": DictDataset({n: c[train] for n, c in zip(names, columns)}),
            "heldout": DictDataset({n: c[heldout] for n, c in zip(names, columns)}),
        }

    def setup(self, stage: str | None = None) -> None:
        self._prepare()

    # ------------------------------------------------------------------ loaders
    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _stream(self, dataset: DictDataset, tasks: tuple[str, ...]) -> AuxiliaryStream:
        trainer = self.trainer
        replicas, rank = self._replicas()
        return AuxiliaryStream(
            dataset, tasks, self.aux_batch_size,
            active_tasks=lambda: trainer.lightning_module.active_tasks, epoch=lambda: trainer.current_epoch,
            seed=self.shuffle_seed, num_replicas=replicas, rank=rank, num_workers=self.num_workers,
        )

    def train_dataloader(self) -> CombinedLoader:
        replicas, rank = self._replicas()
        train = self.splits["train"]
        primary = DataLoader(
            train, batch_size=self.batch_size, num_workers=self.num_workers,
            sampler=DistributedSampler(train, num_replicas=replicas, rank=rank, shuffle=True, seed=self.shuffle_seed),
        )
        sources = {"sentences": train, "pairs": self.pairs.get("train"), "analogies": self.analogies.get("train")}
        streams = {}
        for task in self.aux_tasks:
            if task in STREAM_OF:
                stream = streams[STREAM_OF[task]] = self._stream(sources[STREAM_OF[task]], (task,))
                if STREAM_OF[task] in self._stream_counters:  # a resumed run: what the streams had loaded so far
                    stream.load_state_dict(self._stream_counters[STREAM_OF[task]])
        self._streams = streams
        return combine_streams(primary, streams)

    # The streams' cost counters in checkpoints, so that a resumed run reports its whole loading cost (Lightning
    # restores a CombinedLoader's iterables itself only when it resumes mid-epoch).
    def state_dict(self) -> dict[str, Any]:
        return {"stream_counters": {name: stream.state_dict() for name, stream in self._streams.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._stream_counters = dict(state_dict.get("stream_counters", {}))

    def _eval(self, dataset: DictDataset) -> DataLoader:
        replicas, rank = self._replicas()
        sampler = UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=max(self.batch_size, 256), sampler=sampler, num_workers=self.num_workers)

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        """The split's sentences first; then the held-out word pairs and analogies, which the model scores
        from the embedding table alone (batches with ``score`` / ``d`` keys)."""
        loaders = [self._eval(self.splits[split])]
        loaders += [self._eval(d["heldout"]) for d in (self.pairs, self.analogies) if d]
        return loaders

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")
