"""File helpers: atomic writes (temp file + rename) and image reading with clear errors."""

import contextlib
import errno
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .kill_points import kill_point

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# The largest image read: 16384 x 16384 pixels (0.8 GB as RGB). A file whose header claims more is a
# decompression bomb or a mistake; it is refused before any pixel is decoded.
MAX_IMAGE_PIXELS = 16384 * 16384
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
TEMP_SUFFIX = ".tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path, data: bytes):
    """Write `data` to `path` so that readers only ever see the old or the complete new file. A failed
    write (disk full, no permission) removes its temp file and is a UserError naming the path."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as err:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            if err.errno == errno.ENOSPC:
                raise UserError(f"{path}: no space left on device; nothing partial was left; free some space and rerun (finished work is kept)")
            raise UserError(f"{path}: cannot write ({err.strerror or err}); nothing partial was left")
        raise


def remove_temp_files(folder):
    """Temp files that killed runs' atomic writes left under `folder`; call only while no other run
    writes there."""
    for tmp in Path(folder).glob(f"**/.*{TEMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path, records):
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_jsonl(path):
    """Records of a .jsonl file; a missing file or a bad line is a UserError naming it."""
    return [record for _, record in read_jsonl_numbered(path)]


def read_jsonl_numbered(path):
    """(line number, record) of every record of a .jsonl file, for errors that name the line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file ({err.reason} at byte {err.start})")
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})")
            if not isinstance(record, dict):
                raise UserError(f"{path}:{lineno}: not a JSON object; each line holds one record {{...}}")
            records.append((lineno, record))
    return records


def save_image(path, array_or_image, format=None):
    """Save a PIL image or uint8 array atomically; the format comes from the file extension."""
    path = Path(path)
    image = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(np.asarray(array_or_image))
    fmt = format or Image.registered_extensions().get(path.suffix.lower(), "PNG")
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt)
    atomic_write_bytes(path, buf.getvalue())


@contextlib.contextmanager
def _opened(path):
    """Image.open with every failure a UserError naming the file; PIL's decompression-bomb warning
    (over MAX_IMAGE_PIXELS) is an error too, not a note before an out-of-memory kill."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                yield im
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"{path}: not read, {err} (the limit is {MAX_IMAGE_PIXELS} pixels)")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: cannot read image ({err.__class__.__name__}: {err})")


def open_image(path):
    """PIL image, fully loaded; unreadable or corrupt files raise a UserError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    with _opened(path) as im:
        im.load()
        return im.copy() if im.mode != "P" else im.convert("RGBA" if "transparency" in im.info else "RGB")


GREY_MODES = ("L", "LA", "I;16", "I;16B", "I", "F")


def _eight_bit(im):
    """16-bit and float grey images scaled to 8-bit L; others unchanged."""
    if im.mode in ("I;16", "I;16B", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
    return im


def read_rgb(path):
    """uint8 HxWx3 array; grey (L, I;16) and RGBA images are converted (alpha dropped)."""
    return np.asarray(_eight_bit(open_image(path)).convert("RGB"))


def read_image(path):
    """uint8 array as the file holds it: HxW for grey images (8 or 16 bit), else HxWx3 RGB."""
    im = _eight_bit(open_image(path))
    return np.asarray(im.convert("L")) if im.mode in GREY_MODES else np.asarray(im.convert("RGB"))


def is_grey(path) -> bool:
    """Whether an image is single-channel, from its header."""
    with _opened(path) as im:
        return im.mode in GREY_MODES


def read_mask(path):
    """bool HxW array; masks stored 0/255, 0/1 or as RGB/RGBA are all accepted. 0/255 masks are cut at
    half (JPEG-compressed masks carry faint noise around their regions), 0/1 masks at zero."""
    im = open_image(path)
    arr = np.asarray(im)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2) if arr.shape[2] >= 3 else arr[..., 0]
    return arr > (127 if arr.max() > 1 else 0)


def image_size(path):
    """(width, height) without decoding pixels."""
    with _opened(path) as im:
        return im.size
