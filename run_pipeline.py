"""Run every stage of the method, end to end, redoing only what changed.

With no arguments: the demo. It generates a small dataset in VOC layout, trains every network
of the method on it from the demo's pretrained narrow ResNet-38 (``voc12/demo_backbone.pth``, as
the paper's start from ImageNet) on whatever device there is, and reports every stage's mIoU:

    python run_pipeline.py                      # at most 15 minutes on 2 CPU cores
    python run_pipeline.py --seed 3             # other data, initialisation and sampling

With real data, the paper's defaults (see README.md for the steps one by one); the small-run
flags try the chain quickly:

    python run_pipeline.py --voc12_root VOC2012 --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params
    python run_pipeline.py --coco_root COCO --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params
    python run_pipeline.py --voc12_root VOC2012 --weights ... --backbone_width 0.25 --batch_size 4 \\
        --round1_epoches 1 --sb_epoches 1 --aff_epoches 1 --train_list small.txt

The stages, in order: round1, sb_map, sb, infer_sb, aff, infer_aff, seg, infer_seg, eval. Each has a fingerprint:
its commands, the hash of the project source they run (the script and every module it imports),
the content of the input files the user gave (weights, lists, labels, class list) and the
fingerprint of the stage before it. ``OUT_DIR/stages.json`` keeps the fingerprint of every
finished stage; a rerun redoes a stage whose fingerprint changed and every stage after it, and
nothing else: edit ``tool/losses.py`` and the training stages that use it rerun (with
everything downstream); rerun unchanged and the table is printed again in seconds. A stage that
reruns starts clean (inference gets ``--overwrite``, training no ``--resume``); a stage that was
killed resumes (training with ``--resume``, inference with ``--overwrite stale`` keeps the images
it finished). A finished stage is also checked on every rerun: ``stages.json`` keeps, from when it
finished, the size and modification time of every file in its output folders, their records'
hashes, and the size, time and sha256 of its weights; a missing or changed file (or an unreadable
``stages.json``) makes the rerun redo that stage, with a warning, and every stage after it. One
run at a time holds ``OUT_DIR``: a second stops with one line.
``--from STAGE`` redoes that stage and the ones after it and keeps those before as they are;
``--only STAGE`` redoes that stage alone.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import evaluation
import infer_aff
import infer_SB
import infer_seg
import train_aff
import train_SB
import train_seg
from coco14 import prepare as coco14_prepare
from tool import provenance
from tool.cli import run_main
from tool.errors import InputError
from tool.fileio import (
    atomic_path,
    held_folders,
    hold_folder,
    load_img_name_list,
    load_label_png,
    load_scores,
    read_image,
)
from tool.iou import cam_labels, crf_labels, image_miou
from tool.visualization import blend, colorize_label, heatmap, max_score, save_grid
from voc12 import sb_map
from voc12.classes import load_classes
from voc12.data import default_label_file

LA, HA = infer_SB.CRF_ALPHAS  # the released low and high background powers of the CRF outputs
STAGES = ("round1", "sb_map", "sb", "infer_sb", "aff", "infer_aff", "seg", "infer_seg", "eval")
STATE_FILE = "stages.json"
SPLITS = ("train", "val")

# The demo's scale: the paper's recipe, smaller (bench/DEMO.md: seconds per stage, numbers over seeds).
# Every network starts from the demo's pretrained backbone (pretrain_demo.py), as the paper's from ImageNet.
DEMO_BACKBONE = Path(__file__).resolve().parent / "voc12" / "demo_backbone.pth"
DEMO = {
    "num_train": 160, "num_val": 60, "image_size": 160, "backbone_width": 0.125, "batch_size": 8,
    "num_classes": 5, "rw_alpha": 6, "rw_logt": 6, "round1_epoches": 15, "sb_epoches": 15, "aff_epoches": 16,
    "num_workers": 1, "smooth_weight": 0.1, "aff_momentum": 0.9, "aff_lr": 0.05, "aff_radius": 3,
    "la_alpha": 12,
    # DeepLab-v1 on the narrow ResNet-38 (SEAM's codebase: lr 1e-3), 300 iterations of 8 crops; its
    # head's BatchNorm momentum scaled with the iterations (3e-4 over 20,000).
    "seg_iters": 300, "seg_lr": 0.001, "seg_batch_size": 8, "seg_iter_size": 1, "seg_head_bn_momentum": 0.02,
}


@dataclass(frozen=True)
class SegConfig:
    """The segmentation stage's options; ``None`` leaves train_seg.py's default (the VOC recipe)."""

    backbone: str = "resnet101"
    weights: str | None = None  # its start (default: --weights)
    input: str | None = None  # network input normalisation (caffe / imagenet)
    balanced_ce: bool = False
    iters: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    iter_size: int | None = None
    crop_size: int | None = None
    scales: tuple[float, ...] | None = None
    head_bn_momentum: float | None = None


@dataclass(frozen=True)
class Config:
    """Everything the stages are built from, typed once. ``None`` leaves a script's default."""

    out: Path
    root: Path
    classes_file: str | None
    train_list: str  # trained on and inferred (train_aug on VOC)
    eval_lists: dict[str, str]  # evaluated: train and val
    weights: str | None  # the first round's start (ImageNet)
    demo: bool
    device: str | None = None
    backbone_width: float | None = None
    num_workers: int | None = None
    batch_size: int | None = None
    crop_size: int | None = None
    resize_long: tuple[int, int] | None = None
    seed: int | None = None
    epochs: dict[str, int | None] = field(default_factory=dict)  # by stage: round1, sb, aff
    smooth_weight: float | None = None
    aff_momentum: float | None = None  # AffinityNet's SGD momentum (None: the released quirk)
    aff_lr: float | None = None
    aff_radius: int | None = None  # AffinityNet's pair radius, in training and in the walk
    # The SB step's CRF background powers (la, ha): AffinityNet's labels and the table's CRF rows.
    # Round 1's CRF, which gives the boundary maps, keeps the released ones.
    crf_alphas: tuple[float, float] = (LA, HA)
    rw_alpha: float | None = None
    rw_logt: int | None = None
    seg: SegConfig = field(default_factory=SegConfig)



