"""Builds the networks and noise schedulers from params: the one place that maps params to diffusers.

    unet = build_unet(params.model, resolution=16, channels=1)
    noise_scheduler = build_noise_scheduler(params.scheduler)
    sampler = build_sampler("ddim", noise_scheduler.config)
"""
from __future__ import annotations

from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DModel)

from workflow.config import Model, Scheduler

SAMPLERS = {  # sample.sampler -> (scheduler class, settings on top of the training noise schedule)
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def build_unet(model: Model, resolution: int, channels: int) -> UNet2DModel:
    """The tutorial's UNet family: one down/up block per level, self-attention at `attention_levels`."""
    levels = len(model.block_out_channels)
    down = ["AttnDownBlock2D" if i in model.attention_levels else "DownBlock2D" for i in range(levels)]
    # up blocks run from the lowest resolution back up, so level i is up block (levels - 1 - i)
    up = ["AttnUpBlock2D" if levels - 1 - i in model.attention_levels else "UpBlock2D" for i in range(levels)]
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=model.layers_per_block,
        block_out_channels=tuple(model.block_out_channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=model.norm_num_groups,
    )


def build_noise_scheduler(scheduler: Scheduler) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=scheduler.num_train_timesteps,
        beta_schedule=scheduler.beta_schedule,
        prediction_type=scheduler.prediction_type,
    )


def build_sampler(name: str, noise_scheduler_config):
    """A sampling scheduler sharing the training noise schedule (betas, prediction type)."""
    cls, settings = SAMPLERS[name]
    return cls.from_config(noise_scheduler_config, **settings)


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())
