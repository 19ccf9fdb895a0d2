"""Sample stage: the sample set that FID scores, and the grid for people.

    python -m workflow sample

Loads params.paths.pipeline (EMA weights), swaps in the sampler named by sample.scheduler
(ddpm | ddim | dpm, sharing the training noise schedule) and writes sample.num_images PNGs to
params.paths.samples (plus samples.json with the timing) and the first grid_size^2 of them as
params.paths.grid. Image i always starts from the noise of stream (seed, i), so the samples do
not depend on sample.batch_size and the grid is the start of the sample set.
The set is streamed to disk a batch at a time (its size is not bounded by memory) and published
whole. A pipeline whose files no longer match the manifest train wrote (truncated, altered) is
refused, naming the file; weights are read from safetensors only.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from workflow.artifacts import atomic_dir, atomic_path, manifest_damage
from workflow.cli import parse_params
from workflow.config import ConfigError, Params, Sample
from workflow.diffusion import stream_seed
from workflow.faults import maybe_fault
from workflow.model import build_sampler

GRID_PADDING = 2


def load_pipeline(path: str, sampler: str, device: torch.device):
    from diffusers import DDPMPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise ConfigError(f"{path} holds no trained pipeline: run the train stage first")
    problem = manifest_damage(path)
    if problem is not None:
        raise ConfigError(f"{path} is damaged ({problem}): re-run the train stage (`dvc repro --force train`)")
    try:
        pipeline = DDPMPipeline.from_pretrained(path, use_safetensors=True)  # never unpickles weights
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a loadable pipeline with safetensors weights ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); re-run the train stage") from None
    pipeline.scheduler = build_sampler(sampler, pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate(pipeline, settings: Sample, seed: int) -> Iterator[tuple[np.ndarray, float]]:
    """sample.num_images images as batches of uint8 N x H x W x C, each with the seconds it took."""
    for start in range(0, settings.num_images, settings.batch_size):
        started = time.perf_counter()
        indices = range(start, min(start + settings.batch_size, settings.num_images))
        generators = [torch.Generator().manual_seed(stream_seed(seed, i)) for i in indices]
        images = pipeline(batch_size=len(generators), generator=generators,
                          num_inference_steps=settings.num_inference_steps, output_type="np").images
        yield np.round(images * 255).clip(0, 255).astype(np.uint8), time.perf_counter() - started


def make_grid(images: np.ndarray, size: int, padding: int = GRID_PADDING) -> np.ndarray:
    """The first size x size images (N x H x W x C) tiled row by row on a white background."""
    _, h, w, c = images.shape
    grid = np.full((size * (h + padding) + padding, size * (w + padding) + padding, c), 255, np.uint8)
    for i, image in enumerate(images[: size * size]):
        row, col = divmod(i, size)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def write_samples(batches, folder: str, record: dict, keep: int) -> np.ndarray:
    """Stream `batches` (from generate) to PNGs in `folder`, published whole with samples.json (`record`
    plus count and timing). Returns the first `keep` images, for the grid."""
    kept, count, seconds = [], 0, 0.0
    with atomic_dir(folder) as out:
        for batch, took in batches:
            seconds += took
            kept.append(batch[: max(0, keep - count)])
            for image in batch:
                to_pil(image).save(out / f"{count:06d}.png")
                count += 1
                maybe_fault("sample.after_image", count)
        record.update(count=count, seconds=seconds, images_per_second=count / seconds)
        (out / "samples.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return np.concatenate(kept)


def write_grid(images: np.ndarray, size: int, path: str) -> None:
    with atomic_path(path) as tmp:
        to_pil(make_grid(images, size)).save(tmp, format="PNG")


def sample(params: Params) -> dict:
    s = params.sample
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(params.paths.pipeline, s.scheduler, device)
    record = {"scheduler": s.scheduler, "num_inference_steps": s.num_inference_steps, "device": device.type}
    first = write_samples(generate(pipeline, s, params.seed), params.paths.samples, record, s.grid_size ** 2)
    write_grid(first, s.grid_size, params.paths.grid)
    return record


def main(argv=None) -> None:
    record = sample(parse_params(argv, __doc__))
    print(f"sampled {record['count']} images with {record['scheduler']}-{record['num_inference_steps']} "
          f"in {record['seconds']:.1f} s ({record['images_per_second']:.1f} images/s)")
