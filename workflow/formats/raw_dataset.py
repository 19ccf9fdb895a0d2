"""The raw dataset (`paths.raw`): `images/` (image files, any nesting) and SOURCE.json (what was fetched,
from where, at which commit, and what was skipped). Written by download, read by preprocess.

    images, record = read_raw("data/raw")
    files = list_image_files(images)
"""

from __future__ import annotations

from pathlib import Path

from workflow.core.config import ConfigError
from workflow.formats.records import read_record

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tiff", ".tif")
SOURCE_FILE = "SOURCE.json"
IMAGES_DIR = "images"


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
