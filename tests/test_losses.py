"""tool/losses.py against float64 numpy/scipy re-computations and the released train_SB.py."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from network.resnet38_sb import SBOutput
from tool import losses
from voc12.classes import VOC

DATA = Path(__file__).parent / "data"
SHAPES = [(2, VOC.num_classes, 9, 11), (3, 6, 8, 8)]  # (N, K, H, W)
SCALE = 0.3

# name, seed, N, K, H, W; the expected values come from the released code (see the json's "source").
SB_CASES = [
    ("voc_square", 0, 2, VOC.num_classes, 32, 32),
    ("voc_wide", 1, 3, VOC.num_classes, 24, 40),
    ("six_classes", 2, 2, 6, 30, 30),
]
OUTPUT_NAMES = ("cam1", "cam_rv1", "edge1", "cam2", "cam_rv2", "edge2")


def random_label(rs: np.random.RandomState, n: int, k: int) -> np.ndarray:
    """(N, K) with-background labels: background 1, each class present with probability 0.3, >= 1 class."""
    fg = (rs.rand(n, k - 1) < 0.3).astype(np.float64)
    fg[np.arange(n), rs.randint(k - 1, size=n)] = 1
    return np.concatenate([np.ones((n, 1)), fg], axis=1)


def make_sb_inputs(seed: int, n: int, k: int, h: int, w: int) -> dict[str, np.ndarray]:
    """Network outputs of both views, foreground labels and a sparse boundary map (float32)."""
    rs = np.random.RandomState(seed)
    h2, w2 = int(np.floor(h * SCALE)), int(np.floor(w * SCALE))
    arrays = {}
    for view, (hh, ww) in (("1", (h, w)), ("2", (h2, w2))):
        arrays["cam" + view] = 2 * rs.standard_normal((n, k, hh, ww))
        arrays["cam_rv" + view] = rs.standard_normal((n, k, hh, ww)) + 0.5
        arrays["edge" + view] = 2 * rs.standard_normal((n, k, hh, ww))
    arrays["label"] = random_label(rs, n, k)[:, 1:]
    arrays["sb_map"] = rs.rand(n, k, h, w) ** 3
    return {name: a.astype(np.float32) for name, a in arrays.items()}


def projections(seed: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fixed random directions onto which the gradients of the outputs are projected."""
    rs = np.random.RandomState(seed + 1000)
    return {name: rs.standard_normal(inputs[name].shape) for name in OUTPUT_NAMES}


# ----------------------------------------------------------------------------- numpy references

def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_max_norm(p, eps=1e-5):
    out = np.empty_like(p)
    for i in range(p.shape[0]):
        for c in range(p.shape[1]):
            q = np.maximum(p[i, c], 0)
            out[i, c] = np.maximum(q - q.min() - eps, 0) / (q.max() - q.min() + eps)
    return out


def np_classification(cam, label):
    s = cam[:, 1:].mean(axis=(2, 3))
    y = label[:, 1:]
    return -np.mean(y * np.log(sigmoid(s)) + (1 - y) * np.log(sigmoid(-s)))


def np_rv_min(cam_rv, label):
    n, _, h, w = cam_rv.shape
    k = h * w // 4
    total = 0.0
    for i in range(n):
        m = (cam_rv[i, 1:] * label[i, 1:, None, None]).max(axis=0).ravel()
        total += np.maximum(np.sort(m)[:k], 0).sum()
    return total / (k * n)


def np_er(a, b):
    return np.abs(a[:, 1:] - b[:, 1:]).mean()


def np_ecr_target(cam):
    target = np.zeros_like(cam)
    for i in range(cam.shape[0]):
        for y in range(cam.shape[2]):
            for x in range(cam.shape[3]):
                scores = cam[i, 1:, y, x]
                best = scores.max()
                target[i, 0, y, x] = 1 - best
                target[i, 1:, y, x] = np.where(scores == best, scores, 0)
    return target


def np_top_fraction_mean(d, fraction=0.2):
    n, c, h, w = d.shape
    k = int(c * h * w * fraction)
    return np.mean([np.sort(d[i].ravel())[::-1][:k] for i in range(n)])


def np_ecr(cam1, rv1, cam2, rv2):
    return (np_top_fraction_mean(np.abs(np_ecr_target(cam2) - rv1))
            + np_top_fraction_mean(np.abs(np_ecr_target(cam1) - rv2)))


def np_boundary(edge, sb_map, label):
    p = sigmoid(edge)
    t = np.clip(sb_map, 0, 1) * label[:, :, None, None]
    return -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))


SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
LAPLACIAN = np.array([[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]], dtype=np.float64)


