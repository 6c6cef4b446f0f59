"""Metrics: known answers (paper Fig. 14), a per-pixel loop reference, torchmetrics/MONAI, invariants."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dualsynth.metrics import (
    SegmentationScores,
    confusion_matrix,
    image_miou,
    iou_per_class,
    mean_iou,
    missing_class_iou,
    missing_class_iou_per_class,
    pixel_accuracy,
)

BG, YELLOW, BLUE, GREEN = 0, 1, 2, 3


def figure14():
    """The paper's 6x6 example: truth has background, one yellow and one blue pixel; the prediction gets
    both right, adds a blue pixel and a green pixel (green is absent from the truth) on background."""
    truth = np.zeros((6, 6), dtype=np.uint8)
    truth[0, 5] = YELLOW
    truth[3, 2] = BLUE
    pred = truth.copy()
    pred[3, 3] = BLUE
    pred[5, 0] = GREEN
    return pred, truth


# --- plain per-pixel loop reference -------------------------------------------------------------------


def ref_counts(pred, truth, c):
    tp = fp = fn = 0
    for p, t in zip(np.ravel(pred), np.ravel(truth)):
        tp += p == c and t == c
        fp += p == c and t != c
        fn += p != c and t == c
    return tp, fp, fn


def ref_iou(pred, truth, c):
    tp, fp, fn = ref_counts(pred, truth, c)
    return tp / (tp + fp + fn) if tp + fp + fn else None


def ref_missing_class_iou(pred, truth, num_classes):
    vals = [ref_iou(pred, truth, c) for c in range(num_classes) if np.any(np.asarray(truth) == c)]
    return sum(vals) / len(vals)


def ref_image_miou(pred, truth, num_classes):
    vals = [v for v in (ref_iou(pred, truth, c) for c in range(num_classes)) if v is not None]
    return sum(vals) / len(vals)


@st.composite
def mask_pairs(draw, max_classes=5, max_side=7):
    c = draw(st.integers(1, max_classes))
    shape = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    elems = st.integers(0, c - 1)
    pred = draw(hnp.arrays(np.int64, shape, elements=elems))
    truth = draw(hnp.arrays(np.int64, shape, elements=elems))
    return pred, truth, c


# --- known answers -----------------------------------------------------------------------------------


def test_figure14_missing_class_iou():
    pred, truth = figure14()
    assert missing_class_iou(pred, truth, 4) == pytest.approx((1 + 1 / 2 + 32 / 34) / 3, rel=1e-12)


def test_figure14_per_class_and_counts():
    pred, truth = figure14()
    cm = confusion_matrix(pred, truth, 4)
    assert cm.dtype == np.int64 and cm.shape == (4, 4)
    # rows are truth: background has 34 pixels, 32 kept, 1 taken by blue and 1 by green
    assert cm[BG].tolist() == [32, 0, 1, 1]
    assert cm[:, GREEN].sum() == 1 and cm[GREEN].sum() == 0
    per_class = missing_class_iou_per_class(pred, truth, 4)
    assert per_class[:3] == pytest.approx([32 / 34, 1.0, 0.5])
    assert math.isnan(per_class[GREEN])
    # plain mIoU of the image counts green with IoU 0, hence the paper's complaint about mIoU
    assert iou_per_class(cm) == pytest.approx([32 / 34, 1.0, 0.5, 0.0])
    assert image_miou(pred, truth, 4) == pytest.approx((32 / 34 + 1 + 0.5 + 0) / 4)
    assert pixel_accuracy(cm) == pytest.approx(34 / 36)


def test_iou_nan_for_class_absent_everywhere():
    truth = np.array([[0, 0], [1, 1]])
    iou = iou_per_class(confusion_matrix(truth, truth, 3))
    assert iou[:2].tolist() == [1.0, 1.0] and math.isnan(iou[2])
    assert mean_iou(confusion_matrix(truth, truth, 3)) == 1.0


def test_torch_tensors_accepted():
    torch = pytest.importorskip("torch")
    pred, truth = figure14()
    assert missing_class_iou(torch.from_numpy(pred), torch.from_numpy(truth).long(), 4) == pytest.approx(
        missing_class_iou(pred, truth, 4)
    )


@pytest.mark.parametrize(
    "pred, truth, problem",
    [
        (np.zeros((2, 2)), np.zeros((2, 3)), "shape"),
        (np.full((2, 2), 3), np.zeros((2, 2)), "values"),
        (np.zeros((2, 2)), np.full((2, 2), -1), "values"),
        (np.full((2, 2), 0.5), np.zeros((2, 2)), "non-integer"),
    ],
)
def test_bad_masks_rejected(pred, truth, problem):
    with pytest.raises(ValueError, match=problem):
        confusion_matrix(pred, truth, 3)


# --- property tests against the loop reference -------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(mask_pairs())
def test_confusion_matrix_matches_loop(case):
    pred, truth, c = case
    cm = confusion_matrix(pred, truth, c)
    ref = np.zeros((c, c), dtype=np.int64)
    for p, t in zip(pred.ravel(), truth.ravel()):
        ref[t, p] += 1
    assert np.array_equal(cm, ref)
    assert pixel_accuracy(cm) == pytest.approx(np.mean(pred == truth))


@settings(max_examples=60, deadline=None)
@given(mask_pairs())
def test_scores_match_loop_reference(case):
    pred, truth, c = case
    assert missing_class_iou(pred, truth, c) == pytest.approx(ref_missing_class_iou(pred, truth, c))
    assert image_miou(pred, truth, c) == pytest.approx(ref_image_miou(pred, truth, c))
    per_class = missing_class_iou_per_class(pred, truth, c)
    for k in range(c):
        if np.any(truth == k):
            assert per_class[k] == pytest.approx(ref_iou(pred, truth, k))
        else:
            assert math.isnan(per_class[k])


@settings(max_examples=40, deadline=None)
@given(mask_pairs())
def test_missing_class_iou_at_least_image_miou(case):
    pred, truth, c = case
    mci, miou = missing_class_iou(pred, truth, c), image_miou(pred, truth, c)
    assert mci >= miou - 1e-12
    # the two agree exactly when the prediction adds no class absent from the truth
    if set(np.unique(pred)) <= set(np.unique(truth)):
        assert mci == pytest.approx(miou)
    else:
        assert mci > miou or mci == 0.0


@settings(max_examples=40, deadline=None)
@given(mask_pairs(), st.randoms(use_true_random=False))
def test_permuting_labels_leaves_scores_unchanged(case, rnd):
    pred, truth, c = case
    perm = np.array(rnd.sample(range(c), c))
    a = SegmentationScores(c)
    a.update(pred, truth)
    b = SegmentationScores(c)
    b.update(perm[pred], perm[truth])
    sa, sb = a.summary(), b.summary()
    for key in ("pixel_accuracy", "miou", "mean_image_miou", "missing_class_iou"):
        assert sa[key] == pytest.approx(sb[key])
    # per-class values move with their class
    for k in range(c):
        x, y = sa["iou_per_class"][str(k)], sb["iou_per_class"][str(perm[k])]
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)


@settings(max_examples=30, deadline=None)
@given(mask_pairs())
def test_perfect_prediction_scores_one(case):
    _, truth, c = case
    s = SegmentationScores(c)
    s.update(truth, truth)
    summary = s.summary()
    for key in ("pixel_accuracy", "miou", "mean_image_miou", "missing_class_iou"):
        assert summary[key] == 1.0


# --- the accumulator ---------------------------------------------------------------------------------


def test_accumulator_reductions_by_hand():
    rng = np.random.default_rng(0)
    c = 4
    pairs = [(rng.integers(0, c, (5, 6)), rng.integers(0, c - 1, (5, 6))) for _ in range(6)]
    pairs.append(figure14())
    s = SegmentationScores(c, class_names=["bg", "yellow", "blue", "green"])
    rows = [s.update(p, t, name=f"im{i}") for i, (p, t) in enumerate(pairs)]
    summary = s.summary()
    pooled = sum(confusion_matrix(p, t, c) for p, t in pairs)
    assert summary["num_images"] == 7 and summary["pixels"] == 6 * 30 + 36
    assert summary["pixel_accuracy"] == pytest.approx(pixel_accuracy(pooled))
    assert summary["miou"] == pytest.approx(mean_iou(pooled))
    assert summary["mean_image_miou"] == pytest.approx(np.mean([image_miou(p, t, c) for p, t in pairs]))
    assert summary["missing_class_iou"] == pytest.approx(
        np.mean([missing_class_iou(p, t, c) for p, t in pairs])
    )
    # green is in the truth of no image: no per-class Missing Class IoU, yet a (zero) pooled IoU
    assert math.isnan(summary["missing_class_iou_per_class"]["green"])
    assert summary["images_with_class"]["green"] == 0
    assert summary["iou_per_class"]["green"] == 0.0
    # yellow: mean over images whose truth has yellow of that image's IoU of yellow
    with_yellow = [ref_iou(p, t, 1) for p, t in pairs if np.any(t == 1)]
    assert summary["missing_class_iou_per_class"]["yellow"] == pytest.approx(np.mean(with_yellow))
    assert summary["images_with_class"]["yellow"] == len(with_yellow)
    assert repr(rows) == repr(s.rows())  # nan != nan, so compare the printed rows
    last = rows[-1]
    assert last["name"] == "im6" and last["pixels"] == 36
    assert last["missing_class_iou"] == pytest.approx((1 + 1 / 2 + 32 / 34) / 3)
    assert last["iou_blue"] == 0.5 and math.isnan(last["iou_green"])
    s.reset()
    assert len(s) == 0 and math.isnan(s.summary()["missing_class_iou"])


# --- independent implementations ---------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_against_torchmetrics(c_minus, n, seed):
    torch = pytest.importorskip("torch")
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    c = c_minus + 1
    g = torch.Generator().manual_seed(seed)
    pred = torch.randint(0, c, (n, 5, 4), generator=g)
    truth = torch.randint(0, c, (n, 5, 4), generator=g)
    cm = confusion_matrix(pred, truth, c)
    assert np.array_equal(cm, tmf.multiclass_confusion_matrix(pred, truth, c).numpy())
    # torchmetrics' macro Jaccard leaves out classes absent from truth and prediction, as our mIoU does
    assert mean_iou(cm) == pytest.approx(float(tmf.multiclass_jaccard_index(pred, truth, c, average="macro")))
    assert pixel_accuracy(cm) == pytest.approx(float(tmf.multiclass_accuracy(pred, truth, c, average="micro")))
    for i in range(n):
        assert image_miou(pred[i], truth[i], c) == pytest.approx(
            float(tmf.multiclass_jaccard_index(pred[i], truth[i], c, average="macro"))
        )


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 5), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_against_monai_ignore_empty(c, n, seed):
    """MONAI's IoU with ignore_empty=True drops classes with an empty ground truth: Missing Class IoU."""
    torch = pytest.importorskip("torch")
    monai_metrics = pytest.importorskip("monai.metrics")
    g = torch.Generator().manual_seed(seed)
    # truth draws from fewer classes, so predictions often add absent ones
    pred = torch.randint(0, c, (n, 6, 5), generator=g)
    truth = torch.randint(0, max(1, c - 1), (n, 6, 5), generator=g)
    onehot = lambda m: torch.nn.functional.one_hot(m, c).permute(0, 3, 1, 2).float()  # noqa: E731
    per = monai_metrics.compute_iou(onehot(pred), onehot(truth), include_background=True, ignore_empty=True)
    s = SegmentationScores(c)
    for i in range(n):
        s.update(pred[i], truth[i])
        ours = missing_class_iou_per_class(pred[i], truth[i], c)
        assert np.allclose(ours, per[i].numpy(), equal_nan=True)
    mean_metric = monai_metrics.MeanIoU(include_background=True, reduction="mean", ignore_empty=True)
    mean_metric(onehot(pred), onehot(truth))
    summary = s.summary()
    assert summary["missing_class_iou"] == pytest.approx(float(mean_metric.aggregate()))
    batch_metric = monai_metrics.MeanIoU(include_background=True, reduction="mean_batch", ignore_empty=True)
    batch_metric(onehot(pred), onehot(truth))
    per_class = np.array(list(summary["missing_class_iou_per_class"].values()))
    theirs = batch_metric.aggregate().numpy()
    # MONAI reports 0 for a class no image contains; we report nan (undefined)
    assert np.allclose(np.nan_to_num(per_class, nan=0.0), theirs)


