"""File formats and atomic writes shared by every stage.

One score-map format serves CAMs, random-walk inputs and CRF outputs: an ``.npz`` holding
``labels`` (int64, K) and ``scores`` (float, K x H x W), where ``labels`` are segmentation class
indices (0 = background, c = foreground class c). A CAM file holds foreground classes only; a CRF
file holds the background too. Nothing is pickled: the released code's ``.npy`` dicts are read
only when the caller passes ``allow_pickle=True``.

The other formats: images (:func:`read_image`), label PNGs in the VOC palette, image lists and
semantic boundary maps (``NAME.npz`` holding ``sb_map`` as uint8, ``round(255 * value)``).

A run that writes into a folder holds the folder's lock (:func:`hold_folder`), so that two runs
never fill one folder at the same time.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from tool.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The array name inside a boundary-map file.
SB_MAP_KEY = "sb_map"
# What np.load raises on a missing key, a truncated, corrupt or foreign .npy/.npz file.
ARRAY_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
# The lock file of a folder that a run writes into (hidden, so never taken for an output).
LOCK_NAME = ".lock"
# atomic_path's temporary of NAME: ``.NAME.XXXXXXXX.tmpSUFFIX`` (mkstemp's random characters).
_TEMPORARY = re.compile(r"\.(.+)\.[a-z0-9_]+\.tmp(\.[^.]*)?")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file under the final name, whatever kills the writer.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def temporary_target(name: str) -> str | None:
    """The file name whose :func:`atomic_path` temporary ``name`` is (one a killed write left), or None."""
    match = _TEMPORARY.fullmatch(name)
    return match.group(1) if match and match.group(1).endswith(match.group(2) or "") else None


# Folders this process holds locked, by scope: the process's own (never closed) and one per open
# held_folders() block, innermost last.
_held: list[dict[Path, int]] = [{}]


@contextlib.contextmanager
def held_folders() -> Iterator[None]:
    """Folders locked inside the block (:func:`hold_folder`) are released when it ends: a command
    holds its output folders for its whole run, and a process that runs commands one after
    another (run_pipeline.py, tests) lets each go when it is done."""
    _held.append({})
    try:
        yield
    finally:
        for fd in _held.pop().values():
            os.close(fd)


def hold_folder(folder: str | Path) -> None:
    """Lock ``folder`` (made if missing) for this process until the innermost :func:`held_folders`
    block ends (outside one, until the process ends); raise InputError if another process holds it.

    A POSIX lock on ``FOLDER/.lock``, taken without waiting: the kernel drops it when its process
    ends in any way (SIGKILL too), so a killed run never leaves a stale lock, and the worker
    processes the holder forks do not inherit it, so an orphaned worker cannot keep it either.
    """
    key = Path(folder).resolve()
    if any(key in scope for scope in _held):
        return  # already ours: a second claim in the same run (closing another fd would drop the lock)
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_umask())
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise InputError(f"{folder} is in use by another run (it holds {Path(folder) / LOCK_NAME}); "
                             "wait until it ends or choose another folder") from None
        raise
    _held[-1][key] = fd


def output_files(folder: str | Path, suffix: str) -> list[Path]:
    """The outputs ``NAME{suffix}`` in ``folder``, sorted; none if it does not exist. Hidden files
    are left out: :func:`atomic_path`'s temporaries (``.NAME{suffix}.XXXX.tmp{suffix}``, there while
    a write is under way and after a killed one) end in ``suffix`` too, and a glob matches them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"*{suffix}") if not p.name.startswith("."))


def read_text(path: str | Path) -> str:
    """A text file's contents as UTF-8 (a byte-order mark dropped); UTF-16/32 and other encodings
    are refused in one line rather than read as garbage names."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data:
        raise InputError(f"{path} is UTF-16 or UTF-32 text (or binary); save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def load_img_name_list(path: str | Path) -> list[str]:
    """Image names of a list file: the first word of each line, as a bare name (``2007_000032``)
    or a path (``/JPEGImages/2007_000032.jpg``, the released format) without folder and extension."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image list not found: {path}")
    names = [Path(line.split()[0]) for line in read_text(path).splitlines() if line.strip()]
    if not names:
        raise InputError(f"image list is empty: {path}")
    return [p.stem if p.suffix.lower() in IMAGE_SUFFIXES else p.name for p in names]


def find_array_file(folder: str | Path, name: str) -> Path:
    """``NAME.npz`` in ``folder`` (ours), or else the released ``NAME.npy`` if only that exists."""
    path = Path(folder) / f"{name}.npz"
    released = path.with_suffix(".npy")
    return released if not path.is_file() and released.is_file() else path


