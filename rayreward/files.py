"""Every file rayreward writes into a folder it does not own alone (a run folder, an --out folder,
a shared filesystem) goes through one of two doors, so that nothing planted there can redirect
a write and no reader ever sees half a file:

- `written(path)`: a whole file. The data go to a temporary file beside `path`, which is then
  renamed over it. A rename replaces a symbolic link at `path` with the file; it never writes
  through the link into the file it points at, and a kill or a full disk midway leaves the
  previous file whole.
- `append(path, text)`: a line added to a log (starts.jsonl, resumes.jsonl, metrics.csv). Opened
  with O_NOFOLLOW and refused unless it is a regular file: a link, a FIFO or a device there is
  an error naming the path, not a write through it (or a hang).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator


@contextlib.contextmanager
def written(path: str | os.PathLike, mode: str = "w", **open_kw) -> Iterator[IO]:
    """A file object whose content replaces `path` whole when the block ends without an error
    (nothing changes at `path` otherwise). `mode`: "w" (text; `open_kw` such as newline="") or "wb"."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **open_kw) as f:
            yield f
        os.chmod(tmp, 0o644 & ~_UMASK)  # mkstemp makes 0600; a written file reads as open() makes it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with written(path, "wb") as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    with written(path, "w") as f:
        f.write(text)


def append(path: str | os.PathLike, text: str) -> None:
    """Add `text` at the end of the regular file `path` (created if absent), never through a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise OSError(e.errno, f"{path} is a symbolic link; rayreward does not write through one "
                                   "(remove it)") from None
        if os.path.exists(path) and not os.path.isfile(path):
            raise OSError(e.errno, f"{path} is not a regular file; rayreward appends only to one (remove it)") from None
        raise
    with os.fdopen(fd, "a", newline="") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file; rayreward appends only to one (remove it)")
        f.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: setting it is process-wide and not thread-safe
