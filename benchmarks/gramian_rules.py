"""Gramian rules: the Linear rule's cost model against measured times, and float32 vs float64.

Part 1 (calibration of ``layer_gramians.choose_linear_rule``): for Linear-layer shapes of the
step benchmark's workloads (MLP: N = 256 rows, 512/1792 wide; Transformer: N = 2048 tokens,
256/768/1024 wide; and a few others) and R in {3, 10}, the time of the kernel rule (K = X X^T
in float64, <Delta_i, K Delta_j>, the update's GEMM) and of the Jacobian rule (the R weight
gradients as autograd forms them, one GEMM per row, their float64 Gramian and J^T r), measured
in interleaved rounds (``_harness.compare``), next to the rule the cost model picks.

Part 2 (accuracy): one Linear layer (N = 256, 512 -> 1792, T = 3) whose first two tasks are
nearly collinear (output gradients base and base + gap * noise): the relative error of the
Gramian and of |g_0 - g_1|^2 = M00 + M11 - 2 M01 (what a projection reads) for each rule and
for float32 products (a float32 Gramian of float32 weight gradients, as TorchJD's autogram
engine forms it; a float32 kernel trick), against the exact Gramian.

    .venv/bin/python benchmarks/gramian_rules.py             # about 2 minutes
"""

from __future__ import annotations

from typing import Any

import torch
from _harness import banner, compare, parser, save, setup, table
from torch import nn

from deconflict.layer_gramians import JacobianRule, KernelRule, choose_linear_rule

SHAPES = [(256, 512, 1792), (256, 1792, 1792), (256, 1792, 512), (64, 256, 256),
          (512, 256, 256), (1024, 512, 512), (2048, 256, 768), (2048, 256, 1024),
          (2048, 1024, 256), (128, 2048, 10)]


def rules(N: int, n_in: int, n_out: int, R: int) -> dict[str, Any]:
    torch.manual_seed(0)
    X, D = torch.randn(N, n_in), torch.randn(R, N, n_out)
    r = torch.rand(R, dtype=torch.float64)
    layer = nn.Linear(n_in, n_out)

    def kernel() -> None:
        rule = KernelRule("l", [layer.weight, layer.bias], ["l", "l"], module=layer, inputs=[X])
        rule.taken = [D]
        rule.gramian(R)
        rule.update(r)

    def jacobian() -> None:
        rule = JacobianRule("l", [layer.weight], ["l"])
        rule.taken = [[D[i].T @ X for i in range(R)]]  # autograd's per-row weight gradients
        rule.gramian(R)
        rule.update(r)

    return {"kernel": kernel, "jacobian": jacobian}


def accuracy() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    N, n_in, n_out, T = 256, 512, 1792, 3
    X, base = torch.randn(N, n_in), torch.randn(N, n_out)
    layer = nn.Linear(n_in, n_out)
    rows = []
    for gap in (1e-2, 1e-3, 1e-4):
        D = torch.stack([base, base + gap * torch.randn(N, n_out), torch.randn(N, n_out)])
        # Float32 values are exact in float64; G_i in float64 errs by ~1e-16 relatively.
        G64 = torch.stack([D[i].double().T @ X.double() for i in range(T)]).reshape(T, -1)
        exact = G64 @ G64.T
        kernel = KernelRule("l", [layer.weight], ["l"], module=layer, inputs=[X])
        kernel.taken = [D]
        G32 = [D[i].T @ X for i in range(T)]
        jacobian = JacobianRule("l", [layer.weight], ["l"])
        jacobian.taken = [G32]
        flat = torch.stack(G32).reshape(T, -1)
        K32 = X @ X.T
        variants = {
            "kernel rule (float64)": kernel.gramian(T).parts["l"],
            "Jacobian rule (float32 G, float64 sums)": jacobian.gramian(T).parts["l"],
            "float32 Gramian of float32 G": (flat @ flat.T).double(),
            "float32 kernel trick": torch.stack([torch.stack([(D[i] * (K32 @ D[j])).sum()
                                                              for j in range(T)])
                                                 for i in range(T)]).double(),
        }

        def distance(M: torch.Tensor) -> float:
            return float(M[0, 0] + M[1, 1] - 2 * M[0, 1])

        reference = distance(exact)
        for label, M in variants.items():
            rows.append({"gap": gap, "relative_distance": reference / float(exact[0, 0]),
                         "variant": label,
                         "gramian_error": float((M - exact).abs().max() / exact.abs().max()),
                         "distance_error": abs(distance(M) - reference) / abs(reference)})
    return rows


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    setup(args)
    timing = []
    for R in (3, 10):
        for N, n_in, n_out in SHAPES:
            medians = compare(rules(N, n_in, n_out, R), args.repeats, args.warmup)
            measured = min(medians, key=medians.__getitem__)
            timing.append({"R": R, "N": N, "n_in": n_in, "n_out": n_out,
                           "kernel_ms": medians["kernel"] * 1e3,
                           "jacobian_ms": medians["jacobian"] * 1e3, "faster": measured,
                           "ratio": medians["kernel"] / medians["jacobian"],
                           "model": choose_linear_rule(N, n_in, n_out, R, True)})
            print(f"R={R} N={N} {n_in}->{n_out}: done", flush=True)
    print(banner())
    print(table(timing, [("R", "R"), ("N", "N"), ("n_in", "n_in"), ("n_out", "n_out"),
                         ("kernel_ms", "kernel rule (ms)"), ("jacobian_ms", "Jacobian rule (ms)"),
                         ("ratio", "kernel / Jacobian"), ("faster", "measured faster"),
                         ("model", "model picks")]))
    errors = accuracy()
    print(table(errors, [("gap", "gap"), ("relative_distance", "|g0-g1|^2 / |g0|^2"),
                         ("variant", "variant"), ("gramian_error", "max |M - exact| / max |M|"),
                         ("distance_error", "|g0-g1|^2 relative error")]))
    print(f"written: {save('gramian_rules', args, timing, {'accuracy': errors})}")


if __name__ == "__main__":
    main()
