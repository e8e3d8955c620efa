"""run_pipeline.py as a user who edits the code and reruns: on a copy of the project, a tiny demo
run, an unchanged rerun, ``--from sb``, a loss edit whose rerun is killed and resumed, and the
real-data chain tried small. The tests share one output folder and run in file order."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run_pipeline
from tool.fileio import LOCK_NAME, is_valid_scores, load_img_name_list, load_label_png, load_scores, read_image
from tool.provenance import RECORD_NAME

ROOT = Path(__file__).resolve().parents[1]
# Two epochs of the first round, so that a run can be killed after its first checkpoint.
TINY = ["--demo_scale", "0.05", "--demo_image_size", "64", "--demo_classes", "3", "--seg_iters", "2",
        "--round1_epoches", "2"]
INFERRED = ("round1_crf_4.0", "round1_cam_train", "round1_cam_val", "cam_train", "crf_train_12.0", "crf_train_24.0",
            "cam_val", "rw_train", "rw_val", "sb_map", "seg_train", "seg_val", "seg_crf_train", "seg_crf_val")


def copy_project(dest: Path) -> Path:
    dest.mkdir()
    for path in ROOT.glob("*.py"):
        shutil.copy(path, dest / path.name)
    for package in ("tool", "network", "voc12", "coco14"):
        if (ROOT / package).is_dir():
            shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def command(project: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(project / "run_pipeline.py"), *TINY, "--out_dir", str(out), *extra]


def run(project: Path, out: Path, *extra: str) -> str:
    result = subprocess.run(command(project, out, *extra), cwd=project, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def ran(stdout: str) -> list[str]:
    return re.findall(r"^\[(\w+)\] running", stdout, re.M)


def table(stdout: str) -> str:
    return stdout[stdout.index("mIoU (%)"):].split("\n\nseconds per stage")[0]


def records(out: Path) -> dict[str, str]:
    return {folder: (out / folder / RECORD_NAME).read_text() for folder in INFERRED}


def mtimes(out: Path, pattern: str) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in sorted(out.glob(pattern))}


@pytest.fixture(scope="module")
def first(tmp_path_factory) -> dict:
    """The project copied, then one tiny demo run."""
    base = tmp_path_factory.mktemp("pipeline")
    project, out = copy_project(base / "project"), base / "out"
    stdout = run(project, out)
    return {"project": project, "out": out, "stdout": stdout, "table": table(stdout), "records": records(out)}


def test_first_run_runs_every_stage_and_records_every_folder(first):
    assert ran(first["stdout"]) == list(run_pipeline.STAGES)
    state = json.loads((first["out"] / run_pipeline.STATE_FILE).read_text())
    assert list(state["done"]) == list(run_pipeline.STAGES) and state["running"] == {}
    assert list(state["seconds"]) == list(run_pipeline.STAGES) and min(state["seconds"].values()) > 0
    for name, seconds in state["seconds"].items():
        assert f"[{name}] done in {seconds:.0f} s" in first["stdout"]
    for text in first["records"].values():
        assert len(json.loads(text)["source_sha256"]) == 64
    cam = json.loads(first["records"]["cam_train"])
    assert cam["weights_sha256"] == json.loads(first["records"]["cam_val"])["weights_sha256"]
    results = json.loads((first["out"] / "results.json").read_text())
    assert results["provenance"]["cam_train"] is not None
    # One row per stage: mIoU on train and val, mean Boundary IoU on val; the CAM rows at their best
    # background threshold. results.json keeps every metric of every evaluation.
    assert first["table"].splitlines()[0].split()[-4:] == ["train", "val", "bIoU", "val"]
    rows = [line.rsplit(None, 3) for line in first["table"].splitlines()[1:]]
    titles = results["titles"]
    assert list(titles) == ["round1_cam", "cam", "crf_la", "crf_ha", "rw", "seg", "seg_crf"]
    assert [row[0] for row in rows] == list(titles.values())
    for key, (_, train, val, biou) in zip(titles, rows, strict=True):
        assert (float(train), float(val)) == (round(results[key]["train"], 1), round(results[key]["val"], 1))
        for split in ("train", "val"):
            metrics = results["metrics"][key][split]
            assert metrics["mIoU"] == results[key][split]
            assert {"biou", "trimap", "precision", "recall", "fp_share", "fn_share"} <= set(metrics)
            assert 0 <= metrics["biou"]["mean"] <= 100 and metrics["boundary_ratio"] == 0.02
        assert float(biou) == round(results["metrics"][key]["val"]["biou"]["mean"], 1)
    assert set(results["cam_threshold"]) == {f"{key}_{split}" for key in ("round1_cam", "cam")
                                             for split in ("train", "val")}
    # The demo's AffinityNet trains with real momentum, lr 0.05 and radius 3 on la at alpha 12; its
    # walk has the same radius and the demo's alpha and logt. Round 1's CRF (the boundary maps) keeps
    # the released alphas.
    assert titles["crf_la"] == "CRF la (alpha 12)" and titles["crf_ha"] == "CRF ha (alpha 24)"
    infer_sb = re.findall(r"^\$ python infer_SB.py .*$", first["stdout"], re.M)
    assert [("--crf_alphas 12 24" in line, "--out_crf" in line) for line in infer_sb] == [
        (False, True), (False, False), (True, True), (True, True)]
    assert re.search(r"\$ python train_aff.py .*--lr 0.05 --momentum 0.9 --radius 3 .*"
                     r"--la_crf_dir \S+crf_train_12.0 --ha_crf_dir \S+crf_train_24.0", first["stdout"])
    assert re.search(r"\$ python infer_aff.py .*--radius 3 --alpha 6 --logt 6 ", first["stdout"])
    # DeepLab-v1 on the narrow ResNet-38 labels every image of the lists; its CRF sees the real image.
    seg = json.loads(first["records"]["seg_crf_val"])
    assert seg["seg_backbone"] == "resnet38" and seg["crf_image"] == "rgb"
    assert len(list((first["out"] / "seg_train").glob("*.png"))) == len(list((first["out"] / "rw_train").glob("*.png")))


def image_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean IoU over the classes in an image's ground truth or prediction, counted class by class."""
    valid = gt != 255
    ious = [np.sum((pred == c) & (gt == c) & valid) / np.sum(((pred == c) | (gt == c)) & valid)
            for c in np.union1d(np.unique(gt[valid]), np.unique(pred[valid]))]
    return 100 * float(np.mean(ious))


