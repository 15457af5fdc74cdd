"""Stage 3: random_box.py (boxes on the object, real sizes, seeds) and inpainting.py (checkpoint
layouts, LoRA, pasting back, precise masks, batching, processes, resume, bad input)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, assert_user_error, in_process, run_script
from PIL import Image

import inpainting
import random_box
from mvp_diff.boxes import box_mask
from mvp_diff.dataset import load_class
from mvp_diff.files import read_jsonl, read_rgb
from mvp_diff.prompts import describe
from mvp_diff.random_boxes import foreground, is_texture, random_box_records, real_box_stats
from mvp_diff.synthesis import PlannedSample, SampleStore, Settings, load_pipeline, pick_variant

FAST = ["--resolution", "64", "--num_inference_steps", "4"]


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def lora_dir(tiny_checkpoint, demo_dataset_master, tmp_path_factory):
    """The LoRA of a short real Stage 2 run on the demo bottle class (high learning rate, so that the
    LoRA visibly changes outputs)."""
    work = tmp_path_factory.mktemp("stage2")
    shutil.copytree(demo_dataset_master, work / "dataset")
    run_script("location_describer.py", "--classname", "bottle", "--dataset", "./dataset", "--outdir", "./script", cwd=work, check=True)
    run_script("boundbox.py", "--classname", "bottle", "--dataset", "./dataset", cwd=work, check=True)
    run_script(
        "train_diffusion.py", "--pretrained_model_name_or_path", tiny_checkpoint, "--train_data_dir", "./dataset/bottle",
        "--train_batch_size", "2", "--max_train_steps", "6", "--learning_rate", "5e-2", "--lr_scheduler", "constant",
        "--resolution", "64", "--seed", "0", "--output_dir", "./output", "--report_to", "none",
        cwd=work, check=True,
    )
    folder = work / "output" / "bottle"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    return folder


def make_workdir(root, dataset_master, checkpoint, lora):
    """What the README expects in the working directory: ./dataset, ./checkpoints/inpainting, ./output/bottle."""
    shutil.copytree(dataset_master, root / "dataset")
    (root / "checkpoints").mkdir()
    os.symlink(checkpoint, root / "checkpoints" / "inpainting")
    shutil.copytree(lora, root / "output" / "bottle")
    return root


@pytest.fixture
def workdir(tmp_path, demo_dataset_master, tiny_checkpoint, lora_dir):
    return make_workdir(tmp_path, demo_dataset_master, tiny_checkpoint, lora_dir)


@pytest.fixture(scope="session")
def seed_run(tmp_path_factory, demo_dataset_master, tiny_checkpoint, lora_dir):
    """The README's two Stage 3 commands, as written (plus a small --resolution), in a fresh folder."""
    work = make_workdir(tmp_path_factory.mktemp("seed_run"), demo_dataset_master, tiny_checkpoint, lora_dir)
    boxes = run_script("random_box.py", "--classname", "bottle", "--dataset", "./dataset", "--outdir", "./output/dataset/mask", "--num", "100", cwd=work, check=True)
    paint = run_script(
        "inpainting.py", "--classname", "bottle", "--dataset", "./dataset", "--output", "./output/dataset/image", "--num", "100",
        "--num_inference_steps", "20", "--guidance_scale", "3.5", "--extract_mask", "--resolution", "64", cwd=work, check=True,
    )
    return work, boxes, paint


def true_bottle_objects(n=10, size=256):
    """The exact object masks of the demo bottle's train/good images, replayed from its builder."""
    from scipy import ndimage

    from mvp_diff.demo_data import DEMO_CLASSES, _bottle_good

    rng = np.random.default_rng([0, list(DEMO_CLASSES).index("bottle")])
    images, objects = [], []
    for _ in range(n):
        image, inner = _bottle_good(rng, size)  # inner: 4 px inside the disc's edge
        images.append(image)
        objects.append(ndimage.distance_transform_edt(~inner) <= 4.5)
    return images, objects