def test_trivial_prediction_names_a_model_that_predicts_one_class():
    from dualsynth.metrics import format_scores, trivial_prediction

    truth = np.zeros((10, 10), int)
    truth[:3] = 1  # 30 % of class "oxide"
    scores = SegmentationScores(2, ["background", "oxide"])
    scores.update(np.zeros_like(truth), truth)  # all background: the trivial solution
    s = scores.summary()
    assert s["predicted_fraction"] == {"background": 1.0, "oxide": 0.0}
    assert s["true_fraction"] == {"background": 0.7, "oxide": pytest.approx(0.3)}
    warning = trivial_prediction(s)
    assert warning.startswith("the model predicts 'background' for 100.0 % of the pixels (truth: 70.0 %)")
    assert "warning: the model predicts 'background'" in format_scores(s, ["background", "oxide"])
    # a model that finds the other class, even badly, is not trivial
    good = SegmentationScores(2, ["background", "oxide"])
    pred = np.zeros_like(truth)
    pred[:1] = 1
    good.update(pred, truth)
    assert trivial_prediction(good.summary()) is None and "warning" not in format_scores(good.summary(), ["background", "oxide"])
    # a truth of one class predicted as that class is right, not trivial; old summaries have no shares
    only = SegmentationScores(2, ["background", "oxide"])
    only.update(np.zeros_like(truth), np.zeros_like(truth))
    assert trivial_prediction(only.summary()) is None
    assert trivial_prediction({"miou": 0.5}) is None
