"""tool.randomwalk.propagate against the released dense transition matrix, rebuilt here in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tool.randomwalk import propagate


def fallback_radius(radius: int, h: int, w: int) -> int:
    """The released AffinityNet's radius on a map too small for ``radius``."""
    min_edge = min(h, w)
    return (min_edge - 1) // 2 if min_edge < 2 * radius + 1 else radius


def released_pairs(radius: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``(from, to, num_offsets)`` of every pair, offset-major, written out as the released
    get_indices_of_pairs does."""
    radius = fallback_radius(radius, h, w)
    offsets = [(0, x) for x in range(1, radius)]
    offsets += [(y, x) for y in range(1, radius) for x in range(-radius + 1, radius)
                if x * x + y * y < radius * radius]
    pairs_from, pairs_to = [], []
    for dy, dx in offsets:
        for y in range(0, h - radius + 1):
            for x in range(radius - 1, w - radius + 1):
                pairs_from.append(y * w + x)
                pairs_to.append((y + dy) * w + x + dx)
    return np.array(pairs_from, dtype=np.int64), np.array(pairs_to, dtype=np.int64), len(offsets)


def dense_walk(cam: np.ndarray, aff: np.ndarray, beta: float, logt: int, radius: int) -> np.ndarray:
    """infer_aff.py in float64: dense symmetric A with ones on the diagonal, A^beta, columns
    normalised, squared logt times, ``cam_vec @ T``."""
    c, h, w = cam.shape
    pairs_from, pairs_to, _ = released_pairs(radius, h, w)
    a = np.eye(h * w)
    a[pairs_from, pairs_to] = aff.reshape(-1)
    a[pairs_to, pairs_from] = aff.reshape(-1)
    trans = a ** beta
    trans /= trans.sum(axis=0, keepdims=True)
    for _ in range(logt):
        trans = trans @ trans
    return (cam.reshape(c, -1) @ trans).reshape(c, h, w)


def random_inputs(num_channels: int, h: int, w: int, radius: int,
                  seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    cam = torch.rand(num_channels, h, w, generator=gen, dtype=torch.float64)
    pairs_from, _, num_offsets = released_pairs(radius, h, w)
    shape = (num_offsets, pairs_from.size // num_offsets)
    aff = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    return cam, aff


@pytest.mark.parametrize("h, w, radius, logt, beta", [
    (12, 14, 5, 3, 8.0),    # full radius 5: 34 offsets
    (11, 16, 5, 0, 1.0),    # one step
    (16, 13, 3, 4, 2.5),    # radius 3, non-integer beta
    (9, 20, 5, 2, 8.0),     # 9 < 11: the released fallback radius 4
    (7, 7, 5, 5, 4.0),      # fallback radius 3
])
def test_equals_dense_float64(h, w, radius, logt, beta):
    cam, aff = random_inputs(3, h, w, radius, seed=h * w + logt)
    expected = dense_walk(cam.numpy(), aff.numpy(), beta, logt, radius)
    ours = propagate(cam, aff, beta=beta, logt=logt, radius=radius)
    assert ours.dtype == torch.float64 and ours.shape == cam.shape
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-10, atol=1e-12)

    ours32 = propagate(cam.float(), aff.float(), beta=beta, logt=logt, radius=radius)
    assert ours32.dtype == torch.float32
    np.testing.assert_allclose(ours32.numpy(), expected, rtol=1e-4)
    assert np.array_equal(ours32.argmax(0).numpy(), expected.argmax(0))


def test_walk_smooths_towards_neighbours():
    """Sanity of the orientation: a walk on uniform affinities spreads a single peak."""
    cam, aff = random_inputs(1, 15, 15, 5, seed=1)
    cam = torch.zeros_like(cam)
    cam[0, 7, 7] = 1.0
    walked = propagate(cam, torch.ones_like(aff), beta=1, logt=2, radius=5)
    assert walked[0, 7, 7] < 1 and (walked > 0).sum() > 1
    expected = dense_walk(cam.numpy(), np.ones(aff.shape), 1, 2, 5)
    np.testing.assert_allclose(walked.numpy(), expected, rtol=1e-10)


def test_channels_are_independent():
    cam, aff = random_inputs(4, 13, 12, 5, seed=2)
    together = propagate(cam, aff, beta=8, logt=3)
    for c in range(4):
        alone = propagate(cam[c:c + 1], aff, beta=8, logt=3)
        torch.testing.assert_close(together[c:c + 1], alone, rtol=1e-12, atol=0)
    # The walk is linear in the CAM.
    torch.testing.assert_close(propagate(2 * cam[:1] + cam[1:2], aff, 8, 3),
                               2 * together[:1] + together[1:2], rtol=1e-10, atol=1e-12)


def test_radius_fallback_and_tiny_maps():
    cam, aff = random_inputs(2, 9, 30, 5, seed=3)
    assert aff.shape == (22, (9 - 3) * (30 - 6))  # radius 4 on a map 9 high
    with pytest.raises(ValueError, match="does not fit"):  # the layout of radius 5
        propagate(cam, torch.rand(34, (9 - 4) * (30 - 8), dtype=torch.float64), beta=8, logt=1)
    tiny = torch.rand(3, 4, 6, dtype=torch.float64)  # radius falls to 1: no pairs, the identity
    torch.testing.assert_close(propagate(tiny, torch.zeros(0, 0, dtype=torch.float64), beta=8, logt=6), tiny)
    with pytest.raises(ValueError, match="no pairs"):
        propagate(tiny, torch.ones(3, 5), beta=8, logt=6)
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        propagate(tiny[0], aff, beta=8, logt=1)