def test_picture_titles_each_stage_and_gives_its_iou_on_each_image(first):
    out, data = first["out"], first["out"] / "data"
    results = json.loads((out / "results.json").read_text())
    names = load_img_name_list(data / "val.txt")[:3]
    cfg = run_pipeline.make_config(run_pipeline.get_arg_parser().parse_args([*TINY, "--out_dir", str(out)]))
    titles, rows, captions = run_pipeline.figure_rows(cfg, names, 4, results["cam_threshold"])
    assert titles == ["image", "ground truth", "SEAM baseline CAM (round 1)", "SB CAM", "CRF la (alpha 12)",
                      "random walk", "DeepLab + CRF"]
    for name, panels, texts in zip(names, rows, captions, strict=True):
        img = read_image(data / "JPEGImages" / f"{name}.jpg")
        gt = load_label_png(data / "SegmentationClass" / f"{name}.png")
        assert len(panels) == len(texts) == len(titles) and texts[:2] == [name, ""]
        assert all(p.shape == img.shape for p in panels)
        np.testing.assert_array_equal(panels[0], img)
        expected = []
        for key in ("round1_cam", "cam"):  # SEAM's argmax over [t, CAMs...], first index winning ties
            labels, scores = load_scores(out / f"{key}_val" / f"{name}.npz")
            stacked = np.concatenate([np.full((1, *gt.shape), results["cam_threshold"][f"{key}_val"], np.float32),
                                      scores.astype(np.float32)])
            expected.append(np.concatenate([[0], labels])[stacked.argmax(0)])
        labels, scores = load_scores(out / "crf_val_12.0" / f"{name}.npz")
        expected.append(labels[scores.argmax(0)])
        expected += [load_label_png(out / folder / f"{name}.png") for folder in ("rw_val", "seg_crf_val")]
        assert texts[2:] == [f"IoU {image_iou(pred, gt):.1f}" for pred in expected]
    with Image.open(out / "demo.png") as picture:
        assert picture.width >= 7 * 100 and picture.height >= 4 * 100  # seven titled columns, four rows


def test_unchanged_rerun_trains_and_infers_nothing(first):
    before = mtimes(first["out"], "**/*.*")
    tic = time.monotonic()
    stdout = run(first["project"], first["out"])
    assert ran(stdout) == [] and "$ python" not in stdout
    assert stdout.count("up to date") == len(run_pipeline.STAGES)
    assert table(stdout) == first["table"]
    after = mtimes(first["out"], "**/*.*")
    changed = [k for k in before if not k.startswith("data/") and after.get(k) != before[k]]
    assert changed == []
    assert time.monotonic() - tic < 60


