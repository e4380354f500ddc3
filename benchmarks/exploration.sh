#!/usr/bin/env bash
# Does exploration close the gap to dense? DST-EE against static, SET and RigL on
# Fashion-MNIST LeNet-300-100 (ERK, 3 seeds), then longer training at 90 %.
#
#   bash benchmarks/exploration.sh sweep         # part 1: 90/95/98 %, 10 epochs (~20 min)
#   bash benchmarks/exploration.sh long C        # part 2: 90 %, 3x and 5x the epochs, DST-EE at c=C
#   bash benchmarks/exploration.sh cosine C      # part 2 again at 1x and 5x, lr cosine-decayed to 0
#   bash benchmarks/exploration.sh gse           # GSE's three samplings at 90/95/98 % (~10 min)
#   bash benchmarks/exploration.sh report        # tables and plots into benchmarks/results/exploration
#
# RUNS (default runs/exploration) holds the run directories; every command resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${RUNS:-runs/exploration}
py=${PYTHON:-.venv/bin/python}
config=experiments/configs/fashion_mnist.py

case "${1:-}" in
  sweep)
    for s in 0.9 0.95 0.98; do
      methods=static,set,rigl
      [ "$s" = 0.9 ] && methods=dense,$methods
      "$py" -m experiments.train --config=$config --methods=$methods --seeds=0,1,2 \
          --config.sparse.sparsity=$s --workdir="$runs/sparsity$s"
      for c in 1e-3 1e-2 1e-1; do
        "$py" -m experiments.train --config=$config:dst_ee --seeds=0,1,2 \
            --config.sparse.sparsity=$s --config.sparse.c=$c --workdir="$runs/sparsity$s/dst_ee_c$c"
      done
    done ;;
  long)
    c=${2:?usage: exploration.sh long C}
    for e in 30 50; do
      "$py" -m experiments.train --config=$config --methods=dense,rigl --seeds=0,1,2 \
          --config.num_epochs=$e --workdir="$runs/epochs$e"
      "$py" -m experiments.train --config=$config:dst_ee --seeds=0,1,2 --config.num_epochs=$e \
          --config.sparse.c="$c" --workdir="$runs/epochs$e/dst_ee_c$c"
    done ;;
  cosine)
    c=${2:?usage: exploration.sh cosine C}
    for e in 10 50; do
      "$py" -m experiments.train --config=$config --methods=dense,rigl --seeds=0,1,2 \
          --config.num_epochs=$e --config.optimizer.schedule=cosine --workdir="$runs/cosine$e"
      "$py" -m experiments.train --config=$config:dst_ee --seeds=0,1,2 --config.num_epochs=$e \
          --config.optimizer.schedule=cosine --config.sparse.c="$c" \
          --workdir="$runs/cosine$e/dst_ee_c$c"
    done ;;
  gse)
    for s in 0.9 0.95 0.98; do
      for sampling in uniform grabo graest; do
        "$py" -m experiments.train --config=$config:gse --seeds=0,1,2 \
            --config.sparse.sparsity=$s --config.sparse.sampling=$sampling \
            --workdir="$runs/sparsity$s/gse_$sampling"
      done
    done ;;
  report)  # every plot into RUNS/report; the table and the two summary plots are kept
    "$py" -m experiments.report "$runs" --out="$runs/report"
    mkdir -p benchmarks/results/exploration
    cp "$runs"/report/{report.md,accuracy_vs_sparsity.png,accuracy_vs_coverage.png} \
        benchmarks/results/exploration/ ;;
  *)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
