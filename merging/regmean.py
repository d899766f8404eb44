"""RegMean: merge linear layers so each expert's outputs on its own inputs are kept (least squares).

Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
https://arxiv.org/abs/2212.09849. For a linear layer `y = W x` and each task `i` with the Gram
matrix `G_i = X_i^T X_i` of the layer's inputs on that task's data, the merged weight minimizing
`sum_i ||X_i W^T - X_i W_i^T||^2` is `W = (sum_i W_i G_i)(sum_i G_i)^-1`. Written on task vectors
(`W_i = W_0 + D_i`), `W = W_0 + (sum_i D_i G_i)(sum_i G_i)^-1`. The paper shrinks each Gram's
off-diagonal entries by `alpha` (`alpha G + (1 - alpha) diag(G)`), which keeps the sum well
conditioned; a per-task weight scales its Gram. All in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# added to the summed Gram's diagonal, relative to its mean diagonal entry: input features no task
# ever activates (a zero row and column) would otherwise make the system singular
RELATIVE_RIDGE = 1e-9


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """`alpha * gram + (1 - alpha) * diag(gram)`: the paper's regularized Gram."""
    return gram * alpha + torch.diag(torch.diagonal(gram)) * (1.0 - alpha)


def regmean_delta(
    deltas: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], weights: Sequence[float], alpha: float
) -> torch.Tensor:
    """`(sum_i w_i D_i G_i)(sum_i w_i G_i)^-1` for task matrices `D_i` `[out, in]` and input Grams
    `G_i` `[in, in]` (regularized by `alpha`, see the module doc), in float64."""
    if not deltas or not (len(deltas) == len(grams) == len(weights)):
        counts = f"{len(deltas)}, {len(grams)}, {len(weights)}"
        raise ValueError(f"expected as many task matrices, Grams and weights (>= 1), got {counts}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"expected alpha in [0, 1], got {alpha}")
    rows, width = deltas[0].shape
    total = torch.zeros(width, width, dtype=torch.float64)
    numerator = torch.zeros(rows, width, dtype=torch.float64)
    for delta, gram, weight in zip(deltas, grams, weights, strict=True):
        if tuple(delta.shape) != (rows, width) or tuple(gram.shape) != (width, width):
            raise ValueError(
                f"expected task matrices of shape {(rows, width)} and Grams of {(width, width)}, "
                f"got {tuple(delta.shape)} and {tuple(gram.shape)}"
            )
        regularized = shrink_off_diagonal(gram.to(torch.float64), alpha) * weight
        total += regularized
        numerator += delta.to(torch.float64) @ regularized
    ridge = RELATIVE_RIDGE * float(torch.diagonal(total).mean().clamp_min(torch.finfo(torch.float64).tiny))
    total += torch.eye(width, dtype=torch.float64) * ridge
    return torch.linalg.solve(total, numerator.T).T  # total is symmetric: (N total^-1)^T = total^-1 N^T
