#!/usr/bin/env bash
# Every number in docs/results.md comes from these commands (run from the repository root after
# `make test` or `make demo` created .venv). Runs are recorded under results/ and reused when
# rerun with the same settings. Data: ../shared/datasets (or set DECONFLICT_DATA).
# Time on 2 CPU cores: about 3 hours of runs (toy2d 11 min, xor-and 41 min, digits 20 min, the
# tensioner paper's protocol block about 75 min on a shared AMD EPYC (XOR/AND six-rate grid 30,
# digits five-rate grid 37, XOR/AND c = 1 grid the rest), multi-mnist and Census-income the rest). Census-income runs a reduced protocol, 20 epochs x 3 seeds, not the
# paper's 200 epochs x 10 runs (about 42 CPU-minutes here; the paper's protocol would take about
# a day on 2 cores): the commands for the full one are in its block, commented out.
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

# The tensioner paper's protocol (issue 17 item 3; docs/results.md sections 2-4): per method the
# best learning rate on the validation split, SGD with momentum. Reduced to what the shared 2-core
# machine ran in about an hour (AMD EPYC, 2026-12-02, loaded by three other jobs): XOR/AND at
# c = 10 over the paper's six rates with 2 seeds (paper: 50; 96 runs, 30 minutes); digits with
# SGD + patience 10 over the paper's five rates, 3 seeds (paper: 10), one pair per digit image
# (90 runs, about 37 minutes, most of it the single-task baseline and central + tension). The
# earlier runs kept in results.md (Intel Xeon, 2026-12-02): XOR/AND at c = 1 over the three
# largest rates (2 seeds), and digits at the one rate 0.1 (3 seeds; its runs are a subset of the
# five-rate grid's, so it costs nothing after it).
TUNED=mean,mgda,tensioner:tension=false,tensioner:base=min_norm,tensioner,pcgrad,gradops:alpha=-2
$D compare xor-and --methods "$TUNED" --seeds 2 --set scale=10 --grid lr=5e-5,1e-4,1e-3,5e-3,1e-2,5e-2 \
    --select converged,epochs --paired-with tensioner --name paper6_c10 --quiet
$D compare xor-and --methods "$TUNED" --seeds 2 --set scale=1 --grid lr=5e-3,1e-2,5e-2 \
    --select converged,epochs --paired-with tensioner --name tuned_c1 --quiet
SGD="--set optimizer=sgd --set patience=10 --set epochs=100 --set pairs_per_image=1"
$D compare digits --methods mean,mgda,tensioner:tension=false,tensioner:base=min_norm,tensioner \
    --seeds 3 $SGD --grid lr=0.1,0.05,0.01,5e-3,1e-3 --select accuracy_left,mse_right \
    --select-rule mean_rank --paired-with single_task --name tuned_sgd5 --quiet
$D compare digits --methods mean,mgda,tensioner:tension=false,tensioner:base=min_norm,tensioner \
    --seeds 3 $SGD --grid lr=0.1 --select accuracy_left,mse_right --select-rule mean_rank \
    --paired-with single_task --name tuned_sgd --quiet
# min-norm from initial weights drawn by the seed (the paper's "different seed value"):
$D compare xor-and --methods mgda --seeds 4 --set scale=10 --set init_seed=none --grid lr=1e-2,5e-2 \
    --select converged,epochs --no-baseline --name mgda_free_init_c10 --quiet
