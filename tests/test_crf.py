"""tool.crf on a real photo and on a synthetic two-region image."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data, transform

from tool.crf import background_score, crf_inference, crf_with_alpha


@pytest.fixture(scope="module")
def coffee() -> np.ndarray:
    return (transform.resize(data.coffee(), (80, 120), anti_aliasing=True) * 255).astype(np.uint8)


def two_regions(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A red disc on blue with pixel noise, its mask, and noisy two-class scores that know the
    disc only roughly."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:60, :80]
    mask = (yy - 30) ** 2 + (xx - 40) ** 2 < 18 ** 2
    img = np.where(mask[..., None], [200, 40, 40], [30, 90, 200]) + rng.normal(0, 8, (60, 80, 3))
    fg = np.clip(np.where(mask, 0.65, 0.35) + rng.normal(0, 0.3, mask.shape), 0.01, 0.99)
    return np.clip(img, 0, 255).astype(np.uint8), mask, np.stack([1 - fg, fg]).astype(np.float32)


def test_snaps_to_the_region_edges():
    img, mask, probs = two_regions(seed=0)
    before = np.mean((probs.argmax(0) == 1) == mask)
    q = crf_inference(img, probs)
    after = np.mean((q.argmax(0) == 1) == mask)
    assert before < 0.85 and after > 0.99


def test_takes_a_read_only_image(coffee):
    """np.asarray of a PIL image is read-only; pydensecrf wants a writable buffer."""
    read_only = np.asarray(Image.fromarray(coffee))
    assert not read_only.flags.writeable
    probs = np.random.default_rng(3).random((3, *coffee.shape[:2])).astype(np.float32)
    np.testing.assert_array_equal(crf_inference(read_only, probs), crf_inference(coffee.copy(), probs))
    assert not read_only.flags.writeable


def label_changes(label: np.ndarray) -> int:
    return np.count_nonzero(np.diff(label, axis=0)) + np.count_nonzero(np.diff(label, axis=1))


def test_probability_map_on_a_photo(coffee):
    rng = np.random.default_rng(1)
    h, w = coffee.shape[:2]
    probs = rng.random((4, h, w)).astype(np.float32)
    q = crf_inference(coffee, probs)
    assert q.shape == (4, h, w) and q.dtype == np.float32
    np.testing.assert_allclose(q.sum(axis=0), 1, atol=1e-5)
    assert q.min() >= 0
    # The CRF smooths: far fewer label changes between neighbours than the noisy input.
    assert label_changes(q.argmax(0)) < 0.2 * label_changes(probs.argmax(0))


def test_zero_iterations_give_the_clipped_normalised_input(coffee):
    """The unary is -log(clip(p, 1e-5, 1)): without message passing the marginals are p / sum p."""
    rng = np.random.default_rng(2)
    probs = rng.random((3, *coffee.shape[:2])).astype(np.float32)
    probs[0, :5] = 0  # clipped to 1e-5
    clipped = np.clip(probs, 1e-5, 1)
    expected = clipped / clipped.sum(0)
    np.testing.assert_allclose(crf_inference(coffee, probs, t=0), expected, rtol=1e-5, atol=1e-7)


def test_crf_with_alpha_layout(coffee):
    rng = np.random.default_rng(3)
    h, w = coffee.shape[:2]
    cams = rng.random((2, h, w)).astype(np.float32)
    labels, scores = crf_with_alpha(coffee, np.array([15, 7]), cams, alpha=4)
    np.testing.assert_array_equal(labels, [0, 15, 7])
    bg = (1 - np.maximum(cams[0], cams[1])) ** 4
    np.testing.assert_array_equal(scores, crf_inference(coffee, np.stack([bg, cams[0], cams[1]])))
    np.testing.assert_allclose(background_score(cams, 24)[0], (1 - cams.max(0)) ** 24, rtol=1e-6)
    np.testing.assert_array_equal(background_score(cams[:0], 4), np.ones((1, h, w)))


def test_shape_checks(coffee):
    probs = np.full((2, *coffee.shape[:2]), 0.5, np.float32)
    with pytest.raises(ValueError, match="uint8"):
        crf_inference(coffee.astype(np.float32), probs)
    with pytest.raises(ValueError, match="do not match"):
        crf_inference(coffee[:-1], probs)
    with pytest.raises(ValueError, match="labels=3"):
        crf_inference(coffee, probs, labels=3)
    with pytest.raises(ValueError, match="do not match"):
        crf_with_alpha(coffee, np.array([1, 2, 3]), probs, alpha=4)
    with pytest.raises(ValueError, match="foreground"):
        crf_with_alpha(coffee, np.array([0, 2]), probs, alpha=4)
