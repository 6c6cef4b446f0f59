"""Mask clean-up on constructed masks: k-means to levels, small-object filling, invariants."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dualsynth.postprocess import (
    changed_fraction,
    clean_mask,
    default_min_object_area,
    levels_to_classes,
    nearest_level_classes,
    remove_small_objects,
)


def three_phase_truth():
    """A 32x32 mask: class 0 left, class 1 top right, class 2 bottom right, all large."""
    m = np.zeros((32, 32), dtype=np.uint8)
    m[:16, 16:] = 1
    m[16:, 16:] = 2
    return m


def levels_of(mask, num_classes, noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return mask / (num_classes - 1) + rng.normal(0.0, noise, mask.shape)


def test_default_min_object_area_scales_with_tile_area():
    assert default_min_object_area(256, 256) == 200
    assert default_min_object_area(512, 512) == 800
    assert default_min_object_area(128, 256) == 100
    assert default_min_object_area(64, 64) == 13  # 12.5 rounded up: objects of 12 px or less go
    assert default_min_object_area(4, 4) == 1


def test_small_island_filled_from_surroundings():
    m = three_phase_truth()
    m[4:7, 4:7] = 2  # 9 px island of class 2 inside class 0
    m[20, 20] = 0  # 1 px hole of class 0 inside class 2
    out = remove_small_objects(m, min_object_area=10)
    assert np.array_equal(out, three_phase_truth())


def test_island_on_boundary_takes_majority_of_its_border():
    m = np.zeros((20, 20), dtype=np.uint8)
    m[:, 10:] = 1
    m[8:11, 7:10] = 2  # 3x3 island touching class 1 on one side (3 px), class 0 on three sides (9 px)
    out = remove_small_objects(m, min_object_area=10)
    assert (out[8:11, 7:10] == 0).all()
    assert (out == 2).sum() == 0


def test_large_objects_untouched():
    m = three_phase_truth()
    m[2:12, 2:12] = 1  # 100 px object
    assert np.array_equal(remove_small_objects(m, min_object_area=100), m)
    # one pixel more and it goes
    assert (remove_small_objects(m, min_object_area=101)[2:12, 2:12] == 0).all()


def test_nested_small_objects_absorbed_inside_out():
    m = np.zeros((30, 30), dtype=np.uint8)
    m[10:15, 10:15] = 1  # 25 px (with its hole: 24 px of class 1)
    m[12, 12] = 2  # 1 px inside it
    out = remove_small_objects(m, min_object_area=30)
    assert (out == 0).all()
    # with a threshold between the two sizes only the inner pixel goes, and it joins its ring
    out = remove_small_objects(m, min_object_area=5)
    expected = m.copy()
    expected[12, 12] = 1
    assert np.array_equal(out, expected)


def test_component_touching_nothing_keeps_label():
    m = np.full((5, 5), 3, dtype=np.uint8)
    assert np.array_equal(remove_small_objects(m, min_object_area=100), m)


def test_connectivity_decides_what_an_object_is():
    m = np.zeros((12, 12), dtype=np.uint8)
    for i in range(2, 10):
        m[i, i] = 1  # a diagonal line of 8 px: 8 objects of 1 px with 4-connectivity, one of 8 px with 8
    assert (remove_small_objects(m, 5, connectivity=1) == 0).all()
    assert np.array_equal(remove_small_objects(m, 5, connectivity=2), m)


@pytest.mark.parametrize("order", list(itertools.permutations([0, 1, 2])))
def test_classes_keep_labels_whatever_cluster_order(order):
    """Regions at levels 1.0, 0.0 and 0.5 laid out in every order: each pixel gets the class of its level."""
    truth = np.zeros((24, 24), dtype=np.uint8)
    for k, cls in enumerate(order):
        truth[:, 8 * k : 8 * (k + 1)] = cls
    for seed in range(3):
        decoded = levels_of(truth, 3, noise=0.05, seed=seed)
        assert np.array_equal(clean_mask(decoded, 3, min_object_area=20, seed=seed), truth)


def test_levels_with_four_classes_and_in_between_values():
    truth = three_phase_truth()
    truth[20:28, 2:10] = 3
    decoded = levels_of(truth, 4, noise=0.04)
    # decoders leave in-between values: a 9 px blob at 0.45 (nearest level: class 1) inside class 0,
    # and a 2 px wide seam between classes 1 and 2
    decoded[5:8, 5:8] = 0.45
    decoded[15:17, 16:] = 0.5
    raw = nearest_level_classes(decoded, 4)
    out = clean_mask(decoded, 4, min_object_area=40)
    assert out.dtype == np.uint8
    seam = np.zeros_like(truth, dtype=bool)
    seam[15:17, 16:] = True
    assert np.array_equal(out[~seam], truth[~seam])
    assert set(np.unique(out[seam])) <= {1, 2}
    changed = changed_fraction(decoded, out, num_classes=4)
    assert changed >= 9 / truth.size and changed == pytest.approx(np.mean(raw != out))
    assert changed_fraction(raw, out) == changed


def test_many_distinct_float_values_use_the_histogram_fit():
    from dualsynth.postprocess import KMEANS_MAX_POINTS

    truth = np.zeros((80, 80), dtype=np.uint8)
    truth[:, 20:40], truth[:, 40:60], truth[:, 60:] = 3, 1, 2
    decoded = levels_of(truth, 4, noise=0.03, seed=5)
    assert np.unique(decoded).size > KMEANS_MAX_POINTS
    assert np.array_equal(clean_mask(decoded, 4, min_object_area=50), truth)


def test_fewer_distinct_values_than_classes():
    decoded = np.zeros((10, 10))
    decoded[:, 5:] = 1.0  # only levels 0 and 1 of 4 classes
    out = levels_to_classes(decoded, 4)
    assert set(np.unique(out)) == {0, 3}
    assert (levels_to_classes(np.full((4, 4), 0.34), 4) == 1).all()


def test_onehot_path_uses_argmax_then_removes_small_objects():
    truth = three_phase_truth()
    scores = np.eye(3)[truth].transpose(2, 0, 1) * 0.8 + 0.1
    scores[1, 3, 3] = 5.0  # a one-pixel class-1 blob in class 0
    with_blob = truth.copy()
    with_blob[3, 3] = 1
    assert np.array_equal(clean_mask(scores, 3, encoding="onehot", min_object_area=0), with_blob)
    assert np.array_equal(clean_mask(scores, 3, encoding="onehot", min_object_area=5), truth)
    with pytest.raises(ValueError, match="onehot"):
        clean_mask(scores[:2], 3, encoding="onehot")


def test_default_area_from_tile_size():
    m = np.zeros((64, 64))
    m[10:13, 10:14] = 1.0  # 12 px: below 13, removed at the default for 64x64 tiles
    m[40:44, 40:44] = 1.0  # 16 px: kept
    out = clean_mask(m, 2, min_object_area=None)
    assert out[10:13, 10:14].sum() == 0 and (out[40:44, 40:44] == 1).all()


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="encoding"):
        clean_mask(np.zeros((4, 4)), 2, encoding="rgb")
    with pytest.raises(ValueError, match="nan"):
        clean_mask(np.full((4, 4), np.nan), 2)
    with pytest.raises(ValueError, match="num_classes"):
        changed_fraction(np.zeros((2, 2)), np.zeros((2, 2), np.uint8))


def test_seed_makes_clean_up_deterministic():
    rng = np.random.default_rng(1)
    decoded = rng.random((24, 24))
    first = clean_mask(decoded, 4, seed=3, min_object_area=6)
    assert np.array_equal(first, clean_mask(decoded, 4, seed=3, min_object_area=6))


# --- properties ----------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(1, 12)), elements=st.floats(-0.2, 1.2)),
    st.integers(0, 30),
)
def test_output_labels_in_range(c, decoded, area):
    out = clean_mask(decoded, c, min_object_area=area)
    assert out.shape == decoded.shape
    assert out.min() >= 0 and out.max() < c


@settings(max_examples=40, deadline=None)
@given(
    st.integers(2, 4),
    hnp.arrays(np.uint8, st.tuples(st.integers(1, 14), st.integers(1, 14)), elements=st.integers(0, 3)),
    st.integers(2, 12),
    st.sampled_from([1, 2]),
)
def test_no_small_object_left_and_idempotent(c, mask, area, connectivity):
    from skimage.measure import label

    mask = mask % c
    out = remove_small_objects(mask, area, connectivity=connectivity)
    comp = label(out.astype(np.int64), background=-1, connectivity=connectivity)
    sizes = np.bincount(comp.ravel())[1:]
    # every object left is large, unless it is the only object (nothing to fill it from)
    assert sizes.size == 1 or sizes.min() >= area
    assert np.array_equal(remove_small_objects(out, area, connectivity=connectivity), out)
    # clean masks pass through the whole clean-up unchanged (exact levels give back their classes)
    decoded = out / (c - 1)
    assert np.array_equal(clean_mask(decoded, c, min_object_area=area, connectivity=connectivity), out)
