"""Atomic writes: an artifact is either complete under its final name or absent.

Everything is written under a temporary sibling name and renamed into place at the end, so an
interrupted stage never leaves a half-written file or folder that looks complete. Temporaries a
killed process left behind are removed by the next write of the same artifact (not those of a writer
still running, here or, for a day, on another host sharing the folder). A write that runs out of space
raises DiskFullError naming the artifact, and leaves the previous version in place. This holds for a
process that is killed; nothing is fsynced, so after a power cut the filesystem's journal decides.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from workflow.core.faults import maybe_fault

FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# How libraries that do their own I/O word the same errors: safetensors (Rust), torch's zip writer, and
# numpy's tofile, which reports a short write (on a regular file: out of space) with no errno.
FULL_WORDS = re.compile(
    r"No space left|File too large|Disk quota|StorageFull|FileTooLarge|file write failed|"
    r"\d+ requested and \d+ written"
)


class DiskFullError(OSError):
    """Writing an artifact ran out of space (ENOSPC, EFBIG, EDQUOT); the message names the artifact."""


def out_of_space(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk or a file-size limit."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_ERRNOS:
            return True
        if FULL_WORDS.search(str(seen)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _errno(exc: BaseException) -> int:
    """The OS error number, also from a library's own wording ("os error 27"); ENOSPC if none is given."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    found = re.search(r"(?:os error|Errno) (\d+)", str(exc))
    return int(found.group(1)) if found else errno.ENOSPC


@contextlib.contextmanager
def disk_full_guard(final: str | Path) -> Iterator[None]:
    """Re-raise an out-of-space failure inside the block as one DiskFullError naming `final`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as exc:
        if not out_of_space(exc):
            raise
        raise DiskFullError(
            _errno(exc),
            f"out of disk space (or over the file-size limit) while writing {final}: "
            f"{type(exc).__name__}: {str(exc)[:200]}. Earlier artifacts are intact; "
            "free some space (e.g. lower train.checkpoints_total_limit) and re-run",
        ) from exc


OTHER_HOSTS_STALE_SECONDS = 24 * 3600  # a temporary of another host's writer: its process can't be asked


def _writer_tag() -> str:
    return f"~{os.getpid()}~{socket.gethostname()}~"


def _is_stale(temporary: Path, final: Path) -> bool:
    """Whether a temporary beside `final` was left by a writer that is gone: a process no longer running
    on this host, one on another host a day ago, or a writer too old to have named itself."""
    found = re.match(rf"\.{re.escape(final.name)}\.~(\d+)~([^~/]*)~", temporary.name)
    if found is None:
        return True
    pid, host = int(found.group(1)), found.group(2)
    if host != socket.gethostname():
        with contextlib.suppress(OSError):
            return time.time() - temporary.lstat().st_mtime > OTHER_HOSTS_STALE_SECONDS
        return False
    if pid == os.getpid():  # an earlier process that had this pid: this one writes an artifact once at a time
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success it replaces `final` (file or folder). A file
    replaces a file in one rename; an old folder is first renamed aside whole (deleting it in place could
    be cut short, leaving half of it under its name), so `final` is only ever the old artifact, nothing,
    or the new one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for left in final.parent.glob(f".{glob.escape(final.name)}.*.tmp"):  # left by a killed earlier write
        if _is_stale(left, final):
            shutil.rmtree(left, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_writer_tag()}", suffix=".tmp", dir=final.parent))
    work = tmp / final.name  # keeps the suffix, for writers that add one (np.savez)
    try:
        with disk_full_guard(final):
            yield work
        _into_place(work, final, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _into_place(work: Path, final: Path, tmp: Path) -> None:
    """Rename the complete `work` to `final`, an old folder at `final` first renamed aside into `tmp`
    (which the caller deletes)."""
    maybe_fault("artifact.before_rename", final.name)
    if (final.exists() or final.is_symlink()) and (work.is_dir() or final.is_dir()):
        os.replace(final, tmp / f"{final.name}.replaced")
        maybe_fault("artifact.old_aside", final.name)
    os.replace(work, final)  # over a file, or a link into the DVC cache: the link, not its target


def publish_folder(folder: str | Path, final: str | Path) -> None:
    """Rename a folder built elsewhere on the same file system (a resumable one: atomic_path's temporary
    would not survive its writer) to `final`, as atomic_path does: `final` is only ever the old
    artifact, nothing, or the new one."""
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{_writer_tag()}", suffix=".tmp", dir=final.parent))
    try:
        _into_place(Path(folder), final, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Like atomic_path, with the temporary folder already created."""
    with atomic_path(final) as work:
        work.mkdir()
        yield work


def try_lock(path: str | Path):
    """The open file `path` (created if need be), flock'd by this process, if no other held it; else None.
    Opened for writing: NFS turns an exclusive flock into a byte-range lock, which needs that."""
    handle = open(path, "a+")  # noqa: SIM115 -- held open as long as the lock
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError:
        handle.close()
        raise
    return handle


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def remove(path: str | Path) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


MANIFEST = "manifest.json"


def write_manifest(folder: str | Path) -> None:
    """Record the size and sha256 of every file in `folder` in `folder/manifest.json`."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    write_json(
        folder / MANIFEST,
        {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files},
    )


def manifest_damage(folder: str | Path) -> str | None:
    """What is wrong with `folder` against its manifest.json (a file missing, truncated or altered), or None."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return f"no {MANIFEST}"
    try:
        manifest = read_json(folder / MANIFEST)
        entries = [(folder / name, int(e["size"]), str(e["sha256"])) for name, e in manifest.items()]
    except (ValueError, AttributeError, KeyError, TypeError) as exc:  # damaged content; a storage error raises
        return f"{folder / MANIFEST} is unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    for path, size, sha256 in entries:
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is {path.stat().st_size} bytes, {size} were written"
        if sha256_file(path) != sha256:
            return f"{path} does not match the sha256 it was written with"
    return None
