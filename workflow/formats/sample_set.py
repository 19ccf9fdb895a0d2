"""The sample set (`paths.samples`): 000000.png, 000001.png, ... (image i is sample i) and samples.json,
the sampler's settings with count, seconds and images_per_second. Written by the sample stage, read by
evaluate (and the FID benchmark).

    grid_images, record = write_sample_set(batches, "data/samples", keep=16, settings={...})
    images = load_samples("data/samples")                     # uint8 N x 3 x H x W, in sample order, lazily
    read_sample_record("data/samples", ("seconds",))          # from samples.json
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
from PIL import Image

from workflow.core.artifacts import atomic_dir, write_json
from workflow.core.config import ConfigError
from workflow.core.faults import maybe_fault
from workflow.formats.png import to_pil
from workflow.formats.records import read_record

RECORD = "samples.json"


def write_sample_set(batches, folder: str, keep: int, settings: dict) -> tuple[np.ndarray, dict]:
    """Stream (first index, uint8 B x H x W x C) batches into `folder` as 000000.png ...; return the
    first `keep` images and the record of samples.json: `settings` plus count, seconds and
    images_per_second (sampling and writing, timed together)."""
    kept, count = [], 0
    started = time.perf_counter()
    with atomic_dir(folder) as out:
        for first, images in batches:
            for k, image in enumerate(images):
                to_pil(image).save(out / f"{first + k:06d}.png")
                maybe_fault("sample.after_image", first + k + 1)
            kept.extend(images[: max(0, keep - len(kept))])
            count += len(images)
        seconds = time.perf_counter() - started
        record = {**settings, "count": count, "seconds": seconds, "images_per_second": count / seconds}
        write_json(out / RECORD, record)
    return np.array(kept, dtype=np.uint8), record


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
