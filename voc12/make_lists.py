"""Image lists and image-level labels of a dataset in VOC 2012 layout::

    python -m voc12.make_lists --voc12_root VOC2012 [--sbd_root benchmark_RELEASE] [--out_dir voc12]

Writes ``train.txt`` and ``val.txt`` (``ImageSets/Segmentation``), with SBD ``train_aug.txt``
(VOC train + SBD train and val, minus VOC val, sorted: 10,582 images on the real data), all in the
released line format, and ``cls_labels.npz`` with the labels of every listed image. An image's
labels are the classes named by the objects of ``Annotations/NAME.xml`` (difficult and truncated
objects included, the background excluded); an image without XML takes them from SBD's
``cls/NAME.mat`` segmentation.

The repository ships these files for PASCAL VOC 2012 (``voc12/LISTS.md``); run on VOC's own files,
this says in one line whether they give the same lists.
"""
from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import scipy.io

from tool.cli import run_main
from tool.errors import InputError
from tool.fileio import atomic_path, load_img_name_list, read_text
from voc12.classes import IGNORE_INDEX, ClassList, load_classes
from voc12.data import LABEL_FILE_NAME, save_image_labels
from voc12.sb_map import sbd_dataset_dir

ANNOT_FOLDER_NAME = "Annotations"
SHIPPED_DIR = Path(__file__).parent  # the VOC 2012 / SBD lists shipped with the repository (LISTS.md)
SPLIT_FOLDER = Path("ImageSets") / "Segmentation"


def list_line(name: str) -> str:
    """A list line in the released format (the mask path names SBD's augmented masks)."""
    return f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png"


def read_split(path: Path) -> list[str]:
    """Names of a split file (one name per line, as VOC's and SBD's)."""
    if not path.is_file():
        raise InputError(f"split file not found: {path}")
    names = [line.split()[0] for line in read_text(path).splitlines() if line.strip()]
    bad = next((n for n in names if Path(n).name != n or n in (".", "..")), None)
    if bad is not None:
        raise InputError(f"{path} lists '{bad}': split files name images, not paths")
    return names


def _example(names: list[str]) -> str:
    return f" (e.g. {names[0]})" if names else ""


def compare_with_shipped(lists: dict[str, list[str]], shipped_dir: Path = SHIPPED_DIR) -> str:
    """One line saying whether VOC's (and SBD's) own split files give the shipped lists."""
    diffs = []
    for split, names in lists.items():
        shipped_file = shipped_dir / f"{split}.txt"
        if not shipped_file.is_file():
            continue
        shipped = load_img_name_list(shipped_file)
        only_here, only_shipped = sorted(set(names) - set(shipped)), sorted(set(shipped) - set(names))
        if only_here or only_shipped:
            diffs.append(f"{split}: {len(only_here)} images only in yours{_example(only_here)},"
                         f" {len(only_shipped)} only in the shipped list{_example(only_shipped)}")
    if not diffs:
        return f"{', '.join(lists)} match the shipped lists in {shipped_dir}"
    return f"your lists differ from the shipped ones in {shipped_dir}: " + "; ".join(diffs)


def labels_from_xml(path: str | Path, classes: ClassList) -> np.ndarray:
    """Image-level labels, uint8 ``(num_fg,)``, from the object names of a VOC annotation.

    Only ``object/name`` counts: the part names of person layouts (head, hand, foot) do not.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise InputError(f"{path} is not valid XML ({e})") from None
    label = np.zeros(classes.num_fg, dtype=np.uint8)
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes.names:
            raise InputError(f"{path}: unknown class '{name}' (not in the class list)")
        label[classes.index(name)] = 1
    return label


def labels_from_sbd(path: str | Path, classes: ClassList) -> np.ndarray:
    """Image-level labels, uint8 ``(num_fg,)``, from the classes in SBD's ``GTcls.Segmentation``."""
    try:
        seg = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)["GTcls"].Segmentation
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise InputError(f"{path} is not an SBD GTcls file ({e.__class__.__name__}: {e})") from None
    values = np.unique(seg)
    values = values[(values != 0) & (values != IGNORE_INDEX)]
    if values.size and values.max() > classes.num_fg:
        raise InputError(f"{path}: class index {values.max()} beyond the {classes.num_fg} classes")
    label = np.zeros(classes.num_fg, dtype=np.uint8)
    label[values.astype(np.int64) - 1] = 1
    return label


def image_labels(name: str, voc12_root: Path, sbd_dir: Path | None, classes: ClassList) -> np.ndarray:
    xml = voc12_root / ANNOT_FOLDER_NAME / f"{name}.xml"
    if xml.is_file():
        return labels_from_xml(xml, classes)
    if sbd_dir is not None and (sbd_dir / "cls" / f"{name}.mat").is_file():
        return labels_from_sbd(sbd_dir / "cls" / f"{name}.mat", classes)
    raise InputError(f"no annotation for image {name}: {xml} not found"
                     + ("" if sbd_dir is None else f", nor {sbd_dir / 'cls' / (name + '.mat')}"))


def write_list(path: Path, names: list[str]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(list_line(n) + "\n" for n in names))


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc12_root", required=True, type=str)
    parser.add_argument("--sbd_root", default=None, type=str,
                        help="SBD's benchmark_RELEASE (or its dataset folder): adds train_aug.txt")
    parser.add_argument("--out_dir", default="voc12", type=str)
    parser.add_argument("--dataset_classes", default=None, type=str, help="class-list file (default: VOC)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return get_arg_parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Path]:
    """Write the lists and the label file; return their paths by name."""
    voc12_root = Path(args.voc12_root)
    if not voc12_root.is_dir():
        raise InputError(f"VOC2012 folder not found: {voc12_root}")
    try:
        classes = load_classes(args.dataset_classes)
    except ValueError as e:
        raise InputError(str(e)) from None
    lists = {split: read_split(voc12_root / SPLIT_FOLDER / f"{split}.txt") for split in ("train", "val")}
    sbd_dir = None
    if args.sbd_root is not None:
        sbd_dir = sbd_dataset_dir(args.sbd_root)
        sbd = set(read_split(sbd_dir / "train.txt")) | set(read_split(sbd_dir / "val.txt"))
        lists["train_aug"] = sorted((set(lists["train"]) | sbd) - set(lists["val"]))
    if not lists["train"]:
        raise InputError(f"split file lists no image: {voc12_root / SPLIT_FOLDER / 'train.txt'}")
    for split in (split for split, split_names in lists.items() if not split_names):
        print(f"warning: the {split} list is empty")
    if args.dataset_classes is None:
        print(compare_with_shipped(lists))
    names = sorted({n for split in lists.values() for n in split})
    labels = np.array([image_labels(n, voc12_root, sbd_dir, classes) for n in names], dtype=np.uint8)
    labels = labels.reshape(len(names), classes.num_fg)

    out_dir = Path(args.out_dir)
    written = {}
    for split, split_names in lists.items():
        written[split] = out_dir / f"{split}.txt"
        write_list(written[split], split_names)
    written["labels"] = out_dir / LABEL_FILE_NAME
    save_image_labels(written["labels"], names, labels)
    return written


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
