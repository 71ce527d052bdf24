"""Low-rank factorisation by SVD, shared by resize, extract and SVD-merge.

By the Eckart–Young–Mirsky theorem the truncated SVD U_r S_r V_rᵀ is the best rank-r approximation of a
matrix in the Frobenius and spectral norms, so every tool that has to fit a ΔW into fewer ranks uses it.
Convolution kernels (out, in, kh, kw) are flattened to (out, in·kh·kw); the right factor becomes a conv with
the original kernel and the left one a 1x1 conv, which is exactly LoRA-C3Lier's down/up pair.

Following sd-scripts, the singular values go with the up factor (up = U_r S_r, down = V_rᵀ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DYNAMIC_METHODS", "Factorisation", "choose_rank", "factorise", "factorise_product"]

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")
MIN_SINGULAR_VALUE = 1e-6  # below this the whole matrix is treated as zero and one rank is kept


@dataclass
class Factorisation:
    """`down`/`up` in LoRA shapes and every singular value of the matrix they approximate."""

    down: torch.Tensor
    up: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def fro_retained(self) -> float:
        """‖S[:r]‖ / ‖S‖: the share of the Frobenius norm the factors keep (1.0 for a zero matrix)."""
        total = float(self.singular_values.square().sum().sqrt())
        if total == 0.0:
            return 1.0
        return float(self.singular_values[: self.rank].square().sum().sqrt()) / total


def choose_rank(
    singular_values: torch.Tensor,
    max_rank: int,
    method: str | None = None,
    param: float | None = None,
    *,
    collapse_zero: bool = False,
) -> int:
    """The rank to keep: `max_rank`, or the dynamic rule of sd-scripts' resize_lora capped at `max_rank`.

    * `sv_ratio` p: keep the singular values larger than S₀ / p;
    * `sv_cumulative` p: keep until Σ S reaches the fraction p of the total;
    * `sv_fro` p: keep until ‖S‖_F reaches the fraction p (Σ S² reaches p²).
    Each index is clamped to [1, n-1] and the rank is index + 1, as in sd-scripts. With `collapse_zero` (resize)
    an all-zero matrix keeps one rank.
    """
    s = singular_values.float()
    n = int(s.numel())
    if method is None:
        rank = max_rank
    else:
        if method not in DYNAMIC_METHODS:
            raise ValueError(f"dynamic method must be one of {DYNAMIC_METHODS}, got {method!r}")
        if param is None:
            raise ValueError(f"dynamic method {method} needs a parameter")
        if method == "sv_ratio":
            index = int((s > s[0] / param).sum())
        elif method == "sv_cumulative":
            index = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(float(param)))) + 1
        else:
            energy = torch.cumsum(s.square(), 0) / s.square().sum()
            index = int(torch.searchsorted(energy, torch.tensor(float(param) ** 2))) + 1
        rank = max(1, min(index, n - 1)) + 1
    if n == 0 or (collapse_zero and float(s[0]) <= MIN_SINGULAR_VALUE):
        return 1
    return max(1, min(rank, max_rank, n))


def _lora_shapes(down: torch.Tensor, up: torch.Tensor, weight_shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, in·kh·kw) and (out, r) matrices reshaped to the LoRA factors of a layer of `weight_shape`."""
    rank = down.shape[0]
    if len(weight_shape) == 4:
        return down.reshape(rank, *weight_shape[1:]), up.reshape(weight_shape[0], rank, 1, 1)
    return down, up


