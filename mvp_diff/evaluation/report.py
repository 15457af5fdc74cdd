"""The report folder: report.md (every table names its protocol), metrics.json, plot.png (bar chart
of the protocol's headline metric) and gallery.html (with its images under gallery/, linked by
relative paths so the page opens from disk)."""

import html
import io
import math
from pathlib import Path

import numpy as np

from ..files import atomic_write_bytes, atomic_write_json, atomic_write_text
from .pipeline import DOWNSTREAM_SETTINGS
from .protocols import PUBLISHED_QUALITY
from .quality import IC_LPIPS_KEYS, IC_LPIPS_SOURCES, SEAS_CLUSTER_CAP, SEAS_IMAGES
from .results import EvaluationResult

METRIC_LABELS = {
    "pixel_auroc": "pixel AUROC",
    "pixel_ap": "pixel AP",
    "pixel_f1_max": "pixel F1-max",
    "pixel_f1_max_21": "pixel F1-max (21 thr.)",
    "aupro": "AUPRO (FPR 0.3)",
    "iou_per_image": "IoU per image (SeaS/LFD)",
    "iou_val_threshold": "IoU (val. threshold)",
    "image_auroc": "image AUROC",
    "image_ap": "image AP",
    "image_f1_max": "image F1-max",
}
QUALITY_LABELS = {"is": "IS (256 px)"} | {key: f"IC-LPIPS ({IC_LPIPS_SOURCES[v]})" for v, key in IC_LPIPS_KEYS.items()}


def _missing(value):
    return value is None or (isinstance(value, float) and math.isnan(value))


def _pct(value):
    return "n/a" if _missing(value) else f"{100 * value:.1f}"


def _num(value, digits):
    return "n/a" if _missing(value) else f"{value:.{digits}f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def setting_label(key):
    setting, _, generator = key.partition(":")
    return f"({setting}) {generator}" if generator else f"({setting}) {DOWNSTREAM_SETTINGS[setting]}"


def segmentation_table(metrics, settings):
    """Rows = the protocol's metrics, a column per setting (one per generator); where the peer selects
    on the test set, its number sits in a labelled column beside the honest one."""
    columns = []
    for key, r in settings.items():
        columns.append((setting_label(key) + f", {r.selection['selected_on']}", r.metrics))
        peer = r.selection.get("peer_selected")
        if peer:
            columns.append((setting_label(key) + f", epoch chosen on the TEST set ({peer['rule']})", peer["metrics"]))
    rows = [[METRIC_LABELS.get(m, m)] + [_pct(values.get(m)) for _, values in columns] for m in metrics]
    return _table(["metric"] + [label for label, _ in columns], rows)


def per_defect_table(metrics, settings):
    rows = []
    for defect in sorted({d for r in settings.values() for d in r.per_defect}):
        for key, r in settings.items():
            row = r.per_defect.get(defect)
            if row:
                rows.append([defect, setting_label(key), row["n"]] + [_pct(row.get(m)) for m in metrics])
    return _table(["defect type", "setting", "test anomalies"] + [METRIC_LABELS.get(m, m) for m in metrics], rows)


CLASSIFICATION_LABEL = "defect-type accuracy (ResNet-34, AnomalyDiffusion)"


def quality_table(quality, classification):
    """Rows = quality metrics, a column per generator (class means over defect types)."""
    names = list(quality or classification)
    means = {g: dict((quality or {})[g].mean if quality else {}) for g in names}
    for g, r in (classification or {}).items():
        means[g]["classification_accuracy"] = r["accuracy"]
    rows = [["generated images"] + [means[g].get("n", "") for g in names]]
    rows += [[label] + [_num(means[g].get(key), 2 if key == "is" else 3) for g in names] for key, label in QUALITY_LABELS.items()]
    if classification:
        rows.append([CLASSIFICATION_LABEL] + [_pct(means[g].get("classification_accuracy")) for g in names])
    return _table(["metric"] + names, rows)


def quality_per_defect(quality):
    rows = [
        [g, d, r["n"], f"{_num(r['is'], 2)} ± {_num(r['is_std'], 2)} ({r['is_splits']} split{'s' if r['is_splits'] > 1 else ''})"]
        + [_num(r.get(key), 3) for key in IC_LPIPS_KEYS.values()]
        for g, q in quality.items()
        for d, r in q.per_defect.items()
    ]
    return _table(["generator", "defect type", "generated", "IS (256 px)"] + [QUALITY_LABELS[k] for k in IC_LPIPS_KEYS.values()], rows)


