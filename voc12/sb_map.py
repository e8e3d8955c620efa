"""Semantic boundary maps ("sb_map"): per-class region edges, softened, ``(num_classes, H, W)`` in [0, 1].

Channel 0 is the background's boundary, channel c that of class c. The released code reads such
maps from ``VOC2012/sb_map/NAME.npy`` without shipping how they were made; under image-level
supervision they come from pseudo labels (CAM -> CRF -> label map -> region edges), which is
this command's default source::

    python -m voc12.sb_map --voc12_root VOC2012 --list voc12/train_aug.txt --crf_dir crf_la
    python -m voc12.sb_map --voc12_root VOC2012 --list voc12/train_aug.txt --label_dir rw_labels
    python -m voc12.sb_map --voc12_root VOC2012 --list voc12/train_aug.txt \\
        --sbd_upper_bound benchmark_RELEASE   # ground-truth boundaries: an upper bound only

Files are ``NAME.npz`` holding ``sb_map`` as uint8 (``round(255 * value)``, compressed);
:func:`tool.fileio.load_sb_map` also reads the released float ``.npy`` arrays.
"""
from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import scipy.io
from scipy.ndimage import distance_transform_edt, gaussian_filter

from tool import provenance
from tool.cli import run_main
from tool.errors import InputError
from tool.fileio import held_folders, image_size, load_img_name_list, load_label_png, load_scores, save_sb_map
from tool.workers import die_with_parent
from voc12.classes import IGNORE_INDEX, load_classes
from voc12.data import image_path

# The Gaussian tail is cut at this many sigmas, so a map is exactly zero beyond it.
TRUNCATE = 3.0


def soften(core: np.ndarray, sigma: float) -> np.ndarray:
    """Boolean ``(C, H, W)`` edges to soft maps: 1 on the edge, a Gaussian tail (peak 1) around it."""
    out = np.zeros(core.shape, dtype=np.float32)
    for c in np.flatnonzero(core.reshape(core.shape[0], -1).any(axis=1)):
        blurred = gaussian_filter(core[c].astype(np.float32), sigma, truncate=TRUNCATE)
        out[c] = np.maximum(blurred / blurred.max(), core[c])
    return out


def boundaries_from_labels(label: np.ndarray, num_classes: int, width: float = 2.0,
                           sigma: float = 1.0) -> np.ndarray:
    """Soft region boundaries of a label map ``(H, W)``, float32 ``(num_classes, H, W)`` in [0, 1].

    Channel c is 1 on the pixels of class c within ``width`` pixels (Euclidean) of a pixel of
    any other value, with a Gaussian tail of ``sigma`` around them, and exactly 0 farther than
    ``round(3 sigma)`` pixels along either axis from those. An ignored pixel (255) counts as
    "other": VOC's ignore bands run along object outlines, so the objects keep their edges, and
    the band itself has no channel. The image border is not an edge; a class absent from the
    map, or filling all of it, has none.
    """
    label = np.asarray(label)
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise ValueError(f"label value {bad[0]} is not a class index below {num_classes} nor {IGNORE_INDEX}")
    core = np.zeros((num_classes,) + label.shape, dtype=bool)
    for c in values[values < num_classes]:
        region = label == c
        if not region.all():
            core[c] = region & (distance_transform_edt(region) <= width)
    return soften(core, sigma)


def sbd_boundaries(mat_path: str | Path, num_classes: int, sigma: float = 1.0) -> np.ndarray:
    """SBD's ground-truth class boundaries (``cls/NAME.mat``, ``GTcls.Boundaries``), softened.

    An upper bound that uses ground truth, never a weakly supervised input. SBD has no background
    boundary: channel 0 is the union of the class boundaries.
    """
    try:
        gt = scipy.io.loadmat(str(mat_path), squeeze_me=True, struct_as_record=False)["GTcls"]
    except FileNotFoundError:
        raise InputError(f"SBD file not found: {mat_path}") from None
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"{mat_path} is not an SBD GTcls file ({e.__class__.__name__}: {e})") from None
    per_class = np.atleast_1d(gt.Boundaries)
    if per_class.size != num_classes - 1:
        raise InputError(f"{mat_path} has boundaries for {per_class.size} classes, "
                         f"expected {num_classes - 1}")
    fg = np.stack([np.asarray(b.toarray() if hasattr(b, "toarray") else b) != 0 for b in per_class])
    return soften(np.concatenate([fg.any(axis=0, keepdims=True), fg]), sigma)


def sbd_dataset_dir(sbd_root: str | Path) -> Path:
    """``benchmark_RELEASE/dataset`` given either that folder or ``benchmark_RELEASE``."""
    root = Path(sbd_root)
    return root / "dataset" if (root / "dataset").is_dir() else root


def without_sbd_gaps(names: list[str], sbd_dir: Path, fallback_crf_dir: str | None) -> list[str]:
    """The names to make maps for with ``--sbd_upper_bound``: SBD lacks some VOC images (most of
    VOC's own train split); say how many and which, and drop them unless CRF files stand in."""
    lacking = [n for n in names if not (sbd_dir / "cls" / f"{n}.mat").is_file()]
    if not lacking:
        return names
    if lacking == names:
        raise InputError(f"SBD at {sbd_dir} has no cls/NAME.mat for any listed image")
    shown = ", ".join(lacking[:3]) + (", ..." if len(lacking) > 3 else "")
    if fallback_crf_dir:
        print(f"{len(lacking)} of {len(names)} images are not in SBD ({shown}): their maps come from "
              f"the CRF files in {fallback_crf_dir}")
        return names
    print(f"{len(lacking)} of {len(names)} images are not in SBD ({shown}): skipped, no map written"
          " (--fallback_crf_dir makes them from CRF files)")
    skipped = set(lacking)
    return [n for n in names if n not in skipped]


