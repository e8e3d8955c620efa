"""The AffinityNet random walk without the dense transition matrix.

The released code builds the dense ``(HW, HW)`` affinity matrix ``A`` (symmetric, ones on the
diagonal, ``aff`` on every pair within the radius, zero elsewhere), raises it elementwise to
``beta``, normalises its columns (``T = A^beta D^-1``, ``D`` the column sums), squares ``T``
``logt`` times and multiplies: ``cam_vec @ T^(2^logt)``. Here the same product is taken as
``2^logt`` steps ``x <- (x @ A^beta) D^-1``, each a stencil over the pair offsets that costs
O(HW * (2 * num_offsets + 1)) instead of O((HW)^3) per squaring and O(HW) memory instead of
O((HW)^2). The two agree up to floating-point rounding.
"""
from __future__ import annotations

import torch

from tool.affinity import effective_radius, search_offsets, source_window

Slice2d = tuple[slice, slice]


def pair_slices(radius: int, size: tuple[int, int]) -> list[tuple[Slice2d, Slice2d]]:
    """For each offset of :func:`tool.affinity.search_offsets`, the ``(rows, cols)`` slices of the
    source positions and of their partners, in the layout of AffinityNet's output."""
    rows, cols = source_window(radius, size)
    height, width = rows.stop - rows.start, cols.stop - cols.start
    return [((rows, cols), (slice(dy, dy + height), slice(cols.start + dx, cols.start + dx + width)))
            for dy, dx in search_offsets(radius)]


def affinity_product(x: torch.Tensor, weights: torch.Tensor,
                     slices: list[tuple[Slice2d, Slice2d]]) -> torch.Tensor:
    """``x @ A`` for the symmetric pair matrix ``A`` with ones on the diagonal: ``x`` is
    ``(C, h, w)``, ``weights`` ``(num_offsets, src_h, src_w)`` holds ``A`` at each pair."""
    y = x.clone()
    for weight, (src, dst) in zip(weights, slices, strict=True):
        y[:, src[0], src[1]].addcmul_(weight, x[:, dst[0], dst[1]])
        y[:, dst[0], dst[1]].addcmul_(weight, x[:, src[0], src[1]])
    return y


def propagate(cam: torch.Tensor, aff: torch.Tensor, beta: float, logt: int, radius: int = 5) -> torch.Tensor:
    """Random walk of ``cam`` ``(C, h, w)``: ``cam_vec @ T^(2^logt)`` with the released transition
    matrix ``T = A^beta D^-1`` built from AffinityNet's ``aff`` ``(num_offsets, num_sources)``.

    On maps too small for ``radius`` the released fallback radius is used; ``aff`` must have
    its layout (:func:`tool.affinity.get_indices_of_pairs`). Computed in ``cam``'s dtype on
    ``cam``'s device.
    """
    if cam.dim() != 3:
        raise ValueError(f"cam must be (C, h, w), got shape {tuple(cam.shape)}")
    size = (cam.shape[1], cam.shape[2])
    radius = effective_radius(radius, size)
    num_offsets = len(search_offsets(radius))
    if num_offsets == 0:  # a map this small has no pairs: T is the identity
        if aff.numel():
            raise ValueError(f"a {size} map has no pairs, but aff has shape {tuple(aff.shape)}")
        return cam.clone()
    rows, cols = source_window(radius, size)
    src_shape = (rows.stop - rows.start, cols.stop - cols.start)
    if aff.shape != (num_offsets, src_shape[0] * src_shape[1]):
        raise ValueError(f"aff of shape {tuple(aff.shape)} does not fit a {size} map with radius {radius}: "
                         f"expected ({num_offsets}, {src_shape[0] * src_shape[1]})")
    slices = pair_slices(radius, size)
    weights = aff.to(cam).pow(beta).view(num_offsets, *src_shape)
    inv_degree = 1 / affinity_product(torch.ones_like(cam[:1]), weights, slices)
    x = cam
    for _ in range(2 ** logt):
        x = affinity_product(x, weights, slices).mul_(inv_degree)
    return x
