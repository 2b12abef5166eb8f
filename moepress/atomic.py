"""Files replaced whole: written beside their final name and renamed over it, so that a kill leaves the old
file or the new one, never half of one.

The temporary name is fixed (``NAME.tmp``: a kill's leftover is overwritten by the next write, not piled up),
so it is made afresh each time: whatever a directory that came from elsewhere (a downloaded artifact or run
directory) holds at that name, a symbolic or a hard link to a file outside, is removed, not written through.
"""

from __future__ import annotations

import os
from pathlib import Path

_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def replace_file(path: str | os.PathLike, data: bytes | str) -> None:
    """``path`` replaced by ``data`` (str: UTF-8) through ``path``'s ``.tmp`` sibling, created new."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a link planted there: the link goes, never what it points to
    with os.fdopen(os.open(tmp, _FLAGS, 0o666), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)
