"""Evaluation: metric arithmetic, IS and IC-LPIPS on constructed inputs, the split, model selection
that never sees the test set, the DRAEM-style generator, the generated-folder reader, and an
end-to-end evaluate.py run on the demo data."""

import json
import math
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_user_error, run_script
from PIL import Image
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from mvp_diff.dataset import split_anomalies
from mvp_diff.draem import draem_anomaly, perlin_mask, write_draem_samples
from mvp_diff.errors import UserError
from mvp_diff.evaluation import metrics, pipeline, quality, segmentation
from mvp_diff.evaluation.classification import classification_accuracy
from mvp_diff.evaluation.data import generated_class_dir, load_generated, real_split
from mvp_diff.evaluation.standin import build_standin
from mvp_diff.files import read_mask, read_rgb
from mvp_diff.records import BoxParams, build_records, compute_boxes

TINY = ["--image_size", "64", "--base_channels", "8", "--lpips_size", "64", "--gallery_n", "4", "--classify_epochs", "2"]

@pytest.fixture(scope="module")
def standin(demo_dataset_master, tmp_path_factory):
    """Stage 3 stand-in in its layout: real generator-train defects pasted onto other good images."""
    root = tmp_path_factory.mktemp("generated")
    for classname in ("bottle", "grid"):
        build_standin(demo_dataset_master, classname, root, num=4)
    return root


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_hand_computed():
    scores = np.array([0.9, 0.8, 0.7, 0.1])
    labels = np.array([1, 0, 1, 0], bool)
    assert metrics.auroc(scores, labels) == pytest.approx(0.75)
    assert metrics.average_precision(scores, labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    f1, threshold, iou = metrics.f1_max(scores, labels)
    assert (f1, threshold, iou) == pytest.approx((0.8, 0.7, 2 / 3))  # P 2/3, R 1 at >= 0.7
    assert metrics.iou_at(scores, labels, 0.85) == pytest.approx(1 / 2)
    assert math.isnan(metrics.auroc(scores, np.zeros(4, bool))) and math.isnan(metrics.average_precision(scores, np.zeros(4, bool)))
    assert math.isnan(metrics.auroc(scores, np.ones(4, bool)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    maps = np.round(rng.random((5, 9, 7)), 2).astype(np.float32)  # rounded: many ties
    masks = rng.random((5, 9, 7)) < 0.2
    masks[4] = False  # a defect-free image
    out = metrics.segmentation_metrics(maps, masks, val_threshold=0.5)
    y, s = masks.ravel(), maps.ravel()
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(y, s))
    assert out["pixel_ap"] == pytest.approx(average_precision_score(y, s))
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    assert out["pixel_f1_max"] == pytest.approx(f1.max())
    pred = s >= out["threshold"]
    assert out["iou"] == pytest.approx((pred & y).sum() / (pred | y).sum())
    assert out["iou_val_threshold"] == pytest.approx(((s >= 0.5) & y).sum() / ((s >= 0.5) | y).sum())
    labels = masks.reshape(5, -1).any(1)
    image_scores = maps.reshape(5, -1).max(1)
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, image_scores))
    assert out["image_ap"] == pytest.approx(average_precision_score(labels, image_scores))


# --- IS and IC-LPIPS -----------------------------------------------------------------------------

COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10)]


def _colour_extractor(uniform):
    class ColourClasses(quality.logits_extractor_base()):
        """Logits 100 x one-hot of the image's colour (or all zero: uniform predictions)."""

        def forward(self, x):
            mean = x.float().mean(dim=(2, 3))  # N x 3
            ref = torch.tensor(COLOURS, dtype=torch.float32)
            cls = torch.cdist(mean, ref).argmin(1)
            logits = torch.zeros(len(x), 1008)
            if not uniform:
                logits[torch.arange(len(x)), cls] = 100.0
            return (logits,)

    return ColourClasses


