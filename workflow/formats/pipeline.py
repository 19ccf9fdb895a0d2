"""The trained pipeline (`paths.trained`): a diffusers DDPMPipeline folder, EMA weights as safetensors,
with a manifest (size and sha256 of every file) so that a damaged copy is refused, naming the file. A
class-conditional UNet (its config's num_class_embeds) comes with class_names.json: the name of each
class index (the last embedding row, "no class", has none).

    save_pipeline(unet, noise_scheduler, "models/trained", class_names)   # train
    unet, scheduler_config = load_unet("models/trained", device)         # sample, fid_sweep
    load_class_names("models/trained")                                   # [] for an unconditional UNet
    check_pipeline("models/trained")                                     # package
"""

from __future__ import annotations

from pathlib import Path

import torch

from workflow.core.artifacts import atomic_dir, manifest_damage, write_json, write_manifest
from workflow.core.config import ConfigError
from workflow.formats.records import read_record

CLASS_NAMES_FILE = "class_names.json"


def save_pipeline(unet: torch.nn.Module, noise_scheduler, path: str | Path, class_names=()) -> None:
    """The pipeline, published whole (built under a temporary name), weights in safetensors."""
    from diffusers import DDPMPipeline

    with atomic_dir(path) as out:
        pipeline = DDPMPipeline(unet=unet.to(memory_format=torch.contiguous_format), scheduler=noise_scheduler)
        pipeline.save_pretrained(out, safe_serialization=True)
        if class_names:
            write_json(out / CLASS_NAMES_FILE, {"classes": list(class_names)})
        write_manifest(out)


def check_pipeline(path: str | Path) -> None:
    """Refuse a missing pipeline, or one whose files no longer match the manifest train wrote (naming the file)."""
    if not (Path(path) / "model_index.json").is_file():
        raise ConfigError(f"{path} holds no trained pipeline: run the train stage first")
    problem = manifest_damage(path)
    if problem is not None:
        raise ConfigError(f"{path} is damaged ({problem}): re-run the train stage (`dvc repro --force train`)")


def load_unet(path: str | Path, device: torch.device):
    """(UNet with the saved EMA weights, the training noise schedule's config) from a saved DDPMPipeline,
    checked first (check_pipeline)."""
    from diffusers import DDPMPipeline

    check_pipeline(path)
    try:
        pipeline = DDPMPipeline.from_pretrained(str(path), use_safetensors=True)  # never unpickles weights
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: not a loadable pipeline with safetensors weights ({type(exc).__name__}: "
            f"{str(exc)[:300]}); re-run the train stage"
        ) from None
    return pipeline.unet.to(device), pipeline.scheduler.config


def load_class_names(path: str | Path) -> list[str]:
    """The class names of a class-conditional pipeline; [] for an unconditional one."""
    file = Path(path) / CLASS_NAMES_FILE
    return list(read_record(file, "train", ("classes",))["classes"]) if file.is_file() else []
