"""The tiny checkpoint builder, checkpoint checks, and the demo's Stage 1 run."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from PIL import Image

from mvp_diff.checkpoint import check_checkpoint
from mvp_diff.errors import UserError


def test_tiny_checkpoint_has_real_layout_and_runs(tiny_checkpoint):
    from diffusers import StableDiffusionInpaintPipeline

    assert sorted(p.name for p in (tiny_checkpoint / "tokenizer").iterdir()) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "safety_checker", "feature_extractor"):
        assert (tiny_checkpoint / sub).is_dir(), sub
    index = json.loads((tiny_checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline" and index["scheduler"][1] == "PNDMScheduler"
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_checkpoint, safety_checker=None)
    assert pipe.unet.config.in_channels == 9 and pipe.vae_scale_factor == 8
    assert pipe.tokenizer.tokenize("a bottle with a small broken large defect")[1] == "bottle</w>"
    image = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    mask = Image.fromarray(np.pad(np.full((16, 16), 255, np.uint8), 24))
    out = pipe("a bottle", image=image, mask_image=mask, num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_check_checkpoint_errors(tiny_checkpoint, tmp_path):
    assert check_checkpoint(tiny_checkpoint) == tiny_checkpoint
    with pytest.raises(UserError, match="not found"):
        check_checkpoint(tmp_path / "nothing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    shutil.rmtree(broken / "vae")
    shutil.rmtree(broken / "tokenizer")
    with pytest.raises(UserError, match=r"lacks vae/, tokenizer/"):
        check_checkpoint(broken)
    plain = tmp_path / "plain"
    shutil.copytree(tiny_checkpoint, plain)
    config = json.loads((plain / "unet" / "config.json").read_text())
    config["in_channels"] = 4
    (plain / "unet" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="not 9"):
        check_checkpoint(plain)


def test_demo_stage1(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mvp_diff.demo", "--workdir", tmp_path / "demo", "--stages", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    work = tmp_path / "demo"
    for classname in ("bottle", "grid"):
        assert (work / "script" / classname / f"{classname}_train.jsonl").is_file()
        assert (work / "script" / classname / "bbox" / "boxes.json").is_file()
        assert not (work / "dataset" / classname / "bbox").exists()
    assert Image.open(work / "dataset" / "grid" / "train" / "good" / "000.png").mode == "L"
    check_checkpoint(work / "checkpoints" / "inpainting")
    assert str(work / "output/dataset/image") not in proc.stdout  # stage 3 did not run
    bad = subprocess.run([sys.executable, "-m", "mvp_diff.demo", "--stages", "5"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "--stages" in bad.stderr and "Traceback" not in bad.stderr


def test_demo_all_stages_small(tmp_path):
    """Every stage of the demo, on one class at the smallest settings: the README's commands chain."""
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "mvp_diff.demo", "--workdir", work, "--classes", "grid", "--resolution", "64",
           "--max_train_steps", "2", "--num", "2", "--stages", "1,2,3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)  # a rerun resumes
    assert again.returncode == 0 and "2 of 2 samples already done" in again.stdout, again.stderr[-3000:]
    assert (work / "output" / "grid" / "pytorch_lora_weights.safetensors").is_file()
    generated = work / "output" / "dataset" / "image" / "grid"
    images = sorted(generated.glob("test/*/*.png"))
    assert len(images) == 2 and len(sorted(generated.glob("ground_truth/*/*_mask.png"))) == 2
    assert Image.open(images[0]).mode == "L" and Image.open(images[0]).size == (224, 224)
    assert str(generated) in proc.stdout
