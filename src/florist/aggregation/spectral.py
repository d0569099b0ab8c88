"""Spectral decomposition of stacked LoRA factors, batched over modules.

Every route factors the product `B @ A` of a stack B (G x m x R) and A (G x R x n) without
forming it, and returns a `Factored`: the rank-`p` truncation of its SVD as a pair (U_p S_p, V_p^T)
for the per-module rank that `choose_rank` picks from the singular values, the singular values
themselves, and a bound on what the route could not resolve. The routes differ in speed and
rounding (see BENCHMARKS.md); `gram` is the default.

Precision. `tolerance` is the share of the update's energy by which a caller lets the spectrum be
uncertain: FLoRIST passes a tenth of 1 - tau, and 0 where every component counts (tau = 1, a
budget, a fold of the stream). A route computes in its input dtype where that resolves the stack so
finely, judged before from the stack's width and after from how much its terms cancelled, and in
float64 otherwise. A component it cannot tell from zero is returned as a zero singular value, never
kept, and bounded in `unresolved`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

RankRule = Callable[[Tensor], Tensor]
"""Maps singular values (G x R, descending) to the rank to keep per module (G,)."""


class Factored(NamedTuple):
    """A route's answer for a batch of G modules."""

    left: Tensor
    """G x m x p: U_p S_p, zero past each module's rank (p the largest rank), in B's dtype."""
    right: Tensor
    """G x p x n: V_p^T, zero past each module's rank, in A's dtype."""
    singular_values: Tensor
    """G x R, descending, in the dtype the route computed in: 0 where it could not tell a component from zero."""
    ranks: Tensor
    """(G,): the rank `choose_rank` picked."""
    unresolved: Tensor
    """(G,), float64: ||B A - D||_F <= unresolved for the decomposition D with these singular values,
    up to the rounding of the components it resolved."""


def energy_rank(singular_values: Tensor, tau: float, max_rank: int | None = None) -> Tensor:
    """Smallest p per module whose leading singular values hold a share >= tau of the energy.

    A zero singular value (a component the route could not tell from zero) never counts, so tau = 1
    keeps every component the route resolved and nothing else. At least one is kept.
    """
    s = singular_values.double()
    rank = (s > 0).sum(-1)
    if tau < 1:
        cumulative = s.square().cumsum(-1)
        # The relative slack absorbs float64 rounding in the cumulative sum, nothing more. At tau = 1
        # it would cut a tail of up to 1e-12 of the energy (1e-6 of the norm): there every resolved
        # component is counted instead.
        rank = torch.minimum(rank, (cumulative < tau * cumulative[..., -1:] * (1 - 1e-12)).sum(-1) + 1)
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


def working_dtype(dtype: torch.dtype, tolerance: float, share: Callable[[float], float]) -> torch.dtype:
    """`dtype` where a route whose rounding leaves `share(eps)` of the energy unresolved meets
    `tolerance` in it, else float64."""
    if dtype == torch.float64 or share(torch.finfo(dtype).eps) <= tolerance:
        return dtype
    return torch.float64


def gram_share(width: int) -> Callable[[float], float]:
    """What the gram route leaves unresolved on a stack `width` columns wide whose terms do not
    cancel: it squares the spectrum, so it resolves each component to about sqrt(width eps) of
    the largest, up to 2 width^2 eps of the energy in all (fp32, 8 clients: 5.5e-3; 32 clients of
    rank 16: 6.3e-2). A stack that cancels resolves less; `gram_route` measures it."""
    return lambda eps: 2 * width * width * eps


def svd_share(width: int) -> Callable[[float], float]:
    """What the qr and svd routes leave unresolved, terms not cancelling: each component to about
    2 width eps of the largest, up to 4 width^3 eps^2 of the energy in all."""
    return lambda eps: 4 * width**3 * eps * eps


def _wide_products(B: Tensor, A: Tensor, to_left: Tensor, to_right: Tensor) -> tuple[Tensor, Tensor]:
    """B @ to_left and to_right @ A in the precision of the small factors, returned in B's and A's
    dtype: where the route needed float64 (to resolve every component, or a stack whose terms
    cancel), a float32 product would lose again what the float64 Gram matrices resolved."""
    wide = to_left.dtype
    if wide == B.dtype:
        return B @ to_left, to_right @ A
    return (B.to(wide) @ to_left).to(B.dtype), (to_right @ A.to(wide)).to(A.dtype)


