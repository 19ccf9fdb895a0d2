"""Stage package: the trained pipeline as a folder the Hugging Face Hub takes as it is, with its model card.

    python -m workflow package [--params params.yaml]
    hf upload <user>/<repo> models/pipeline          # then, to publish it

Reads `paths.trained` (train's DDPMPipeline), `paths.grid` (sample), `paths.metrics` (evaluate),
`<paths.raw>/SOURCE.json` (download), `paths.meta` (preprocess) and `<paths.train_log>/summary.json`
(train). Writes `paths.pipeline`: the trained UNet's files (hard-linked, or copied where links cannot
be made), the scheduler and model_index.json of the sampler the evaluation used (`sample.sampler` on
the training noise schedule, so the pipeline samples as it was scored), `samples.png` (the grid),
README.md (the model card: Hub metadata with the FID and KID and their sample counts, the grid, three
lines that load and sample it, the training params, the hardware) and manifest.json.
Everything in the card comes from those artifacts and params; nothing is typed in by hand.

A class-conditional model is published with `pipeline.py` (workflow/models/class_pipeline.py as it is:
a diffusers pipeline taking `class_labels` and `guidance_scale`) and class_names.json, and its card
lists the classes and loads it with `custom_pipeline`.

A text-to-image fine-tune is a StableDiffusionPipeline folder (every part, the evaluated sampler as its
scheduler), or for LoRA the adapter alone; its card names the pretrained pipeline (`base_model`, with the
commit) and loads it, with `load_lora_weights` for LoRA, and shows the grid of `sample.prompts`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, SchedulerMixin, StableDiffusionPipeline, UNet2DModel
from huggingface_hub import EvalResult, ModelCardData

from workflow.core.artifacts import atomic_dir, write_manifest
from workflow.core.config import ConfigError, Params
from workflow.formats import trainlog
from workflow.formats.base_model import INDEX_FILE, read_base
from workflow.formats.labels import load_labels
from workflow.formats.pipeline import (
    CLASS_NAMES_FILE,
    LORA_FILE,
    check_pipeline,
    check_text_to_image,
    is_lora,
    load_class_names,
)
from workflow.formats.raw_dataset import SOURCE_FILE
from workflow.formats.records import read_record
from workflow.models import class_pipeline
from workflow.models.builders import build_sampler, pretrained_scheduler_config
from workflow.models.sampling import sampled_classes

CARD, GRID = "README.md", "samples.png"
PIPELINES = {"ddpm": DDPMPipeline, "ddim": DDIMPipeline, "dpmsolver++": DDPMPipeline}  # DDIM's takes eta
TASK = "unconditional-image-generation"
CONDITIONAL_TASK = "class-conditional-image-generation"
TEXT_TASK = "text-to-image"
CUSTOM_PIPELINE = "pipeline.py"  # the file name diffusers' `custom_pipeline=<folder>` loads
# what the evaluated sampler sets over the base pipeline's scheduler config (the LoRA card's usage line)
SAMPLER_SETTINGS = ("algorithm_type", "solver_order", "clip_sample", "timestep_spacing")


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights on disk), or a copy across filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def publish_pipeline(params: Params, trained: Path, out: Path) -> tuple[type, SchedulerMixin]:
    """The trained UNet's files in `out`, with the sampler as the pipeline's scheduler.
    Returns (the pipeline's class, the sampler)."""
    for path in sorted((trained / "unet").rglob("*")):
        if path.is_file():
            link_or_copy(path, out / path.relative_to(trained))
    sampler = build_sampler(
        params.sample.sampler, DDPMScheduler.load_config(trained / "scheduler"), params.sample.timestep_spacing
    )
    pipeline_class = PIPELINES[params.sample.sampler]
    if load_class_names(trained):  # class-conditional: our pipeline, shipped beside the weights
        pipeline_class = class_pipeline.ClassConditionalPipeline
        shutil.copyfile(class_pipeline.__file__, out / CUSTOM_PIPELINE)
        shutil.copyfile(trained / CLASS_NAMES_FILE, out / CLASS_NAMES_FILE)
    with torch.device("meta"):  # only its class is recorded in model_index.json: nothing is loaded
        unet = UNet2DModel.from_config(UNet2DModel.load_config(trained / "unet"))
    pipeline_class(unet=unet, scheduler=sampler).save_config(out)  # model_index.json, as save_pretrained
    sampler.save_pretrained(out / "scheduler")
    return pipeline_class, sampler


def publish_text_to_image(params: Params, trained: Path, out: Path) -> tuple[type, SchedulerMixin]:
    """The fine-tune's files in `out` (every part, or the LoRA adapter alone), a full pipeline with the
    evaluated sampler as its scheduler. Returns (StableDiffusionPipeline, the sampler)."""
    sampler = build_sampler(
        params.sample.sampler, pretrained_scheduler_config(params.paths.base_model), params.sample.timestep_spacing
    )
    if is_lora(trained):
        link_or_copy(trained / LORA_FILE, out / LORA_FILE)
        return StableDiffusionPipeline, sampler
    for path in sorted(trained.rglob("*")):
        parts = path.relative_to(trained).parts
        if path.is_file() and len(parts) > 1 and parts[0] != "scheduler":
            link_or_copy(path, out / path.relative_to(trained))
    sampler.save_pretrained(out / "scheduler")
    index = json.loads((trained / INDEX_FILE).read_text())
    index["scheduler"] = ["diffusers", type(sampler).__name__]
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return StableDiffusionPipeline, sampler


def model_name(params: Params) -> str:
    data = params.data
    dataset = Path(data.location).name if data.kind != "builtin" else data.location
    if params.model.pretrained is not None:
        base = Path(params.model.location).name
        return f"{base}-{'lora-' if params.train.lora_rank else ''}{dataset}-{data.resolution}px"
    return f"ddpm-{dataset}-{data.resolution}px"


def reference_set(params: Params) -> str:
    """What FID compared the samples with: held-out images (`data.holdout`, text-to-image) or training images."""
    return "held-out images" if params.data.holdout else "training images"


def base_line(base: dict) -> str:
    """Where the pretrained pipeline came from, as the card says it."""
    if base["kind"] == "hf":
        return (
            f"[`{base['repo_id']}`](https://huggingface.co/{base['repo_id']}) at commit `{base['sha']}` "
            f"(requested `{base['revision']}`, fetched from {base['endpoint']})"
        )
    return f"a local pipeline folder (`{local_name(base['path'])}`)"


def local_name(path: str) -> str:
    """A local folder as a published card names it: a path inside the project as it is, any other by its
    own name alone, not where it lies on the author's disk."""
    inside = not Path(path).is_absolute() and ".." not in Path(path).parts and not str(path).startswith("~")
    return str(path) if inside else (Path(path).name or "folder")


def published_recipe(params: Params, sections: tuple) -> dict:
    """The params the card shows, local folders named by local_name."""
    recipe = {"seed": params.seed, **{k: params.to_dict()[k] for k in sections}}
    data, model = recipe["data"], recipe["model"]
    data["folder"] = local_name(data["folder"])
    if params.data.kind == "imagefolder":
        data["source"] = f"imagefolder:{local_name(params.data.location)}"
    model["folder"] = local_name(model["folder"])
    if params.model.kind == "folder":
        model["pretrained"] = f"folder:{local_name(params.model.location)}"
    return recipe


def card_metadata(
    params: Params,
    source: dict,
    metrics: dict,
    sampler: SchedulerMixin,
    class_names: list[str],
    base: dict | None = None,
    sampled: list[int] = (),
) -> ModelCardData:
    """The YAML front matter the Hub reads: library, tags, dataset (with its pinned commit), FID and KID;
    a fine-tune's base model."""
    hf = source["kind"] == "hf"
    local = local_name(source["path"]) if source["kind"] == "imagefolder" else None
    names = {
        "hf": lambda: source["repo_id"],
        "imagefolder": lambda: local,
        "builtin": lambda: f"{source['name']} ({source['package']} {source['package_version']})",
    }
    dataset = {
        "dataset_type": source["repo_id"] if hf else f"{source['kind']}:{local or source['name']}",
        "dataset_name": names[source["kind"]](),
        **(
            {
                "dataset_config": source.get("config"),
                "dataset_split": source["split"],
                "dataset_revision": source["sha"],
            }
            if hf
            else {}
        ),
    }  # config: recorded by newer downloads
    s = params.sample
    args = {
        "num_samples": metrics["fid_num_samples"],
        "num_reference": metrics["fid_num_reference"],
        "sampler": s.sampler,
        "num_inference_steps": s.num_inference_steps,
        "timestep_spacing": sampler.config.timestep_spacing,
        "eta": s.applied_eta,
        "inception_sha256": metrics["fid_weights_sha256"],
    }
    counts = f"{metrics['fid_num_samples']} samples vs {metrics['fid_num_reference']} {reference_set(params)}"
    task = CONDITIONAL_TASK if class_names else TASK
    if class_names:
        args.update(guidance_scale=s.guidance_scale, classes=len(sampled))
    if base is not None:
        task = TEXT_TASK
        prompts = f"the first caption of each of the {reference_set(params)}"
        args.update(guidance_scale=s.guidance_scale, prompts=prompts)
    results = [
        EvalResult(
            task_type=task,
            task_name=task.replace("-", " ").capitalize(),
            **dataset,
            metric_type=kind,
            metric_value=metrics[kind],
            metric_args=args,
            metric_name=f"{kind.upper()} (clean-fid, {counts})",
        )
        for kind in ("fid", "kid")
    ]
    if base is not None:
        lora = ["lora"] if params.train.lora_rank else []
        return ModelCardData(
            library_name="diffusers",
            pipeline_tag=TEXT_TASK,
            tags=["diffusers", TEXT_TASK, "stable-diffusion", "stable-diffusion-diffusers", *lora],
            base_model=base["repo_id"] if base["kind"] == "hf" else None,
            datasets=[source["repo_id"]] if hf else None,
            model_name=model_name(params),
            eval_results=results,
        )
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag=None if class_names else TASK,  # the Hub has no class-conditional task
        tags=["diffusers", task, "ddpm", *(["classifier-free-guidance"] if class_names else [])],
        datasets=[source["repo_id"]] if hf else None,
        model_name=model_name(params),
        eval_results=results,
    )


