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


def make_grid(images: np.ndarray, size: int, padding: int = GRID_PADDING, rows: int | None = None) -> np.ndarray:
    """The first `rows` x `size` images (N x H x W x C; rows defaults to size) tiled row by row on a white
    background, `size` to a row."""
    _, h, w, c = images.shape
    rows = size if rows is None else rows
    grid = np.full((rows * (h + padding) + padding, size * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(images[: rows * size]):
        row, col = divmod(i, size)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def write_grid(images: np.ndarray, size: int, path: str | Path, row_labels: list[str] | None = None) -> None:
    """A size x size grid; with `row_labels`, one row per label (`size` images each), the label written
    at the left of its row."""
    rows = None if row_labels is None else len(row_labels)
    grid = to_pil(make_grid(images, size, rows=rows))
    if row_labels is not None:
        grid = with_row_labels(grid, row_labels, images.shape[1] + GRID_PADDING)
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")


def with_row_labels(grid: Image.Image, labels: list[str], row_height: int) -> Image.Image:
    """`grid` with a white margin on its left holding each row's label, centred on the row (PIL's
    built-in bitmap font: no font file, the same pixels everywhere)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default_imagefont()
    labels = [label.encode("latin-1", "replace").decode("latin-1") for label in labels]  # the font's charset
    draw = ImageDraw.Draw(grid)
    margin = 6 + max(int(draw.textlength(label, font=font)) for label in labels)
    labelled = Image.new(grid.mode, (grid.width + margin, grid.height), "white")
    labelled.paste(grid, (margin, 0))
    draw, ink = ImageDraw.Draw(labelled), "black"
    for row, label in enumerate(labels):
        top, bottom = draw.textbbox((0, 0), label, font=font)[1::2]
        y = GRID_PADDING + row * row_height + (row_height - GRID_PADDING - (bottom - top)) // 2 - top
        draw.text((3, y), label, fill=ink, font=font)
    return labelled


def read_png(path: str | Path, stage: str) -> bytes:
    """The file's bytes, refused (naming the stage that writes it) unless it starts as a PNG does."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE) or len(data) < 24:
        raise ConfigError(f"{path}: not a PNG image; re-run the `{stage}` stage")
    return data
