"""Records, box files, manifests and settings are input: every reader is fed one bad field at a time
and must stop with one line on stderr naming the file and field, exit code 1, and nothing written
anywhere outside its output folder. Commands run in-process and fail before any model loads."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script
from PIL import Image

import evaluate
import inpainting
import location_describer
import random_box
import train_diffusion
from mvp_diff import untrusted
from mvp_diff.errors import UserError
from mvp_diff.evaluation.standin import build_standin
from mvp_diff.files import MAX_IMAGE_PIXELS, image_size, read_mask, read_rgb

OUTSIDE = "outside.png"  # a real image beside the dataset, which no record may name


@pytest.fixture(scope="module")
def work(demo_dataset_master, tmp_path_factory):
    """Stage 1 records and box files, Stage 3 boxes and a generated folder, all made by the commands."""
    root = tmp_path_factory.mktemp("untrusted")
    dataset = root / "dataset"
    shutil.copytree(demo_dataset_master, dataset)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / OUTSIDE)
    ds = ["--classname", "bottle", "--dataset", dataset]
    run_script("boundbox.py", *ds, "--outdir", root / "script", check=True)
    run_script("location_describer.py", *ds, "--outdir", root / "script", check=True)
    run_script("random_box.py", *ds, "--stage1_dir", root / "script", "--outdir", root / "mask", "--num", "4", check=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "script" / "bottle" / "bbox" / "small_mask.png")
    build_standin(dataset, "bottle", root / "generated", num=2)
    return root


def listing(root: Path, output: Path):
    """Every file and folder under `root` outside `output`, with each file's size and mtime."""
    found = set()
    for path in root.rglob("*"):
        if path == output or output in path.parents:
            continue
        stat = path.stat()
        found.add((path.relative_to(root).as_posix(), path.is_file() and stat.st_size, path.is_file() and stat.st_mtime_ns))
    return found


def run_in_process(main, argv, capsys):
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def edit_jsonl(path: Path, line, change):
    records = [json.loads(x) for x in path.read_text().splitlines()]
    records[line - 1] = change(records[line - 1])
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def with_field(key, value):
    return lambda record: {**record, key: value}


def absolute(name):
    return lambda root: str(root / name)


def assert_refused(work, output, target, edit, command, capsys, *needles):
    """Apply `edit` to the file `target`, run `command` (a (main, argv) pair), and check the one-line
    refusal; `target` is restored afterwards so that every case starts from the commands' own files."""
    saved = target.read_bytes()
    try:
        edit(work)
        before = listing(work, output)
        main, argv = command
        code, err = run_in_process(main, argv, capsys)
        after = listing(work, output)
    finally:
        target.write_bytes(saved)
        shutil.rmtree(output, ignore_errors=True)
    assert code == 1, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert before == after, sorted(before ^ after)


def boxes_json(stage1_dir):
    return stage1_dir / "bottle" / "bbox" / "boxes.json"


def edit_boxes_json(change, stage1_dir):
    def edit(work):
        path = boxes_json(stage1_dir)
        saved = json.loads(path.read_text())
        change(saved, work)
        path.write_text(json.dumps(saved))
        return path

    return edit


def first_entry(key, value):
    def change(saved, work):
        entry = saved["anomalies"][sorted(saved["anomalies"])[0]]
        entry[key] = value(work) if callable(value) else value

    return change


def set_class(value):
    def change(saved, work):
        saved["class"] = value(work) if callable(value) else value

    return change


BOXES_JSON_CASES = {
    "class ../x": (set_class("../x"), 'field "class"'),
    "class absolute": (set_class(absolute("elsewhere")), 'field "class"'),
    "non-numeric box": (first_entry("boxes", [["a", 0, 4, 4]]), 'field "boxes"'),
    "box outside the image": (first_entry("boxes", [[0, 0, 100000, 4]]), 'field "boxes"', "inside the"),
    "width a path": (first_entry("width", "../../x"), 'field "width"'),
}


@pytest.mark.parametrize("case", sorted(BOXES_JSON_CASES))
@pytest.mark.parametrize("script", ["location_describer", "random_box"])
def test_stage1_box_file_readers(work, capsys, case, script):
    change, *needles = BOXES_JSON_CASES[case]
    output = work / "run"
    argv = ["--classname", "bottle", "--dataset", work / "dataset", "--outdir", output]
    if script == "location_describer":  # it reads boxes.json from its own --outdir: a copy there
        shutil.copytree(work / "script" / "bottle" / "bbox", output / "bottle" / "bbox")
        stage1_dir, main = output, location_describer.main
    else:
        stage1_dir, main = work / "script", random_box.main
        argv += ["--stage1_dir", stage1_dir, "--num", "2"]
    target = boxes_json(stage1_dir)
    assert_refused(work, output, target, edit_boxes_json(change, stage1_dir), (main, argv), capsys, "boxes.json", *needles)