def dataset_line(source: dict) -> str:
    if source["kind"] == "hf":
        return (
            f"[`{source['repo_id']}`](https://huggingface.co/datasets/{source['repo_id']}) at commit "
            f"`{source['sha']}` (requested `{source['revision']}`, split `{source['split']}`, "
            f"fetched from {source['endpoint']})"
        )
    if source["kind"] == "builtin":
        return (
            f"`builtin:{source['name']}`, the {source['count']:,} images inside the PyPI package "
            f"{source['package']} {source['package_version']} (`{source['data_file']}`, sha256 "
            f"`{source['data_file_sha256']}`)"
        )
    return f"a local image folder (`{local_name(source['path'])}`)"


def text_usage(params: Params, base: dict) -> str:
    """Lines that load the fine-tune and generate from a prompt (tests execute them from this card)."""
    s, data, where = params.sample, params.data, params.paths.pipeline
    negative = f", negative_prompt={s.negative_prompt!r}" if s.negative_prompt is not None else ""
    negative += "" if s.applied_eta is None else f", eta={s.eta}"  # diffusers' default is 0
    generate = (
        f"images = pipeline([{s.prompts[0]!r}] * {s.grid_size}, height={data.resolution}, width={data.resolution}, "
        f"num_inference_steps={s.num_inference_steps}, guidance_scale={s.guidance_scale!r}{negative}).images"
        f"  # {s.grid_size} PIL images\n```\n"
    )
    if not params.train.lora_rank:
        return (
            f"```python\nfrom diffusers import StableDiffusionPipeline\n"
            f'pipeline = StableDiffusionPipeline.from_pretrained({where!r})  # or "<user>/<repo>" once uploaded\n'
            + generate
        )
    if base["kind"] == "hf":
        load = f'"{base["repo_id"]}", revision="{base["sha"]}")'
    else:
        load = (
            f"{params.paths.base_model!r})  # the pretrained pipeline, from a local folder {local_name(base['path'])!r}"
        )
    sampler = build_sampler(s.sampler, pretrained_scheduler_config(params.paths.base_model), s.timestep_spacing)
    settings = {key: sampler.config[key] for key in SAMPLER_SETTINGS if key in sampler.config}
    arguments = "".join(f", {key}={value!r}" for key, value in settings.items())
    name = type(sampler).__name__
    return (
        f"```python\nfrom diffusers import {name}, StableDiffusionPipeline\n"
        f"pipeline = StableDiffusionPipeline.from_pretrained({load}\n"
        f"pipeline.load_lora_weights({where!r})  # this LoRA adapter (rank {params.train.lora_rank})\n"
        f"pipeline.scheduler = {name}.from_config(pipeline.scheduler.config{arguments})  # the evaluated sampler\n"
        + generate
    )


