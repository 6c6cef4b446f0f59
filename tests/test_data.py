"""The data layer: join/split, pairing, colour masks, 16-bit images, tiling, splits, the dataset folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dualsynth.data import (
    ClassInfo,
    DatasetFolder,
    PrepareOptions,
    assign_splits,
    find_pairs,
    join_pair,
    mask_to_index,
    normalise_image,
    prepare,
    read_classes,
    split_joint,
    tile_origins,
)
from dualsynth.errors import InputError


# --- join / split -------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    num_classes=st.integers(2, 9),
    channels=st.sampled_from([1, 3]),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    encoding=st.sampled_from(["levels", "onehot"]),
    seed=st.integers(0, 10_000),
)
def test_join_split_round_trip_is_exact(num_classes, channels, h, w, encoding, seed):
    rng = np.random.default_rng(seed)
    image = torch.from_numpy(rng.random((channels, h, w), dtype=np.float32))
    mask = torch.from_numpy(rng.integers(0, num_classes, (h, w)))
    joint = join_pair(image, mask, num_classes, encoding)
    assert joint.shape == (channels + (1 if encoding == "levels" else num_classes), h, w)
    image2, mask2 = split_joint(joint, num_classes, encoding)
    assert torch.equal(image2, image)
    assert torch.equal(mask2, mask)


def test_levels_are_k_over_c_minus_one_and_split_takes_nearest_level():
    mask = torch.tensor([[0, 1], [2, 3]])
    joint = join_pair(torch.zeros(1, 2, 2), mask, 4)
    assert torch.allclose(joint[1], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    # a decoded mask channel is never exact: values snap to the nearest level
    noisy = joint.clone()
    noisy[1] += torch.tensor([[0.15, -0.16], [0.1, -0.05]])
    assert torch.equal(split_joint(noisy, 4)[1], mask)


def test_join_accepts_numpy_hwc_and_batches():
    image = np.random.default_rng(0).random((5, 6, 3), dtype=np.float32)
    mask = np.zeros((5, 6), dtype=np.int64)
    joint = join_pair(image, mask, 3)
    assert joint.shape == (4, 5, 6)
    assert torch.allclose(joint[:3], torch.from_numpy(image).permute(2, 0, 1))
    batch = join_pair(torch.rand(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), 2, "onehot")
    assert batch.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError):
        join_pair(image, np.full((5, 6), 3), 3)


# --- pairing and masks --------------------------------------------------------------------------------------


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".tif", ".tiff"):
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)
    return path


def test_pairs_in_one_folder_and_in_two_folders(tmp_path):
    grey = np.zeros((8, 8), np.uint8)
    _write(tmp_path / "one" / "a b#1.tif", grey)
    _write(tmp_path / "one" / "a b#1_mask.png", grey)
    pairs = find_pairs(tmp_path / "one")
    assert [(p.image.name, p.mask.name) for p in pairs] == [("a b#1.tif", "a b#1_mask.png")]
    _write(tmp_path / "img" / "x.png", grey)
    _write(tmp_path / "msk" / "x_mask.tif", grey)
    _write(tmp_path / "img" / "y.png", grey)
    _write(tmp_path / "msk" / "y.png", grey)
    assert len(find_pairs(tmp_path / "img", tmp_path / "msk")) == 2


def test_unpaired_files_are_named(tmp_path):
    grey = np.zeros((8, 8), np.uint8)
    _write(tmp_path / "img" / "x.png", grey)
    _write(tmp_path / "img" / "lonely.png", grey)
    _write(tmp_path / "msk" / "x.png", grey)
    with pytest.raises(InputError, match="lonely.png: no mask"):
        find_pairs(tmp_path / "img", tmp_path / "msk")
    _write(tmp_path / "msk" / "lonely.png", grey)
    _write(tmp_path / "msk" / "orphan.png", grey)
    with pytest.raises(InputError, match="orphan.png: mask has no matching image"):
        find_pairs(tmp_path / "img", tmp_path / "msk")
    skipped: list[Path] = []
    assert len(find_pairs(tmp_path / "img", tmp_path / "msk", skip_unpaired=True, skipped=skipped)) == 2
    assert [p.name for p in skipped] == ["orphan.png"]


def test_colour_mask_with_default_class_like_the_nasa_overlays():
    classes = [ClassInfo("matrix", (0, 0, 0), default=True), ClassInfo("blue", (0, 0, 255)), ClassInfo("red", (255, 0, 0))]
    rgba = np.zeros((2, 3, 4), np.uint16)
    rgba[..., 3] = 65535
    rgba[0, 0, :3] = (0, 0, 65535)
    rgba[0, 1, :3] = (65535, 0, 0)
    rgba[1, :, :3] = 31000  # grey micrograph showing through the overlay
    index = mask_to_index(rgba, classes, "m.tif")
    assert index.tolist() == [[1, 2, 0], [0, 0, 0]]


def test_unknown_mask_colour_is_an_error_naming_the_colour():
    classes = [ClassInfo("a", (0, 0, 0)), ClassInfo("b", (255, 255, 255))]
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[1, 1] = (10, 200, 30)
    with pytest.raises(InputError, match=r"m.png: mask colour \(10, 200, 30\) at pixel \(y=1, x=1\)"):
        mask_to_index(rgb, classes, "m.png")


def test_index_mask_values_must_be_below_class_count():
    with pytest.raises(InputError, match="mask value 3 >= number of classes 3"):
        mask_to_index(np.array([[0, 3]], np.uint8), [ClassInfo("a", (0, 0, 0)), ClassInfo("b", (1, 1, 1)), ClassInfo("c", (2, 2, 2))], "m")


def test_grey_value_masks_map_through_values():
    classes = [ClassInfo("m", (0, 0, 0), value=0), ClassInfo("o", (255, 0, 0), value=128), ClassInfo("n", (0, 255, 0), value=255)]
    assert mask_to_index(np.array([[0, 128, 255]], np.uint8), classes, "m").tolist() == [[0, 1, 2]]


def test_16_bit_images_keep_their_range_and_8_bit_are_untouched():
    img16 = np.array([[1000, 2000], [3000, 1500]], np.uint16)
    out = normalise_image(img16, "i.tif")
    assert out.dtype == np.uint16
    assert out.min() == 0 and out.max() == 65535  # stretched from the actual range, not truncated to 8 bits
    assert len(np.unique(out)) == 4
    assert np.array_equal(normalise_image(img16, "i.tif", intensity_range="full"), img16)
    fixed = normalise_image(img16, "i.tif", intensity_range=(1000.0, 5000.0))
    assert fixed[0, 0] == 0 and fixed[1, 0] == round(0.5 * 65535)
    img8 = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(normalise_image(img8, "i.png"), img8)
    rgb_grey = np.repeat(img8[:, :, None], 3, axis=2)
    assert normalise_image(rgb_grey, "i.png").shape == (3, 4)  # R=G=B -> one channel
    rgb = rgb_grey.copy()
    rgb[0, 0, 0] = 200
    assert normalise_image(rgb, "i.png").shape == (3, 4, 3)


def test_tile_origins_cover_the_image():
    assert tile_origins(10, 4, 4) == [0, 4, 6]
    assert tile_origins(8, 4, 4) == [0, 4]
    assert tile_origins(8, 4, 2) == [0, 2, 4]
    with pytest.raises(ValueError):
        tile_origins(3, 4, 4)


def test_splits_are_by_source_and_reproducible():
    sources = [f"s{i}" for i in range(10)]
    a = assign_splits(sources, 0.2, 0.2, seed=1)
    assert a == assign_splits(sources, 0.2, 0.2, seed=1)
    assert sorted(a.values()).count("test") == 2 and sorted(a.values()).count("val") == 2


# --- prepare end to end -------------------------------------------------------------------------------------


def _user_folder(tmp_path: Path, n: int = 4, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "user"
    for i in range(n):
        img = (rng.random((size, size)) * 60000).astype(np.uint16)
        mask = np.zeros((size, size), np.uint8)
        mask[4:12, 12:20] = 1 + (i % 2)  # straddles the two upper 16 px tiles
        _write(folder / f"img {i}.tif", img)
        _write(folder / f"img {i}_mask.png", mask)
    return folder


def test_prepare_tiles_splits_by_source_and_reads_back(tmp_path):
    src = _user_folder(tmp_path, n=5)
    summary = prepare(PrepareOptions(images=src, out=tmp_path / "ds", tile=16, num_classes=3, seed=3), progress=False)
    assert summary["tiles"] == 5 * 4
    ds = DatasetFolder(tmp_path / "ds")
    assert ds.num_classes == 3
    by_source: dict[str, set[str]] = {}
    for rec in ds.records():
        by_source.setdefault(rec.source, set()).add(rec.split)
    assert all(len(s) == 1 for s in by_source.values())  # tiles of one image never land in two splits
    rec = ds.records()[0]
    assert ds.load_image(rec).shape == (16, 16, 1)
    assert Image.open(ds.image_path(rec)).mode.startswith("I;16")  # 16-bit kept
    total = sum(np.bincount(ds.load_mask(r).ravel(), minlength=3) for r in ds.records())
    assert total[1] + total[2] == 5 * 8 * 8


def test_min_classes_drops_single_class_tiles(tmp_path):
    src = _user_folder(tmp_path, n=2)
    summary = prepare(PrepareOptions(images=src, out=tmp_path / "ds", tile=16, min_classes=2, num_classes=3), progress=False)
    assert (summary["tiles"], summary["dropped_tiles"]) == (4, 4)  # the two lower tiles of each image are matrix only


def test_prepare_refuses_to_overwrite_and_leaves_nothing_half_written(tmp_path):
    src = _user_folder(tmp_path, n=2)
    out = tmp_path / "ds"
    prepare(PrepareOptions(images=src, out=out, num_classes=3), progress=False)
    before = sorted(p.name for p in (out / "images").iterdir())
    with pytest.raises(InputError, match="not empty"):
        prepare(PrepareOptions(images=src, out=out, num_classes=3), progress=False)
    # a failing prepare (tile too big) with --overwrite keeps the old folder intact
    with pytest.raises(InputError, match="larger than the image"):
        prepare(PrepareOptions(images=src, out=out, tile=64, num_classes=3, overwrite=True), progress=False)
    assert sorted(p.name for p in (out / "images").iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_split_file_in_nasa_style(tmp_path):
    src = _user_folder(tmp_path, n=3)
    (tmp_path / "splits.json").write_text(
        '{"A": {"train": ["img 0.tif", "img 1.tif"], "train_annot": ["img 0_mask.tif"], "test": ["img 2.tif"]}}'
    )
    prepare(PrepareOptions(images=src, out=tmp_path / "ds", splits=tmp_path / "splits.json", split_set="A", num_classes=3), progress=False)
    ds = DatasetFolder(tmp_path / "ds")
    assert {r.source: r.split for r in ds.records()} == {"img 0.tif": "train", "img 1.tif": "train", "img 2.tif": "test"}
    with pytest.raises(InputError, match="--split-set"):
        prepare(PrepareOptions(images=src, out=tmp_path / "ds2", splits=tmp_path / "splits.json", num_classes=3), progress=False)


# --- grey masks without classes.yaml ------------------------------------------------------------------------


def _grey_masks(tmp_path: Path, *value_sets: tuple[int, ...]) -> Path:
    """One 32x32 image per value set, its mask in vertical bands of those grey values (left to right)."""
    folder = tmp_path / "grey"
    for i, values in enumerate(value_sets):
        mask = np.zeros((32, 32), np.uint8)
        for k, v in enumerate(values):
            mask[:, k * 32 // len(values):] = v
        _write(folder / f"m{i}.png", np.full((32, 32), 90, np.uint8))
        _write(folder / f"m{i}_mask.png", mask)
    return folder


def _masks_by_source(out: Path) -> dict[str, np.ndarray]:
    ds = DatasetFolder(out)
    return {r.source: ds.load_mask(r) for r in ds.records()}


def test_grey_masks_without_classes_map_their_values_to_classes_in_order(tmp_path, capsys):
    src = _grey_masks(tmp_path, (0, 128, 255), (255, 0))
    summary = prepare(PrepareOptions(images=src, out=tmp_path / "ds"), progress=False)
    assert capsys.readouterr().out == ""  # the Python API stays quiet; the CLI prints the summary
    assert summary["grey_values"] == [0, 128, 255] and summary["grey_values_in_classes_yaml"]
    assert [(c.name, c.value) for c in read_classes(tmp_path / "ds" / "classes.yaml")] == [
        ("class0", 0), ("class1", 128), ("class2", 255)]
    masks = _masks_by_source(tmp_path / "ds")
    raw = {n: np.asarray(Image.open(src / n.replace(".png", "_mask.png"))) for n in masks}
    lut = {0: 0, 128: 1, 255: 2}
    for name, mask in masks.items():
        assert mask.tolist() == np.vectorize(lut.get)(raw[name]).tolist()
    assert set(summary["class_fractions"]) == {"class0", "class1", "class2"}


def test_binary_masks_saved_as_0_and_255_give_two_classes(tmp_path):
    summary = prepare(PrepareOptions(images=_grey_masks(tmp_path, (0, 255), (255, 0)), out=tmp_path / "ds"), progress=False)
    assert summary["grey_values"] == [0, 255]
    ds = DatasetFolder(tmp_path / "ds")
    assert ds.num_classes == 2 and [c.value for c in ds.classes] == [0, 255]
    assert sorted(np.unique(np.concatenate([m.ravel() for m in _masks_by_source(tmp_path / "ds").values()]))) == [0, 1]


def test_grey_values_are_collected_over_the_whole_dataset(tmp_path):
    src = _grey_masks(tmp_path, (0, 100), (0, 200))
    summary = prepare(PrepareOptions(images=src, out=tmp_path / "ds"), progress=False)
    assert summary["grey_values"] == [0, 100, 200]
    masks = _masks_by_source(tmp_path / "ds")
    assert np.unique(masks["m0.png"]).tolist() == [0, 1]
    assert np.unique(masks["m1.png"]).tolist() == [0, 2]  # B's 200 is class 2, not class 1
    assert DatasetFolder(tmp_path / "ds").num_classes == 3


def test_masks_holding_class_indices_stay_as_they_are(tmp_path):
    src = _grey_masks(tmp_path, (0, 1), (2, 1, 0))
    summary = prepare(PrepareOptions(images=src, out=tmp_path / "ds"), progress=False)
    assert summary["grey_values"] == [] and not summary["grey_values_in_classes_yaml"]
    ds = DatasetFolder(tmp_path / "ds")
    assert ds.num_classes == 3 and all(c.value is None for c in ds.classes)
    masks = _masks_by_source(tmp_path / "ds")
    assert masks["m1.png"].tolist() == np.asarray(Image.open(src / "m1_mask.png")).tolist()


def test_num_classes_keeps_mask_values_as_class_indices(tmp_path):
    src = _grey_masks(tmp_path, (0, 255))
    with pytest.raises(InputError, match="mask value 255 >= number of classes 3"):
        prepare(PrepareOptions(images=src, out=tmp_path / "ds", num_classes=3), progress=False)
    summary = prepare(PrepareOptions(images=src, out=tmp_path / "ds", num_classes=256), progress=False)
    assert summary["grey_values"] == [] and np.unique(_masks_by_source(tmp_path / "ds")["m0.png"]).tolist() == [0, 255]


def test_more_than_32_grey_values_over_the_dataset_is_not_an_index_mask(tmp_path):
    src = _grey_masks(tmp_path, tuple(range(0, 160, 10)), tuple(range(5, 175, 10)), (0, 255))
    with pytest.raises(InputError, match="more than 32 distinct grey values") as exc:
        prepare(PrepareOptions(images=src, out=tmp_path / "ds"), progress=False)
    assert Path(exc.value.path).name == "m1_mask.png"  # the mask that brings the count past 32
    assert not (tmp_path / "ds").exists()


def test_grey_values_that_are_also_class_indices_are_mapped_but_not_written_as_values(tmp_path):
    src = _grey_masks(tmp_path, (1, 2, 3))  # labels counted from 1: value 2 would be class 1, index 2 class 2
    summary = prepare(PrepareOptions(images=src, out=tmp_path / "ds"), progress=False)
    assert summary["grey_values"] == [1, 2, 3] and not summary["grey_values_in_classes_yaml"]
    ds = DatasetFolder(tmp_path / "ds")
    assert all(c.value is None for c in ds.classes)
    assert np.unique(_masks_by_source(tmp_path / "ds")["m0.png"]).tolist() == [0, 1, 2]


def test_index_masks_read_with_a_classes_yaml_listing_grey_values():
    classes = [ClassInfo("m", (0, 0, 0), value=0), ClassInfo("o", (255, 0, 0), value=128), ClassInfo("n", (0, 255, 0), value=255)]
    # a dataset folder's index masks next to its classes.yaml: all values are class indices, 1 is no listed value
    assert mask_to_index(np.array([[0, 1, 2]], np.uint8), classes, "m").tolist() == [[0, 1, 2]]
    with pytest.raises(InputError, match="is not a 'value' in classes.yaml"):
        mask_to_index(np.array([[0, 1, 7]], np.uint8), classes, "m")
    with_default = [ClassInfo("m", (0, 0, 0), default=True, value=0), *classes[1:]]
    assert mask_to_index(np.array([[0, 1, 2]], np.uint8), with_default, "m").tolist() == [[0, 0, 0]]  # as before
    clash = [ClassInfo("a", (0, 0, 0), value=1), ClassInfo("b", (255, 0, 0), value=2), ClassInfo("c", (0, 255, 0), value=3)]
    with pytest.raises(InputError, match="mask value 0 is not a 'value'"):
        mask_to_index(np.array([[0, 1, 2]], np.uint8), clash, "m")
