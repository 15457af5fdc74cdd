"""Stage 2 (train_diffusion.py): LoRA training on the tiny checkpoint, through the real diffusers, peft
and accelerate code paths, at 64 px."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, run_script
from safetensors.torch import load_file

from mvp_diff.training_inputs import seed_training_args

LORA = "pytorch_lora_weights.safetensors"
SEED_FLAGS = seed_training_args("bottle")


@pytest.fixture(scope="module")
def workdir(demo_dataset_master, tiny_checkpoint, tmp_path_factory):
    """A user's working folder after Stage 1: dataset/, script/bottle/ (records, bbox/), checkpoints/inpainting."""
    import boundbox
    import location_describer

    root = tmp_path_factory.mktemp("stage2")
    shutil.copytree(demo_dataset_master, root / "dataset")
    (root / "checkpoints").mkdir()
    (root / "checkpoints" / "inpainting").symlink_to(tiny_checkpoint)
    boundbox.main(["--classname", "bottle", "--dataset", str(root / "dataset"), "--outdir", str(root / "script")])
    location_describer.main(["--classname", "bottle", "--dataset", str(root / "dataset"), "--outdir", str(root / "script")])
    return root


def base_args(workdir, out, *extra):
    """Flags of an in-process run; float32 everywhere, so its numbers mean the same on CPU and GPU."""
    return ["--pretrained_model_name_or_path", str(workdir / "checkpoints" / "inpainting"), "--train_data_dir", str(workdir / "dataset" / "bottle"),
            "--train_file", str(workdir / "script" / "bottle" / "bottle_train.jsonl"), "--output_dir", str(out), "--resolution", "64",
            "--report_to", "none", "--mixed_precision", "no", *map(str, extra)]


def train_in_process(argv):
    """train_diffusion.main in this process; returns the trained UNet."""
    import train_diffusion
    from mvp_diff import training

    args = train_diffusion.parse_args(argv)
    return training.train(args)


class Proc:
    def __init__(self, returncode, stderr):
        self.returncode, self.stderr, self.stdout = returncode, stderr, ""


def main_in_process(argv, capsys):
    """train_diffusion.main(argv) as the CLI runs it: (exit code, stderr)."""
    import train_diffusion

    capsys.readouterr()
    try:
        train_diffusion.main(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    return Proc(code, capsys.readouterr().err)


def loss_rows(out):
    lines = (Path(out) / "bottle" / "logs" / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,epoch,loss,lr"
    return [line.split(",") for line in lines[1:]]


def same_lora(a, b, atol):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa) <= atol


# ------------------------------------------------------------------------------------------ units


def test_sample_stream_shards_and_wraps():
    """Ranks take disjoint slices of one global batch and together get what one process gets; a batch
    larger than the data wraps around the epoch's order; every draw is a pure function of its indices."""
    from mvp_diff.latent_cache import LatentCache
    from mvp_diff.sample_stream import SampleStream

    n, shape = 5, (4, 2, 2)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn((n, 2) + shape, generator=g) for k in ("image_mean", "image_std", "masked_mean", "masked_std")}
    cache = LatentCache(**tensors, mask=torch.rand((n, 2, 1, 2, 2), generator=g), text=torch.randn((n, 3, 8), generator=g), scaling_factor=0.5,
                        variants=("none", "hflip"))
    stream = SampleStream(3, n, 6, shape, num_variants=2, noise_offset=0.1)
    assert stream.micro_batches_per_epoch == 1
    for epoch in range(3):
        records = list(stream.records(epoch))
        assert sorted(records[:n]) == list(range(n)) and records[n:] == records[:1]
    assert list(stream.records(0)) != list(stream.records(1))
    for micro_step in (0, 7):
        whole = stream.batch(cache, micro_step)
        halves = [stream.batch(cache, micro_step, rank, 3) for rank in (0, 1)]
        for key in whole:
            assert torch.equal(whole[key], torch.cat([h[key] for h in halves])), key
        again = SampleStream(3, n, 6, shape, num_variants=2, noise_offset=0.1).batch(cache, micro_step)
        assert all(torch.equal(whole[k], again[k]) for k in whole)
    assert not torch.equal(stream.batch(cache, 0)["noise"], stream.batch(cache, 1)["noise"])


