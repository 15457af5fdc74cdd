"""Stage 1: dataset layer, boxes, sentences, location_describer.py and boundbox.py."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, dataset_listing, run_script
from PIL import Image

from mvp_diff.boxes import box_mask, boxes_from_mask
from mvp_diff.dataset import load_class, record_path, split_anomalies
from mvp_diff.errors import UsageError, UserError
from mvp_diff.files import read_jsonl, read_mask, read_rgb
from mvp_diff.prompts import describe, location_phrase


def make_class(root, name="widget", size=(40, 30), mode="RGB", mask_values=(0, 255), ext=".png", mask_ext=".png", n=3, masks=None):
    """A minimal MVTec-layout class; `masks` maps index -> bool mask (default: one 5x4 square)."""
    folder = root / name
    w, h = size
    rng = np.random.default_rng(0)
    shape = (h, w) if mode == "L" else (h, w, 4 if mode == "RGBA" else 3)
    for i in range(2):
        (folder / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / "train" / "good" / f"{i:03d}{ext}")
    for i in range(n):
        (folder / "test" / "crack").mkdir(parents=True, exist_ok=True)
        (folder / "ground_truth" / "crack").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / "test" / "crack" / f"{i:03d}{ext}")
        m = np.zeros((h, w), bool)
        m[5:9, 10:15] = True
        if masks and i in masks:
            m = masks[i]
        Image.fromarray(np.where(m, mask_values[1], mask_values[0]).astype(np.uint8), "L").save(folder / "ground_truth" / "crack" / f"{i:03d}_mask{mask_ext}")
    return folder


# --- input quirks -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_image_modes_read_as_rgb(tmp_path, mode):
    make_class(tmp_path, mode=mode)
    data = load_class(tmp_path, "widget")
    image = read_rgb(data.anomalies["crack"][0].image)
    assert image.shape == (30, 40, 3) and image.dtype == np.uint8
    if mode == "L":
        assert (image[..., 0] == image[..., 1]).all()


@pytest.mark.parametrize("values", [(0, 255), (0, 1)])
def test_masks_0_255_and_0_1(tmp_path, values):
    make_class(tmp_path, mask_values=values)
    data = load_class(tmp_path, "widget")
    mask = read_mask(data.anomalies["crack"][0].mask)
    assert mask.sum() == 20 and mask[5:9, 10:15].all()


@pytest.mark.parametrize("ext", [".jpg", ".jpeg", ".bmp", ".tif"])
def test_other_extensions(tmp_path, ext):
    make_class(tmp_path, ext=ext, mask_ext=".png" if ext in (".jpg", ".jpeg") else ext)
    data = load_class(tmp_path, "widget")
    assert len(data.anomalies["crack"]) == 3 and len(data.train_good) == 2


def test_custom_mask_suffix(tmp_path):
    folder = make_class(tmp_path)
    for m in (folder / "ground_truth" / "crack").iterdir():
        m.rename(m.with_name(m.name.replace("_mask", "_gt")))
    with pytest.raises(UserError, match="_mask"):
        load_class(tmp_path, "widget")
    assert len(load_class(tmp_path, "widget", mask_suffix="_gt").anomalies["crack"]) == 3


def test_missing_mask_is_named(tmp_path):
    folder = make_class(tmp_path)
    (folder / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(UserError, match="001.png"):
        load_class(tmp_path, "widget")


def test_mask_without_image_is_named(tmp_path):
    folder = make_class(tmp_path)
    (folder / "test" / "crack" / "002.png").unlink()
    with pytest.raises(UserError, match="002_mask.png"):
        load_class(tmp_path, "widget")


def test_size_mismatch_is_named(tmp_path):
    folder = make_class(tmp_path)
    Image.fromarray(np.zeros((31, 40), np.uint8)).save(folder / "ground_truth" / "crack" / "000_mask.png")
    with pytest.raises(UserError, match=r"000\.png.*000_mask\.png"):
        load_class(tmp_path, "widget")


def test_empty_mask_is_set_aside(tmp_path):
    make_class(tmp_path, masks={1: np.zeros((30, 40), bool)})
    data = load_class(tmp_path, "widget")
    assert [a.stem for a in data.anomalies["crack"]] == ["000", "002"]
    assert [a.stem for a in data.empty_masks] == ["001"]


def test_unknown_class_lists_known(tmp_path):
    make_class(tmp_path, name="widget")
    make_class(tmp_path, name="gadget")
    with pytest.raises(UsageError, match="gadget, widget"):
        load_class(tmp_path, "bottle")


def test_split_first_third_rounded_up():
    class A:
        def __init__(self, name):
            self.image = Path(name)

    items = [A(f"{i:03d}.png") for i in (4, 0, 3, 1, 2, 6, 5)]
    train, test = split_anomalies(items)
    assert [a.image.name for a in train] == ["000.png", "001.png", "002.png"]  # ceil(7/3) = 3
    assert [a.image.name for a in test] == ["003.png", "004.png", "005.png", "006.png"]
    assert len(split_anomalies(items[:1])[0]) == 1 and not split_anomalies(items[:1])[1]
    assert len(split_anomalies(items[:6])[0]) == 2
    assert len(split_anomalies(items, 0.5)[0]) == 4


# --- sentences ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cx,cy,phrase",
    [
        (10, 10, "top left"), (50, 10, "top"), (90, 10, "top right"),
        (10, 50, "left"), (50, 50, "center"), (90, 50, "right"),
        (10, 90, "bottom left"), (50, 90, "bottom"), (90, 90, "bottom right"),
    ],
)
def test_location_phrase_grid(cx, cy, phrase):
    assert location_phrase([cx - 2, cy - 2, cx + 2, cy + 2], 100, 100) == phrase


def test_sentence_says_what_where_size_count():
    assert describe("bottle", "broken_large", [[0, 0, 10, 10]], 100, 100) == "a bottle with a small broken large defect at the top left"
    two = describe("grid", "thread", [[90, 90, 95, 95], [0, 0, 40, 40]], 100, 100)
    assert two == "a grid with two large thread defects at the top left and bottom right"
    assert "tiny" in describe("grid", "thread", [[0, 0, 5, 5]], 100, 100)


# --- boxes --------------------------------------------------------------------------------------


def test_boxes_hand_computed():
    m = np.zeros((50, 60), bool)
    m[2:6, 3:9] = True  # 24 px
    m[5:8, 11:13] = True  # 6 px, 2 columns away from the first
    m[40:49, 50:60] = True  # touches the right border
    m[20, 30] = True  # 1 px speck
    boxes, dropped = boxes_from_mask(m, min_area=5)
    assert boxes == [[3, 2, 9, 6], [11, 5, 13, 8], [50, 40, 60, 49]] and dropped == 1
    boxes, _ = boxes_from_mask(m, min_area=5, merge_gap=3)  # gap of 2 px < 3: merge
    assert boxes == [[3, 2, 13, 8], [50, 40, 60, 49]]
    boxes, _ = boxes_from_mask(m, min_area=5, merge_gap=2)  # gap of 2 is not < 2
    assert len(boxes) == 3
    boxes, dropped = boxes_from_mask(m, min_area=1, margin=2)
    assert [3 - 2, 2 - 2, 9 + 2, 6 + 2] in boxes and [48, 38, 60, 50] in boxes and [28, 18, 33, 23] in boxes and dropped == 0
    diagonal = np.zeros((10, 10), bool)
    diagonal[2, 2] = diagonal[3, 3] = True  # 8-connected
    assert boxes_from_mask(diagonal, min_area=1)[0] == [[2, 2, 4, 4]]


def test_region_gap_not_box_gap():
    m = np.zeros((40, 40), bool)
    m[0:20, 0:2] = True  # vertical bar
    m[0:2, 4:20] = True  # horizontal bar 2 px to the right of the first
    m[30:32, 30:32] = True
    boxes, _ = boxes_from_mask(m, min_area=1, merge_gap=3)
    assert boxes == [[0, 0, 20, 20], [30, 30, 32, 32]]


def test_box_mask_filled():
    m = box_mask([[1, 2, 4, 5]], 6, 6)
    assert m.dtype == np.uint8 and m.sum() == 9 * 255 and (m[2:5, 1:4] == 255).all()


# --- scripts end to end -------------------------------------------------------------------------


def test_stage1_scripts_end_to_end(demo_dataset, tmp_path):
    outdir = tmp_path / "script"
    proc = run_script("location_describer.py", "--classname", "bottle", "--dataset", demo_dataset, "--outdir", outdir, cwd=tmp_path, check=True)
    assert "train records" in proc.stdout
    (demo_dataset / "bottle" / "bbox").mkdir()  # what earlier versions left in the dataset
    proc = run_script("boundbox.py", "--classname", "bottle", "--dataset_dir", demo_dataset, cwd=tmp_path, check=True)  # default --outdir ./script
    assert f"{demo_dataset / 'bottle' / 'bbox'}/ was written into the dataset" in proc.stderr and "you may delete it" in proc.stderr
    assert (demo_dataset / "bottle" / "bbox").is_dir()  # reported, never deleted
    (demo_dataset / "bottle" / "bbox").rmdir()

    data = load_class(demo_dataset, "bottle")
    train = [json.loads(l) for l in (outdir / "bottle" / "bottle_train.jsonl").read_text().splitlines()]
    test = [json.loads(l) for l in (outdir / "bottle" / "bottle_test.jsonl").read_text().splitlines()]
    assert len(train) + len(test) == len(data.all_anomalies()) == 12
    for defect in data.defect_types:
        names = sorted(a.image.name for a in data.anomalies[defect])
        assert [Path(r["image"]).name for r in train if r["defect_type"] == defect] == names[:2]
        assert [Path(r["image"]).name for r in test if r["defect_type"] == defect] == names[2:]
    for record in train + test:
        for key in ("image", "gt_mask", "bbox_mask", "good_image"):
            path = record_path(record, key)
            assert path.is_file(), path
            Image.open(path).verify()
        assert record_path(record, "bbox_mask") == outdir.resolve() / "bottle" / "bbox" / record["defect_type"] / Path(record["gt_mask"]).name
        box = read_mask(record_path(record, "bbox_mask"))
        gt = read_mask(record_path(record, "gt_mask"))
        assert box.shape == (record["height"], record["width"]) and (box | ~gt).all()  # box covers the defect
        assert record["text"].startswith("a bottle with ") and record["defect_type"].replace("_", " ") in record["text"]
    assert json.loads((outdir / "bottle" / "bbox" / "boxes.json").read_text())["class"] == "bottle"
    assert sorted(p.name for p in (demo_dataset / "bottle").iterdir()) == ["ground_truth", "test", "train"]


def test_dataset_not_modified(demo_dataset, tmp_path):
    before = dataset_listing(demo_dataset)
    run_script("boundbox.py", "--classname", "grid", "--dataset", demo_dataset, cwd=tmp_path, check=True)
    run_script("location_describer.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", tmp_path / "s", check=True)
    run_script("boundbox.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", tmp_path / "s", check=True)
    assert dataset_listing(demo_dataset) == before
    assert (tmp_path / "script" / "grid" / "bbox" / "boxes.json").is_file() and (tmp_path / "s" / "grid" / "bbox" / "boxes.json").is_file()
    assert not list(tmp_path.rglob("*.tmp"))  # atomic writes leave no temp files


def test_either_order_and_rerun_gives_same_records(demo_dataset, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run_script("location_describer.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", a, check=True)
    run_script("boundbox.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", b, check=True)
    run_script("location_describer.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", b, check=True)
    run_script("location_describer.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", b, check=True)  # rerun overwrites
    for split in ("train", "test"):
        ra, rb = (read_jsonl(d / "grid" / f"grid_{split}.jsonl") for d in (a, b))
        assert [r.pop("bbox_root") for r in ra] == [str(a.resolve())] * len(ra) and [r.pop("bbox_root") for r in rb] == [str(b.resolve())] * len(rb)
        assert ra == rb


def test_empty_mask_reported_and_skipped(tmp_path):
    make_class(tmp_path, masks={0: np.zeros((30, 40), bool)})
    proc = run_script("location_describer.py", "--classname", "widget", "--dataset", tmp_path, "--outdir", tmp_path / "s", check=True)
    assert "000_mask.png" in proc.stderr and "empty" in proc.stderr
    records = [json.loads(l) for split in ("train", "test") for l in (tmp_path / "s" / "widget" / f"widget_{split}.jsonl").read_text().splitlines()]
    assert sorted(Path(r["image"]).name for r in records) == ["001.png", "002.png"]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("script", ["location_describer.py", "boundbox.py"])
def test_bad_inputs(script, tmp_path):
    make_class(tmp_path / "ds", name="widget")
    assert_user_error(run_script(script, "--classname", "bottle", "--dataset", tmp_path / "ds"), 2, "widget", "--classname")
    assert_user_error(run_script(script, "--classname", "widget", "--dataset", tmp_path / "nowhere"), 1, "nowhere")
    (tmp_path / "ds" / "widget" / "test" / "crack" / "001.png").write_bytes(b"not a png")
    assert_user_error(run_script(script, "--classname", "widget", "--dataset", tmp_path / "ds"), 1, "001.png")
    make_class(tmp_path / "ds2", name="widget", n=0)
    assert_user_error(run_script(script, "--classname", "widget", "--dataset", tmp_path / "ds2"), 1, "no anomalies")
    assert_user_error(run_script(script, "--classname", "widget", "--dataset", tmp_path / "ds", "--min_area", "-1"), 2, "--min_area")


def test_describer_refuses_boxes_made_with_other_flags(demo_dataset, tmp_path):
    run_script("boundbox.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", tmp_path / "s", "--margin", "3", check=True)
    proc = run_script("location_describer.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", tmp_path / "s")
    assert_user_error(proc, 1, "boxes.json", "--margin 3", "boundbox.py")
    run_script("location_describer.py", "--classname", "grid", "--dataset", demo_dataset, "--outdir", tmp_path / "s", "--margin", "3", check=True)


def test_jpeg_mask_noise_is_not_a_defect(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[10:20, 10:20] = 255
    Image.fromarray(mask).save(tmp_path / "m.jpg", quality=60)
    assert np.asarray(Image.open(tmp_path / "m.jpg")).astype(bool).sum() > 100  # compression noise around the square
    read = read_mask(tmp_path / "m.jpg")
    assert abs(int(read.sum()) - 100) <= 8 and read[12:18, 12:18].all()
