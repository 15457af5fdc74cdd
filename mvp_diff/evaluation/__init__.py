"""Evaluation of synthetic anomaly data: generation quality (IS, IC-LPIPS) and what the data is worth
to a downstream segmentation model (pixel/image AUROC, AP, F1-max, IoU). `evaluate.py` drives it."""