def test_latent_cache_matches_encoding_every_step(workdir):
    """Latents drawn from the cache equal `vae.encode(x).latent_dist.sample(generator)` of the image and
    of the masked image as StableDiffusionInpaintPipeline prepares them, flipped variants included."""
    from diffusers import StableDiffusionInpaintPipeline

    from mvp_diff.dataset import record_path
    from mvp_diff.files import read_jsonl
    from mvp_diff.latent_cache import build_latent_cache, load_pil

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(workdir / "checkpoints" / "inpainting"), safety_checker=None, requires_safety_checker=False)
    record = read_jsonl(workdir / "script" / "bottle" / "bottle_train.jsonl")[0]
    pair = (record_path(record, "image"), record_path(record, "bbox_mask"))
    cache = build_latent_cache(pipe.vae, pipe.text_encoder, pipe.tokenizer, [pair], [record["text"]], 64, ("none", "hflip"), progress=False)

    image, mask = load_pil(*pair)
    init = pipe.image_processor.preprocess(image, height=64, width=64)
    mask_condition = pipe.mask_processor.preprocess(mask, height=64, width=64)
    masked = init * (mask_condition < 0.5)
    assert 0 < mask_condition.mean() < 0.5
    for variant, dims in ((0, ()), (1, (-1,))):
        flip = (lambda t, dims=dims: t.flip(dims)) if dims else (lambda t: t)
        with torch.no_grad():
            want_latents = pipe.vae.encode(flip(init)).latent_dist.sample(torch.Generator().manual_seed(1)) * pipe.vae.config.scaling_factor
            want_masked = pipe.vae.encode(flip(masked)).latent_dist.sample(torch.Generator().manual_seed(2)) * pipe.vae.config.scaling_factor
        shape = cache.latent_shape
        latents, masked_latents, mask_latent, text = cache.batch([0], [variant], torch.randn(shape, generator=torch.Generator().manual_seed(1))[None],
                                                                 torch.randn(shape, generator=torch.Generator().manual_seed(2))[None])
        assert torch.allclose(latents, want_latents, atol=1e-5)
        assert torch.allclose(masked_latents, want_masked, atol=1e-5)
        assert torch.equal(mask_latent, torch.nn.functional.interpolate(flip(mask_condition), size=shape[1:]))
    assert torch.allclose(text[0], pipe.encode_prompt(record["text"], "cpu", 1, False)[0][0], atol=1e-6)


def test_readme_shows_the_seed_command():
    """The README's literal Stage 2 command is the one train_diffusion.sh and the demo run."""
    readme = (REPO / "README.md").read_text()
    start = readme.index("python train_diffusion.py --pretrained_model_name_or_path checkpoints/inpainting")
    command = readme[start : readme.index("\n\n", start)].replace("\\", " ").split()
    assert command[2:] == SEED_FLAGS