def np_smoothness(prob, sb_map, label):
    first = np.zeros_like(prob)
    second = np.zeros_like(prob)
    charbonnier = lambda s: np.sqrt(s ** 2 + 1e-6)  # noqa: E731
    for i in range(prob.shape[0]):
        for c in range(prob.shape[1]):
            w = np.exp(-10 * sb_map[i, c]) * label[i, c]
            gx = ndimage.correlate(prob[i, c], SOBEL_X, mode="constant", cval=0)
            gy = ndimage.correlate(prob[i, c], SOBEL_X.T, mode="constant", cval=0)
            lap = ndimage.correlate(prob[i, c], LAPLACIAN, mode="constant", cval=0)
            first[i, c] = (charbonnier(np.abs(gx) * w) + charbonnier(np.abs(gy) * w)) * label[i, c]
            second[i, c] = charbonnier(np.abs(lap) * w) * label[i, c]
    return 10 * first.mean() + second.mean()


def np_affinity(aff, bg, fg, neg):
    bg_loss = -(bg * np.log(aff + 1e-5)).sum() / (bg.sum() + 1e-5)
    fg_loss = -(fg * np.log(aff + 1e-5)).sum() / (fg.sum() + 1e-5)
    neg_loss = -(neg * np.log(1 + 1e-5 - aff)).sum() / (neg.sum() + 1e-5)
    return bg_loss / 4 + fg_loss / 4 + neg_loss / 2, bg_loss, fg_loss, neg_loss


def t64(a):
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def label4d(label):
    return t64(label)[..., None, None]


# ----------------------------------------------------------------------------- each loss

