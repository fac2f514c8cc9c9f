"""The per-layer rules of Gramian-only mode: each layer's share of M = J J^T and of J^T r.

One backward pass of the R rows (``tracking.tracked_gramian``) gives every rule what it asks
for, stacked over the rows: the gradients Delta_i of the rows with respect to the outputs of
the layer's recorded calls ("Delta" rules), or the per-task gradients of the layer's
parameters themselves ("Jacobian" rules). From that, each rule gives its share of the Gramian
(float64) and, once the method has chosen the row weights r, its parameters' share of the
update J^T r, without a second backward pass through the trunk:

- ``KernelRule`` (``nn.Linear``, y = x W^T + b, inputs X: N x n_in, Delta_i: N x n_out): the
  weight gradient is G_i = Delta_i^T X, so <G_i, G_j> = <Delta_i, K Delta_j> with K = X X^T
  (the kernel trick: ~N^2 (n_in + R n_out) float64 operations instead of R N n_in n_out), and
  <b_i, b_j> = <sum_n Delta_i[n], sum_n Delta_j[n]>. The update is
  W: (sum_i r_i Delta_i)^T X, b: sum_n (sum_i r_i Delta_i)[n] - one GEMM per layer.
- ``ConvKernelRule`` (``nn.Conv2d`` with groups 1 and zero padding): the same with X = U, the
  input's patches (N L x C k_h k_w for L output positions; ``F.unfold``) and Delta_i arranged
  as N L x C_out: the weight gradient is G_i = Delta_i^T U. Chosen by the same count, it wins
  at low resolution with many channels (the last layers of a VGG-like trunk).
- ``EmbeddingRule`` (``nn.Embedding``, y = E[idx]): G_i is Delta_i scattered into the rows idx,
  so with S_i[u] = sum over the positions of index u of Delta_i (u over the distinct indices,
  the padding index left out: its row gets no gradient) <G_i, G_j> = <S_i, S_j>; the update
  is sum_i r_i S_i in the rows u.
- ``JacobianRule`` (every other module - convolution, normalization, attention -, a Linear
  layer whose kernel is dearer than its weight gradients, and, as the per-module fallback,
  parameters the records cannot account for): the per-task gradients of the parameters, from
  the same backward pass; the Gramian by the fused float64 kernel (``kernels.gramian_into``),
  the update J^T r by ``kernels.combine_into``. Exact for any use of the parameters (tied,
  recurrent, functional), at the cost of holding R x (those parameters).

``choose_linear_rule`` picks between the kernel and the Jacobian rule for a Linear layer (and a
convolution, counted as a Linear layer on its patches) from
an operation count calibrated on this kind of machine (``docs/performance.md``, "Gramian-only
mode and mode='auto'").

Float64 accumulation throughout: the kernel K and the products K Delta are float64 (float32
products are exact in float64, so the kernel rule gives the Gramian of the exact G_i); the
Jacobian rule's G_i are autograd's, rounded to the parameters' dtype as in the sequential
mode, and their products are accumulated in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812 (the usual name)

from . import kernels
from .kernels import Rows, row_list

# Largest kernel matrix K (N x N float64) the Linear rule builds, in elements.
KERNEL_ELEMENTS = 1 << 24
# Elements of the float64 pieces formed at a time (4 MiB: measured 10-15% faster than 1 MiB
# on the MLP's 1792-wide layers, and small beside the layer's Delta).
CHUNK_ELEMENTS = 1 << 19
# Cost of one float64 multiply-add of the kernel rule relative to one float32 multiply-add of
# the weight-gradient GEMM, and of one element of a float64 Gramian pass over R rows (per row
# pair), measured on an Intel Xeon with AVX-512 (``docs/performance.md``).
FLOAT64_COST = 2.0
GRAMIAN_PASS_COST = 1.0
# Costs this close count as a tie, decided by memory: the model's predictions were within this
# factor of the measured times (docs/performance.md).
NEAR_TIE = 1.25


def choose_linear_rule(N: int, n_in: int, n_out: int, R: int, has_weight: bool) -> str:
    """"kernel" or "jacobian" for a Linear layer seen on N input rows, for R rows of losses.

    Multiply-adds: the kernel rule forms K = X X^T (N^2 n_in / 2), K Delta_j (R N^2 n_out), the
    pairwise products (R^2 N n_out / 2) in float64, and the update's GEMM (N n_in n_out); the
    Jacobian rule forms the R weight gradients (R N n_in n_out) in float32 and passes over them
    twice (Gramian R^2 p / 2, update R p; p = n_in n_out). Within ``NEAR_TIE`` of each other,
    the one that holds less memory.

    >>> choose_linear_rule(256, 1792, 1792, 3, True)   # wide layer, small batch: kernel trick
    'kernel'
    >>> choose_linear_rule(2048, 256, 1024, 3, True)   # many tokens: weight gradients
    'jacobian'
    """
    if not has_weight:
        return "kernel"  # the bias alone: sums of Delta, no kernel matrix
    if N * N > KERNEL_ELEMENTS:
        return "jacobian"
    p = n_in * n_out
    kernel = FLOAT64_COST * (N * N * n_in / 2 + R * N * N * n_out + R * R * N * n_out / 2) \
        + N * p
    jacobian = R * N * p + GRAMIAN_PASS_COST * (R * R * p / 2 + R * p)
    if kernel <= NEAR_TIE * jacobian and N * n_out < p:
        # Within the model's accuracy of each other: the rule that holds less (R N n_out
        # floats of Delta instead of R p of weight gradients).
        return "kernel"
    return "kernel" if kernel < jacobian else "jacobian"


@dataclass
class Piece:
    """One rule's share of the Gramian: per layer key, an R x R float64 matrix."""

    name: str
    parts: dict[str, Tensor]


