"""Where a stage may write: output paths that must not overlap the inputs, and the lock that keeps
two processes from writing the same output.

- :func:`absolute`: the output path made absolute (``-o .`` names the current directory, whose
  ``.partial`` sibling then sits beside it, not inside it); :func:`output_dir` also follows a symbolic
  link given as the output (the stage writes the directory it names, on that directory's file system).
- :func:`install`: the finished ``OUT.partial`` renamed to ``OUT``; an old ``OUT`` (--force) is moved
  to ``OUT.partial.old`` first and removed after, and a leftover of a killed install is removed by
  the next writer of ``OUT`` (:func:`clear_retired`).
- :func:`refuse_overlap`: an output equal to an input, inside one or containing one is refused
  before anything is written (``quantize M -o M --force`` would replace the checkpoint it reads;
  ``-o M/q`` would add files to it).
- :class:`OutputLock`: an exclusive ``flock`` on ``OUT.partial.lock``, held while ``OUT.partial``
  is written. The kernel drops a flock with its process, so a lock file left by a killed run is
  free and the next run takes it over.
- :func:`require_space`: an output its file system cannot hold refused before any work (a full disk
  found an hour into a 1 TB model's quantization).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from moepress.atomic import replace_file
from moepress.errors import MoepressError


def absolute(path: str | os.PathLike) -> Path:
    """``path`` absolute and normalised (``.`` and ``..`` folded), symlinks not followed (what messages name)."""
    return Path(os.path.abspath(os.fspath(path)))


def output_dir(path: str | os.PathLike, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Where ``-o path`` is written: :func:`absolute`, a symbolic link at ``path`` itself resolved (renaming the
    finished output over the link would replace the link, leave its target as it was and write the partial
    on the link's file system); refused first (:func:`refuse_overlap`, naming the path as given) where it
    overlaps one of ``sources``, the stage's inputs."""
    p = absolute(path)
    refuse_overlap(p, sources)
    return resolved(p) if p.is_symlink() else p


def resolved(p: str | os.PathLike) -> Path:
    """``p`` with every symbolic link followed; a link loop refused in one line (Python 3.11 raises
    RuntimeError for it, later ones OSError ELOOP)."""
    try:
        return Path(p).resolve()
    except (RuntimeError, OSError) as e:
        if isinstance(e, OSError) and e.errno != errno.ELOOP:
            raise
        raise MoepressError(f"{p}: a loop of symbolic links; expected a path that names a folder") from None


def retired(out: Path) -> Path:
    """Where an old ``out`` waits for removal while the new one is renamed in (a fixed name, so that a
    kill in between leaves nothing the next writer cannot find)."""
    return out.with_name(out.name + ".partial.old")


def clear_retired(out: Path) -> None:
    """Remove what a killed install left at :func:`retired` (the caller holds ``out``'s lock)."""
    shutil.rmtree(retired(out), ignore_errors=True)


def install(work: Path, out: Path) -> None:
    """Rename the finished directory ``work`` to ``out``; an existing ``out`` is moved to :func:`retired`
    first and removed after. A kill at any point leaves the old ``out`` or the new one whole (or neither
    between the renames), never a half-removed one at ``out``. The caller holds ``out``'s lock."""
    if out.exists() and is_cwd(out):
        return _install_in_place(work, out)
    old = retired(out)
    clear_retired(out)
    moved = out.exists()
    if moved:
        os.replace(out, old)
    try:
        os.replace(work, out)
    except OSError:
        if moved:
            os.replace(old, out)
        raise
    clear_retired(out)


# the files a consumer opens a directory by (transformers / vLLM / TensorRT-LLM: config.json; onnxruntime:
# model.onnx): moved in after every other entry, so that a directory a kill left half-filled does not look loadable
ENTRY_FILES = ("config.json", "model.onnx")


