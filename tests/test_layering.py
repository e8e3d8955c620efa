"""The import structure: stage scripts -> network/, voc12/, coco14/ -> tool/, and no circle."""
from __future__ import annotations

from pathlib import Path

import pytest

from tool.provenance import project_imports, source_files

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tool", "network", "voc12", "coco14")


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else "scripts"


def project_modules() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def import_graph() -> dict[Path, set[Path]]:
    # Package __init__ files are run by every import below them; they are empty, so leave them out.
    return {path: {p for p in project_imports(path, ROOT) if p.name != "__init__.py"}
            for path in project_modules()}


def find_cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    state: dict[Path, int] = {}  # 1: on the current path, 2: done
    stack: list[Path] = []

    def visit(node: Path) -> list[Path] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(str(p.relative_to(ROOT)) for p in cycle)


@pytest.mark.parametrize(("lower", "forbidden"), [
    ("tool", {"network", "voc12", "coco14", "scripts"}),
    ("network", {"scripts", "coco14"}),
    ("voc12", {"network", "scripts", "coco14"}),
    ("coco14", {"network", "scripts"}),
])
def test_imports_point_down(lower: str, forbidden: set[str]):
    upward = [f"{src.relative_to(ROOT)} imports {dst.relative_to(ROOT)}"
              for src, targets in import_graph().items() if package_of(src) == lower
              for dst in targets if package_of(dst) in forbidden]
    assert not upward, upward


def test_the_graph_sees_real_imports():
    """The parser finds plain, from- and function-level imports (a test that cannot fail is none)."""
    graph = import_graph()
    assert ROOT / "tool" / "losses.py" in graph[ROOT / "train_SB.py"]
    assert ROOT / "network" / "resnet38d.py" in graph[ROOT / "network" / "resnet38_sb.py"]  # from network import x
    assert ROOT / "tool" / "errors.py" in graph[ROOT / "tool" / "fileio.py"]
    assert find_cycle({Path("a"): {Path("b")}, Path("b"): {Path("a")}}) == [Path("a"), Path("b"), Path("a")]
    loss_users = {p.name for p in project_modules() if ROOT / "tool" / "losses.py" in source_files(p, ROOT)}
    assert {"train_SB.py", "train_aff.py"} <= loss_users and "infer_SB.py" not in loss_users
