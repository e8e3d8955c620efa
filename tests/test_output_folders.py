"""Output folders of issue 21: one run at a time writes a folder (two real processes racing for it),
a killed holder leaves no lock behind, and files this tool did not write are never deleted."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from network import resnet38_aff
from tool import provenance
from tool.errors import InputError
from tool.fileio import LOCK_NAME, held_folders, hold_folder, image_size, load_img_name_list, save_scores
from voc12.data import image_path

ROOT = Path(__file__).resolve().parents[1]

# infer_aff.py itself, with a rendezvous around its claim of the output folder: both processes are
# about to claim at once, and neither writes an image before the other has claimed or given up.
RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    root, sync, me, other = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    sys.path.insert(0, root)
    import infer_aff
    from tool import provenance

    def wait_for(name):
        deadline = time.monotonic() + 60
        while not (sync / name).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"{me}: nobody came to {name}")
            time.sleep(0.01)

    claim = provenance.claim_outputs

    def claim_together(*args, **kwargs):
        (sync / f"arrived_{me}").touch()
        wait_for(f"arrived_{other}")
        try:
            return claim(*args, **kwargs)
        finally:
            (sync / f"claimed_{me}").touch()
            wait_for(f"claimed_{other}")

    provenance.claim_outputs = claim_together
    infer_aff.main(sys.argv[5:])
""")


@pytest.fixture
def walk_inputs(tiny_voc: Path, tmp_path: Path) -> dict:
    """Two val images, CAMs for them and two AffinityNets of different weights."""
    names = load_img_name_list(tiny_voc / "val.txt")[:2]
    (tmp_path / "list.txt").write_text("".join(f"{n}\n" for n in names))
    rng = np.random.default_rng(0)
    for name in names:
        size = image_size(image_path(tiny_voc, name))
        save_scores(tmp_path / "cam" / f"{name}.npz", np.array([1]), rng.random((1, *size), np.float32))
    weights = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        weights.append(tmp_path / f"aff{seed}.pth")
        torch.save(resnet38_aff.Net(width=0.125).state_dict(), weights[-1])
    return {"names": names, "weights": weights, "argv": [
        "--voc12_root", str(tiny_voc), "--dataset_classes", str(tiny_voc / "classes.txt"), "--backbone_width",
        "0.125", "--num_workers", "0", "--infer_list", str(tmp_path / "list.txt"), "--cam_dir", str(tmp_path / "cam")]}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not line.startswith("20")]  # log lines left out


@pytest.mark.timeout(180)
def test_two_runs_into_one_new_folder_at_once_one_refuses(walk_inputs, tmp_path):
    (tmp_path / "sync").mkdir()
    (tmp_path / "race.py").write_text(RACE)
    rw = tmp_path / "rw"
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "race.py"), str(ROOT), str(tmp_path / "sync"), me, other,
                               *walk_inputs["argv"], "--weights", str(weights), "--out_rw", str(rw)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other, weights in (("0", "1", walk_inputs["weights"][0]), ("1", "0", walk_inputs["weights"][1]))]
    results = [(p.wait(timeout=150), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    assert error_lines(results[1 - winner][2]) == [f"error: {rw} is in use by another run (it holds {rw / LOCK_NAME}); "
                                                   "wait until it ends or choose another folder"]
    # The folder is the winner's alone: its record, all its images.
    weights = walk_inputs["weights"][winner]
    assert provenance.read_record(rw)["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sorted(p.stem for p in rw.glob("*.png")) == sorted(walk_inputs["names"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool uses fork")
def test_a_killed_holder_leaves_no_lock_even_with_a_child_alive(tmp_path):
    """The lock dies with its process (SIGKILL), and a child it forked does not keep it."""
    holder = textwrap.dedent("""
        import os, sys, time
        sys.path.insert(0, sys.argv[1])
        from tool.fileio import hold_folder
        hold_folder(sys.argv[2])
        child = os.fork()
        if child == 0:
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """)
    folder = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(ROOT), str(folder)], stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    try:
        with held_folders(), pytest.raises(InputError, match="is in use by another run"):
            hold_folder(folder)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with held_folders():
            hold_folder(folder)  # the child still runs, the lock is free
            assert Path(f"/proc/{child}").exists()
    finally:
        proc.kill()
        subprocess.run(["kill", "-9", str(child)], check=False)


def test_overwrite_into_a_copy_of_the_ground_truth_deletes_nothing(walk_inputs, tiny_voc, tmp_path):
    gt = Path(shutil.copytree(tiny_voc / "SegmentationClass", tmp_path / "gt"))
    before = {p.name: p.read_bytes() for p in gt.iterdir()}
    result = subprocess.run([sys.executable, str(ROOT / "infer_aff.py"), *walk_inputs["argv"], "--weights",
                             str(walk_inputs["weights"][0]), "--out_rw", str(gt), "--overwrite"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    first = min(before)
    assert error_lines(result.stderr) == [f"error: {gt} holds {len(before)} .png files this tool did not write "
                                          f"(first: {first}); choose an empty folder"]
    assert {p.name: p.read_bytes() for p in gt.iterdir() if not p.name.startswith(".")} == before


@pytest.mark.timeout(180)
def test_torchrun_ranks_all_stop_when_another_run_holds_the_folder(walk_inputs, tmp_path):
    """Rank 0 takes the lock for all ranks and tells them it could not: every rank stops, none waits."""
    rw = tmp_path / "rw"
    with held_folders():
        hold_folder(rw)
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", str(ROOT / "infer_aff.py"), *walk_inputs["argv"], "--weights",
                                 str(walk_inputs["weights"][0]), "--out_rw", str(rw)],
                                cwd=ROOT, capture_output=True, text=True, timeout=150,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert f"error: {rw} is in use by another run (it holds {rw / LOCK_NAME})" in result.stderr
    assert f"error: {rw} is in use by another run\n" in result.stderr  # rank 1's own line
    assert list(rw.iterdir()) == [rw / LOCK_NAME]
