"""The one place that defines a dataset's classes.

Every network head, loss, inference step, CRF, random walk and evaluation takes its class count
from a :class:`ClassList`. The default is PASCAL VOC's 20 object classes; a custom dataset in
VOC layout names its classes in a text file (one name per line, ``#`` starts a comment, an
optional first line ``background`` is ignored) passed as ``--dataset_classes FILE``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tool.errors import InputError
from tool.fileio import read_text

BACKGROUND = "background"
IGNORE_INDEX = 255

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)


@dataclass(frozen=True)
class ClassList:
    """Foreground class names in label order; index 0 of every map is the background."""

    names: tuple[str, ...]

    @property
    def num_fg(self) -> int:
        """Foreground classes: the length of an image-level label vector."""
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """Classes with the background: the channels of a CAM and of a segmentation."""
        return len(self.names) + 1

    @property
    def all_names(self) -> tuple[str, ...]:
        """Names indexed by segmentation label (0 = background)."""
        return (BACKGROUND,) + self.names

    def index(self, name: str) -> int:
        """Foreground index (0-based) of a class name, as used in image-level label vectors."""
        return self.names.index(name)


VOC = ClassList(VOC_CLASSES)


def load_classes(path: str | Path | None = None) -> ClassList:
    """Read a class-list file; ``None`` gives VOC's 20 classes.

    Raises InputError (a ValueError) with a one-line message for a missing, empty or inconsistent file.
    """
    if path is None:
        return VOC
    path = Path(path)
    if not path.is_file():
        raise InputError(f"class list file not found: {path}")
    names = []
    for raw in read_text(path).splitlines():
        name = raw.split("#", 1)[0].strip()
        if name:
            names.append(name)
    if names and names[0] == BACKGROUND:
        names = names[1:]
    if not names:
        raise InputError(f"class list file names no class: {path}")
    if len(set(names)) != len(names):
        raise InputError(f"class list file names a class twice: {path}")
    if BACKGROUND in names:
        raise InputError(f"'{BACKGROUND}' may only be the first line of a class list file: {path}")
    if len(names) + 1 > IGNORE_INDEX:
        raise InputError(f"class list file names {len(names)} classes; at most {IGNORE_INDEX - 1} fit a PNG label")
    return ClassList(tuple(names))