def assert_same_sample(a, b, box):
    """Same sample from another batch or process: equal up to float rounding of batched kernels."""
    diff = np.abs(a.astype(int) - b.astype(int))
    assert diff[~box].max() == 0 and diff.max() <= 3 and diff[box].mean() < 0.1, (diff.max(), diff[box].mean())


def manifest(folder):
    return read_jsonl(folder / "manifest.jsonl")


def png(path):
    return np.asarray(Image.open(path))


# --- random boxes ------------------------------------------------------------------------------------


def test_foreground_is_the_bottle_and_textures_are_whole(demo_dataset_master):
    bottle = load_class(demo_dataset_master, "bottle")
    images, objects = true_bottle_objects()
    for path, image, obj in zip(bottle.train_good, images, objects):
        assert np.array_equal(read_rgb(path), image), "demo builder changed: update true_bottle_objects()"
        found = foreground(image)
        iou = (found & obj).sum() / (found | obj).sum()
        assert iou > 0.95, (path, iou)
    assert not is_texture(bottle)
    assert is_texture(load_class(demo_dataset_master, "grid"))


def test_seed_command_boxes(seed_run, demo_dataset_master):
    work, proc, _ = seed_run
    folder = work / "output" / "dataset" / "mask" / "bottle"
    records = read_jsonl(folder / "boxes.jsonl")
    assert [r["index"] for r in records] == list(range(100))
    assert sum(r["defect_type"] == "broken_large" for r in records) == 50
    assert sum(r["defect_type"] == "contamination" for r in records) == 50
    _, objects = true_bottle_objects()
    goods = load_class(demo_dataset_master, "bottle").train_good
    coverage = []
    for r in records:
        assert r["good_image"] == f"bottle/train/good/{goods[r['index'] % len(goods)].name}"
        assert Path(r["dataset_root"]) == (work / "dataset").resolve()
        mask = png(folder / r["box_mask"])
        assert mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(mask, box_mask(r["boxes"], 256, 256))
        assert r["text"] == describe("bottle", r["defect_type"], r["boxes"], 256, 256)
        obj = objects[r["index"] % len(goods)]
        for x0, y0, x1, y1 in r["boxes"]:
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            coverage.append(obj[y0:y1, x0:x1].mean())
    # every box on the true object (at least 90% of its area), as required
    assert min(coverage) >= 0.9, min(coverage)
    # several boxes per sample happen for contamination (1 to 3 real spots), never for broken_large
    counts = {d: {len(r["boxes"]) for r in records if r["defect_type"] == d} for d in ("broken_large", "contamination")}
    assert counts["broken_large"] == {1} and len(counts["contamination"]) > 1
    assert (folder / "foreground" / "000.png").is_file()


def test_box_sizes_follow_real_boxes_with_jitter(demo_dataset_master):
    data = load_class(demo_dataset_master, "bottle")
    stats = real_box_stats(data)
    records, _, _ = random_box_records(data, {"broken_large": 200}, seed=3, progress=False)
    real = np.array(stats["broken_large"].pool) * 256
    widths = np.array([b[2] - b[0] for r in records for b in r["boxes"]])
    heights = np.array([b[3] - b[1] for r in records for b in r["boxes"]])
    # within the jitter range of the real sizes (boxes may shrink to fit the object, never grow)
    assert widths.max() <= real[:, 0].max() * 1.5 + 1 and heights.max() <= real[:, 1].max() * 1.5 + 1
    assert widths.min() >= real[:, 0].min() / 1.5 * 0.8 ** 8 - 1
    # new shapes appear: many distinct sizes and aspect ratios, not only the real ones
    assert len({(w, h) for w, h in zip(widths, heights)}) > 50
    assert np.ptp(np.log(widths / heights)) > 0.5


