"""Sampling from a text-to-image model: diffusers' StableDiffusionPipeline over the pretrained pipeline's
VAE, tokenizer and text encoder (`paths.base_model`) and a UNet, with `sample.sampler` as its scheduler.

    pipe = text_pipeline("models/base", unet, params.sample, device)
    for first, images in prompt_batches(pipe, prompts, params.sample, seed=0, resolution=512):
        ...   # images: uint8 (B, H, W, C), images first .. first + B - 1 of `prompts`

Image i starts from the noise of its own generator, seeded with stream_seed(seed, i) as the pixel-space
sampler's, so it is a function of (seed, i, its prompt) and the settings, not of the batch size.
Guidance follows diffusers: `sample.guidance_scale` > 1 steers away from `sample.negative_prompt` (the
empty prompt when null); at 1 or below the pipeline makes the conditional prediction alone. On a GPU the
pipeline runs under bf16 autocast (`sample.mixed_precision: auto`); on CPU in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from workflow.core.config import Sample
from workflow.core.runtime import Runtime
from workflow.models.builders import build_sampler, check_sampling_memory, pretrained_scheduler_config, set_steps
from workflow.models.latent import Encoders, load_encoders
from workflow.models.sampling import image_generators


def text_pipeline(base: str | Path, unet: torch.nn.Module, settings: Sample, device, encoders: Encoders | None = None):
    """A StableDiffusionPipeline of `unet` and the encoders of `base` (loaded unless given), its VAE sliced."""
    from diffusers import StableDiffusionPipeline

    encoders = encoders or load_encoders(base, device)
    pipe = StableDiffusionPipeline(
        vae=encoders.vae,
        text_encoder=encoders.text_encoder,
        tokenizer=encoders.tokenizer,
        unet=unet,
        scheduler=build_sampler(settings.sampler, pretrained_scheduler_config(base), settings.timestep_spacing),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    # decode a batch an image at a time (the same images, to float rounding): 250 at 512 px in one call need tens of GB
    pipe.vae.enable_slicing()
    return pipe


def grid_prompts(prompts, columns: int) -> list[str]:
    """A grid's prompts: one row per prompt, `columns` images (seeds) each."""
    return [prompt for prompt in prompts for _ in range(columns)]


def prompt_batches(
    pipe,
    prompts: list[str],
    settings: Sample,
    seed: int,
    resolution: int,
    runtime: Runtime | None = None,
    progress: bool = True,
    start: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """One image per prompt from prompt `start` on (a multiple of the batch size), `settings.batch_size`
    at a time, as (first index, uint8 B x H x W x C). A batch over `sample.max_activation_gib` is refused
    here, before the first one is made (the VAE decodes an image at a time: its share is bounded by size)."""
    scale = pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, resolution // scale, resolution // scale)
    text = (pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)  # padded caption embeddings
    batch = max(1, min(settings.batch_size, len(prompts) - start))  # the largest batch this run makes
    guided = 2 if settings.guidance_scale > 1 else 1  # diffusers batches both predictions above 1
    check_sampling_memory(pipe.unet, settings, batch, batch * guided, shape, text)
    return _batches(pipe, prompts, settings, seed, resolution, runtime, progress, start)


def _batches(pipe, prompts, settings, seed, resolution, runtime, progress, start):
    from tqdm.auto import tqdm

    set_steps(pipe.scheduler, settings.num_inference_steps)  # the pipeline sets them again, to the same
    runtime = runtime or Runtime.for_device(pipe.unet.device)
    dtype = runtime.sampling_dtype(settings.mixed_precision)
    autocast = torch.autocast(runtime.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    name = f"{settings.sampler}-{settings.num_inference_steps}"
    with tqdm(total=len(prompts), initial=start, desc=f"sample {name}", unit="img", disable=not progress) as bar:
        for first in range(start, len(prompts), settings.batch_size):
            chosen = list(prompts[first : first + settings.batch_size])
            negative = [settings.negative_prompt] * len(chosen) if settings.negative_prompt is not None else None
            with torch.inference_mode(), autocast:
                out = pipe(
                    prompt=chosen,
                    negative_prompt=negative,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=settings.num_inference_steps,
                    guidance_scale=settings.guidance_scale,
                    eta=settings.eta,
                    generator=image_generators(seed, range(first, first + len(chosen))),
                    output_type="np",
                )
            bar.update(len(chosen))
            yield first, np.round(np.asarray(out.images, dtype=np.float32) * 255).astype(np.uint8)
