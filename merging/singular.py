"""Task singular vectors: merge task matrices in decorrelated low-rank subspaces (TSV-Merge).

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
https://arxiv.org/abs/2412.00081. Per matrix, each task vector keeps its top `rank // T` singular
triplets (T tasks); the kept left and right singular vectors of all tasks are concatenated and
replaced by their nearest orthonormal sets (the polar factors `P Q^T` of their SVDs `P S Q^T`), so
no task's directions overlap another's; the merged task matrix is `U_perp diag(S) V_perp^T`. All in
float64. Components whose singular value is below `RELATIVE_RANK_TOLERANCE` of the task's largest
are numerically absent and dropped (their singular vectors are arbitrary, and would otherwise
sway the orthogonalization of the others). The weights scale each task's kept singular values
(`TaskSingularBasis.combine`), so a search that changes only weights reuses the basis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RELATIVE_RANK_TOLERANCE = 1e-9


def polar_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to `matrix` (`P Q^T` of its thin SVD `P S Q^T`)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


@dataclass(frozen=True)
class TaskSingularBasis:
    """What a TSV merge of one matrix keeps of its tasks: the orthogonalized singular vectors and
    each task's kept singular values (none for an unchanged task), independent of the weights."""

    shape: tuple[int, int]
    u_perp: torch.Tensor  # [rows, kept]
    v_perp: torch.Tensor  # [cols, kept]
    values: tuple[torch.Tensor, ...]  # per task, its kept singular values, in the column order

    def combine(self, weights: Sequence[float]) -> torch.Tensor:
        """`U_perp diag(w_t * S_t) V_perp^T` (float64): each task's values scaled by its weight."""
        if len(weights) != len(self.values):
            raise ValueError(f"expected {len(self.values)} weights, got {len(weights)}")
        if self.u_perp.shape[1] == 0:
            return torch.zeros(self.shape, dtype=torch.float64)
        scaled = torch.cat([s * w for s, w in zip(self.values, weights, strict=True)])
        return (self.u_perp * scaled) @ self.v_perp.T


def task_singular_basis(deltas: Sequence[torch.Tensor]) -> TaskSingularBasis:
    """The TSV basis of same-shape 2-D task matrices (see the module doc): the expensive part,
    computed once; `combine(weights)` then merges for any weights.

    All-zero matrices take no share of the rank.
    """
    if not deltas:
        raise ValueError("expected at least one task matrix, got none")
    shape = tuple(deltas[0].shape)
    if len(shape) != 2 or any(tuple(d.shape) != shape for d in deltas):
        raise ValueError(f"expected 2-D task matrices of one shape, got {[tuple(d.shape) for d in deltas]}")
    changed = [bool(d.any()) for d in deltas]
    keep = max(1, min(shape) // max(1, sum(changed)))
    lefts, values, rights = [], [], []
    for delta, nonzero in zip(deltas, changed, strict=True):
        if not nonzero:
            values.append(torch.zeros(0, dtype=torch.float64))
            continue
        u, s, vh = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
        kept = int((s[:keep] > RELATIVE_RANK_TOLERANCE * s[0]).sum())
        lefts.append(u[:, :kept])
        values.append(s[:kept])
        rights.append(vh[:kept].T)
    if not lefts:
        empty = torch.zeros(shape[0], 0, dtype=torch.float64), torch.zeros(shape[1], 0, dtype=torch.float64)
        return TaskSingularBasis(shape, *empty, tuple(values))
    u_perp = polar_factor(torch.cat(lefts, dim=1))
    v_perp = polar_factor(torch.cat(rights, dim=1))
    return TaskSingularBasis(shape, u_perp, v_perp, tuple(values))
