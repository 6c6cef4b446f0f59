"""Procedural demo data: Table 2 class fractions, low contrast, LQ label errors, reproducible dataset folders."""

import re
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dualsynth.data import DatasetFolder
from dualsynth.demo_data import (
    CLASS_NAMES,
    TABLE2_FRACTIONS,
    DemoSample,
    generate_microstructure,
    write_demo_dataset,
)
from dualsynth.errors import InputError

MATRIX = 0
N_SAMPLES, SIZE = 20, 128


@pytest.fixture(scope="module")
def samples() -> list[DemoSample]:
    return [generate_microstructure(SIZE, np.random.default_rng(1000 + i), rgb=i % 2 == 1) for i in range(N_SAMPLES)]


def fractions(mask: np.ndarray) -> np.ndarray:
    return np.bincount(mask.ravel(), minlength=len(CLASS_NAMES)) / mask.size


def test_shapes_dtypes_and_ranges(samples):
    for i, s in enumerate(samples):
        assert s.image.dtype == np.float32
        assert s.image.shape == ((SIZE, SIZE, 3) if i % 2 else (SIZE, SIZE))
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        for mask in (s.mask, s.mask_lq):
            assert mask.dtype == np.uint8 and mask.shape == (SIZE, SIZE)
            assert mask.max() < len(CLASS_NAMES)


def test_class_fractions_follow_table2(samples):
    per_tile = np.array([fractions(s.mask) for s in samples])
    mean = per_tile.mean(axis=0)
    assert 0.72 <= mean[MATRIX] <= 0.86
    for k in range(1, len(CLASS_NAMES)):
        assert 0.03 <= mean[k] <= 0.12, (CLASS_NAMES[k], mean[k])
        # close to the paper's number, not just somewhere in the band
        assert abs(mean[k] - TABLE2_FRACTIONS[k]) < 0.025, (CLASS_NAMES[k], mean[k])
        # fractions vary from tile to tile
        assert per_tile[:, k].std() > 0.01, CLASS_NAMES[k]


def test_every_class_present_in_most_tiles(samples):
    present = np.array([fractions(s.mask) > 0 for s in samples])
    assert present[:, MATRIX].all()
    assert (present.mean(axis=0) >= 0.7).all(), present.mean(axis=0)


def test_phases_have_low_but_real_contrast(samples):
    grey = [s.image if s.image.ndim == 2 else s.image.mean(axis=-1) for s in samples]
    means = np.array([
        np.concatenate([g[s.mask == k] for g, s in zip(grey, samples)]).mean() for k in range(len(CLASS_NAMES))
    ])
    diffs = np.abs(means[:, None] - means[None, :])[np.triu_indices(len(CLASS_NAMES), 1)]
    assert diffs.min() > 0.02, means
    assert diffs.max() < 0.25, means


def test_image_is_noisy_and_phase_edges_are_blurred(samples):
    inner, edge, outside = [], [], []
    for s in samples:
        grey = s.image if s.image.ndim == 2 else s.image.mean(axis=-1)
        oxide = s.mask == 1
        inner.append(grey[ndimage.binary_erosion(oxide, iterations=3)])
        edge.append(grey[oxide & ~ndimage.binary_erosion(oxide)])
        ring = ndimage.binary_dilation(oxide, iterations=4) & ~ndimage.binary_dilation(oxide, iterations=2)
        outside.append(grey[ring & (s.mask == MATRIX)])
    inner, edge, outside = (np.concatenate(x).mean() for x in (inner, edge, outside))
    # blur: an object's outermost pixels are pulled toward the matrix around it (crisp edges would not be)
    assert outside < edge < inner - 0.15 * (inner - outside), (inner, edge, outside)
    # noise: the interior of a phase is not one flat value
    s = samples[0]
    assert s.image[ndimage.binary_erosion(s.mask == MATRIX, iterations=4)].std() > 0.01


def test_same_rng_seed_same_sample_other_seed_other_sample():
    a = generate_microstructure(48, np.random.default_rng(5), rgb=True)
    b = generate_microstructure(48, np.random.default_rng(5), rgb=True)
    c = generate_microstructure(48, np.random.default_rng(6), rgb=True)
    for field in ("image", "mask", "mask_lq"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.mask, c.mask)


def test_lq_mask_differs_in_a_small_fraction_of_pixels(samples):
    wrong = np.array([(s.mask != s.mask_lq).mean() for s in samples])
    assert (wrong > 0).all()
    assert 0.02 <= wrong.mean() <= 0.15, wrong.mean()