def flags(**options: Any) -> list[str]:
    """Command-line flags of the given options: None is left out, True is a bare switch, a tuple
    gives several values. The one place that turns the config into strings."""
    argv: list[str] = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        argv.append(f"--{name}")
        if value is not True:
            argv += [str(v) for v in value] if isinstance(value, (tuple, list)) else [str(value)]
    return argv


# The flags that name the folders a command writes.
OUTPUT_FOLDER_FLAGS = ("--out_cam", "--out_cam_pred", "--out_rw", "--out_dir", "--out_raw_dir")


@dataclass(frozen=True)
class Command:
    """One stage script run exactly as its command line would run it."""

    module: ModuleType
    argv: tuple[str, ...]
    role: str  # "train", "infer" or "other": what to add to resume or to start clean

    def line(self) -> str:
        name = self.module.__name__
        return f"python {name}.py" if "." not in name else f"python -m {name}"

    def run(self, extra: tuple[str, ...] = ()) -> Any:
        argv = [*self.argv, *extra]
        print(f"\n$ {self.line()} {' '.join(argv)}", flush=True)
        return self.module.run(self.module.get_arg_parser().parse_args(argv))

    def session(self) -> Path:
        return Path(self.argv[self.argv.index("--session_name") + 1])

    def outputs(self) -> list[Path]:
        """The folders and the weights file this command writes, read off its flags."""
        found = []
        for flag, value in zip(self.argv, self.argv[1:], strict=False):
            if flag in OUTPUT_FOLDER_FLAGS:
                found.append(Path(value))
            elif flag == "--out_crf":  # one folder per background power, as infer_SB reads its flags
                alphas = self.module.get_arg_parser().parse_args(self.argv).crf_alphas
                found += [infer_SB.crf_dir(value, alpha) for alpha in alphas]
            elif flag == "--session_name":
                found.append(Path(f"{value}.pth"))
        return found