def test_boxes_stay_on_an_off_centre_object(tmp_path):
    """An object filling only the left part of a plain background: boxes must land on it."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "widget"
    obj = np.zeros((120, 200), bool)
    obj[20:100, 10:80] = True
    for i in range(4):
        image = np.full((120, 200, 3), 200, np.uint8) + rng.integers(0, 3, (120, 200, 3), dtype=np.uint8)
        image[obj] = rng.integers(0, 120, (int(obj.sum()), 3), dtype=np.uint8)
        (folder / "train" / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / "train" / "good" / f"{i:03d}.png")
    for i in range(3):
        for sub in ("test/scratch", "ground_truth/scratch"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((120, 200, 3), np.uint8)).save(folder / "test" / "scratch" / f"{i:03d}.png")
        mask = np.zeros((120, 200), np.uint8)
        mask[30 + 10 * i : 60 + 10 * i, 20:45] = 255
        Image.fromarray(mask).save(folder / "ground_truth" / "scratch" / f"{i:03d}_mask.png")
    in_process(random_box, "--classname", "widget", "--dataset", tmp_path, "--outdir", tmp_path / "boxes", "--num", 40, cwd=tmp_path)
    records = read_jsonl(tmp_path / "boxes" / "widget" / "boxes.jsonl")
    assert len(records) == 40
    for r in records:
        for x0, y0, x1, y1 in r["boxes"]:
            assert obj[y0:y1, x0:x1].mean() >= 0.9, r


def test_random_box_seeds_counts_and_reruns(tmp_path, demo_dataset_master):
    out = tmp_path / "boxes"

    def run(*args):
        in_process(random_box, "--classname", "bottle", "--dataset", demo_dataset_master, "--outdir", out, *args, cwd=tmp_path)
        folder = out / "bottle"
        return (folder / "boxes.jsonl").read_text(), {p.relative_to(folder): p.read_bytes() for p in folder.glob("*/*.png") if p.parent.name != "foreground"}

    first = run("--num", 5, "--seed", 1)
    assert run("--num", 5, "--seed", 1) == first
    other = run("--num", 5, "--seed", 2)
    assert other[0] != first[0]
    records = [json.loads(line) for line in first[0].splitlines()]
    assert [r["defect_type"] for r in records] == ["broken_large"] * 3 + ["contamination"] * 2
    assert {r["seed"] for r in records} == {1}
    # a sample's boxes depend on (seed, index), not on --num
    longer = [json.loads(line) for line in run("--num", 7, "--seed", 1)[0].splitlines()]
    assert longer[0]["boxes"] == records[0]["boxes"]
    # --num per type, --defect_types; masks of the earlier, larger run are gone
    text, files = run("--num", 3, "--num_per_type", "--defect_types", "contamination")
    assert [json.loads(line)["defect_type"] for line in text.splitlines()] == ["contamination"] * 3
    assert sorted(str(p) for p in files) == ["contamination/000.png", "contamination/001.png", "contamination/002.png"]


# --- inpainting: the README command ------------------------------------------------------------------


def test_seed_command_inpainting_outputs(seed_run):
    work, _, proc = seed_run
    assert "100 samples" in proc.stdout
    out = work / "output" / "dataset" / "image" / "bottle"
    entries = manifest(out)
    assert [e["index"] for e in entries] == list(range(100))
    assert len(list(out.glob("test/*/*.png"))) == 100 and len(list(out.glob("ground_truth/*/*_mask.png"))) == 100
    assert len(list((out.parent / "bottle_boxes").glob("*/*_mask.png"))) == 100 and not (out / "bbox").exists()
    boxes = {r["index"]: r for r in read_jsonl(work / "output" / "dataset" / "mask" / "bottle" / "boxes.jsonl")}
    for e in entries:
        assert e["class"] == "bottle" and e["mask_method"] == "default" and e["seed"] == e["index"]
        assert e["prompt"] == boxes[e["index"]]["text"] and e["boxes"] == boxes[e["index"]]["boxes"]
        assert e["image"] == f"test/{e['defect_type']}/{e['index']:03d}.png"
        image, mask, box = png(out / e["image"]), png(out / e["mask"]), png(out / e["box_mask"])
        good = np.asarray(Image.open(e["good_image"]))
        assert image.shape == good.shape == (256, 256, 3) and (e["width"], e["height"]) == (256, 256)
        assert set(np.unique(mask)) <= {0, 255} and set(np.unique(box)) <= {0, 255}
        assert np.array_equal(box, box_mask(e["boxes"], 256, 256))
        inside = box > 0
        assert np.array_equal(image[~inside], good[~inside]), "pixels outside the box changed"
        assert not np.array_equal(image[inside], good[inside]), "nothing drawn inside the box"
        assert not (mask > 0)[~inside].any(), "precise mask leaves its box"
        assert e["mask_area"] == int((mask > 0).sum()) and e["box_area"] == int(inside.sum())
        assert ("empty_mask" in e["flags"]) == (e["mask_area"] == 0)


# --- inpainting: checkpoints, LoRA, determinism, processes -------------------------------------------


@pytest.mark.parametrize("layout", ["bin", "fp16_variant"])
def test_checkpoint_layouts_load_without_safety_checker(layout, tmp_path, tiny_checkpoint, lora_dir):
    import torch

    from mvp_diff.demo_checkpoint import build_tiny_inpainting_checkpoint
    from mvp_diff.synthesis import generate

    if layout == "bin":
        path = build_tiny_inpainting_checkpoint(tmp_path / "ckpt", safe_serialization=False)
        assert (path / "unet" / "diffusion_pytorch_model.bin").is_file()
    else:
        path = build_tiny_inpainting_checkpoint(tmp_path / "ckpt", variant="fp16")
        assert (path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
        assert pick_variant(path, torch.float32) == "fp16"  # the only weights there are
    assert (path / "safety_checker").is_dir() and (path / "feature_extractor").is_dir()
    pipe = load_pipeline(path, lora=lora_dir)
    assert pipe.safety_checker is None and pipe.unet.dtype == torch.float32
    reference = load_pipeline(tiny_checkpoint, lora=lora_dir)
    image = Image.fromarray(np.full((64, 64, 3), 120, np.uint8))
    mask = Image.fromarray(np.pad(np.full((24, 24), 255, np.uint8), 20))
    settings = Settings(checkpoint=str(path), lora=None, num_inference_steps=3)
    ours, = generate(pipe, ["a bottle"], [image], [mask], [5], (64, 64), settings)
    ref, = generate(reference, ["a bottle"], [image], [mask], [5], (64, 64), settings)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    if layout == "bin":
        assert diff.max() == 0  # same weights, other file format
    else:
        assert diff.mean() < 2.0  # the same weights rounded to fp16


def test_same_seed_same_image_whatever_the_batch_lora_matters(workdir):
    args = ["--classname", "bottle", "--num", 4, "--extract_mask", *FAST]
    in_process(random_box, "--classname", "bottle", "--num", 4, cwd=workdir)
    in_process(inpainting, *args, "--batch_size", 1, "--output", "b1", cwd=workdir)
    in_process(inpainting, *args, "--batch_size", 4, "--output", "b4", cwd=workdir)
    in_process(inpainting, *args, "--batch_size", 1, "--output", "again", cwd=workdir)
    in_process(inpainting, *args, "--seeds", 7, "--output", "s7", cwd=workdir)
    in_process(inpainting, *args, "--no_lora", "--output", "base", cwd=workdir)
    b1 = manifest(workdir / "b1" / "bottle")
    assert len(b1) == 4
    for e in b1:
        image = png(workdir / "b1" / "bottle" / e["image"])
        box = png(workdir / "b1" / "bottle" / e["box_mask"]) > 0
        again = png(workdir / "again" / "bottle" / e["image"])
        if torch.cuda.is_available():  # cuDNN may pick another kernel for the same call: last-bit differences
            assert_same_sample(again, image, box)
        else:
            assert again.tobytes() == image.tobytes(), "same seed, other image"
        assert_same_sample(png(workdir / "b4" / "bottle" / e["image"]), image, box)
        for other in ("s7", "base"):
            changed = png(workdir / other / "bottle" / e["image"])
            assert np.array_equal(changed[~box], image[~box])
            assert np.abs(changed[box].astype(int) - image[box].astype(int)).mean() > 1.0, other
    assert [e["seed"] for e in manifest(workdir / "s7" / "bottle")] == [7 + e["index"] for e in b1]


def test_processes_split_the_work(workdir):
    """Two processes (torchrun, as `accelerate launch` starts them) write exactly what one writes. All
    on the CPU (gloo), so that a machine with one GPU runs it too."""
    in_process(random_box, "--classname", "bottle", "--num", 6, cwd=workdir)
    args = ["--classname", "bottle", "--extract_mask", "--batch_size", 2, "--device", "cpu", *FAST]
    in_process(inpainting, *args, "--output", "one", cwd=workdir)
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    # torchrun's own --num* options would swallow an abbreviated "--num": all 6 samples are used.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(REPO / "inpainting.py"), *map(str, args), "--output", "two"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    one, two = manifest(workdir / "one" / "bottle"), manifest(workdir / "two" / "bottle")
    assert [e["index"] for e in two] == list(range(6))
    for a, b in zip(one, two):
        assert {k: v for k, v in a.items() if k != "mask_area"} == {k: v for k, v in b.items() if k != "mask_area"}
        box = png(workdir / "one" / "bottle" / a["box_mask"]) > 0
        assert_same_sample(png(workdir / "one" / "bottle" / a["image"]), png(workdir / "two" / "bottle" / b["image"]), box)
        masks = [png(workdir / run / "bottle" / e["mask"]) > 0 for run, e in (("one", a), ("two", b))]
        assert (masks[0] != masks[1]).sum() <= 0.01 * box.sum()


# --- inpainting: resume, settings, overwrite ---------------------------------------------------------


def outputs(folder):
    """Every image, mask and the manifest of a Stage 3 class folder, as bytes."""
    boxes = folder.parent / f"{folder.name}_boxes"
    found = {p.relative_to(folder.parent).as_posix(): p.read_bytes() for p in sorted([*folder.glob("*/*/*.png"), *boxes.glob("*/*.png")])}
    return {**found, "manifest.jsonl": (folder / "manifest.jsonl").read_bytes(), "coco.json": (folder / "coco.json").read_bytes()}


def test_killed_run_resumes_to_the_uninterrupted_result(workdir, capsys):
    """Killed mid-sample (image written, mask not), between a sample's entry write and its rename, and
    mid-manifest write: each rerun finishes with images, masks and manifest byte-identical to an
    uninterrupted run, without redoing finished samples."""
    in_process(random_box, "--classname", "bottle", "--num", 4, cwd=workdir)
    # Samples finished one after another, so "the Nth sample" is the same sample in every run.
    args = ["--classname", "bottle", "--batch_size", 1, "--extract_mask", "--write_workers", 0, *FAST]
    in_process(inpainting, *args, "--output", "reference", cwd=workdir)
    reference = outputs(workdir / "reference" / "bottle")
    assert len(reference) == 3 * 4 + 2

    out = workdir / "out" / "bottle"
    for point in ("sample:3", "write:003.json:1", "write:manifest.jsonl:1"):
        if out.exists():
            shutil.rmtree(out)
        killed = run_script("inpainting.py", *args, "--output", "out", cwd=workdir, env={"MVP_DIFF_KILL_AT": point})
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert list(out.rglob(".*.tmp")) or point.startswith("sample"), point
        finished = {p.name: p.stat().st_mtime_ns for p in (out / ".samples").glob("[0-9]*.json")}
        capsys.readouterr()
        in_process(inpainting, *args, "--output", "out", cwd=workdir)
        assert "taking over" in capsys.readouterr().err
        assert outputs(out) == reference, point
        assert not list(out.rglob("*.tmp")) and not (out / ".mvp_diff.lock.json").exists()
        for name, mtime in finished.items():  # finished samples were not generated again
            assert (out / ".samples" / name).stat().st_mtime_ns == mtime
        if point == "sample:3":
            assert len(finished) == 2

    # other settings do not mix into the folder; --overwrite starts over
    with pytest.raises(SystemExit) as err:
        in_process(inpainting, *args[:-1], 3, "--output", "out", cwd=workdir)
    assert err.value.code == 1
    in_process(inpainting, *args[:-1], 3, "--output", "out", "--overwrite", cwd=workdir)
    assert len(manifest(out)) == 4 and json.loads((out / ".samples" / "settings.json").read_text())["num_inference_steps"] == 3


def test_second_run_refuses_while_the_first_runs(workdir, capsys):
    """The race of two identical runs on one folder: the first, paused mid-sample, holds the folder; the
    second stops with one line; the first then finishes a folder equal to a lone run's."""
    in_process(random_box, "--classname", "bottle", "--num", 3, cwd=workdir)
    args = ["--classname", "bottle", "--batch_size", 1, *FAST]
    in_process(inpainting, *args, "--output", "reference", cwd=workdir)
    cmd = [sys.executable, str(REPO / "inpainting.py"), *map(str, args), "--output", "out"]
    env = dict(os.environ, PYTHONPATH=str(REPO), MVP_DIFF_STOP_AT="sample:2")
    first = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_stopped(first)
        capsys.readouterr()
        with pytest.raises(SystemExit) as err:
            in_process(inpainting, *args, "--output", "out", cwd=workdir)
        assert err.value.code == 1
        message = capsys.readouterr().err
        assert f"out/bottle is in use by another run (pid {first.pid} on" in message and len(message.strip().splitlines()) == 1, message
    finally:
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert outputs(workdir / "out" / "bottle") == outputs(workdir / "reference" / "bottle")


