"""Builds the networks and noise schedulers from params: the one place that maps params to diffusers.

check_size(params)          # first: refuses a UNet or a batch over the caps, allocating nothing
unet = build_unet(params.model, resolution=16, channels=1)
noise_scheduler = build_noise_scheduler(params.scheduler)
sampler = build_sampler("ddim", noise_scheduler.config, "trailing")   # None: the schedule's own spacing
set_steps(sampler, 50)                                                 # DDIM's own stride checked

Text-to-image (`model.pretrained`): the pretrained pipeline's own UNet2DConditionModel and noise schedule,
from its folder (`paths.base_model`), and optionally a LoRA adapter on the UNet's attention projections:
unet = load_pretrained_unet("models/base"); add_lora(unet, rank=4)
noise_scheduler = load_pretrained_noise_scheduler("models/base")
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel, UNet2DModel

from workflow.core.config import ConfigError, Model, Params, Sample, Scheduler
from workflow.models.memory import GIB, peak_bytes

LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the attention projections, as the reference LoRA script

SAMPLERS = {  # sample.sampler -> (scheduler class, settings on top of the training noise schedule)
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


def build_unet(model: Model, resolution: int, channels: int, num_classes: int = 0) -> UNet2DModel:
    """The tutorial's UNet family: one down/up block per level, self-attention at `attention_levels`.
    With `num_classes`, a class embedding of num_classes + 1 rows: the last is "no class" (guidance)."""
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
        num_class_embeds=num_classes + 1 if num_classes else None,
    )


def null_class(unet) -> int | None:
    """The "no class" index of a class-conditional UNet (its last embedding row); None if unconditional."""
    embeds = unet.config.num_class_embeds
    return embeds - 1 if embeds else None


def build_noise_scheduler(scheduler: Scheduler) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=scheduler.num_train_timesteps,
        beta_schedule=scheduler.beta_schedule,
        prediction_type=scheduler.prediction_type,
        # named, so that this config equals the one saved with the model: a sampler built from_config takes
        # only the values set explicitly, and would take its own default spacing (DPM-Solver's is "linspace")
        timestep_spacing="leading",
    )


def build_sampler(name: str, noise_scheduler_config, timestep_spacing: str | None):
    """A sampling scheduler sharing the training noise schedule (betas, prediction type), its steps spaced
    over the training timesteps by `timestep_spacing` (sample.timestep_spacing). None keeps the schedule's
    spacing where its config sets one ("leading" for the models trained here), else the sampler's diffusers
    default, as `from_config(pipeline.scheduler.config)` does."""
    cls, settings = SAMPLERS[name]
    spacing = {} if timestep_spacing is None else {"timestep_spacing": timestep_spacing}
    return cls.from_config(noise_scheduler_config, **settings, **spacing)


def sampler_spacing(settings: Sample, noise_scheduler_config) -> str:
    """The timestep spacing `settings` samples with on that schedule (what records and cards name)."""
    return build_sampler(settings.sampler, noise_scheduler_config, settings.timestep_spacing).config.timestep_spacing


def set_steps(sampler, steps: int, device=None) -> None:
    """`sampler.set_timesteps(steps)`, refusing DDIM where it would not step onto its own next timestep:
    diffusers' DDIMScheduler always steps from t to t - num_train_timesteps // steps, which is the next
    timestep only for "leading" spacing, or "trailing" with a step count dividing num_train_timesteps."""
    sampler.set_timesteps(steps, device=device)
    if not isinstance(sampler, DDIMScheduler):
        return
    stride, timesteps = sampler.config.num_train_timesteps // steps, sampler.timesteps.tolist()
    if any(t - after != stride for t, after in itertools.pairwise(timesteps)):
        raise ConfigError(
            f"`sample.sampler` ddim with timestep spacing {sampler.config.timestep_spacing!r} in {steps} steps: "
            f"diffusers' DDIM steps from t to t - {stride}, not to its next timestep ({timesteps[:3]}...); "
            f"use `sample.timestep_spacing` leading, or trailing with a step count that divides "
            f"{sampler.config.num_train_timesteps}"
        )


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable_parameters(module) -> list:
    """The parameters training updates: all of them, or only a LoRA adapter's."""
    return [p for p in module.parameters() if p.requires_grad]


def _load(what: str, base: str | Path, load):
    try:
        return load(str(base))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{base}: cannot load the pretrained {what} ({exc}); re-run download_model") from None