@dataclass(frozen=True)
class Stage:
    name: str
    commands: tuple[Command, ...]
    inputs: tuple[str, ...] = ()  # files the user gave, hashed into the fingerprint
    writes: tuple[Path, ...] = ()  # files the stage writes itself, besides its commands' outputs

    def outputs(self) -> list[Path]:
        """What a rerun checks before it calls this stage up to date."""
        return [path for command in self.commands for path in command.outputs()] + list(self.writes)

    def fingerprint(self, previous: str | None) -> str:
        spec = {"previous": previous,
                "commands": [[c.module.__name__, list(c.argv), provenance.source_digest(c.module.__file__)]
                             for c in self.commands],
                "inputs": {path: provenance.file_digest(path) for path in self.inputs}}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def build_stages(cfg: Config) -> list[Stage]:
    """The method's stages, each with its commands."""
    out = cfg.out
    data = flags(voc12_root=cfg.root, dataset_classes=cfg.classes_file)
    common = data + flags(device=cfg.device, backbone_width=cfg.backbone_width, num_workers=cfg.num_workers)
    train = common + flags(tblog_dir=out / "tblog", train_list=cfg.train_list, crop_size=cfg.crop_size,
                           batch_size=cfg.batch_size, seed=cfg.seed)
    sb_train = train + flags(resize_long=cfg.resize_long)
    r1, sb, aff = (str(out / name) for name in ("round1", "sb", "aff"))
    crf = {split: str(out / f"crf_{split}") for split in SPLITS}
    la, ha = cfg.crf_alphas
    crf_alphas = cfg.crf_alphas if cfg.crf_alphas != (LA, HA) else None  # the released ones: infer_SB's default
    infer_lists = {"train": cfg.train_list, "val": cfg.eval_lists["val"]}
    # DeepLab: real data trains DeepLab-v2 from --seg_weights; the demo the narrow ResNet-38
    # DeepLab-v1 from the pretrained backbone.
    seg_cfg = cfg.seg
    seg = str(out / "seg")
    seg_net = flags(seg_backbone=seg_cfg.backbone, seg_input=seg_cfg.input,
                    backbone_width=cfg.backbone_width if seg_cfg.backbone == "resnet38" else None)
    seg_train = data + seg_net + flags(
        device=cfg.device, num_workers=cfg.num_workers, tblog_dir=out / "tblog", train_list=cfg.train_list,
        label_dir=out / "rw_train", weights=seg_cfg.weights or cfg.weights,
        session_name=seg, seed=cfg.seed, max_iters=seg_cfg.iters, lr=seg_cfg.lr,
        batch_size=seg_cfg.batch_size, iter_size=seg_cfg.iter_size, crop_size=seg_cfg.crop_size,
        scales=seg_cfg.scales, head_bn_momentum=seg_cfg.head_bn_momentum, balanced_ce=seg_cfg.balanced_ce)
    seg_infer = data + seg_net + flags(device=cfg.device, num_workers=cfg.num_workers, weights=seg + ".pth")

    def cmd(module: ModuleType, argv: list[str], role: str) -> Command:
        return Command(module, tuple(argv), role)

    user_files = tuple(str(p) for p in (cfg.weights, cfg.classes_file, cfg.train_list,
                                        default_label_file(cfg.train_list), *cfg.eval_lists.values()) if p)
    return [
        # Round 1: the SEAM baseline; its CRF outputs give the pseudo-label boundary maps.
        Stage("round1", (
            cmd(train_SB, sb_train + flags(weights=cfg.weights, max_epoches=cfg.epochs.get("round1"),
                                           session_name=r1, boundary_weight=0, smooth_weight=0), "train"),
            cmd(infer_SB, common + flags(weights=r1 + ".pth", infer_list=cfg.train_list,
                                         out_cam=out / "round1_cam_train", out_crf=out / "round1_crf"), "infer"),
            cmd(infer_SB, common + flags(weights=r1 + ".pth", infer_list=infer_lists["val"],
                                         out_cam=out / "round1_cam_val"), "infer"),
        ), inputs=user_files),
        Stage("sb_map", (cmd(sb_map, data + flags(list=cfg.train_list, crf_dir=infer_SB.crf_dir(
            str(out / "round1_crf"), LA), out_dir=out / "sb_map"), "other"),)),
        Stage("sb", (cmd(train_SB, sb_train + flags(weights=cfg.weights, max_epoches=cfg.epochs.get("sb"),
                                                    smooth_weight=cfg.smooth_weight, session_name=sb,
                                                    sb_map_dir=out / "sb_map"), "train"),)),
        # Inference covers the whole training list (train_aug on VOC: AffinityNet trains on its
        # CRFs), so that the train split evaluated below is a subset of it.
        Stage("infer_sb", tuple(
            cmd(infer_SB, common + flags(weights=sb + ".pth", infer_list=lst, out_cam=out / f"cam_{split}",
                                         out_crf=crf[split], crf_alphas=crf_alphas), "infer")
            for split, lst in infer_lists.items())),
        Stage("aff", (cmd(train_aff, train + flags(weights=cfg.weights, max_epoches=cfg.epochs.get("aff"),
                                                   session_name=aff, lr=cfg.aff_lr, momentum=cfg.aff_momentum,
                                                   radius=cfg.aff_radius,
                                                   la_crf_dir=infer_SB.crf_dir(crf["train"], la),
                                                   ha_crf_dir=infer_SB.crf_dir(crf["train"], ha)), "train"),)),
        Stage("infer_aff", tuple(
            cmd(infer_aff, common + flags(radius=cfg.aff_radius, alpha=cfg.rw_alpha, logt=cfg.rw_logt,
                                          weights=aff + ".pth",
                                          infer_list=lst, cam_dir=out / f"cam_{split}", out_rw=out / f"rw_{split}"),
                "infer") for split, lst in infer_lists.items())),
        Stage("seg", (cmd(train_seg, seg_train, "train"),), inputs=(seg_cfg.weights,) if seg_cfg.weights else ()),
        # Evaluated lists only (train_aug's other images are not scored): argmax and CRF labels.
        Stage("infer_seg", tuple(
            cmd(infer_seg, seg_infer + flags(infer_list=lst, out_dir=out / f"seg_crf_{split}",
                                             out_raw_dir=out / f"seg_{split}"), "infer")
            for split, lst in cfg.eval_lists.items())),
        Stage("eval", tuple(eval_commands(cfg)), writes=(out / "results.json", out / "demo.png")),
    ]