def test_inception_score_arithmetic(tmp_path):
    files = []
    for i in range(20):
        path = tmp_path / f"{i:03d}.png"
        side = 20 if i == 5 else 16  # one odd size: batched all the same
        Image.fromarray(np.full((side, side, 3), COLOURS[i % 4], np.uint8)).save(path)
        files.append(path)
    quality.register_extractor("test-colour-onehot", _colour_extractor(False))
    quality.register_extractor("test-colour-uniform", _colour_extractor(True))
    is_k, _, _ = quality.inception_score(files, splits=1, extractor="test-colour-onehot")
    assert is_k == pytest.approx(4.0, rel=1e-6)  # one-hot, evenly over K = 4 classes
    is_one, _, _ = quality.inception_score(files, splits=1, extractor="test-colour-uniform")
    assert is_one == pytest.approx(1.0)
    is_single, _, _ = quality.inception_score(files[::4], splits=1, extractor="test-colour-onehot")
    assert is_single == pytest.approx(1.0)  # one class only
    assert quality.isc_splits_for(1000) == 10 and quality.isc_splits_for(55) == 5 and quality.isc_splits_for(4) == 1
    value, _, used = quality.inception_score(files, testing=True)  # the random stand-in runs through torch-fidelity
    assert used == 2 and value >= 1.0


def _const_images(values):
    return torch.tensor(values, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 4, 4).contiguous()


def _abs_distances(xs, ys):
    return (xs.float().mean(dim=(1, 2, 3))[:, None] - ys.float().mean(dim=(1, 2, 3))[None, :]).abs().numpy()


def test_ic_lpips_arithmetic():
    real = _const_images([0, 10])
    gen = _const_images([1, 2, 4, 9])  # 1, 2, 4 join real 0; 9 joins real 10
    score_a, values_a, sizes_a = quality.ic_lpips_ojha(_abs_distances, gen, real, np.random.default_rng(0))
    assert sizes_a == [3, 1]
    assert values_a[0] == pytest.approx((1 + 3 + 2) / 3) and math.isnan(values_a[1])
    assert score_a == pytest.approx(2.0)  # NaN-mean over clusters
    score_b, values_b, sizes_b = quality.ic_lpips_dfmgan(_abs_distances, gen, real)
    assert values_b == pytest.approx([2.0, 0.0]) and score_b == pytest.approx(1.0)  # lone member counts 0
    capped, _, _ = quality.ic_lpips_dfmgan(_abs_distances, gen, real, cap=2)
    assert capped == pytest.approx((1 + 0) / 2)  # first two members: 1 and 2
    sampled, _, _ = quality.ic_lpips_ojha(_abs_distances, gen, real, np.random.default_rng(0), cluster_size=1)
    assert math.isnan(sampled)  # every cluster under two members


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matrix_equals_lpips_and_identical_images_score_zero(net):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (5, 3, 64, 64), dtype=np.uint8))
    model = quality.load_lpips(net, testing=True)
    matrix = quality.LpipsMatrix(model, batch_size=2, budget_mb=1)(images[:3], images)  # tiny budget: several chunks
    with torch.no_grad():
        scaled = images.float() / 127.5 - 1
        direct = np.array([[model(scaled[i : i + 1], scaled[j : j + 1]).item() for j in range(5)] for i in range(3)])
    assert np.allclose(matrix, direct, rtol=1e-4, atol=1e-5)
    assert np.allclose(np.diag(matrix[:, :3]), 0, atol=1e-5) and matrix[0, 1] > 0

    distances = quality.LpipsMatrix(model)
    gen = images[:1].expand(5, -1, -1, -1).contiguous()  # five identical generated images
    assert quality.ic_lpips_ojha(distances, gen, images[:2], rng)[0] == pytest.approx(0.0, abs=1e-5)
    assert quality.ic_lpips_dfmgan(distances, gen, images[:2])[0] == pytest.approx(0.0, abs=1e-5)


def test_missing_weights_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    missing = " ".join(quality.missing_weights(True, ["alex", "vgg"]))
    for name in ("weights-inception-2015-12-05-6726825d.pth", "alexnet-owt-7be5be79.pth", "vgg16-397923af.pth"):
        assert str(tmp_path / "torch" / "hub" / "checkpoints" / name) in missing
    with pytest.raises(UserError, match="fetching is off"):
        quality.load_lpips("alex", offline=True)


