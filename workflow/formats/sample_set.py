"""The sample set (`paths.samples`): 000000.png, 000001.png, ... (image i is sample i) and samples.json,
the sampler's settings with count, seconds and images_per_second. Written by the sample stage, read by
evaluate (and the FID benchmark).

    grid_images, record = write_sample_set(batches, "data/samples", keep=16, settings={...})
    images = load_samples("data/samples")                     # uint8 N x 3 x H x W, in sample order
    read_sample_record("data/samples", ("seconds",))          # from samples.json
"""

from __future__ import annotations

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


def load_samples(folder: str | Path) -> np.ndarray:
    """uint8 (N, 3, H, W) from the *.png files in `folder`, sorted by name (L is replicated to RGB)."""
    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise ConfigError(f"{folder} (`paths.samples`): no *.png samples; the sample stage makes them")
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ConfigError(f"{folder}: samples differ in size {sorted(sizes)}; re-run the sample stage")
    return np.stack(arrays).transpose(0, 3, 1, 2)


def read_sample_record(folder: str | Path, keys=()) -> dict:
    return read_record(Path(folder) / RECORD, "sample", keys)