def evaluated(cfg: Config) -> tuple[tuple[str, str, list[str]], ...]:
    """What the table shows: its row, the folder evaluated (by split) and how."""
    la, ha = cfg.crf_alphas
    return (
        ("round1_cam", "round1_cam_{}", ["--type", "npz", "--curve", "True"]),
        ("cam", "cam_{}", ["--type", "npz", "--curve", "True"]),
        ("crf_la", str(infer_SB.crf_dir("crf_{}", la)), ["--type", "npz"]),
        ("crf_ha", str(infer_SB.crf_dir("crf_{}", ha)), ["--type", "npz"]),
        ("rw", "rw_{}", ["--type", "png"]),
        ("seg", "seg_{}", ["--type", "png"]),
        ("seg_crf", "seg_crf_{}", ["--type", "png"]),
    )


EVAL_METRICS = ",".join(evaluation.METRICS)  # every metric, on every row


def row_titles(cfg: Config) -> dict[str, str]:
    la, ha = cfg.crf_alphas
    return {"round1_cam": "SEAM baseline CAM (round 1)", "cam": "SB CAM", "crf_la": f"CRF la (alpha {la:g})",
            "crf_ha": f"CRF ha (alpha {ha:g})", "rw": "random walk", "seg": "DeepLab", "seg_crf": "DeepLab + CRF"}


def eval_commands(cfg: Config) -> list[Command]:
    commands = []
    for split, lst in cfg.eval_lists.items():
        for key, folder, kind in evaluated(cfg):
            argv = flags(list=lst, gt_dir=cfg.root / "SegmentationClass", logfile=cfg.out / "evallog.txt",
                         dataset_classes=cfg.classes_file, predict_dir=cfg.out / folder.format(split),
                         metrics=EVAL_METRICS)
            commands.append(Command(evaluation, (*argv, *kind, "--comment", f"{key}_{split}"), "other"))
    return commands


def output_state(path: Path) -> dict:
    """What a stage's output is as the stage finishes: a folder's record hash and, per file, its
    size and modification time (hashing every CAM again on each rerun would take minutes); a
    file's (the weights, results.json) size, time and sha256."""
    if path.is_dir():
        return {"record": provenance.folder_digest(path), "files": folder_files(path)}
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": provenance.file_digest(path)}


def folder_files(folder: Path) -> dict[str, list[int]]:
    """``[size, mtime_ns]`` of each file in ``folder`` (hidden ones, records and locks, left out)."""
    with os.scandir(folder) as entries:
        return {e.name: [(st := e.stat()).st_size, st.st_mtime_ns] for e in entries
                if not e.name.startswith(".") and e.is_file()}


def changes(path: Path, then: dict) -> tuple[list[str], list[Path]]:
    """What changed in an output since its stage finished (``then``: its :func:`output_state`):
    one phrase per change, and the changed files of a folder (deleted before the stage is redone,
    so that its resumed inference remakes them). A file whose time alone changed is hashed."""
    if "files" in then:
        if not path.is_dir():
            return [f"{path} is missing"], []
        found = []
        if provenance.folder_digest(path) != then["record"]:
            found.append(f"{path / provenance.RECORD_NAME} changed")
        now, changed = folder_files(path), []
        for name, state in sorted(then["files"].items()):
            if name not in now:
                found.append(f"{path / name} is missing")
            elif now[name] != state:
                found.append(f"{path / name} changed ({now[name][0]} bytes, {state[0]} when the stage finished)")
                changed.append(path / name)
        return found, changed
    if not path.is_file():
        return [f"{path} is missing"], []
    stat = path.stat()
    if stat.st_size != then["size"] or (stat.st_mtime_ns != then["mtime_ns"]
                                        and provenance.file_digest(path) != then["sha256"]):
        return [f"{path} changed ({stat.st_size} bytes, {then['size']} when the stage finished)"], []
    return [], []


class StageState:
    """``OUT_DIR/stages.json``: the fingerprint of each finished stage and of the one running, the
    seconds each finished stage took (its last run) and its outputs as it finished (:func:`output_state`)."""

    KEYS = ("done", "running", "seconds", "outputs")

    def __init__(self, path: Path) -> None:
        self.path = path
        data = self.read(path)
        self.done: dict[str, str] = data.get("done", {})
        self.running: dict[str, str] = data.get("running", {})
        self.seconds: dict[str, float] = data.get("seconds", {})
        self.outputs: dict[str, dict[str, dict]] = data.get("outputs", {})

    @classmethod
    def read(cls, path: Path) -> dict:
        """The file's contents; {} (with a warning: it vouches for no stage) when it cannot be read."""
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = None
        value_types = {"done": str, "running": str, "seconds": (int, float), "outputs": dict}
        if isinstance(data, dict) and all(
                isinstance(data.get(key, {}), dict) and all(isinstance(v, value_types[key])
                                                            for v in data.get(key, {}).values())
                for key in cls.KEYS):
            return data
        print(f"warning: {path} is unreadable (cut short or not a state file): every stage is redone",
              file=sys.stderr, flush=True)
        return {}

    def save(self) -> None:
        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps({key: getattr(self, key) for key in self.KEYS}, indent=1) + "\n")

    def start(self, name: str, fingerprint: str) -> None:
        """Forget this stage and every later one (they follow it), and note what now runs."""
        for later in STAGES[STAGES.index(name):]:
            self.done.pop(later, None)
            self.seconds.pop(later, None)
            self.outputs.pop(later, None)
        self.running = {name: fingerprint}
        self.save()

    def finish(self, stage: Stage, fingerprint: str, seconds: float) -> None:
        self.done[stage.name] = fingerprint
        self.seconds[stage.name] = round(seconds, 1)
        self.outputs[stage.name] = {str(path): output_state(path) for path in stage.outputs()}
        self.running = {}
        self.save()

    def damage(self, stage: Stage) -> tuple[str | None, list[Path]]:
        """What is missing or changed among a finished stage's outputs, in one phrase (None when
        nothing), and the changed files of its folders."""
        then = self.outputs.get(stage.name)
        if then is None or set(then) != {str(path) for path in stage.outputs()}:
            return f"{self.path} has no record of its outputs", []
        found, changed = [], []
        for path, state in then.items():
            try:
                more, more_changed = changes(Path(path), state)
            except (KeyError, TypeError, ValueError):
                more, more_changed = [f"{self.path} has no usable record of {path}"], []
            found += more
            changed += more_changed
        if not found:
            return None, []
        return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else ""), changed