def usage(params: Params, pipeline_class: type, class_names: list[str], sampled: list[int] = ()) -> str:
    """Three lines that load and sample the published folder (tests execute them from this card)."""
    s, data = params.sample, params.data
    n, name = s.grid_size**2, pipeline_class.__name__
    if class_names:
        where, first = params.paths.pipeline, sampled[0]  # a class the evaluation sampled: one with images
        return (
            f"```python\nfrom diffusers import DiffusionPipeline\n"
            f"pipeline = DiffusionPipeline.from_pretrained({where!r}, custom_pipeline={where!r}, "
            f"trust_remote_code=True)  # runs {CUSTOM_PIPELINE}: read it first\n"
            f"images = pipeline(class_labels=[{first}] * {s.grid_size}, guidance_scale={s.guidance_scale!r}, "
            f"num_inference_steps={s.num_inference_steps}"
            f"{'' if s.applied_eta is None else f', eta={s.eta}'}).images"
            f"  # {s.grid_size} PIL images of class {class_names[first]!r}, {data.resolution}x{data.resolution}\n```\n"
        )
    eta = f", eta={s.eta}" if pipeline_class is DDIMPipeline else ""
    return (
        f"```python\nfrom diffusers import {name}\n"
        f'pipeline = {name}.from_pretrained({params.paths.pipeline!r})  # or "<user>/<repo>" once uploaded\n'
        f"images = pipeline(batch_size={n}, num_inference_steps={s.num_inference_steps}{eta}).images"
        f"  # {n} PIL images, {data.resolution}x{data.resolution}\n```\n"
    )


