"""Sample stage: the sample set that FID scores, and the grid for people.

    python -m workflow sample [--params params.yaml]

Loads params.paths.trained (the weights train saved: EMA unless train.ema is false) and samples
fid.num_samples images with sample.sampler (ddpm | ddim with sample.eta | dpmsolver++) in
sample.num_inference_steps spaced by sample.timestep_spacing, sample.batch_size at a time
(workflow.models.sampling: bf16 + channels_last on a GPU, float32 on CPU, optional torch.compile).
Each batch's PNGs go straight to disk (into .samples.partial/ beside the set, renamed to
params.paths.samples when complete, with samples.json holding the timing), so memory does not grow
with the number of samples; only the images params.paths.grid shows are kept (without classes: the first
grid_size^2).
A run that is killed resumes from its last whole batch when the stage runs again with the same
weights, seed, sampler settings, batch size, code and software (workflow.formats.sample_set): an hour
of DDPM sampling on a CPU is not lost to a preempted job.
Image i is a function of (seed, i): the samples do not depend on sample.batch_size (bit for bit on
CPU in float32; on a GPU up to bf16 rounding), a smaller set is the start of a larger one, and the
grid is the start of the sample set.
The set is published whole, and a pipeline whose files no longer match the manifest train
wrote (truncated, altered) is refused, naming the file; weights are read from safetensors only.

A class-conditional pipeline samples the classes of `sample.classes` (all by default), guided by
`sample.guidance_scale`: first grid_size rounds of them in turn (fewer if fid.num_samples is short:
the grid), then each in proportion to its training images (`paths.labels`), as the FID reference holds
them (maths.diffusion.sample_classes); samples.json records each sample's class. Its grid has one
row per class (the first MAX_GRID_ROWS), labelled with the class name, grid_size samples each.

A text-to-image fine-tune (`model.pretrained`; workflow.models.text_sampling) samples image i of the set
from the first caption of training image i mod N (`paths.captions`; with `data.holdout`, of held-out
image i mod N, `paths.holdout_captions`), so the sample set follows the captions of the images FID
compares it with (caption for caption where `fid.num_reference` takes them all and `fid.num_samples`
is a multiple of N, as in the naruto presets; else in distribution, the reference being a seeded
subset), guided
by `sample.guidance_scale` away from `sample.negative_prompt`; samples.json records each sample's
prompt. Its grid has one row per `sample.prompts` prompt, labelled with it, grid_size seeds each.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workflow.core.artifacts import MANIFEST, sha256_file
from workflow.core.code_deps import code_sha256
from workflow.core.config import Params
from workflow.core.environment import device_name, software_versions
from workflow.core.runtime import Runtime
from workflow.formats.labels import load_labels
from workflow.formats.pipeline import load_class_names, load_unet
from workflow.formats.png import write_grid
from workflow.formats.sample_set import write_sample_set
from workflow.models.builders import sampler_spacing
from workflow.models.sampling import grid_columns, sample_batches, sample_labels, sampled_classes

MAX_GRID_ROWS = 32


def class_grid_indices(classes: int, columns: int) -> list[int]:
    """The samples of a class grid, row by row: of the first classes x columns samples (sample i of class
    i mod `classes`), `columns` of each of the first MAX_GRID_ROWS classes. Only these are kept in memory."""
    rows = min(classes, MAX_GRID_ROWS)
    return [r + classes * c for r in range(rows) for c in range(columns)]


def run(params: Params) -> dict:
    if params.model.pretrained is not None:
        return run_text_to_image(params)
    s = params.sample
    runtime = Runtime.detect()
    device = runtime.device
    unet, scheduler_config = load_unet(params.paths.trained, device)
    class_names = load_class_names(params.paths.trained)
    labels, columns, keep, extra = None, s.grid_size, range(s.grid_size**2), {}
    if class_names:
        training = load_labels(params.paths.labels)
        chosen = sampled_classes(params, class_names, training)
        labels = sample_labels(params, class_names, training)
        columns = grid_columns(params, chosen)
        keep = class_grid_indices(len(chosen), columns)
        extra = {"guidance_scale": s.guidance_scale, "class_names": class_names, "labels": labels.tolist()}
    settings = {
        "sampler": s.sampler,
        "num_inference_steps": s.num_inference_steps,
        "timestep_spacing": sampler_spacing(s, scheduler_config),
        "eta": s.applied_eta,
        "device": device.type,
        "dtype": str(runtime.sampling_dtype(s.mixed_precision)).removeprefix("torch."),
        "compile": s.compile,
        **extra,
    }
    count = params.fid.num_samples

    def batches_from(start: int):
        return sample_batches(unet, scheduler_config, s, params.seed, count, device, labels=labels, start=start)

    identity = images_identity(params, manifest_sha256(params.paths.trained), device)
    kept, record = write_sample_set(batches_from, count, s.batch_size, params.paths.samples, keep, settings, identity)
    rows = [class_names[c] for c in chosen[:MAX_GRID_ROWS]] if class_names else None
    write_grid(kept, columns, params.paths.grid, row_labels=rows)
    return record


def run_text_to_image(params: Params) -> dict:
    from workflow.formats.base_model import base_sha256
    from workflow.formats.captions import fid_prompts
    from workflow.formats.pipeline import load_finetuned_unet
    from workflow.models.text_sampling import grid_prompts, prompt_batches, text_pipeline

    s, paths = params.sample, params.paths
    runtime = Runtime.detect()
    unet = load_finetuned_unet(paths.trained, paths.base_model, runtime.device)
    pipe = text_pipeline(paths.base_model, unet, s, runtime.device)
    prompts, prompts_from = fid_prompts(params)
    resolution = params.data.resolution
    settings = {
        "sampler": s.sampler,
        "num_inference_steps": s.num_inference_steps,
        "timestep_spacing": pipe.scheduler.config.timestep_spacing,
        "eta": s.applied_eta,
        "guidance_scale": s.guidance_scale,
        "negative_prompt": s.negative_prompt,
        "device": runtime.device.type,
        "dtype": str(runtime.sampling_dtype(s.mixed_precision)).removeprefix("torch."),
        "prompts": prompts,
        "prompts_from": prompts_from,
    }

    def batches_from(start: int):
        return prompt_batches(pipe, prompts, s, params.seed, resolution, runtime, start=start)

    identity = {
        **images_identity(params, manifest_sha256(paths.trained), runtime.device),
        "base": base_sha256(paths.base_model),
        "resolution": resolution,
    }
    _, record = write_sample_set(batches_from, len(prompts), s.batch_size, paths.samples, (), settings, identity)
    rows = list(s.prompts[:MAX_GRID_ROWS])
    grid = np.concatenate(
        [b for _, b in prompt_batches(pipe, grid_prompts(rows, s.grid_size), s, params.seed, resolution, runtime)]
    )
    write_grid(grid, s.grid_size, paths.grid, row_labels=rows)
    return record


def images_identity(params: Params, weights: str, device) -> dict:
    """What decides the images besides the sampler's settings: an interrupted set resumes only into a run
    where all of it is the same (the batch size, card and software too: on a GPU they change the last bits)."""
    return {
        "weights": weights,
        "seed": params.seed,
        "batch_size": params.sample.batch_size,
        "code": code_sha256("sample"),
        "software": software_versions(),
        "device": device_name(device),
    }


def manifest_sha256(pipeline: str) -> str:
    """The trained pipeline's files, by content: the sha256 of its manifest (checked against them on load)."""
    return sha256_file(Path(pipeline) / MANIFEST)


def headline(record: dict, params: Params) -> str:
    return (
        f"sampled {record['count']} images with {record['sampler']}-{record['num_inference_steps']} "
        f"({record['timestep_spacing']} spacing) in {record['seconds']:.1f} s "
        f"({record['images_per_second']:.1f} images/s)"
    )