def run_stage(stage: Stage, resume: bool) -> list[Any]:
    """Run a stage's commands: resuming (training ``--resume`` from its checkpoint, inference
    skipping finished images) or from a clean start (old checkpoint gone, ``--overwrite``)."""
    results = []
    for command in stage.commands:
        extra: tuple[str, ...] = ()
        if command.role == "train":
            ckpt = Path(f"{command.session()}.ckpt")
            if resume and ckpt.is_file():
                extra = ("--resume",)
            else:
                ckpt.unlink(missing_ok=True)
        elif command.role == "infer":
            # Resuming: keep the images this stage finished, redo folders of another origin (a
            # command of the stage that had not started yet when the run was killed).
            extra = ("--overwrite", "stale") if resume else ("--overwrite",)
        results.append(command.run(extra))
    return results


def select(args: argparse.Namespace) -> tuple[int, int]:
    """The range of stages that ``--from`` / ``--only`` force to run again."""
    if args.only:
        i = STAGES.index(args.only)
        return i, i + 1
    if args.from_stage:
        return STAGES.index(args.from_stage), len(STAGES)
    return len(STAGES), len(STAGES)


def run(args: argparse.Namespace) -> dict:
    tic = time.time()
    cfg = make_config(args)
    with held_folders():
        hold_folder(cfg.out)  # a second run on this --out_dir stops here, before it writes anything
        make_dataset(args, cfg)
        return run_stages(args, cfg, tic)


def run_stages(args: argparse.Namespace, cfg: Config, tic: float) -> dict:
    """Run what is not up to date, then print the table."""
    stages = build_stages(cfg)
    state = StageState(cfg.out / STATE_FILE)
    first_forced, end_forced = select(args)
    results = None
    previous = None
    selection = f"--only {args.only}" if args.only else f"--from {args.from_stage}"
    for index, stage in enumerate(stages):
        if index < first_forced < len(STAGES):  # before the selection: taken as it is
            if stage.name not in state.done:
                raise InputError(f"stage {stage.name} has not finished in {cfg.out}; run without --from/--only first")
            damage, _ = state.damage(stage)
            if damage is not None:
                raise InputError(f"stage {stage.name}: {damage}; run without --from/--only to redo it")
            print(f"[{stage.name}] kept as it is ({selection})", flush=True)
            previous = state.done[stage.name]
            continue
        if index >= end_forced:  # after --only: left for the next run
            print(f"[{stage.name}] not run ({selection}); the next run redoes it", flush=True)
            continue
        fingerprint = stage.fingerprint(previous)
        forced = first_forced <= index
        finished = not forced and state.done.get(stage.name) == fingerprint
        damage, changed = state.damage(stage) if finished else (None, [])
        if finished and damage is None:
            print(f"[{stage.name}] up to date", flush=True)
        else:
            if damage is not None:
                print(f"warning: stage {stage.name}: {damage}; redoing it and every stage after it",
                      file=sys.stderr, flush=True)
                for path in changed:  # files of its own folders (their lists name them)
                    path.unlink(missing_ok=True)
            # A damaged stage resumes too: inference keeps its intact images, training its checkpoint.
            resume = damage is not None or (not forced and state.running.get(stage.name) == fingerprint)
            why = ("outputs damaged" if damage is not None else "resuming" if resume else "forced" if forced
                   else "inputs changed" if stage.name in state.done else "not run yet")
            print(f"\n[{stage.name}] running ({why})", flush=True)
            state.start(stage.name, fingerprint)
            stage_tic = time.time()
            outputs = run_stage(stage, resume)
            if stage.name == "eval":
                write_results(cfg, outputs, seconds=time.time() - tic)
            state.finish(stage, fingerprint, time.time() - stage_tic)
            print(f"[{stage.name}] done in {state.seconds[stage.name]:.0f} s", flush=True)
        previous = fingerprint
    if (cfg.out / "results.json").is_file() and "eval" in state.done:
        results = json.loads((cfg.out / "results.json").read_text())
        check_results(cfg, results)
        print_table(cfg, results)
        print("\nseconds per stage (its last run): " + ", ".join(f"{k} {v:.0f}" for k, v in state.seconds.items()))
        print(f"\nresults: {cfg.out / 'results.json'}  picture: {cfg.out / 'demo.png'}  "
              f"({time.time() - tic:.0f} s)")
    return results or {}


