#!/usr/bin/env bash
# Every number in docs/results.md comes from these commands (run from the repository root after
# `make test` or `make demo` created .venv). Runs are recorded under results/ and reused when
# rerun with the same settings. Data: ../shared/datasets (or set DECONFLICT_DATA).
# Time on 2 CPU cores: about 2 hours of runs (toy2d 11 min, xor-and 41 min, digits 20 min, multi-mnist
# and Census-income the rest). Census-income runs 30 epochs here, not the paper's 200: one
# 200-epoch run takes 5-8 minutes on this machine, so the paper's protocol (all methods, 10 runs,
# the alpha sweep) would take about a day; the commands for it are at the end, commented out.
set -euo pipefail
cd "$(dirname "$0")/.."
D=.venv/bin/deconflict
DATA=${DECONFLICT_DATA:-../shared/datasets}
ALL=sum,mean,mgda,pcgrad,cagrad,cagrad_fast,imtl_g,tensioner,gradvac,graddrop,upgrad,dualproj
ALL=$ALL,aligned_mtl,nash_mtl,uw,dwa,rlw,famo,db_mtl,imtl_l,gradnorm
ALL=$ALL,gradops:alpha=-5,gradops:alpha=-2,gradops,gradops:alpha=2
TENSIONER=mean,mgda,tensioner:tension=false,tensioner:base=min_norm,tensioner

# 2-D toy problem, every method (deterministic: one seed)
$D compare toy2d --methods "$ALL" --quiet

# XOR / AND, the tensioner paper's Tables 1 (c = 1) and 2 (c = 10), 50 seeds
$D compare xor-and --methods "$TENSIONER,pcgrad,gradops,gradops:alpha=-2" --seeds 50 \
    --set scale=1 --name compare_c1 --quiet
$D compare xor-and --methods "$TENSIONER,pcgrad,gradops,gradops:alpha=-2" --seeds 50 \
    --set scale=10 --name compare_c10 --quiet

# Digits (scikit-learn), classification + reconstruction and both-classification, 5 seeds
$D compare digits --methods "$TENSIONER,pcgrad,cagrad,imtl_g,nash_mtl,upgrad,gradops,gradops:alpha=-2" \
    --seeds 5 --quiet
# (the both-classification variant, not in results.md yet:)
# $D compare digits --methods "$TENSIONER,pcgrad,cagrad,imtl_g,nash_mtl,upgrad,gradops,gradops:alpha=-2" \
#     --seeds 5 --set variant=classify_both --name compare_both --quiet

# Multi-MNIST from the idx files (test set split 80/10/10), 1 seed
$D compare multi-mnist --methods "$TENSIONER,gradops,gradops:alpha=-2" --seeds 1 --data "$DATA" \
    --quiet

# Census-income, GradOPS's network and optimizer, 30 epochs, 1 seed: core methods, alpha sweep
$D compare census-income --methods sum,mgda,pcgrad,cagrad,imtl_g,tensioner,gradnorm,gradops:alpha=-3 \
    --seeds 1 --set epochs=30 --data "$DATA" --quiet
$D sweep census-income --method gradops --alpha=-5:5:6 --seeds 1 --set epochs=30 --data "$DATA" \
    --pair auc_income,auc_marital --quiet

# The paper's protocol (200 epochs), the static-weight grid of its Appendix C.3 and the MMoE model:
# $D compare census-income --methods sum,mgda,pcgrad,cagrad,imtl_g,tensioner,gradnorm,gradops:alpha=-3 \
#     --seeds 3 --data "$DATA" --quiet
# $D sweep census-income --method gradops --alpha -5:5:11 --seeds 3 --data "$DATA" \
#     --pair auc_income,auc_marital --quiet
# $D sweep census-income --method sum --weights simplex:6 --seeds 3 --data "$DATA" \
#     --pair auc_income,auc_marital --quiet
# $D compare census-income --methods sum,gradops:alpha=-3 --seeds 1 --set model=mmoe \
#     --data "$DATA" --name compare_mmoe --quiet

# CAGrad's toy at the paper's protocol (five starts, 100,000 Adam steps, c in {0, 0.2, 0.5, 0.8,
# 10}, MGDA) and why c = 10 behaves like MGDA here (about 30 CPU-minutes; docs/results.md §1):
bash docs/reproduce_cagrad_toy.sh
