"""Spectral decomposition of stacked LoRA factors, batched over modules.

Every route factors the product `B @ A` of a stack B (G x m x R) and A (G x R x n) without
forming it, and returns the rank-`p` truncation of its SVD as a pair (U_p S_p, V_p^T) for the
per-module rank that `choose_rank` picks from the singular values. The routes are exact and
differ only in speed and rounding (see BENCHMARKS.md); `gram` is the default.

Every route returns the singular values in descending order, in the dtype it computed them in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

RankRule = Callable[[Tensor], Tensor]
"""Maps singular values (G x R, descending) to the rank to keep per module (G,)."""


def energy_rank(singular_values: Tensor, tau: float, max_rank: int | None = None, rtol: float | None = None) -> Tensor:
    """Smallest p per module whose leading singular values hold a share >= tau of the energy.

    Components at or below `rtol` times the largest (the numerical floor, as in
    `torch.linalg.matrix_rank`; default: the count of values times their dtype's epsilon) never
    count, so tau = 1 keeps the numerical rank rather than rounding noise. At least one is kept.
    """
    s = singular_values.double()
    power = s.square()
    cumulative = power.cumsum(-1)
    total = cumulative[..., -1:]
    # The relative slack absorbs float64 rounding in the cumulative sum, nothing more.
    rank = (cumulative < tau * total * (1 - 1e-12)).sum(-1) + 1
    if rtol is None:
        rtol = s.shape[-1] * torch.finfo(singular_values.dtype).eps
    rank = torch.minimum(rank, (s > s[..., :1] * rtol).sum(-1))
    if max_rank is not None:
        rank = rank.clamp(max=max_rank)
    return rank.clamp(min=1)


def _kept(s: Tensor, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """The leading p = max(ranks) singular values with everything past each module's rank zeroed,
    and that 0/1 mask, so one batched tensor holds ragged ranks. Routes apply them to their small
    R x p factors before the large products.

    A component with a zero singular value is zeroed on both sides too: its singular vectors
    are arbitrary (an all-zero update still keeps rank 1), and every route must send zeros.
    """
    p = int(ranks.max())
    keep = (torch.arange(p, device=s.device) < ranks[:, None].to(s.device)) & (s[:, :p] > 0)
    return torch.where(keep, s[:, :p], torch.zeros((), dtype=s.dtype, device=s.device)), keep.to(s.dtype)


def _eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """torch.linalg.eigh, in float64 where LAPACK's float32 solver fails to converge. It did once, on
    the stack of an early warm-started round: zero columns (components the clients could not train) and
    clusters of near-duplicate ones (each client's start, in its upload and in the correction). The
    aggregation of what clients send must not crash on their numbers."""
    try:
        return torch.linalg.eigh(matrix)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        values, vectors = torch.linalg.eigh(matrix.double())
        return values.to(matrix.dtype), vectors.to(matrix.dtype)


def _whiten(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigen-decompose a PSD Gram matrix; returns (V, sqrt(eigvals) or 0, 1/sqrt(eigvals) or 0).

    Directions whose eigenvalue is below the rounding floor of the Gram matrix carry no
    information: both their root and its inverse are zero. A zero inverse avoids amplifying
    noise (the guard); a zero root keeps the noise direction out of the core, where in fp32
    its ~sqrt(eps) weight would otherwise surface as a spurious singular value at tau = 1.
    """
    eigvals, eigvecs = _eigh(gram)
    floor = eigvals[..., -1:].clamp(min=0) * gram.shape[-1] * torch.finfo(gram.dtype).eps
    resolved = eigvals > floor
    root = torch.where(resolved, eigvals, torch.zeros_like(eigvals)).sqrt()
    inverse_root = torch.where(resolved, root.reciprocal(), torch.zeros_like(root))
    return eigvecs, root, inverse_root


def gram_precision(width: int, tau: float, dtype: torch.dtype) -> torch.dtype:
    """The dtype in which the gram route forms its Gram matrices for a stack `width` columns wide.

    The route squares the spectrum: with Gram matrices of machine epsilon eps it cannot resolve
    an energy share below about width^2 * eps (fp32, 8 clients: 2.8e-3; 32 clients of rank 16:
    3.1e-2; tests/test_aggregation.py measures it). When tau asks for finer than that (always at
    tau = 1), the Gram matrices and all R x R work are in float64 instead: only the two Gram
    products get dearer, the large products stay in `dtype`.
    """
    if dtype == torch.float64:
        return dtype
    return dtype if width * width * torch.finfo(dtype).eps <= 1 - tau else torch.float64


def gram_route(B: Tensor, A: Tensor, choose_rank: RankRule, precision: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Two R x R eigendecompositions and three large matrix products.

    With B = B_1 D (D the column norms of B) and B_1^T B_1 = V L V^T, the columns of
    B_1 V L^{-1/2} are orthonormal and B A = (B_1 V L^{-1/2}) (L^{1/2} V^T D A). The singular
    values of B A are those of the R x n factor, whose left vectors U_P come from the R x R
    matrix M = L^{1/2} V^T (D A A^T D) V L^{1/2}. `precision` (default: B's dtype) is the dtype
    of the Gram matrices and of every R x R step.
    """
    precision = precision or B.dtype
    b_wide = B.to(precision)
    b_gram = b_wide.mT @ b_wide
    del b_wide
    a_wide = A.to(precision)
    a_gram = a_wide @ a_wide.mT
    del a_wide
    to_left, to_right, s, ranks = _from_grams(b_gram, a_gram, choose_rank)
    return B @ to_left.to(B.dtype), to_right.to(A.dtype) @ A, s, ranks


def fold_route(
    carried: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], choose_rank: RankRule, precision: torch.dtype | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`gram_route` of the stack [B_c | B_n] [A_c ; A_n] without forming it: the Gram matrices by
    blocks (the cross block once), the outputs as sums of two products. A running decomposition
    (carried, c columns, possibly none) folds in the clients waiting (new) without a copy of itself."""
    (b_carried, a_carried), (b_new, a_new) = carried, new
    precision = precision or b_new.dtype
    c = b_carried.shape[-1]

    def gram(left: Tensor, right: Tensor) -> Tensor:
        return left.to(precision).mT @ right.to(precision)

    def blocks(top: Tensor, cross: Tensor, bottom: Tensor) -> Tensor:
        return torch.cat([torch.cat([top, cross], -1), torch.cat([cross.mT, bottom], -1)], -2)

    b_gram = blocks(gram(b_carried, b_carried), gram(b_carried, b_new), gram(b_new, b_new))
    a_gram = blocks(gram(a_carried.mT, a_carried.mT), gram(a_carried.mT, a_new.mT), gram(a_new.mT, a_new.mT))
    to_left, to_right, s, ranks = _from_grams(b_gram, a_gram, choose_rank)
    to_left, to_right = to_left.to(b_new.dtype), to_right.to(a_new.dtype)
    b_global = torch.baddbmm(b_new @ to_left[:, c:], b_carried, to_left[:, :c])
    a_global = torch.baddbmm(to_right[:, :, c:] @ a_new, to_right[:, :, :c], a_carried)
    return b_global, a_global, s, ranks


def _from_grams(b_gram: Tensor, a_gram: Tensor, choose_rank: RankRule) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gram route's R x R work: (to_left, to_right, s, ranks) with B @ to_left = U_p S_p and
    to_right @ A = V_p^T, from B^T B and A A^T alone."""
    # Unit columns in B, their norms moved into A's rows: the whitening then sees the directions
    # of the stack alone, not the scales of its clients (which spread over decades), so a client
    # whose B is small but whose A is large is not dropped under B's rounding floor.
    norms = b_gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    inverse_norms = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
    v, root, inverse_root = _whiten(b_gram * inverse_norms[:, :, None] * inverse_norms[:, None, :])
    half = v * root[:, None, :]  # V L^{1/2}
    core = half.mT @ (a_gram * norms[:, :, None] * norms[:, None, :]) @ half
    eigvals, u = _eigh(core)
    eigvals, u = eigvals.flip(-1), u.flip(-1)
    # The core holds squared singular values, so rounding leaves eigenvalues near eps * s_max^2
    # whose roots (~sqrt(eps) * s_max) would pass for real components: below the core's own
    # rounding floor they are zero. This is the gram route's resolution (see gram_precision).
    floor = eigvals[..., :1] * core.shape[-1] * torch.finfo(core.dtype).eps
    s = torch.where(eigvals > floor, eigvals, torch.zeros_like(eigvals)).sqrt()
    ranks = choose_rank(s)
    p = int(ranks.max())
    s_kept, keep = _kept(s, ranks)
    to_left = inverse_norms[:, :, None] * ((v * inverse_root[:, None, :]) @ u[:, :, :p]) * s_kept[:, None, :]
    # A_g = S^-1 U_p^T (B A) = S^-1 U_P^T L^{1/2} V^T D A; zero singular values stay zero.
    inverse_s = torch.where(keep > 0, s[:, :p].reciprocal(), torch.zeros_like(s_kept))
    to_right = (u[:, :, :p].mT @ half.mT) * inverse_s[:, :, None] * norms[:, None, :]
    return to_left, to_right, s, ranks


def qr_route(B: Tensor, A: Tensor, choose_rank: RankRule) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """B = Q_B R_B and A^T = Q_A R_A; the SVD of the R x R core R_B R_A^T gives that of B A."""
    q_b, r_b = torch.linalg.qr(B)
    q_a, r_a = torch.linalg.qr(A.mT)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)
    ranks = choose_rank(s)
    s_kept, keep = _kept(s, ranks)
    p = s_kept.shape[-1]
    return q_b @ (u[:, :, :p] * s_kept[:, None, :]), (vh[:, :p, :] * keep[:, :, None]) @ q_a.mT, s, ranks


def svd_route(B: Tensor, A: Tensor, choose_rank: RankRule) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The paper's pipeline: thin SVD of each stack, then of P = S_B (V_B^T U_A) S_A."""
    u_b, s_b, vh_b = torch.linalg.svd(B, full_matrices=False)
    u_a, s_a, vh_a = torch.linalg.svd(A, full_matrices=False)
    u, s, vh = torch.linalg.svd(s_b[:, :, None] * (vh_b @ u_a) * s_a[:, None, :])
    ranks = choose_rank(s)
    s_kept, keep = _kept(s, ranks)
    p = s_kept.shape[-1]
    return u_b @ (u[:, :, :p] * s_kept[:, None, :]), (vh[:, :p, :] * keep[:, :, None]) @ vh_a, s, ranks


ROUTES = {"gram": gram_route, "qr": qr_route, "svd": svd_route}


def dense_svd(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of dense updates (G x m x n), for FlexLoRA."""
    return torch.linalg.svd(delta, full_matrices=False)
