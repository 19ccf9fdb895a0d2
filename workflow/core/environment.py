"""What a run ran on: the versions of the software that shapes its numbers, and the device's name.

    from workflow.core.environment import device_name, software_versions
    software_versions()              # {"python": "3.11.7", "torch": "2.14.1", "diffusers": ..., "accelerate": ...}
    device_name(torch.device("cpu"))  # "AMD EPYC 7B13" (the GPU's name on cuda)

The train stage records both in its summary.json (the report shows them); the benchmark prints them.
"""

from __future__ import annotations

import contextlib
import platform
from importlib.metadata import version
from pathlib import Path

import torch

PACKAGES = ("torch", "diffusers", "accelerate")


def software_versions() -> dict:
    """{"python": ..., "torch": ..., "diffusers": ..., "accelerate": ...}, as installed."""
    return {"python": platform.python_version(), **{name: version(name) for name in PACKAGES}}


def device_name(device: torch.device) -> str:
    """The GPU's name on cuda; else the CPU model from /proc/cpuinfo, or platform's guess without it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), model)
    return model
