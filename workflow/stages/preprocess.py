"""Stage preprocess: raw image files -> one uint8 array N x C x H x W + meta.json (+ labels.json).

    python -m workflow preprocess [--params params.yaml]

Reads `<paths.raw>/images/` and `<paths.raw>/SOURCE.json` (written by `download`); writes
`paths.images` (a .npy file, memory-mappable with `numpy.load(..., mmap_mode="r")`) and `paths.meta`
(count, resolution, channels, center_crop, skipped files with reasons, source summary, sha256 of the
array). Each image is EXIF-rotated, converted to L or RGB, and either resized on its shorter side and
centre-cropped (`data.center_crop: true`) or squashed to a square, with PIL's antialiasing bicubic.
A file that cannot be decoded (corrupt, truncated, empty, not an image, or a decompression bomb:
more pixels than PIL.Image.MAX_IMAGE_PIXELS) is skipped and listed with its reason; so are files the
source ignored (no image extension), images too thin to centre-crop (an aspect ratio beyond
1:MAX_ASPECT, where `data.center_crop` is on), and images whose pixels have no known 8-bit range (negative,
wider than 8 bits but not unsigned 16-bit, NaN; 16-bit keeps its top byte, float in [0, 1] is x 255,
values already in [0, 255] stay: `to_8bit`).
Fewer than `data.min_images` usable images is an error naming the count and the commonest reasons.
`data.max_images` takes a subset of the files chosen with `seed`, before decoding, kept in file order.
A labelled dataset (`<paths.raw>/LABELS.json`) gives `paths.labels` the class names and each kept
image's class; an unlabelled one, empty lists. A captioned one (`<paths.raw>/CAPTIONS.json`) gives
`paths.captions` each kept image's captions; an uncaptioned one, an empty list. `data.holdout`
(text-to-image) takes that many of the decoded images, chosen with `seed`, out of the training set
into `paths.holdout_images` and `paths.holdout_captions` (both empty otherwise): FID later scores the
fine-tune on them.
"""

from __future__ import annotations

import collections
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from workflow.core.artifacts import atomic_path, disk_full_guard, sha256_file, write_json
from workflow.core.config import ConfigError, Params
from workflow.core.faults import maybe_fault
from workflow.formats.captions import write_captions
from workflow.formats.labels import write_labels
from workflow.formats.raw_dataset import (
    CAPTIONS_FILE,
    list_image_files,
    read_raw,
    read_raw_captions,
    read_raw_labels,
)
from workflow.formats.training_images import copy_rows, keep_rows, new_images

MODES = {1: "L", 3: "RGB"}
# `data.center_crop` scales the shorter side to the resolution before cropping, so a thin strip of an image
# would first grow into a huge one (1 x 50,000 pixels at 256: 3.3 GB) to keep a sliver: beyond this aspect
# ratio an image is skipped instead, with its reason.
MAX_ASPECT = 64
# What a broken or non-image file raises while PIL decodes it (UnidentifiedImageError is an OSError).
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def load_image(path: str | Path, resolution: int, channels: int, center_crop: bool) -> np.ndarray:
    """One file -> C x resolution x resolution uint8. Raises what PIL raises for a bad file."""
    with warnings.catch_warnings():
        # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those too, before decoding
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if center_crop:
                check_aspect(image.size, resolution)
            image.load()
            image = to_8bit(ImageOps.exif_transpose(image)).convert(MODES[channels])
    image = resize(image, resolution, center_crop)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


class UnsupportedPixels(ValueError):
    """Pixels with no fixed range to map onto 8 bits: the file is skipped with this as its reason."""


class ExtremeAspect(ValueError):
    """An image too thin to centre-crop (beyond MAX_ASPECT): the file is skipped with this as its reason."""


def check_aspect(size: tuple[int, int], resolution: int) -> None:
    short, long = sorted(size)
    if long > MAX_ASPECT * short:
        scaled = round(long * resolution / short)
        raise ExtremeAspect(
            f"{size[0]} x {size[1]} pixels, an aspect ratio beyond 1:{MAX_ASPECT}: `data.center_crop` would scale "
            f"it to {scaled:,} pixels long to keep a {resolution}-pixel square; crop the file, or set "
            "`data.center_crop: false`"
        )