# ---------------------------------------------------------------- the gram route


class _GramSpectrum(NamedTuple):
    norms: Tensor  # the column norms D of B
    v: Tensor  # eigenvectors of B's Gram matrix with unit columns
    root: Tensor  # their eigenvalues' roots, 0 where unresolved
    inverse_root: Tensor  # the inverse roots, 0 where unresolved
    u: Tensor  # the core's eigenvectors, by descending eigenvalue
    s: Tensor  # singular values of B A, 0 where unresolved
    unresolved: Tensor  # (G,) float64: the norm of what the zeroed components may have held
    uncertainty: Tensor  # (G,) float64: the energy by which the spectrum may be off in all


def _grams(B: Tensor, A: Tensor, precision: torch.dtype) -> tuple[Tensor, Tensor]:
    b_wide = B.to(precision)
    b_gram = b_wide.mT @ b_wide
    del b_wide
    a_wide = A.to(precision)
    return b_gram, a_wide @ a_wide.mT


def _gram_spectrum(b_gram: Tensor, a_gram: Tensor) -> _GramSpectrum:
    """The spectrum of B A from B^T B and A A^T alone, and a bound on what their rounding hides.

    Unit columns in B, their norms D moved into A's rows: the whitening then sees the directions of
    the stack alone, not the scales of its clients (which spread over decades), so a client whose B
    is small but whose A is large is not dropped under B's rounding floor. With B_1 = B D^-1 and
    B_1^T B_1 = V L V^T, the columns of B_1 V L^{-1/2} are orthonormal and the singular values of
    B A are the roots of the eigenvalues of the core L^{1/2} V^T (D A A^T D) V L^{1/2}.

    Two floors, each `width eps` times the scale of the matrix it is read from, bound what the
    rounding of that matrix can hide:
    - a direction of B_1 whose eigenvalue is below its floor carries no information: its inverse
      root would amplify noise and its root would surface as a spurious singular value, so both
      are zero. Its true eigenvalue is below twice the floor, and the part of B A it held, whose
      square is its eigenvalue times its row of V^T D A squared, is bounded by that.
    - the core's rounding scales with its largest eigenvalue and with sum_i ||b_i||^2 ||a_i||^2,
      the energy of the stack's terms one by one, which exceeds the update's energy as far as the
      terms cancel. An eigenvalue below that floor is zero, its true value below twice the floor;
      and each of the `width` eigenvalues may be off by up to that much (the uncertainty).
    """
    eps, width = torch.finfo(b_gram.dtype).eps, b_gram.shape[-1]
    norms = b_gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    inverse_norms = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
    scaled_a = a_gram * norms[:, :, None] * norms[:, None, :]  # D A A^T D
    eigvals_b, v = _eigh(b_gram * inverse_norms[:, :, None] * inverse_norms[:, None, :])
    floor_b = eigvals_b[..., -1:].clamp(min=0) * width * eps
    resolved_b = eigvals_b > floor_b
    root = torch.where(resolved_b, eigvals_b, torch.zeros_like(eigvals_b)).sqrt()
    inverse_root = torch.where(resolved_b, root.reciprocal(), torch.zeros_like(root))
    half = v * root[:, None, :]  # V L^{1/2}
    eigvals, u = _eigh(half.mT @ scaled_a @ half)
    eigvals, u = eigvals.flip(-1), u.flip(-1)
    stack_energy = scaled_a.diagonal(dim1=-2, dim2=-1).clamp(min=0).sum(-1, keepdim=True)
    floor_core = width * eps * torch.maximum(eigvals[..., :1], stack_energy)
    resolved = eigvals > floor_core
    s = torch.where(resolved, eigvals, torch.zeros_like(eigvals)).sqrt()
    held = ((v.mT @ scaled_a) * v.mT).sum(-1)  # per direction of B_1: its row of V^T D A, squared
    hidden = 2 * floor_b[:, 0] * (held * ~resolved_b).sum(-1) + 2 * floor_core[:, 0] * (~resolved).sum(-1)
    uncertainty = hidden.double() + 2 * floor_core[:, 0].double() * width
    return _GramSpectrum(norms, v, root, inverse_root, u, s, hidden.double().clamp(min=0).sqrt(), uncertainty)


