"""What produced an output folder, so that finished files are reused only when they are the ones
the current command would write.

Every folder an inference command fills holds a record, ``.provenance.json``: the content hash
(sha256) of the weights, a hash of the project source the command runs (its script and every
project module it imports), and the flags that change the numbers. Beside it,
``.provenance.names`` lists the files the record vouches for: every output name a run claiming the
folder was going to write, listed before its first write. A command claims its folders before
its first image (:func:`claim_outputs`) and holds them (``tool.fileio.hold_folder``) until it
ends, so a second run into the same folder stops with one line instead of mixing its files in:

- the record matches: finished images are skipped, so a killed run resumes;
- the folder holds no outputs yet: the record is written and the command starts;
- the record differs (or is missing or unreadable beside old outputs): a one-line error that
  names ``--overwrite``; with ``--overwrite`` (or ``--overwrite stale``) the old outputs are
  deleted and the record rewritten, so a folder never mixes files of two origins, even when the
  overwriting run is killed in its turn;
- the folder holds output files that no list names (a copy of ground truth, files of another
  tool): a one-line refusal, ``--overwrite`` or not. Only files a list names are ever deleted.
  (A record written before the lists existed vouches for its folder's outputs, as it did then.)

``--overwrite`` (``all``) also redoes the images of a matching record; ``--overwrite stale`` keeps
them (what run_pipeline uses to resume a stage). Usage in a new inference script, whose ``run``
holds the claimed folders for its whole run (``with tool.fileio.held_folders():``)::

    record = provenance.describe(__file__, weights=args.weights, flags={"scale": args.scale})
    skip_finished = provenance.claim_outputs(args.out_dir, record, overwrite=args.overwrite, suffix=".png",
                                             names=names, info=info)
    todo = [name for name in names if not (skip_finished and output_exists(name))]
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from tool.distributed import DistInfo, barrier, main_rank_flag
from tool.errors import InputError
from tool.fileio import atomic_path, hold_folder, temporary_target

RECORD_NAME = ".provenance.json"
NAMES_NAME = ".provenance.names"
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
    """A folder's record: None when it has none, ``{}`` when it cannot be read (cut short, not
    JSON, not a JSON object), which matches no record."""
    path = Path(folder) / RECORD_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_names(folder: str | Path) -> set[str] | None:
    """The output file names a folder's record vouches for, or None when it has no list."""
    try:
        text = (Path(folder) / NAMES_NAME).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return {line for line in text.splitlines() if line}


def _visible_files(folder: Path) -> set[str]:
    """Names of the files in ``folder``, hidden ones (records, locks, temporaries) left out."""
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as entries:
        return {e.name for e in entries if not e.name.startswith(".") and e.is_file()}


def _hold(folder: Path, info: DistInfo | None) -> None:
    """Lock ``folder`` for this run: rank 0 holds it for all ranks under torchrun."""
    if info is None or not info.distributed:
        hold_folder(folder)
        return
    refused = None
    if info.is_main:
        try:
            hold_folder(folder)
        except InputError as e:
            refused = e
    if not main_rank_flag(refused is None, info):
        raise refused or InputError(f"{folder} is in use by another run")


def _origin(record: dict[str, Any]) -> str:
    """Whose outputs a record describes: ``cam outputs of infer_SB``."""
    kind = f"{record['output']} " if record.get("output") else ""
    return f"{kind}outputs of {record['script']}"


def _mismatch(folder: Path, old: dict[str, Any] | None, record: dict[str, Any], count: int) -> str:
    """The one line refusing to replace ``count`` outputs made under ``old``."""
    if old is None:
        return f"{folder} holds outputs with no record of what made them; pass --overwrite to redo them"
    if not old:
        return (f"{folder / RECORD_NAME} is unreadable (cut short or not a record), so what made the {count} "
                "outputs there is unknown; pass --overwrite to redo them")
    if "script" in old and "script" in record and _origin(old) != _origin(record):
        return (f"{folder} holds {count} {_origin(old)}, not {_origin(record)}; choose another folder, "
                "or pass --overwrite to delete them")
    changed = sorted(k for k in record.keys() | old.keys() if old.get(k) != record.get(k))
    return f"{folder} holds outputs with other {', '.join(changed)}; pass --overwrite to redo them"


def claim_outputs(folder: str | Path, record: dict[str, Any], *, overwrite: str | None, suffix: str,
                  names: Iterable[str], info: DistInfo | None = None) -> bool:
    """Make ``folder`` the home of the outputs ``NAME{suffix}`` (for ``names``, this run's whole
    list) described by ``record``; see the module docstring. ``overwrite``: None, ``"all"`` or
    ``"stale"`` (``--overwrite``). Return whether the outputs already there may be kept
    (skipped). The folder stays locked until the innermost ``held_folders()`` block ends. Under
    torchrun every rank calls it; rank 0 locks and writes."""
    folder = Path(folder)
    _hold(folder, info)
    old = read_record(folder)
    present = _visible_files(folder)
    vouched = read_names(folder)
    if vouched is None:
        vouched = {n for n in present if n.endswith(suffix)} if old is not None else set()
    foreign = sorted(n for n in present if n.endswith(suffix) and n not in vouched)
    if foreign:
        raise InputError(f"{folder} holds {len(foreign)} {suffix} files this tool did not write "
                         f"(first: {foreign[0]}); choose an empty folder")
    ours = present & vouched
    wanted = {f"{name}{suffix}" for name in names}
    if old == record:
        if not wanted <= vouched:  # this run may write names no list has named yet: list them first
            _write_after_barrier(folder, info, names=vouched | wanted)
        return overwrite != "all"
    if ours and not overwrite:
        raise InputError(_mismatch(folder, old, record, len(ours)))
    # The outputs, and the temporaries that killed writes left beside them (no rank writes now).
    doomed = ours | {n for n in os.listdir(folder) if temporary_target(n) in vouched}
    _write_after_barrier(folder, info, names=wanted, record=record, doomed=doomed)
    return True  # nothing of another origin is left


def _write_after_barrier(folder: Path, info: DistInfo | None, *, names: set[str], record: dict | None = None,
                         doomed: Iterable[str] = ()) -> None:
    """Rank 0 deletes ``doomed``, then writes the list of ``names`` and the record (in this order,
    so that a killed claim never leaves a record whose list lacks a file it vouches for), once
    every rank has read the folder; every rank returns when it is done."""
    if info is not None:
        barrier(info)
    if info is None or info.is_main:
        for name in doomed:
            (folder / name).unlink(missing_ok=True)
        with atomic_path(folder / NAMES_NAME) as tmp:
            tmp.write_text("".join(f"{name}\n" for name in sorted(names)))
        if record is not None:
            with atomic_path(folder / RECORD_NAME) as tmp:
                tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    if info is not None:
        barrier(info)
