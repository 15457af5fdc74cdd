"""The report folder: report.md, metrics.json, iou.png (bar chart) and gallery.html (with its images
under gallery/, linked by relative paths so the page opens from disk)."""

import html
import io
import math
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .pipeline import SETTINGS
from .results import EvaluationResult

PUBLISHED = (
    "Published MVTec AD averages, each under its authors' own protocol (peers select the epoch on the test set): "
    "AnomalyDiffusion IS 1.80, IC-LPIPS 0.32, pixel AUROC 99.1, AP 81.4, F1-max 76.3; "
    "SeaS IS 1.88, IC-LPIPS 0.34, IoU 57.66; DRAEM IoU 60.30."
)
SEG_COLUMNS = (
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_ap", "pixel AP"),
    ("pixel_f1_max", "pixel F1-max"),
    ("iou", "IoU"),
    ("iou_val_threshold", "IoU (val. threshold)"),
    ("image_auroc", "image AUROC"),
    ("image_ap", "image AP"),
)


def _pct(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _num(value, digits):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def quality_section(name, quality):
    net_a, net_b = quality.lpips_net_a, quality.lpips_net_b
    rows = [
        [d, r["n"], f"{_num(r['is'], 2)} ± {_num(r['is_std'], 2)} ({r['is_splits']} split{'s' if r['is_splits'] > 1 else ''})", _num(r["ic_lpips_a"], 3), _num(r["ic_lpips_b"], 3)]
        for d, r in quality.per_defect.items()
    ]
    m = quality.mean
    rows.append(["**mean**", m["n"], f"**{_num(m['is'], 2)}**", f"**{_num(m['ic_lpips_a'], 3)}**", f"**{_num(m['ic_lpips_b'], 3)}**"])
    header = ["defect type", "generated", "IS", f"IC-LPIPS (a) AnomalyDiffusion, {net_a}", f"IC-LPIPS (b) DFMGAN/SeaS, {net_b}"]
    return f"**Generation quality** ({name})\n\n" + _table(header, rows)


def segmentation_section(name, seg, counts, image_size):
    n_test = sum(c["test"] for d, c in counts.items() if d != "good")
    n_good = counts["good"]["test"]
    rows = []
    for key, r in seg.settings.items():
        c = r.train_counts
        rows.append([f"({key}) {SETTINGS[key]}", c["real"] + c["added"]] + [_pct(r.metrics.get(k)) for k, _ in SEG_COLUMNS] + [r.selection["epoch"]])
    header = ["setting", "train pairs"] + [label for _, label in SEG_COLUMNS] + ["selected epoch"]
    text = (
        f"**Downstream segmentation** ({name}; test: {n_test} real held-out anomalies + {n_good} test/good; "
        f"pixel metrics at {image_size}x{image_size}; {seg.steps} steps per setting)\n\n" + _table(header, rows)
    )
    defects = sorted({d for r in seg.settings.values() for d in r.per_defect})
    if defects:
        keys = list(seg.settings)
        per = [[d, seg.settings[keys[0]].per_defect.get(d, {}).get("n", 0)] + [_pct(seg.settings[k].per_defect.get(d, {}).get("iou")) for k in keys] for d in defects]
        text += "\n\nIoU by defect type (its test anomalies with all test/good images):\n\n" + _table(["defect type", "test anomalies"] + [f"({k})" for k in keys], per)
    return text


def write_plot(path, classes):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, c in classes.items() if c.segmentation]
    keys = [k for k in SETTINGS if any(k in classes[n].segmentation.settings for n in names)]
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) * max(1, len(keys)) / 2), 3.6), dpi=110)
    width = 0.8 / max(1, len(keys))
    colours = {"a": "#8c8c8c", "b": "#d62728", "c": "#ff9896", "d": "#1f77b4"}
    for i, key in enumerate(keys):
        values = [100 * ((r.metrics.get("iou") if (r := classes[n].segmentation.settings.get(key)) else None) or 0.0) for n in names]
        xs = np.arange(len(names)) + (i - (len(keys) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label=f"({key}) {SETTINGS[key]}", color=colours[key])
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel("IoU at F1-max threshold (%)")
    ax.set_title("Downstream segmentation IoU per setting")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_gallery(path, classes):
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"><title>MvP-Diff evaluation gallery</title>',
        "<style>body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{padding:4px;border:1px solid #ccc;"
        "vertical-align:top;text-align:center}img{max-width:256px;display:block}.cap{font-size:12px;text-align:left;max-width:220px}</style>",
        "</head><body>",
        "<h1>MvP-Diff evaluation gallery</h1>",
        "<p>Per sample: the defect-free image it was made from, the generated image, its box (green) and its precise mask (red).</p>",
    ]
    for name, c in classes.items():
        entries = c.gallery or []
        parts.append(f"<h2>{html.escape(name)}</h2>")
        if not entries:
            parts.append("<p>No generated samples.</p>")
            continue
        parts.append("<table><tr><th>sample</th><th>defect-free</th><th>generated</th><th>box</th><th>precise mask</th></tr>")
        for e in entries:
            caption = f"{html.escape(e['defect_type'])}/{html.escape(e['name'])}<br>mask: {e['mask_area']} px"
            if e.get("prompt"):
                caption += f"<br><i>{html.escape(str(e['prompt']))}</i>"
            cells = [f'<td class="cap">{caption}</td>']
            for kind in ("good", "image", "box", "mask"):
                src = e.get(kind)
                cells.append(f'<td><img src="{html.escape(src)}" alt="{kind}" loading="lazy"></td>' if src else "<td>n/a</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    atomic_write_text(path, "\n".join(parts) + "\n")


def write_report(out, results: EvaluationResult):
    """Write every report file under `out`; returns the report.md path."""
    out = Path(out)
    classes, protocol = results.classes, results.protocol
    atomic_write_json(out / "metrics.json", results.to_json())
    has_seg = any(c.segmentation for c in classes.values())
    if has_seg:
        write_plot(out / "iou.png", classes)
    write_gallery(out / "gallery.html", classes)

    train = protocol["train"]
    lines = ["# MvP-Diff evaluation", ""]
    if protocol["random_weights_for_testing"]:
        lines += ["> **Random weights (test mode): IS and IC-LPIPS below come from untrained networks and mean nothing.**", ""]
    lines += [f"Command: `{protocol['command']}`", ""]
    if has_seg:
        lines += ["![IoU per setting](iou.png)", ""]
    lines += ["Samples with their boxes and masks: [gallery.html](gallery.html)", "", "## Results", ""]
    for name, c in classes.items():
        lines += [f"### {name}", ""]
        if c.quality:
            lines += [quality_section(name, c.quality), ""]
        if c.segmentation:
            lines += [segmentation_section(name, c.segmentation, c.counts, train["image_size"]), ""]
        if c.notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in c.notes] + [""]
    lines += [
        "## Protocol",
        "",
        f"- Split (per defect type, sorted by file name): the first {protocol['train_fraction']:.3g} may have trained the generator; "
        "the rest plus test/good is the test set, read once per setting after training, never for model selection.",
        f"- Validation, for model selection only: {protocol['val_fraction']:.3g} of the generator-train anomalies (at least one is kept "
        f"for training) and of train/good, chosen with seed {protocol['seed']}; the same for every setting. Peers select the epoch "
        "on the test set; we do not.",
        f"- Model: DRAEM's discriminative U-Net on the image alone (3 channels), base width {train['base_channels']}, focal loss (gamma 2), "
        f"Adam lr {train['lr']:g} (x0.2 at 80% and 90% of the steps), batch {train['batch_size']} = half train/good, half anomaly pairs, "
        f"{train['image_size']}x{train['image_size']}, {train['epochs']} epochs of ceil(train/good / {train['batch_size'] // 2}) steps "
        f"(same steps and seed {protocol['seed']} in every setting), validation every {train['val_every']} epoch(s), best validation pixel AP kept.",
        "- Metrics: all test pixels pooled; AUROC and AP as scikit-learn defines them; F1-max over all thresholds; IoU at the F1-max "
        "threshold (the field's number) and at the F1-max threshold of the validation set (an honest one); image score = max of the map.",
        f"- IS: torch-fidelity, Inception v3 logits, per defect-type folder, {protocol['isc_splits']} splits (fewer when under 10 images per split), "
        "class value = mean over defect types.",
        f"- IC-LPIPS at {protocol['lpips_size']}x{protocol['lpips_size']}: (a) AnomalyDiffusion: clusters = generator-train anomalies, nearest by "
        f"LPIPS ({protocol['lpips_nets']['a']}), {protocol['ic_cluster_size']} random per cluster, mean pairwise, NaN-mean over clusters; "
        f"(b) DFMGAN/SeaS: clusters = all real anomalies of the type, first {protocol['ic_cluster_cap']} per cluster, "
        f"clusters under two images count 0, mean ({protocol['lpips_nets']['b']}).",
        f"- {PUBLISHED}",
        "",
        "Real data per class (anomalies):",
        "",
    ]
    for name, c in classes.items():
        rows = [[d, v.get("generator_train", ""), v["downstream_train"], v["validation"], v["test"]] for d, v in c.counts.items()]
        lines += [f"{name}:", "", _table(["defect type", "generator-train", "downstream train", "validation", "test"], rows), ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in results.versions.items()), ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
