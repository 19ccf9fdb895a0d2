"""What the benchmarks share: the tutorial's UNet as params, synthetic images, the device's name,
and printing a result (Markdown, optionally JSON). `python -m workflow bench` is the command."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np
import torch

from workflow.core.config import ConfigError, Params, params_from_dict
from workflow.core.environment import device_name

SEED_CHANNELS = (128, 128, 256, 256, 512, 512)
PEER_NORM_GROUPS = 32  # diffusers' UNet2DModel default, which the tutorial's UNet keeps


def bench_params(
    base: Params, resolution: int, batch_size: int, channels: tuple, total_steps: int, device_type: str
) -> Params:
    """params.yaml with the tutorial's model at `channels`, RGB at `resolution`, and the bench's batch."""
    raw = base.to_dict()
    levels = len(channels)
    raw["data"].update(resolution=resolution, channels=3)
    raw["model"] = {
        "block_out_channels": list(channels),
        "layers_per_block": 2,
        "attention_levels": [levels - 2] if levels >= 2 else [],
        "norm_num_groups": math.gcd(PEER_NORM_GROUPS, *channels),
    }
    raw["train"].update(
        batch_size=batch_size,
        max_steps=total_steps,
        epochs=None,
        random_flip=True,
        gradient_accumulation_steps=1,
        mixed_precision="bf16" if device_type == "cuda" else "no",
    )
    return params_from_dict(raw, source="bench")


def synthetic_images(n: int, resolution: int, seed: int = 0) -> np.ndarray:
    """uint8 N x 3 x R x R: smooth random colour fields plus grain, so PNGs compress like photos."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(
        coarse, size=(resolution, resolution), mode="bilinear", align_corners=False
    )
    grain = 0.05 * torch.randn(n, 3, resolution, resolution, generator=g)
    return (smooth + grain).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_label(device: torch.device) -> str:
    label = device_name(device)
    return f"{label}, {torch.get_num_threads()} torch threads" if device.type == "cpu" else label


def publish(result: dict, render, argv: list, json_path: str | None) -> None:
    """Print `render(result, command)`; with --json, also write the numbers and the command."""
    command = shlex.join(["python", "-m", "workflow", "bench", *argv])
    print(render(result, command))
    if json_path:
        Path(json_path).write_text(json.dumps({"command": command, **result}, indent=2) + "\n")


def check_minimums(args, minimum: dict) -> None:
    """A knob below its minimum is one clear error naming the flag."""
    for name, low in minimum.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def run_header(device: torch.device, resolution: int, channels: tuple) -> dict:
    """What every benchmark result names first: the device and software, and the model's size."""
    from importlib.metadata import version

    return {
        "device": device.type,
        "device_name": device_label(device),
        "torch": torch.__version__,
        "diffusers": version("diffusers"),
        "resolution": resolution,
        "channels": list(channels),
    }
