"""What other tools read: the dataset left untouched, MVTec folders that anomalib's reader loads, the
COCO export, optional extras, progress output in logs."""

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tomllib
from anomalib_rule import anomalib_mvtec_ad_samples
from conftest import REPO, assert_user_error, dataset_listing, in_process, run_script
from tqdm.auto import tqdm

import boundbox
import inpainting
import location_describer
import random_box
from mvp_diff.coco import mask_regions, rebuild_coco, rle_counts
from mvp_diff.extras import EXTRA_MODULES
from mvp_diff.files import read_jsonl, read_mask
from mvp_diff.progress import LineProgress, progress_bar

FAST = ["--num_inference_steps", "2", "--resolution", "64", "--no_lora"]


def assert_loads_as_mvtec(class_root, n_anomalies, n_good_test=0, n_train=0):
    test = anomalib_mvtec_ad_samples(class_root, "test")
    assert sum(x["label_index"] for x in test) == n_anomalies and len(test) == n_anomalies + n_good_test
    for x in test:
        if x["label_index"]:
            assert Path(x["mask_path"]).is_file() and Path(x["mask_path"]).parent.name == x["label"]
    assert len(anomalib_mvtec_ad_samples(class_root, "train")) == n_train


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, demo_dataset_master, tiny_checkpoint):
    """Stage 1 and Stage 3 as the README writes them, in a fresh folder, with the dataset's full
    listing (modification times, bytes) before and after."""
    work = tmp_path_factory.mktemp("outputs")
    shutil.copytree(demo_dataset_master, work / "dataset")
    (work / "checkpoints").mkdir()
    os.symlink(tiny_checkpoint, work / "checkpoints" / "inpainting")
    before = dataset_listing(work / "dataset")
    in_process(location_describer, "--classname", "bottle", "--dataset", "./dataset", "--outdir", "./script", cwd=work)
    in_process(boundbox, "--classname", "bottle", "--dataset", "./dataset", cwd=work)
    in_process(random_box, "--classname", "bottle", "--dataset", "./dataset", "--outdir", "./output/dataset/mask", "--num", "6", cwd=work)
    # a real process: its stderr is a pipe, as in CI or `make demo > log`
    proc = run_script("inpainting.py", "--classname", "bottle", "--dataset", "./dataset", "--output", "./output/dataset/image", "--num", "6",
                      "--extract_mask", *FAST, cwd=work, check=True)
    return work, before, dataset_listing(work / "dataset"), proc


def test_dataset_untouched_by_stage1_and_stage3(pipeline_run):
    work, before, after, _ = pipeline_run
    assert after == before
    assert (work / "script" / "bottle" / "bbox" / "boxes.json").is_file()
    assert len(list((work / "script" / "bottle" / "bbox").glob("*/*_mask.png"))) == 12


def test_dataset_and_generated_folder_load_with_anomalibs_mvtec_rule(pipeline_run):
    work, _, _, _ = pipeline_run
    data = work / "dataset" / "bottle"
    n_real = len(list(data.glob("test/*/*.png"))) - len(list(data.glob("test/good/*.png")))
    assert_loads_as_mvtec(data, n_real, len(list(data.glob("test/good/*.png"))), len(list(data.glob("train/good/*.png"))))
    out = work / "output" / "dataset" / "image" / "bottle"
    assert_loads_as_mvtec(out, 6)
    assert {p.relative_to(out).parts[0] for p in out.rglob("*.png")} == {"test", "ground_truth"}
    boxes = sorted((out.parent / "bottle_boxes").glob("*/*_mask.png"))
    assert len(boxes) == 6
    for e in read_jsonl(out / "manifest.jsonl"):
        assert (out / e["box_mask"]).resolve() in {b.resolve() for b in boxes} and e["box_mask"].startswith("../bottle_boxes/")
        assert "regions" not in e  # the manifest stays small; coco.json holds the regions
    # the rule fails as anomalib does on the earlier layout (box masks inside the class folder)
    old = work / "old_layout"
    shutil.copytree(out, old / "bottle")
    shutil.copytree(out.parent / "bottle_boxes", old / "bottle" / "bbox")
    with pytest.raises(TypeError):
        anomalib_mvtec_ad_samples(old / "bottle", "test")


