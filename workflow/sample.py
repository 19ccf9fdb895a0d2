"""Sample stage: the sample set that FID scores, and the grid for people.

    python -m workflow sample

Loads params.paths.pipeline (EMA weights), swaps in the sampler named by sample.scheduler
(ddpm | ddim | dpm, sharing the training noise schedule) and writes sample.num_images PNGs to
params.paths.samples (plus samples.json with the timing) and the first grid_size^2 of them as
params.paths.grid. Image i always starts from the noise of stream (seed, i), so the samples do
not depend on sample.batch_size and the grid is the start of the sample set.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workflow.artifacts import atomic_dir, atomic_path
from workflow.cli import parse_params
from workflow.config import ConfigError, Params, Sample
from workflow.diffusion import stream_seed
from workflow.model import build_sampler

GRID_PADDING = 2


def load_pipeline(path: str, sampler: str, device: torch.device):
    from diffusers import DDPMPipeline

    if not (Path(path) / "model_index.json").is_file():
        raise ConfigError(f"{path} holds no trained pipeline: run the train stage first")
    pipeline = DDPMPipeline.from_pretrained(path)
    pipeline.scheduler = build_sampler(sampler, pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def generate(pipeline, settings: Sample, seed: int) -> np.ndarray:
    """sample.num_images images as uint8 N x H x W x C."""
    batches = []
    for start in range(0, settings.num_images, settings.batch_size):
        indices = range(start, min(start + settings.batch_size, settings.num_images))
        generators = [torch.Generator().manual_seed(stream_seed(seed, i)) for i in indices]
        images = pipeline(batch_size=len(generators), generator=generators,
                          num_inference_steps=settings.num_inference_steps, output_type="np").images
        batches.append(np.round(images * 255).clip(0, 255).astype(np.uint8))
    return np.concatenate(batches)


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


def write_samples(images: np.ndarray, folder: str, record: dict) -> None:
    with atomic_dir(folder) as out:
        for i, image in enumerate(images):
            to_pil(image).save(out / f"{i:06d}.png")
        (out / "samples.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")


def write_grid(images: np.ndarray, size: int, path: str) -> None:
    with atomic_path(path) as tmp:
        to_pil(make_grid(images, size)).save(tmp, format="PNG")


def sample(params: Params) -> dict:
    s = params.sample
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipeline = load_pipeline(params.paths.pipeline, s.scheduler, device)
    started = time.perf_counter()
    images = generate(pipeline, s, params.seed)
    seconds = time.perf_counter() - started
    record = {"count": len(images), "seconds": seconds, "images_per_second": len(images) / seconds,
              "scheduler": s.scheduler, "num_inference_steps": s.num_inference_steps, "device": device.type}
    write_samples(images, params.paths.samples, record)
    write_grid(images, s.grid_size, params.paths.grid)
    return record


def main(argv=None) -> None:
    record = sample(parse_params(argv, __doc__))
    print(f"sampled {record['count']} images with {record['scheduler']}-{record['num_inference_steps']} "
          f"in {record['seconds']:.1f} s ({record['images_per_second']:.1f} images/s)")
