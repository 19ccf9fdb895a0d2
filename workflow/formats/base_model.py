"""The pretrained pipeline (`paths.base_model`): the parts of a diffusers Stable Diffusion pipeline that
text-to-image fine-tuning reads (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`: configs, tokenizer files, safetensors weights) and BASE.json (where they came from: the
repository and commit, or the local folder, and every file's sha256). Without `model.pretrained` the
folder holds BASE.json alone, saying so. Written by download_model, read by encode and train.

    record = read_base("models/base")          # BASE.json; record["kind"]: "hf" | "folder" | "none"
    base_sha256("models/base")                 # names the pipeline by its files' content
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from workflow.core.artifacts import write_json
from workflow.core.config import ConfigError
from workflow.formats.records import read_record

BASE_FILE = "BASE.json"
INDEX_FILE = "model_index.json"  # diffusers' list of a pipeline's components (every pipeline folder has one)
PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")  # what fine-tuning reads
WEIGHTED_PARTS = ("unet", "vae", "text_encoder")


def write_base(folder: Path, record: dict) -> None:
    write_json(Path(folder) / BASE_FILE, record)


def read_base(base: str | Path) -> dict:
    record = read_record(Path(base) / BASE_FILE, "download_model")
    if record.get("kind") not in ("hf", "folder", "none"):
        raise ConfigError(f"{Path(base) / BASE_FILE}: no valid `kind`; re-run the download_model stage")
    return record


def base_sha256(base: str | Path) -> str:
    """A sha256 of the pipeline's content: of its files' (path, sha256) pairs as BASE.json lists them, so a
    pinned revision or another mirror serving the same bytes names the same pipeline."""
    files = sorted((entry["path"], entry["sha256"]) for entry in read_base(base).get("files", []))
    return hashlib.sha256(json.dumps(files).encode()).hexdigest()
