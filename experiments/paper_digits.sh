#!/usr/bin/env bash
# The paper-style table on digits: STL, MTL, Diminish, Switch x seeds 0, 1, 2 (12 runs in one process).
# Prints the machine, the sweep's summary table and the wall time; extra arguments are Hydra overrides.
#   experiments/paper_digits.sh                      # as in results.md
#   experiments/paper_digits.sh trainer.max_epochs=50
set -euo pipefail
echo "nproc: $(nproc)"
lscpu | grep "Model name" || true
start=$(date +%s.%N)
mt2st-train --multirun experiment=paper_digits "$@"
echo "wall time: $(echo "$(date +%s.%N) - $start" | bc) s"
