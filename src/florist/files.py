"""Files florist writes: whole or not at all, with the mode the user's umask asks for.

Some writers florist relies on make private files whatever the umask (safetensors' `save_file`
and so `save_pretrained` write 0600, `tempfile.mkdtemp` makes 0700 directories); their output is
brought back to the mode a plain `open()` or `mkdir()` would have given.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path`, and everything under it when it is a directory, the umask's modes: 0666 or 0777 masked."""
    mask = umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); the renamed file gets the mode a plain open() would give.
        os.fchmod(handle, 0o666 & ~umask())
        with os.fdopen(handle, "wb" if isinstance(data, bytes) else "w") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
