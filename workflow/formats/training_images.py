"""The training images (`paths.images`): one uint8 array N x C x H x W in a .npy file, memory-mappable;
written by preprocess (with `paths.meta`, a JSON record), read by fid_reference and train.

    sha256 = write_images("data/processed/images.npy", array)
    images = new_images(tmp, 1000, (3, 64, 64))                 # atomic_path's temporary, written through a map
    copy_rows(images, [4, 7], held)                             # those rows into another, a chunk at a time
    keep_rows(tmp, images, [0, 1, 2])                           # the file cut down to those rows, in place
    images = load_images("data/processed/images.npy")          # memory-mapped, read-only
    images = load_images(path, copy_on_write=True)              # memory-mapped, writable in memory only
    subset = Rows(images, [3, 10, 42])                          # those rows, read as they are indexed
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import numpy as np

from workflow.core.artifacts import atomic_path, sha256_file
from workflow.core.config import ConfigError


def write_images(path: str | Path, array: np.ndarray) -> str:
    """Save `array` as .npy atomically; return its sha256."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return sha256_file(path)


# Rows copied at a time between memory-mapped files (copy_rows, keep_rows): memory holds this much, not the set.
CHUNK_BYTES = 1 << 22


def new_images(path: str | Path, count: int, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy file at `path` (atomic_path's temporary) for `count` uint8 images of `shape` (C x H x W),
    memory-mapped for writing: a writer fills it a row at a time instead of holding the set in memory. Its
    disk space is reserved first, so a full disk is an OSError here (DiskFullError, from atomic_path), not a
    SIGBUS from a page later written through the map. The bytes end up as np.save's of the same array."""
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, *shape))
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        except OSError as exc:  # a filesystem that cannot reserve space: pages are allocated as they are written
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return images


def copy_rows(source: np.ndarray, rows, target: np.ndarray) -> None:
    """target[i] = source[rows[i]], CHUNK_BYTES of rows at a time. `rows` ascending, `target` may be `source`
    itself (rows[i] >= i: each chunk is read whole before it is written, below any row still to be read)."""
    rows = np.asarray(rows, dtype=np.int64)
    step = max(1, CHUNK_BYTES // max(1, source.itemsize * int(np.prod(source.shape[1:]))))
    for start in range(0, len(rows), step):
        chunk = rows[start : start + step]
        if target is not source or chunk[-1] != start + len(chunk) - 1:  # in place and not moving: nothing to do
            target[start : start + len(chunk)] = source[chunk]


def keep_rows(path: str | Path, images: np.memmap, rows) -> None:
    """Cut the .npy file `path`, memory-mapped as `images` (new_images), down to its rows `rows` (ascending),
    in place: the kept rows close up (copy_rows), the header is rewritten for their count and the file
    truncated after the last, so no second copy of the set is made, in memory or on disk. The bytes are
    np.save's of images[rows]: numpy pads a header for the row count's digits to change (at most fewer,
    here) without changing its length. `images`, and any view of it, must not be used afterwards."""
    rows = np.asarray(rows, dtype=np.int64)
    copy_rows(images, rows, images)  # through the map into the page cache, which the header's write() shares
    shape = (len(rows), *images.shape[1:])
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with open(path, "r+b") as f:
        if np.lib.format.read_magic(f) != (1, 0):
            raise RuntimeError(f"{path}: not a version 1.0 .npy header")
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
        if len(header.getvalue()) != offset:
            raise RuntimeError(f"{path}: the header for {shape} is not the length of the one it replaces")
        f.seek(0)
        f.write(header.getvalue())
        f.truncate(offset + len(rows) * int(np.prod(shape[1:], dtype=np.int64)))


def load_images(path: str | Path, copy_on_write: bool = False) -> np.ndarray:
    """The array, memory-mapped read-only; `copy_on_write`: writable (as torch.from_numpy wants), a write
    changing this process's copy of that page only. Either way its pages are the file's, shared by every
    process that maps it (a machine's training ranks, the page cache), not a private copy of the set each."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} (`paths.images`): no such file; the preprocess stage makes it")
    try:
        images = np.load(path, mmap_mode="c" if copy_on_write else "r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # cut short, or not a .npy file
        raise ConfigError(f"{path}: unreadable ({exc}); re-run the preprocess stage") from None
    if isinstance(images, np.lib.npyio.NpzFile):  # np.load opens a zip as an archive, not an array
        images.close()
        raise ConfigError(f"{path}: an .npz archive, not a .npy array; re-run the preprocess stage")
    if images.dtype != np.uint8 or images.ndim != 4:  # anything else would fail far downstream, or train on garbage
        raise ConfigError(
            f"{path}: {images.dtype} of shape {images.shape}, not uint8 N x C x H x W; re-run the preprocess stage"
        )
    return images


class Rows:
    """Rows `index` of a (memory-mapped) array, read one at a time as they are indexed: a reference subset
    of a large set costs no copy of it in memory (`images[index]` would read every chosen row at once)."""

    def __init__(self, array: np.ndarray, index):
        self.array, self.index = array, np.asarray(index)
        self.dtype, self.ndim = array.dtype, array.ndim

    @property
    def shape(self) -> tuple:
        return (len(self.index), *self.array.shape[1:])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.array[self.index[i]])
