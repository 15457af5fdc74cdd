"""Checkpoints shaped like the ones users have, built from the tiny one: fp16 weights only with a
text-encoder config naming float16, no safety_checker/ and feature_extractor/, no model_index.json,
and a Hugging Face Hub id resolved from a pre-filled cache. Each runs the README's Stage 2 command
(validation every epoch) and Stage 3 with --extract_mask, offline."""

import json
import os
import shutil

import pytest
import torch
from conftest import assert_user_error, run_script

from mvp_diff.training_inputs import seed_training_args

SEED_FLAGS = seed_training_args("bottle")[2:]  # less --pretrained_model_name_or_path
TINY = ["--max_train_steps", "1", "--resolution", "64", "--validation_epochs", "1", "--validation_inference_steps", "2", "--report_to", "none"]
HUB_ID = "mvp-diff-tests/tiny-inpainting"


def in_dir(cwd, main, argv):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        main([str(a) for a in argv])
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def stage1(demo_dataset_master, tmp_path_factory):
    """Stage 1's outputs (records, box masks) and random boxes for Stage 3, shared read-only."""
    import boundbox
    import location_describer
    import random_box

    root = tmp_path_factory.mktemp("shapes_stage1")
    shutil.copytree(demo_dataset_master, root / "dataset")
    boundbox.main(["--classname", "bottle", "--dataset", str(root / "dataset"), "--outdir", str(root / "script")])
    location_describer.main(["--classname", "bottle", "--dataset", str(root / "dataset"), "--outdir", str(root / "script")])
    in_dir(root, random_box.main, ["--classname", "bottle", "--dataset", "./dataset", "--outdir", "./output/dataset/mask", "--num", "2"])
    return root


def shaped_checkpoint(shape, tiny_checkpoint, dest):
    from mvp_diff.demo_checkpoint import build_tiny_inpainting_checkpoint

    if shape == "fp16_only":
        path = build_tiny_inpainting_checkpoint(dest, variant="fp16", dtype=torch.float16)
        assert not list((path / "unet").glob("diffusion_pytorch_model.safetensors"))
        assert json.loads((path / "text_encoder" / "config.json").read_text()).get("dtype") == "float16"
        return path
    drop = {"no_safety_checker": ("safety_checker", "feature_extractor"), "no_model_index": ("model_index.json",)}[shape]
    shutil.copytree(tiny_checkpoint, dest, ignore=shutil.ignore_patterns(*drop))
    return dest


def run_both_stages(work, checkpoint, *stage2_extra):
    """The README's Stage 2 command with a tiny budget, then Stage 3 with --extract_mask on its LoRA."""
    import inpainting
    import train_diffusion

    in_dir(work, train_diffusion.main, ["--pretrained_model_name_or_path", checkpoint, *SEED_FLAGS, *TINY, *stage2_extra])
    out = work / "output" / "bottle"
    config = json.loads((out / "run_config.json").read_text())
    assert config["mixed_precision"] == ("fp16" if torch.cuda.is_available() else "no")  # --mixed_precision auto
    # 4 records, batch 6, accumulation 4: one step is 4 epochs; validated after it, and not again at the end.
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["epoch-4.png"]
    in_dir(work, inpainting.main, ["--classname", "bottle", "--dataset", "./dataset", "--output", "./output/dataset/image", "--num", "2",
                                   "--checkpoint_dir", checkpoint, "--extract_mask", "--resolution", "64", "--num_inference_steps", "2"])
    manifest = (work / "output" / "dataset" / "image" / "bottle" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 2 and all(json.loads(line)["mask_method"] == "default" for line in manifest)
    return config


@pytest.mark.parametrize("shape", ["fp16_only", "no_safety_checker", "no_model_index"])
def test_user_checkpoint_shapes_run_stage2_and_stage3(shape, stage1, tiny_checkpoint, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(stage1, work, symlinks=True)
    checkpoint = shaped_checkpoint(shape, tiny_checkpoint, tmp_path / "ckpt")
    config = run_both_stages(work, checkpoint, *(["--variant", "fp16"] if shape == "fp16_only" else []))
    assert config["weight_variant"] == ("fp16" if shape == "fp16_only" else None)


def test_fp16_only_checkpoint_needs_no_variant_flag(tiny_checkpoint, tmp_path):
    """Every frozen model comes back on the asked dtype, whatever the files and configs say."""
    from mvp_diff.checkpoint import load_components, pick_variant
    from mvp_diff.demo_checkpoint import build_tiny_inpainting_checkpoint

    path = build_tiny_inpainting_checkpoint(tmp_path / "fp16", variant="fp16", dtype=torch.float16)
    assert pick_variant(path, torch.float32) == "fp16"
    for dtype in (torch.float32, torch.bfloat16):
        models = load_components(path, pick_variant(path, dtype), dtype)
        assert {models[k].dtype for k in ("unet", "vae", "text_encoder")} == {dtype}


def fill_hub_cache(cache, checkpoint, repo_id=HUB_ID):
    """The Hugging Face cache layout huggingface_hub writes for a downloaded repository:
    CACHE/models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def test_hub_id_from_a_prefilled_cache_and_offline_errors(stage1, tiny_checkpoint, tmp_path):
    """A Hub id resolves through diffusers' own download into the cache with fetching off
    (HF_HUB_OFFLINE=1, or --local_files_only alone); an id that is not cached stops with one line that
    names it and says how to place the files by hand."""
    cache = tmp_path / "hub"
    snapshot = fill_hub_cache(cache, tiny_checkpoint)
    work = tmp_path / "work"
    shutil.copytree(stage1, work, symlinks=True)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    stage3 = ["--classname", "bottle", "--dataset", "./dataset", "--output", "./out", "--num", "1", "--no_lora", "--resolution", "64",
              "--num_inference_steps", "2"]
    run_script("inpainting.py", *stage3, "--checkpoint_dir", HUB_ID, cwd=work, env=env, check=True)
    settings = json.loads((work / "out" / "bottle" / ".samples" / "settings.json").read_text())
    assert settings["checkpoint"] == str(snapshot.resolve())
    # fetching forbidden by the flag alone (HF_HUB_OFFLINE unset): the cache still serves it
    online = dict(env, HF_HUB_OFFLINE="0")
    run_script("inpainting.py", *stage3, "--output", "./out2", "--checkpoint_dir", HUB_ID, "--local_files_only", cwd=work, env=online, check=True)

    missing = run_script("inpainting.py", *stage3, "--checkpoint_dir", "nobody/not-cached", cwd=work, env=env)
    assert_user_error(missing, 1, "--checkpoint_dir nobody/not-cached", "HF_HUB_OFFLINE", "huggingface-cli download nobody/not-cached")
    missing = run_script("train_diffusion.py", "--pretrained_model_name_or_path", "nobody/not-cached", "--local_files_only", *SEED_FLAGS,
                         cwd=work, env=online)
    assert_user_error(missing, 1, "--pretrained_model_name_or_path nobody/not-cached", "huggingface-cli download")
    # a folder path that does not exist is still reported as a missing folder
    gone = run_script("train_diffusion.py", "--pretrained_model_name_or_path", tmp_path / "nope", *SEED_FLAGS, cwd=work, env=env)
    assert_user_error(gone, 1, str(tmp_path / "nope"), "not found")
