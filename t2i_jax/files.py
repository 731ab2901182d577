"""Writing files so that a reader never sees half of one: `atomic_write`, `atomic_path`;
and reading the image files users name on a command line: `read_image`.

The writers are used for everything the package hands to users or to a later
run (images, JSON reports, safetensors exports, benchmark tables).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "atomic_write", "read_image"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` for the caller to write; on a
    normal exit it is fsynced and renamed onto `path`. On an exception (or a
    kill) the temporary file is removed and the old `path`, if any, is left
    untouched. For writers that want a file name (safetensors' Rust writer);
    `atomic_write` is the same for writers that want an open file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp creates 0600 files; give the result the usual umask-based mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        # The data must be on disk before the rename makes it visible.
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Calls `write(f)` on a temporary binary file beside `path`, then renames
    it onto `path`: readers never see a half-written file, and a failure (or a
    kill) leaves the old file, if any, untouched."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def read_image(path: str | os.PathLike, mode: str, *, flag: str, what: str):
    """The image file at `path` as a PIL image converted to `mode` ("RGB",
    "L"); errors name the `flag` that passed it, or `what` it is, and the fix
    (a folder, a missing file, a file that is not an image)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass a PNG or JPEG file")
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(p) as im:
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {what} {path}: {e}; pass a PNG or JPEG file") from e
