"""Random walk: tool.randomwalk.propagate against the released dense transition matrix.

    .venv/bin/python bench/bench_randomwalk.py            # VOC size, then memory growth
    .venv/bin/python bench/bench_randomwalk.py --skip_memory

The released approach (infer_aff.py + resnet38_aff.Net.forward(to_dense=True)), re-implemented
here: the sparse pair list made dense, raised to beta, columns normalised, squared logt times,
``cam_vec @ T``. Inputs are synthetic but structured like real ones: affinities from features of
a few regions, CAMs that roughly know the regions.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import benchutil
import numpy as np
import torch

from tool.affinity import effective_radius, get_indices_of_pairs, search_offsets, source_window
from tool.randomwalk import propagate
from voc12.classes import VOC

STRIDE = 8
VOC_IMAGE = (375, 500)  # height, width of a typical VOC image


def feature_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """The 1/8 map of an image padded to a multiple of 8, as infer_aff.py pads it."""
    return -(-image_size[0] // STRIDE), -(-image_size[1] // STRIDE)


def released_walk(cam: torch.Tensor, aff: torch.Tensor, beta: float, logt: int,
                  radius: int = 5) -> torch.Tensor:
    """The released random walk with its dense ``(hw, hw)`` transition matrix."""
    num_channels, h, w = cam.shape
    area = h * w
    ind_from, ind_to = get_indices_of_pairs(effective_radius(radius, (h, w)), (h, w))
    ind_from = torch.from_numpy(ind_from).repeat(aff.shape[0])
    ind_to = torch.from_numpy(ind_to)
    diagonal = torch.arange(area)
    indices = torch.cat([torch.stack([ind_from, ind_to]), torch.stack([diagonal, diagonal]),
                         torch.stack([ind_to, ind_from])], dim=1)
    values = torch.cat([aff.reshape(-1), torch.ones(area, dtype=aff.dtype), aff.reshape(-1)])
    aff_mat = torch.sparse_coo_tensor(indices, values, (area, area), check_invariants=False)
    aff_mat = aff_mat.to_dense().pow(beta)
    trans_mat = aff_mat / aff_mat.sum(dim=0, keepdim=True)
    for _ in range(logt):
        trans_mat = trans_mat @ trans_mat
    return (cam.reshape(num_channels, -1) @ trans_mat).reshape(num_channels, h, w)


def synthetic_inputs(size: tuple[int, int], num_classes: int = VOC.num_classes, seed: int = 0,
                     radius: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cam (C, h, w), aff (num_offsets, num_sources))``: three elliptic objects on background,
    AffinityNet-style affinities exp(-mean |f_i - f_j|) of noisy region features, and CAMs that
    overlap their objects only roughly (background (1 - max)^6 as infer_aff.py)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w] / np.array([h, w]).reshape(2, 1, 1)
    regions = np.zeros((h, w), np.int64)
    classes = rng.choice(np.arange(1, num_classes), size=3, replace=False)
    for cls in classes:
        (cy, cx), (ry, rx) = rng.uniform(0.25, 0.75, size=2), rng.uniform(0.1, 0.3, size=2)
        regions[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = cls
    embedding = rng.normal(0, 1, (num_classes, 16))
    features = embedding[regions] + rng.normal(0, 0.3, (h, w, 16))
    radius = effective_radius(radius, size)
    ind_from, ind_to = get_indices_of_pairs(radius, size)
    flat = features.reshape(h * w, -1)
    diff = np.abs(flat[ind_to].reshape(len(search_offsets(radius)), -1, 16) - flat[ind_from][None])
    aff = np.exp(-diff.mean(axis=-1))

    cam = np.zeros((num_classes, h, w))
    for cls in classes:
        shifted = np.roll(regions == cls, rng.integers(-3, 4, size=2), axis=(0, 1))
        cam[cls] = np.clip(0.7 * shifted + rng.normal(0, 0.25, (h, w)), 0, 1)
    cam[0] = (1 - cam[1:].max(axis=0)) ** 6
    return torch.from_numpy(cam).float(), torch.from_numpy(aff).float()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the largest magnitude of ``b``."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def speed(beta: float, logt: int) -> dict:
    size = feature_size(VOC_IMAGE)
    cam, aff = synthetic_inputs(size)
    ours_s, ours = benchutil.best_time(lambda: propagate(cam, aff, beta, logt), repeat=5)
    dense_s, dense = benchutil.best_time(lambda: released_walk(cam, aff, beta, logt), repeat=2)
    exact = released_walk(cam.double(), aff.double(), beta, logt)
    return {
        "image": VOC_IMAGE, "positions": size, "beta": beta, "logt": logt, "channels": cam.shape[0],
        "ours_s": ours_s, "dense_s": dense_s, "speedup": dense_s / ours_s,
        "same_argmax": float((ours.argmax(0) == dense.argmax(0)).double().mean()),
        "max_rel_diff": relative_difference(ours, dense),
        "ours_vs_float64": relative_difference(ours, exact),
        "dense_vs_float64": relative_difference(dense, exact),
    }


def memory_probe(method: str, image_side: int, beta: float, logt: int) -> dict:
    """Peak RSS growth of one walk on a square image (run in a fresh process, Linux). Memory does
    not depend on the values, so the inputs are uniform noise made without temporaries."""
    size = feature_size((image_side, image_side))
    radius = effective_radius(5, size)
    rows, cols = source_window(radius, size)
    num_sources = (rows.stop - rows.start) * (cols.stop - cols.start)
    cam = torch.rand(VOC.num_classes, *size)
    aff = torch.rand(len(search_offsets(radius)), num_sources)
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    before = benchutil.rss_kib("VmRSS")
    if method == "ours":
        propagate(cam, aff, beta, logt)
    else:
        released_walk(cam, aff, beta, logt)
    growth_kib = benchutil.rss_kib("VmHWM") - before
    area = size[0] * size[1]
    mib = 2 ** 20
    return {"method": method, "image": image_side, "positions": area,
            "peak_rss_growth_mib": growth_kib / 1024, "input_mib": (cam.numel() + aff.numel()) * 4 / mib,
            "dense_matrix_mib": area * area * 4 / mib}


def run_probe(method: str, image_side: int, beta: float, logt: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--probe", method, str(image_side), "--beta", str(beta),
                          "--logt", str(logt)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beta", default=8.0, type=float)
    parser.add_argument("--logt", default=6, type=int)
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--ours_sides", default=[250, 500, 1000, 2000], type=int, nargs="+")
    parser.add_argument("--dense_sides", default=[250, 500, 1000], type=int, nargs="+",
                        help="image sides for the dense memory probe (its matrix grows as side^4)")
    parser.add_argument("--probe", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(memory_probe(args.probe[0], int(args.probe[1]), args.beta, args.logt)))
        return

    print(f"machine: {benchutil.machine()}, torch {torch.__version__}")
    default_threads = torch.get_num_threads()
    for threads in sorted({default_threads, 1}, reverse=True):
        torch.set_num_threads(threads)
        r = speed(args.beta, args.logt)
        (img_h, img_w), (pos_h, pos_w) = r["image"], r["positions"]
        print(f"\nrandom walk at VOC size, {threads} torch thread(s): image {img_w}x{img_h}, {pos_w}x{pos_h} "
              f"positions, {r['channels']} channels, beta {r['beta']:g}, logt {r['logt']}")
        print(f"  ours (sparse CSR, 2^logt products): {r['ours_s'] * 1000:8.1f} ms")
        print(f"  released (dense matrix squared):    {r['dense_s'] * 1000:8.1f} ms")
        print(f"  speed-up: {r['speedup']:.1f}x")
        print(f"  same argmax: {r['same_argmax'] * 100:.3f}% of positions; "
              f"max relative difference {r['max_rel_diff']:.2e}")
        print(f"  against a float64 dense walk: ours {r['ours_vs_float64']:.2e}, "
              f"released {r['dense_vs_float64']:.2e}")
    torch.set_num_threads(default_threads)
    if args.skip_memory:
        return
    print("\npeak RSS growth of one walk, a fresh process each (the released probe squares once: its memory"
          " does not depend on logt)")
    print(f"  {'method':<9}{'image':>7}{'positions':>11}{'inputs MiB':>12}{'growth MiB':>12}"
          f"{'dense N^2 MiB':>15}")
    probes = [("ours", side, args.logt) for side in args.ours_sides]
    probes += [("released", side, 1) for side in args.dense_sides]
    for method, side, logt in probes:
        p = run_probe(method, side, args.beta, logt)
        print(f"  {p['method']:<9}{p['image']:>7}{p['positions']:>11}{p['input_mib']:>12.1f}"
              f"{p['peak_rss_growth_mib']:>12.1f}{p['dense_matrix_mib']:>15.1f}")


if __name__ == "__main__":
    main()