def test_train_diffusion_sh_runs_the_seed_command(tmp_path):
    out = subprocess.run(["sh", str(REPO / "train_diffusion.sh"), "--max_train_steps", "3"], cwd=tmp_path, capture_output=True, text=True,
                         env=dict(os.environ, ACCELERATE="echo", PYTHON=sys.executable), check=True).stdout.split()
    assert out[:2] == ["launch", "--num_processes"] and "--multi_gpu" not in out
    words = out[out.index(str(REPO / "train_diffusion.py")) + 1 :]
    assert "--scale_lr" in words
    for flag, value in zip(SEED_FLAGS, SEED_FLAGS[1:]):
        if flag.startswith("--") and not value.startswith("--"):
            assert words[words.index(flag) + 1] == value, flag
    assert words[-2:] == ["--max_train_steps", "3"]
    assert words[words.index("--mixed_precision") + 1] == ("fp16" if torch.cuda.is_available() else "no")
    multi = subprocess.run(["sh", str(REPO / "train_diffusion.sh")], cwd=tmp_path, capture_output=True, text=True, check=True,
                           env=dict(os.environ, ACCELERATE="echo", PYTHON=sys.executable, NUM_GPUS="4", MIXED_PRECISION="bf16")).stdout.split()
    assert multi[:4] == ["launch", "--multi_gpu", "--num_processes", "4"] and multi[multi.index("--mixed_precision", 6) + 1] == "bf16"


# ------------------------------------------------------------------------------------ training runs


def test_seed_command_end_to_end(workdir):
    """The README's command verbatim (plus a short run at 64 px) from Stage 1's outputs: LoRA weights,
    run config, loss log and a validation grid under ./output/bottle/."""
    proc = run_script("train_diffusion.py", *SEED_FLAGS, "--max_train_steps", "2", "--resolution", "64", "--validation_inference_steps", "2",
                      cwd=workdir, check=True)
    out = workdir / "output" / "bottle"
    assert (out / LORA).is_file()
    config = json.loads((out / "run_config.json").read_text())
    assert config["train_records"] == 4 and config["global_batch_size"] == 24
    assert config["learning_rate"] == pytest.approx(1e-7 * 24) and config["args"]["snr_gamma"] == 10
    assert config["versions"]["diffusers"]
    rows = loss_rows(workdir / "output")
    assert [r[0] for r in rows] == ["1", "2"] and all(0 < float(r[2]) < 10 for r in rows)
    # 4 records, batch 6: one (wrapped) micro-batch per epoch, 4 per step -> 8 epochs in 2 steps.
    grid = out / "validation" / "epoch-8.png"
    from PIL import Image

    with Image.open(grid) as im:
        assert im.size == (3 * 64, 4 * 64)
    assert not list(out.glob("checkpoint-*"))
    assert "LoRA weights ->" in proc.stderr


def test_overfit_and_saved_lora_reproduces_the_trained_unet(workdir, tmp_path):
    """The real loop fits a fixed small set: the loss falls by at least half within 300 steps. The
    saved file, loaded into a fresh pipeline with load_lora_weights, gives the trained UNet's outputs.

    The tiny checkpoint's UNet has attention only at its coarsest level, where a LoRA cannot reach
    per-pixel noise; this test swaps in a UNet of the same 9-channel layout with attention at full
    latent resolution (the real SD-1.5 UNet has attention at the three finer levels)."""
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    checkpoint = tmp_path / "inpainting"
    shutil.copytree(workdir / "checkpoints" / "inpainting", checkpoint, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=32, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(64, 64),
                         down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                         cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16).save_pretrained(checkpoint / "unet")
    argv = base_args(workdir, tmp_path / "out", "--train_batch_size", 2, "--learning_rate", "1e-2", "--snr_gamma", 5,
                     "--max_train_steps", 300, "--checkpointing_steps", 1000)
    argv[1] = str(checkpoint)
    unet = train_in_process(argv)
    losses = [float(r[2]) for r in loss_rows(tmp_path / "out")]
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert len(losses) == 300 and last <= 0.5 * first, (first, last)

    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(checkpoint), safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    x, t, text = torch.randn((2, 9, 8, 8), generator=g), torch.tensor([10, 700]), torch.randn((2, 77, 32), generator=g)
    with torch.no_grad():
        base = pipe.unet(x, t, text).sample
        pipe.load_lora_weights(str(tmp_path / "out" / "bottle"))
        loaded = pipe.unet(x, t, text).sample
        trained = unet.to("cpu").eval()(x, t, text).sample  # trained on CUDA when there is one
    assert (trained - base).abs().max() > 1e-2
    assert torch.allclose(loaded, trained, atol=1e-6), (loaded - trained).abs().max()  # same weights, both run on the CPU