DAMAGE = {  # what is damaged, how, the stage that made it and the warning's words
    "rw_png_deleted": ("rw_val/{name}.png", "delete", "infer_aff", "is missing"),
    "cam_npz_cut": ("cam_val/{name}.npz", "cut", "infer_sb", "changed"),
    "weights_deleted": ("sb.pth", "delete", "sb", "is missing"),
    "results_cut": ("results.json", "cut", "eval", "changed"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_rerun_redoes_a_stage_whose_outputs_were_damaged(first, case):
    """A missing or cut output makes the rerun redo its stage and every stage after it, with a
    warning naming it, instead of printing the old table as up to date."""
    out = first["out"]
    relative, how, stage, words = DAMAGE[case]
    path = out / relative.format(name=load_img_name_list(out / "data" / "val.txt")[0])
    if how == "delete":
        path.unlink()
    else:
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    result = subprocess.run(command(first["project"], out), cwd=first["project"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: stage {stage}: {path} {words}"), result.stderr
    assert warnings[0].endswith("; redoing it and every stage after it")
    stages = list(run_pipeline.STAGES)
    assert ran(result.stdout) == stages[stages.index(stage):]
    assert f"[{stage}] running (outputs damaged)" in result.stdout
    assert path.is_file() and (path.suffix != ".npz" or is_valid_scores(path))
    assert table(result.stdout) == first["table"]  # training is deterministic: the same outputs again


def test_from_sb_retrains_only_from_the_sb_step(first):
    out = first["out"]
    kept = mtimes(out, "round1*") | mtimes(out, "round1_crf_*/*") | mtimes(out, "sb_map/*")
    redone = mtimes(out, "sb.pth") | mtimes(out, "aff.pth")
    seconds_before = json.loads((out / run_pipeline.STATE_FILE).read_text())["seconds"]
    stdout = run(first["project"], out, "--from", "sb")
    assert ran(stdout) == ["sb", "infer_sb", "aff", "infer_aff", "seg", "infer_seg", "eval"]
    assert "[round1] kept as it is" in stdout and "[sb_map] kept as it is" in stdout
    assert mtimes(out, "round1*") | mtimes(out, "round1_crf_*/*") | mtimes(out, "sb_map/*") == kept
    now = mtimes(out, "sb.pth") | mtimes(out, "aff.pth")
    assert all(now[k] > redone[k] for k in redone)
    assert "--overwrite" in stdout  # inference of a rerun stage starts clean
    seconds = json.loads((out / run_pipeline.STATE_FILE).read_text())["seconds"]
    assert seconds["round1"] == seconds_before["round1"]  # the time of the run that made it
    # Training is deterministic: the same weights, so the same table.
    assert table(stdout) == first["table"]


def test_loss_edit_reruns_every_stage_after_it_and_a_killed_rerun_resumes(first):
    project, out = first["project"], first["out"]
    losses = project / "tool" / "losses.py"
    text = losses.read_text()
    er = "    return torch.mean(torch.abs(cam1_norm_small[:, 1:] - cam2_norm[:, 1:]))"
    assert text.count(er) == 1
    losses.write_text(text.replace(er, er.replace("return ", "return 5 * ")))
    old_round1 = (out / "round1.pth").read_bytes()

    # The first round (2 epochs) reruns: kill it once it has checkpointed its first epoch.
    ckpt = out / "round1.ckpt"
    proc = subprocess.Popen(command(project, out), cwd=project, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["epoch"] == 1:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1, "the run ended before it could be killed"
    state = json.loads((out / run_pipeline.STATE_FILE).read_text())
    assert list(state["running"]) == ["round1"] and "round1" not in state["done"]

    stdout = run(project, out)
    assert ran(stdout) == list(run_pipeline.STAGES)
    assert "[round1] running (resuming)" in stdout
    assert re.search(r"\$ python train_SB.py .*--session_name \S+round1 .*--resume", stdout)
    assert (out / "round1.pth").read_bytes() != old_round1
    now = records(out)
    assert [k for k in INFERRED if now[k] == first["records"][k]] == []  # every output redone
    assert table(stdout) != first["table"]


def test_real_data_chain_runs_small_and_hints_only_its_own_flags(tiny_voc, tmp_path):
    parser_flags = {a for action in run_pipeline.get_arg_parser()._actions for a in action.option_strings}
    lists = ["--voc12_root", str(tiny_voc), "--dataset_classes", str(tiny_voc / "classes.txt"),
             "--train_list", str(tiny_voc / "train.txt"), "--eval_train_list", str(tiny_voc / "train.txt"),
             "--val_list", str(tiny_voc / "val.txt")]
    small = ["--batch_size", "4", "--crop_size", "64", "--resize_long", "56", "80", "--round1_epoches", "1",
             "--sb_epoches", "1", "--aff_epoches", "1", "--num_workers", "0", "--seg_iters", "1"]
    narrow = tmp_path / "narrow.pth"
    from network import resnet38_sb

    torch.save(resnet38_sb.Net(width=0.125).state_dict(), narrow)
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), *lists, *small, "--out_dir", str(tmp_path / "out")]
    no_seg_start = subprocess.run([*cmd, "--weights", str(narrow)], cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)
    assert no_seg_start.returncode == 2 and len(no_seg_start.stderr.strip().splitlines()) == 1
    assert "--seg_weights" in no_seg_start.stderr and not (tmp_path / "out").exists()
    cmd += ["--seg_backbone", "resnet38"]  # DeepLab-v1 on the narrow ResNet-38, from --weights
    wrong = subprocess.run([*cmd, "--weights", str(narrow)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    hints = set(re.findall(r"--\w+", wrong.stderr.strip().splitlines()[-1]))
    assert "--backbone_width" in hints and hints <= parser_flags, wrong.stderr
    result = subprocess.run([*cmd, "--weights", str(narrow), "--backbone_width", "0.125"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert ran(result.stdout) == list(run_pipeline.STAGES) and "DeepLab + CRF" in result.stdout
    train_aff = re.search(r"^\$ python train_aff.py .*$", result.stdout, re.M).group()
    # Real data: the released optimiser (quirk included), lr and radius.
    assert not {"--momentum", "--lr", "--radius"} & set(train_aff.split())
    assert re.search(r"--la_crf_dir \S+crf_train_4.0 --ha_crf_dir \S+crf_train_24.0", train_aff)
    assert "--crf_alphas" not in result.stdout and "CRF la (alpha 4)" in result.stdout
    infer_aff = re.search(r"^\$ python infer_aff.py .*$", result.stdout, re.M).group()
    assert "--radius" not in infer_aff.split()
    assert re.search(r"\$ python train_seg.py .*--seg_backbone resnet38 --backbone_width 0.125 .*"
                     r"--label_dir \S+rw_train .*--weights \S+narrow.pth", result.stdout)


@pytest.mark.timeout(300)
def test_a_second_run_on_the_same_out_dir_stops_in_one_line(tmp_path):
    """Two real pipeline runs: the second starts once the first is inside its stages, and stops."""
    out = tmp_path / "out"
    first = subprocess.Popen(command(ROOT, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / run_pipeline.STATE_FILE).is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.poll() is None and (out / run_pipeline.STATE_FILE).is_file()
        second = subprocess.run(command(ROOT, out), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2 and second.stdout == ""
    lock = out / LOCK_NAME
    assert second.stderr.strip().splitlines() == [f"error: {out} is in use by another run (it holds {lock}); wait "
                                                  "until it ends or choose another folder"]


@pytest.mark.parametrize("text", ['{"done": {"round1": "ab', "[]", '{"done": []}', '{"seconds": {"sb": "x"}}'])
def test_an_unreadable_state_file_vouches_for_no_stage(tmp_path, capsys, text):
    path = tmp_path / run_pipeline.STATE_FILE
    path.write_text(text)
    state = run_pipeline.StageState(path)
    assert (state.done, state.running, state.seconds, state.outputs) == ({}, {}, {}, {})
    assert capsys.readouterr().err == (f"warning: {path} is unreadable (cut short or not a state file): every stage "
                                       "is redone\n")


def test_a_stage_without_a_record_of_its_outputs_is_not_vouched_for(tmp_path):
    """A state file that names a stage done but not its outputs (cut by hand, or an older one):
    the rerun redoes from that stage."""
    import train_SB

    weights = tmp_path / "sb.pth"
    weights.write_bytes(b"weights")
    stage = run_pipeline.Stage("sb", (run_pipeline.Command(train_SB, ("--session_name", str(tmp_path / "sb")),
                                                           "train"),))
    assert stage.outputs() == [weights]
    state = run_pipeline.StageState(tmp_path / run_pipeline.STATE_FILE)
    state.finish(stage, "fingerprint", 1.0)
    assert state.damage(stage) == (None, [])
    weights.write_bytes(b"Weights")  # same size, another content: hashed since its time changed
    os.utime(weights, ns=(1, 1))
    assert state.damage(stage) == (f"{weights} changed (7 bytes, 7 when the stage finished)", [])
    del state.outputs["sb"]
    assert state.damage(stage) == (f"{state.path} has no record of its outputs", [])
