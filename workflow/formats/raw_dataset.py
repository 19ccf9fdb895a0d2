"""The raw dataset (`paths.raw`): `images/` (image files, any nesting), SOURCE.json (what was fetched,
from where, at which commit, and what was skipped), for a labelled dataset LABELS.json (the class
names, and each image's class by its path under images/) and for a captioned one CAPTIONS.json (each
image's captions by its path). Written by download, read by preprocess.

    images, record = read_raw("data/raw")
    files = list_image_files(images)
    labels = read_raw_labels("data/raw")     # RawLabels(classes, by_path), or None: no labels
    captions = read_raw_captions("data/raw") # {path: [caption, ...]}, or None: no captions
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from workflow.core.artifacts import write_json
from workflow.core.config import ConfigError
from workflow.formats.records import read_record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tiff", ".tif")
SOURCE_FILE = "SOURCE.json"
IMAGES_DIR = "images"
LABELS_FILE = "LABELS.json"
CAPTIONS_FILE = "CAPTIONS.json"


@dataclass(frozen=True)
class RawLabels:
    classes: list[str]  # class index -> name
    by_path: dict[str, int]  # image path relative to images/ (posix) -> class index


def list_image_files(root: str | Path) -> list[Path]:
    """Image files under `root` (recursive, extension case-insensitive), sorted by relative path."""
    root = Path(root)
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def read_raw(raw: str | Path) -> tuple[Path, dict]:
    """The raw images folder and its SOURCE record; ConfigError if `download` has not produced them."""
    raw = Path(raw)
    images, source = raw / IMAGES_DIR, raw / SOURCE_FILE
    if not images.is_dir() or not source.is_file():
        raise ConfigError(
            f"`paths.raw` {str(raw)!r}: no {IMAGES_DIR}/ and {SOURCE_FILE} there "
            "(run `python -m workflow download` first)"
        )
    return images, read_record(source, "download")


def write_raw_labels(folder: Path, labels: RawLabels) -> None:
    """LABELS.json into the raw folder being built; every index must name a class."""
    bad = {path: c for path, c in labels.by_path.items() if not 0 <= c < len(labels.classes)}
    if bad:
        path, c = next(iter(bad.items()))
        raise ConfigError(f"label {c} of {path} is out of range: the dataset has {len(labels.classes)} classes")
    write_json(folder / LABELS_FILE, {"classes": labels.classes, "labels": labels.by_path})


def read_raw_labels(raw: str | Path) -> RawLabels | None:
    path = Path(raw) / LABELS_FILE
    if not path.is_file():
        return None
    record = read_record(path, "download", ("classes", "labels"))
    return RawLabels(list(record["classes"]), dict(record["labels"]))


def write_raw_captions(folder: Path, column: str, by_path: dict[str, list[str]]) -> None:
    """CAPTIONS.json into the raw folder being built: each image's non-empty captions, from `column`."""
    write_json(folder / CAPTIONS_FILE, {"column": column, "captions": by_path})


def read_raw_captions(raw: str | Path) -> dict[str, list[str]] | None:
    path = Path(raw) / CAPTIONS_FILE
    if not path.is_file():
        return None
    return dict(read_record(path, "download", ("captions",))["captions"])