def crf_file(folder: str | Path, name: str) -> Path:
    """``NAME.npz`` of a CRF folder; the released code's pickled ``NAME.npy`` in its place is refused
    in one line that says what reads it."""
    path = Path(folder) / f"{name}.npz"
    released = path.with_suffix(".npy")
    if not path.is_file() and released.is_file():
        raise InputError(f"{folder} holds {released.name}, the released code's pickled CRF dict, not "
                         f"{path.name}: voc12.sb_map reads the .npz files of infer_SB.py --out_crf (released "
                         ".npy dicts are read by train_aff.py and evaluation.py with --allow_pickle)")
    return path


def make_one(name: str, args: argparse.Namespace, num_classes: int, out_dir: Path) -> None:
    """Compute, check and write the boundary map of one image."""
    if args.crf_dir:
        path = crf_file(args.crf_dir, name)
        labels, scores = load_scores(path)
        source = labels[np.argmax(scores, axis=0)]
    elif args.label_dir:
        path = Path(args.label_dir) / f"{name}.png"
        source = load_label_png(path)
    else:
        path = sbd_dataset_dir(args.sbd_upper_bound) / "cls" / f"{name}.mat"
        source = None
        if not path.is_file() and args.fallback_crf_dir:
            path = crf_file(args.fallback_crf_dir, name)
            labels, scores = load_scores(path)
            source = labels[np.argmax(scores, axis=0)]
    if source is not None:
        try:
            sb_map = boundaries_from_labels(source, num_classes, args.width, args.sigma)
        except ValueError as e:
            raise InputError(f"{path}: {e}") from None
    else:
        sb_map = sbd_boundaries(path, num_classes, args.sigma)
    size = image_size(image_path(args.voc12_root, name))
    if sb_map.shape[1:] != size:
        raise InputError(f"{path} is {sb_map.shape[1]}x{sb_map.shape[2]}, its image {size[0]}x{size[1]}")
    save_sb_map(out_dir / f"{name}.npz", sb_map)


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc12_root", required=True, type=str)
    parser.add_argument("--list", required=True, type=str, help="images to make maps for")
    parser.add_argument("--out_dir", default=None, type=str, help="default: VOC12_ROOT/sb_map")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--crf_dir", type=str, help="CRF score files NAME.npz (weak supervision)")
    source.add_argument("--label_dir", type=str, help="label PNGs NAME.png, e.g. a first round's random walk")
    source.add_argument("--sbd_upper_bound", type=str, metavar="SBD_ROOT",
                        help="SBD's ground-truth boundaries: an upper bound, NOT weak supervision")
    parser.add_argument("--fallback_crf_dir", default=None, type=str,
                        help="with --sbd_upper_bound: CRF score files for the images SBD lacks (else they are skipped)")
    parser.add_argument("--dataset_classes", default=None, type=str, help="class-list file (default: VOC)")
    parser.add_argument("--width", default=2.0, type=float, help="edge width in pixels")
    parser.add_argument("--sigma", default=1.0, type=float, help="Gaussian softening in pixels")
    parser.add_argument("--num_workers", default=2, type=int)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_arg_parser().parse_args(argv)


def run(args: argparse.Namespace) -> Path:
    """Write one boundary map per listed image; return the output folder (held for the run)."""
    with held_folders():
        return make_maps(args)


def make_maps(args: argparse.Namespace) -> Path:
    """:func:`run`'s work, inside its hold of the output folder."""
    if not Path(args.voc12_root).is_dir():
        raise InputError(f"VOC2012 folder not found: {args.voc12_root}")
    try:
        classes = load_classes(args.dataset_classes)
    except ValueError as e:
        raise InputError(str(e)) from None
    names = load_img_name_list(args.list)
    source_dir = args.crf_dir or args.label_dir or args.sbd_upper_bound
    if not Path(source_dir).is_dir():
        raise InputError(f"source folder not found: {source_dir}")
    out_dir = Path(args.out_dir) if args.out_dir else Path(args.voc12_root) / "sb_map"
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.sbd_upper_bound:
        names = without_sbd_gaps(names, sbd_dataset_dir(args.sbd_upper_bound), args.fallback_crf_dir)
    # Every listed map is made again: maps of another source are deleted first, so that a killed
    # run never leaves a folder that mixes two sources under one record.
    record = provenance.describe(__file__, inputs=[args.dataset_classes], flags={
        "source": str(Path(source_dir).resolve()), "source_provenance": provenance.folder_digest(source_dir),
        "kind": "crf" if args.crf_dir else "label" if args.label_dir else "sbd", "width": args.width,
        "sigma": args.sigma, "voc12_root": str(Path(args.voc12_root).resolve()),
        "fallback_crf": args.fallback_crf_dir and provenance.folder_digest(args.fallback_crf_dir)})
    provenance.claim_outputs(out_dir, record, overwrite="all", suffix=".npz", names=names)
    work = partial(make_one, args=args, num_classes=classes.num_classes, out_dir=out_dir)
    if args.num_workers > 1 and len(names) > 1:
        with ProcessPoolExecutor(max_workers=args.num_workers, initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            list(pool.map(work, names, chunksize=16))
    else:
        for name in names:
            work(name)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
