"""Image transforms on numpy arrays, applied jointly to an image and its maps, and the network
input's normalisation (the one place that knows the ImageNet mean and std).

An image is ``(H, W, 3)`` (uint8 RGB, or float32 once normalised); a *map* is ``(C, H, W)`` or
``(H, W)`` (a boundary map, CRF scores, a label map). Every geometric transform moves the image
and all its maps together, so a pixel and its map entries stay aligned. Every random choice is
drawn from an explicit ``np.random.Generator``: with ``item_rng(seed, epoch, index)`` a training
item is a pure function of those three numbers, whatever process or worker builds it, which is
what bit-exact resumption and multi-process loading rely on.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from skimage.transform import resize as spline_resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one dataset item: independent streams for every (seed, epoch, index)."""
    return np.random.default_rng([seed, epoch, index])


def long_side_size(size: tuple[int, int], target_long: int) -> tuple[int, int]:
    """``(h, w)`` scaled so that the longer side becomes ``target_long`` (rounding as released)."""
    h, w = size
    if w < h:
        return target_long, int(round(w * target_long / h))
    return int(round(h * target_long / w)), target_long


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic PIL resize of a uint8 ``(H, W, 3)`` image to ``size = (h, w)``."""
    if img.shape[:2] == tuple(size):
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), resample=Image.BICUBIC))


def resize_map(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a map to ``size = (h, w)``: nearest for integer (label) maps, else cubic spline.

    The spline follows the released ``skimage.transform.resize(order=3, mode='edge')`` on the
    whole ``(C, H, W)`` array, computed per channel (5x faster, same values to 1e-5) and clipped
    to the input's overall range as that call does. All-zero channels (absent classes) stay zero.
    """
    if m.shape[-2:] == tuple(size):
        return m
    if np.issubdtype(m.dtype, np.integer) or m.dtype == bool:
        rows, cols = (np.minimum(((np.arange(n) + 0.5) * old / n).astype(np.int64), old - 1)
                      for n, old in zip(size, m.shape[-2:], strict=True))
        return m[..., rows[:, None], cols[None, :]]
    channels = m.reshape((-1,) + m.shape[-2:])
    out = np.zeros((channels.shape[0],) + tuple(size), dtype=np.float32)
    for c, channel in enumerate(channels):
        if channel.any():
            out[c] = spline_resize(channel, size, order=3, mode="edge", clip=False)
    np.clip(out, m.min(), m.max(), out=out)
    return out.reshape(m.shape[:-2] + tuple(size))


def random_resize_long(rng: np.random.Generator, img: np.ndarray, maps: Sequence[np.ndarray] = (),
                       min_long: int = 448, max_long: int = 768) -> tuple[np.ndarray, list[np.ndarray]]:
    """Resize so that the longer side is uniform in ``[min_long, max_long]`` (both included)."""
    target_long = int(rng.integers(min_long, max_long + 1))
    size = long_side_size(img.shape[:2], target_long)
    return resize_image(img, size), [resize_map(m, size) for m in maps]


def random_hflip(rng: np.random.Generator, img: np.ndarray,
                 maps: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, list[np.ndarray]]:
    """Mirror left-right with probability 1/2."""
    if rng.random() < 0.5:
        return np.ascontiguousarray(img[:, ::-1]), [np.ascontiguousarray(m[..., ::-1]) for m in maps]
    return img, list(maps)


def random_crop_box(rng: np.random.Generator, size: tuple[int, int],
                    crop_size: int) -> tuple[slice, slice, slice, slice]:
    """``(dst_rows, dst_cols, src_rows, src_cols)`` of a random ``crop_size`` square.

    As released: a side longer than the crop is cut at a random offset; a shorter side is
    placed at a random offset inside the padded square.
    """
    slices = []
    for length in size:
        space = length - crop_size
        kept = min(crop_size, length)
        if space > 0:
            dst, src = 0, int(rng.integers(space + 1))
        else:
            dst, src = int(rng.integers(-space + 1)), 0
        slices.append((slice(dst, dst + kept), slice(src, src + kept)))
    (dst_rows, src_rows), (dst_cols, src_cols) = slices
    return dst_rows, dst_cols, src_rows, src_cols


