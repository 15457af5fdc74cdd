"""The GPU check's CPU-runnable parts: its arguments, the full-size SD-1.5 inpainting configs (built on
the meta device: shapes only) and the release layout its checkpoint builder writes."""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, assert_user_error, run_script

# A small model of the same layout, so that the builder's files are written and loaded in seconds.
SMALL = dict(
    unet_config=dict(in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8,
                     norm_num_groups=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     sample_size=32),
    vae_config=dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16), norm_num_groups=8,
                    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=64, scaling_factor=0.18215),
    text_config=dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                     projection_dim=32, hidden_act="quick_gelu"),
    safety_vision=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8),
)


def test_full_size_configs_are_the_release_architecture():
    import torch

    from benchmarks.full_size import components, parameter_counts

    with torch.device("meta"):
        parts = components()
    counts = {k: round(v, 1) for k, v in parameter_counts(parts).items()}
    assert counts == {"unet": 859.5, "vae": 83.7, "text_encoder": 123.1, "safety_checker": 304.0}
    assert parts["unet"].config.in_channels == 9 and parts["unet"].config.cross_attention_dim == 768
    assert parts["vae"].config.latent_channels == 4 and len(parts["vae"].config.block_out_channels) == 4  # 8x downsampling
    assert parts["text_encoder"].config.hidden_size == 768 and parts["text_encoder"].config.max_position_embeddings == 77


def test_release_layout_loads_as_a_downloaded_checkpoint(tmp_path):
    import torch

    from benchmarks.full_size import build_release_checkpoint
    from mvp_diff.checkpoint import check_checkpoint
    from mvp_diff.synthesis import load_pipeline, pick_variant

    path = build_release_checkpoint(tmp_path / "ckpt", **SMALL)
    for folder, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model"), ("safety_checker", "model")):
        assert (path / folder / f"{stem}.safetensors").is_file() and (path / folder / f"{stem}.fp16.safetensors").is_file(), folder
    assert {p.name for p in (path / "tokenizer").iterdir()} == {"vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"}
    assert (path / "model_index.json").is_file() and (path / "feature_extractor" / "preprocessor_config.json").is_file()
    text_config = json.loads((path / "text_encoder" / "config.json").read_text())
    assert text_config.get("dtype", text_config.get("torch_dtype")) in (None, "float32")  # the release's config, not the fp16 save's
    check_checkpoint(path)
    assert pick_variant(path, torch.float16) == "fp16" and pick_variant(path, torch.float32) is None
    pipe = load_pipeline(path, "cpu", torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.unet.config.in_channels == 9
    stamp = (path / ".complete").stat().st_mtime_ns
    assert build_release_checkpoint(path, **SMALL) == path and (path / ".complete").stat().st_mtime_ns == stamp  # a finished build is kept


def test_gpu_check_arguments_and_a_machine_without_cuda():
    from benchmarks.gpu_check import PARTS, parse_args
    from mvp_diff.errors import UsageError

    assert parse_args([]).parts == list(PARTS)
    assert parse_args(["--parts", "generation, tests"]).parts == ["generation", "tests"]
    for bad in (["--parts", "generation,gpus"], ["--parts", ","], ["--num", "4", "--batch_sizes", "8"], ["--batch_sizes", "0"]):
        with pytest.raises(UsageError):
            parse_args(bad)
    hidden = {"CUDA_VISIBLE_DEVICES": ""}  # the same answer on a machine with a GPU
    assert_user_error(run_script("benchmarks/gpu_check.py", env=hidden), 1, "no CUDA device found")
    proc = subprocess.run(["sh", str(REPO / "benchmarks" / "gpu_check.sh"), "--parts", "gpus"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), **hidden})
    assert_user_error(proc, 2, "--parts")
