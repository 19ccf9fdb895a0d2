"""What a run records about its software and device."""

import platform
from importlib.metadata import version
from pathlib import Path

import torch

from workflow.core.environment import device_name, software_versions


def test_software_versions_are_the_installed_ones():
    assert software_versions() == {
        "python": platform.python_version(),
        "torch": version("torch"),
        "diffusers": version("diffusers"),
        "accelerate": version("accelerate"),
    }


def test_cpu_device_name_is_the_cpu_model():
    name = device_name(torch.device("cpu"))
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        assert name in cpuinfo.read_text()
    assert name and "\n" not in name