@pytest.mark.parametrize("shape", SHAPES)
def test_max_norm_matches_numpy(shape):
    p = np.random.RandomState(3).standard_normal(shape)
    got = losses.max_norm(t64(p)).numpy()
    np.testing.assert_allclose(got, np_max_norm(p), rtol=1e-12, atol=1e-12)
    assert got.min() == 0 and np.all(got.max(axis=(2, 3)) < 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_classification_loss_matches_numpy(shape):
    rs = np.random.RandomState(4)
    cam, label = rs.standard_normal(shape), random_label(rs, shape[0], shape[1])
    got = losses.classification_loss(t64(cam), label4d(label)).item()
    np.testing.assert_allclose(got, np_classification(cam, label), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_rv_min_loss_matches_sorted_numpy(shape):
    rs = np.random.RandomState(5)
    cam_rv, label = rs.standard_normal(shape), random_label(rs, shape[0], shape[1])
    label[:, 1:] = 1  # all classes present: negative minima, so the ReLU cuts some of the k values
    got = losses.rv_min_loss(t64(cam_rv), label4d(label)).item()
    expected = np_rv_min(cam_rv, label)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert expected > 0


@pytest.mark.parametrize("shape", SHAPES)
def test_er_loss_matches_numpy(shape):
    rs = np.random.RandomState(6)
    a, b = rs.rand(*shape), rs.rand(*shape)
    np.testing.assert_allclose(losses.er_loss(t64(a), t64(b)).item(), np_er(a, b), rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_ecr_loss_matches_loops(shape):
    rs = np.random.RandomState(7)
    label = random_label(rs, shape[0], shape[1])[:, :, None, None]
    cam1, rv1, cam2, rv2 = (rs.rand(*shape) * label for _ in range(4))
    args = [t64(a) for a in (cam1, rv1, cam2, rv2)]
    got = losses.ecr_loss(*args).item()
    np.testing.assert_allclose(got, np_ecr(cam1, rv1, cam2, rv2), rtol=1e-12)
    assert np.all(args[0].numpy() == cam1) and np.all(args[2].numpy() == cam2), "inputs modified in place"


@pytest.mark.parametrize("shape", SHAPES)
def test_boundary_loss_matches_numpy_and_clamps_target(shape):
    rs = np.random.RandomState(8)
    edge, label = rs.standard_normal(shape), random_label(rs, shape[0], shape[1])
    sb_map = rs.rand(*shape) * 1.2 - 0.1  # a bicubic resize overshoots [0, 1]
    got = losses.boundary_loss(t64(edge), t64(sb_map), label4d(label)).item()
    np.testing.assert_allclose(got, np_boundary(edge, sb_map, label), rtol=1e-12)
    clamped = losses.boundary_loss(t64(edge), t64(np.clip(sb_map, 0, 1)), label4d(label)).item()
    assert got == clamped


@pytest.mark.parametrize("shape", SHAPES)
def test_smoothness_loss_matches_scipy_correlate(shape):
    rs = np.random.RandomState(9)
    prob, sb_map = rs.rand(*shape), rs.rand(*shape) ** 3
    label = random_label(rs, shape[0], shape[1])
    got = losses.smoothness_loss(t64(prob), t64(sb_map), label4d(label)).item()
    np.testing.assert_allclose(got, np_smoothness(prob, sb_map, label), rtol=1e-12)


@pytest.mark.parametrize("shape", [(2, 34, 40), (1, 34, 7)])
def test_affinity_loss_matches_numpy(shape):
    rs = np.random.RandomState(10)
    aff = rs.uniform(0.01, 0.99, shape)
    kind = rs.randint(0, 4, shape)  # 0 bg, 1 fg, 2 neg, 3 ignored
    labels = [(kind == i).astype(np.float64) for i in range(3)]
    got = losses.affinity_loss(t64(aff), *(t64(lab) for lab in labels))
    expected = np_affinity(aff, *labels)
    for key, value in zip(("loss", "bg_loss", "fg_loss", "neg_loss"), expected, strict=True):
        np.testing.assert_allclose(got[key].item(), value, rtol=1e-12)


def test_affinity_loss_without_pairs_of_a_kind_is_finite():
    aff = torch.full((1, 34, 5), 0.5)
    zeros = torch.zeros_like(aff)
    got = losses.affinity_loss(aff, zeros, zeros, torch.ones_like(aff))
    assert got["bg_loss"].item() == 0 and got["fg_loss"].item() == 0
    assert got["loss"].item() == pytest.approx(-np.log(0.5 + 1e-5) / 2, rel=1e-5)


def test_affinity_loss_of_half_precision_affinities_is_computed_in_float32():
    aff = torch.tensor([[[1.0, 0.25, 0.999]]], dtype=torch.float16)
    ones = torch.ones_like(aff, dtype=torch.float32)
    got = losses.affinity_loss(aff, ones, ones, ones)
    expected = np_affinity(aff.double().numpy(), *(np.ones(aff.shape),) * 3)
    assert got["loss"].dtype == torch.float32
    np.testing.assert_allclose(got["neg_loss"].item(), expected[3], rtol=1e-4)  # inf in float16


# ----------------------------------------------------------------------------- gradients

def gradcheck_cases():
    rs = np.random.RandomState(11)
    shape = (2, 4, 6, 5)
    label = label4d(random_label(rs, 2, 4))
    full_label = torch.ones(2, 4, 1, 1, dtype=torch.float64)
    cam1, cam2, sb_map = t64(rs.rand(*shape)), t64(rs.rand(*shape)), t64(rs.rand(*shape))
    pair_kind = rs.randint(0, 4, (2, 34, 6))
    affinity_labels = [t64(pair_kind == k) for k in range(3)]

    def leaf(a):
        return t64(a).requires_grad_()

    return {
        "max_norm": (losses.max_norm, (leaf(rs.standard_normal(shape)),)),
        "classification": (lambda c: losses.classification_loss(c, label),
                           (leaf(rs.standard_normal(shape)),)),
        "rv_min": (lambda c: losses.rv_min_loss(c, full_label), (leaf(rs.standard_normal(shape)),)),
        "er": (losses.er_loss, (leaf(rs.rand(*shape)), leaf(rs.rand(*shape)))),
        "ecr": (lambda rv1, rv2: losses.ecr_loss(cam1, rv1, cam2, rv2),
                (leaf(rs.rand(*shape)), leaf(rs.rand(*shape)))),
        "boundary": (lambda e: losses.boundary_loss(e, sb_map, label),
                     (leaf(rs.standard_normal(shape)),)),
        "smoothness": (lambda p, s: losses.smoothness_loss(p, s, label),
                       (leaf(rs.rand(*shape)), leaf(rs.rand(*shape)))),
        "affinity": (lambda a: losses.affinity_loss(a, *affinity_labels)["loss"],
                     (leaf(rs.uniform(0.05, 0.95, (2, 34, 6))),)),
    }


@pytest.mark.parametrize("name", ["max_norm", "classification", "rv_min", "er", "ecr", "boundary",
                                  "smoothness", "affinity"])
def test_gradcheck_float64(name):
    fn, inputs = gradcheck_cases()[name]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- the whole step

@pytest.fixture(scope="module")
def released():
    return json.loads((DATA / "losses_sb_step_reference.json").read_text())


def run_sb_step(inputs, dtype, **kwargs):
    leaves = {name: torch.from_numpy(inputs[name]).to(dtype).requires_grad_() for name in OUTPUT_NAMES}
    out1 = SBOutput(*(leaves[name] for name in OUTPUT_NAMES[:3]))
    out2 = SBOutput(*(leaves[name] for name in OUTPUT_NAMES[3:]))
    sb_map = kwargs.pop("sb_map", torch.from_numpy(inputs["sb_map"]).to(dtype))
    result = losses.sb_step_loss(out1, out2, torch.from_numpy(inputs["label"]), sb_map, scale=SCALE, **kwargs)
    result["loss"].backward()
    return result, {name: leaf.grad for name, leaf in leaves.items()}


def assert_matches_released(result, grads, expected, projection_key, inputs, seed, rtol):
    for key, value in expected["losses"].items():
        np.testing.assert_allclose(result[key].item(), value, rtol=rtol, atol=1e-7, err_msg=key)
    directions = projections(seed, inputs)
    for name in OUTPUT_NAMES:
        grad = grads[name]
        got = 0.0 if grad is None else float((grad.double().numpy() * directions[name]).sum())
        np.testing.assert_allclose(got, expected[projection_key][name], rtol=rtol, atol=1e-10, err_msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", SB_CASES, ids=[c[0] for c in SB_CASES])
def test_sb_step_loss_matches_released_train_sb(case, dtype, released):
    name, seed, *shape = case
    inputs = make_sb_inputs(seed, *shape)
    result, grads = run_sb_step(inputs, dtype)
    expected = released["cases"][name]
    assert result["loss"].dtype == dtype
    assert_matches_released(result, grads, expected, "grad_projections", inputs, seed,
                            rtol=1e-5 if dtype == torch.float32 else 5e-5)
    parts = sum(result[k] for k in ("loss_cls", "loss_er", "loss_ecr", "loss_boundary", "loss_smooth"))
    torch.testing.assert_close(result["loss"], parts)


@pytest.mark.parametrize("case", SB_CASES, ids=[c[0] for c in SB_CASES])
def test_seam_baseline_is_cls_er_ecr(case, released):
    name, seed, *shape = case
    inputs = make_sb_inputs(seed, *shape)
    leaves = {k: torch.from_numpy(inputs[k]).requires_grad_() for k in ("cam1", "cam_rv1", "cam2", "cam_rv2")}
    out1 = SBOutput(leaves["cam1"], leaves["cam_rv1"], None)
    out2 = SBOutput(leaves["cam2"], leaves["cam_rv2"], None)
    result = losses.sb_step_loss(out1, out2, torch.from_numpy(inputs["label"]), None, scale=SCALE,
                                 boundary_weight=0, smooth_weight=0)
    result["loss"].backward()
    expected = released["cases"][name]
    assert result["loss_boundary"].item() == 0 and result["loss_smooth"].item() == 0
    seam = dict(expected["losses"], loss_boundary=0.0, loss_smooth=0.0)
    seam["loss"] = seam["loss_cls"] + seam["loss_er"] + seam["loss_ecr"]
    grads = {k: leaves[k].grad if k in leaves else None for k in OUTPUT_NAMES}
    assert_matches_released(result, grads, {"losses": seam, "seam_projections": expected["seam_projections"]},
                            "seam_projections", inputs, seed, rtol=2e-5)


def test_sb_step_loss_weights_scale_their_terms():
    inputs = make_sb_inputs(3, 1, 5, 16, 16)
    base, _ = run_sb_step(inputs, torch.float64)
    scaled, _ = run_sb_step(inputs, torch.float64, boundary_weight=0.5, smooth_weight=3.0)
    torch.testing.assert_close(scaled["loss_boundary"], base["loss_boundary"] * 50)
    torch.testing.assert_close(scaled["loss_smooth"], base["loss_smooth"] * 3)
    torch.testing.assert_close(scaled["loss_cls"], base["loss_cls"])


@pytest.mark.parametrize("weights", [(0.01, 0.0), (0.0, 1.0)])
def test_sb_step_loss_needs_sb_map_for_positive_weights(weights):
    inputs = make_sb_inputs(4, 1, 5, 16, 16)
    with pytest.raises(ValueError, match="sb_map"):
        run_sb_step(inputs, torch.float32, sb_map=None, boundary_weight=weights[0], smooth_weight=weights[1])


def test_sb_step_loss_under_autocast_computes_in_float32():
    inputs = make_sb_inputs(5, 1, 5, 16, 16)
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in inputs.items()}
    outs = [SBOutput(*(rounded[k] for k in OUTPUT_NAMES[:3])), SBOutput(*(rounded[k] for k in OUTPUT_NAMES[3:]))]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = losses.sb_step_loss(*outs, rounded["label"], rounded["sb_map"], scale=SCALE)
    full = losses.sb_step_loss(*[SBOutput(*(t.float() for t in out)) for out in outs], rounded["label"].float(),
                               rounded["sb_map"].float(), scale=SCALE)
    for key, value in full.items():
        assert low[key].dtype == torch.float32
        torch.testing.assert_close(low[key], value, rtol=1e-6, atol=1e-7)
