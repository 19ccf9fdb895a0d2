"""The encoded training set (`paths.latents`, a folder): what text-to-image training reads instead of
running the VAE and the text encoder at every step. Written by encode, read by train.

  ENCODING.json    {"latent": false} for a pixel-space run (nothing else is written); for a latent one:
                   count, views, shapes, the VAE's scaling factor and the inputs' sha256
  mean.npy         N x V x C x h x w: each image's latent distribution mean (view 0: the image,
  logvar.npy       view 1: its mirror image, when train.random_flip), and its log-variance as diffusers
                   clamps it, so training samples mean + exp(logvar / 2) * noise as the VAE would
  text.npy         M x L x D: the text encoder's last hidden states of every caption
                   (these three in the record's `storage` dtype, encode.storage: float16 or float32)
  offsets.npy      int64 N + 1: image i's captions are text[offsets[i]:offsets[i + 1]]

The arrays are .npy files, memory-mapped (copy-on-write) when read. The folder is built under a temporary name and
renamed into place when complete.

    with encoding_writer("data/processed/latents", count, views, latent_shape, captions, text_shape, "float16") as w:
        put(w.mean, slice(i, j), tensor); ...; w.offsets[:] = ...; w.record.update(...)
    encoded = load_encodings("data/processed/latents")   # Encodings(record, mean, logvar, text, offsets)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workflow.core.artifacts import atomic_dir, sha256_file, write_json
from workflow.core.config import ConfigError
from workflow.formats.records import read_record

ENCODING_FILE = "ENCODING.json"
ARRAYS = ("mean", "logvar", "text", "offsets")


@dataclass
class Encodings:
    record: dict
    mean: np.ndarray
    logvar: np.ndarray
    text: np.ndarray
    offsets: np.ndarray


def write_pixel_space(path: str | Path) -> None:
    """The record of a run that trains in pixel space: nothing to encode."""
    with atomic_dir(path) as out:
        write_json(out / ENCODING_FILE, {"latent": False})


@contextlib.contextmanager
def encoding_writer(
    path: str | Path,
    count: int,
    views: int,
    latent_shape: tuple,
    captions: int,
    text_shape: tuple,
    storage: str,
) -> Iterator[Encodings]:
    """Memory-mapped arrays to fill with `put` (and `record` to complete); published whole when the block ends."""
    with atomic_dir(path) as out:
        shapes = {
            "mean": (count, views, *latent_shape),
            "logvar": (count, views, *latent_shape),
            "text": (captions, *text_shape),
            "offsets": (count + 1,),
        }
        arrays = {
            name: np.lib.format.open_memmap(
                out / f"{name}.npy", mode="w+", dtype=np.int64 if name == "offsets" else storage, shape=shape
            )
            for name, shape in shapes.items()
        }
        record = {"latent": True, "storage": storage, "count": count, "views": views}
        record |= {"latent_shape": list(latent_shape), "captions": captions, "text_shape": list(text_shape)}
        encoded = Encodings(record, **arrays)
        yield encoded
        for array in arrays.values():
            array.flush()
        # the arrays' own content: what a run key built on this record names (not just where they came from)
        record["arrays_sha256"] = {name: sha256_file(out / f"{name}.npy") for name in ARRAYS}
        write_json(out / ENCODING_FILE, record)


def put(array: np.ndarray, where, values: np.ndarray, name: str) -> None:
    """array[where] = values, in the array's dtype; a value that becomes infinite there (float16: from
    65,520 up) is an error, as is a non-finite one."""
    if not np.isfinite(values).all():
        raise ConfigError(f"encode: the encoder gave non-finite {name} values (NaN or inf); check model.pretrained")
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        stored = values.astype(array.dtype)
    if not np.isfinite(stored).all():
        raise ConfigError(
            f"encode: the {name} values reach {float(np.abs(values).max()):.4g}, beyond {array.dtype}'s range; "
            "set `encode.storage: float32`"
        )
    array[where] = stored


def encoding_sha256(path: str | Path) -> str:
    """The sha256 of the record: it holds each array's sha256, so this names the encoded content."""
    return sha256_file(Path(path) / ENCODING_FILE)


def load_encodings(path: str | Path) -> Encodings:
    """The encoded set, memory-mapped copy-on-write: writable, as torch.from_numpy wants for training from
    the files' pages (shared by a machine's ranks), a write changing only this process's copy of a page.
    ConfigError if it is not a latent one or is inconsistent."""
    path = Path(path)
    record = read_record(path / ENCODING_FILE, "encode")
    if not record.get("latent"):
        raise ConfigError(f"{path}: encoded for a pixel-space run (no `model.pretrained`); re-run the encode stage")
    required = ("count", "views", "latent_shape", "captions", "text_shape", "scaling_factor", "arrays_sha256")
    missing = [key for key in required if key not in record]
    if missing:
        raise ConfigError(f"{path / ENCODING_FILE}: missing keys {missing}; re-run the encode stage")
    arrays = {}
    for name in ARRAYS:
        try:
            arrays[name] = np.load(path / f"{name}.npy", mmap_mode="c", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path / f'{name}.npy'}: unreadable ({exc}); re-run the encode stage") from None
    encoded = Encodings(record, **arrays)
    storage = record.get("storage", "float32")  # records written before encode.storage held float32
    for name in ("mean", "logvar", "text"):
        if getattr(encoded, name).dtype != np.dtype(storage):
            raise ConfigError(
                f"{path / f'{name}.npy'}: {getattr(encoded, name).dtype}, {ENCODING_FILE} says {storage}; "
                "re-run the encode stage"
            )
    count, views = record["count"], record["views"]
    expected = {
        "mean": (count, views, *record["latent_shape"]),
        "logvar": (count, views, *record["latent_shape"]),
        "text": (record["captions"], *record["text_shape"]),
        "offsets": (count + 1,),
    }
    for name, shape in expected.items():
        if getattr(encoded, name).shape != tuple(shape):
            raise ConfigError(
                f"{path / f'{name}.npy'}: shape {getattr(encoded, name).shape}, {ENCODING_FILE} says "
                f"{tuple(shape)}; re-run the encode stage"
            )
    return encoded
