"""MvP-Diff: multivariate yet precise anomaly image and segmentation synthesis."""

__version__ = "0.1.0"
