"""Singular-value tails of matrix unfoldings: cheap error estimates without decomposing.

``tails[r] = sum_{j >= r} s_j^2`` is the squared Frobenius error of the best rank-``r``
approximation of a matrix (Eckart-Young). Sums and maxima of such tails over the unfoldings of a
tensor bound the errors of TT-SVD [1]_ and truncated HOSVD [2]_ and lower-bound CP [3]_; the rank
allocator and the ``auto`` format use them to compare ranks without running a decomposition.

References
----------
.. [1] I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 33(5), 2011, Thm. 2.2.
.. [2] L. De Lathauwer, B. De Moor, J. Vandewalle, "A Multilinear Singular Value Decomposition",
       SIAM J. Matrix Anal. Appl. 21(4), 2000, Property 10.
.. [3] T. G. Kolda and B. W. Bader, "Tensor Decompositions and Applications", SIAM Review 51(3), 2009.
"""

from __future__ import annotations

import torch

from ttcompress.decompose._threads import at_most_threads

__all__ = ["singular_tails", "unfold"]


def singular_tails(mat: torch.Tensor) -> torch.Tensor:
    """``tails[r]`` = squared error of the best rank-``r`` approximation of ``mat``, r = 0..min(m, n).

    Parameters
    ----------
    mat : torch.Tensor
        A 2-D tensor (any float dtype; computed in float64).

    Returns
    -------
    torch.Tensor
        float64, length ``min(m, n) + 1``, non-increasing, ending with 0.
    """
    if not isinstance(mat, torch.Tensor) or mat.dim() != 2:
        raise ValueError(f"mat must be a 2-D tensor, got {getattr(mat, 'shape', type(mat).__name__)}")
    a = mat.detach().to(torch.float64)
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a  # squared singular values = its eigenvalues
    with at_most_threads(1):  # symmetric eigensolvers on busy cores: see at_most_threads
        s2 = torch.linalg.eigvalsh(gram).clamp_min(0.0).flip(0)  # descending
    sq = s2.flip(0).cumsum(0).flip(0)
    return torch.cat([sq, sq.new_zeros(1)])


def unfold(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """Mode-``mode`` unfolding: that mode's index on the rows, all others on the columns."""
    if not 0 <= mode < tensor.dim():
        raise ValueError(f"mode must be in [0, {tensor.dim()}), got {mode}")
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)
