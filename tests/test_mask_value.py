"""benchmarks/mask_value.py: its synthetic pairs are what it claims (a defect smaller than its box,
the defect-free image outside the boxes, four labels of the same image) and bad flags fail cleanly."""


import numpy as np
from conftest import REPO, assert_user_error, run_script

from benchmarks import mask_value
from mvp_diff.evaluation.data import real_split
from mvp_diff.files import read_image, read_mask


def test_pairs_paste_a_defect_smaller_than_its_box(demo_dataset_master, tmp_path):
    split = real_split(demo_dataset_master, "grid")
    pairs, ious = mask_value.make_pairs(split, 4, seed=3, folder=tmp_path, fill=0.75, jitter=0.5)
    assert [p["defect_type"] for p in pairs] == ["broken", "thread", "broken", "thread"]
    sources = {str(s.image) for s in split.flat(split.val_anomalies) + split.test_set()}
    for pair in pairs:
        assert pair["good_image"] not in sources  # only train/good images are painted on
        image, good = read_image(pair["image"]), read_image(pair["good_image"])
        true, box, precise, official = (read_mask(pair[k]) for k in ("true", "box", "precise", "official"))
        assert image.ndim == 2  # a grey class stays grey
        assert true.any() and not (true & ~box).any() and true.sum() < 0.6 * box.sum()
        assert not (precise & ~box).any() and not (official & ~box).any()
        assert np.array_equal(image[~box], good[~box])  # outside the boxes: the defect-free image
        assert (image[true].astype(int) - good[true]).any()
    assert ious["true"] == 1.0 and ious["box"] < 0.6 and ious["precise"] > ious["box"]


def test_bad_flags_fail_in_one_line(tmp_path):
    proc = run_script("benchmarks/mask_value.py", "--out", tmp_path, "--image_size", 50, cwd=REPO, timeout=120)
    assert_user_error(proc, 2, "--image_size")
    proc = run_script("benchmarks/mask_value.py", "--out", tmp_path, "--steps_per_epoch", 0, cwd=REPO, timeout=120)
    assert_user_error(proc, 2, "--steps_per_epoch")
    proc = run_script("benchmarks/mask_value.py", "--out", tmp_path, "--dataset", tmp_path / "none", cwd=REPO, timeout=120)
    assert_user_error(proc, 1, str(tmp_path / "none"))