def _gram_factors(spectrum: _GramSpectrum, ranks: Tensor) -> tuple[Tensor, Tensor]:
    """(to_left, to_right) with B @ to_left = U_p S_p and to_right @ A = V_p^T."""
    norms, v, root, inverse_root, u, s, _, _ = spectrum
    p = int(ranks.max())
    s_kept, keep = _kept(s, ranks)
    inverse_norms = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
    to_left = inverse_norms[:, :, None] * ((v * inverse_root[:, None, :]) @ u[:, :, :p]) * s_kept[:, None, :]
    # A_g = S^-1 U_p^T (B A) = S^-1 U_P^T L^{1/2} V^T D A; zero singular values stay zero.
    inverse_s = torch.where(keep > 0, s[:, :p].reciprocal(), torch.zeros_like(s_kept))
    to_right = (u[:, :, :p].mT @ (v * root[:, None, :]).mT) * inverse_s[:, :, None] * norms[:, None, :]
    return to_left, to_right


def _resolved_spectrum(grams: Callable[[torch.dtype], tuple[Tensor, Tensor]], dtype: torch.dtype, width: int, tolerance: float) -> _GramSpectrum:
    """The spectrum from Gram matrices in `dtype` where they resolve `tolerance`, else in float64:
    decided before from the width, and after from what the spectrum left unresolved (a stack
    whose terms cancel, as a warm start's [B | -B0] does, needs float64 at any width)."""
    precision = working_dtype(dtype, tolerance, gram_share(width))
    spectrum = _gram_spectrum(*grams(precision))
    if precision != torch.float64 and _too_uncertain(spectrum.s, spectrum.unresolved, spectrum.uncertainty, tolerance):
        spectrum = _gram_spectrum(*grams(torch.float64))
    return spectrum


def _too_uncertain(s: Tensor, unresolved: Tensor, uncertainty: Tensor, tolerance: float) -> bool:
    """Whether any module's spectrum may be off by more than `tolerance` of its energy."""
    energy = s.double().square().sum(-1) + unresolved.square()
    return bool((uncertainty > tolerance * energy).any())


def gram_route(B: Tensor, A: Tensor, choose_rank: RankRule, tolerance: float = 0.0) -> Factored:
    """Two R x R eigendecompositions and three large matrix products (see `_gram_spectrum`)."""
    spectrum = _resolved_spectrum(lambda precision: _grams(B, A, precision), B.dtype, B.shape[-1], tolerance)
    ranks = choose_rank(spectrum.s)
    to_left, to_right = _gram_factors(spectrum, ranks)
    return Factored(*_wide_products(B, A, to_left, to_right), spectrum.s, ranks, spectrum.unresolved)


def fold_route(carried: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], choose_rank: RankRule, tolerance: float = 0.0) -> Factored:
    """`gram_route` of the stack [B_c | B_n] [A_c ; A_n] without forming it: the Gram matrices by
    blocks (the cross block once), the outputs as sums of two products. A running decomposition
    (carried, c columns, possibly none) folds in the clients waiting (new) without a copy of itself."""
    (b_carried, a_carried), (b_new, a_new) = carried, new
    c = b_carried.shape[-1]

    def grams(precision: torch.dtype) -> tuple[Tensor, Tensor]:
        def gram(left: Tensor, right: Tensor) -> Tensor:
            return left.to(precision).mT @ right.to(precision)

        def blocks(top: Tensor, cross: Tensor, bottom: Tensor) -> Tensor:
            return torch.cat([torch.cat([top, cross], -1), torch.cat([cross.mT, bottom], -1)], -2)

        b_gram = blocks(gram(b_carried, b_carried), gram(b_carried, b_new), gram(b_new, b_new))
        a_gram = blocks(gram(a_carried.mT, a_carried.mT), gram(a_carried.mT, a_new.mT), gram(a_new.mT, a_new.mT))
        return b_gram, a_gram

    spectrum = _resolved_spectrum(grams, b_new.dtype, c + b_new.shape[-1], tolerance)
    ranks = choose_rank(spectrum.s)
    to_left, to_right = _gram_factors(spectrum, ranks)
    b_global, a_global = _wide_products(b_new, a_new, to_left[:, c:], to_right[:, :, c:])
    carried_left, carried_right = _wide_products(b_carried, a_carried, to_left[:, :c], to_right[:, :, :c])
    return Factored(b_global + carried_left, a_global + carried_right, spectrum.s, ranks, spectrum.unresolved)


