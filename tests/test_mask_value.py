"""benchmarks/mask_value.py: its synthetic pairs are what it claims (a defect smaller than its box,
the defect-free image outside the boxes, four labels of the same image) and bad flags fail cleanly."""


import json

import numpy as np
from conftest import REPO, assert_user_error, run_script

from benchmarks import mask_value
from mvp_diff.evaluation.data import real_split
from mvp_diff.files import read_image, read_mask
from mvp_diff.masks import mask_method_version


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
    assert 0.0 <= ious["learned"] <= 1.0 and not any("learned" in p for p in pairs)  # measured, not written


def test_bad_flags_fail_in_one_line(tmp_path):
    proc = run_script("benchmarks/mask_value.py", "--out", tmp_path, "--image_size", 50, cwd=REPO, timeout=120)
    assert_user_error(proc, 2, "--image_size")
    proc = run_script("benchmarks/mask_value.py", "--out", tmp_path, "--steps_per_epoch", 0, cwd=REPO, timeout=120)
    assert_user_error(proc, 2, "--steps_per_epoch")
    proc = run_script("benchmarks/mask_value.py", "--out", tmp_path, "--dataset", tmp_path / "none", cwd=REPO, timeout=120)
    assert_user_error(proc, 1, str(tmp_path / "none"))


def test_whole_run_reports_every_label_and_resumes(tmp_path):
    # A tiny budget: the report's shape and the resume, not the figures, are under test.
    out = tmp_path / "mv"
    flags = ["--out", out, "--classname", "grid", "--seeds", 0, 1, "--num_pairs", 2, "--image_size", 32, "--base_channels", 4,
             "--epochs", 1, "--steps_per_epoch", 2, "--batch_size", 2, "--workers", 1,
             "--demo_anomalies", 6, "--demo_train_good", 6, "--demo_test_good", 2]  # fmt: skip
    proc = run_script("benchmarks/mask_value.py", *flags, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = (out / "report.md").read_text()
    for label in mask_value.LABELS:
        assert f"| {label} |" in report
    assert "Ranking by overall pixel AP: seed 0: " in report and "; seed 1: " in report
    assert "; learned (IoU only, not trained on) " in report
    runs = sorted((out / "runs" / "grid").glob("*.json"))
    assert len(runs) == 2 * len(mask_value.LABELS)
    stamps = {p: p.stat().st_mtime_ns for p in runs}
    proc = run_script("benchmarks/mask_value.py", *flags, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in runs} == stamps  # a rerun reuses every finished run
    assert (out / "report.md").read_text().split("Total time")[0] == report.split("Total time")[0]
    # Pairs and runs written with another version of a mask method are made again, not reused.
    for path in [*(out / "pairs").rglob("pairs.json"), *runs]:
        saved = json.loads(path.read_text())
        (saved["settings"] if "settings" in saved else saved["job"])["mask_versions"]["default"] = "default 0"
        path.write_text(json.dumps(saved))
    proc = run_script("benchmarks/mask_value.py", *flags, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(p.stat().st_mtime_ns != stamps[p] for p in runs)
    remade = json.loads(next((out / "pairs").rglob("pairs.json")).read_text())
    assert remade["settings"]["mask_versions"]["default"] == mask_method_version("default")
    assert remade["settings"]["mask_versions"]["learned"] == mask_method_version("learned")