def test_lq_mask_has_spurious_blobs_and_mislabelled_objects(samples):
    extra_blobs = mislabelled = objects_total = 0
    for s in samples:
        extra_blobs += ndimage.label(s.mask_lq != MATRIX)[1] > ndimage.label(s.mask != MATRIX)[1]
        for k in range(1, len(CLASS_NAMES)):
            objects, count = ndimage.label(s.mask == k)
            objects_total += count
            for obj in range(1, count + 1):
                lq_labels = s.mask_lq[objects == obj]
                # whole particles only: slivers can also be swallowed by a neighbour's moved boundary
                if lq_labels.size >= 20:
                    mislabelled += ((lq_labels != k) & (lq_labels != MATRIX)).mean() > 0.5
    assert extra_blobs >= N_SAMPLES // 2  # over-segmentation in most tiles
    assert 1 <= mislabelled <= 0.25 * objects_total, (mislabelled, objects_total)


def test_too_small_tile_is_refused():
    with pytest.raises(InputError):
        generate_microstructure(8, np.random.default_rng(0))


# --- dataset folders ------------------------------------------------------------------------------------


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_written_folders_read_back(tmp_path):
    summary = write_demo_dataset(tmp_path / "demo", n=6, size=32, seed=3)
    hq, lq = DatasetFolder(tmp_path / "demo" / "hq"), DatasetFolder(tmp_path / "demo" / "lq")
    assert summary["hq"] == str(hq.path) and summary["lq"] == str(lq.path)
    for folder in (hq, lq):
        assert folder.class_names == list(CLASS_NAMES)
        assert folder.image_channels == 3
        assert len(folder.records()) == 6
        assert {r.split for r in folder.records()} == {"train", "val", "test"}
    assert summary["splits"] == {s: len(hq.records(s)) for s in ("train", "val", "test")}
    assert [(r.file, r.split) for r in hq.records()] == [(r.file, r.split) for r in lq.records()]
    assert {r.quality for r in hq.records()} == {"HQ"}
    assert {r.quality for r in lq.records(["train", "val"])} == {"LQ"}
    assert {r.quality for r in lq.records("test")} == {"HQ"}

    lq_wrong = []
    for rh, rl in zip(hq.records(), lq.records()):
        assert np.array_equal(hq.load_image(rh), lq.load_image(rl))
        mh, ml = hq.load_mask(rh), lq.load_mask(rl)
        if rh.split == "test":
            assert np.array_equal(mh, ml)  # the paper tests on HQ masks only
        else:
            lq_wrong.append((mh != ml).mean())
    assert all(w > 0 for w in lq_wrong)
    assert summary["lq_wrong_pixel_fraction"] == pytest.approx(np.mean(lq_wrong))

    # the stored masks are the generator's: sample i comes from the seed's i-th SeedSequence child
    first = generate_microstructure(32, np.random.default_rng(np.random.SeedSequence(3, spawn_key=(0,))), rgb=True)
    rec = next(r for r in hq.records() if r.file == "demo_0000.png")
    assert np.array_equal(hq.load_mask(rec), first.mask)
    assert np.abs(hq.load_image(rec) - first.image).max() <= 0.5 / 255 + 1e-6


def test_same_seed_gives_byte_identical_folders(tmp_path):
    write_demo_dataset(tmp_path / "a", n=4, size=32, seed=11)
    write_demo_dataset(tmp_path / "b", n=4, size=32, seed=11)
    write_demo_dataset(tmp_path / "c", n=4, size=32, seed=12)
    a, b, c = (folder_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_sample_does_not_depend_on_n(tmp_path):
    write_demo_dataset(tmp_path / "small", n=3, size=32, seed=2, rgb=False)
    write_demo_dataset(tmp_path / "big", n=5, size=32, seed=2, rgb=False)
    small, big = folder_bytes(tmp_path / "small" / "hq"), folder_bytes(tmp_path / "big" / "hq")
    for name in ("images/demo_0000.png", "images/demo_0002.png", "masks/demo_0001.png"):
        assert small[name] == big[name]
    assert DatasetFolder(tmp_path / "small" / "hq").image_channels == 1


def test_existing_folder_needs_overwrite(tmp_path):
    write_demo_dataset(tmp_path / "d", n=3, size=32, seed=0)
    before = folder_bytes(tmp_path / "d")
    with pytest.raises(InputError, match="overwrite"):
        write_demo_dataset(tmp_path / "d", n=3, size=32, seed=1)
    assert folder_bytes(tmp_path / "d") == before
    write_demo_dataset(tmp_path / "d", n=3, size=32, seed=1, overwrite=True)
    assert folder_bytes(tmp_path / "d") != before


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"size": 8}, {"val_fraction": 0.6, "test_fraction": 0.5}])
def test_bad_arguments_are_refused_and_nothing_written(tmp_path, kwargs):
    args = {"n": 3, "size": 32, "seed": 0} | kwargs
    with pytest.raises(InputError):
        write_demo_dataset(tmp_path / "bad", **args)
    assert not (tmp_path / "bad").exists()


def test_docs_example_runs(tmp_path, monkeypatch):
    """The Python example in docs/demo_data.md runs as written."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "demo_data.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(doc), "exec"), {})
