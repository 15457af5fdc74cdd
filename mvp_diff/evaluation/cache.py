"""Finished parts of an evaluation, kept under OUT/work/ with a fingerprint of what made them, so a
rerun (or a run killed half way) only redoes what changed."""

import hashlib
import json
from dataclasses import asdict, is_dataclass
from pathlib import Path

from ..files import atomic_write_json


def fingerprint(obj, files=()):
    """sha1 of a JSON-able object plus (path, size, mtime) of files: what a cached result depends on."""
    h = hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode())
    for f in files:
        st = Path(f).stat()
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cached(path: Path, key):
    """The result stored at `path` under fingerprint `key`, or None."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return saved["result"] if saved.get("fingerprint") == key else None


def reuse_or_compute(path: Path, inputs, files, compute, kind=None):
    """fingerprint(inputs, files) -> the result cached at `path` under it -> else compute() and store
    it there. `kind`: the dataclass compute() returns (stored as a dict, read back as `kind`)."""
    key = fingerprint(inputs, files)
    hit = cached(Path(path), key)
    if hit is not None:
        return kind(**hit) if kind else hit
    result = compute()
    atomic_write_json(path, {"fingerprint": key, "result": asdict(result) if is_dataclass(result) else result})
    return result