def to_8bit(image: Image.Image) -> Image.Image:
    """Wide grayscale -> 8 bits where the range is known (PIL's own convert("L") would clip at 255):
    unsigned 16-bit (I;16*) by its top byte; values that are 8-bit already (integers, or floats, all in
    [0, 255] with some above 1) as they are, rounded; floats all in [0, 1] scaled by 255. Anything else
    (negative, wider integers, NaN) declares no range we can read, so any mapping would be a guess that
    changes the image: it raises UnsupportedPixels and the file is skipped with that reason."""
    if image.mode.startswith("I;16") and np.asarray(image).dtype.kind == "u":
        return Image.fromarray((np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8))
    if image.mode not in ("I", "F") and not image.mode.startswith("I;"):
        return image
    pixels = np.asarray(image).astype(np.float64)
    if not (np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 255):
        low, high = np.nanmin(pixels), np.nanmax(pixels)
        raise UnsupportedPixels(
            f"{'float' if image.mode == 'F' else 'integer'} pixels (mode {image.mode}) from {low:g} to {high:g}"
            f"{' with NaN or inf' if not np.isfinite(pixels).all() else ''}: no known range to map onto 8 bits; "
            "save the image with 8 or 16 unsigned bits"
        )
    if image.mode == "F" and pixels.max() <= 1:
        pixels = pixels * 255
    return Image.fromarray(np.round(pixels).astype(np.uint8))


def resize(image: Image.Image, resolution: int, center_crop: bool) -> Image.Image:
    """Shorter side to `resolution` then a centred square crop; or straight to a square."""
    if not center_crop:
        return image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def preprocess_images(
    files, resolution: int, channels: int, center_crop: bool, into: Path | None = None
) -> tuple[np.ndarray, list[dict]]:
    """Decode `files` in order -> (N x C x H x W uint8 of those that decode, [{"file", "reason"}] of the rest).
    `into`: decoded straight into that new .npy file (new_images: one row per file, memory-mapped, so memory
    holds one image, not the set), the array returned its first rows; keep_rows then cuts it to them."""
    if channels not in MODES:
        raise ConfigError(f"`data.channels` must be one of {sorted(MODES)}, got {channels!r}")
    shape = (channels, resolution, resolution)
    out = np.empty((len(files), *shape), dtype=np.uint8) if into is None else new_images(into, len(files), shape)
    count, skipped = 0, []
    for path in files:
        try:
            out[count] = load_image(path, resolution, channels, center_crop)
        except DECODE_ERRORS as exc:
            if isinstance(exc, OSError) and exc.errno is not None:  # the storage failed, not the image (PIL's
                raise ConfigError(  # decode errors carry no errno): skipping would silently shrink the dataset
                    f"{path}: cannot read it ({type(exc).__name__}: {exc}); a storage error, not a bad image: "
                    "fix access to the file and re-run"
                ) from exc
            skipped.append({"file": str(path), "reason": f"{type(exc).__name__}: {exc}"})
            continue
        count += 1
        maybe_fault("preprocess.after_image", count)
    return out[:count], skipped


def select_subset(files: list, max_images: int | None, seed: int) -> list:
    """A seeded random subset of `max_images` files, kept in file order; all files if not fewer."""
    if max_images is None or max_images >= len(files):
        return list(files)
    chosen = np.sort(np.random.default_rng(seed).permutation(len(files))[:max_images])
    return [files[i] for i in chosen]


def source_summary(record: dict) -> dict:
    """SOURCE.json without its (possibly long) lists of files used and ignored."""
    return {key: value for key, value in record.items() if key not in ("files", "ignored")}


def check_enough(count: int, minimum: int, skipped: list[dict], root: Path) -> None:
    """ConfigError naming the count and the commonest skip reasons if fewer than `minimum` images decoded."""
    if count >= minimum:
        return
    kinds = collections.Counter(item["reason"].split(":", 1)[0] for item in skipped)
    reasons = "; ".join(f"{kind}: {n}" for kind, n in kinds.most_common(3)) or "none skipped"
    raise ConfigError(
        f"`data.min_images` is {minimum} but only {count} usable images in {str(root)!r} "
        f"({len(skipped)} files skipped; commonest reasons: {reasons}). Fix or add images, "
        "or lower `data.min_images`"
    )


