"""The sample set (`paths.samples`): 000000.png, 000001.png, ... (image i is sample i) and samples.json,
the sampler's settings with count, seconds, images_per_second and resumed_from. Written by the sample
stage, read by evaluate (and the FID benchmark). An interrupted write resumes: the set grows in
`.<name>.partial/images/`, with partial.json beside it after every batch, and is renamed into place
whole.

    grid_images, record = write_sample_set(batches_from, 1000, 250, "data/samples", range(16), settings, identity)
    images = load_samples("data/samples")                     # uint8 N x 3 x H x W, in sample order, lazily
    read_sample_record("data/samples", ("seconds",))          # from samples.json
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from workflow.core.artifacts import disk_full_guard, publish_folder, remove, try_lock, write_json
from workflow.core.config import ConfigError
from workflow.core.faults import maybe_fault
from workflow.formats.png import to_pil
from workflow.formats.records import read_record

RECORD = "samples.json"


def write_sample_set(
    batches_from: Callable[[int], Iterator[tuple[int, np.ndarray]]],
    count: int,
    batch_size: int,
    folder: str,
    keep: Sequence[int],
    settings: dict,
    identity: dict,
) -> tuple[np.ndarray, dict]:
    """Stream the (first index, uint8 B x H x W x C) batches of `batches_from(start)` (`batch_size` images
    each, `start` a multiple of it) into `folder` as 000000.png ... (images start .. count - 1); return the
    images whose indices `keep` lists (each below count), in its order, and the record of samples.json:
    `settings` plus count, seconds, images_per_second and resumed_from. Only those images are held.

    The set grows in `.<folder>.partial/images/`, with partial.json beside it after every batch, and
    is renamed into place when complete. A run that was killed is resumed from its last whole batch by
    the next run whose `settings` and `identity` (what else decides the images: weights, seed, batch
    size, code, software) are the same; another run leaves it alone until its own first batch, then
    starts afresh. `seconds` adds up the runs' sampling of the images kept."""
    final = Path(folder)
    work = partial_folder(final)
    images = work / "images"
    key = hashlib.sha256(json.dumps({"settings": settings, "identity": identity}, sort_keys=True).encode()).hexdigest()
    with disk_full_guard(final), _writing(work, final):
        done, earlier_seconds = _resume_point(work, key, count, batch_size)
        wanted = set(keep)
        try:
            kept = {i: _read_png(images / png_name(i)) for i in sorted(wanted) if i < done}
        except ConfigError:  # a damaged PNG (a power cut: nothing is fsynced) would fail every resume alike
            done, earlier_seconds, kept = 0, 0.0, {}
        tidied = False
        started = time.perf_counter()
        for first, batch in batches_from(done) if done < count else iter(()):
            if not tidied:  # only now: a run that fails before its first batch leaves another's partial set be
                tidied = _tidy(images, done)
            for k, image in enumerate(batch):
                to_pil(image).save(images / png_name(first + k))
                maybe_fault("sample.after_image", first + k + 1)
            # copies: a view would hold its whole batch in memory
            kept.update((first + k, image.copy()) for k, image in enumerate(batch) if first + k in wanted)
            seconds = earlier_seconds + time.perf_counter() - started
            write_json(work / PROGRESS, {"key": key, "done": first + len(batch), "seconds": seconds})
        if not tidied:  # every image made by earlier runs: drop those past `count`
            _tidy(images, done)
        seconds = earlier_seconds + time.perf_counter() - started
        record = {
            **settings,
            "count": count,
            "seconds": seconds,
            "images_per_second": count / seconds if seconds > 0 else 0.0,
            "resumed_from": done,
        }
        write_json(images / RECORD, record)
        publish_folder(images, final)
        (work / PROGRESS).unlink(missing_ok=True)
    return np.array([kept[i] for i in keep], dtype=np.uint8), record


PARTIAL_SUFFIX = ".partial"
PROGRESS = "partial.json"
LOCK = "lock"


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def partial_folder(folder: Path) -> Path:
    """Where the set `folder` grows: images/, partial.json and the writers' lock file."""
    return folder.parent / f".{folder.name}{PARTIAL_SUFFIX}"


@contextlib.contextmanager
def _writing(work: Path, folder: Path) -> Iterator[None]:
    """Hold the set's lock file (kept, so that a lock is never on a file another writer could replace):
    a second writer of the same set is refused rather than mixed in."""
    work.mkdir(parents=True, exist_ok=True)
    try:
        handle = try_lock(work / LOCK)
    except OSError as exc:  # a file system without flock (NFS without lockd, Lustre without -o flock)
        warnings.warn(f"{folder}: cannot lock {work / LOCK} ({exc}); not guarded against a second writer", stacklevel=3)
        yield
        return
    if handle is None:
        raise ConfigError(f"{folder}: another process is writing this sample set (in {work})")
    with handle:
        yield


def _resume_point(work: Path, key: str, count: int, batch_size: int) -> tuple[int, float]:
    """(images already made that this run keeps, their sampling seconds): (0, 0.0) unless the progress in
    `work` is for the same `key` and its images are all there. Past `count` only `count` are kept; short
    of it, whole batches, so that the rest are made in the uninterrupted run's batches."""
    progress = {}
    with contextlib.suppress(OSError, ValueError):
        progress = json.loads((work / PROGRESS).read_text())
    if not isinstance(progress, dict) or progress.get("key") != key:
        return 0, 0.0
    saved, seconds = int(progress.get("done", 0)), float(progress.get("seconds", 0.0))
    done = min(saved, count)
    if done < count:
        done -= done % batch_size
    if not all((work / "images" / png_name(i)).is_file() for i in range(done)):
        return 0, 0.0
    return done, seconds * done / saved if saved else 0.0


def _tidy(images: Path, done: int) -> bool:
    """Leave `images` (created if need be) holding images 0 .. done - 1 only: not a batch cut short, nor
    another run's images."""
    images.mkdir(parents=True, exist_ok=True)
    wanted = {png_name(i) for i in range(done)}
    for entry in images.iterdir():
        if entry.name not in wanted:
            remove(entry)
    return True


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
