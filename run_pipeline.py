"""Run every stage of the method, end to end.

With no arguments: the demo. It generates a small dataset in VOC layout, trains a narrow
ResNet-38 from random init on whatever device there is, and reports every stage's mIoU:

    python run_pipeline.py                      # about 12 minutes on 2 CPU cores
    python run_pipeline.py --demo_classes 5     # a custom class list

With real data, the paper's defaults (see README.md for the steps one by one):

    python run_pipeline.py --voc12_root VOC2012 --weights ilsvrc-cls_rna-a1_cls1000_ep-0001.params
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

import evaluation
import infer_aff
import infer_SB
import train_aff
import train_SB
from tool.cli import run_main
from tool.fileio import InputError, load_img_name_list, load_label_png
from tool.visualization import blend, cam_max_score, colorize_label, figure_row, heatmap, stack_rows
from voc12 import sb_map
from voc12.data import read_image

LA, HA = infer_SB.CRF_ALPHAS  # low and high background powers of the CRF outputs

# The demo's scale: sized so that the whole run takes about 12 minutes on 2 CPU cores.
DEMO = {
    "num_train": 240, "num_val": 60, "image_size": 160, "backbone_width": 0.125, "batch_size": 8, "lr": 0.01,
    "momentum": 0.9, "num_classes": 5, "smooth_weight": 0.1, "rw_alpha": 4, "rw_logt": 4,
    "round1_epoches": 30, "sb_epoches": 16, "aff_epoches": 8, "num_workers": 1,
}


def get_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voc12_root", default=None, help="real VOC2012 (default: the generated demo)")
    parser.add_argument("--weights", default=None, help="ImageNet weights for the real pipeline")
    parser.add_argument("--out_dir", default="demo_out")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dataset_classes", default=None, help="class list of a custom dataset")
    parser.add_argument("--demo_classes", default=DEMO["num_classes"], type=int,
                        help="object classes of the generated dataset")
    parser.add_argument("--demo_image_size", default=DEMO["image_size"], type=int,
                        help="long side of the generated images (also the training crop)")
    parser.add_argument("--demo_scale", default=1.0, type=float,
                        help="multiplies the demo's image counts and epochs (tests use less)")
    parser.add_argument("--seed", default=0, type=int)
    return parser


def stage(module, argv: list[str]):
    """Run one stage script in this process, exactly as its command line would."""
    print(f"\n$ python {module.__name__}.py {' '.join(argv)}", flush=True)
    return module.run(module.get_arg_parser().parse_args(argv))


def run(args: argparse.Namespace) -> dict:
    tic = time.time()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    demo = args.voc12_root is None
    if demo:
        from voc12.demo import make_demo_dataset

        n_train = max(16, int(DEMO["num_train"] * args.demo_scale))
        n_val = max(8, int(DEMO["num_val"] * args.demo_scale))
        root = out / "data"
        make_demo_dataset(root, num_train=n_train, num_val=n_val, image_size=args.demo_image_size,
                          seed=args.seed, num_classes=args.demo_classes)
        classes_file = str(root / "classes.txt")
        lists = {"train": str(root / "train.txt"), "val": str(root / "val.txt")}
        train_list = lists["train"]
    else:
        root = Path(args.voc12_root)
        if not root.is_dir():
            raise InputError(f"--voc12_root {root} is not a folder")
        classes_file = args.dataset_classes
        lists = {"train": "voc12/train.txt", "val": "voc12/val.txt"}
        train_list = "voc12/train_aug.txt"

    data = ["--voc12_root", str(root)] + (["--dataset_classes", classes_file] if classes_file else [])
    common = list(data)
    if args.device:
        common += ["--device", args.device]
    train_common = common + ["--tblog_dir", str(out / "tblog"), "--train_list", train_list]
    if demo:
        epochs = {k: ["--max_epoches", str(max(1, round(DEMO[k] * args.demo_scale)))]
                  for k in ("round1_epoches", "sb_epoches", "aff_epoches")}
        common += ["--backbone_width", str(DEMO["backbone_width"]), "--num_workers", str(DEMO["num_workers"])]
        train_common += ["--backbone_width", str(DEMO["backbone_width"]), "--num_workers",
                         str(DEMO["num_workers"]), "--train_bn", "--crop_size", str(args.demo_image_size),
                         "--batch_size",
                         str(DEMO["batch_size"]), "--lr", str(DEMO["lr"]), "--momentum", str(DEMO["momentum"]),
                         "--seed", str(args.seed)]
        # No ImageNet weights in the demo: the first round stands in for pretraining, so the SB
        # step starts from it and AffinityNet from the SB step's backbone.
        weights = []
        # From random init the CAMs are large and the smoothness loss (weight 1 for ImageNet
        # starts) flattens them; a tenth keeps its effect without the collapse.
        sb_only = ["--resize_long", str(args.demo_image_size * 6 // 7), str(args.demo_image_size * 10 // 7)]
        sb_step = ["--smooth_weight", str(DEMO["smooth_weight"])]
        # 20x20 feature maps, not VOC's 63x47: a shorter walk with a larger background share.
        walk = ["--alpha", str(DEMO["rw_alpha"]), "--logt", str(DEMO["rw_logt"])]
    else:
        epochs = {"round1_epoches": [], "sb_epoches": [], "aff_epoches": []}  # the scripts' defaults
        weights = ["--weights", args.weights] if args.weights else []
        sb_only, sb_step, walk = [], [], []

    # Round 1: the SEAM baseline; its CRF outputs give the pseudo-label boundary maps.
    r1 = str(out / "round1")
    stage(train_SB, train_common + weights + sb_only + epochs["round1_epoches"]
          + ["--session_name", r1, "--boundary_weight", "0", "--smooth_weight", "0"])
    stage(infer_SB, common + ["--weights", r1 + ".pth", "--infer_list", train_list,
                              "--out_crf", str(out / "round1_crf")])
    sb_dir = out / "sb_map"
    sb_map.run(sb_map.get_arg_parser().parse_args(
        data + ["--list", train_list, "--crf_dir", str(infer_SB.crf_dir(str(out / "round1_crf"), LA)),
                "--out_dir", str(sb_dir)]))

    # The SB step, its CAMs and CRFs on train and val.
    sb = str(out / "sb")
    sb_init = ["--weights", r1 + ".pth"] if demo else weights
    stage(train_SB, train_common + sb_init + sb_only + sb_step + epochs["sb_epoches"]
          + ["--session_name", sb, "--sb_map_dir", str(sb_dir)])
    # Inference covers the whole training list (train_aug on VOC: AffinityNet trains on its CRFs),
    # so that the train split evaluated below is a subset of it.
    infer_lists = {"train": train_list, "val": lists["val"]}
    for split, lst in infer_lists.items():
        stage(infer_SB, common + ["--weights", sb + ".pth", "--infer_list", lst, "--out_cam",
                                  str(out / f"cam_{split}"), "--out_crf", str(out / f"crf_{split}")])

    # AffinityNet on the train CRFs, then the random walk.
    aff = str(out / "aff")
    aff_init = ["--weights", sb + ".pth"] if demo else weights
    stage(train_aff, train_common + aff_init + epochs["aff_epoches"]
          + ["--session_name", aff, "--la_crf_dir", str(infer_SB.crf_dir(str(out / "crf_train"), LA)),
             "--ha_crf_dir", str(infer_SB.crf_dir(str(out / "crf_train"), HA))])
    for split, lst in infer_lists.items():
        stage(infer_aff, common + walk + ["--weights", aff + ".pth", "--infer_list", lst, "--cam_dir",
                                   str(out / f"cam_{split}"), "--out_rw", str(out / f"rw_{split}")])

    results = evaluate_all(out, root, lists, classes_file)
    results["seconds"] = round(time.time() - tic, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print_table(results)
    write_figure(out, root, lists["val"])
    print(f"\nresults: {out / 'results.json'}  picture: {out / 'demo.png'}  ({results['seconds']:.0f} s)")
    return results


def evaluate_all(out: Path, root: Path, lists: dict[str, str], classes_file: str | None) -> dict:
    results: dict = {"cam": {}, "crf_la": {}, "crf_ha": {}, "rw": {}, "cam_threshold": {}}
    for split, lst in lists.items():
        base = ["--list", lst, "--gt_dir", str(root / "SegmentationClass"), "--logfile",
                str(out / "evallog.txt")]
        if classes_file:
            base += ["--dataset_classes", classes_file]
        cam = stage(evaluation, base + ["--predict_dir", str(out / f"cam_{split}"), "--type", "npz",
                                        "--curve", "True", "--comment", f"cam_{split}"])
        results["cam"][split] = cam["mIoU"]
        results["cam_threshold"][split] = cam.get("threshold")
        for key, alpha in (("crf_la", LA), ("crf_ha", HA)):
            res = stage(evaluation, base + ["--predict_dir", str(infer_SB.crf_dir(str(out / f"crf_{split}"), alpha)),
                                            "--type", "npz",
                                            "--comment", f"{key}_{split}"])
            results[key][split] = res["mIoU"]
        res = stage(evaluation, base + ["--predict_dir", str(out / f"rw_{split}"), "--type", "png",
                                        "--comment", f"rw_{split}"])
        results["rw"][split] = res["mIoU"]
    return results


def print_table(results: dict) -> None:
    print(f"\n{'mIoU (%)':<22} train     val")
    for key, title in (("cam", "CAM (best threshold)"), ("crf_la", "CRF la (alpha 4)"),
                       ("crf_ha", "CRF ha (alpha 24)"), ("rw", "random walk")):
        print(f"{title:<22}{results[key]['train']:>6.1f}  {results[key]['val']:>6.1f}")


def write_figure(out: Path, root: Path, val_list: str, count: int = 4) -> None:
    """Image, ground truth, CAM and random-walk mask of a few val images."""
    rows = []
    for name in load_img_name_list(val_list)[:count]:
        img = read_image(root / "JPEGImages" / f"{name}.jpg")
        gt = colorize_label(load_label_png(root / "SegmentationClass" / f"{name}.png"))
        cam = blend(img, heatmap(cam_max_score(out / "cam_val" / f"{name}.npz", img.shape[:2])))
        rw = colorize_label(load_label_png(out / "rw_val" / f"{name}.png"))
        rows.append(figure_row(img, [gt, cam, rw]))
    Image.fromarray(stack_rows(rows)).save(out / "demo.png")


def main(argv: list[str] | None = None) -> None:
    run_main(run, get_arg_parser(), argv)


if __name__ == "__main__":
    main()
