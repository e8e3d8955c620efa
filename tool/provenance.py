"""What produced an output folder, so that finished files are reused only when they are the ones
the current command would write.

Every folder an inference command fills holds a record, ``.provenance.json``: the content hash
(sha256) of the weights, a hash of the project source the command runs (its script and every
project module it imports), and the flags that change the numbers. A command claims its folders
before its first image (:func:`claim_outputs`):

- the record matches: finished images are skipped, so a killed run resumes;
- the folder holds no outputs yet: the record is written and the command starts;
- the record differs (or is missing beside old outputs): a one-line error that names
  ``--overwrite``; with ``--overwrite`` (or ``--overwrite stale``) the old outputs are deleted
  and the record rewritten, so a folder never mixes files of two origins, even when the
  overwriting run is killed in its turn.

``--overwrite`` (``all``) also redoes the images of a matching record; ``--overwrite stale`` keeps
them (what run_pipeline uses to resume a stage). Usage in a new inference script::

    record = provenance.describe(__file__, weights=args.weights, flags={"scale": args.scale})
    skip_finished = provenance.claim_outputs(args.out_dir, record, overwrite=args.overwrite, suffix=".png",
                                             info=info)
    todo = [name for name in names if not (skip_finished and output_exists(name))]
"""
from __future__ import annotations

import ast
import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from tool.distributed import DistInfo, barrier
from tool.errors import InputError
from tool.fileio import atomic_path, output_files

RECORD_NAME = ".provenance.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
_CHUNK = 1024 * 1024


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks (weights files are large); cached per file state."""
    path = Path(path).resolve()
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    return _file_digest(path, stat.st_size, stat.st_mtime_ns)


@cache
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _module_file(name: str, root: Path) -> Path | None:
    """The project file of a dotted module name, or None for a module outside the project."""
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(path: str | Path, root: Path = PROJECT_ROOT) -> set[Path]:
    """Project source files that ``path`` imports, anywhere in it (function-level imports too)."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import mod`` imports pkg.mod when that is a module, else a name of pkg.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
                module = _module_file(".".join(parts[:i]), root)
                if module is not None:
                    found.add(module)
    return found


def source_files(entry: str | Path, root: Path = PROJECT_ROOT) -> list[Path]:
    """``entry`` and every project file it imports, directly or not, sorted."""
    todo, seen = [Path(entry).resolve()], set()
    while todo:
        path = todo.pop()
        if path not in seen:
            seen.add(path)
            todo += project_imports(path, root) - seen
    return sorted(seen)


def source_digest(entry: str | Path, root: Path = PROJECT_ROOT) -> str:
    """sha256 over the names and bytes of :func:`source_files`: changes with any edit of code the
    entry script runs (a loss, a network, a dataset), not with edits elsewhere."""
    digest = hashlib.sha256()
    for path in source_files(entry, root):
        name = path.relative_to(root) if path.is_relative_to(root) else path
        digest.update(f"{name}\0".encode())
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()


def folder_digest(folder: str | Path) -> str | None:
    """The hash of a folder's record (what made its files), or None when it has none: lets a
    record name its inputs (a CAM folder, CRF files) by their own origin."""
    path = Path(folder) / RECORD_NAME
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def describe(script: str | Path, weights: str | Path | None = None, flags: dict[str, Any] | None = None,
             inputs: Iterable[str | Path | None] = ()) -> dict[str, Any]:
    """A record: the script's name and source hash, the weights' content hash, the input files'
    content hashes (label files, class lists; None entries, an option not given, are left out)
    and ``flags`` (JSON values)."""
    record: dict[str, Any] = {"script": Path(script).stem, "source_sha256": source_digest(script)}
    if weights is not None:
        record["weights_sha256"] = file_digest(weights)
    for path in filter(None, inputs):
        record[f"sha256:{Path(path).name}"] = file_digest(path)
    record.update(flags or {})
    # Through JSON once, so that tuples compare equal to the lists read back from a record.
    return json.loads(json.dumps(record, sort_keys=True))


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: matches nothing


def claim_outputs(folder: str | Path, record: dict[str, Any], *, overwrite: str | None, suffix: str,
                  info: DistInfo | None = None) -> bool:
    """Make ``folder`` (outputs ``*suffix``) the home of outputs described by ``record``; see the
    module docstring. ``overwrite``: None, ``"all"`` or ``"stale"`` (``--overwrite``). Return
    whether the outputs already there may be kept (skipped). Under torchrun every rank calls it;
    rank 0 writes."""
    folder = Path(folder)
    old = read_record(folder)
    if old == record:
        return overwrite != "all"
    if not overwrite and output_files(folder, suffix):
        changed = sorted(k for k in record.keys() | (old or {}).keys() if (old or {}).get(k) != record.get(k))
        what = "no record of what made them" if old is None else f"other {', '.join(changed)}"
        raise InputError(f"{folder} holds outputs with {what}; pass --overwrite to redo them")
    if info is not None:
        barrier(info)  # every rank has read the old record before rank 0 replaces it
    if info is None or info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        # The outputs, and the temporaries that killed writes left beside them (no rank writes now).
        for path in folder.glob(f"*{suffix}"):
            path.unlink()
        with atomic_path(folder / RECORD_NAME) as tmp:
            tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if info is not None:
        barrier(info)
    return True  # nothing of another origin is left