def train_file(work):
    return work / "script" / "bottle" / "bottle_train.jsonl"


def validation_file(work):
    return work / "script" / "bottle" / "bottle_test.jsonl"


def edit_line(file, change, line=2):
    def edit(work):
        path = file(work)
        edit_jsonl(path, line, lambda record: change(record, work))
        return path

    return edit


def set_field(key, value):
    return lambda record, work: {**record, key: value(work) if callable(value) else value}


TRAIN_CASES = {
    "defect_type ../../../escaped": (train_file, set_field("defect_type", "../../../escaped"), 'line 2: field "defect_type"'),
    "defect_type absolute": (train_file, set_field("defect_type", "/elsewhere"), 'field "defect_type"'),
    "class ../x": (train_file, set_field("class", "../x"), 'field "class"'),
    "image outside the dataset": (train_file, set_field("image", "../" + OUTSIDE), 'field "image"', "points outside"),
    "image absolute outside": (train_file, set_field("image", absolute(OUTSIDE)), 'field "image"', "points outside"),
    "box mask outside its folder": (train_file, set_field("bbox_mask", "bottle/../../" + OUTSIDE), 'field "bbox_mask"'),
    "box mask of another size": (train_file, set_field("bbox_mask", "bottle/bbox/small_mask.png"), "line 2", "box mask"),
    "text not a string": (train_file, set_field("text", ["../x"]), 'field "text"'),
    "validation good image outside": (validation_file, set_field("good_image", "../" + OUTSIDE), "bottle_test.jsonl line 2", 'field "good_image"'),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_stage2_record_reader(work, tiny_checkpoint, capsys, case):
    file, change, *needles = TRAIN_CASES[case]
    output = work / "run"
    argv = ["--pretrained_model_name_or_path", tiny_checkpoint, "--train_data_dir", work / "dataset" / "bottle",
            "--train_file", train_file(work), "--validation_file", validation_file(work), "--output_dir", output, "--report_to", "none"]  # fmt: skip
    if case == "box mask of another size":
        record = json.loads(train_file(work).read_text().splitlines()[1])
        assert image_size(work / "dataset" / record["image"]) != image_size(work / "script" / "bottle" / "bbox" / "small_mask.png")
    assert_refused(work, output, file(work), edit_line(file, change), (train_diffusion.main, argv), capsys, file(work).name, *needles)


def boxes_jsonl(work):
    return work / "mask" / "bottle" / "boxes.jsonl"


STAGE3_CASES = {
    "defect_type ../../../escaped": (set_field("defect_type", "../../../escaped"), 'line 2: field "defect_type"'),
    "defect_type absolute": (set_field("defect_type", absolute("elsewhere")), 'field "defect_type"'),
    "index a path": (set_field("index", "../../x"), 'field "index"', "non-negative integer"),
    "index negative": (set_field("index", -1), 'field "index"'),
    "class ../x": (set_field("class", "../x"), 'field "class"'),
    "seed not an integer": (set_field("seed", "x"), 'field "seed"'),
    "non-numeric box": (set_field("boxes", [[0, "a", 4, 4]]), 'field "boxes"'),
    "box outside the image": (set_field("boxes", [[0, 0, 100000, 4]]), 'field "boxes"', "inside the"),
    "no boxes": (set_field("boxes", []), 'field "boxes"'),
    "good image outside the dataset": (set_field("good_image", "../" + OUTSIDE), 'field "good_image"', "points outside"),
    "good image absolute outside": (set_field("good_image", absolute(OUTSIDE)), 'field "good_image"', "points outside"),
    "box mask outside its folder": (set_field("box_mask", "../../x.png"), 'field "box_mask"', "points outside"),
    "box mask named ..": (set_field("box_mask", "broken_large/...png"), 'field "box_mask"'),
}


def stage3_argv(work, output):
    return ["--classname", "bottle", "--dataset", work / "dataset", "--mask_dir", work / "mask", "--output", output,
            "--no_lora", "--checkpoint_dir", work / "no-checkpoint", "--device", "cpu"]  # fmt: skip


@pytest.mark.parametrize("case", sorted(STAGE3_CASES))
def test_stage3_box_record_reader(work, capsys, case):
    change, *needles = STAGE3_CASES[case]
    output = work / "run" / "image"
    command = (inpainting.main, stage3_argv(work, output))
    assert_refused(work, work / "run", boxes_jsonl(work), edit_line(boxes_jsonl, change), command, capsys, "boxes.jsonl", *needles)


def test_stage3_output_entries_and_settings(work, tiny_checkpoint, capsys):
    """A finished sample's entry naming a file outside the output folder: resuming would delete it."""
    output = work / "run" / "image"
    argv = stage3_argv(work, output)
    argv[argv.index("--checkpoint_dir") + 1] = tiny_checkpoint
    samples = output / "bottle" / ".samples"

    def entry(work):
        samples.mkdir(parents=True, exist_ok=True)
        path = samples / "000.json"
        path.write_text(json.dumps({"index": 0, "image": "../../../" + OUTSIDE, "defect_type": "broken_large"}))
        return path

    assert_refused(work, work / "run", boxes_jsonl(work), entry, (inpainting.main, argv), capsys, "000.json", 'field "image"', "points outside")
    assert (work / OUTSIDE).is_file()

    def settings(work):
        samples.mkdir(parents=True, exist_ok=True)
        path = samples / "settings.json"
        path.write_text("[1, 2]")
        return path

    assert_refused(work, work / "run", boxes_jsonl(work), settings, (inpainting.main, argv), capsys, "other settings")


def manifest(work):
    return work / "generated" / "bottle" / "manifest.jsonl"


EVALUATE_CASES = {
    "class ../x": (with_field("class", "../x"), 'field "class"'),
    "defect_type ../../../escaped": (with_field("defect_type", "../../../escaped"), 'field "defect_type"'),
    "defect_type absolute": (with_field("defect_type", "/elsewhere"), 'field "defect_type"'),
    "good image outside the dataset": (with_field("good_image", "../../" + OUTSIDE), 'field "good_image"', "points outside"),
    "non-numeric box": (with_field("boxes", [[0, 0, "4", 4]]), 'field "boxes"'),
    "box outside the image": (with_field("boxes", [[0, 0, 4, 100000]]), 'field "boxes"', "inside the"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_manifest_reader(work, capsys, case):
    change, *needles = EVALUATE_CASES[case]
    output = work / "run"
    argv = ["--classname", "bottle", "--dataset", work / "dataset", "--generated", work / "generated", "--out", output,
            "--parts", "segmentation", "--device", "cpu"]  # fmt: skip

    def edit(work):
        edit_jsonl(manifest(work), 1, change)
        return manifest(work)

    assert_refused(work, output, manifest(work), edit, (evaluate.main, argv), capsys, "manifest.jsonl line 1", *needles)


def test_bad_classname_flag_is_refused(work, capsys):
    output = work / "run"
    argv = ["--classname", "../bottle", "--dataset", work / "dataset" / "bottle" / "train", "--outdir", output]
    code, err = run_in_process(location_describer.main, argv, capsys)
    assert code == 2 and "--classname" in err and len(err.strip().splitlines()) == 1, err
    assert not output.exists()


# --- images ----------------------------------------------------------------------------------------


def png_header(path, width, height):
    """A PNG that claims width x height pixels (a decompression bomb's header) in a few bytes."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [100_000, 20_000])  # PIL's error, and its warning (over the limit, under twice it)
def test_decompression_bomb_is_a_user_error(tmp_path, side):
    assert MAX_IMAGE_PIXELS < side * side
    bomb = png_header(tmp_path / "bomb.png", side, side)
    for read in (image_size, read_rgb, read_mask):
        with pytest.raises(UserError, match="bomb.png"):
            read(bomb)


def test_decompression_bomb_in_the_dataset_is_one_line(demo_dataset, tmp_path, capsys):
    png_header(demo_dataset / "bottle" / "ground_truth" / "broken_large" / "000_mask.png", 100_000, 100_000)
    code, err = run_in_process(location_describer.main, ["--classname", "bottle", "--dataset", demo_dataset, "--outdir", tmp_path / "s"], capsys)
    assert code == 1 and "000_mask.png" in err and len(err.strip().splitlines()) == 1, err


# --- the checks themselves -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bottle", "metal_nut", "broken_large", "fabric-border", "Type 2 (a)", "000", "ü"])
def test_plain_names_pass(name):
    assert untrusted.component(name, "f") == name


@pytest.mark.parametrize("name", ["../x", "/elsewhere", ".", "..", ".hidden", "a/b", "a\\b", "", "x\0", "C:x", 3, None])
def test_other_names_are_refused(name):
    with pytest.raises(UserError, match='f line 3: field "k"'):
        untrusted.component(name, untrusted.field_at("f", 3, "k"))


@pytest.mark.parametrize("value", [[0, 0, 1], [0, 0, 1, "2"], [0, 0, 1, True], [0, 0, float("nan"), 2], [2, 0, 1, 2], [-1, 0, 2, 2], [0, 0, 11, 2], "0,0,1,1"])
def test_bad_boxes_are_refused(value):
    with pytest.raises(UserError, match="box"):
        untrusted.box(value, 10, 10, "f")


def test_inside_follows_symlinks(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    assert untrusted.inside(tmp_path / "root" / "a.png", tmp_path / "root", "f") == (tmp_path / "root" / "a.png").resolve()
    with pytest.raises(UserError, match="points outside"):
        untrusted.inside(tmp_path / "root" / "link" / "a.png", tmp_path / "root", "f")
