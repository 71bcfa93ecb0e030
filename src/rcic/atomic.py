"""Atomic file writes: write beside the target, then rename, so no reader sees half a file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path (same folder, same suffix); on success it replaces ``path``.

    An output that is a symbolic link is written through: the file it points to is replaced (in its
    own folder, so the rename stays atomic) and the link is kept, as ``>`` in a shell would do.
    """
    path = Path(path)
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        # a rename would replace the FIFO, device (/dev/null) or folder itself, not write into it
        from rcic.errors import RcicError

        raise RcicError("exists and is not a regular file (a folder, FIFO or device); choose another output path",
                        path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        # a failed write() names no file ("File too large", "Invalid argument"): name the output, not the temp
        if err.filename is None or str(err.filename) == str(tmp):
            raise OSError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def describe_os_error(err: OSError, path: str | Path | None = None) -> str:
    """One line for an error of the environment: the path, what happened, and that nothing was lost."""
    import errno

    where = path or err.filename or ""
    what = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = ("no space left on device; nothing was lost (outputs are written atomically): free some space "
                "and run the same command again")
    elif err.errno in (errno.EACCES, errno.EPERM):
        what = "permission denied"
    return f"{where}: {what}" if where else what
