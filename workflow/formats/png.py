"""PNG images the stages write and the pages read: single images (the sample set), grids of images
(the sample grid, the training progress grids), and reading one back checked.

    write_grid(images, 4, "reports/samples/grid.png")    # the first 16 of uint8 N x H x W x C images
    read_png("reports/samples/grid.png", "sample")        # the bytes, or a ConfigError naming the stage
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from workflow.core.artifacts import atomic_path
from workflow.core.config import ConfigError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID_PADDING = 2


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 H x W x C (C = 1 or 3) as a PIL image (L or RGB)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def make_grid(images: np.ndarray, size: int, padding: int = GRID_PADDING) -> np.ndarray:
    """The first size x size images (N x H x W x C) tiled row by row on a white background."""
    _, h, w, c = images.shape
    grid = np.full((size * (h + padding) + padding, size * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(images[: size * size]):
        row, col = divmod(i, size)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def write_grid(images: np.ndarray, size: int, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        to_pil(make_grid(images, size)).save(tmp, format="PNG")


def read_png(path: str | Path, stage: str) -> bytes:
    """The file's bytes, refused (naming the stage that writes it) unless it starts as a PNG does."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24:
        raise ConfigError(f"{path}: not a PNG image; re-run the `{stage}` stage")
    return data
