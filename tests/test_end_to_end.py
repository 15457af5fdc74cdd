"""The four stages on the demo data, each reading what the one before wrote: Stage 1 records and
boxes, a short Stage 2 LoRA run, Stage 3 random boxes and inpainting with that LoRA, then evaluate.py
on Stage 3's folder and its manifest.jsonl."""

import json
import os
import shutil
from collections import Counter

from conftest import in_process

import boundbox
import evaluate
import inpainting
import location_describer
import random_box
import train_diffusion
from mvp_diff.files import read_jsonl
from mvp_diff.manifest import read_manifest


def test_stage1_to_stage3_then_evaluate(tmp_path, demo_dataset_master, tiny_checkpoint):
    work = tmp_path
    shutil.copytree(demo_dataset_master, work / "dataset")
    (work / "checkpoints").mkdir()
    os.symlink(tiny_checkpoint, work / "checkpoints" / "inpainting")
    data = ["--classname", "bottle", "--dataset", "./dataset"]
    in_process(location_describer, *data, "--outdir", "./script", cwd=work)
    in_process(boundbox, *data, cwd=work)
    in_process(train_diffusion, "--pretrained_model_name_or_path", "checkpoints/inpainting", "--train_data_dir", "./dataset/bottle",
               "--train_batch_size", "2", "--max_train_steps", "2", "--resolution", "64", "--seed", "0", "--output_dir", "./output",
               "--report_to", "none", cwd=work)  # fmt: skip
    assert (work / "output" / "bottle" / "pytorch_lora_weights.safetensors").is_file()  # the LoRA Stage 3 loads by default
    in_process(random_box, *data, "--outdir", "./output/dataset/mask", "--num", "4", cwd=work)
    in_process(inpainting, *data, "--output", "./output/dataset/image", "--num", "4", "--extract_mask",
               "--resolution", "64", "--num_inference_steps", "2", cwd=work)  # fmt: skip
    out = work / "output" / "dataset" / "image" / "bottle"
    manifest = {(e.defect_type, e.image.split("/")[-1]): e for _, e in read_manifest(out / "manifest.jsonl")}
    assert len(manifest) == 4 and all(e.prompt and e.boxes and e.good_image for e in manifest.values())
    boxes = {r["index"]: r for r in read_jsonl(work / "output" / "dataset" / "mask" / "bottle" / "boxes.jsonl")}
    assert all(e.prompt == boxes[e.index]["text"] and e.boxes == boxes[e.index]["boxes"] for e in manifest.values())
    # Without the box mask files, setting (c) can only take its boxes from the manifest.
    shutil.rmtree(out.parent / "bottle_boxes")

    in_process(evaluate, *data, "--generated", "./output/dataset/image", "--out", "./output/evaluation", "--parts", "segmentation,gallery",
               "--settings", "c", "--epochs", "1", "--image_size", "64", "--base_channels", "8", "--gallery_n", "4", "--device", "cpu",
               "--random_weights_for_testing", cwd=work)  # fmt: skip
    result = json.loads((work / "output" / "evaluation" / "metrics.json").read_text())["classes"]["bottle"]
    assert result["generated_counts"]["ours"] == dict(Counter(d for d, _ in manifest))
    assert "c:ours" in result["segmentation"]["settings"]
    assert any(n.endswith("4 box mask(s) drawn from the boxes in manifest.jsonl (no bottle_boxes/DEFECT/*_mask.png files)") for n in result["notes"]), result["notes"]
    assert not any("without a defect-free image" in n for n in result["notes"])
    assert len(result["gallery"]) == 4
    for shown in result["gallery"]:
        entry = manifest[(shown["defect_type"], shown["name"])]
        assert shown["prompt"] == entry.prompt and {"good", "box", "mask"} <= shown.keys()
