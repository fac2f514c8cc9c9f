#!/usr/bin/env bash
# The CAGrad toy question (issue 17, item 4): does CAGrad with c = 10 behave like MGDA on the
# 2-D problem of the CAGrad paper (Section 5.1, Figure 3), and if not, why?
#
# Runs, from the paper's five start points, for STEPS steps (default 100,000, the paper's):
#   Adam, lr 1e-3 (the paper's optimizer):  CAGrad c in {0, 0.2, 0.5, 0.8, 10} and MGDA (the
#     library's toy2d.optimize, the code path of `deconflict run toy2d`), CAGrad c = 10 with
#     degenerate="official", and the CAGrad authors' own two-task update (their toy code's
#     formula: bounded scalar search over the simplex, +1e-4 regularizers, division by 1 + c);
#   plain gradient descent, lr 1e-3:        CAGrad c = 10, MGDA and the authors' update at
#     c = 10 (Adam's per-coordinate scaling removed).
# Prints a Markdown table (final point per start, distance to the Pareto set, mean loss, the
# distance travelled along the Pareto set after reaching it, and for CAGrad how many of the
# points recorded after reaching it are its degenerate case) and draws
#   docs/img/cagrad_toy_c.png         Adam, one panel per c and MGDA (the paper's Figure 3)
#   docs/img/cagrad_toy_c10.png       c = 10 variants: degenerate case, authors' code, plain GD
# Optional: OLD_COMMIT=<commit> also runs Adam c = 10 with the library as of that commit
# (`git archive`, read only), e.g. the commit whose solver the issue's observation came from.
#
# Environment: STEPS (100000), WORKERS (2 processes), OUT (results/cagrad_toy: trajectories,
# reused when present; delete to recompute), IMG (docs/img), PYTHON (.venv/bin/python).
# Cost: 1 to 5 CPU-minutes per configuration at 100,000 steps (5 trajectories), about 30
# CPU-minutes for the 12 (the old commit's one included).
#
# The Adam rows can also be read through the CLI (same code path; the metrics average the five
# final points):
#   deconflict compare toy2d --methods cagrad:c=0,cagrad:c=0.2,cagrad:c=0.5,cagrad:c=0.8,\
#   cagrad:c=10,cagrad:c=10:degenerate=official,mgda --set starts=paper --set steps=100000 --quiet
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-100000}
WORKERS=${WORKERS:-2}
OUT=${OUT:-results/cagrad_toy}
IMG=${IMG:-docs/img}
mkdir -p "$OUT/trajectories" "$IMG"

if [[ -n "${OLD_COMMIT:-}" ]]; then
  OLD_TREE=$(mktemp -d)
  git archive "$OLD_COMMIT" src | tar -x -C "$OLD_TREE"
  export OLD_TREE
fi

"$PYTHON" - "$STEPS" "$WORKERS" "$OUT" "$IMG" <<'PYTHON'
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

