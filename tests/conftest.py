"""Shared fixtures: the demo dataset and the tiny SD-inpainting checkpoint, built once per session
with the same builders the demo uses."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' models are tiny: one intra-op thread is as fast on an idle 2-core machine and several
# times faster on a busy one. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def demo_dataset_master(tmp_path_factory):
    """The demo dataset, built once. Read-only: copy it (`demo_dataset`) before writing beside it."""
    from mvp_diff.demo_data import build_demo_dataset

    return build_demo_dataset(tmp_path_factory.mktemp("demo_master") / "dataset")


@pytest.fixture
def demo_dataset(demo_dataset_master, tmp_path):
    """A private copy of the demo dataset for one test: tmp_path/dataset."""
    dest = tmp_path / "dataset"
    shutil.copytree(demo_dataset_master, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Tiny random SD-1.5-inpainting-layout checkpoint folder (read-only by convention)."""
    from mvp_diff.demo_checkpoint import build_tiny_inpainting_checkpoint

    return build_tiny_inpainting_checkpoint(tmp_path_factory.mktemp("ckpt") / "inpainting")


def run_script(script, *args, cwd=None, env=None, check=False, timeout=900):
    """Run a top-level script as a user would; returns CompletedProcess with text stdout/stderr."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def in_process(script, *args, cwd):
    """Run a script's main() in this process (imports are paid once), from `cwd`."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        script.main([str(a) for a in args])
    finally:
        os.chdir(old)


def assert_user_error(proc, code, *needles, after_progress=False):
    """The error is exactly one line on stderr, with the given exit code, mentioning every needle.
    `after_progress`: the run had started (progress bars, log lines), so the error is the last line
    of stderr and the only error line; otherwise it is all of stderr."""
    assert proc.returncode == code, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    lines = proc.stderr.strip().splitlines()
    if after_progress:
        assert "Traceback" not in proc.stderr and [line for line in lines if ": error: " in line] == lines[-1:], proc.stderr
    else:
        assert len(lines) == 1, proc.stderr
    assert ": error: " in lines[-1], proc.stderr
    for needle in needles:
        assert needle in lines[-1], (needle, proc.stderr)


def dataset_listing(root):
    """Every entry under `root` (folders included) with its type, size, modification time and, for
    files, a SHA-256 of the bytes: equal listings mean nothing was added, removed, written or touched."""
    import hashlib

    root = Path(root)
    listing = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        listing[path.relative_to(root).as_posix()] = (path.is_dir(), st.st_size if path.is_file() else None, st.st_mtime_ns, digest)
    listing["."] = (True, None, root.stat().st_mtime_ns, None)
    return listing
