"""Sampling from a trained UNet: the one loop the sample, fid_sweep and train stages share.

    from workflow.formats.pipeline import load_unet
    from workflow.models.sampling import sample_batches
    unet, scheduler_config = load_unet("models/trained", device)
    for first, images in sample_batches(unet, scheduler_config, params.sample, seed=0, count=250, device=device):
        ...   # images: uint8 (B, H, W, C), samples first .. first + B - 1

No command of its own (`python -m workflow sample` is the stage). A diffusers scheduler
(`sample.sampler`: ddpm | ddim | dpmsolver++, built by workflow.models.builders.build_sampler) drives the
UNet: set_timesteps, the UNet, scheduler.step. Image i starts from the noise of its own generator,
seeded with stream_seed(seed, i), and every later draw it needs (DDPM's and DDIM-eta's per-step
noise) comes from that same generator, so an image is a function of (seed, i) and the settings
only: not of the batch size, nor of how many images are made (a smaller run is the start of a
larger one). On a GPU the UNet runs under bf16 autocast with channels_last (`sample.mixed_precision:
auto`); on CPU in float32, where a batch equals DDPMPipeline's output with the same generators.
The scheduler arithmetic is float32 everywhere. `sample.compile` wraps the UNet in torch.compile
and falls back to eager mode with a warning if compiling fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from workflow.core.config import ConfigError, Params, Sample
from workflow.core.runtime import Runtime, maybe_compile, with_eager_fallback
from workflow.maths.diffusion import guided, sample_classes, stream_seed
from workflow.models.builders import build_sampler, check_sampling_memory, null_class, set_steps


class Denoiser:
    """The UNet as the sampling loop calls it: inference mode, autocast, memory layout, optional compile."""

    def __init__(self, unet: torch.nn.Module, settings: Sample, runtime: Runtime):
        self.runtime, self.device = runtime, runtime.device
        self.dtype = runtime.sampling_dtype(settings.mixed_precision)
        self.eager = runtime.layout(unet.eval())
        self.model = maybe_compile(self.eager, settings.compile)
        self.compile_pending = settings.compile
        self.null_class, self.guidance_scale = null_class(unet), settings.guidance_scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if not self.compile_pending:
            return self._predict(self.model, x, t, labels)
        out, compiled = with_eager_fallback(
            lambda: self._predict(self.model, x, t, labels), lambda: self._predict(self.eager, x, t, labels), "sampling"
        )
        self.model = self.model if compiled else self.eager
        self.compile_pending = False
        return out

    def inputs_per_image(self, labelled: bool) -> int:
        """UNet inputs per image in each call: 2 where guidance batches both predictions (see _predict)."""
        return 2 if labelled and self.null_class is not None and self.guidance_scale not in (0.0, 1.0) else 1

    def _predict(self, model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The prediction for `labels` under classifier-free guidance: w = 1 is the conditional prediction
        alone and w = 0 the unconditional one (one UNet call each); any other w evaluates both in one
        batched call."""
        if labels is None or self.null_class is None:
            return self._run(model, x, t, None)
        w, no_class = self.guidance_scale, torch.full_like(labels, self.null_class)
        if w in (0.0, 1.0):
            return self._run(model, x, t, labels if w == 1.0 else no_class)
        eps_cond, eps_uncond = self._run(model, torch.cat([x, x]), t, torch.cat([labels, no_class])).chunk(2)
        return guided(eps_cond, eps_uncond, w)

    def _run(self, model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        with autocast:
            return model(self.runtime.layout(x), t, class_labels=labels, return_dict=False)[0].float()


def image_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per image, seeded by (seed, image index): the image's whole noise stream."""
    return [torch.Generator().manual_seed(stream_seed(seed, i)) for i in indices]


def denoise(
    denoiser: Denoiser, scheduler_config, settings: Sample, generators: list, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """One batch, one image per generator (of class `labels`, if given), from noise to float images in -1..1
    (B, C, H, W)."""
    from diffusers.utils.torch_utils import randn_tensor

    unet_config = denoiser.eager.config
    shape = (len(generators), unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    # fresh per batch: multistep solvers keep state
    scheduler = build_sampler(settings.sampler, scheduler_config, settings.timestep_spacing)
    set_steps(scheduler, settings.num_inference_steps, device=denoiser.device)
    x = randn_tensor(shape, generator=generators, device=denoiser.device, dtype=torch.float32)
    x = x * scheduler.init_noise_sigma
    extra = {"eta": settings.eta} if settings.sampler == "ddim" else {}
    for t in scheduler.timesteps:
        prediction = denoiser(scheduler.scale_model_input(x, t), t, labels)
        x = scheduler.step(prediction, t, x, generator=generators, **extra).prev_sample
    return x


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """-1..1 float (B, C, H, W) -> uint8 (B, H, W, C), rounded as DDPMPipeline's output * 255."""
    x = (x / 2 + 0.5).clamp(0, 1)
    return x.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_batches(
    unet: torch.nn.Module,
    scheduler_config,
    settings: Sample,
    seed: int,
    count: int,
    device: torch.device,
    progress: bool = True,
    runtime: Runtime | None = None,
    labels: np.ndarray | None = None,
    start: int = 0,
) -> Iterator[tuple[int, np.ndarray]]:
    """Images start .. count-1, `settings.batch_size` at a time, as (first index, uint8 B x H x W x C)
    (`start` a multiple of the batch size, for a resumed set to have the uninterrupted one's batches).
    A batch over `sample.max_activation_gib` is refused here, before the first one is made.

    `runtime` (default: `device` with its own choices) decides precision and memory layout. A
    class-conditional UNet samples image i as class `labels[i]`, guided by `settings.guidance_scale`."""
    denoiser = Denoiser(unet, settings, runtime or Runtime.for_device(device))
    batch = max(1, min(settings.batch_size, count - start))  # the largest batch this run makes
    check_sampling_memory(denoiser.eager, settings, batch, batch * denoiser.inputs_per_image(labels is not None))
    return _batches(denoiser, scheduler_config, settings, seed, count, progress, labels, start)


def _batches(denoiser, scheduler_config, settings, seed, count, progress, labels, start):
    from tqdm.auto import tqdm

    name = f"{settings.sampler}-{settings.num_inference_steps}"
    with tqdm(total=count, initial=start, desc=f"sample {name}", unit="img", disable=not progress) as bar:
        for first in range(start, count, settings.batch_size):
            indices = range(first, min(first + settings.batch_size, count))
            batch_labels = None if labels is None else torch.as_tensor(labels[indices.start : indices.stop])
            with torch.inference_mode():  # per batch: grad mode is thread state, and the caller runs between yields
                generators = image_generators(seed, indices)
                batch_labels = None if batch_labels is None else batch_labels.to(denoiser.device)
                images = to_uint8(denoise(denoiser, scheduler_config, settings, generators, batch_labels))
            bar.update(len(indices))
            yield first, images


def sampled_classes(params: Params, class_names: list[str], training: tuple[list[str], np.ndarray]) -> list[int]:
    """The class indices sampled: `sample.classes`, or every class that has training images (`training`:
    the class names and labels of `paths.labels`; FID's reference holds no image of any other)."""
    names, labels = training
    if list(names) != list(class_names):
        raise ConfigError(
            f"{params.paths.labels}: its classes are not those of the trained model in {params.paths.trained}; "
            "re-run preprocess and train"
        )
    counts = np.bincount(labels, minlength=len(names))
    wrong = [c for c in params.sample.classes if c >= len(class_names)]
    if wrong:
        raise ConfigError(
            f"`sample.classes` {wrong}: the model has {len(class_names)} classes (0..{len(class_names) - 1})"
        )
    empty = [c for c in params.sample.classes if counts[c] == 0]
    if empty:
        raise ConfigError(f"`sample.classes` {empty}: no training image has this class, so FID has none to compare")
    chosen = list(params.sample.classes) or [c for c in range(len(class_names)) if counts[c]]
    if len(chosen) > params.fid.num_samples:
        raise ConfigError(
            f"`fid.num_samples` ({params.fid.num_samples}) is below the {len(chosen)} classes sampled: every "
            "class needs a sample (raise it, or choose fewer `sample.classes`)"
        )
    return chosen


def grid_columns(params: Params, chosen: list[int]) -> int:
    """Samples per class in a class-conditional grid (a row per sampled class)."""
    return min(params.sample.grid_size, params.fid.num_samples // len(chosen))


def sample_labels(params: Params, class_names: list[str], training: tuple[list[str], np.ndarray]) -> np.ndarray | None:
    """The class of each sample of the sample set (maths.diffusion.sample_classes): a block of every sampled
    class in turn (grid_columns rounds: the grid), then each class in proportion to its training images
    (`training`: the class names and labels of `paths.labels`), the proportions of the reference set FID
    compares with; None for an unconditional model."""
    if not class_names:
        return None
    chosen = sampled_classes(params, class_names, training)
    counts = np.bincount(training[1], minlength=len(class_names))[chosen]
    return sample_classes(chosen, counts, params.fid.num_samples, grid_columns(params, chosen))
