#!/usr/bin/env bash
# Every number and plot in docs/diagnostics.md comes from these commands (run from the repository
# root after `make test` or `make demo` created .venv). About 20 minutes on 2 CPU cores (digits
# 1 minute per command; Census-income the rest). Data for Census-income: ../shared/datasets (or
# set DECONFLICT_DATA). The plots shown in the page are copied to docs/img/.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/deconflict
DATA=${DECONFLICT_DATA:-../shared/datasets}

# Digits: where do the two tasks conflict, and under which method?
$D diagnose digits --method sum,pcgrad,gradops,gradops:alpha=-2,mgda --epochs 5 --quiet
# Recon: score with plain summation, branch the worst layer (then two), retrain 3 seeds.
$D recon digits --method sum --topk 1 --seeds 3 --quiet
$D recon digits --method gradops --topk 1 --seeds 3 --quiet
$D recon digits --method sum --topk 2 --seeds 3 --quiet

# Census-income (the UCI test file, split 50/25/25; 30 epochs instead of the paper's 200)
$D diagnose census-income --method sum,pcgrad,gradops,gradops:alpha=-3,mgda --epochs 5 \
    --data "$DATA" --quiet
$D recon census-income --method sum --topk 1 --seeds 3 --set epochs=30 --data "$DATA" --quiet

cp results/digits/diagnose/cosine_histograms.png docs/img/digits_cosine_histograms.png
cp results/digits/diagnose/sum/layer_heatmap.png docs/img/digits_sum_layer_heatmap.png
cp results/digits/recon/sum-top1-S-0.1/cosine_histograms.png docs/img/digits_recon_sum_cosines.png
