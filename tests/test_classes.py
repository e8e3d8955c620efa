"""The class list is data: a custom class count runs end to end, and no stray VOC class count
hides in the code."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from PIL import Image

from voc12.classes import VOC, load_classes

ROOT = Path(__file__).resolve().parents[1]
VOC_COUNTS = {str(VOC.num_fg), str(VOC.num_classes)}
# Numbers that equal a VOC class count by coincidence, each with its reason.
ALLOWED = {
    ("tool/torchutils.py", "LR_MULTS = "): "the x20 learning rate of from-scratch biases",
    ("coco14/prepare.py", "WARNINGS_PER_SPLIT = "): "a cap on warning lines, not a class count",
}


def source_files() -> list[Path]:
    skip = {"tests", "bench", ".venv"}
    return [p for p in ROOT.rglob("*.py")
            if not skip & set(p.relative_to(ROOT).parts) and p.relative_to(ROOT).as_posix() != "voc12/classes.py"]


def test_no_stray_class_count_literal_outside_the_class_list():
    stray = []
    for path in source_files():
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        lines = text.splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.NUMBER and tok.string in VOC_COUNTS:
                line = lines[tok.start[0] - 1]
                if not any(rel == f and marker in line for f, marker in ALLOWED):
                    stray.append(f"{rel}:{tok.start[0]}: {line.strip()}")
    assert not stray, "class counts must come from voc12.classes:\n" + "\n".join(stray)


def test_the_check_finds_a_planted_literal(tmp_path, monkeypatch):
    planted = ROOT / "tool" / "_planted_for_test.py"
    planted.write_text("num_classes = 21\n")
    try:
        with pytest.raises(AssertionError, match="_planted_for_test.py:1"):
            test_no_stray_class_count_literal_outside_the_class_list()
    finally:
        planted.unlink()


def test_class_list_files(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\n# three classes\ncat\ndog  # the good one\n\nhorse\n")
    classes = load_classes(path)
    assert classes.names == ("cat", "dog", "horse")
    assert classes.num_classes == 4 and classes.all_names[0] == "background"
    assert load_classes(None) is VOC and VOC.num_classes == len(VOC.names) + 1
    for text, message in (("", "names no class"), ("cat\ncat\n", "twice"), ("cat\nbackground\n", "first line")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_classes(path)
    with pytest.raises(ValueError, match="not found"):
        load_classes(tmp_path / "missing.txt")


def test_five_class_dataset_runs_end_to_end(tmp_path):
    out = tmp_path / "demo5"
    result = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--demo_classes", "5", "--demo_scale",
                             "0.05", "--demo_image_size", "64", "--seg_iters", "2", "--out_dir", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    classes = load_classes(out / "data" / "classes.txt")
    assert classes.num_fg == 5
    results = json.loads((out / "results.json").read_text())
    for stage in ("round1_cam", "cam", "crf_la", "crf_ha", "rw", "seg", "seg_crf"):
        assert set(results[stage]) == {"train", "val"}
        assert all(0 <= v <= 100 for v in results[stage].values())
    assert results["seconds"] > 0
    for name in classes.names:  # the per-class table names the custom classes
        assert name in result.stdout
    assert "aeroplane" not in result.stdout
    with Image.open(out / "demo.png") as img:
        assert img.mode == "RGB" and img.width > 5 * 64
