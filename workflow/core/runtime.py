"""Runtime policy: where the stages compute and how. The one place that decides it.

    from workflow.core.runtime import Runtime
    rt = Runtime.detect()                           # cuda if there is one, else cpu, with that device's choices
    rt = Runtime.for_device(accelerator.device)     # a given device, with its choices
    rt.training_precision("auto")                   # "bf16" on a GPU that has it, else "no"
    rt.sampling_dtype("auto")                       # torch.bfloat16 on such a GPU, else torch.float32
    model, x = rt.layout(model), rt.layout(x)       # channels_last on a GPU (it pays there, not on CPU)
    optimizer = rt.adamw(model.parameters(), lr=1e-4)    # fused where torch has it for the device
    (images,) = rt.place_dataset(images)            # on the GPU when it fits, else left memory-mapped
    batch = to_device(images[index], rt.device)     # a batch drawn from the host, through pinned memory
    result, compiled = with_eager_fallback(compiled_call, eager_call, "training")

A GPU's choices are bf16, channels_last, fused AdamW and the dataset kept on the device when it fits.
Each is also a plain torch path on CPU, so `Runtime.gpu_paths_on(torch.device("cpu"))` makes a CPU run take
them: the tests do (tests/test_gpu_paths_on_cpu.py), so a dtype or layout mistake shows without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")
DEVICE_DATA_SHARE = 4  # the dataset goes on the GPU when it takes at most 1/4 of the free memory


@dataclasses.dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool  # what "auto" precision picks
    channels_last: bool
    fused_optimizer: bool

    @classmethod
    def detect(cls) -> Runtime:
        """The GPU if there is one, else the CPU."""
        return cls.for_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))

    @classmethod
    def for_device(cls, device: torch.device) -> Runtime:
        """`device` with its own choices: a GPU's on cuda, plain float32 and contiguous tensors elsewhere."""
        if device.type == "cuda":
            return cls(device, bf16=torch.cuda.is_bf16_supported(), channels_last=True, fused_optimizer=True)
        return cls(device, bf16=False, channels_last=False, fused_optimizer=False)

    @classmethod
    def gpu_paths_on(cls, device: torch.device) -> Runtime:
        """A GPU's choices on `device` (e.g. the CPU): bf16 autocast, channels_last, fused AdamW."""
        return cls(device, bf16=True, channels_last=True, fused_optimizer=True)

    def training_precision(self, choice: str) -> str:
        """`train.mixed_precision` for accelerate: auto is bf16 where chosen (fp16 training of this UNet
        NaNs, diffusers#6492), else no."""
        if choice != "auto":
            return choice
        return "bf16" if self.bf16 else "no"

    def sampling_dtype(self, choice: str) -> torch.dtype:
        """`sample.mixed_precision` -> the UNet's compute dtype: auto is bf16 where chosen, else float32."""
        if choice == "auto":
            return torch.bfloat16 if self.bf16 else torch.float32
        return torch.bfloat16 if choice == "bf16" else torch.float32

    def layout(self, x):
        """A module or a 4-D tensor in channels_last memory format where chosen; else unchanged."""
        if not self.channels_last:
            return x
        if isinstance(x, torch.nn.Module):
            return x.to(memory_format=torch.channels_last)
        return x.contiguous(memory_format=torch.channels_last)

    def adamw(self, parameters, **settings) -> torch.optim.AdamW:
        """AdamW, fused where chosen (one kernel for all parameters: torch has it for cuda and cpu), else
        torch's default (foreach) implementation; the two agree to float rounding (tested)."""
        return torch.optim.AdamW(parameters, fused=self.fused_optimizer or None, **settings)

    def place_dataset(self, *arrays: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A dataset's arrays on a GPU once when together they fit, else where they are: memory-mapped
        files, whose pages the ranks of one machine share, each batch then copied over as it is drawn
        (`to_device`). A copy per rank in host memory would multiply the set by the ranks, and gain
        nothing: a batch gathered from it is a new tensor anyway. One decision for all arrays: indices
        made on one array's device must index the others."""
        if self.device.type != "cuda":
            return arrays
        free, _ = torch.cuda.mem_get_info(self.device)
        if fits_on_device(sum(a.nbytes for a in arrays), free):
            return tuple(a.to(self.device) for a in arrays)
        return arrays

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device`; one gathered on the host reaches a GPU through pinned memory (torch's caching
    host allocator reuses the buffer once the copy is done), so the copy does not stall the host."""
    if device.type == "cuda" and batch.device.type == "cpu":
        batch = batch.pin_memory()
    return batch.to(device, non_blocking=True)


def default_device() -> torch.device:
    return Runtime.detect().device


def fits_on_device(nbytes: int, free_bytes: int) -> bool:
    return nbytes <= free_bytes // DEVICE_DATA_SHARE


def maybe_compile(module: torch.nn.Module, enabled: bool):
    return torch.compile(module) if enabled else module


def with_eager_fallback(compiled_call: Callable[[], T], eager_call: Callable[[], T], what: str) -> tuple[T, bool]:
    """(compiled_call(), True); if it raises, warn and return (eager_call(), False).

    For the first call of a torch.compile'd function, where compilation happens: its failures come
    as many exception types (e.g. CUDA "misaligned address"), so any Exception counts."""
    try:
        return compiled_call(), True
    except Exception as exc:
        warnings.warn(f"torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); {what} eagerly", stacklevel=2)
        return eager_call(), False


def feature_workers(device: torch.device) -> int:
    """Workers resizing images for Inception features: none on CPU (the network already uses every core),
    several beside a GPU."""
    return 0 if device.type == "cpu" else min(8, max(1, (os.cpu_count() or 1) - 1))
