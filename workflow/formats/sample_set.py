"""The sample set (`paths.samples`): 000000.png, 000001.png, ... (image i is sample i) and samples.json,
the sampler's settings with count, seconds, images_per_second and resumed_from. Written by the sample
stage, read by evaluate (and the FID benchmark). An interrupted write resumes: the set grows in
`.<name>.partial/` beside it, with progress.json after every batch, and is renamed into place whole.

    grid_images, record = write_sample_set(batches_from, 1000, "data/samples", 16, settings, identity)
    images = load_samples("data/samples")                     # uint8 N x 3 x H x W, in sample order, lazily
    read_sample_record("data/samples", ("seconds",))          # from samples.json
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from workflow.core.artifacts import atomic_path, disk_full_guard, remove, write_json
from workflow.core.config import ConfigError
from workflow.core.faults import maybe_fault
from workflow.formats.png import to_pil
from workflow.formats.records import read_record

RECORD = "samples.json"


def write_sample_set(
    batches_from: Callable[[int], Iterator[tuple[int, np.ndarray]]],
    count: int,
    folder: str,
    keep: int,
    settings: dict,
    identity: dict,
) -> tuple[np.ndarray, dict]:
    """Stream the (first index, uint8 B x H x W x C) batches of `batches_from(start)` into `folder` as
    000000.png ... (images start .. count - 1); return the first `keep` images and the record of
    samples.json: `settings` plus count, seconds, images_per_second and resumed_from.

    The set grows in a partial folder beside `folder` (PARTIAL_SUFFIX), its progress saved after every
    batch, and is renamed into place when complete. A run that was killed is resumed from its last whole
    batch by the next run whose `settings` and `identity` (what else decides the images: weights, seed,
    batch size, code) are the same; anything else starts afresh. `seconds` adds up the runs' sampling."""
    folder_path = Path(folder)
    partial = partial_folder(folder_path)
    key = hashlib.sha256(json.dumps({"settings": settings, "identity": identity}, sort_keys=True).encode()).hexdigest()
    with disk_full_guard(folder_path), _writing(partial, folder_path):
        done, earlier_seconds = _resume_point(partial, key, count)
        kept = [_read_png(partial / png_name(i)) for i in range(min(keep, done))]
        started = time.perf_counter()
        for first, images in batches_from(done) if done < count else iter(()):
            for k, image in enumerate(images):
                to_pil(image).save(partial / png_name(first + k))
                maybe_fault("sample.after_image", first + k + 1)
            kept.extend(images[: max(0, keep - len(kept))])
            seconds = earlier_seconds + time.perf_counter() - started
            write_json(partial / PROGRESS, {"key": key, "done": first + len(images), "seconds": seconds})
        seconds = earlier_seconds + time.perf_counter() - started
        record = {
            **settings,
            "count": count,
            "seconds": seconds,
            "images_per_second": count / seconds if seconds > 0 else 0.0,
            "resumed_from": done,
        }
        write_json(partial / RECORD, record)
        with atomic_path(folder_path) as work:
            os.replace(partial, work)
            (work / PROGRESS).unlink(missing_ok=True)
    return np.array(kept, dtype=np.uint8), record


PARTIAL_SUFFIX = ".partial"
PROGRESS = "progress.json"


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def partial_folder(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{PARTIAL_SUFFIX}"


@contextlib.contextmanager
def _writing(partial: Path, folder: Path) -> Iterator[None]:
    """Hold the partial folder (created if need be) for this process: a second writer of the same set is
    refused rather than mixed in."""
    partial.mkdir(parents=True, exist_ok=True)
    handle = os.open(partial, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"{folder}: another process is writing this sample set (in {partial})") from None
        yield
    finally:
        os.close(handle)


def _resume_point(partial: Path, key: str, count: int) -> tuple[int, float]:
    """(images already made, their sampling seconds) in `partial`, having removed everything else there
    (a batch cut short, another run's images); (0, 0.0) unless its progress is for the same `key`."""
    progress = {}
    with contextlib.suppress(OSError, ValueError):
        progress = json.loads((partial / PROGRESS).read_text())
    done, seconds = 0, 0.0
    if isinstance(progress, dict) and progress.get("key") == key:
        done = min(int(progress.get("done", 0)), count)
        seconds = float(progress.get("seconds", 0.0))
        if not all((partial / png_name(i)).is_file() for i in range(done)):
            done, seconds = 0, 0.0
    wanted = {png_name(i) for i in range(done)} | ({PROGRESS} if done else set())
    for entry in partial.iterdir():
        if entry.name not in wanted:
            remove(entry)
    return done, seconds


def _read_png(path: Path) -> np.ndarray:
    """One of the set's own PNGs as written, uint8 H x W x C (C = 1 or 3, as to_pil took it)."""
    with readable(path) as image:
        pixels = np.asarray(image)
    return pixels[..., None] if pixels.ndim == 2 else pixels


@contextlib.contextmanager
def readable(file: Path):
    """The open image; a damaged file is named (a storage error, with an errno, propagates as it is)."""
    try:
        with Image.open(file) as image:
            yield image
    except OSError as exc:  # PIL's UnidentifiedImageError and "image file is truncated" carry no errno
        if exc.errno is not None:
            raise
        raise ConfigError(f"{file}: not a readable PNG ({exc}); re-run the sample stage") from exc


class SampleSet:
    """The sample set as uint8 (N, 3, H, W), each PNG decoded when it is indexed (L replicated to RGB): what
    fid.features reads, one batch at a time. Decoded whole, 30,000 samples at 512 px would be 24 GB."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, files: list[Path], size: tuple[int, int]):
        self.files, self.size = files, size

    @property
    def shape(self) -> tuple[int, int, int, int]:
        width, height = self.size
        return (len(self.files), 3, height, width)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return SampleSet(self.files[i], self.size)
        with readable(self.files[i]) as image:
            return np.asarray(image.convert("RGB")).transpose(2, 0, 1)

    def __array__(self, dtype=None, copy=None):  # np.asarray(samples): decode them all
        whole = np.stack([self[i] for i in range(len(self))]) if len(self) else np.zeros(self.shape, np.uint8)
        return whole if dtype is None else whole.astype(dtype)


def load_samples(folder: str | Path) -> SampleSet:
    """The *.png files in `folder`, sorted by name, as uint8 N x 3 x H x W (decoded when read); their sizes
    are checked now, from the PNG headers."""
    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise ConfigError(f"{folder} (`paths.samples`): no *.png samples; the sample stage makes them")
    sizes = set()
    for f in files:
        with readable(f) as image:  # reads the header only
            sizes.add(image.size)
    if len(sizes) > 1:
        raise ConfigError(f"{folder}: samples differ in size {sorted(sizes)}; re-run the sample stage")
    return SampleSet(files, sizes.pop())


def read_sample_record(folder: str | Path, keys=()) -> dict:
    return read_record(Path(folder) / RECORD, "sample", keys)
