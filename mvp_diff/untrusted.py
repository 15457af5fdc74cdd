"""Values read from files (records, box files, manifests, settings) on their way to becoming paths,
file names and numbers. People edit, share and download these files, so every name and value from
them passes through here first: a bad one stops the command with one line naming the file, line and
field, before anything is written.

`where` is the place a value came from, made by `field_at`: `boxes.jsonl line 3: field "defect_type"`.
"""

import json
import math
import re
from pathlib import Path

from .errors import UsageError, UserError

# Class, defect-type and sample names as MVTec AD, VisA and similar datasets spell them (metal_nut,
# broken_large, fabric-border, Type 2 (a), 000): letters and digits (any script), space and
# _ - + . , ( ) [ ] ' & # @ = ~, starting with a letter, digit or _. No separators, no control
# characters, so a name is one path component and never `.`, `..`, hidden or absolute.
NAME = re.compile(r"[^\W][\w .,+()\[\]'&#@=~-]*")
MAX_NAME = 255  # longest file name most file systems allow


def field_at(path, line=None, field=None) -> str:
    """`FILE line N: field "KEY"` (parts left out when not given)."""
    where = str(path)
    if line is not None:
        where += f" line {line}"
    if field is not None:
        where += f': field "{field}"'
    return where


def _shown(value) -> str:
    return json.dumps(value)[:120]


def _bad(where, value, what):
    raise UserError(f"{where} = {_shown(value)} {what}; correct it or regenerate the file")


def component(value, where) -> str:
    """A class or defect-type name that is a single, plain path component."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or len(value) > MAX_NAME:
        _bad(where, value, 'is not a plain folder name (letters, digits, spaces, _ - . and the like; no "/", "\\", "..", leading dot)')
    return value


def flag_name(value, flag) -> str:
    """A class name given on the command line; it names output folders, so the same rule holds."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or len(value) > MAX_NAME:
        raise UsageError(f"{flag} {value!r} is not a class folder name (one plain name: no '/', '..' or leading dot)")
    return value


def index(value, where) -> int:
    """A sample index: a non-negative integer (JSON number, not a string)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _bad(where, value, "is not a non-negative integer")
    return value


def seed(value, where) -> int:
    """A random seed: an integer numpy and torch both accept."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        _bad(where, value, "is not an integer seed in [0, 2^63)")
    return value


def size(value, where) -> int:
    """An image width or height in pixels."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _bad(where, value, "is not a positive integer")
    return value


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def box(value, width, height, where):
    """`[x0, y0, x1, y1]`, four numbers with 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height."""
    if not isinstance(value, (list, tuple)) or len(value) != 4 or not all(_number(v) for v in value):
        _bad(where, value, "is not a box [x0, y0, x1, y1] of four numbers")
    x0, y0, x1, y1 = value
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        _bad(where, value, f"is not a box inside the {width}x{height} image (0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)")
    return value


def boxes(value, width, height, where):
    """A non-empty list of boxes, each checked by `box`."""
    if not isinstance(value, list) or not value:
        _bad(where, value, "is not a non-empty list of boxes [x0, y0, x1, y1]")
    for item in value:
        box(item, width, height, where)
    return value


def text(value, where) -> str:
    if not isinstance(value, str):
        _bad(where, value, "is not a string")
    return value


def relative_path(value, where) -> Path:
    """A path string from a file (not yet anchored anywhere)."""
    if not isinstance(value, str) or not value or "\0" in value:
        _bad(where, value, "is not a path")
    return Path(value)


def is_inside(path, root) -> bool:
    return Path(path).resolve().is_relative_to(Path(root).resolve())


def inside(path, roots, where):
    """`path`, resolved (symlinks followed), when it lies inside one of `roots`; else one line naming
    `where` and the folder(s) it must stay in. Used for every path read from a file, and for every
    path a command writes or deletes, before it does."""
    roots = [roots] if isinstance(roots, (str, Path)) else [r for r in roots if r is not None]
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(Path(r).resolve()) for r in roots):
        outside(path, roots, where)
    return resolved


def outside(value, roots, where):
    """The one-line error for a path that leaves the folder(s) it must stay in."""
    allowed = " or ".join(str(r) for r in roots)
    raise UserError(f"{where} = {_shown(str(value))} points outside {allowed}; a file here may only name files inside it")


def json_list(value, where) -> list:
    if not isinstance(value, list):
        _bad(where, value, "is not a JSON list")
    return value


def json_object(value, where) -> dict:
    if not isinstance(value, dict):
        _bad(where, value, "is not a JSON object")
    return value
