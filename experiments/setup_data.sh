#!/usr/bin/env bash
# Installs what issue 8's settings need, offline afterwards (nothing is downloaded at run time):
#   - Fashion-MNIST (vision, diffusion): Debian's dataset-fashion-mnist (apt-get);
#   - the text extra (gensim, vaderSentiment): pip install -e '.[text]';
#   - the human-rated sentences of vaderSentiment's SOURCE distribution (additional_resources/
#     hutto_ICWSM_2014.tar.gz, MIT licence; the wheel does not ship them), extracted to
#     $MT2ST_DATA_DIR/hutto_ICWSM_2014 ($MT2ST_DATA_DIR defaults to ~/.cache/mt2st), where
#     mt2st_lightning.examples.data.text finds them;
#   - gensim word vectors (CBOW, skip-gram, FastText) for the paper_embeddings presets, trained once on the
#     training sentences and cached in $MT2ST_DATA_DIR/vectors (the runs would train them on first use too).
# Word similarity (WordSim-353, SimLex-999) and analogies (questions-words.txt) come with gensim's test data.
#
#   bash experiments/setup_data.sh            # everything
#   SKIP_APT=1 bash experiments/setup_data.sh # no apt-get (text only)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR="${MT2ST_DATA_DIR:-$HOME/.cache/mt2st}"
mkdir -p "$DATA_DIR"

if [ -z "${SKIP_APT:-}" ]; then
  if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
    $SUDO apt-get update -qq  # a fresh machine has no package lists yet
    $SUDO apt-get install -y -qq dataset-fashion-mnist
  fi
fi

python -m pip install -e '.[text]'

if [ ! -f "$DATA_DIR/hutto_ICWSM_2014/tweets_GroundTruth.txt" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  python -m pip download --no-binary :all: --no-deps "vaderSentiment==3.3.2" -d "$work"
  tar -xzf "$work"/vaderSentiment-3.3.2.tar.gz -C "$work"
  tar -xzf "$work"/vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz -C "$DATA_DIR"
fi
echo "rated sentences: $DATA_DIR/hutto_ICWSM_2014"

# The word vectors of both embedding presets (CPU and GPU sizes), for all three initialisations.
MT2ST_DATA_DIR="$DATA_DIR" python - <<'PY'
from mt2st_lightning.examples.data.text import EMBEDDING_INITS, SentimentTextDataModule

for limit, max_len, dim in ((4000, 32, 50), (None, 48, 100)):  # paper_embeddings, paper_embeddings_gpu
    for init in EMBEDDING_INITS:
        dm = SentimentTextDataModule(aux_tasks=(), limit=limit, max_len=max_len, embedding_dim=dim, embedding_init=init)
        print(init, dm.model_inputs["embedding_init"])
PY