def wait_until_stopped(proc, timeout=300):
    """Block until `proc` has stopped itself (SIGSTOP at a kill point): state T in /proc."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before its stop point: {proc.stderr.read()[-2000:]}")
        with open(f"/proc/{proc.pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "T":
                return
        time.sleep(0.05)
    raise AssertionError("the run never reached its stop point")


def test_writing_while_generating_gives_the_same_outputs(workdir):
    """Samples finished by writer threads during generation are byte for byte those finished in turn."""
    in_process(random_box, "--classname", "bottle", "--num", 6, cwd=workdir)
    args = ["--classname", "bottle", "--extract_mask", "--batch_size", 2, *FAST]
    in_process(inpainting, *args, "--write_workers", 0, "--output", "sequential", cwd=workdir)
    in_process(inpainting, *args, "--write_workers", 3, "--output", "pipelined", cwd=workdir)
    sequential, pipelined = workdir / "sequential" / "bottle", workdir / "pipelined" / "bottle"
    files = sorted(p.relative_to(sequential) for p in sequential.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(pipelined) for p in pipelined.rglob("*") if p.is_file())
    assert len(manifest(pipelined)) == 6 and len([f for f in files if f.parts[0] == "test"]) == 6
    for f in files:
        assert (sequential / f).read_bytes() == (pipelined / f).read_bytes(), f


@pytest.mark.parametrize("workers", [0, 2])
def test_a_failed_write_stops_the_run_with_one_line(workdir, workers):
    in_process(random_box, "--classname", "bottle", "--num", 6, cwd=workdir)
    out = workdir / "out" / "bottle"
    out.mkdir(parents=True)
    (out / "ground_truth").write_text("a file where the mask folder goes")
    proc = run_script("inpainting.py", "--classname", "bottle", "--output", "out", "--batch_size", 1, "--write_workers", workers, *FAST, cwd=workdir)
    assert_user_error(proc, 1, "writing sample", "ground_truth", "rerun to resume", after_progress=True)
    assert len([line for line in proc.stderr.splitlines() if "error" in line]) == 1, proc.stderr
    assert not list((out / ".samples").glob("[0-9]*.json")), "no sample counts as done"


def test_empty_masks_are_flagged_or_skipped(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
    image = np.zeros((16, 16, 3), np.uint8)
    box = np.zeros((16, 16), bool)
    box[4:8, 4:8] = True
    empty = np.zeros((16, 16), bool)
    for skip in (False, True):
        out = tmp_path / f"skip{skip}"
        sample = PlannedSample(0, "000", "crack", "a widget", 0, [[4, 4, 8, 8]], good.resolve(), tmp_path / "box.png", 16, 16)
        store = SampleStore(out)
        entry = store.write_sample(sample, image, empty, box, Settings(checkpoint="c", lora=None, skip_empty=skip), "widget")
        assert "empty_mask" in entry.flags and entry.mask_area == 0
        assert store.is_done(sample)
        assert len(store.rebuild_manifest()) == (0 if skip else 1)
        assert (out / "test" / "crack" / "000.png").is_file() != skip


def test_official_mask_method_runs(workdir):
    in_process(random_box, "--classname", "bottle", "--num", 2, cwd=workdir)
    in_process(inpainting, "--classname", "bottle", "--extract_mask", "--mask_method", "official", "--output", "off", *FAST, cwd=workdir)
    entries = manifest(workdir / "off" / "bottle")
    assert len(entries) == 2
    for e in entries:
        mask = png(workdir / "off" / "bottle" / e["mask"]) > 0
        box = png(workdir / "off" / "bottle" / e["box_mask"]) > 0
        assert e["mask_method"] == "official" and e["mask_area"] == mask.sum() and "empty_mask" not in e["flags"]
        # A precise mask: something found, nothing outside the box, and not simply the box.
        assert mask.any() and not mask[~box].any() and mask.sum() < box.sum(), (mask.sum(), box.sum())


def test_grey_class_stays_grey_and_box_is_the_mask_without_extract_mask(workdir):
    in_process(random_box, "--classname", "grid", "--num", 3, cwd=workdir)
    in_process(inpainting, "--classname", "grid", "--no_lora", "--output", "g", *FAST, cwd=workdir)
    entries = manifest(workdir / "g" / "grid")
    assert len(entries) == 3
    for e in entries:
        image = Image.open(workdir / "g" / "grid" / e["image"])
        good = np.asarray(Image.open(e["good_image"]))
        assert image.mode == "L" and image.size == (224, 224) and good.ndim == 2
        box = png(workdir / "g" / "grid" / e["box_mask"]) > 0
        assert np.array_equal(np.asarray(image)[~box], good[~box])
        assert e["mask_method"] == "box" and np.array_equal(png(workdir / "g" / "grid" / e["mask"]) > 0, box)


# --- bad input ---------------------------------------------------------------------------------------


def test_box_mask_of_another_size_is_resized_with_a_warning(workdir, capsys):
    in_process(random_box, "--classname", "bottle", "--num", 2, cwd=workdir)
    path = workdir / "output" / "dataset" / "mask" / "bottle" / "broken_large" / "000.png"
    Image.open(path).resize((128, 128), Image.NEAREST).save(path)
    in_process(inpainting, "--classname", "bottle", "--output", "r", *FAST, cwd=workdir)
    assert "resizing the box mask" in capsys.readouterr().out
    e = manifest(workdir / "r" / "bottle")[0]
    assert "box_mask_resized" in e["flags"] and png(workdir / "r" / "bottle" / e["image"]).shape == (256, 256, 3)


def test_bad_input_gets_one_line_errors(workdir):
    cmd = ["--classname", "bottle", "--dataset", "./dataset"]
    proc = run_script("inpainting.py", *cmd, cwd=workdir)
    assert_user_error(proc, 1, "no boxes for class bottle", "python random_box.py --classname bottle")
    proc = run_script("random_box.py", *cmd, "--num", "4", "--defect_types", "scratch", cwd=workdir)
    assert_user_error(proc, 2, "--defect_types", "scratch", "broken_large, contamination")
    assert run_script("random_box.py", *cmd, "--num", "4", cwd=workdir).returncode == 0
    proc = run_script("inpainting.py", *cmd, "--lora_dir", "./output/nothing", cwd=workdir)
    assert_user_error(proc, 1, "--lora_dir output/nothing", "pytorch_lora_weights.safetensors", "train_diffusion.py", "--no_lora")
    proc = run_script("inpainting.py", *cmd, "--num", "9", cwd=workdir)
    assert_user_error(proc, 1, "--num 9", "holds 4 samples", "random_box.py")
    proc = run_script("inpainting.py", *cmd, "--checkpoint_dir", "./checkpoints/none", cwd=workdir)
    assert_user_error(proc, 1, "--checkpoint_dir checkpoints/none")
    proc = run_script("inpainting.py", "--classname", "cable", "--dataset", "./dataset", cwd=workdir)
    assert_user_error(proc, 2, "cable", "bottle, grid")
    proc = run_script("inpainting.py", *cmd, "--resolution", "100", cwd=workdir)
    assert_user_error(proc, 2, "--resolution")


def test_rerun_after_new_boxes_or_new_lora_never_mixes_sets(workdir):
    cmd = ["--classname", "bottle", "--dataset", "./dataset"]
    paint = [*cmd, "--output", "./output/dataset/image", *FAST, "--extract_mask"]
    out = workdir / "output" / "dataset" / "image" / "bottle"
    in_process(random_box, *cmd, "--num", "4", cwd=workdir)
    in_process(inpainting, *paint, cwd=workdir)
    assert len(list(out.glob("test/*/*.png"))) == 4
    # New boxes with fewer samples: the earlier samples they no longer describe are removed.
    in_process(random_box, *cmd, "--num", "2", "--seed", "5", cwd=workdir)
    in_process(inpainting, *paint, cwd=workdir)
    entries = manifest(out)
    assert [e["index"] for e in entries] == [0, 1] and all(e["seed"] == i for i, e in enumerate(entries))
    on_disk = sorted(os.path.relpath(p, out) for p in [*out.glob("*/*/*.png"), *out.parent.glob("bottle_boxes/*/*.png")])
    listed = sorted(e[k] for e in entries for k in ("image", "mask", "box_mask"))
    assert on_disk == listed
    # A retrained LoRA in the same folder is other settings, not "already done".
    from safetensors.torch import load_file, save_file

    lora = workdir / "output" / "bottle" / "pytorch_lora_weights.safetensors"
    weights = load_file(lora)
    weights[sorted(weights)[0]] += 1e-3
    save_file(weights, lora)
    proc = run_script("inpainting.py", *paint, cwd=workdir)
    assert_user_error(proc, 1, "lora_sha256", "--overwrite")
    assert_user_error(run_script("random_box.py", *cmd, "--seed", "-1", cwd=workdir), 2, "--seed")


def test_lora_is_sampled_with_its_training_prediction_type(tmp_path, tiny_checkpoint, lora_dir):
    assert load_pipeline(tiny_checkpoint, lora=lora_dir).scheduler.config.prediction_type == "epsilon"
    v_lora = tmp_path / "bottle"
    shutil.copytree(lora_dir, v_lora)
    config = json.loads((v_lora / "run_config.json").read_text())
    config["args"]["prediction_type"] = "v_prediction"
    (v_lora / "run_config.json").write_text(json.dumps(config))
    assert load_pipeline(tiny_checkpoint, lora=v_lora).scheduler.config.prediction_type == "v_prediction"
