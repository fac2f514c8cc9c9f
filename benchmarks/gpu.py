"""GPU: the CUDA correctness checks, then the step benchmark against TorchJD on the GPU.

Exits with status 2 and the one-line message "no CUDA device: ..." when
``torch.cuda.is_available()`` is False (``--device cpu`` runs the same checks on the CPU: the
script's own test). On CUDA, in this order (at most 8 minutes on one GPU):

1. every engine mode (sequential, batched, gramian, features) on the MLP, CNN and Transformer
   workloads at toy size (``_workload.py``, ``small=True``), T = 3, UPGrad: the trunk's and
   the heads' ``.grad`` against a float64 CPU reference of the same model (per-task gradients
   by autograd, the weights from the float64 Gramian, J^T c), with TF32 off;
2. the forward pass under ``torch.autocast`` in float16 and bfloat16: finite ``.grad``, close
   to the float32 one;
3. the fused kernels (``deconflict.kernels.gramian_into``, ``combine_into``) on CUDA tensors
   against float64;
4. distributed exact mode over NCCL with 2 processes when there are >= 2 GPUs (otherwise
   skipped, with a message): the single-process update on the global batch;
5. ``step.py``'s benchmark (full sizes, T = 3 and 10, and T = 40) with
   ``torch.cuda.synchronize()`` after every step, so a step's time includes its kernels.

Tolerances (checks 1, 2, 4) are a posteriori bounds from the quantities of the same run, valid
on any IEEE machine: the update is J^T c, so its error against the reference J64^T c64 is
|(J - J64)^T c| + |J64^T (c - c64)| + the rounding of the combination itself, elementwise at
most  2 |dJ|^T |c| + |J64|^T |c - c64| + (u + T u64) |J|^T |c|  (+ 4 u |J|^T |c| under
autocast, where the combined backward pass rounds in the low precision). dJ is measured: the
per-task gradients of plain autograd on the device against the reference; the factor 2 covers
the mode's own evaluation of J (another summation order, with rounding errors of the same
bound); c are the weights the mode reported, u the unit roundoff of the computation's dtype.
A wrong layer rule or a lost scale is an error of the size of the update itself, far above.

    python benchmarks/gpu.py                 # on a machine with CUDA; exits 2 without it
    python benchmarks/gpu.py --checks-only   # the correctness checks, no benchmark
    python benchmarks/gpu.py --device cpu --small --repeats 1 --warmup 0   # the script's test
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

PARAMETER_MODES = ("sequential", "batched", "gramian")
ARCHITECTURES = ("mlp", "cnn", "transformer")
TASKS = 3
METHOD = "UPGrad"
U64 = torch.finfo(torch.float64).eps / 2


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


class CheckFailedError(AssertionError):
    """A correctness check did not hold."""


# ------------------------------------------------------------------------------ references
def per_task_gradients(work: Any) -> tuple[list[torch.Tensor], list[list[torch.Tensor]],
                                           torch.Tensor]:
    """Plain autograd: each task's trunk gradient flattened (rows of J), each task's head
    gradients, and the losses."""
    _, losses = work.forward()
    trunk = [p for p in work.trunk.parameters() if p.requires_grad]
    rows, heads = [], []
    for i, loss in enumerate(losses):
        head = list(work.heads[i].parameters())
        grads = torch.autograd.grad(loss, trunk + head, retain_graph=i < len(losses) - 1)
        rows.append(torch.cat([g.reshape(-1) for g in grads[:len(trunk)]]))
        heads.append([g.detach() for g in grads[len(trunk):]])
    return rows, heads, torch.stack([loss.detach() for loss in losses])


def reference(architecture: str, tasks: int = TASKS) -> dict[str, Any]:
    """The float64 CPU reference of the toy workload: J, the weights, the update."""
    from _workload import METHODS, workload

    import deconflict

    work = workload(tasks, architecture=architecture, small=True, dtype=torch.float64)
    rows, heads, losses = per_task_gradients(work)
    J = torch.stack(rows)
    name, options = METHODS[METHOD][0]
    c = deconflict.get(name, **options).weights(J @ J.T, losses=losses).to(torch.float64)
    return {"J": J, "c": c, "update": J.T @ c, "heads": heads}


def spread(error: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """|error| (... x parameters) with each parameter tensor's entries replaced by their max.

    The measured error of one float32 evaluation is a sample: another evaluation (the mode's
    own, in another summation order) has errors of the same size but elsewhere, so the bound
    uses each tensor's largest measured error for all of its entries (an element that happened
    to round exactly in the probe must not get a zero bound).
    """
    out = error.abs().clone()
    start = 0
    for p in module.parameters():
        if not p.requires_grad:
            continue
        part = out[..., start:start + p.numel()]
        part.copy_(part.amax(dim=-1, keepdim=True).expand_as(part))
        start += p.numel()
    return out


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def check_update(label: str, grad: torch.Tensor, c: torch.Tensor, J: torch.Tensor,
                 ref: dict[str, Any], u: float, trunk: torch.nn.Module,
                 extra_u: float = 0.0) -> float:
    """Assert the a posteriori bound of the module docstring; the worst ratio error / bound."""
    J64, c64 = ref["J"], ref["c"]
    J = J.detach().to("cpu", torch.float64)
    c = c.detach().to("cpu", torch.float64)
    grad = grad.detach().to("cpu", torch.float64)
    tasks = J.shape[0]
    bound = (2 * spread(J - J64, trunk).T @ c.abs() + J64.abs().T @ (c - c64).abs()
             + (u + tasks * U64 + extra_u) * J.abs().T @ c.abs())
    bound = bound + torch.finfo(torch.float64).tiny  # exact zeros stay exact
    error = (grad - ref["update"]).abs()
    worst = float((error / bound).max())
    if not torch.isfinite(grad).all():
        raise CheckFailedError(f"{label}: non-finite .grad")
    if worst > 1.0:
        index = int((error / bound).argmax())
        raise CheckFailedError(f"{label}: .grad[{index}] off by {float(error[index]):.3g}, "
                               f"bound {float(bound[index]):.3g} (reference "
                               f"{float(ref['update'][index]):.3g})")
    return worst


def check_heads(label: str, work: Any, ref_heads: list[list[torch.Tensor]],
                dev_heads: list[list[torch.Tensor]], u: float) -> None:
    """Each head's .grad is its own task's gradient (the heads get that of sum_i L_i)."""
    for i, (head, reference_grads, device_grads) in enumerate(
            zip(work.heads, ref_heads, dev_heads, strict=True)):
        for p, r, d in zip(head.parameters(), reference_grads, device_grads, strict=True):
            got, r64, d64 = (t.detach().to("cpu", torch.float64) for t in (p.grad, r, d))
            bound = 2 * (d64 - r64).abs() + u * d64.abs() + torch.finfo(torch.float64).tiny
            if not bool(((got - r64).abs() <= bound).all()):
                raise CheckFailedError(f"{label}: head {i} .grad off by "
                                  f"{float((got - r64).abs().max()):.3g}")


# ---------------------------------------------------------------------------------- checks
def _ok(line: str) -> str:
    print(f"  {line}", flush=True)
    return line


def check_modes(device: str) -> list[str]:
    """Check 1: every mode on every toy workload against the float64 CPU reference."""
    from _workload import METHODS, workload

    import deconflict

    lines = []
    name, options = METHODS[METHOD][0]
    u = unit_roundoff(torch.float32)
    for architecture in ARCHITECTURES:
        ref = reference(architecture)
        probe = workload(TASKS, architecture=architecture, small=True, device=device)
        rows, dev_heads, _ = per_task_gradients(probe)
        J32 = torch.stack(rows)
        for mode in (*PARAMETER_MODES, "features"):
            work = workload(TASKS, architecture=architecture, small=True, device=device)
            if mode == "gramian":
                deconflict.track(work.trunk)
            z, losses = work.forward()
            method = deconflict.get(name, **options)
            label = f"{architecture} {mode}"
            if mode == "features":
                record = deconflict.backward(losses, work.trunk, method, features=z)
                ratio = check_features(label, work, record, architecture, device)
            else:
                record = deconflict.backward(losses, work.trunk, method, mode=mode)
                assert record.weights is not None
                ratio = check_update(label, flat_grad(work.trunk), record.weights, J32, ref, u,
                                     work.trunk)
            check_heads(label, work, ref["heads"], dev_heads, u)
            lines.append(_ok(f"{label}: ok (worst error / bound {ratio:.2g})"))
    return lines


def check_features(label: str, work: Any, record: Any, architecture: str, device: str
                   ) -> float:
    """Representation mode: .grad = A^T v with A = dz/dtheta and v = Z^T c (Z: the per-task
    gradients w.r.t. the features z). The bound of the module docstring, applied to both
    factors: 2 |dA|^T |v| + |A64|^T (2 |dZ|^T |c| + |Z64|^T |c - c64|) + (2u + T u64) |A|^T |v|
    (the second u: v itself is rounded to float32)."""
    from _workload import METHODS, workload

    import deconflict

    name, options = METHODS[METHOD][0]

    def factors(w: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z, losses = w.forward()
        params = [p for p in w.trunk.parameters() if p.requires_grad]
        Z = torch.stack([torch.autograd.grad(loss, z, retain_graph=True)[0].reshape(-1)
                         for loss in losses])
        flat = z.reshape(-1)
        A = torch.stack([torch.cat([g.reshape(-1) for g in
                                    torch.autograd.grad(flat[k], params, retain_graph=True)])
                         for k in range(flat.numel())])
        return Z.detach(), A.detach(), torch.stack([loss.detach() for loss in losses])

    Z64, A64, losses64 = factors(workload(TASKS, architecture=architecture, small=True,
                                          dtype=torch.float64))
    c64 = deconflict.get(name, **options).weights(Z64 @ Z64.T, losses=losses64)
    c64 = c64.to(torch.float64)
    Z32, A32, _ = (t.to("cpu", torch.float64) for t in
                   factors(workload(TASKS, architecture=architecture, small=True,
                                    device=device)))
    assert record.weights is not None
    c = record.weights.detach().to("cpu", torch.float64)
    v = Z32.T @ c
    u = unit_roundoff(torch.float32)
    dZ = (Z32 - Z64).abs().amax(dim=1, keepdim=True).expand_as(Z64)  # per task, as spread()
    bound = (2 * spread(A32 - A64, work.trunk).T @ v.abs()
             + A64.abs().T @ (2 * dZ.T @ c.abs() + Z64.abs().T @ (c - c64).abs())
             + (2 * u + TASKS * U64) * A32.abs().T @ v.abs() + torch.finfo(torch.float64).tiny)
    grad = flat_grad(work.trunk).detach().to("cpu", torch.float64)
    if not torch.isfinite(grad).all():
        raise CheckFailedError(f"{label}: non-finite .grad")
    error = (grad - A64.T @ (Z64.T @ c64)).abs()
    worst = float((error / bound).max())
    if worst > 1.0:
        index = int((error / bound).argmax())
        raise CheckFailedError(f"{label}: .grad[{index}] off by {float(error[index]):.3g}, bound "
                          f"{float(bound[index]):.3g}")
    return worst


def check_autocast(device: str) -> list[str]:
    """Check 2: autocast float16 / bfloat16 forward passes give finite, close gradients."""
    from _workload import METHODS, workload

    import deconflict

    lines = []
    name, options = METHODS[METHOD][0]
    for dtype in (torch.float16, torch.bfloat16):
        u = unit_roundoff(dtype)
        for architecture in ARCHITECTURES:
            # The float32 computation is the reference here; its own error is far below u.
            ref = reference(architecture)
            probe = workload(TASKS, architecture=architecture, small=True, device=device)
            with torch.autocast(device_type=device, dtype=dtype):
                rows, _, _ = per_task_gradients(probe)
            J_low = torch.stack(rows)
            for mode in ("sequential", "gramian"):
                work = workload(TASKS, architecture=architecture, small=True, device=device)
                if mode == "gramian":
                    deconflict.track(work.trunk)
                with torch.autocast(device_type=device, dtype=dtype):
                    _, losses = work.forward()
                record = deconflict.backward(losses, work.trunk, deconflict.get(name, **options),
                                             mode=mode)  # type: ignore[arg-type]
                assert record.weights is not None
                label = f"autocast {str(dtype).removeprefix('torch.')} {architecture} {mode}"
                ratio = check_update(label, flat_grad(work.trunk), record.weights, J_low, ref, u,
                                     work.trunk, extra_u=4 * u)
                lines.append(_ok(f"{label}: ok (worst error / bound {ratio:.2g})"))
    return lines


def check_kernels(device: str) -> list[str]:
    """Check 3: the fused Gramian and combination on ``device`` tensors against float64."""
    from deconflict import kernels

    generator = torch.Generator().manual_seed(0)
    lines = []
    for tasks, columns in ((3, 1000), (10, 100_003)):
        J = torch.randn(tasks, columns, generator=generator)
        rows = [row.to(device) for row in J]
        J64 = J.to(torch.float64)
        M = torch.zeros(tasks, tasks, dtype=torch.float64, device=device)
        kernels.gramian_into(rows, M)
        # float32 -> float64 is exact; the sum of d products: gamma_d |J| |J|^T.
        gamma = columns * U64 / (1 - columns * U64)
        bound = gamma * J64.abs() @ J64.abs().T
        if not bool(((M.cpu() - J64 @ J64.T).abs() <= bound).all()):
            raise CheckFailedError(f"kernels.gramian_into T={tasks} d={columns}: off by "
                              f"{float((M.cpu() - J64 @ J64.T).abs().max()):.3g}")
        c = torch.randn(tasks, generator=generator, dtype=torch.float64)
        start = torch.randn(columns, generator=generator)
        for accumulate in (False, True):
            out = start.clone().to(device)
            kernels.combine_into(rows, c, out, accumulate=accumulate)
            exact = J64.T @ c + (start.to(torch.float64) if accumulate else 0)
            terms = J64.abs().T @ c.abs() + (start.abs().to(torch.float64) if accumulate else 0)
            # One rounding to float32 of a float64 sum of T (+1) terms.
            bound = unit_roundoff(torch.float32) * exact.abs() + (tasks + 1) * U64 * terms * 2
            error = (out.cpu().to(torch.float64) - exact).abs()
            if not bool((error <= bound).all()):
                raise CheckFailedError(f"kernels.combine_into T={tasks} d={columns} accumulate="
                                  f"{accumulate}: off by {float(error.max()):.3g}")
        lines.append(_ok(f"kernels T={tasks} d={columns} on {device}: ok"))
    return lines


def _distributed_worker(rank: int, init: str, directory: str) -> None:
    import torch.distributed as dist
    from _workload import METHODS, workload

    import deconflict

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2)
    try:
        work = workload(TASKS, architecture="mlp", small=True, batch=8, device=f"cuda:{rank}")
        work.x = work.x[rank * 4:(rank + 1) * 4]
        work.y = work.y[:, rank * 4:(rank + 1) * 4]
        _, losses = work.forward()
        name, options = METHODS[METHOD][0]
        record = deconflict.backward(losses, work.trunk, deconflict.get(name, **options),
                                     distributed="exact")
        torch.save({"grad": flat_grad(work.trunk).cpu(), "weights": record.weights.cpu()},
                   Path(directory) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_distributed(device: str) -> list[str]:
    """Check 4: exact mode over NCCL gives the single-process update on the global batch."""
    if device != "cuda" or torch.cuda.device_count() < 2:
        count = torch.cuda.device_count() if device == "cuda" else 0
        return [_ok(f"distributed exact mode (NCCL): skipped, {count} GPU(s) (needs >= 2)")]
    import torch.multiprocessing as mp
    from _workload import workload

    with tempfile.TemporaryDirectory() as directory:
        mp.start_processes(_distributed_worker, args=(f"file://{directory}/store", directory),
                           nprocs=2, join=True, start_method="spawn")
        results = [torch.load(Path(directory) / f"rank{r}.pt") for r in range(2)]
    if not torch.equal(results[0]["grad"], results[1]["grad"]):
        raise CheckFailedError("distributed exact mode: the ranks' .grad differ")
    # The reference: float64 CPU on the global batch of 8.
    from _workload import METHODS

    import deconflict

    work64 = workload(TASKS, architecture="mlp", small=True, batch=8, dtype=torch.float64)
    rows, _, losses = per_task_gradients(work64)
    J64 = torch.stack(rows)
    name, options = METHODS[METHOD][0]
    c64 = deconflict.get(name, **options).weights(J64 @ J64.T, losses=losses)
    ref = {"J": J64, "c": c64.to(torch.float64), "update": J64.T @ c64.to(torch.float64)}
    dev = workload(TASKS, architecture="mlp", small=True, batch=8, device="cuda")
    J32 = torch.stack(per_task_gradients(dev)[0])
    # The ranks' mean adds one float32 rounding per element: 2 u in place of u.
    ratio = check_update("distributed exact (NCCL)", results[0]["grad"], results[0]["weights"],
                         J32, ref, 2 * unit_roundoff(torch.float32), dev.trunk)
    return [_ok(f"distributed exact mode (NCCL, 2 GPUs): ok (worst error / bound {ratio:.2g})")]


# ------------------------------------------------------------------------------- benchmark
def benchmark(args: Any, device: str) -> list[dict[str, Any]]:
    """Check 5: step.py's variants on the device, synchronized after every step."""
    from _workload import CELEBA_TASKS
    from step import MANY_TASK_METHODS, OURS, THEIRS, measure, row_of

    def synchronized(run: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            result = run()
            if device == "cuda":
                torch.cuda.synchronize()
            return result
        return wrapped

    kinds = ["plain", *OURS, *THEIRS]
    rows = []
    for architecture in ARCHITECTURES:
        for tasks in (3, 10):
            variants = [("plain", None)] + [(k, METHOD) for k in kinds[1:]]
            times, skipped, picked = measure(variants, tasks, architecture,
                                             repeats=args.repeats, warmup=args.warmup,
                                             small=args.small, device=device, wrap=synchronized)
            rows.append(row_of(architecture, tasks, METHOD, times, skipped, picked, kinds))
            print(f"benchmark {architecture} T={tasks}: done", flush=True)
    variants = [("plain", None)] + [(k, METHOD) for k in kinds[1:]]
    for method in MANY_TASK_METHODS[1:]:
        variants += [("deconflict:gramian", method), ("torchjd:autogram", method)]
    times, skipped, picked = measure(variants, CELEBA_TASKS, "celeba", repeats=args.repeats,
                                     warmup=args.warmup, small=args.small, device=device,
                                     wrap=synchronized)
    many = [row_of("celeba", CELEBA_TASKS, m, times, skipped, picked, kinds)
            for m in MANY_TASK_METHODS]
    fastest = min((r["deconflict:gramian_ms"] for r in many if r["deconflict:gramian_ms"]),
                  default=None)
    for row in many:
        row["gramian_vs_fastest_method"] = (None if fastest is None or
                                            row["deconflict:gramian_ms"] is None
                                            else row["deconflict:gramian_ms"] / fastest)
    print("benchmark celeba T=40: done", flush=True)
    from step import print_tables
    print_tables(rows, many, kinds)
    return rows + many


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _harness import parser, save

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cuda (default); cpu runs the same checks on the CPU (the script's test)")
    p.add_argument("--checks-only", action="store_true", help="skip the step benchmark")
    p.add_argument("--small", action="store_true", help="toy sizes in the benchmark too")
    p.set_defaults(repeats=10, warmup=3)
    args = p.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
              f"CUDA_VISIBLE_DEVICES={visible!r}); run on a machine with a GPU, or --device cpu",
              file=sys.stderr)
        sys.exit(2)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cuda":
        # Checks compare float32 with float64: TF32 products would round to 10 bits.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        name = torch.cuda.get_device_name(0)
    else:
        from _harness import machine
        name = machine()["cpu"]
    print(f"device: {device} ({name}), torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    failures: list[str] = []
    results: dict[str, list[str]] = {}
    for check in (check_modes, check_autocast, check_kernels, check_distributed):
        try:
            results[check.__name__] = check(device)
        except CheckFailedError as failure:
            failures.append(str(failure))
            print(f"  FAILED {check.__name__}: {failure}", flush=True)
    print(f"checks: {len(failures)} failed ({time.perf_counter() - start:.0f} s)", flush=True)
    rows: list[dict[str, Any]] = []
    if not args.checks_only:
        if device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # what training would use
            torch.backends.cudnn.allow_tf32 = True
        rows = benchmark(args, device)
    path = save("gpu", args, rows, {"device": name, "checks": results, "failures": failures})
    print(f"written: {path}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
