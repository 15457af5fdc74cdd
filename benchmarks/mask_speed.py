"""Mask speed against another version: the same pairs, both versions timed in one run, one thread.

Loads `mvp_diff/masks.py` (with its errors module and mask head) as it is at git revision --base
into a temporary package, draws pairs with the mask precision benchmark's generator (tune split by
default), and times every method in both versions call by call, alternating which goes first, so
both see the same machine load. Prints milliseconds per image, the ratio (base / current) and how
many masks are identical: a change meant only to be faster must keep them all.

    python -m benchmarks.mask_speed --base HEAD~1 --num 40

--grid N cuts every box into N x N boxes (2 px gaps between them): many small boxes on one image,
where a per-box cost shows.
"""

import argparse
import importlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from benchmarks.mask_precision import SPLITS, make_pair, photograph
from mvp_diff import masks as current
from mvp_diff.boxes import mask_regions

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FILES = ("masks.py", "errors.py", "mask_head.npz")


def load_version(revision, into):
    """The masks module of mvp_diff at git `revision`, as a package under the folder `into`."""
    package = Path(into) / "mvp_diff_base"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in PACKAGE_FILES:
        shown = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:mvp_diff/{name}"], capture_output=True)
        if shown.returncode:
            sys.exit(f"--base {revision}: git cannot show mvp_diff/{name} there ({shown.stderr.decode().strip()}); pass a revision of this repository")
        (package / name).write_bytes(shown.stdout)
    sys.path.insert(0, str(into))
    return importlib.import_module("mvp_diff_base.masks")


def grid_boxes(box, n):
    """The box mask with each box cut into n x n boxes by 2 px gaps (n = 1: unchanged)."""
    if n <= 1:
        return box
    out = box.copy()
    for (x, y, x1, y1), _, _ in mask_regions(box > 0)[1]:
        w, h = x1 - x, y1 - y
        for k in range(1, n):
            out[y + k * h // n - 1 : y + k * h // n + 1, x : x + w] = 0
            out[y : y + h, x + k * w // n - 1 : x + k * w // n + 1] = 0
    return out


def mask_of(version, method, pair, image):
    """`version`'s extract_mask of `image` against the pair's defect-free image; "METHOD+ref" passes
    the pair's simulated VAE round trip as the reference (as benchmarks/mask_precision.py names them)."""
    name, _, ref = method.partition("+")
    return version.extract_mask(image, pair["normal"], pair["box"], method=name, reference=pair["reference"] if ref else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="git revision to compare with (default: HEAD, i.e. uncommitted changes)")
    parser.add_argument("--num", type=int, default=40, help="pairs (default: 40)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (default: 512)")
    parser.add_argument("--split", default="tune", choices=list(SPLITS))
    parser.add_argument("--methods", nargs="+", default=["default", "default+ref", "learned", "learned+ref"])
    parser.add_argument("--grid", type=int, default=1, help="cut every box into N x N boxes (default: 1, as drawn)")
    args = parser.parse_args()
    if args.num < 1:
        parser.error("--num must be at least 1")
    if args.grid < 1:
        parser.error("--grid must be at least 1")
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        base = load_version(args.base, tmp)
        photos = {n: photograph(n) for n in SPLITS[args.split]["colour"] + SPLITS[args.split]["grey"]}
        rng = np.random.default_rng(SPLITS[args.split]["seed"] + 1000)
        pairs = [make_pair(rng, args.split, photos, args.size) for _ in tqdm(range(args.num), desc="pairs", leave=False)]
        for pair in pairs:
            pair["box"] = grid_boxes(pair["box"], args.grid)
        versions = {"base": base, "current": current}
        seconds = {(v, m): 0.0 for v in versions for m in args.methods}
        same = {m: 0 for m in args.methods}
        for version in versions.values():  # warm-up: imports and first-call set-up are not per-image costs
            for m in args.methods:
                mask_of(version, m, pairs[0], pairs[0]["anomaly"])
        calls = 0
        for pair in tqdm(pairs, desc="masks", leave=False):
            for image in (pair["anomaly"], pair["control"]):
                order = list(versions) if calls % 2 == 0 else list(versions)[::-1]
                calls += 1
                for m in args.methods:
                    out = {}
                    for v in order:
                        t0 = time.perf_counter()
                        out[v] = mask_of(versions[v], m, pair, image)
                        seconds[v, m] += time.perf_counter() - t0
                    same[m] += bool(np.array_equal(out["base"], out["current"]))

    cut = f", every box cut into {args.grid} x {args.grid}" if args.grid > 1 else ""
    print(f"{args.num} {args.split} pairs at {args.size} px{cut} (defect and unchanged box: {calls} images), one thread; base {args.base}")
    print(f"  {'method':<12} {'base ms':>8} {'current ms':>11} {'base/current':>13}  identical masks")
    for m in args.methods:
        b, c = (1000 * seconds[v, m] / calls for v in versions)
        print(f"  {m:<12} {b:8.2f} {c:11.2f} {b / c:12.2f}x  {same[m]}/{calls}")


if __name__ == "__main__":
    main()