@dataclass
class Rule:
    """What a layer needs from the backward pass, and what it gives back.

    ``params``: the trainable shared parameters the rule covers (its share of J^T r is written
    for them); ``layers``: their layer keys (``update.layer_gramians``); ``targets``: what the
    backward pass differentiates for it (gradient edges or the parameters); ``taken``: the
    results, stacked over the rows (None where no row reaches a target); ``held``: their size
    per row, in elements.
    """

    name: str
    params: list[Tensor]
    layers: list[str]
    targets: list[Any] = field(default_factory=list)
    taken: list[Rows | None] = field(default_factory=list)
    held: int = 0  # elements per row that ``taken`` holds (what the sweeps balance)
    kind = "rule"

    def gramian(self, R: int) -> Piece:
        raise NotImplementedError

    def update(self, r: Tensor) -> list[Tensor | None]:
        """This rule's parameters' share of J^T r (None where no row reaches a parameter)."""
        raise NotImplementedError

    def release(self) -> None:
        self.taken = []


def _stacked_rows(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def _stacked(rows: Rows) -> Tensor:
    """The rows as one (R, ...) tensor (a copy unless they already are one)."""
    return rows if isinstance(rows, Tensor) else torch.stack(list(rows))


def _row_weights(r: Tensor, like: Tensor) -> Tensor:
    return r.to(device=like.device, dtype=torch.float32 if like.dtype != torch.float64
                else torch.float64)


def _flat(rows: Rows) -> list[Tensor]:
    """Each row flattened (a view where autograd's gradient is contiguous)."""
    return [row.reshape(-1) for row in row_list(rows)]


@dataclass
class KernelRule(Rule):
    """``nn.Linear`` by the kernel trick (module docstring); targets: the calls' outputs."""

    module: nn.Linear | nn.Conv2d | None = None
    inputs: list[Tensor] = field(default_factory=list)  # as the layer multiplied them
    kind = "kernel"
    chunk_elements = CHUNK_ELEMENTS

    def _rows(self, R: int) -> tuple[Tensor, Tensor] | None:
        """X (rows x n_in) and D (R x rows x n_out, or R x (a split of the rows) x n_out)."""
        assert isinstance(self.module, nn.Linear)
        n_in, n_out = self.module.in_features, self.module.out_features
        used = [(x, d) for x, d in zip(self.inputs, self.taken, strict=True) if d is not None]
        if not used:
            return None
        X = _stacked_rows([x.detach().reshape(-1, n_in) for x, _ in used], 0)
        D = _stacked_rows([_stacked(d).detach().reshape(R, -1, n_out) for _, d in used], 1)
        return X, D

    def gramian(self, R: int) -> Piece:
        assert self.module is not None
        M = torch.zeros(R, R, dtype=torch.float64)
        rows = self._rows(R)
        if rows is None:
            return Piece(self.name, {self.layers[0]: M})
        X, D = rows
        del rows
        N = X.shape[0]
        positions = tuple(range(1, D.dim() - 1))  # D's row dimensions (one, or N and L)
        covered = {id(p) for p in self.params}  # the trainable ones
        if self.module.bias is not None and id(self.module.bias) in covered:
            # The bias gradient sum_n Delta_i[n], summed in the gradients' dtype as autograd does.
            kernels.gramian_into(D.sum(dim=positions), M)
        if id(self.module.weight) in covered:
            K = X.to(torch.float64)
            del X  # the float64 copy (and a convolution's patches) freed before the products
            K = K @ K.T  # float32 products are exact in float64: K is X X^T to float64 rounding
            n_out = D.shape[-1]
            # Output columns a few at a time: float64 copies that stay small.
            step = max(8, self.chunk_elements // (R * N))
            for start in range(0, n_out, step):
                part = D[..., start:start + step].to(torch.float64).reshape(R, N, -1)
                mixed = torch.matmul(K, part)  # K Delta_j
                kernels.cross_into(part.reshape(R, -1), mixed.reshape(R, -1), M)
            M = (M + M.T) / 2
        return Piece(self.name, {self.layers[0]: M})

    def update(self, r: Tensor) -> list[Tensor | None]:
        assert self.module is not None
        R = len(r)
        rows = self._rows(R)
        if rows is None:
            return [None] * len(self.params)
        X, D = rows
        # sum_i r_i Delta_i, then one GEMM: (sum_i r_i Delta_i)^T X. Under autocast D and X are
        # in the layer's lower dtype; the products are formed in the parameters' dtype.
        dtype = self.module.weight.dtype
        Dc = torch.tensordot(_row_weights(r, D).to(dtype), D.to(dtype), dims=1)
        Dc = Dc.reshape(-1, D.shape[-1])  # N x n_out
        grads: list[Tensor | None] = []
        for param in self.params:
            if param is self.module.weight:
                grads.append((Dc.T @ X.to(dtype)).reshape(param.shape))
            else:
                grads.append(Dc.sum(dim=0))
        return grads

    def release(self) -> None:
        super().release()
        self.inputs = []


def unfoldable(module: nn.Module) -> bool:
    """Whether a ``nn.Conv2d``'s weight gradient is Delta^T U for U its unfolded input."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and module.padding_mode == "zeros"
            and (not isinstance(module.padding, str) or module.padding == "valid"))


def unfolded(module: nn.Conv2d, x: Tensor) -> Tensor:
    """The input's patches U (N L x C k_h k_w, rows in (sample, output position) order)."""
    padding = (0, 0) if isinstance(module.padding, str) else module.padding
    patches = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@dataclass
class ConvKernelRule(KernelRule):
    """``nn.Conv2d`` (groups 1, zero padding) by the kernel trick on its unfolded input.

    With U the input's patches (N L x C k_h k_w, L output positions per sample) and Delta_i
    the output gradient arranged as N L x C_out, the weight gradient is G_i = Delta_i^T U
    (reshaped to C_out x C x k_h x k_w), so the Linear rule's algebra holds with X = U: K = U U^T
    (N L x N L, float64), <G_i, G_j> = <Delta_i, K Delta_j>, the update (sum_i r_i Delta_i)^T U.
    Cheaper than the R weight gradients at low resolution and many channels (the last layers
    of a VGG-like trunk), where it also holds far less: R N L C_out floats.
    """

    # Smaller float64 pieces than a Linear layer's: K is small here (N L rows at low
    # resolution), so the pieces, not K, are the transient memory of the products.
    chunk_elements = CHUNK_ELEMENTS // 4

    def _rows(self, R: int) -> tuple[Tensor, Tensor] | None:
        assert isinstance(self.module, nn.Conv2d)
        module = self.module
        n_out = module.out_channels
        used = [(x, d) for x, d in zip(self.inputs, self.taken, strict=True) if d is not None]
        if not used:
            return None
        # U is formed here (and again for the update) rather than kept: autograd keeps the
        # input anyway, the patches are k_h k_w times larger.
        X = _stacked_rows([unfolded(module, x.detach()) for x, _ in used], 0)
        # Delta: R x N x C_out x H' x W' -> R x N x L x C_out (a view), rows as U's.
        views = [_stacked(d).detach().reshape(R, x.shape[0], n_out, -1).transpose(2, 3)
                 for x, d in used]
        if len(views) == 1:
            return X, views[0]
        return X, torch.cat([v.reshape(R, -1, n_out) for v in views], dim=1)


@dataclass
class EmbeddingRule(Rule):
    """``nn.Embedding`` by its rows (module docstring); targets: the calls' outputs."""

    module: nn.Embedding | None = None
    indices: list[Tensor] = field(default_factory=list)
    kind = "embedding"
    _summed: tuple[Tensor, Tensor] | None = None

    def _sums(self, R: int) -> tuple[Tensor, Tensor] | None:
        """The distinct indices u and S (R x U x dim), the Delta summed per index."""
        if self._summed is not None:
            return self._summed
        assert self.module is not None
        dim = self.module.embedding_dim
        used = [(i, d) for i, d in zip(self.indices, self.taken, strict=True) if d is not None]
        if not used:
            return None
        idx = _stacked_rows([i.reshape(-1) for i, _ in used], 0)
        D = _stacked_rows([_stacked(d).detach().reshape(R, -1, dim) for _, d in used], 1)
        if self.module.padding_idx is not None:
            keep = idx != self.module.padding_idx
            idx, D = idx[keep], D[:, keep]
        distinct, inverse = torch.unique(idx, return_inverse=True)
        S = D.new_zeros(R, len(distinct), dim).index_add_(1, inverse, D)
        self._summed = (distinct, S)
        return self._summed

    def gramian(self, R: int) -> Piece:
        M = torch.zeros(R, R, dtype=torch.float64)
        sums = self._sums(R)
        if sums is not None:
            kernels.gramian_into(sums[1].reshape(R, -1), M)
        return Piece(self.name, {self.layers[0]: M})

    def update(self, r: Tensor) -> list[Tensor | None]:
        assert self.module is not None
        sums = self._sums(len(r))
        if sums is None:
            return [None]
        distinct, S = sums
        weight = self.module.weight
        grad = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        combined = torch.tensordot(_row_weights(r, S), S.to(_row_weights(r, S).dtype), dims=1)
        grad[distinct] = combined.to(weight.dtype)
        return [grad]

    def release(self) -> None:
        super().release()
        self.indices = []
        self._summed = None


@dataclass
class JacobianRule(Rule):
    """The per-task gradients of the parameters themselves; targets: the parameters.

    ``fallback``: the parameters are here because the records cannot account for them (used
    outside any recorded call, tied across modules, or feeding their own layer's input), not
    because this rule is the cheaper one.
    """

    fallback: bool = False
    kind = "jacobian"

    def gramian(self, R: int) -> Piece:
        parts: dict[str, Tensor] = {}
        for layer, block in zip(self.layers, self.taken, strict=True):
            if block is None:
                continue
            part = parts.setdefault(layer, torch.zeros(R, R, dtype=torch.float64))
            kernels.gramian_into(_flat(block), part)
        return Piece(self.name, parts)

    def update(self, r: Tensor) -> list[Tensor | None]:
        grads: list[Tensor | None] = []
        for param, block in zip(self.params, self.taken, strict=True):
            if block is None:
                grads.append(None)
                continue
            out = torch.empty_like(param, memory_format=torch.contiguous_format)
            kernels.combine_into(_flat(block), r, out, accumulate=False)
            grads.append(out)
        return grads
