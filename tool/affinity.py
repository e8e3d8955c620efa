"""Pixel pairs within a radius on the 1/8 feature map, shared by AffinityNet, its labels and the
random walk.

A pair links a *source* position to one of ``len(search_offsets(radius))`` later positions
(34 for radius 5). Sources are the positions ``[0 : h - r + 1, r - 1 : w - r + 1]`` with
``r = radius``, so that every offset lands inside the map; this is the released layout, and
AffinityNet's output ``(N, num_offsets, num_sources)`` follows it.
"""
from __future__ import annotations

import numpy as np


def search_offsets(radius: int) -> list[tuple[int, int]]:
    """The ``(dy, dx)`` offsets of the half-disc of radius ``radius``, in the released order."""
    offsets = [(0, dx) for dx in range(1, radius)]
    for dy in range(1, radius):
        for dx in range(-radius + 1, radius):
            if dx * dx + dy * dy < radius * radius:
                offsets.append((dy, dx))
    return offsets


def effective_radius(radius: int, size: tuple[int, int]) -> int:
    """The radius the released code falls back to on maps too small for ``radius``."""
    min_edge = min(size)
    return (min_edge - 1) // 2 if min_edge < radius * 2 + 1 else radius


def source_window(radius: int, size: tuple[int, int]) -> tuple[slice, slice]:
    """Rows and columns of the source positions of a ``size = (h, w)`` map."""
    r = radius - 1
    return slice(0, size[0] - r), slice(r, size[1] - r)


def get_indices_of_pairs(radius: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices ``(from, to)``: ``from`` has one entry per source position, ``to`` has
    ``num_offsets * num_sources`` entries, offset-major."""
    h, w = size
    r = radius - 1
    full = np.arange(h * w, dtype=np.int64).reshape(h, w)
    rows, cols = source_window(radius, size)
    ind_from = full[rows, cols].reshape(-1)
    ch, cw = h - r, w - 2 * r
    ind_to = np.concatenate([full[dy:dy + ch, r + dx:r + dx + cw].reshape(-1)
                             for dy, dx in search_offsets(radius)])
    return ind_from, ind_to


def extract_affinity_labels(label: np.ndarray, radius: int,
                            ignore_index: int = 255) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affinity targets of a label map at 1/8 resolution, each ``(num_offsets, num_sources)``.

    ``bg_pos``: both ends background; ``fg_pos``: both ends the same foreground class;
    ``neg``: both ends labelled with different classes. Pairs touching ``ignore_index`` are in
    none of the three.
    """
    h, w = label.shape
    r = radius - 1
    rows, cols = source_window(radius, (h, w))
    src = label[rows, cols].reshape(1, -1)
    ch, cw = h - r, w - 2 * r
    dst = np.stack([label[dy:dy + ch, r + dx:r + dx + cw].reshape(-1) for dy, dx in search_offsets(radius)])
    valid = (src != ignore_index) & (dst != ignore_index)
    same = src == dst
    bg_pos = (same & (src == 0)).astype(np.float32)
    fg_pos = (same & (src != 0) & valid).astype(np.float32)
    neg = (~same & valid).astype(np.float32)
    return bg_pos, fg_pos, neg