STEPS, WORKERS, OUT, IMG = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
RECORD = max(1, STEPS // 2000)  # recorded points per trajectory: about 2,000
LR = 1e-3
NEAR = 0.1  # "reached the Pareto set": within this distance of the segment

# (tag, optimizer, method, options): the methods by registry name, or the authors' formula.
CONFIGS = [
    *[(f"adam_cagrad_c{c:g}", "adam", "cagrad", {"c": c}) for c in (0.0, 0.2, 0.5, 0.8, 10.0)],
    ("adam_mgda", "adam", "mgda", {}),
    ("adam_cagrad_c10_official", "adam", "cagrad", {"c": 10.0, "degenerate": "official"}),
    ("adam_authors_c10", "adam", "authors", {"c": 10.0}),
    ("gd_cagrad_c10", "gd", "cagrad", {"c": 10.0}),
    ("gd_mgda", "gd", "mgda", {}),
    ("gd_authors_c10", "gd", "authors", {"c": 10.0}),
]


def authors_update(g1, g2, c):
    """The CAGrad authors' toy update for two tasks (their toy code, paper Algorithm 1): w =
    (x, 1 - x) minimizes c ||g0|| ||g_w|| + g_w . g0 by bounded scalar search, the norms carry
    +1e-4 under the square root (and lambda +1e-4 in its denominator), and the update is
    (g0 + lambda g_w) / (1 + c)."""
    from scipy.optimize import minimize_scalar

    g0 = (g1 + g2) / 2
    g11, g12, g22 = g1 @ g1, g1 @ g2, g2 @ g2
    coef = c * 0.5 * np.sqrt(g11 + g22 + 2 * g12 + 1e-4)

    def dual(x):
        return (coef * np.sqrt(x * x * (g11 + g22 - 2 * g12) + 2 * x * (g12 - g22) + g22 + 1e-4)
                + 0.5 * x * (g11 + g22 - 2 * g12) + (0.5 + x) * (g12 - g22) + g22)

    x = minimize_scalar(dual, bounds=(0, 1), method="bounded").x
    gw = x * g1 + (1 - x) * g2
    gw_norm = np.sqrt(x * x * g11 + (1 - x) ** 2 * g22 + 2 * x * (1 - x) * g12 + 1e-4)
    return (g0 + coef / (gw_norm + 1e-4) * gw) / (1 + c)


def trajectories(config):
    """(starts, recorded points, 2) for one configuration, cached under OUT."""
    tag, optimizer, name, options = config
    path = OUT / "trajectories" / f"{tag}_{STEPS}.npy"
    if path.is_file():
        return tag, np.load(path)
    import torch

    import deconflict
    from deconflict.experiments.toy2d import PAPER_START_POINTS, optimize, toy_problem

    starts = PAPER_START_POINTS
    if optimizer == "adam" and name != "authors":
        methods = [deconflict.get(name, **options) for _ in starts]
        points = optimize(methods, starts, STEPS, lr=LR, record_every=RECORD)
    else:
        theta = torch.tensor(starts, dtype=torch.float64, requires_grad=True)
        step_rule = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([theta], lr=LR)
        methods = [deconflict.get(name, **options) if name != "authors" else None
                   for _ in starts]
        recorded = [theta.detach().numpy().copy()]
        for step in range(1, STEPS + 1):
            _, J = toy_problem(theta.detach().numpy())
            if name == "authors":
                update = [authors_update(J[b, 0], J[b, 1], options["c"]) for b in range(len(J))]
            else:  # the update J^T c of the method's weights, as toy2d.optimize computes it
                gramians = J @ np.swapaxes(J, 1, 2)
                update = [m.weights(gramians[b]).numpy() @ J[b] for b, m in enumerate(methods)]
            theta.grad = torch.from_numpy(np.stack(update))
            step_rule.step()
            if step % RECORD == 0 or step == STEPS:
                recorded.append(theta.detach().numpy().copy())
        points = np.stack(recorded, axis=1)
    np.save(path, points)
    return tag, points


def old_commit_trajectories():
    """Adam c = 10 with the library of OLD_COMMIT (its own process: another deconflict)."""
    tree = os.environ["OLD_TREE"]
    path = OUT / "trajectories" / f"adam_cagrad_c10_old_{STEPS}.npy"
    if not path.is_file():
        code = ("import sys, numpy as np, deconflict\n"
                "from deconflict.experiments.toy2d import PAPER_START_POINTS, optimize\n"
                "m = [deconflict.get('cagrad', c=10.0) for _ in PAPER_START_POINTS]\n"
                f"np.save({str(path)!r}, optimize(m, PAPER_START_POINTS, {STEPS}, lr={LR}, "
                f"record_every={RECORD}))\n")
        subprocess.run([sys.executable, "-c", code], check=True,
                       env={**os.environ, "PYTHONPATH": f"{tree}/src"}, cwd="/")
    return "adam_cagrad_c10_old", np.load(path)


def along_after_reaching(points):
    """x1 distance travelled after first coming within NEAR of the Pareto set (None: never)."""
    from deconflict.experiments.toy2d import pareto_distance

    near = np.flatnonzero(pareto_distance(points) < NEAR)
    if near.size == 0:
        return None
    return float(np.abs(np.diff(points[near[0]:, 0])).sum())


def degenerate_share(points, c):
    """Of the points recorded after first coming within NEAR of the Pareto set, how many are
    CAGrad's degenerate case (the hull of the two gradients contains 0 to rounding: the
    ``stationary`` diagnostic), as "k/N" (None: never reached)."""
    import deconflict
    from deconflict.experiments.toy2d import pareto_distance, toy_problem

    near = np.flatnonzero(pareto_distance(points) < NEAR)
    if near.size == 0:
        return None
    _, J = toy_problem(points[near[0]:])
    method = deconflict.get("cagrad", c=c)
    hits = sum(bool(method.weights_with_diagnostics(G)[1]["stationary"])
               for G in J @ np.swapaxes(J, 1, 2))
    return f"{hits}/{len(J)}"


if __name__ == "__main__":
    from deconflict.experiments.plots import plot_toy_trajectories
    from deconflict.experiments.toy2d import pareto_distance, toy_problem

    with multiprocessing.Pool(WORKERS) as pool:
        results = dict(pool.map(trajectories, CONFIGS))
    if os.environ.get("OLD_TREE"):
        tag, points = old_commit_trajectories()
        results[tag] = points
    print(f"Steps: {STEPS:,}; lr {LR:g}; start points (-8.5, 7.5), (-8.5, -5), (0, 0), (9, 9), "
          "(10, -8); the average-loss optimum is (0, -8.3552).\n")
    print("| configuration | final points | distance to the Pareto set | mean loss | "
          "x1 travelled after reaching the set | degenerate steps after reaching it |")
    print("|---|---|---|---|---|---|")
    options = {tag: (name, opts) for tag, _, name, opts in CONFIGS}
    summary = {}
    for tag, points in results.items():
        final = points[:, -1]
        distance = pareto_distance(final)
        loss = toy_problem(final)[0].mean(axis=1)
        travelled = [along_after_reaching(p) for p in points]
        shown = ", ".join(f"({x:.2f}, {y:.2f})" for x, y in final)
        moved = ", ".join("-" if t is None else f"{t:.2g}" for t in travelled)
        name, opts = options.get(tag, ("", {}))
        shares = [degenerate_share(p, opts["c"]) for p in points] if name == "cagrad" else []
        degenerate = ", ".join("-" if k is None else k for k in shares) or "-"
        print(f"| {tag} | {shown} | mean {distance.mean():.3f} | mean {loss.mean():.3f} | "
              f"{moved} | {degenerate} |")
        summary[tag] = {"final": final.tolist(), "pareto_distance": distance.tolist(),
                        "mean_loss": loss.tolist(), "x1_travelled_after_reaching": travelled,
                        "degenerate_after_reaching": shares}
    (OUT / f"summary_{STEPS}.json").write_text(json.dumps(summary, indent=1) + "\n")
    panels = {f"CAGrad c = {c:g}": results[f"adam_cagrad_c{c:g}"] for c in (0, 0.2, 0.5, 0.8, 10)}
    panels["MGDA"] = results["adam_mgda"]
    plot_toy_trajectories(panels, IMG / "cagrad_toy_c.png", steps=STEPS, record_every=RECORD,
                          title=f"CAGrad over c and MGDA, Adam lr 1e-3, {STEPS:,} steps, the "
                          "CAGrad paper's five start points (its Figure 3)")
    variants = {"ours, c = 10, Adam": results["adam_cagrad_c10"],
                "ours, degenerate=official, Adam": results["adam_cagrad_c10_official"],
                "authors' update, c = 10, Adam": results["adam_authors_c10"],
                "ours, c = 10, plain GD": results["gd_cagrad_c10"],
                "authors' update, plain GD": results["gd_authors_c10"],
                "MGDA, plain GD": results["gd_mgda"]}
    if "adam_cagrad_c10_old" in results:
        variants[f"c = 10, library at {os.environ.get('OLD_COMMIT', 'old')[:7]}"] = \
            results["adam_cagrad_c10_old"]
    plot_toy_trajectories(variants, IMG / "cagrad_toy_c10.png", steps=STEPS,
                          record_every=RECORD, title=f"CAGrad c = 10, {STEPS:,} steps: "
                          "degenerate case, the authors' update, Adam or plain GD")
    print(f"\nwritten: {IMG / 'cagrad_toy_c.png'}, {IMG / 'cagrad_toy_c10.png'}, "
          f"{OUT / f'summary_{STEPS}.json'}")
PYTHON