def test_missing_weights_are_fetched_into_the_torch_hub_cache(tmp_path, monkeypatch):
    """Online, a missing trunk is downloaded where torchvision looks (served here from a file:// URL, so
    no network is needed); a failed download is one error naming the file and its URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = tmp_path / "served" / "alexnet-owt-7be5be79.pth"
    source.parent.mkdir()
    torch.save({"features.0.weight": torch.zeros(1)}, source)
    monkeypatch.setitem(quality.LPIPS_TRUNKS, "alex", (source.name, source.as_uri()))
    quality.require_weights(need_is=False, lpips_nets=["alex"])
    fetched = tmp_path / "torch" / "hub" / "checkpoints" / source.name
    assert fetched.read_bytes() == source.read_bytes()

    gone = (tmp_path / "served" / "vgg16-397923af.pth").as_uri()
    monkeypatch.setitem(quality.LPIPS_TRUNKS, "vgg", ("vgg16-397923af.pth", gone))
    with pytest.raises(UserError, match="could not download") as err:
        quality.require_weights(need_is=False, lpips_nets=["alex", "vgg"])
    assert gone in str(err.value) and "alexnet" not in str(err.value) and "\n" not in str(err.value)


def test_weights_missing_offline_is_one_line_error(demo_dataset_master, standin, tmp_path):
    proc = run_script(
        "evaluate.py", "--classname", "bottle", "--dataset", demo_dataset_master, "--generated", standin, "--out", tmp_path / "out",
        env={"TORCH_HOME": str(tmp_path / "torch")},
    )  # fmt: skip
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    assert_user_error(proc, 1, str(hub / "weights-inception-2015-12-05-6726825d.pth"), "alexnet-owt-7be5be79.pth", "vgg16-397923af.pth", "resnet34-b627a593.pth")
    assert not (tmp_path / "out").exists()  # failed before any work


def test_bad_input_is_a_one_line_error(demo_dataset_master, tmp_path):
    base = ["--classname", "bottle", "--dataset", demo_dataset_master, "--out", tmp_path / "out"]
    proc = run_script("evaluate.py", *base, "--image_size", "100")
    assert_user_error(proc, 2, "--image_size must be a multiple of 32")
    proc = run_script("evaluate.py", *base, "--generated", tmp_path / "nowhere", "--random_weights_for_testing")
    assert_user_error(proc, 1, f"--generated {tmp_path / 'nowhere'}: folder not found")
    proc = run_script("evaluate.py", *base, "--settings", "a,x")
    assert_user_error(proc, 2, "--settings: unknown x")
    assert_user_error(run_script("evaluate.py", *base, "--lpips_size", "16"), 2, "--lpips_size")
    assert_user_error(run_script("evaluate.py", *base[2:], "--classname", ","), 2, "--classname")


def test_generated_folder_of_another_class_is_refused(standin, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(standin / "bottle", gen / "bottle")
    with pytest.raises(UserError, match="holds bottle samples, not grid"):
        generated_class_dir(gen / "bottle", "grid")
    assert generated_class_dir(gen / "bottle", "bottle") == gen / "bottle"


def test_metrics_accept_integer_and_bool_scores():
    labels = np.array([0, 1, 0, 1])
    assert metrics.auroc(np.uint8([0, 255, 10, 200]), labels) == pytest.approx(1.0)
    assert metrics.auroc(np.array([False, True, False, True]), labels) == pytest.approx(1.0)


# --- split and model selection -------------------------------------------------------------------


def test_split_keeps_generator_training_anomalies_out_of_the_test_set(demo_dataset_master):
    for classname in ("bottle", "grid"):
        split = real_split(demo_dataset_master, classname)
        data = split.class_data
        boxes, _ = compute_boxes(data, BoxParams(), progress=False)
        train_records, test_records = build_records(data, boxes)  # Stage 1's own split
        stage1_train = {(data.dataset_root / r["image"]).resolve() for r in train_records}
        stage1_test = {(data.dataset_root / r["image"]).resolve() for r in test_records}
        test = {s.image.resolve() for s in split.test_set()}
        assert stage1_train and not (stage1_train & test)
        assert test == stage1_test | {p.resolve() for p in data.test_good}
        for defect, anomalies in data.anomalies.items():
            first, rest = split_anomalies(anomalies)
            assert [s.image for s in split.generator_train[defect]] == [a.image for a in first]
            train = {s.image for s in split.train_anomalies[defect]}
            val = {s.image for s in split.val_anomalies[defect]}
            assert train and val and not (train & val) and train | val == {a.image for a in first}
        goods = {s.image for s in split.train_good} | {s.image for s in split.val_good}
        assert goods == set(data.train_good) and not ({s.image for s in split.train_good} & {s.image for s in split.val_good})


def test_split_notes_defect_types_without_test_anomalies(tmp_path, demo_dataset_master):
    root = tmp_path / "dataset"
    shutil.copytree(demo_dataset_master / "grid", root / "grid")
    for i in range(1, 6):  # keep one `thread` anomaly: it all goes to the generator-train third
        (root / "grid" / "test" / "thread" / f"{i:03d}.png").unlink()
        (root / "grid" / "ground_truth" / "thread" / f"{i:03d}_mask.png").unlink()
    split = real_split(root, "grid")
    assert split.test_anomalies["thread"] == [] and len(split.test_anomalies["broken"]) == 4
    assert any("thread: no real anomalies left for the test split" in n for n in split.notes)


def test_model_selection_never_reads_the_test_set(demo_dataset_master, standin, tmp_path, monkeypatch):
    split = real_split(demo_dataset_master, "grid")
    test_files = {s.image.resolve() for s in split.test_set()}
    state = {"training": False, "test_reads_in_training": [], "train_reads": 0, "test_predictions": [], "trained": 0}

    original_load, original_train, original_predict = segmentation.load_pair, pipeline.train_model, segmentation.predict

    def load_pair(sample, size, use_box=False):
        if sample.image.resolve() in test_files:
            if state["training"]:
                state["test_reads_in_training"].append(sample.image)
        elif state["training"] is False:
            state["train_reads"] += 1
        return original_load(sample, size, use_box)

    def train_model(good_set, anomaly_set, val_set, cfg, desc="train", after_epoch=None):
        assert after_epoch is None  # our protocol never scores the test set during training
        for dataset in (good_set, anomaly_set, val_set):
            leaked = [s.image for s, _ in dataset.items if s.image.resolve() in test_files]
            assert not leaked, f"test images handed to training/selection: {leaked}"
        state["training"] = True
        try:
            model, selection = original_train(good_set, anomaly_set, val_set, cfg, desc, after_epoch)
        finally:
            state["training"] = False
        state["trained"] += 1
        best = max(h["val_pixel_ap"] for h in selection["history"])
        assert selection["val_pixel_ap"] == best and len(selection["history"]) == cfg.epochs
        return model, selection

    def predict(model, dataset, cfg, desc="predict"):
        if any(s.image.resolve() in test_files for s, _ in dataset.items):
            assert not state["training"], "test set scored during training"
            state["test_predictions"].append(state["trained"])
        return original_predict(model, dataset, cfg, desc)

    monkeypatch.setattr(segmentation, "load_pair", load_pair)
    monkeypatch.setattr(pipeline, "train_model", train_model)
    monkeypatch.setattr(segmentation, "predict", predict)
    cfg = pipeline.EvalConfig(
        classnames=["grid"], dataset=str(demo_dataset_master), generated=str(standin), out=str(tmp_path / "out"),
        parts=("segmentation",), train=segmentation.TrainConfig(image_size=64, epochs=3, base_channels=8), testing=True,
    )  # fmt: skip
    results = pipeline.evaluate(cfg)
    settings = results.classes["grid"].segmentation.settings
    assert list(settings) == ["a", "b:ours", "c:ours", "d"]
    assert state["test_reads_in_training"] == [] and state["train_reads"] > 0
    assert state["test_predictions"] == [1, 2, 3, 4]  # once per setting, each after its training
    steps = {r.selection["steps"] for r in settings.values()}
    assert steps == {3 * 2}  # same budget: ceil(7 train/good / 4) steps x 3 epochs in every setting


def test_half_half_batches():
    sampler = segmentation.HalfHalfBatchSampler(n_good=3, n_anomaly=5, half=2, steps=6, seed=0)
    batches = list(sampler)
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)
    assert all(i < 3 for b in batches for i in b[:2]) and all(3 <= i < 8 for b in batches for i in b[2:])
    other = list(segmentation.HalfHalfBatchSampler(n_good=3, n_anomaly=9, half=2, steps=6, seed=0))
    assert [b[:2] for b in batches] == [b[:2] for b in other]  # the good stream does not depend on the pool


def test_unet_shapes_and_focal_loss():
    net = segmentation.DiscriminativeUNet(3, 2, base_channels=4)
    logits = net(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 2, 64, 64)
    target = torch.zeros(1, 1, 2, 2)
    confident = torch.tensor([[[[9.0]], [[-9.0]]]]).expand(1, 2, 2, 2)
    assert segmentation.focal_loss(confident, target) < 1e-6 < segmentation.focal_loss(-confident, target)


# --- DRAEM-style generator -----------------------------------------------------------------------


@pytest.mark.parametrize("grey", [False, True])
def test_draem_mask_matches_blended_pixels(grey):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (96, 80, 3), dtype=np.uint8)
    if grey:
        image[:] = image[..., :1]
    texture = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    for _ in range(5):
        out, mask = draem_anomaly(image, texture, rng)
        changed = (out != image).any(axis=2)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.sum() >= 16 and np.array_equal(mask, changed)
        if grey:
            assert (out[..., 0] == out[..., 2]).all()
    masks = [perlin_mask((64, 64), np.random.default_rng(s)) for s in range(2)]
    assert not np.array_equal(masks[0], masks[1])


def test_draem_synthesize_layout_and_resume(demo_dataset_master, tmp_path):
    goods = sorted((demo_dataset_master / "grid" / "train" / "good").glob("*.png"))[:3]
    folder = tmp_path / "grid"
    records = write_draem_samples(goods, folder, 4, seed=1, progress=False)
    def files():  # the class folder holds the MVTec pairs only; box masks are beside it
        return {p: p.read_bytes() for p in [*folder.rglob("*.png"), *(tmp_path / "grid_boxes").rglob("*.png")]}

    digest = files()
    assert len(digest) == 12 and len(list(folder.rglob("*.png"))) == 8
    for r in records:
        image = read_rgb(folder / r.image)
        mask = read_mask(folder / r.mask)
        box = read_mask(folder / r.box_mask)
        good = read_rgb(r.good_image)
        assert np.array_equal(mask, (image != good).any(axis=2)) and r.mask_area == mask.sum()
        assert not (mask & ~box).any()
        assert Image.open(folder / r.image).mode == "L"  # grid stays grey
    (folder / records[2].image).unlink()
    write_draem_samples(goods, folder, 4, seed=1, progress=False)  # resume: the same sample again
    assert files() == digest
    _, samples, _ = load_generated(tmp_path, "grid", dataset=demo_dataset_master)
    assert [s.good_image for s in samples["draem"]] == [Path(r.good_image) for r in records]


# --- generated-folder reader ---------------------------------------------------------------------


def test_reader_is_tolerant_and_strict(standin, demo_dataset_master, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(standin / "bottle", gen / "bottle")
    shutil.copytree(standin / "bottle_boxes", gen / "bottle_boxes")
    folder, samples, _ = load_generated(gen, "bottle", dataset=demo_dataset_master)
    assert sorted(samples) == ["broken_large", "contamination"] and all(len(v) == 4 for v in samples.values())
    s = samples["broken_large"][0]
    assert s.box_mask is not None and s.good_image is not None and s.prompt
    assert load_generated(gen / "bottle", "bottle")[0] == folder  # the class folder itself works too

    (gen / "bottle" / "manifest.jsonl").unlink()
    shutil.rmtree(gen / "bottle_boxes")
    _, bare, _ = load_generated(gen, "bottle")
    assert all(x.box_mask is None and x.good_image is None and not x.boxes for v in bare.values() for x in v)

    mask = gen / "bottle" / "ground_truth" / "contamination" / "001_mask.png"
    Image.open(mask).resize((32, 32)).save(mask)
    with pytest.raises(UserError, match=r"001\.png is \(256, 256\) but .*001_mask\.png is \(32, 32\)"):
        load_generated(gen, "bottle")
    mask.unlink()
    with pytest.raises(UserError, match=r"contamination/001\.png: no mask .*001_mask"):
        load_generated(gen, "bottle")
    shutil.rmtree(gen / "bottle" / "test" / "contamination")
    (gen / "bottle" / "test" / "contamination").mkdir()
    with pytest.raises(UserError, match=r"test/contamination: no generated images"):
        load_generated(gen, "bottle")
    with pytest.raises(UserError, match="no grid/test/ folder"):
        load_generated(gen, "grid")


# --- end to end ----------------------------------------------------------------------------------


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_evaluate_end_to_end(demo_dataset_master, standin, tmp_path):
    gen = tmp_path / "gen"
    shutil.copytree(standin, gen)
    shutil.rmtree(gen / "grid_boxes")  # grid: no box files, boxes from the manifest
    out = tmp_path / "report"
    args = ["--classname", "bottle,grid", "--dataset", demo_dataset_master, "--generated", gen, "--out", out,
            "--epochs", "2", "--random_weights_for_testing", *TINY]  # fmt: skip
    proc = run_script("evaluate.py", *args, check=True)
    assert "report ->" in proc.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"]["random_weights_for_testing"] is True
    for classname in ("bottle", "grid"):
        c = metrics["classes"][classname]
        assert list(c["segmentation"]["settings"]) == ["a", "b:ours", "c:ours", "d"]
        for r in c["segmentation"]["settings"].values():
            assert 0 <= r["metrics"]["pixel_auroc"] <= 1 and 0 <= r["metrics"]["aupro"] <= 1 and 0 <= r["metrics"]["iou_per_image"] <= 1
            assert set(r["per_defect"]) == set(c["generated_counts"]["ours"])
            assert "aupro" in next(iter(r["per_defect"].values()))  # every metric per defect type too
        assert c["quality"]["ours"]["mean"]["is"] >= 1 and c["quality"]["ours"]["mean"]["ic_lpips_dfmgan"] >= 0
        assert c["counts"]["good"]["test"] == 4
    assert any("box mask(s) drawn from the boxes in manifest.jsonl" in n for n in metrics["classes"]["grid"]["notes"])

    report = (out / "report.md").read_text()
    assert "Random weights (test mode)" in report and "| metric | (a) real train-split anomalies only, validation pixel AP | (b) ours" in report
    assert "## Mean over 2 classes [mvpdiff]" in report and "protocol mvpdiff" in report and "first ceil(n x 0.333)" in report
    for variant in ("Ojha et al.", "DFMGAN", "SeaS"):
        assert f"IC-LPIPS ({variant})" in report
    assert "--epochs 2 (protocol: 100)" in report  # budget flags are named as overrides
    assert metrics["mean"]["segmentation"]["a"]["pixel_auroc"] == pytest.approx(
        np.mean([metrics["classes"][c]["segmentation"]["settings"]["a"]["metrics"]["pixel_auroc"] for c in ("bottle", "grid")])
    )
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    parser = _Images()
    parser.feed((out / "gallery.html").read_text())
    assert len(parser.srcs) == 2 * 4 * 4  # 2 classes x 4 samples x (good, generated, box, mask)
    for src in parser.srcs:
        assert not Path(src).is_absolute() and ".." not in src and (out / src).is_file(), src

    # Rerun: every result comes from the cache. A deterministic recompute would give the same metrics,
    # so what proves reuse is that no cached file was written again (same inode and mtime).
    first = (out / "metrics.json").read_text()
    # (The DRAEM-style samples' manifest.jsonl is rewritten by their own resume, which keeps the samples.)
    stamps = lambda: {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "work").rglob("*") if p.is_file() and p.name != "manifest.jsonl"}  # noqa: E731
    before = stamps()
    assert len(before) >= 2 * 4, sorted(before)  # results of both classes' settings are cached
    proc = run_script("evaluate.py", *args, check=True)
    assert "bottle (a)" not in proc.stderr and (out / "metrics.json").read_text() == first
    assert stamps() == before


# --- protocols -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seven_per_type(demo_dataset_master, tmp_path_factory):
    """The demo grid class with 7 anomalies per defect type, so floor(7/3) = 2 and ceil(7/3) = 3 differ."""
    root = tmp_path_factory.mktemp("seven") / "dataset"
    shutil.copytree(demo_dataset_master / "grid", root / "grid")
    for defect in ("broken", "thread"):
        assert len(list((root / "grid" / "test" / defect).glob("*.png"))) == 6
        shutil.copy(root / "grid" / "test" / defect / "005.png", root / "grid" / "test" / defect / "006.png")
        shutil.copy(root / "grid" / "ground_truth" / defect / "005_mask.png", root / "grid" / "ground_truth" / defect / "006_mask.png")
    return root


def test_split_rounding_per_protocol(seven_per_type):
    names = [f"{i:03d}.png" for i in range(7)]
    for rounding, n_first in (("ceil", 3), ("floor", 2)):
        split = real_split(seven_per_type, "grid", rounding=rounding)
        for defect in ("broken", "thread"):
            assert [s.image.name for s in split.generator_train[defect]] == names[:n_first]  # sorted by file name
            assert [s.image.name for s in split.test_anomalies[defect]] == names[n_first:]
    assert pipeline.PROTOCOLS["mvpdiff"].split_rounding == "ceil"
    assert pipeline.PROTOCOLS["anomalydiffusion"].split_rounding == pipeline.PROTOCOLS["seas"].split_rounding == "floor"


def test_draem_unet_and_init_match_the_reference():
    assert sum(p.numel() for p in segmentation.DiscriminativeUNet(3, 2, 64, "draem").parameters()) == 28_372_418  # DRAEM's 28.4 M
    assert sum(p.numel() for p in segmentation.DiscriminativeUNet(3, 2, 64, "wide").parameters()) == 36_892_034
    net = segmentation.DiscriminativeUNet(3, 2, 16, "draem")
    assert net(torch.rand(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    net.apply(segmentation.draem_init)
    conv = torch.cat([m.weight.flatten() for m in net.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(conv.mean().item()) < 1e-3 and conv.std().item() == pytest.approx(0.02, rel=0.05)


def test_image_score_pooling_matches_a_direct_average():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 32, 32)).astype(np.float32)
    maps[1, 5, 7] = 50.0  # one hot pixel: the raw max sees it, a 21x21 mean dilutes it
    padded = np.pad(maps, ((0, 0), (10, 10), (10, 10)))
    direct = [max(padded[i, y : y + 21, x : x + 21].sum() / 441 for y in range(32) for x in range(32)) for i in range(3)]
    assert segmentation.image_scores(maps, 21) == pytest.approx(direct, rel=1e-5)
    assert segmentation.image_scores(maps, 1) == pytest.approx(maps.reshape(3, -1).max(1))


def test_budget_flags_are_overrides():
    protocol, changed = pipeline.PROTOCOLS["anomalydiffusion"].with_budget(epochs=2, image_size=256, base_channels=None)
    assert changed == {"epochs": (200, 2)} and protocol.epochs == 2 and protocol.steps_per_epoch == 63


def test_seas_protocol_floor_split_and_data_mix(seven_per_type, tmp_path):
    gen = tmp_path / "gen"
    build_standin(seven_per_type, "grid", gen, num=3)
    out = tmp_path / "report"
    run_script("evaluate.py", "--protocol", "seas", "--classname", "grid", "--dataset", seven_per_type, "--generated", gen,
               "--out", out, "--epochs", "1", "--parts", "segmentation", *TINY, check=True)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    c = metrics["classes"]["grid"]
    assert {d: v["generator_train"] for d, v in c["counts"].items() if d != "good"} == {"broken": 2, "thread": 2}
    assert {d: v["test"] for d, v in c["counts"].items() if d != "good"} == {"broken": 5, "thread": 5}
    (key, r), = c["segmentation"]["settings"].items()
    assert key == "s:ours" and r["train_counts"] == {"good": 10, "real": 4, "added": 6}  # all train/good: no validation carved
    assert r["selection"]["selected_on"] == "last epoch" and 0 <= r["metrics"]["iou_per_image"] <= 1
    assert any("2 test anomalies may have been seen" in n for n in c["notes"])
    report = (out / "report.md").read_text()
    assert "protocol `seas`" in report and "first floor(n x 0.333)" in report
    published = report[report.index("### Published numbers under protocol `seas`"):]
    assert "SeaS (its paper" in published and "57.7" in published and "AnomalyDiffusion (its paper" not in published


def _anomalydiffusion_layout(standin_root, dest):
    """Re-save stand-in samples in AnomalyDiffusion's released layout: CLASS/DEFECT/image/N.jpg and
    CLASS/DEFECT/mask/N.jpg, JPEG masks."""
    for class_dir in standin_root.iterdir():
        for image in sorted(class_dir.glob("test/*/*.png")):
            defect = image.parent.name
            mask = class_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
            for kind, src, mode in (("image", image, "RGB"), ("mask", mask, "L")):
                path = dest / class_dir.name / defect / kind / f"{int(image.stem)}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.open(src).convert(mode).save(path, quality=90)


def test_anomalydiffusion_protocol_two_generators_all_classes(demo_dataset_master, standin, tmp_path):
    released = tmp_path / "released"
    _anomalydiffusion_layout(standin, released)
    _, samples, _ = load_generated(released, "bottle")
    jpeg_mask = samples["contamination"][0].mask
    png_mask = read_mask(standin / "bottle" / "ground_truth" / "contamination" / "000_mask.png")
    assert jpeg_mask.suffix == ".jpg" and (read_mask(jpeg_mask) != png_mask).mean() < 0.01  # JPEG noise cut at half

    out = tmp_path / "report"
    run_script("evaluate.py", "--protocol", "anomalydiffusion", "--classname", "all", "--dataset", demo_dataset_master,
               "--generated", f"ours={standin}", "--generated", f"anomalydiffusion={released}", "--out", out,
               "--epochs", "1", "--random_weights_for_testing", *TINY, check=True)  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["classes"]) == ["bottle", "grid"] and metrics["mean"]["classes"] == 2
    for c in metrics["classes"].values():
        assert list(c["segmentation"]["settings"]) == ["g:ours", "g:anomalydiffusion"] and set(c["quality"]) == {"ours", "anomalydiffusion"}
        for r in c["segmentation"]["settings"].values():
            assert r["train_counts"]["real"] == 0 and r["train_counts"]["added"] == sum(c["generated_counts"]["ours"].values())  # generated only
            assert r["selection"]["steps"] == 63 and r["selection"]["peer_selected"]["epoch"] == 1
    for c in metrics["classes"].values():
        for r in c["classification"].values():
            assert 0 <= r["accuracy"] <= 1 and r["n_test"] == sum(v["test"] for d, v in c["counts"].items() if d != "good")
    report = (out / "report.md").read_text()
    assert "defect-type accuracy (ResNet-34, AnomalyDiffusion)" in report
    assert "## Mean over 2 classes [anomalydiffusion]" in report and "| metric | (g) ours | (g) anomalydiffusion |" in report
    assert "epoch chosen on the TEST set" in report and "| metric | ours | anomalydiffusion |" in report
    published = report[report.index("### Published numbers under protocol `anomalydiffusion`"):]
    assert "99.1" in published and "SeaS (its paper" not in published


def test_defect_type_classifier_learns_separable_types(tmp_path):
    files = {}
    for k, defect in enumerate(("red", "blue")):
        files[defect] = []
        for i in range(10):
            path = tmp_path / defect / f"{i:03d}.png"
            path.parent.mkdir(exist_ok=True)
            colour = np.array(COLOURS[2 * k], np.uint8) + np.random.default_rng(i).integers(0, 5, 3, dtype=np.uint8)
            Image.fromarray(np.full((32, 32, 3), colour, np.uint8)).save(path)
            files[defect].append(path)
    train = {d: v[:6] for d, v in files.items()}
    test = {d: v[6:] for d, v in files.items()}
    result = classification_accuracy(train, test, epochs=8, size=32, testing=True)
    assert result["types"] == ["blue", "red"] and result["n_test"] == 8
    assert result["accuracy"] >= 0.75  # chance: 0.5; the colours separate the types
    assert result["accuracy"] == pytest.approx(np.mean(list(result["per_type"].values())))  # 4 test images per type
    assert math.isnan(classification_accuracy({"red": train["red"]}, test, testing=True)["accuracy"])  # one type: nothing to tell apart