def write_plot(path, classes, metric, protocol_name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, c in classes.items() if c.segmentation]
    keys = list(dict.fromkeys(k for n in names for k in classes[n].segmentation.settings))
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(names) * max(1, len(keys)) / 2), 3.6), dpi=110)
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        values = [100 * ((r.metrics.get(metric) if (r := classes[n].segmentation.settings.get(key)) else None) or 0.0) for n in names]
        xs = np.arange(len(names)) + (i - (len(keys) - 1) / 2) * width
        bars = ax.bar(xs, values, width, label=setting_label(key))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(np.arange(len(names)), names)
    ax.set_ylabel(f"{METRIC_LABELS.get(metric, metric)} (%)")
    ax.set_title(f"Downstream segmentation, protocol {protocol_name}")
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


def protocol_lines(protocol):
    d, train = protocol["definition"], protocol["train"]
    selection = {
        "validation": "epoch with the best validation pixel AP (validation carved from the train side; its anomalies are in the "
        "generator-train share, so selection may favour (b)/(c); validation good images a generator painted on are left out)",
        "last": "the last epoch",
    }
    steps = train["fixed_steps_per_epoch"] or f"ceil(train/good / {train['batch_size'] // 2})"
    pool = d["image_score_pool"]
    rounding = "ceil" if d["split_rounding"] == "ceil" else "floor"
    lines = [
        f"- Reference: {d['reference']}.",
        f"- Split (per defect type, sorted by file name): the first {rounding}(n x {protocol['train_fraction']:.3g}) may have trained "
        "the generator; the rest plus test/good is the test set.",
        "- Trains on: " + "; ".join(f"({k}) {v}" for k, v in protocol["settings"].items()) + " (each with train/good, half of every batch).",
        f"- Model: DRAEM's discriminative U-Net, {d['decoder']} decoder, width {train['base_channels']}, init {d['init']}, focal loss, "
        f"Adam lr {train['lr']:g} (x0.2 at 80% and 90% of the steps), batch {train['batch_size']}, {train['image_size']}x{train['image_size']}, "
        f"{train['epochs']} epochs of {steps} steps, seed {protocol['seed']}.",
        f"- Reported epoch: {selection[d['selection']]}"
        + (f"; beside it, labelled, the peer's own choice ({d['peer_selection']})." if d["peer_selection"] else "."),
        f"- Image score: max of the map{f' after a {pool}x{pool} average pool' if pool > 1 else ''}; pixel metrics pool all test pixels; "
        "AUPRO up to FPR 0.3; IoU per image = best over thresholds per anomalous image, averaged.",
    ]
    if "d" in protocol["settings"]:
        source = protocol["anomaly_source_path"] or "the class's other train/good images (DRAEM used DTD: pass --anomaly_source_path)"
        lines.append(f"- (d): DRAEM's Perlin masks (rotated +-90) and three of its ten texture augmentations; textures from {source}.")
    lines += [f"- {n}" for n in d["notes"]]
    if protocol["overrides"]:
        lines.append("- **Budget overridden (smoke run, not the protocol's numbers):** "
                     + ", ".join(f"--{k} {v['used']} (protocol: {v['protocol']})" for k, v in protocol["overrides"].items()))  # fmt: skip
    return lines


def published_table(protocol):
    rows = [[source, protocol["name"]] + [_pct(values.get(m)) for m in protocol["definition"]["metrics"]]
            for source, values in protocol["definition"]["published"].items()]  # fmt: skip
    if not rows:
        return "None: no peer has published numbers under this protocol."
    return _table(["published", "protocol"] + [METRIC_LABELS.get(m, m) for m in protocol["definition"]["metrics"]], rows)


def mean_lines(mean, num_classes, metrics, name):
    """The report's section of means over classes (none for one class)."""
    lines = []
    if num_classes > 1 and (mean["segmentation"] or mean["quality"]):
        lines += [f"## Mean over {mean['classes']} classes [{name}]", ""]
        if mean["segmentation"]:
            rows = [[METRIC_LABELS.get(m, m)] + [_pct(v.get(m)) for v in mean["segmentation"].values()] for m in metrics]
            lines += [_table(["metric"] + [setting_label(k) for k in mean["segmentation"]], rows), ""]
        if mean["quality"]:
            rows = [[label] + [_num(q.get(key), 2 if key == "is" else 3) for q in mean["quality"].values()] for key, label in QUALITY_LABELS.items()]
            rows.append([CLASSIFICATION_LABEL] + [_pct(q.get("classification_accuracy")) for q in mean["quality"].values()])
            lines += [_table(["metric"] + list(mean["quality"]), rows), ""]
    return lines