# ---------------------------------------------------------------- the qr and svd routes


def _core_spectrum(core_svd: Callable[[torch.dtype], tuple[Tensor, Tensor, Tensor, Tensor]], dtype: torch.dtype, width: int, tolerance: float):
    """(the SVD parts, singular values with what is below the floor zeroed, unresolved)
    for a route whose R x R core is decomposed by an SVD. Its rounding scales with the largest
    singular value and with the root of sum_i ||b_i||^2 ||a_i||^2 (the stack's terms one by one,
    larger as far as they cancel): below `width eps` times that, a value is zero, its true value
    below twice that floor, and each of the `width` may be off by up to that much."""

    def attempt(precision: torch.dtype):
        *parts, s, stack_energy = core_svd(precision)
        floor = (width * torch.finfo(precision).eps * torch.maximum(s[..., :1], stack_energy.sqrt()[..., None]))[:, 0].double()
        resolved = s > floor[:, None]
        unresolved = 2 * floor * (~resolved).sum(-1).double().sqrt()
        return precision, parts, torch.where(resolved, s, torch.zeros_like(s)), unresolved, 4 * floor.square() * width

    precision, parts, s, unresolved, uncertainty = attempt(working_dtype(dtype, tolerance, svd_share(width)))
    if precision != torch.float64 and _too_uncertain(s, unresolved, uncertainty, tolerance):
        precision, parts, s, unresolved, _ = attempt(torch.float64)
    return parts, s, unresolved


def _stack_energy(B: Tensor, A: Tensor) -> Tensor:
    return (B.square().sum(-2) * A.square().sum(-1)).sum(-1)


def qr_route(B: Tensor, A: Tensor, choose_rank: RankRule, tolerance: float = 0.0) -> Factored:
    """B = Q_B R_B and A^T = Q_A R_A; the SVD of the R x R core R_B R_A^T gives that of B A."""

    def core_svd(precision: torch.dtype):
        b, a = B.to(precision), A.to(precision)
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.mT)
        u, s, vh = torch.linalg.svd(r_b @ r_a.mT)
        return q_b, q_a, u, vh, s, _stack_energy(b, a)

    (q_b, q_a, u, vh), s, unresolved = _core_spectrum(core_svd, B.dtype, B.shape[-1], tolerance)
    ranks = choose_rank(s)
    s_kept, keep = _kept(s, ranks)
    p = s_kept.shape[-1]
    left, right = q_b @ (u[:, :, :p] * s_kept[:, None, :]), (vh[:, :p, :] * keep[:, :, None]) @ q_a.mT
    return Factored(left.to(B.dtype), right.to(A.dtype), s, ranks, unresolved)


def svd_route(B: Tensor, A: Tensor, choose_rank: RankRule, tolerance: float = 0.0) -> Factored:
    """The paper's pipeline: thin SVD of each stack, then of P = S_B (V_B^T U_A) S_A."""

    def core_svd(precision: torch.dtype):
        b, a = B.to(precision), A.to(precision)
        u_b, s_b, vh_b = torch.linalg.svd(b, full_matrices=False)
        u_a, s_a, vh_a = torch.linalg.svd(a, full_matrices=False)
        u, s, vh = torch.linalg.svd(s_b[:, :, None] * (vh_b @ u_a) * s_a[:, None, :])
        return u_b, vh_a, u, vh, s, _stack_energy(b, a)

    (u_b, vh_a, u, vh), s, unresolved = _core_spectrum(core_svd, B.dtype, B.shape[-1], tolerance)
    ranks = choose_rank(s)
    s_kept, keep = _kept(s, ranks)
    p = s_kept.shape[-1]
    left, right = u_b @ (u[:, :, :p] * s_kept[:, None, :]), (vh[:, :p, :] * keep[:, :, None]) @ vh_a
    return Factored(left.to(B.dtype), right.to(A.dtype), s, ranks, unresolved)


ROUTES = {"gram": gram_route, "qr": qr_route, "svd": svd_route}


def dense_svd(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of dense updates (G x m x n), for FlexLoRA."""
    return torch.linalg.svd(delta, full_matrices=False)