def description(
    params: Params, source: dict, meta: dict, summary: dict, class_names: list[str], base: dict | None = None
) -> str:
    d = params.data
    if base is not None:
        how = (
            f"a LoRA adapter of rank {params.train.lora_rank}, {summary['trainable_parameters']:,} parameters, on "
            "its UNet's attention projections"
            if params.train.lora_rank
            else f"its whole UNet, {summary['num_parameters']:,} parameters"
        )
        return (
            f"A text-to-image model: a Stable Diffusion pipeline ({base_line(base)}) fine-tuned ({how}) on "
            f"{meta['count']:,} captioned images of {dataset_line(source)}, at {d.resolution}x{d.resolution} px, "
            "from latents and caption embeddings the pipeline's VAE and text encoder computed once. The grid has "
            f"one row per prompt; the evaluation sampled with guidance scale {params.sample.guidance_scale:g}.\n"
        )
    trained = (
        f"a diffusers `UNet2DModel` ({summary['num_parameters']:,} parameters) trained as a DDPM on "
        f"{meta['count']:,} images of {dataset_line(source)}, at {d.resolution}x{d.resolution} px with "
        f"{d.channels} channel(s)"
    )
    if not class_names:
        return f"An unconditional image diffusion model: {trained}.\n"
    cells = (name.replace("|", "\\|").replace("\n", " ") for name in class_names)  # Markdown table cells
    rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(cells))
    return (
        f"A class-conditional image diffusion model with classifier-free guidance: {trained}, conditioned on "
        f"its {len(class_names)} classes (a class embedding; `train.label_dropout` "
        f'{params.train.label_dropout:g} of the labels dropped to "no class", so one network is both the '
        f"conditional and the unconditional model). The grid has one row per class; the evaluation sampled "
        f"with guidance scale w = {params.sample.guidance_scale:g}.\n\n| class index | name |\n|---|---|\n{rows}\n"
    )