# Not run here (time): c = 1 over the six rates, and multi-mnist under SGD:
# $D compare xor-and --methods "$TUNED" --seeds 2 --set scale=1 --grid lr=5e-5,1e-4,1e-3,5e-3,1e-2,5e-2 \
#     --select converged,epochs --paired-with tensioner --name paper6_c1 --quiet
# The paper's full protocol (50 seeds and all six rates on XOR/AND, about 20 CPU-hours here;
# 10 seeds, five rates and no epoch cap on MNIST pairs, several CPU-hours more):
# for c in 10 1; do
#     $D compare xor-and --methods "$TUNED" --seeds 50 --set scale=$c \
#         --grid lr=5e-5,1e-4,1e-3,5e-3,1e-2,5e-2 --select converged,epochs \
#         --paired-with tensioner --name paper_c$c --quiet
# done
# $D compare digits --methods mean,mgda,tensioner:tension=false,tensioner:base=min_norm,tensioner \
#     --seeds 10 --set optimizer=sgd --set patience=10 --set epochs=1000 --set pairs_per_image=1 \
#     --grid lr=1e-3,5e-3,1e-2,5e-2,1e-1 --select accuracy_left,mse_right --select-rule mean_rank \
#     --paired-with single_task --name paper_sgd --quiet
# $D compare multi-mnist --methods mean,mgda,tensioner:tension=false,tensioner:base=min_norm,tensioner,gradops \
#     --seeds 10 --set optimizer=sgd --set patience=10 --set epochs=1000 \
#     --grid lr=1e-3,5e-3,1e-2,5e-2,1e-1 --select accuracy_left,mse_right --select-rule mean_rank \
#     --paired-with single_task --data "$DATA" --name paper_sgd --quiet

# Census-income (GradOPS Section 4.1 and Appendix C; docs/results.md section 5), reduced
# protocol: 20 epochs (paper: 200), seeds 0-2 (paper: 10 runs), our split of the test file.
# Table 1 with paired comparisons against uniform scaling (sum), and the MMoE variant:
CENSUS=sum,mgda,pcgrad,gradnorm,cagrad,imtl_g,gradops:alpha=0,gradops:alpha=-1,gradops:alpha=-2
CENSUS=$CENSUS,gradops:alpha=-3,gradops:alpha=2
$D compare census-income --methods "$CENSUS" --seeds 3 --set epochs=20 --data "$DATA" \
    --paired-with sum --quiet
# The same runs paired against GradOPS(-3), PCGrad, GradOPS(-1) and GradOPS(-2) (claims a-c):
for base in gradops:alpha=-3 pcgrad gradops:alpha=-1 gradops:alpha=-2; do
    $D compare census-income --methods "$CENSUS" --seeds 3 --set epochs=20 --data "$DATA" \
        --paired-with "$base" --name "compare_vs_${base//[:=]/_}" --quiet
done
# Seeds 3-4 for the four methods of claims a and b (5 seeds):
$D compare census-income --methods sum,pcgrad,gradops:alpha=0,gradops:alpha=-3 --seeds 5 \
    --set epochs=20 --data "$DATA" --paired-with sum --no-baseline --name compare_5seeds --quiet
$D compare census-income --methods sum,pcgrad,gradops:alpha=0,gradops:alpha=-3 --seeds 5 \
    --set epochs=20 --data "$DATA" --paired-with pcgrad --no-baseline --name compare_5seeds_vs_pcgrad \
    --quiet
# MMoE:
$D compare census-income --methods sum,gradops:alpha=-3 --seeds 3 --set epochs=20 --set model=mmoe \
    --data "$DATA" --paired-with sum --no-baseline --name compare_mmoe --quiet
# The average AUC (compare reports each task's), mean +- SE and paired:
STUDY=".venv/bin/python -m deconflict.experiments.census_study"
$STUDY averages --methods "single_task,$CENSUS" --seeds 3 --epochs 20 --data "$DATA" \
    --paired-with sum,gradops:alpha=-3 --name compare
$STUDY averages --methods sum,pcgrad,gradops:alpha=0,gradops:alpha=-3 --seeds 5 --epochs 20 \
    --data "$DATA" --paired-with sum,pcgrad,gradops:alpha=-3 --name compare_5seeds
$STUDY averages --methods sum,gradops:alpha=-3 --seeds 3 --epochs 20 --set model=mmoe \
    --data "$DATA" --paired-with sum --name compare_mmoe
# Figure 8: GradOPS-static over the 10-point grid of weights summing to 3, against GradOPS(-3):
$D sweep census-income --method gradops_static --weights simplex:6 --seeds 1 --set epochs=20 \
    --data "$DATA" --paired-with gradops:alpha=-3 --pair auc_income,auc_marital --quiet
