"""Secure FLoRIST: the global update from the sum of the clients' sketches, never one client's factors.

A single-pass randomized low-rank approximation (Tropp, Yurtsever, Udell and Cevher 2017). Every
client and the server draw the same test matrices per module from the round's seed: Omega (n x l)
with orthonormal columns and Psi (l' x m) with orthonormal rows, l' = 2l (`widths`; both capped by
the module's sides). A module with fewer rows than columns (m < n: a GQA model's k/v projections,
an MLP's down projection) is sketched as dW^T (`oriented`), so that the wider co-range sketch
multiplies its shorter side. Client k uploads, per module of the sketched matrix's shape m x n,

    Y_k = w_k s_k B_k (A_k Omega)   (m x l)      W_k = w_k s_k (Psi B_k) A_k   (l' x n)

computed from its factors (never m x n but where dW itself is sent, below), and its weight w_k (its examples). The server only SUMS
uploads: Y = sum_k Y_k = N dW Omega and W = N Psi dW with N = sum_k w_k, dW = sum_k p_k s_k B_k A_k.
From the sums: Q = orth(Y), X = (Psi Q)^+ W, and the SVD of X (l x n) gives Q U S V^T ~ dW, whose
rank tau or the download budget picks as FLoRIST's does.

Exactness: when l >= rank(dW) (at most the stacked rank R), range(Y) = range(dW), so Q Q^T dW = dW,
and Psi Q has full column rank (l' >= l, Psi of orthonormal rows in general position), so X = Q^T dW:
the result is dW's SVD, FLoRIST's at tau = 1, up to the rounding of the uploads. Below, dW's
leading spectrum is approximated (BENCHMARKS.md, "Secure FLoRIST from summed sketches").

Where a module's two sketches would hold as many values as dW or more (l >= 116 on a 192 x 576
v_proj, l >= 192 on a 576 x 576 q_proj), the client uploads w_k s_k B_k A_k itself (`DENSE`): the
sum is then N dW, exact and no larger than the sketch it replaces, and the server takes its SVD.

Orthonormal test matrices keep every sketch's norm at most the update's, ||dW Omega||_F <= ||dW||_F
and ||Psi dW||_F <= ||dW||_F: what client-level differential privacy's sensitivity is stated by
(`sketch_sensitivity`). The server computes in float64 whatever the uploads' dtype.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from florist.aggregation.florist import FLoRIST
from florist.aggregation.norms import adapter_norm
from florist.aggregation.types import Aggregate, AggregationError, ClientAdapter, GlobalModule, LoraFactors

WEIGHT = "weight"
"""The upload's key for the client's weight w_k (its examples), summed beside the sketches."""
RANGE, CORANGE, DENSE = "range", "corange", "dense"
"""Suffixes of a module's parts in an upload: `name:range` is Y_k and `name:corange` W_k, or
`name:dense` is w_k s_k B_k A_k where that holds no more values than the two sketches (`upload_parts`)."""
MIN_SKETCH_WIDTH = 8
"""The narrowest automatic sketch: twice the rank a module kept last round, at least this (and in
round 1, before any rank was kept, the widest client rank, at least this: `automatic_widths`).
Below 8 a rank-1 update of a round with several clients would be sketched by 2 columns, whose randomized error (Tropp et al.'s bound, about (1 + l/(l-p-1)))
is large against the components tau keeps."""


def sketch_key(name: str, part: str) -> str:
    return f"{name}:{part}"


def oriented(shape: tuple[int, int]) -> tuple[int, int]:
    """The shape of the matrix a module's sketches are taken of: dW's (m, n) when m >= n, else
    dW^T's (n, m). The co-range sketch is l' = 2l wide along the rows and the range sketch l along
    the columns, so a module uploads rows l + 2l cols values: on a 192 x 576 v_proj, 960 l where
    dW's own orientation would upload 1,344 l."""
    m, n = shape
    return (m, n) if m >= n else (n, m)


def widths(shape: tuple[int, int], width: int) -> tuple[int, int]:
    """(l, l') for a module of this shape: `width` and twice it, each at most what orthonormal test
    matrices of the sketched matrix's sides allow (l <= min(m, n), l' <= max(m, n)). At l = min(m, n)
    the sketch is exact. l' = 2l, not l + a fixed oversampling: on real client adapters, whose spectra have a heavy tail,
    l = k + 16, l' = l + 16 made the reconstruction's error 2.5-2.8x tau 0.9's own (BENCHMARKS.md, "Secure FLoRIST's
    sketch width on real client adapters")."""
    rows, cols = oriented(shape)
    sketch = min(width, cols)
    return sketch, min(2 * sketch, rows)


def upload_parts(shape: tuple[int, int], sides: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """The parts a module of this shape uploads at sketch sides (l, l'), {suffix: shape}: the range
    sketch (rows x l) and the co-range sketch (l' x cols) of the `oriented` matrix, or, where those
    would hold as many values as dW or more, dW itself ({DENSE: shape}): exact and no larger. The
    other orientation never uploads less than both: past the width where it would undercut the
    oriented sketch, l > mn/(m+n), it holds l min(m, n) + m n values, more than dW."""
    rows, cols = oriented(shape)
    sketch, co_sketch = sides
    if rows * sketch + co_sketch * cols >= rows * cols:
        return {DENSE: tuple(shape)}
    return {RANGE: (rows, sketch), CORANGE: (co_sketch, cols)}


def sketch_shapes(shape: tuple[int, int], width: int) -> dict[str, tuple[int, int]]:
    """The shapes of a module's upload at this width (`upload_parts` of its `widths`)."""
    return upload_parts(shape, widths(shape, width))


def sketch_entries(shapes: Mapping[str, tuple[int, int]], module_widths: Mapping[str, int]) -> int:
    """How many values one site's sketch holds: rows l + l' cols a module, or m n where dW is sent (`sketch_shapes`)."""
    return sum(math.prod(part) for name, shape in shapes.items() for part in sketch_shapes(shape, module_widths[name]).values())


def _module_seed(seed: int, name: str) -> int:
    # crc32, not hash(): Python's string hash differs between processes.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def automatic_widths(shapes: Mapping[str, tuple[int, int]], kept: Mapping[str, int] | None, first: int) -> dict[str, int]:
    """Each module's sketch width l: twice the rank it kept last round (`kept`), at least
    MIN_SKETCH_WIDTH, and at most min(m, n), where the sketch is exact. Per module, not the widest
    module's: tau keeps 62-64 ranks in some modules where the mean keeps ~38 (BENCHMARKS.md, issue 21).
    Round 1 (`kept` None) sizes every module at `first` (the widest client rank), at least the floor."""
    return {
        name: min(max(MIN_SKETCH_WIDTH, first if kept is None else 2 * kept[name]), m, n)
        for name, (m, n) in shapes.items()
    }


def widest_within(shape: tuple[int, int], values: float) -> int:
    """The widest l whose sketch (`sketch_entries`) holds at most `values` values; 0 if none does."""
    return max((width for width in range(1, min(shape) + 1) if sketch_entries({"": shape}, {"": width}) <= values), default=0)


class _RoundMatrices:
    """The test matrices of one round's seed, drawn once per module and shared by every site in the
    process (the inline engine runs them all) and the server. A new seed drops the last round's: a
    round's matrices are up to 8 (n l + l' m) bytes a module (190 MiB for the embedded model at its
    widest), which kept for every round would grow by that each round."""

    def __init__(self):
        self.seed: int | None = None
        self.matrices: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.lock = threading.Lock()

    def get(self, seed: int, key: tuple, draw: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        with self.lock:
            if seed != self.seed:
                self.seed, self.matrices = seed, {}
            if key not in self.matrices:
                self.matrices[key] = draw()
            return self.matrices[key]


_ROUND_MATRICES = _RoundMatrices()


def sketching_matrices(seed: int, name: str, shape: tuple[int, int], sides: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(Omega, Psi) of module `name` for the round's `seed` and its sketch's (l, l') `sides`: float64,
    the same in every process (torch.Generator on the CPU), Omega n x l with orthonormal columns, Psi
    l' x m with orthonormal rows, (m, n) the `oriented` shape. Omega is drawn first, so l' does not change it."""
    return _ROUND_MATRICES.get(seed, (name, tuple(shape), tuple(sides)), lambda: _draw_matrices(seed, name, shape, sides))


def _draw_matrices(seed: int, name: str, shape: tuple[int, int], sides: tuple[int, int]) -> tuple[Tensor, Tensor]:
    m, n = shape
    sketch, co_sketch = sides
    if not (1 <= sketch <= min(m, n) and sketch <= co_sketch <= m):
        raise AggregationError(f"sketch widths (l, l') = {sides} do not fit a {m}x{n} module: need 1 <= l <= min(m, n), l <= l' <= m", module=name)
    generator = torch.Generator().manual_seed(_module_seed(seed, name))
    omega = torch.linalg.qr(torch.randn(n, sketch, generator=generator, dtype=torch.float64))[0]
    psi = torch.linalg.qr(torch.randn(m, co_sketch, generator=generator, dtype=torch.float64))[0].mT.contiguous()
    return omega, psi


def client_sketch(
    modules: Mapping[str, LoraFactors], weight: float, seed: int, widths: Mapping[str, tuple[int, int]], dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """What client k uploads: w_k s_k B_k (A_k Omega) and w_k s_k (Psi B_k) A_k per module, each
    module's sketches `widths[name]` = (l, l') wide, and w_k, computed in float64 from its factors
    and returned in `dtype`; of B_k A_k's transpose where the module is `oriented` so, and w_k s_k
    B_k A_k itself where the sketches would be as large (`upload_parts`). The server only adds
    uploads up."""
    if not (math.isfinite(weight) and weight > 0):
        raise AggregationError(f"a sketch's weight must be a positive number, got {weight}")
    upload = {WEIGHT: torch.tensor(float(weight), dtype=torch.float64)}
    for name, factors in modules.items():
        b, a = factors.B.double(), factors.A.double() * (weight * factors.scale)
        if DENSE in upload_parts(factors.shape, widths[name]):
            upload[sketch_key(name, DENSE)] = (b @ a).to(dtype)
            continue
        shape = oriented(factors.shape)
        omega, psi = sketching_matrices(seed, name, shape, widths[name])
        if shape != factors.shape:
            b, a = a.mT, b.mT
        upload[sketch_key(name, RANGE)] = (b @ (a @ omega)).to(dtype)
        upload[sketch_key(name, CORANGE)] = ((psi @ b) @ a).to(dtype)
    return upload


def clip_to_norm(modules: Mapping[str, LoraFactors], clip_norm: float) -> tuple[dict[str, LoraFactors], float]:
    """The update scaled to Frobenius norm at most `clip_norm` (over all modules together, measured
    from the factors' Gram matrices), and the factor it was scaled by (1 within the clip)."""
    norm = adapter_norm(modules)
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    return {name: LoraFactors(A=f.A, B=f.B, scale=f.scale * factor) for name, f in modules.items()}, factor


def sketch_sensitivity(clip_norm: float) -> float:
    """The L2 norm one client's sketches can have, at weight 1, when its update's norm is at most
    `clip_norm`: sqrt(||D Omega||^2 + ||Psi D||^2) <= sqrt(2) ||D||_F for test matrices of
    orthonormal columns and rows, summed over modules; a module sent whole (`DENSE`) adds ||D||_F^2,
    less, so the bound holds for any mix."""
    return math.sqrt(2) * clip_norm


def add_noise(upload: Mapping[str, Tensor], std: float, generator: torch.Generator) -> dict[str, Tensor]:
    """Gaussian noise of standard deviation `std` on every sketch entry (not on the weight). The
    generator must be the client's own secret one: noise the server could draw it could subtract."""
    return {
        key: value if key == WEIGHT else (value.double() + std * torch.randn(value.shape, generator=generator, dtype=torch.float64)).to(value.dtype)
        for key, value in upload.items()
    }


class SketchSum:
    """The sum of a round's uploads, added as they come (memory independent of the number of
    clients); `result()` reconstructs the global update. It never keeps one upload apart."""

    def __init__(self, aggregator: SecureFLoRIST, seed: int, shapes: Mapping[str, tuple[int, int]]):
        self.aggregator = aggregator
        self.seed = seed
        self.shapes = dict(shapes)
        self.sums: dict[str, Tensor] | None = None
        self.resolution = 0.0
        """The largest machine epsilon among the uploads' dtypes: how finely the sums resolve dW."""
        self.count = 0

    def add(self, upload: Mapping[str, Tensor]) -> None:
        # Each module as dW itself or as its two sketches; which one, the round's first upload fixes.
        expected = set(self.sums) if self.sums is not None else {WEIGHT} | {
            sketch_key(name, part) for name in self.shapes for part in ((DENSE,) if sketch_key(name, DENSE) in upload else (RANGE, CORANGE))
        }
        if set(upload) != expected:
            odd = sorted(set(upload) ^ expected)[0]
            raise AggregationError(f"a sketch upload's keys differ from the round's modules at {odd!r}")
        if self.sums is not None:
            for key, value in upload.items():
                if value.shape != self.sums[key].shape:
                    raise AggregationError(f"sketch {key} is {tuple(value.shape)}, the round's are {tuple(self.sums[key].shape)}")
        if not all(bool(torch.isfinite(value.sum())) for value in upload.values()):
            raise AggregationError("a sketch upload holds NaN or Inf values")
        self.resolution = max(self.resolution, *(torch.finfo(value.dtype).eps for value in upload.values()))
        wide = {key: value.double() for key, value in upload.items()}
        self.sums = wide if self.sums is None else {key: total + wide[key] for key, total in self.sums.items()}
        self.count += 1

    def result(self) -> Aggregate:
        if self.sums is None:
            raise AggregationError("no sketches to aggregate")
        return self.aggregator.reconstruct(self.sums, self.seed, self.shapes, self.resolution)


@dataclass(frozen=True)
class SecureFLoRIST(FLoRIST):
    """FLoRIST from summed sketches: the rank options (tau, max_rank, a download budget) as FLoRIST's;
    `sketch_width` the l of every module's sketch in `aggregate` (a federation sends per-module widths
    each round, federation/secure.py)."""

    sketch_width: int = 2 * MIN_SKETCH_WIDTH

    name = "florist-secure"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sketch_width < 1:
            raise AggregationError(f"sketch_width must be >= 1, got {self.sketch_width}")

    def sum_of_sketches(self, seed: int, shapes: Mapping[str, tuple[int, int]]) -> SketchSum:
        return SketchSum(self, seed, shapes)

    def aggregate(self, clients: Sequence[ClientAdapter], seed: int = 0) -> Aggregate:
        """The secure aggregate of clients held in the clear (tests, benchmarks): each sketched, summed."""
        if not clients:
            raise AggregationError("no client adapters to aggregate")
        if any(client.dense for client in clients):
            raise AggregationError("florist-secure sums LoRA sketches only; tensors trained in full are not supported")
        shapes = {name: factors.shape for name, factors in clients[0].modules.items()}
        sides = {name: widths(shape, self.sketch_width) for name, shape in shapes.items()}
        total = self.sum_of_sketches(seed, shapes)
        for k, client in enumerate(clients):
            try:
                total.add(client_sketch(client.modules, client.weight, seed, sides, client_dtype(client)))
            except AggregationError as error:
                raise AggregationError(str(error), client=k) from None
        return total.result()

    def combine(self, batch):
        raise NotImplementedError("florist-secure never sees a batch of client factors")

    def reconstruct(self, sums: Mapping[str, Tensor], seed: int, shapes: Mapping[str, tuple[int, int]], resolution: float) -> Aggregate:
        """The global update from the summed sketches (float64), its rank by tau or the budget."""
        total = sums[WEIGHT].item()
        if not total > 0:
            raise AggregationError(f"the sketches' weights sum to {total}; at least one must be positive")
        # Float64 uploads (tests, references) give float64 factors; the federation's float32 ones, float32.
        dtype = torch.float64 if resolution <= torch.finfo(torch.float64).eps else torch.float32
        modules = {}
        for name, shape in shapes.items():
            parts = {part: sums[key] / total for part in (RANGE, CORANGE, DENSE) if (key := sketch_key(name, part)) in sums}
            left, right, s, missed = _module_low_rank(parts, seed, name, shape, resolution)
            # tau's share is of dW's whole energy: the sketch's spectrum plus an estimate of what it missed.
            rank = min(int(self.rank_rule(shape)(torch.cat([s, missed.sqrt()[None]])[None])[0]), len(s))
            s_kept = s[:rank]
            keep = s_kept > 0
            modules[name] = GlobalModule(
                A=(right[:rank] * keep[:, None]).to(dtype).contiguous(),
                B=(left[:, :rank] * (s_kept * keep)).to(dtype).contiguous(),
                singular_values=s,
            )
        return Aggregate(modules=self.spend_budget(modules))


def client_dtype(client: ClientAdapter) -> torch.dtype:
    """What a client in the clear uploads its sketch in: float64 if its factors are, else float32."""
    dtypes = {t.dtype for f in client.modules.values() for t in (f.A, f.B)}
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _module_low_rank(parts: Mapping[str, Tensor], seed: int, name: str, shape: tuple[int, int], resolution: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(left, right, S, missed) with left diag(S) right ~ dW of module `name` from its summed upload
    `parts` divided by the weight: dW itself (its SVD), or its sketches, of dW^T where `oriented` so."""
    if DENSE in parts:
        u, s, vh = _svd_above(parts[DENSE], resolution)
        return u, vh, s, torch.zeros((), dtype=s.dtype)
    y, w = parts[RANGE], parts[CORANGE]
    _, psi = sketching_matrices(seed, name, oriented(shape), (y.shape[1], w.shape[0]))
    left, right, s, missed = _low_rank(y, w, psi, resolution)
    if oriented(shape) != shape:  # the sketches were of dW^T = left S right
        left, right = right.mT, left.mT
    return left, right, s, missed


def _svd_above(x: Tensor, resolution: float) -> tuple[Tensor, Tensor, Tensor]:
    """x's thin SVD, a singular value below the uploads' resolution (eps of the largest) set to zero:
    a direction that is rounding, not dW. One eps, not l eps: at l = R = 152 (fp32, BENCHMARKS.md)
    l eps cut 114 components to 92 and left 1.6e-5 of dW; eps keeps 119 and leaves 2.9e-7, below
    plain FLoRIST's 4.0e-7."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    floor = resolution * (s[:1] if len(s) else s)
    return u, torch.where(s > floor, s, torch.zeros_like(s)), vh


def _low_rank(y: Tensor, w: Tensor, psi: Tensor, resolution: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Q U, V^T, S, missed) with Q U S V^T ~ dW from Y = dW Omega, W = Psi dW (`_svd_above`).

    `missed` estimates ||(I - Q Q^T) dW||_F^2, the energy outside the sketch's range: Psi sees
    l'/m of any fixed matrix's energy in expectation, and W - (Psi Q) X = Psi (I - Q Q^T) dW up to
    the least-squares fit, so (m / l') ||W - (Psi Q) X||^2 (0 where l covers dW's rank)."""
    q = torch.linalg.qr(y)[0]
    projected = psi @ q
    x = torch.linalg.lstsq(projected, w).solution
    u, s, vh = _svd_above(x, resolution)
    floor = resolution * s[:1]
    residual = (w - projected @ x).square().sum()
    missed = torch.where(residual > floor.square().sum() * w.shape[0], residual * psi.shape[1] / psi.shape[0], torch.zeros_like(residual))
    return q @ u, vh, s, missed