def save_scores(path: str | Path, labels: np.ndarray, scores: np.ndarray) -> None:
    """Write a score map (see the module docstring) atomically."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[0] != labels.size:
        raise ValueError(f"scores of shape {scores.shape} do not match {labels.size} labels")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, labels=labels, scores=scores)


def load_scores(path: str | Path, allow_pickle: bool = False,
                released_cam: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a score map; return ``(labels, scores)`` with scores as float32.

    ``.npy`` files are the released code's pickled dicts ``{class: map}``: read only with
    ``allow_pickle=True``. Their CAM dicts count foreground classes from 0 (``released_cam=True``
    shifts them to segmentation indices); their CRF dicts already use segmentation indices and are
    never shifted (:func:`is_released_crf_dict` tells them apart).
    """
    path = Path(path)
    if path.suffix == ".npy":
        if not allow_pickle:
            raise InputError(f"{path} is a pickled .npy file; pass --allow_pickle if you trust it")
        data = load_released_dict(path)
        shift = released_cam and not is_released_crf_dict(data)
        keys = sorted(data)
        labels = np.array([k + 1 if shift else k for k in keys], dtype=np.int64)
        scores = np.stack([np.asarray(data[k], dtype=np.float32) for k in keys]) if keys else None
        return labels, scores
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["labels"].astype(np.int64), z["scores"].astype(np.float32)
    except FileNotFoundError:
        raise InputError(f"score file not found: {path}") from None
    except ARRAY_READ_ERRORS as e:
        raise InputError(f"{path} is not a valid score file ({e.__class__.__name__}: {e})") from None


def load_released_dict(path: Path) -> dict:
    """The ``{class: map}`` dict of a released pickled ``.npy`` (the caller has allowed pickle)."""
    try:
        array = np.load(path, allow_pickle=True)
    except FileNotFoundError:
        raise InputError(f"score file not found: {path}") from None
    except (*ARRAY_READ_ERRORS, pickle.UnpicklingError) as e:
        raise InputError(f"{path} is not a valid .npy file ({e.__class__.__name__}: {e})") from None
    data = array.item() if array.dtype == object and array.shape == () else None
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a released CAM/CRF dict but a {array.dtype} array of shape {array.shape}")
    return data


def is_released_crf_dict(data: dict) -> bool:
    """True for a released CRF dict: it holds the background (key 0) and its maps are the dense
    CRF's probabilities, positive everywhere and summing to 1 at every pixel. A released CAM dict
    counts object classes from 0, so key 0 there is the first object class; its min-max normalised
    maps reach 0 (the released normalisation zeroes each map's minimum)."""
    if 0 not in data:
        return False
    maps = [np.asarray(m, dtype=np.float64) for m in data.values()]
    return all((m > 0).all() for m in maps) and bool(np.allclose(sum(maps), 1.0, atol=1e-3))


def is_valid_scores(path: str | Path) -> bool:
    """True if ``path`` holds a complete, readable score map (used to skip finished work)."""
    try:
        labels, scores = load_scores(path)
    except (InputError, OSError):
        return False
    return scores.ndim == 3 and scores.shape[0] == labels.size


def voc_palette(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map, ``(n, 3)`` uint8 (bit-interleaved label index)."""
    palette = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette[i] = (r, g, b)
    return palette


def save_label_png(path: str | Path, label: np.ndarray) -> None:
    """Write a label map as a palette PNG in the VOC colours, atomically."""
    img = Image.fromarray(np.asarray(label, dtype=np.uint8))
    img.putpalette(voc_palette().reshape(-1).tolist())
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def load_label_png(path: str | Path) -> np.ndarray:
    """Read a label PNG (palette or grey) as its raw indices, uint8 ``(H, W)``."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise InputError(f"{path} is a {img.mode} image, not a label map (palette or grey PNG)")
            return np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise InputError(f"label file not found: {path}") from None
    except OSError as e:
        raise InputError(f"{path} does not decode as an image ({e})") from None


def read_image(path: str | Path) -> np.ndarray:
    """An image file as uint8 ``(H, W, 3)`` RGB."""
    try:
        with Image.open(path) as img:
            return _to_rgb8(img, path)
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except OSError as e:
        raise InputError(f"{path} does not decode as an image ({e})") from None


def _to_rgb8(img: Image.Image, path: str | Path) -> np.ndarray:
    """uint8 RGB of a decoded image; 16-bit grey is scaled to 8 bits (``convert`` would clip it at 255)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        grey = np.asarray(img).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise InputError(f"{path} is a {img.mode} image with values outside 0..65535; save it as 8-bit RGB")
        return np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, axis=2)
    if img.mode == "F":
        raise InputError(f"{path} is a floating-point image; save it as 8-bit RGB")
    return np.asarray(img.convert("RGB"))


def image_size(path: str | Path) -> tuple[int, int]:
    """``(H, W)`` of an image file, read from its header."""
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except FileNotFoundError:
        raise InputError(f"image file not found: {path}") from None
    except OSError as e:
        raise InputError(f"{path} does not decode as an image ({e})") from None


def save_sb_map(path: str | Path, sb_map: np.ndarray) -> None:
    """Write a boundary map as compressed uint8 (values clipped to [0, 1]), atomically."""
    quantised = np.round(np.clip(sb_map, 0.0, 1.0) * 255).astype(np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **{SB_MAP_KEY: quantised})


def load_sb_map(path: str | Path) -> np.ndarray:
    """Read a boundary map (ours ``.npz`` or a released float ``.npy``) as float32 ``(C, H, W)``."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            sb_map = np.load(path, allow_pickle=False).astype(np.float32)
        else:
            with np.load(path, allow_pickle=False) as z:
                sb_map = z[SB_MAP_KEY].astype(np.float32) / 255.0
    except FileNotFoundError:
        raise InputError(f"boundary map not found: {path}") from None
    except ARRAY_READ_ERRORS as e:
        raise InputError(f"{path} is not a boundary map ({e.__class__.__name__}: {e})") from None
    if sb_map.ndim != 3:
        raise InputError(f"{path} holds an array of shape {sb_map.shape}, not (classes, H, W)")
    return sb_map