# The two best grid points on seed 0, rerun on seeds 1-2 and paired with GradOPS(-3):
TOP2=gradops:alpha=-3,gradops_static:weights=1/0.5/1.5,gradops_static:weights=1.5/0.5/1
$D compare census-income --methods "$TOP2" --seeds 3 --set epochs=20 --data "$DATA" \
    --paired-with gradops:alpha=-3 --no-baseline --name compare_static_top2 --quiet
$STUDY averages --methods "$TOP2" --seeds 3 --epochs 20 --data "$DATA" \
    --paired-with gradops:alpha=-3 --name compare_static_top2
# Figures 6 and 7 (w_i traces, train/test gains over alpha) and Figure 8's plot and rank; writes
# results/census-income/alpha_study.md and docs/img/census_{weights_trace,alpha_gains,static_grid}.png:
$STUDY figures --alphas=-10,-7,-5,-3,-2,-1,0,1,2,3,5 --seed 0 --epochs 20 --data "$DATA" \
    --static-sweep results/census-income/sweep_gradops_static_weights.json

# Census-income at the paper's protocol (200 epochs, 10 runs; a grid of 91 static weight vectors
# for Figure 8, the paper's had 100; about a day on 2 cores). Add --out results/full to keep
# these runs apart:
# $D compare census-income --methods "$CENSUS" --seeds 10 --data "$DATA" --paired-with sum --quiet
# $D compare census-income --methods sum,gradops:alpha=-3 --seeds 10 --set model=mmoe \
#     --data "$DATA" --paired-with sum --no-baseline --name compare_mmoe --quiet
# $D sweep census-income --method gradops_static --weights simplex:15 --seeds 1 --data "$DATA" \
#     --paired-with gradops:alpha=-3 --pair auc_income,auc_marital --quiet
# .venv/bin/python -m deconflict.experiments.census_study figures --alphas=-10,-7,-5,-3,-2,-1,0,1,2,3,5 \
#     --seed 0 --data "$DATA" --img results/full-img \
#     --static-sweep results/census-income/sweep_gradops_static_weights.json

# CAGrad's toy at the paper's protocol (five starts, 100,000 Adam steps, c in {0, 0.2, 0.5, 0.8,
# 10}, MGDA) and why c = 10 behaves like MGDA here (about 30 CPU-minutes; docs/results.md §1):
bash docs/reproduce_cagrad_toy.sh

# Meta-World MT10/MT50 (docs/results.md §6; needs pip install 'deconflict[rl]'). The time per
# SAC update of each method (the paper's networks, no environment needed):
OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metaworld_update.py --threads 1 --repeats 5 --warmup 1
# A reduced-budget MT10 training (0.05% of the authors' 2M steps, 1 seed; about 10 CPU-minutes,
# 66 wall-minutes on the loaded machine; §6 says what it can and cannot show):
MW="--set steps=1000 --set warmup=200 --set episode_length=150 --set hidden=256 --set layers=2"
MW="$MW --set batch_size=64 --set eval_episodes=3"
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 $D compare mt10 --methods sum,pcgrad,cagrad:c=0.9,cagrad_fast:c=0.9:num_sampled=4,gradops \
    $MW --no-baseline --quiet
# The full protocol (the authors' run.sh: 2M steps, 10 seeds; a GPU and days), commented out:
# $D compare mt10 --methods sum,pcgrad,cagrad:c=0.9,cagrad_fast:c=0.9:num_sampled=4,gradops,famo,nash_mtl \
#     --seeds 10 --set steps=2000000 --set alpha=shared --no-baseline --device cuda --quiet
# $D compare mt50 --methods sum,pcgrad,cagrad,cagrad_fast:num_sampled=8,gradops,famo,nash_mtl \
#     --seeds 10 --set steps=2000000 --set alpha=shared --no-baseline --device cuda --quiet