def test_coco_round_trips_through_pycocotools(pipeline_run):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    work, _, _, _ = pipeline_run
    out = work / "output" / "dataset" / "image" / "bottle"
    written = (out / "coco.json").read_text()
    coco = COCO(str(out / "coco.json"))
    entries = {e["index"] + 1: e for e in read_jsonl(out / "manifest.jsonl")}
    assert sorted(coco.getImgIds()) == sorted(entries)
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["broken_large", "contamination"]
    for image_id, entry in entries.items():
        info = coco.loadImgs(image_id)[0]
        assert (out / info["file_name"]).is_file() and info["file_name"] == entry["image"]
        truth = read_mask(out / entry["mask"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        union = np.zeros_like(truth)
        for ann in anns:
            region = coco.annToMask(ann).astype(bool)
            assert not (union & region).any() and ann["iscrowd"] == 0
            assert ann["area"] == region.sum() == int(mask_utils.area(coco.annToRLE(ann)))
            assert ann["bbox"] == [int(v) for v in mask_utils.toBbox(coco.annToRLE(ann))]
            assert coco.loadCats(ann["category_id"])[0]["name"] == entry["defect_type"]
            union |= region
        assert np.array_equal(union, truth), entry["image"]
    # rebuilt from the manifest and the masks alone: the same file
    (out / "coco.json").unlink()
    rebuild_coco(out)
    assert (out / "coco.json").read_text() == written


def test_coco_cli_rebuilds_and_names_a_bad_folder(pipeline_run, tmp_path):
    import subprocess
    import sys

    work, _, _, _ = pipeline_run
    out = work / "output" / "dataset" / "image" / "bottle"
    proc = subprocess.run([sys.executable, "-m", "mvp_diff.coco", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "6 images" in proc.stdout, proc.stderr
    bad = subprocess.run([sys.executable, "-m", "mvp_diff.coco", str(tmp_path)], cwd=REPO, capture_output=True, text=True)
    assert_user_error(bad, 1, "manifest.jsonl", "inpainting.py")


def test_coco_regions_are_exact_for_touching_and_tiny_regions():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.93  # many single pixels, some diagonal neighbours
    mask[0, 0] = mask[-1, -1] = True  # corners: first and last run
    mask[10:20, 5:9] = True
    regions = mask_regions(mask)
    union = np.zeros_like(mask)
    for region in regions:
        rle = mask_utils.frPyObjects(region["segmentation"], *mask.shape)
        decoded = mask_utils.decode(rle).astype(bool)
        assert decoded.sum() == region["area"] and not (union & decoded).any()
        union |= decoded
    assert np.array_equal(union, mask)
    diagonal = np.zeros((4, 4), bool)
    diagonal[0, 0] = diagonal[1, 1] = True
    assert len(mask_regions(diagonal)) == 1 and mask_regions(diagonal)[0]["bbox"] == [0, 0, 2, 2]  # 8-connected
    assert mask_regions(np.zeros((5, 5), bool)) == [] and rle_counts(np.ones((2, 2), bool)) == [0, 4]


def test_earlier_generated_layout_is_moved_and_evaluation_says_so(pipeline_run, tmp_path, capsys):
    from mvp_diff.errors import UserError
    from mvp_diff.evaluation.data import load_generated

    work, _, _, _ = pipeline_run
    run = tmp_path / "run"
    shutil.copytree(work, run, symlinks=True, ignore=lambda folder, names: ["dataset"] if Path(folder) == work else [])
    os.symlink(work / "dataset", run / "dataset")
    out = run / "output" / "dataset" / "image" / "bottle"
    (out.parent / "bottle_boxes").rename(out / "bbox")  # what earlier versions wrote
    for path in (out / ".samples").glob("[0-9]*.json"):
        entry = json.loads(path.read_text())
        path.write_text(json.dumps(dict(entry, box_mask=entry["box_mask"].replace("../bottle_boxes/", "bbox/"))))
    with pytest.raises(UserError, match=r"rerun the command that made them \(inpainting.py"):
        load_generated(out.parent, "bottle")
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("test/*/*.png")}
    in_process(inpainting, "--classname", "bottle", "--dataset", "./dataset", "--output", "./output/dataset/image", "--num", "6",
               "--extract_mask", *FAST, cwd=run)
    stdout = capsys.readouterr().out
    assert "moved the box masks" in stdout and "6 of 6 samples already done" in stdout
    assert not (out / "bbox").exists() and {p: p.stat().st_mtime_ns for p in out.glob("test/*/*.png")} == mtimes
    assert all(e["box_mask"].startswith("../bottle_boxes/") and (out / e["box_mask"]).is_file() for e in read_jsonl(out / "manifest.jsonl"))
    folder, samples, _ = load_generated(out.parent, "bottle")
    assert sum(s.box_mask is not None for v in samples.values() for s in v) == 6
    assert_loads_as_mvtec(out, 6)


# --- progress ----------------------------------------------------------------------------------------


def test_progress_is_a_few_lines_when_not_a_terminal(pipeline_run):
    stream = io.StringIO()
    bar = LineProgress(range(1000), desc="work", file=stream)
    assert sum(1 for _ in bar) == 1000
    lines = stream.getvalue().splitlines()
    assert 10 <= len(lines) <= 11 and "\r" not in stream.getvalue() and lines[-1].startswith("work: 1000/1000 (100%)")
    assert lines[0].startswith("work: 100/1000 (10%)")
    assert isinstance(progress_bar(total=3, terminal=True), tqdm) and isinstance(progress_bar(total=3, terminal=False), LineProgress)
    _, _, _, proc = pipeline_run
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "inpainting bottle: 6/6 (100%)" in proc.stderr


# --- optional extras ---------------------------------------------------------------------------------


def test_extras_are_optional_and_named_when_missing(tmp_path):
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = {name: packages for name, packages in meta["optional-dependencies"].items() if name != "dev"}  # dev: tests and lint
    assert extras == {name: [package for _, package in modules] for name, modules in EXTRA_MODULES.items()}
    assert set(meta["optional-dependencies"]["dev"]) <= set((REPO / "requirements-dev.txt").read_text().split())
    core = [line.split(">")[0].split("=")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert not {p for packages in extras.values() for p in packages} & set(core)
    dev = (REPO / "requirements-dev.txt").read_text().split()
    assert all(p in dev for packages in extras.values() for p in packages)  # the tests cover the extras
    # a machine without them: each module fails to import
    blocked = tmp_path / "blocked"
    for module in ("pydensecrf", "torch_fidelity", "lpips"):
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text("raise ImportError('not installed')\n")
    env = {"PYTHONPATH": f"{blocked}{os.pathsep}{REPO}"}
    proc = run_script("inpainting.py", "--classname", "bottle", "--extract_mask", "--mask_method", "official", cwd=tmp_path, env=env)
    assert_user_error(proc, 1, "--mask_method official", "pip install pydensecrf2", ".[official]")
    proc = run_script("evaluate.py", "--classname", "bottle", "--dataset", tmp_path, "--generated", tmp_path, "--out", tmp_path / "e", cwd=tmp_path, env=env)
    assert_user_error(proc, 1, "pip install torch-fidelity lpips", "--parts segmentation,gallery")