def _install_in_place(work: Path, out: Path) -> None:
    """``out`` is the current directory (``-o .``): a directory renamed over it would leave the shell in a
    removed one, so the entries move into it instead, the entry files (config.json) next to last and the
    manifest last (``out`` is complete when its manifest is there); what ``out`` held (with --force) is moved
    to :func:`retired` first (manifest and entry files first) and removed."""
    from moepress.manifest import MANIFEST_NAME

    def rank(p: Path) -> int:
        return 2 if p.name == MANIFEST_NAME else 1 if p.name in ENTRY_FILES else 0

    # the manifest first: a kill while OUT empties must not leave it vouching for what remains
    entries = sorted(out.iterdir(), key=lambda p: -rank(p))
    clear_retired(out)
    if entries:
        retired(out).mkdir()
        for p in entries:
            os.replace(p, retired(out) / p.name)
    for p in sorted(work.iterdir(), key=rank):
        os.replace(p, out / p.name)
    work.rmdir()
    clear_retired(out)


def is_cwd(path: Path) -> bool:
    """Whether ``path`` is the current directory (a directory renamed over it would strand the shell)."""
    try:
        return os.path.samefile(path, os.getcwd())
    except OSError:  # the current directory was removed
        return False


def overlap(out: str | os.PathLike, source: str | os.PathLike) -> str | None:
    """How ``out`` overlaps ``source`` once both are resolved (symlinks followed): "is",
    "is inside", "contains", or None when they are apart."""
    o, s = resolved(out), resolved(source)
    if o == s:
        return "is"
    if s in o.parents:
        return "is inside"
    if o in s.parents:
        return "contains"
    return None