def load_pretrained_unet(base: str | Path) -> UNet2DConditionModel:
    return _load(
        "unet", base, lambda b: UNet2DConditionModel.from_pretrained(b, subfolder="unet", use_safetensors=True)
    )


def pretrained_scheduler_config(base: str | Path) -> dict:
    """The pretrained pipeline's noise schedule (betas, prediction type), for training and sampling alike.
    Latents are never clipped to [-1, 1]: SD 1.x's PNDM config predates `clip_sample`, whose default in
    DDPM and DDIM is true (diffusers warns of it)."""
    config = _load("scheduler", base, lambda b: DDPMScheduler.load_config(b, subfolder="scheduler"))
    return {**config, "clip_sample": config.get("clip_sample", False)}


def load_pretrained_noise_scheduler(base: str | Path) -> DDPMScheduler:
    """The training scheduler over the pipeline's schedule, as the reference script builds it."""
    return DDPMScheduler.from_config(pretrained_scheduler_config(base))


def add_lora(unet, rank: int) -> None:
    """Freeze `unet` and give it a trainable LoRA adapter of `rank` (alpha = rank, Gaussian init, as the
    reference script); only the adapter's weights then require gradients."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def check_size(params: Params, num_classes: int = 0, latent: dict | None = None, grid: Sample | None = None) -> dict:
    """Refuse, before anything is allocated, a UNet over `model.max_parameters` or a training micro-batch
    whose activations exceed `train.max_activation_gib`, and (with `train.progress_grids`) a progress grid
    sampled with `grid` over its `max_activation_gib`, rather than at the first checkpoint. All are
    measured on the meta device (shapes, no memory), where config's upper bounds keep even the largest
    allowed build quick. A text-to-image run passes `latent` = {"base": the pipeline folder, "latent_shape":
    (C, h, w), "text_shape": (L, D)}: its pretrained UNet's config is built, with the caption embeddings it
    attends to. The step's noise, drawn for the global batch, counts against `train.max_activation_gib` too.
    Returns {"parameters": count, "activation_gib": estimate, "noise_gib": the noise's}."""
    m, t, data = params.model, params.train, params.data
    with torch.device("meta"):
        if latent is None:
            unet = build_unet(m, resolution=data.resolution, channels=data.channels, num_classes=num_classes)
        else:
            config = _load("unet", latent["base"], lambda b: UNet2DConditionModel.load_config(b, subfolder="unet"))
            unet = UNet2DConditionModel.from_config(config)
    count = count_parameters(unet)
    what = (
        f"the pretrained UNet of {m.pretrained}"
        if latent
        else f"the UNet of `model.block_out_channels` {list(m.block_out_channels)}, "
        f"`model.layers_per_block` {m.layers_per_block} and `model.attention_levels` {list(m.attention_levels)}"
    )
    if count > m.max_parameters:
        raise ConfigError(
            f"{what} has {count:,} parameters, over `model.max_parameters` ({m.max_parameters:,}): "
            f"{'choose a smaller one' if latent else 'make it smaller'}, or raise the cap"
        )
    micro_batch = t.batch_size // (t.gradient_accumulation_steps * t.num_processes)  # what one device holds
    shape = tuple(latent["latent_shape"]) if latent else None
    context = tuple(latent["text_shape"]) if latent else None
    gib = activation_bytes(unet, micro_batch, shape, context) / GIB
    if gib > t.max_activation_gib:
        raise ConfigError(
            f"one training micro-batch of {micro_batch} images (`train.batch_size` / "
            f"(`train.gradient_accumulation_steps` x `train.num_processes`)) at `data.resolution` {data.resolution} "
            "keeps about "
            f"{gib:,.0f} GiB of activations for the backward pass on {what}, over "
            f"`train.max_activation_gib` ({t.max_activation_gib:,}): raise "
            "`train.gradient_accumulation_steps` (or `train.num_processes`), lower `train.batch_size`, "
            "or raise the cap"
        )
    # The step's noise is drawn for the whole global batch on every device (so that each shard equals the
    # one-process run's slice), not a micro-batch's: with many accumulated micro-batches it can outgrow them.
    image = math.prod(shape) if shape else data.channels * data.resolution**2
    # a latent run also draws each latent; offset noise is added to a second full-size draw
    draws = (2 if latent else 1) + (1 if t.noise_offset else 0)
    noise_gib = t.batch_size * image * 4 * draws / GIB
    if gib + noise_gib > t.max_activation_gib:
        raise ConfigError(
            f"a training step draws its noise for the whole `train.batch_size` ({t.batch_size:,} images) on each "
            f"device: {noise_gib:,.1f} GiB beside the micro-batch's {gib:,.1f} GiB of activations, over "
            f"`train.max_activation_gib` ({t.max_activation_gib:,}): lower `train.batch_size`, or raise the cap"
        )
    if grid is not None and t.progress_grids:  # a text grid is guided as the run's samples are
        inputs = grid.batch_size * (2 if latent and params.sample.guidance_scale > 1 else 1)
        check_sampling_memory(unet, grid, grid.batch_size, inputs, shape, context, what="a progress grid")
    return {"parameters": count, "activation_gib": gib, "noise_gib": noise_gib}


def activation_bytes(unet, batch: int, shape: tuple | None = None, context: tuple | None = None) -> int:
    """Bytes of the tensors a float32 forward pass of `unet` saves for the backward pass over `batch`
    inputs of `shape` (default: the UNet's own sample size; with `context`, the L x D caption embeddings
    a conditional UNet attends to), each counted once, the weights not at all: what training holds at
    its peak. On the meta device nothing is allocated. Attention counts as the math kernel saves it (its
    N x N weights), an upper bound for the fused kernels of CPUs and GPUs; bf16 autocast saves less."""
    weights = {id(w) for w in unet.parameters()}
    saved = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in weights:
            saved[id(tensor)] = tensor.numel() * tensor.element_size()
        return tensor

    size, channels, device = unet.config.sample_size, unet.config.in_channels, unet.device
    shape = shape or (channels, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        noisy = torch.zeros(batch, *shape, device=device)
        steps = torch.zeros(batch, dtype=torch.long, device=device)
        condition = {"class_labels": steps if unet.config.num_class_embeds else None}
        if context is not None:
            condition["encoder_hidden_states"] = torch.zeros(batch, *context, device=device)
        unet(noisy, steps, return_dict=False, **condition)
    return sum(saved.values())


def sampling_peak_bytes(unet, batch: int, shape: tuple | None = None, context: tuple | None = None) -> int:
    """Bytes of the tensors one float32 sampling call of `unet` (no gradients) holds at once at its
    fullest, over `batch` inputs of `shape` (default: the UNet's own sample size; with `context`, the
    L x D caption embeddings), the weights not at all. Counted on a meta-device copy built from its config
    (nothing allocated; a LoRA adapter's small projections are left out); attention as the fused kernels
    run it, without its N x N weights. Kernel workspaces come on top (README, "Upper bounds")."""
    unet = getattr(unet, "_orig_mod", unet)  # torch.compile's wrapper
    with torch.device("meta"):
        meta = type(unet).from_config(unet.config)
    size, channels = meta.config.sample_size, meta.config.in_channels
    shape = shape or (channels, size, size)

    def one_call():
        steps = torch.zeros(batch, dtype=torch.long, device="meta")
        condition = {"class_labels": steps if meta.config.num_class_embeds else None}
        if context is not None:
            condition["encoder_hidden_states"] = torch.zeros(batch, *context, device="meta")
        meta(torch.zeros(batch, *shape, device="meta"), steps, return_dict=False, **condition)

    return peak_bytes(one_call)


def check_sampling_memory(
    unet,
    settings: Sample,
    images: int,
    per_call: int,
    shape: tuple | None = None,
    context: tuple | None = None,
    what: str = "a sampling batch",
) -> float:
    """Refuse, before sampling, `what` of `images` whose UNet calls (`per_call` inputs each: twice the
    images when guidance evaluates both predictions in one call) would hold more than
    `sample.max_activation_gib`. Returns the estimate in GiB."""
    gib = sampling_peak_bytes(unet, per_call, shape, context) / GIB
    if gib > settings.max_activation_gib:
        doubled = " (twice the images: guidance makes both predictions in one call)" if per_call > images else ""
        raise ConfigError(
            f"{what} of {images} images runs the UNet on {per_call} inputs{doubled}, which hold about "
            f"{gib:,.1f} GiB at once, over `sample.max_activation_gib` ({settings.max_activation_gib:,}): "
            + ("lower `sample.batch_size`" if what == "a sampling batch" else "turn off `train.progress_grids`")
            + ", or raise the cap"
        )
    return gib
