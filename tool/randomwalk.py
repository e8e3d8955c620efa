"""The AffinityNet random walk without the dense transition matrix.

The released code builds the dense ``(HW, HW)`` affinity matrix ``A`` (symmetric, ones on the
diagonal, ``aff`` on every pair within the radius, zero elsewhere), raises it elementwise to
``beta``, normalises its columns (``T = A^beta D^-1``, ``D`` the column sums), squares ``T``
``logt`` times and multiplies: ``cam_vec @ T^(2^logt)``. Here ``A^beta`` is kept sparse (at most
``2 * num_offsets + 1`` entries a row) and the same product is taken as ``2^logt`` steps
``x <- (x @ A^beta) D^-1``: O(HW * (2 * num_offsets + 1)) work a step instead of O((HW)^3) a
squaring, O(HW) memory instead of O((HW)^2). The two agree up to floating-point rounding.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from tool.affinity import effective_radius, get_indices_of_pairs, search_offsets, source_window


def sparse_layout(radius: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR structure of the symmetric pair matrix of a ``size`` map: ``(order, crow, col)``.

    Its entries are, in this order, every pair ``(from, to)`` of AffinityNet's output, every pair
    mirrored, and the diagonal; ``order`` sorts them by row and column, the layout CSR needs.
    """
    area = size[0] * size[1]
    ind_from, ind_to = get_indices_of_pairs(radius, size)
    ind_from = np.tile(ind_from, len(search_offsets(radius)))
    diagonal = np.arange(area)
    rows = np.concatenate([ind_from, ind_to, diagonal])
    cols = np.concatenate([ind_to, ind_from, diagonal])
    order = np.argsort(rows * area + cols, kind="stable")
    crow = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=area))])
    return order, crow, cols[order]


def transition_matrix(aff: torch.Tensor, beta: float, radius: int,
                      size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A^beta as a sparse CSR matrix, 1 / its row sums)``; ``A`` is symmetric, so its row sums
    are the released column sums."""
    order, crow, col = sparse_layout(radius, size)
    weights = aff.reshape(-1).pow(beta)
    area = size[0] * size[1]
    values = torch.cat([weights, weights, weights.new_ones(area)])[torch.from_numpy(order).to(aff.device)]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        matrix = torch.sparse_csr_tensor(torch.from_numpy(crow).to(aff.device),
                                         torch.from_numpy(col).to(aff.device), values, (area, area),
                                         check_invariants=False)
    return matrix, 1 / (matrix @ weights.new_ones(area, 1))


def propagate(cam: torch.Tensor, aff: torch.Tensor, beta: float, logt: int,
              radius: int = 5) -> torch.Tensor:
    """Random walk of ``cam`` ``(C, h, w)``: ``cam_vec @ T^(2^logt)`` with the released transition
    matrix ``T = A^beta D^-1`` built from AffinityNet's ``aff`` ``(num_offsets, num_sources)``.

    On maps too small for ``radius`` the released fallback radius is used; ``aff`` must have
    its layout (:func:`tool.affinity.get_indices_of_pairs`). Computed in ``cam``'s dtype on
    ``cam``'s device.
    """
    if cam.dim() != 3:
        raise ValueError(f"cam must be (C, h, w), got shape {tuple(cam.shape)}")
    num_channels, h, w = cam.shape
    radius = effective_radius(radius, (h, w))
    num_offsets = len(search_offsets(radius))
    if num_offsets == 0:  # a map this small has no pairs: T is the identity
        if aff.numel():
            raise ValueError(f"a {(h, w)} map has no pairs, but aff has shape {tuple(aff.shape)}")
        return cam.clone()
    rows, cols = source_window(radius, (h, w))
    num_sources = (rows.stop - rows.start) * (cols.stop - cols.start)
    if aff.shape != (num_offsets, num_sources):
        raise ValueError(f"aff of shape {tuple(aff.shape)} does not fit a {(h, w)} map with radius "
                         f"{radius}: expected ({num_offsets}, {num_sources})")
    matrix, inv_degree = transition_matrix(aff.to(cam), beta, radius, (h, w))
    # x @ A = (A x^T)^T for the symmetric A: walk the columns of x^T.
    x = cam.reshape(num_channels, h * w).T.contiguous()
    for _ in range(2 ** logt):
        x = (matrix @ x).mul_(inv_degree)
    return x.T.reshape(num_channels, h, w)