def write_report(out, results: EvaluationResult):
    """Write every report file under `out`; returns the report.md path."""
    out = Path(out)
    classes, protocol = results.classes, results.protocol
    name, metrics = protocol["name"], protocol["definition"]["metrics"]
    atomic_write_json(out / "metrics.json", results.to_json())
    has_seg = any(c.segmentation for c in classes.values())
    if has_seg:
        write_plot(out / "plot.png", classes, metrics[0], name)
    write_gallery(out / "gallery.html", classes)

    lines = [f"# MvP-Diff evaluation, protocol `{name}`", ""]
    if protocol["random_weights_for_testing"]:
        lines += ["> **Random weights (test mode): IS and IC-LPIPS below come from untrained networks and mean nothing.**", ""]
    if protocol["overrides"]:
        lines += ["> **Budget flags override the protocol (" + ", ".join(f"--{k} {v['used']}" for k, v in protocol["overrides"].items())
                  + "): a smoke run, not comparable with published numbers.**", ""]  # fmt: skip
    lines += [f"Command: `{protocol['command']}`", ""]
    if has_seg:
        lines += ["![headline metric per setting](plot.png)", ""]
    lines += ["Samples with their boxes and masks: [gallery.html](gallery.html)", ""]
    lines += mean_lines(results.mean, len(classes), metrics, name)
    lines += ["## Results", ""]
    for cname, c in classes.items():
        lines += [f"### {cname}", ""]
        if c.quality or c.classification:
            lines += [f"**Generation quality** ({cname}, protocol {name})", "", quality_table(c.quality, c.classification), ""]
        if c.quality:
            lines += [quality_per_defect(c.quality), ""]
        if c.segmentation:
            n_test = sum(v["test"] for d, v in c.counts.items() if d != "good")
            lines += [
                f"**Downstream segmentation** ({cname}, protocol {name}; test: {n_test} real held-out anomalies + {c.counts['good']['test']} "
                f"test/good; {c.segmentation.steps} steps per setting)",
                "",
                segmentation_table(metrics, c.segmentation.settings),
                "",
                f"By defect type ({cname}, protocol {name}; each type's test anomalies with all test/good images):",
                "",
                per_defect_table(metrics, c.segmentation.settings),
                "",
            ]
        if c.notes:
            lines += ["Notes:", ""] + [f"- {n}" for n in c.notes] + [""]
    lines += [f"## Protocol `{name}`", ""] + protocol_lines(protocol) + [""]
    lines += [
        f"- IS: torch-fidelity, Inception v3 logits, per defect-type folder, images resized to {protocol['is_size']} first, "
        f"{protocol['isc_splits']} splits (fewer when under 10 images per split), class value = mean over defect types.",
        f"- IC-LPIPS at {protocol['lpips_size']}x{protocol['lpips_size']}: Ojha et al. (feat_cluster.py): clusters = generator-train anomalies, "
        f"nearest by LPIPS ({protocol['lpips_nets']['ojha']}), {protocol['ic_cluster_size']} random per cluster, NaN-mean over clusters; "
        f"DFMGAN (metrics/lpips.py): clusters = all real anomalies of the type, first {protocol['ic_cluster_cap']} per cluster, clusters under "
        f"two images count 0 ({protocol['lpips_nets']['dfmgan']}); SeaS: DFMGAN's rule, cap {SEAS_CLUSTER_CAP}, first {SEAS_IMAGES} images "
        f"({protocol['lpips_nets']['seas']}).",
        f"- Defect-type accuracy: AnomalyDiffusion's train-classification.py: ImageNet ResNet-34, new last layer, trained on the generated "
        f"images of each type ({protocol['classify_epochs']} epochs, Adam 1e-4, batch 8), tested on the held-out real anomalies; last epoch.",
        "",
        f"### Published numbers under protocol `{name}`",
        "",
        published_table(protocol),
        "",
        "Generation quality as published (MVTec AD means, SeaS's table: IS on 256 px images, IC-LPIPS SeaS's variant): "
        + "; ".join(f"{src}: " + ", ".join(f"{QUALITY_LABELS[k]} {v:.2f}" for k, v in vals.items()) for src, vals in PUBLISHED_QUALITY.items()),
        "",
        "Real data per class (anomalies):",
        "",
    ]
    for cname, c in classes.items():
        rows = [[d, v.get("generator_train", ""), v["downstream_train"], v["validation"], v["test"]] for d, v in c.counts.items()]
        lines += [f"{cname}:", "", _table(["defect type", "generator-train", "downstream train", "validation", "test"], rows), ""]
    lines += ["## Versions", "", ", ".join(f"{k} {v}" for k, v in results.versions.items()), ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    return out / "report.md"