def image_labels(raw: str, root: Path, files: list, skipped: list[dict]) -> tuple[list[str], list[int]]:
    """(class names, the class of each image that decoded, in order); two empty lists for unlabelled data."""
    raw_labels = read_raw_labels(raw)
    if raw_labels is None:
        return [], []
    failed = {item["file"] for item in skipped}
    kept = [Path(f).relative_to(root).as_posix() for f in files if str(f) not in failed]
    unlabelled = [name for name in kept if name not in raw_labels.by_path]
    if unlabelled:
        raise ConfigError(f"{raw}: {unlabelled[0]} has no label in LABELS.json; re-run the download stage")
    return raw_labels.classes, [raw_labels.by_path[name] for name in kept]


def image_captions(raw: str, root: Path, files: list, skipped: list[dict]) -> list[list[str]]:
    """Each decoded image's captions, in order; an empty list for an uncaptioned dataset."""
    raw_captions = read_raw_captions(raw)
    if raw_captions is None:
        return []
    failed = {item["file"] for item in skipped}
    kept = [Path(f).relative_to(root).as_posix() for f in files if str(f) not in failed]
    missing = [name for name in kept if name not in raw_captions]
    if missing:
        raise ConfigError(f"{raw}: {missing[0]} has no caption in {CAPTIONS_FILE}; re-run the download stage")
    return [raw_captions[name] for name in kept]


def holdout_split(count: int, holdout: int, minimum: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, held-out indices), each sorted: `holdout` of `count` chosen with `seed`."""
    if holdout and count - holdout < minimum:
        raise ConfigError(
            f"`data.holdout` ({holdout}) leaves {count - holdout} of the {count} usable images for training, "
            f"below `data.min_images` ({minimum}): hold out fewer, or lower `data.min_images`"
        )
    chosen = np.random.default_rng([seed, 1]).permutation(count)[:holdout]  # its own stream: max_images' is [seed]
    held = np.zeros(count, dtype=bool)
    held[chosen] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def run(params: Params) -> dict:
    """The whole stage: read paths.raw, write paths.images and paths.meta; return the meta record."""
    data = params.data
    root, record = read_raw(params.paths.raw)
    files = select_subset(list_image_files(root), data.max_images, params.seed)
    # The images are decoded straight into their file (memory-mapped) in its atomic temporary, then the
    # held-out rows are copied out and the file is cut down to the training rows in place: memory holds an
    # image or a chunk of rows, never the set. The holdout's temporary is opened first, so it is put in place
    # after the images (the biggest file): a failure before then leaves nothing of this run.
    with atomic_path(params.paths.holdout_images) as held_path, atomic_path(params.paths.images) as images_path:
        array, skipped = preprocess_images(files, data.resolution, data.channels, data.center_crop, images_path)
        classes, labels = image_labels(params.paths.raw, root, files, skipped)
        captions = image_captions(params.paths.raw, root, files, skipped)
        for item in skipped:
            item["file"] = Path(item["file"]).relative_to(root).as_posix()
        skipped = record.get("ignored", []) + record.get("skipped", []) + skipped  # the source's, then ours
        check_enough(len(array), data.min_images, skipped, root)
        kept, held = holdout_split(len(array), data.holdout, data.min_images, params.seed)
        with disk_full_guard(params.paths.holdout_images):  # inside the images' guard, which would blame them
            copy_rows(array, held, new_images(held_path, len(held), array.shape[1:]))
        keep_rows(images_path, array, kept)
        del array  # a map of rows past the file's new end
        held_captions = [captions[i] for i in held] if captions else []
        if len(held):
            labels = [labels[i] for i in kept] if labels else labels
            captions = [captions[i] for i in kept] if captions else captions
        meta = {
            "count": len(kept),
            "resolution": data.resolution,
            "channels": data.channels,
            "center_crop": data.center_crop,
            "max_images": data.max_images,
            "seed": params.seed,
            "skipped": skipped,
            "source": source_summary(record),
            "classes": len(classes),
            "captions": sum(map(len, captions)),
            "holdout": len(held),
            "images_sha256": sha256_file(images_path),
        }
    write_captions(params.paths.holdout_captions, held_captions)
    write_labels(params.paths.labels, classes, labels)
    write_captions(params.paths.captions, captions)
    write_json(params.paths.meta, meta)
    return meta


def headline(meta: dict, params: Params) -> str:
    return (
        f"preprocess: {meta['count']} images, {meta['channels']} x {meta['resolution']} x "
        f"{meta['resolution']}, {len(meta['skipped'])} skipped -> {params.paths.images}"
    )