def _clamp(down: torch.Tensor, up: torch.Tensor, quantile: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip both factors at the `quantile` of their joint absolute values (sd-scripts' outlier guard)."""
    if quantile is None or quantile >= 1.0:
        return down, up
    values = torch.cat([up.flatten(), down.flatten()]).abs()
    if values.numel() > 1 << 24:  # torch.quantile refuses very large inputs; a strided sample estimates it
        values = values[:: values.numel() // (1 << 24) + 1]
    limit = torch.quantile(values, quantile)
    return down.clamp(-limit, limit), up.clamp(-limit, limit)


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD U, S, Vᵀ. A wide matrix is decomposed through its transpose (A = U S Vᵀ ⟺ Aᵀ = V S Uᵀ): the
    CPU LAPACK driver takes 2-3 times longer on the wide layout (measured: 1280x5120 3.3 s, its transpose 1.5 s;
    FLUX's 3072x15360 72 s, see benchmarks/README.md), for the same factors up to rounding and signs."""
    if matrix.shape[0] >= matrix.shape[1]:
        return torch.linalg.svd(matrix, full_matrices=False)
    v, s, uh = torch.linalg.svd(matrix.T, full_matrices=False)
    return uh.T, s, v.T


RANDOMIZED_OVERSAMPLING = 16
RANDOMIZED_POWER_ITERATIONS = 6


def _randomized_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading singular triplets by Halko et al.'s randomized range finder (`torch.svd_lowrank`) with 16
    extra columns and 6 power iterations. On a fine-tuning-like ΔW (1280x5120, singular values decaying over three
    decades, plus noise) the rank-32 residual came within 0.1 % of the optimal one at 1/8 of the full SVD's time;
    a ΔW of rank ≤ r + 16 is recovered exactly. Seeded, so an extraction gives the same file every time."""
    q = min(rank + RANDOMIZED_OVERSAMPLING, *matrix.shape)
    with torch.random.fork_rng(devices=[matrix.device] if matrix.device.type == "cuda" else []):
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=RANDOMIZED_POWER_ITERATIONS)
    return u, s, v.T


def factorise(
    delta: torch.Tensor,
    max_rank: int,
    *,
    method: str | None = None,
    param: float | None = None,
    clamp_quantile: float | None = None,
    randomized: bool = False,
) -> Factorisation:
    """Best rank-r LoRA factors of a full ΔW (linear (out, in) or conv (out, in, kh, kw)), in float32.

    `randomized` (a fixed rank only) uses a randomized range finder with power iterations instead of the full
    SVD; `singular_values` then holds only the leading ones it estimated."""
    matrix = delta.reshape(delta.shape[0], -1).float()
    if randomized and method is None:
        u, s, vh = _randomized_svd(matrix, max_rank)
    else:
        u, s, vh = _svd(matrix)
    rank = choose_rank(s, max_rank, method, param)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    down, up = _clamp(down, up, clamp_quantile)
    down, up = _lora_shapes(down, up, delta.shape)
    return Factorisation(down.contiguous(), up.contiguous(), s)


def factorise_product(
    down: torch.Tensor,
    up: torch.Tensor,
    max_rank: int,
    *,
    method: str | None = None,
    param: float | None = None,
    collapse_zero: bool = False,
) -> Factorisation:
    """The SVD of up·down (a rank ≤ r matrix) without forming it: with up = Q_u R_u and downᵀ = Q_d R_d,
    up·down = Q_u (R_u R_dᵀ) Q_dᵀ, so only the small r x r core is decomposed. Cost O((in + out) r²) instead
    of O(in · out · min(in, out)), and the result matches the full SVD of the product.

    `down` is (r, in[, kh, kw]) and `up` (out, r[, 1, 1]); the factors returned have the same layout.
    """
    down_matrix = down.reshape(down.shape[0], -1).float()
    up_matrix = up.reshape(up.shape[0], -1).float()
    q_up, r_up = torch.linalg.qr(up_matrix)
    q_down, r_down = torch.linalg.qr(down_matrix.T)
    u_core, s, vh_core = torch.linalg.svd(r_up @ r_down.T)
    rank = choose_rank(s, max_rank, method, param, collapse_zero=collapse_zero)
    new_up = (q_up @ u_core[:, :rank]) * s[:rank]
    new_down = vh_core[:rank] @ q_down.T
    shape = torch.Size([up.shape[0], *down.shape[1:]])
    new_down, new_up = _lora_shapes(new_down, new_up, shape)
    return Factorisation(new_down.contiguous(), new_up.contiguous(), s)
