"""The training images (`paths.images`): one uint8 array N x C x H x W in a .npy file, memory-mappable;
written by preprocess (with `paths.meta`, a JSON record), read by fid_reference and train.

    sha256 = write_images("data/processed/images.npy", array)
    images = load_images("data/processed/images.npy")          # memory-mapped, read-only
    images = load_images(path, copy_on_write=True)              # memory-mapped, writable in memory only
    subset = Rows(images, [3, 10, 42])                          # those rows, read as they are indexed
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workflow.core.artifacts import atomic_path, sha256_file
from workflow.core.config import ConfigError


def write_images(path: str | Path, array: np.ndarray) -> str:
    """Save `array` as .npy atomically; return its sha256."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)
    return sha256_file(path)


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