def write_results(cfg: Config, outputs: list[dict], seconds: float) -> None:
    """The table's numbers (mIoU by row and split), every metric of every evaluation
    (``metrics[row][split]``: what evaluation.py returned, less the provenance hash), the
    provenance hash of every folder they were computed from and the time the run that computed
    them took, and each row's title."""
    rows = [key for key, _, _ in evaluated(cfg)]
    results: dict = {key: {} for key in rows}
    results["cam_threshold"], results["provenance"] = {}, {}
    results["metrics"] = {key: {} for key in rows}
    results["titles"] = row_titles(cfg)
    pairs = [(split, key) for split in cfg.eval_lists for key in rows]
    for (split, key), res in zip(pairs, outputs, strict=True):
        results[key][split] = res["mIoU"]
        results["metrics"][key][split] = {name: value for name, value in res.items() if name != "provenance"}
        results["provenance"][f"{key}_{split}"] = res.get("provenance")
        if res.get("threshold") is not None:  # CAMs: mIoU at the best background threshold
            results["cam_threshold"][f"{key}_{split}"] = res["threshold"]
    results["seconds"] = round(seconds, 1)
    with atomic_path(cfg.out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    write_figure(cfg, results)


def check_results(cfg: Config, results: dict) -> None:
    """Refuse to print numbers of folders that changed since they were evaluated."""
    for split in cfg.eval_lists:
        for key, folder, _ in evaluated(cfg):
            now = provenance.folder_digest(cfg.out / folder.format(split))
            if results["provenance"][f"{key}_{split}"] != now:
                raise InputError(f"{cfg.out / folder.format(split)} changed after it was evaluated; "
                                 "rerun with --from eval")


def print_table(cfg: Config, results: dict) -> None:
    """One row per stage: mIoU on train and val, mean Boundary IoU on val; CAM rows at their best
    background threshold."""
    titles = row_titles(cfg)
    width = max(map(len, titles.values())) + 2
    print(f"\n{'mIoU (%)':<{width}} train     val  bIoU val")
    for key in titles:
        biou = results["metrics"][key]["val"]["biou"]["mean"]
        print(f"{titles[key]:<{width}}{results[key]['train']:>6.1f}  {results[key]['val']:>6.1f}  {biou:>8.1f}")


# The picture's columns after the image and its ground truth: a table row's val folder each.
FIGURE_COLUMNS = ("round1_cam", "cam", "crf_la", "rw", "seg_crf")


def figure_rows(cfg: Config, names: list[str], num_classes: int,
                cam_thresholds: dict[str, float]) -> tuple[list[str], list[list[np.ndarray]], list[list[str]]]:
    """The picture of some val images: column titles, and per image its panels (image, ground
    truth, then each of FIGURE_COLUMNS) and their captions (each prediction's mIoU on that image,
    CAMs at the table's background threshold)."""
    out, root = cfg.out, cfg.root
    titles = ["image", "ground truth"] + [row_titles(cfg)[key] for key in FIGURE_COLUMNS]
    folders = {key: out / folder.format("val") for key, folder, _ in evaluated(cfg)}
    rows, captions = [], []
    for name in names:
        img = read_image(root / "JPEGImages" / f"{name}.jpg")
        gt = load_label_png(root / "SegmentationClass" / f"{name}.png")
        panels, texts = [img, colorize_label(gt)], [name, ""]
        for key in FIGURE_COLUMNS:
            path = folders[key]
            if key in ("round1_cam", "cam"):
                labels, scores = load_scores(path / f"{name}.npz")
                pred = cam_labels(labels, scores, cam_thresholds[f"{key}_val"])
                panel = blend(img, heatmap(max_score(labels, scores, gt.shape)))
            elif key == "crf_la":
                pred = crf_labels(*load_scores(path / f"{name}.npz"))
                panel = blend(img, colorize_label(pred), 0.6)
            else:
                pred = load_label_png(path / f"{name}.png")
                panel = blend(img, colorize_label(pred), 0.6)
            panels.append(panel)
            texts.append(f"IoU {100 * image_miou(pred, gt, num_classes):.1f}")
        rows.append(panels)
        captions.append(texts)
    return titles, rows, captions


def write_figure(cfg: Config, results: dict, count: int = 4) -> None:
    """``demo.png``: the first val images with each stage's prediction and its IoU on the image."""
    names = load_img_name_list(cfg.eval_lists["val"])[:count]
    num_classes = load_classes(cfg.classes_file).num_classes
    save_grid(cfg.out / "demo.png", *figure_rows(cfg, names, num_classes, results["cam_threshold"]))


def make_dataset(args: argparse.Namespace, cfg: Config) -> None:
    """Write the dataset the stages read, if it is not the user's own VOC: the demo's generated one,
    or MS COCO 2014 in the VOC layout (``coco14.prepare``, at ``--coco14_root``). Both run every
    time: the demo's is made again (identical), COCO's finished masks are kept, so after the first
    run it only checks what is there."""
    if args.coco_root is not None:
        Command(coco14_prepare, tuple(flags(coco_root=args.coco_root, out_root=cfg.root,
                                            num_workers=args.num_workers)), "other").run()
    elif cfg.demo:
        from voc12.demo import make_demo_dataset

        make_demo_dataset(cfg.root, num_train=max(16, int(DEMO["num_train"] * args.demo_scale)),
                          num_val=max(8, int(DEMO["num_val"] * args.demo_scale)), image_size=args.demo_image_size,
                          seed=args.seed, num_classes=args.demo_classes)


def real_seg_config(args: argparse.Namespace, seg_options: dict[str, Any]) -> SegConfig:
    """The segmentation stage on real data: DeepLab-v2 from --seg_weights by default."""
    backbone = args.seg_backbone or "resnet101"
    if backbone == "resnet101" and args.seg_weights is None:
        raise InputError("the seg stage trains DeepLab-v2 from --seg_weights (deeplab-pytorch's "
                         "deeplabv1_resnet101-coco.pth, or torchvision's resnet101 with --seg_input imagenet "
                         "--balanced_ce); or pass --seg_backbone resnet38 to start it from --weights")
    return SegConfig(backbone=backbone, weights=args.seg_weights, **seg_options)


def make_config(args: argparse.Namespace) -> Config:
    """The run's configuration, checked; nothing is written yet."""
    out = Path(args.out_dir)
    small_run = {"backbone_width": args.backbone_width, "num_workers": args.num_workers,
                 "batch_size": args.batch_size, "crop_size": args.crop_size,
                 "resize_long": tuple(args.resize_long) if args.resize_long else None}
    epochs = {"round1": args.round1_epoches, "sb": args.sb_epoches, "aff": args.aff_epoches}
    seg_options = {"input": args.seg_input, "balanced_ce": args.balanced_ce, "iters": args.seg_iters}
    if args.coco_root is not None:
        if args.dataset_classes:
            raise InputError("--coco_root brings its own class list; drop --dataset_classes")
        seg = real_seg_config(args, seg_options)  # refused before the long preparation
        root = Path(args.coco14_root or out / "COCO14")
        return Config(out=out, root=root, classes_file=str(root / coco14_prepare.CLASSES_FILE_NAME), demo=False,
                      weights=args.weights, train_list=args.train_list or str(root / "train.txt"),
                      eval_lists={"train": args.eval_train_list or str(root / "train.txt"),
                                  "val": args.val_list or str(root / "val.txt")},
                      device=args.device, seed=args.seed, epochs=epochs, seg=seg, **small_run)
    if args.voc12_root is not None:
        root = Path(args.voc12_root)
        if not root.is_dir():
            raise InputError(f"--voc12_root {root} is not a folder")
        return Config(out=out, root=root, classes_file=args.dataset_classes, demo=False, weights=args.weights,
                      train_list=args.train_list or "voc12/train_aug.txt",
                      eval_lists={"train": args.eval_train_list or "voc12/train.txt",
                                  "val": args.val_list or "voc12/val.txt"},
                      device=args.device, seed=args.seed, epochs=epochs,
                      seg=real_seg_config(args, seg_options), **small_run)
    if args.seg_weights or args.seg_backbone == "resnet101":
        raise InputError("the demo trains DeepLab-v1 on the narrow ResNet-38 from its pretrained backbone; "
                         "--seg_weights and --seg_backbone resnet101 are for real data (--voc12_root)")
    weights = args.weights or str(DEMO_BACKBONE)
    if not args.weights and args.backbone_width not in (None, DEMO["backbone_width"]):
        raise InputError(f"the demo's pretrained backbone has width {DEMO['backbone_width']}; for --backbone_width "
                         f"{args.backbone_width} pretrain one (pretrain_demo.py) and pass it as --weights")
    root = out / "data"
    size = args.demo_image_size
    demo_epochs = {k: max(1, round(DEMO[f"{k}_epoches"] * args.demo_scale)) for k in epochs}
    defaults = {"backbone_width": DEMO["backbone_width"], "num_workers": DEMO["num_workers"],
                "batch_size": DEMO["batch_size"], "crop_size": size, "resize_long": (size * 6 // 7, size * 10 // 7)}
    return Config(
        out=out, root=root, classes_file=str(root / "classes.txt"), demo=True, weights=weights,
        train_list=str(root / "train.txt"), eval_lists={split: str(root / f"{split}.txt") for split in SPLITS},
        device=args.device, seed=args.seed,
        epochs={k: v if v is not None else demo_epochs[k] for k, v in epochs.items()},
        smooth_weight=DEMO["smooth_weight"],
        # AffinityNet gets real momentum: with the released quirk's 5e-4 its loss on same-class pairs
        # stays near chance; and lr 0.05 (bench/DEMO.md).
        aff_momentum=DEMO["aff_momentum"], aff_lr=DEMO["aff_lr"],
        # 20x20 feature maps, not VOC's 56x56 crops: pairs within 3, not 5; the walk takes 2^6 steps.
        aff_radius=DEMO["aff_radius"], rw_alpha=DEMO["rw_alpha"], rw_logt=DEMO["rw_logt"],
        # The demo's CAMs are best cut near 0.2, not VOC's 0.26: la's foreground reaches further.
        crf_alphas=(DEMO["la_alpha"], HA),
        seg=SegConfig(backbone="resnet38", **{**seg_options, "iters": args.seg_iters or max(
                          1, round(DEMO["seg_iters"] * args.demo_scale))},
                      lr=DEMO["seg_lr"], batch_size=DEMO["seg_batch_size"], iter_size=DEMO["seg_iter_size"],
                      crop_size=size, head_bn_momentum=DEMO["seg_head_bn_momentum"]),
        **{k: v if v is not None else defaults[k] for k, v in small_run.items()})


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--voc12_root", default=None, help="real VOC2012 (default: the generated demo)")
    source.add_argument("--coco_root", default=None,
                        help="MS COCO 2014 in its official layout (train2014/, val2014/, annotations/)")
    parser.add_argument("--coco14_root", default=None,
                        help="where --coco_root is prepared in the VOC layout (default: OUT_DIR/COCO14)")
    parser.add_argument("--weights", default=None,
                        help="ImageNet weights (the demo's default: its pretrained voc12/demo_backbone.pth)")
    parser.add_argument("--out_dir", default="demo_out")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dataset_classes", default=None, help="class list of a custom dataset")
    parser.add_argument("--seed", default=0, type=int)
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--from", dest="from_stage", choices=STAGES, default=None,
                      help="redo this stage and all after it; keep the ones before as they are")
    runs.add_argument("--only", choices=STAGES, default=None, help="redo this stage alone")
    small = parser.add_argument_group("size of the run (default: the demo's values, or the scripts' defaults "
                                      "on real data)")
    small.add_argument("--backbone_width", default=None, type=float, help="channel multiplier of ResNet-38")
    small.add_argument("--batch_size", default=None, type=int)
    small.add_argument("--crop_size", default=None, type=int)
    small.add_argument("--resize_long", default=None, type=int, nargs=2, metavar=("MIN", "MAX"),
                       help="random long-side resize of the SB step's training images")
    small.add_argument("--round1_epoches", default=None, type=int)
    small.add_argument("--sb_epoches", default=None, type=int)
    small.add_argument("--aff_epoches", default=None, type=int)
    small.add_argument("--num_workers", default=None, type=int)
    seg = parser.add_argument_group("the segmentation stage (DeepLab on the random-walk labels)")
    seg.add_argument("--seg_weights", default=None,
                     help="DeepLab-v2's start on real data: deeplabv1_resnet101-coco.pth or torchvision's resnet101")
    seg.add_argument("--seg_backbone", default=None, choices=("resnet101", "resnet38"),
                     help="resnet101 (DeepLab-v2, the default on real data) or resnet38 (DeepLab-v1, the demo's; "
                          "from --seg_weights or --weights)")
    seg.add_argument("--seg_input", default=None, choices=("caffe", "imagenet"),
                     help="input normalisation (default: the backbone's; imagenet for torchvision's weights)")
    seg.add_argument("--balanced_ce", action="store_true",
                     help="background/foreground balanced loss (ImageNet-initialised DeepLab-v2 needs it)")
    seg.add_argument("--seg_iters", default=None, type=int, help="training iterations (default: the recipe's 20000)")
    real = parser.add_argument_group("lists on real data")
    real.add_argument("--train_list", default=None, help="trained on and inferred (default: voc12/train_aug.txt)")
    real.add_argument("--eval_train_list", default=None, help="train split evaluated (default: voc12/train.txt)")
    real.add_argument("--val_list", default=None, help="val split inferred and evaluated (default: voc12/val.txt)")
    demo = parser.add_argument_group("the generated demo")
    demo.add_argument("--demo_classes", default=DEMO["num_classes"], type=int,
                      help="object classes of the generated dataset")
    demo.add_argument("--demo_image_size", default=DEMO["image_size"], type=int,
                      help="long side of the generated images (also the training crop)")
    demo.add_argument("--demo_scale", default=1.0, type=float,
                      help="multiplies the demo's image counts and epochs (tests use less)")
    return parser


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