def model_card(
    params: Params,
    source: dict,
    meta: dict,
    metrics: dict,
    summary: dict,
    pipeline_class: type,
    sampler: SchedulerMixin,
    class_names: list[str],
    base: dict | None = None,
    sampled: list[int] = (),
) -> str:
    """README.md: the Hub's YAML front matter, then the grid, usage, evaluation, training and hardware;
    `sampled`: a class-conditional model's classes the evaluation sampled (models.sampling.sampled_classes)."""
    s = params.sample
    sections = ("data", "model", "train") if base else ("data", "model", "scheduler", "train")
    recipe = published_recipe(params, sections)
    schedule = (
        "the pretrained pipeline's noise schedule"
        if base
        else f"the training noise schedule ({params.scheduler.beta_schedule} betas, "
        f"{params.scheduler.num_train_timesteps} steps, {params.scheduler.prediction_type} prediction)"
    )
    grid_alt = (
        "One row per prompt"
        if base
        else f"{'One row per class' if class_names else f'The first {s.grid_size**2} images'} of the evaluated "
        "sample set"
    )
    software = ", ".join(f"{k} {v}" for k, v in sorted(summary["software"].items()))
    scheduler = type(sampler).__name__
    return "\n".join(
        [
            f"---\n{card_metadata(params, source, metrics, sampler, class_names, base, sampled).to_yaml()}\n---\n",
            f"# {model_name(params)}\n",
            description(params, source, meta, summary, class_names, base),
            f"![{grid_alt}]({GRID})\n",
            "## Use\n",
            text_usage(params, base) if base else usage(params, pipeline_class, class_names, sampled),
            (
                f"The sampler the evaluation used is `{scheduler}` on {schedule}"
                f"{', set as above' if params.train.lora_rank else ', saved here as the scheduler'}. "
                if base
                else f"The scheduler saved here is the sampler the evaluation used: `{scheduler}` on {schedule}. "
            )
            + f"Upload this folder as it is with `hf upload <user>/<repo> {params.paths.pipeline}`.\n",
            "## Evaluation\n",
            f"| metric | value | samples | {reference_set(params)} | sampler |\n|---|---|---|---|---|",
            *(
                f"| {kind.upper()} | {metrics[kind]:.6g} | {metrics['fid_num_samples']:,} | "
                f"{metrics['fid_num_reference']:,} | {s.sampler}, {s.num_inference_steps} steps "
                f"({sampler.config.timestep_spacing} spacing)"
                f"{'' if s.applied_eta is None else f', eta {s.eta}'} |"
                for kind in ("fid", "kid")
            ),
            f'\nclean-fid "clean" mode; Inception weights {metrics["fid_weights_origin"]} (sha256 '
            f"`{metrics['fid_weights_sha256']}`). Few samples bias FID upwards: compare runs scored alike.\n",
            "## Training\n",
            f"{summary['steps']:,} steps in {summary['seconds']:,.0f} s "
            f"({summary['images_per_second']:,.1f} images/s); "
            f"final loss {summary['loss_final']:.4g} (mean of the last steps); "
            f"{'EMA weights' if params.train.ema else 'the weights of the last step (no EMA)'}. The params:\n",
            f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n",
            "## Hardware\n",
            f"{summary['device_name']} ({summary['device']}), {summary['num_processes']} process(es), mixed "
            f"precision {summary['mixed_precision']}, torch.compile {'on' if summary['compiled'] else 'off'}, "
            f"{summary['torch_threads']} torch threads; {software}.\n",
        ]
    )


# what the card shows of the training summary: an older summary.json without one is named, not a KeyError
SUMMARY_KEYS = (
    "steps", "seconds", "loss_final", "images_per_second", "num_parameters", "trainable_parameters",
    "num_processes", "mixed_precision", "compiled", "torch_threads", "device", "device_name", "software",
)  # fmt: skip


def run(params: Params) -> dict:
    p = params.paths
    base = read_base(p.base_model) if params.model.pretrained is not None else None
    (check_text_to_image if base else check_pipeline)(p.trained)
    source = read_record(Path(p.raw) / SOURCE_FILE, "download")
    meta = read_record(p.meta, "preprocess")
    metrics = read_record(p.metrics, "evaluate")
    summary = trainlog.read_summary(p.train_log, SUMMARY_KEYS)
    if not Path(p.grid).is_file():
        raise ConfigError(f"{p.grid}: no such file; the sample stage makes it")
    class_names = [] if base else load_class_names(p.trained)
    sampled = sampled_classes(params, class_names, load_labels(p.labels)) if class_names else []
    with atomic_dir(p.pipeline) as out:
        publish = publish_text_to_image if base else publish_pipeline
        pipeline_class, sampler = publish(params, Path(p.trained), out)
        shutil.copyfile(p.grid, out / GRID)
        card = model_card(params, source, meta, metrics, summary, pipeline_class, sampler, class_names, base, sampled)
        (out / CARD).write_text(card)
        write_manifest(out)
    return {"pipeline": p.pipeline, "class": pipeline_class.__name__, "fid": metrics["fid"]}


def headline(info: dict, params: Params) -> str:
    return f"package: {info['class']} with its model card (FID {info['fid']:.4f}) -> {info['pipeline']}"
