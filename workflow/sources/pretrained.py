"""Pretrained pipelines (`model.pretrained`) -> `<paths.base_model>/`: the parts of a diffusers Stable
Diffusion pipeline that fine-tuning reads, + BASE.json (workflow/formats/base_model.py).

    from workflow.sources.pretrained import fetch_pretrained
    record = fetch_pretrained(params)       # what BASE.json holds

  hf:<owner>/<name>   a model repository on the Hub or a mirror (HF_ENDPOINT) at the commit `model.revision`
                      resolves to, with the dataset source's offline reuse, retries and token hygiene
                      (workflow/sources/hub.py)
  folder:<path>       a local pipeline folder, as `save_pretrained` writes one; <path> must be `model.folder`
  (null)              no pretrained model: BASE.json says so, nothing else is written

Only `model_index.json` and, of the five parts (unet, vae, text_encoder, tokenizer, scheduler), the
configs, the tokenizer's files and the default-variant safetensors weights are taken: never a pickle
(.bin, .ckpt), never the fp16/ema variants, the safety checker or the feature extractor. The folder is
built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from workflow.core.artifacts import atomic_dir, sha256_file
from workflow.core.config import ConfigError, Params
from workflow.formats.base_model import INDEX_FILE, PARTS, WEIGHTED_PARTS, write_base

PIPELINE_CLASSES = ("StableDiffusionPipeline",)  # SD 1.x and 2.x: one text encoder, one UNet
WEIGHTS = re.compile(r"(diffusion_pytorch_model|model)(-\d{5}-of-\d{5})?\.safetensors")
WEIGHTS_INDEX = re.compile(r"(diffusion_pytorch_model|model)\.safetensors\.index\.json")
SETTINGS = re.compile(r"[^/]+\.(json|txt)")  # configs, tokenizer vocabularies and merges
PICKLES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


@dataclass(frozen=True)
class PipelineFiles:
    """What to take of a pipeline repository or folder: paths relative to its root, sorted."""

    class_name: str
    files: list[str]


def pipeline_files(root: Path, listing: dict[str, int], where: str) -> PipelineFiles:
    """The files of the pipeline whose `model_index.json` is in `root` and whose files are `listing`."""
    index = read_index(root / INDEX_FILE, where)
    missing = [name for name in PARTS if name not in index]
    if missing:
        raise ConfigError(f"{where}: {INDEX_FILE} lists no {', '.join(missing)}: not a Stable Diffusion pipeline")
    chosen = [INDEX_FILE]
    for name in PARTS:
        inside = sorted(path.split("/", 1)[1] for path in listing if path.startswith(f"{name}/"))
        inside = [path for path in inside if "/" not in path]  # the part's own files, not sub-folders
        weights = [f for f in inside if WEIGHTS.fullmatch(f) or WEIGHTS_INDEX.fullmatch(f)]
        settings = [f for f in inside if SETTINGS.fullmatch(f) and f not in weights]
        if name in WEIGHTED_PARTS and not any(WEIGHTS.fullmatch(f) for f in weights):
            pickles = [f for f in inside if f.endswith(PICKLES + (".safetensors",))]
            raise ConfigError(
                f"{where}: {name}/ has no safetensors weights in diffusers' default names "
                f"({', '.join(pickles) or 'no weight files at all'}); only those are loaded: a pickle "
                "(.bin, .ckpt) can run code when loaded. Convert it once with save_pretrained(safe_serialization=True)"
            )
        if not settings:
            raise ConfigError(f"{where}: {name}/ has no configuration (.json) files")
        chosen += [f"{name}/{f}" for f in settings + weights]
    return PipelineFiles(index["_class_name"], sorted(chosen))


def read_index(path: Path, where: str) -> dict:
    if not path.is_file():
        raise ConfigError(f"{where}: no {INDEX_FILE}: not a diffusers pipeline (save one with save_pretrained)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {INDEX_FILE} is not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("_class_name") not in PIPELINE_CLASSES:
        found = index.get("_class_name") if isinstance(index, dict) else None
        raise ConfigError(
            f"{where}: {INDEX_FILE} is a {found!r}, not a {' or '.join(PIPELINE_CLASSES)}: fine-tuning reads "
            "a Stable Diffusion 1.x or 2.x pipeline (one text encoder, one UNet)"
        )
    return index


def local_listing(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def copy_pipeline(root: Path, chosen: PipelineFiles, out: Path) -> list[dict]:
    """Copy the chosen files from `root` into `out`; their entries. model_index.json is rewritten to list
    only the parts taken, so `StableDiffusionPipeline.from_pretrained(out)` loads what is there."""
    for name in chosen.files:
        source, target = root / name, out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(os.path.realpath(source), target)  # the Hub cache's symlinks: their blobs
    index = json.loads((out / INDEX_FILE).read_text())
    kept = {key: value for key, value in index.items() if key.startswith("_") or key in PARTS}
    others = {key: [None, None] for key, value in index.items() if key not in kept and isinstance(value, list)}
    flags = {"requires_safety_checker": False} if "requires_safety_checker" in index else {}
    (out / INDEX_FILE).write_text(json.dumps({**kept, **others, **flags}, indent=2, sort_keys=True) + "\n")
    return [{"path": n, "size": (out / n).stat().st_size, "sha256": sha256_file(out / n)} for n in chosen.files]


def fetch_pretrained(params: Params) -> dict:
    """Fetch `params.model.pretrained` into `params.paths.base_model`; return the BASE record."""
    model = params.model
    with atomic_dir(params.paths.base_model) as work:
        if model.kind is None:
            record = {"kind": "none"}
        elif model.kind == "folder":
            record = fetch_folder(Path(model.location), work)
        else:
            record = fetch_hub(model.location, model.revision, work)
        write_base(work, record)
    return record


def fetch_folder(root: Path, out: Path) -> dict:
    where = f"`model.pretrained` folder:{root}"
    if not root.is_dir():
        raise ConfigError(f"{where}: no such folder")
    chosen = pipeline_files(root, local_listing(root), where)
    files = copy_pipeline(root, chosen, out)
    return {"kind": "folder", "path": str(root), "class_name": chosen.class_name, "files": files}


def fetch_hub(repo_id: str, revision: str | None, out: Path) -> dict:
    from workflow.sources import hub  # imports huggingface_hub: only the hf source needs it

    env, requested = hub.HubEnv.from_environ(), revision or "main"
    repo = hub.HubRepo(repo_id, "model", "model.pretrained", "model.revision", ("README.md", INDEX_FILE))

    def select(card: Path, listing: dict[str, int]) -> PipelineFiles:
        return pipeline_files(card, listing, f"`model.pretrained` {repo.source!r} at {card.name}")

    sha, snapshot, chosen = hub.snapshot(repo, requested, env, select)
    files = copy_pipeline(snapshot, chosen, out)
    return {
        "kind": "hf",
        "repo_id": repo_id,
        "revision": requested,
        "sha": sha,
        "endpoint": env.host,
        "class_name": chosen.class_name,
        "files": files,
    }
