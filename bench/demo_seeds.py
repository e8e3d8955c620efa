"""The demo over several seeds: every row's mean and spread, and each stage's gain paired by seed.

    .venv/bin/python bench/demo_seeds.py                                # seeds 0..4 in demo_seeds/
    .venv/bin/python bench/demo_seeds.py --seeds 0 --threads 1 --out_dir demo_seeds_1thread
    .venv/bin/python bench/demo_seeds.py --seeds 0 1 -- --demo_scale 0.1   # flags after -- go to run_pipeline

Each seed is ``run_pipeline.py --seed N --out_dir OUT_DIR/seedN`` in a process of its own: the
seed draws the data, the heads' initialisation and the sampling. A finished seed is not redone
(every stage is up to date: the pipeline only prints its table again) and a killed one resumes.
Then, from each seed's ``results.json``: each row's mean and standard deviation over the seeds
(mIoU on train and val, mean Boundary IoU on val), each stage's gain over the one
it builds on as the mean and standard deviation of the per-seed differences with a 95%
confidence interval (Student's t), said to be within noise when that interval holds 0, and the
lowest class IoU of any row of any seed (0.0 would be a collapsed class). ``OUT_DIR/summary.json``
keeps it all, ``OUT_DIR/summary.md`` the tables in Markdown.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import benchutil
import numpy as np
from scipy import stats

from voc12.classes import load_classes

# (stage, the stage it builds on): the gains the paper's table shows.
GAINS = (("cam", "round1_cam"), ("crf_la", "cam"), ("rw", "cam"), ("seg", "rw"), ("seg_crf", "rw"))


def run_seed(seed: int, out: Path, threads: int | None, extra: list[str]) -> dict:
    """One seed's pipeline (resumed or skipped when done); its results.json."""
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, str(benchutil.REPO_ROOT / "run_pipeline.py"), "--seed", str(seed), "--out_dir", str(out),
           *extra]
    print(f"\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=benchutil.REPO_ROOT, env=env, check=True)
    return json.loads((out / "results.json").read_text())


def mean_std(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else None, "values": a.tolist()}


def spread(cell: dict, sign: str = "") -> str:
    """``mean ± std``; the mean alone for one seed, which has no spread."""
    text = f"{cell['mean']:{sign}.1f}"
    return text if cell["std"] is None else f"{text} ± {cell['std']:.1f}"


def paired_gain(after: list[float], before: list[float]) -> dict:
    """Mean and std of the per-seed differences, their 95% confidence interval and whether it holds 0."""
    diff = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    gain = mean_std(diff.tolist())
    if diff.size > 1:
        half = stats.t.ppf(0.975, diff.size - 1) * gain["std"] / np.sqrt(diff.size)
        gain["ci95"] = [gain["mean"] - half, gain["mean"] + half]
        gain["within_noise"] = bool(gain["ci95"][0] <= 0 <= gain["ci95"][1])
    return gain


# The columns: (title, metric, split); the metric is a row's mIoU or the mean of one of evaluation's metrics.
COLUMNS = (("mIoU train", "mIoU", "train"), ("mIoU val", "mIoU", "val"), ("bIoU val", "biou", "val"))


def row_metric(results: dict, key: str, metric: str, split: str) -> float:
    """One number of a seed's results.json."""
    return results[key][split] if metric == "mIoU" else results["metrics"][key][split][metric]["mean"]


def summarise(per_seed: dict[int, dict], class_names: tuple[str, ...]) -> dict:
    titles = next(iter(per_seed.values()))["titles"]
    rows = {key: {title: mean_std([row_metric(r, key, metric, split) for r in per_seed.values()])
                  for title, metric, split in COLUMNS} for key in titles}
    gains = {f"{after} - {before}": {split: paired_gain([r[after][split] for r in per_seed.values()],
                                                        [r[before][split] for r in per_seed.values()])
                                     for split in ("train", "val")} for after, before in GAINS}
    lowest = min(({"iou": r["metrics"][key][split][name], "seed": seed, "row": key, "split": split, "class": name}
                  for seed, r in per_seed.items() for key in titles
                  for split in ("train", "val") for name in class_names), key=lambda item: item["iou"])
    seconds = {seed: r["seconds"] for seed, r in per_seed.items()}
    return {"seeds": sorted(per_seed), "titles": titles, "rows": rows, "gains": gains, "lowest_class_iou": lowest,
            "seconds": seconds}


def markdown(summary: dict) -> str:
    titles = summary["titles"]
    columns = list(next(iter(summary["rows"].values())))
    lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, cells in summary["rows"].items():
        lines.append(f"| {titles[key]} | "
                     + " | ".join(spread(c) for c in cells.values()) + " |")
    lines += ["", "| gain (paired by seed) | train | val |", "|---|---|---|"]
    for name, by_split in summary["gains"].items():
        after, before = name.split(" - ")
        cells = []
        for g in by_split.values():
            noise = " (within noise)" if g.get("within_noise") else ""
            cells.append(spread(g, "+") + noise)
        lines.append(f"| {titles[after]} over {titles[before]} | " + " | ".join(cells) + " |")
    lowest = summary["lowest_class_iou"]
    lines += ["", f"Lowest class IoU of any row of any seed: {lowest['iou']:.1f} ({lowest['class']}, "
                  f"{titles[lowest['row']]}, {lowest['split']}, seed {lowest['seed']}).",
              "", "Seconds of the run that computed each seed's numbers: "
              + ", ".join(f"seed {seed} {s:.0f}" for seed, s in summary["seconds"].items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default=list(range(5)), type=int, nargs="+")
    parser.add_argument("--out_dir", default="demo_seeds")
    parser.add_argument("--threads", default=None, type=int, help="OMP_NUM_THREADS of each run (default: as set)")
    parser.add_argument("pipeline_args", nargs="*", help="flags for run_pipeline.py, after --")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    per_seed = {seed: run_seed(seed, out / f"seed{seed}", args.threads, args.pipeline_args) for seed in args.seeds}
    class_names = load_classes(out / f"seed{args.seeds[0]}" / "data" / "classes.txt").all_names
    summary = summarise(per_seed, class_names)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = markdown(summary)
    (out / "summary.md").write_text(text)
    seeds = ", ".join(map(str, args.seeds))
    print(f"\n{len(per_seed)} seeds ({seeds}), run_pipeline.py {' '.join(args.pipeline_args)}")
    print(text)
    return summary


if __name__ == "__main__":
    main()