def random_crop(rng: np.random.Generator, crop_size: int, img: np.ndarray, maps: Sequence[np.ndarray] = (),
                img_fill: float = 0, map_fill: float = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Cut (or pad to) a random ``crop_size`` square; padding is ``img_fill`` / ``map_fill``."""
    dst_rows, dst_cols, src_rows, src_cols = random_crop_box(rng, img.shape[:2], crop_size)
    out_img = np.full((crop_size, crop_size) + img.shape[2:], img_fill, dtype=img.dtype)
    out_img[dst_rows, dst_cols] = img[src_rows, src_cols]
    out_maps = []
    for m in maps:
        out = np.full(m.shape[:-2] + (crop_size, crop_size), map_fill, dtype=m.dtype)
        out[..., dst_rows, dst_cols] = m[..., src_rows, src_cols]
        out_maps.append(out)
    return out_img, out_maps


def color_jitter(rng: np.random.Generator, img: np.ndarray, brightness: float = 0.3, contrast: float = 0.3,
                 saturation: float = 0.3, hue: float = 0.1) -> np.ndarray:
    """torchvision's ``ColorJitter`` on a uint8 ``(H, W, 3)`` image, its parameters drawn from ``rng``.

    Same distribution as ``ColorJitter(brightness, contrast, saturation, hue)`` on a PIL image (the
    released input): factors uniform in ``[max(0, 1 - v), 1 + v]``, hue shift uniform in
    ``[-hue, hue]``, the four adjustments in a random order.
    """
    order = rng.permutation(4)
    factors = [rng.uniform(max(0.0, 1 - v), 1 + v) for v in (brightness, contrast, saturation)]
    factors.append(rng.uniform(-hue, hue))
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    pil = Image.fromarray(img)
    for i in order:
        pil = adjust[i](pil, float(factors[i]))
    return np.asarray(pil)


def hwc_to_chw(img: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` to a contiguous ``(C, H, W)``."""
    return np.ascontiguousarray(img.transpose(2, 0, 1))


def block_mean(m: np.ndarray, k: int) -> np.ndarray:
    """Mean over ``k x k`` blocks of a ``(C, H, W)`` map, zero-padding the ends as released
    (``skimage.measure.block_reduce`` with ``np.mean``)."""
    c, h, w = m.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    padded = np.zeros((c, hp, wp), dtype=np.float32)
    padded[:, :h, :w] = m
    return padded.reshape(c, hp // k, k, wp // k, k).mean(axis=(2, 4))


def released_uint8_cast(x: np.ndarray) -> np.ndarray:
    """The released code's float -> uint8 cast (``x.astype(np.uint8)`` of values outside 0..255),
    made deterministic: truncate toward zero, wrap modulo 256."""
    return (np.trunc(x).astype(np.int64) % 256).astype(np.uint8)


class Normalize:
    """uint8 HWC RGB image -> float32 HWC, ``(img / 255 - mean) / std`` per channel (in float64,
    as the released code computes it)."""

    def __init__(self, mean: tuple[float, float, float] = IMAGENET_MEAN,
                 std: tuple[float, float, float] = IMAGENET_STD) -> None:
        self.mean = mean
        self.std = std

    def __call__(self, img: np.ndarray) -> np.ndarray:
        img = np.asarray(img)
        out = np.empty(img.shape, np.float32)
        for ch in range(3):
            out[..., ch] = (img[..., ch] / 255.0 - self.mean[ch]) / self.std[ch]
        return out


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo :class:`Normalize` on a CHW or NCHW tensor: RGB values on the 0..255 scale (unclipped)."""
    shape = (3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(shape)
    return (x * std + mean) * 255.0
def random_pad_crop(rng: np.random.Generator, crop_size: int, img: np.ndarray, label: np.ndarray,
                    img_fill: float = 0, label_fill: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """deeplab-pytorch's crop: pad the bottom and right up to ``crop_size`` (image ``img_fill``,
    label ``label_fill``), then cut a ``crop_size`` square at a uniform offset."""
    h, w = label.shape
    ph, pw = max(h, crop_size), max(w, crop_size)
    padded_img = np.full((ph, pw) + img.shape[2:], img_fill, dtype=img.dtype)
    padded_img[:h, :w] = img
    padded_label = np.full((ph, pw), label_fill, dtype=label.dtype)
    padded_label[:h, :w] = label
    top, left = int(rng.integers(ph - crop_size + 1)), int(rng.integers(pw - crop_size + 1))
    rows, cols = slice(top, top + crop_size), slice(left, left + crop_size)
    return padded_img[rows, cols], padded_label[rows, cols]