def test_killed_twice_and_resumed_equals_uninterrupted(workdir, tmp_path, capsys):
    """A run killed while writing checkpoint-4 (state saved, not yet renamed), resumed with `latest`
    and killed again while rewriting its loss log, then resumed once more, ends with the LoRA of the
    uninterrupted run bit for bit, and the same loss log. Flips, noise offset, min-SNR, accumulation,
    a warmup+cosine schedule and a batch that does not divide the data are all on, so every piece of
    state has to come back."""
    flags = ("--train_batch_size", 3, "--gradient_accumulation_steps", 2, "--max_train_steps", 6, "--checkpointing_steps", 2,
             "--checkpoints_total_limit", 2, "--lr_scheduler", "cosine", "--lr_warmup_steps", 2, "--learning_rate", "1e-3",
             "--random_hflip", "--random_vflip", "--noise_offset", 0.05, "--snr_gamma", 5, "--seed", 7)
    full = tmp_path / "full"
    train_in_process(base_args(workdir, full, *flags))
    assert [p.name for p in sorted((full / "bottle").glob("checkpoint-*"))] == ["checkpoint-4", "checkpoint-6"]  # limit 2, pruned after saving

    stopped = tmp_path / "stopped"
    killed = run_script("train_diffusion.py", *base_args(workdir, stopped, *flags), env={"MVP_DIFF_KILL_AT": "checkpoint:2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    out = stopped / "bottle"
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == [".checkpoint-4.tmp", "checkpoint-2"]
    resume = base_args(workdir, stopped, *flags, "--resume_from_checkpoint", "latest")
    killed = run_script("train_diffusion.py", *resume, env={"MVP_DIFF_KILL_AT": "write:loss.csv:1"})
    assert killed.returncode == -9 and "taking over" in killed.stderr, killed.stderr[-3000:]
    proc = main_in_process(resume, capsys)
    assert proc.returncode == 0 and "taking over" in proc.stderr, proc.stderr[-3000:]

    assert not list(out.glob(".checkpoint-*")) and not list(out.rglob("*.tmp")) and not (out / ".mvp_diff.lock.json").exists()
    # Bit-exact on a CPU; CUDA kernels (cuDNN algorithm choice, atomics in backward) may differ in the last bits.
    if not torch.cuda.is_available():
        a, b = load_file(str(full / "bottle" / LORA)), load_file(str(out / LORA))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert loss_rows(stopped) == loss_rows(full)
    else:
        assert same_lora(full / "bottle" / LORA, out / LORA, atol=1e-4)
        assert all(float(a[2]) == pytest.approx(float(b[2]), rel=1e-3) for a, b in zip(loss_rows(stopped), loss_rows(full)))
    assert len(loss_rows(stopped)) == len(loss_rows(full)) == 6
    assert not same_lora(full / "bottle" / LORA, full / "bottle" / "checkpoint-4" / LORA, atol=1e-4)


def test_full_disk_during_a_checkpoint_leaves_no_partial_checkpoint(workdir, tmp_path, capsys, monkeypatch):
    """accelerate's save_state failing half way (disk full): one line naming the checkpoint, no temp
    folder left, the earlier checkpoint kept."""
    from accelerate import Accelerator

    save_state = Accelerator.save_state

    def full_disk(self, output_dir=None, **kwargs):
        if output_dir.endswith(".checkpoint-2.tmp"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "optimizer.bin").write_bytes(b"half")
            raise OSError(28, "No space left on device")
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_disk)
    proc = main_in_process(base_args(workdir, tmp_path, "--train_batch_size", 2, "--max_train_steps", 3, "--checkpointing_steps", 1), capsys)
    out = tmp_path / "bottle"
    assert_user_error(proc, 1, str(out / "checkpoint-2"), "No space left on device", "--resume_from_checkpoint latest", after_progress=True)
    assert [p.name for p in out.glob("*checkpoint-*")] == ["checkpoint-1"] and not (out / LORA).exists()


def test_two_process_ddp_equals_one_process(workdir, tmp_path):
    """train_diffusion.sh with NUM_GPUS=2 on a CPU (gloo): 2 processes x batch 1 end where 1 process x
    batch 2 ends; only rank 0 writes the log; both ranks' states go into the checkpoint. Both runs are
    pinned to the CPU (CUDA_VISIBLE_DEVICES=""), so a machine with one GPU runs it too."""
    extra = ["--resolution", "64", "--train_batch_size", "1", "--gradient_accumulation_steps", "2", "--max_train_steps", "3",
             "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--learning_rate", "1e-3", "--random_hflip", "--checkpointing_steps", "2",
             "--validation_file=", "--report_to", "none"]
    env = dict(os.environ, NUM_GPUS="2", OUTPUT_DIR=str(tmp_path / "ddp"), PYTHON=sys.executable, ACCELERATE=str(Path(sys.executable).parent / "accelerate"),
               PYTHONPATH=str(REPO), MIXED_PRECISION="no", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["sh", str(REPO / "train_diffusion.sh"), *extra], cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("LoRA weights ->") == 1

    one = tmp_path / "one"
    argv = ["--pretrained_model_name_or_path", str(workdir / "checkpoints" / "inpainting"), "--train_data_dir", str(workdir / "dataset" / "bottle"),
            "--output_dir", str(one), "--seed", "0", "--prediction_type", "epsilon", "--scale_lr", "--snr_gamma", "10", *extra]
    argv[argv.index("--train_batch_size") + 1] = "2"
    # cwd: the default --train_file ./script/bottle/bottle_train.jsonl resolves as for the 2-process run
    run_script("train_diffusion.py", *argv, cwd=workdir, env={"CUDA_VISIBLE_DEVICES": ""}, check=True)

    ddp_rows, one_rows = loss_rows(tmp_path / "ddp"), loss_rows(one)
    assert [r[0] for r in ddp_rows] == ["1", "2", "3"]
    for a, b in zip(ddp_rows, one_rows):
        assert float(a[2]) == pytest.approx(float(b[2]), rel=1e-4) and float(a[3]) == pytest.approx(float(b[3]))
    assert same_lora(tmp_path / "ddp" / "bottle" / LORA, one / "bottle" / LORA, atol=1e-4)
    assert {p.name for p in (tmp_path / "ddp" / "bottle" / "checkpoint-2").iterdir()} >= {LORA, "optimizer.bin", "scheduler.bin",
                                                                                          "random_states_0.pkl", "random_states_1.pkl"}
    config = json.loads((tmp_path / "ddp" / "bottle" / "run_config.json").read_text())
    assert config["num_processes"] == 2 and config["learning_rate"] == pytest.approx(1e-3 * 2 * 2)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir, tmp_path, capsys):
    """An absurd learning rate makes the LoRA overflow after step 1: the run stops at step 2 with one
    line naming the step and checkpoint-1, writes no later checkpoint and no final weights."""
    proc = main_in_process(base_args(workdir, tmp_path, "--train_batch_size", 2, "--learning_rate", "1e30", "--max_train_steps", 5,
                                     "--checkpointing_steps", 1), capsys)
    out = tmp_path / "bottle"
    assert_user_error(proc, 1, "at step 2", str(out / "checkpoint-1"), "--resume_from_checkpoint latest", after_progress=True)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"] and not (out / LORA).exists()
    assert not list(out.glob(".checkpoint-*"))


# ------------------------------------------------------------------------------------- bad input


def _records(workdir):
    return [json.loads(line) for line in (workdir / "script" / "bottle" / "bottle_train.jsonl").read_text().splitlines()]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_inputs(workdir, tmp_path, capsys):
    """Every mistake a user can make with the inputs: one line naming the file or flag, before any model loads."""
    ckpt = workdir / "checkpoints" / "inpainting"
    run = lambda *argv: main_in_process([str(a) for a in argv], capsys)  # noqa: E731

    def args(**override):
        flags = dict(pretrained_model_name_or_path=ckpt, train_data_dir=workdir / "dataset" / "bottle",
                     train_file=workdir / "script" / "bottle" / "bottle_train.jsonl", output_dir=tmp_path / "out", report_to="none")
        flags.update(override)
        return [x for k, v in flags.items() for x in (f"--{k}", v)]

    assert_user_error(run(*args(pretrained_model_name_or_path=tmp_path / "nope")), 1, str(tmp_path / "nope"), "not found")
    partial = tmp_path / "partial"
    shutil.copytree(ckpt, partial, ignore=shutil.ignore_patterns("vae", "tokenizer"))
    assert_user_error(run(*args(pretrained_model_name_or_path=partial)), 1, "vae", "tokenizer", "lacks")
    not_inpainting = tmp_path / "sd15"
    shutil.copytree(ckpt, not_inpainting)
    config = json.loads((not_inpainting / "unet" / "config.json").read_text())
    (not_inpainting / "unet" / "config.json").write_text(json.dumps(dict(config, in_channels=4)))
    assert_user_error(run(*args(pretrained_model_name_or_path=not_inpainting)), 1, "4 input channels, not 9", "inpainting")

    assert_user_error(run(*args(train_file=tmp_path / "none.jsonl")), 1, str(tmp_path / "none.jsonl"), "location_describer.py")
    assert_user_error(run(*args(train_file=_write(tmp_path / "empty.jsonl", []))), 1, "empty.jsonl", "no records")
    records = _records(workdir)
    gone = _write(tmp_path / "gone.jsonl", [records[0], dict(records[1], image="bottle/test/broken_large/999.png")])
    assert_user_error(run(*args(train_file=gone)), 1, "999.png", "record 2", "not found")
    no_box = _write(tmp_path / "nobox.jsonl", [dict(records[0], bbox_mask="bottle/bbox/broken_large/999_mask.png")])
    assert_user_error(run(*args(train_file=no_box)), 1, "999_mask.png", "boundbox.py --classname bottle")
    earlier = _write(tmp_path / "earlier.jsonl", [{k: v for k, v in records[0].items() if k != "bbox_root"}])  # box mask in the dataset
    assert_user_error(run(*args(train_file=earlier)), 1, "bbox_root", "location_describer.py")
    assert_user_error(run(*args(train_file=_write(tmp_path / "grid.jsonl", [dict(records[0], **{"class": "grid"})]))), 1, "'grid'")
    assert_user_error(run(*args(validation_file=tmp_path / "val.jsonl")), 1, "--validation_file", "val.jsonl")

    assert_user_error(run(*args(resolution=100)), 2, "--resolution", "multiple of 8")
    assert_user_error(run(*args(train_batch_size=0)), 2, "--train_batch_size")
    if not torch.cuda.is_available():
        assert_user_error(run(*args(mixed_precision="fp16")), 2, "fp16")
    assert_user_error(run(*args(train_data_dir=tmp_path / "dataset" / "bottle")), 1, "--train_data_dir")
    assert_user_error(run(*args(resume_from_checkpoint="checkpoint-999")), 1, "checkpoint-999", "no such checkpoint")
    (tmp_path / "out" / "bottle" / "checkpoint-3").mkdir(parents=True)
    assert_user_error(run(*args()), 1, "checkpoint-3", "--resume_from_checkpoint latest")
    assert not (tmp_path / "out" / "bottle" / "run_config.json").exists()

    # the same through a real process: no traceback, exit 1
    assert_user_error(run_script("train_diffusion.py", *args(train_file=no_box)), 1, "boundbox.py")
