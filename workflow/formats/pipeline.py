"""The trained pipeline (`paths.trained`): a diffusers DDPMPipeline folder, the saved weights (EMA
unless train.ema is false) as safetensors, with a manifest (size and sha256 of every file) so that a
damaged copy is refused, naming the file. A class-conditional UNet (its config's num_class_embeds) comes
with class_names.json: the name of each class index (the last embedding row, "no class", has none).

    save_pipeline(unet, noise_scheduler, "models/trained", class_names)   # train
    unet, scheduler_config = load_unet("models/trained", device)         # sample, fid_sweep
    load_class_names("models/trained")                                   # [] for an unconditional UNet
    check_pipeline("models/trained")                                     # package

A text-to-image fine-tune (`model.pretrained`) is a StableDiffusionPipeline folder instead: the
pretrained pipeline's files (`paths.base_model`) with the trained unet/; a LoRA fine-tune is the adapter
alone (pytorch_lora_weights.safetensors, for `load_lora_weights` on the pretrained pipeline). Both with
the manifest.

    save_text_to_image(unet, "models/base", "models/trained", lora=False)   # train
    unet = load_finetuned_unet("models/trained", "models/base", device)      # sample
"""

from __future__ import annotations

from pathlib import Path

import torch

from workflow.core.artifacts import atomic_dir, manifest_damage, write_json, write_manifest
from workflow.core.config import ConfigError
from workflow.formats.base_model import INDEX_FILE
from workflow.formats.records import read_record

CLASS_NAMES_FILE = "class_names.json"
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: save_lora_weights writes, load_lora_weights reads
COPIED_PARTS = ("vae", "text_encoder", "tokenizer", "scheduler")  # a fine-tuned pipeline's parts besides its UNet


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
    if not (Path(path) / INDEX_FILE).is_file():
        raise ConfigError(f"{path} holds no trained pipeline: run the train stage first")
    problem = manifest_damage(path)
    if problem is not None:
        raise ConfigError(f"{path} is damaged ({problem}): re-run the train stage (`dvc repro --force train`)")


def load_unet(path: str | Path, device: torch.device):
    """(UNet with the saved weights, the training noise schedule's config) from a saved DDPMPipeline,
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


def is_lora(path: str | Path) -> bool:
    return (Path(path) / LORA_FILE).is_file()


def save_text_to_image(unet: torch.nn.Module, base: str | Path, path: str | Path, lora: bool) -> None:
    """The fine-tuned UNet (its LoRA adapter alone with `lora`) as a pipeline folder, published whole."""
    import shutil

    from diffusers import StableDiffusionPipeline

    with atomic_dir(path) as out:
        if lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
            StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
        else:
            shutil.copyfile(Path(base) / INDEX_FILE, out / INDEX_FILE)
            for part in COPIED_PARTS:
                shutil.copytree(Path(base) / part, out / part)
            unet.to(memory_format=torch.contiguous_format).save_pretrained(out / "unet", safe_serialization=True)
        write_manifest(out)


def load_finetuned_unet(path: str | Path, base: str | Path, device: torch.device):
    """The fine-tuned UNet2DConditionModel: the saved one, or the pretrained one with the saved LoRA adapter
    (checked first, check_pipeline); safetensors only."""
    from diffusers import UNet2DConditionModel

    check_text_to_image(path)
    try:
        if is_lora(path):
            unet = UNet2DConditionModel.from_pretrained(str(base), subfolder="unet", use_safetensors=True)
            unet.load_lora_adapter(str(path), prefix="unet", weight_name=LORA_FILE, use_safetensors=True)
        else:
            unet = UNet2DConditionModel.from_pretrained(str(path), subfolder="unet", use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{path}: not a loadable fine-tuned UNet with safetensors weights ({type(exc).__name__}: "
            f"{str(exc)[:300]}); re-run the train stage"
        ) from None
    return unet.to(device)


def check_text_to_image(path: str | Path) -> None:
    """Refuse a missing fine-tune, or one whose files no longer match the manifest train wrote."""
    if not (Path(path) / INDEX_FILE).is_file() and not is_lora(path):
        raise ConfigError(f"{path} holds no fine-tuned pipeline: run the train stage first")
    problem = manifest_damage(path)
    if problem is not None:
        raise ConfigError(f"{path} is damaged ({problem}): re-run the train stage (`dvc repro --force train`)")