def pid_alive(pid: str) -> bool:
    """Whether process ``pid`` (the suffix a killed writer's temporary file or directory carries) runs; a
    suffix that is no pid, or another user's process, counts as alive (its file is kept)."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def refuse_existing(out: Path, force: bool) -> None:
    """What an existing ``out`` must be for a stage to replace it, refused before any work: a directory; empty,
    or with --force one a moepress stage wrote (its manifest: --force never deletes a folder of other files);
    not holding the current directory; and, unless it is the current directory (filled in place), one the
    finished output can be renamed over: not a mount point, nor another user's in a sticky parent (``/tmp``, a
    shared ``/scratch``), which would fail only at the end, the work lost. Read-only, so every torchrun rank
    asks it alike (an immutable folder, chattr +i, is not detected: it fails at the end)."""
    from moepress.manifest import MANIFEST_NAME

    if not out.exists():
        return
    if not out.is_dir():
        raise MoepressError(f"{out}: output path exists and is not a directory")
    held = next(out.iterdir(), None)
    if held is not None and not force:
        raise MoepressError(f"{out}: output directory is not empty (pass --force to replace it)")
    if held is not None and not (out / MANIFEST_NAME).is_file():
        raise MoepressError(f"{out}: --force replaces only an output a moepress stage wrote (no {MANIFEST_NAME}; "
                            f"it holds {held.name}); expected a new or empty folder")
    if is_cwd(out):
        return
    try:
        cwd = Path(os.getcwd()).resolve()
    except OSError:  # the current directory was removed: nothing of it to keep
        cwd = Path("/")
    if resolved(out) in cwd.parents:
        raise MoepressError(f"{out}: holds the current directory {cwd}; expected an output that does not contain it")
    if mount_point(out):
        raise MoepressError(f"{out}: a mount point, which the finished output cannot be renamed over; expected a "
                            "new folder inside it")
    st, parent = out.stat(), out.parent.stat()
    uid = os.geteuid()
    if parent.st_mode & stat.S_ISVTX and uid != 0 and uid not in (st.st_uid, parent.st_uid):
        raise MoepressError(f"{out}: another user's folder in {out.parent}, whose sticky bit lets only its owner "
                            "rename it, and the finished output is renamed into its place; expected a new path")


def mount_point(p: Path) -> bool:
    """Whether ``p`` is where a file system is mounted: as /proc/self/mountinfo lists it (a btrfs subvolume,
    another device number without a mount, is no mount point), else os.path.ismount."""
    try:
        lines = os.fsdecode(Path("/proc/self/mountinfo").read_bytes()).splitlines()  # as paths decode
    except OSError:
        return os.path.ismount(p)
    # field 5: the mount point, with space, tab, newline and backslash escaped as octal (\040 ...)
    fields = (ln.split() for ln in lines)
    points = {re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), f[4]) for f in fields if len(f) > 4}
    return str(resolved(p)) in points


def refuse_overlap(out: str | os.PathLike, sources: Iterable[str | os.PathLike], label: str = "",
                   what: str = "the input", why: str = "the input (it is read while the output is written)") -> None:
    """One-line :class:`MoepressError` when the output ``out`` equals, sits inside or contains one
    of ``sources`` (the stage's inputs). ``label`` prefixes the path (e.g. ``"--report "``); ``what`` names a
    source and ``why`` says what the output must stay outside of (calibration data: calib.sources)."""
    for src in sources:
        how = overlap(out, src)
        if how is not None:
            raise MoepressError(f"{label}{out}: the output {how} {what} {src}; expected a path outside {why}")


class OutputLock:
    """An exclusive advisory lock on the file ``path`` (``flock(LOCK_EX | LOCK_NB)``).

    :meth:`acquire` refuses with ``busy`` (a one-line :class:`MoepressError`) when another process
    holds it. :meth:`release` removes the file and drops the lock; so that a process which opened
    the file just before it was removed does not believe it holds the lock of a file nobody else
    sees, :meth:`acquire` checks after locking that the path still names the inode it locked, and
    retries on the new file if not."""

    def __init__(self, path: str | os.PathLike, busy: str):
        self.path = Path(path)
        self.busy = busy
        self.fd: int | None = None

    def acquire(self) -> None:
        while self.fd is None:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except (PermissionError, FileNotFoundError, NotADirectoryError) as e:  # read-only, gone, a file
                raise MoepressError(f"{self.path.parent}: cannot write there ({e.strerror}); expected a writable "
                                    f"folder to hold {self.path.name.removesuffix('.lock')}") from None
            except OSError as e:
                if e.errno != errno.EROFS:
                    raise
                raise MoepressError(f"{self.path.parent}: a read-only file system; expected a writable folder to "
                                    f"hold {self.path.name.removesuffix('.lock')}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MoepressError(self.busy) from None
            except BaseException:
                os.close(fd)
                raise
            if self._names(fd):
                self.fd = fd
            else:  # removed (and maybe recreated) between our open and our lock: lock the new file
                os.close(fd)

    def refuse_if_held(self) -> None:
        """:meth:`acquire`'s refusal where another process holds the lock now, without taking or creating it: for
        a check before the work (every torchrun rank asks; only rank 0 takes the lock, after its calibration)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no lock file: nobody holds it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MoepressError(self.busy) from None
        finally:
            os.close(fd)

    def _names(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def release(self) -> None:
        """Remove the lock file (while still holding it) and drop the lock; no-op when not held."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def __del__(self):
        try:
            self.release()
        except Exception:  # interpreter shutdown: the kernel drops the lock with the process anyway
            pass


SKIP_SPACE_CHECK = "MOEPRESS_SKIP_SPACE_CHECK"


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def require_space(out: str | os.PathLike, need: int, what: str) -> None:
    """Refuse an output whose file system cannot hold ``need`` bytes, a lower bound of what the stage writes
    (``what``: e.g. "the pruned tensors"), less what ``OUT.partial`` holds (kept by a resumed run, replaced
    by a new one). A lower bound, so the refusal is never wrong where the file system reports its free space
    truly; an old ``OUT`` replaced by --force is removed only once the new one is complete, so it frees
    nothing. ``MOEPRESS_SKIP_SPACE_CHECK=1`` skips the check (file systems that misreport their free space)."""
    if os.environ.get(SKIP_SPACE_CHECK, "") not in ("", "0"):
        return
    out = output_dir(out)  # a symbolic link at OUT: its target's file system, where the stage writes
    partial = out.with_name(out.name + ".partial")
    held = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if partial.is_dir() else 0
    at = out.parent
    while not at.exists() and at != at.parent:
        at = at.parent
    free = shutil.disk_usage(at).free
    if need - held > free:
        raise MoepressError(f"{out}: {what} need at least {_size(need - held)}, and its file system has "
                            f"{_size(free)} free; free space or choose another output (or set "
                            f"{SKIP_SPACE_CHECK}=1 where the free space is misreported)")


__all__ = ["SKIP_SPACE_CHECK", "OutputLock", "absolute", "clear_retired", "install", "output_dir", "overlap",
           "refuse_existing", "refuse_overlap", "require_space", "retired"]


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it: a kill leaves the old file or the new
    one, never half of one (a run's summary, a resumable stage's progress file)."""
    replace_file(path, text)
