"""Train stage: a diffusers UNet2DModel on the cached uint8 images, under HF accelerate.

    python -m workflow train      # train.num_processes ranks: 1 = this process (GPU if there is one, else CPU);
                                  # N > 1 = `accelerate launch` of N (one per GPU; gloo ranks on CPU);
                                  # train.batch_size is the global batch (workflow/core/launch.py)

Reads params.paths.images; writes params.paths.trained (DDPMPipeline.save_pretrained, the EMA weights
unless train.ema is false, safetensors), params.paths.train_log (loss and lr per step and images/s per
log interval, logged through dvclive in its layout, see workflow/formats/trainlog.py; summary.json;
grids/step-XXXXXXX.png) and checkpoints under params.paths.checkpoints, from which a re-run resumes
automatically. The main process logs during the run into <checkpoints>/<run key>/dvclive/, re-written
from the checkpoint's history on resume, and the log is copied into train_log at the end, as the grids
are.

With train.progress_grids, every checkpoint also gets a 4x4 grid sampled from the EMA weights (the
trained ones where train.ema is false; DDIM, 25 steps) from the noise streams of the sample stage's
first 16 images, so the same images are seen improving. The grids live beside the checkpoints
(<checkpoints>/<run key>/grids/, never pruned, so they survive a resume) and are copied into train_log
at the end. They use no global random state: switching them on or off leaves the weights bitwise
unchanged.

Every random draw of step s is a function of (seed, s), and the data order of (seed, epoch), so
training k steps, stopping and resuming gives bitwise the weights of an uninterrupted training.

Text-to-image (`model.pretrained`): the pretrained pipeline's UNet2DConditionModel (all of it, or a LoRA
adapter of `train.lora_rank` on its attention projections) is fine-tuned on the encoded set
(`paths.latents`, the encode stage's): each step samples every image's latent from its cached
distribution (the mirrored view's where the flip draw says) and picks one of its captions' cached
embeddings, so the VAE and the text encoder are never run for a training step. The noise schedule and
prediction type are the pipeline's. paths.trained is then a StableDiffusionPipeline folder (or the
LoRA adapter alone); the progress grids show `sample.prompts`, one row each, sampled with the
pipeline's VAE and text encoder (loaded at the first grid) at `sample.guidance_scale`. Like the other
progress grids they are made as the checkpoints are, so they keep the prompts the training ran with (the
sample stage's grid shows today's).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workflow.core.artifacts import atomic_dir, sha256_file
from workflow.core.config import STEPS, ConfigError, Params, Sample
from workflow.core.environment import device_name, software_versions
from workflow.core.faults import maybe_fault
from workflow.core.runtime import Runtime, maybe_compile, to_device, with_eager_fallback
from workflow.core.slots import current_slot
from workflow.formats import checkpoints, trainlog
from workflow.formats.encodings import Encodings, encoding_sha256, load_encodings
from workflow.formats.labels import load_labels
from workflow.formats.pipeline import save_pipeline, save_text_to_image
from workflow.formats.png import write_grid
from workflow.formats.training_images import load_images
from workflow.maths.diffusion import (
    apply_flip,
    batch_indices,
    diffusion_loss,
    drop_labels,
    label_dropout_mask,
    latent_draws,
    latent_sample,
    min_snr_weights,
    pick_captions,
    step_noise,
    to_model_range,
    training_target,
)
from workflow.models.builders import (
    add_lora,
    build_noise_scheduler,
    build_unet,
    check_size,
    count_parameters,
    load_pretrained_noise_scheduler,
    load_pretrained_unet,
    trainable_parameters,
)
from workflow.models.sampling import sample_batches

LR_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
FINAL_LOSS_WINDOW = 50  # train_loss_final is the mean over the last steps, not one noisy value
PROGRESS_SAMPLER = Sample(sampler="ddim", num_inference_steps=25, grid_size=4, batch_size=16)
GRIDS = trainlog.GRIDS_DIR  # the progress grids' folder, beside the checkpoints and in train_log
LIVE = "dvclive"  # the training log's folder while training, beside the checkpoints


@dataclass
class LatentSet:
    """A text-to-image run's training set, from the encode stage: on the GPU when it fits, else memory-mapped."""

    mean: torch.Tensor  # N x V x C x h x w (V = 2: view 1 is the mirrored image's), as stored (float16|32)
    logvar: torch.Tensor
    text: torch.Tensor  # M x L x D: every caption's embedding, as stored; a step's batch is made float32
    offsets: torch.Tensor  # int64 N + 1: image i's captions are rows offsets[i] .. offsets[i + 1] - 1
    scaling_factor: float

    @classmethod
    def place(cls, encoded: Encodings, runtime: Runtime) -> LatentSet:
        arrays = (encoded.mean, encoded.logvar, encoded.text, encoded.offsets)
        placed = runtime.place_dataset(*(torch.from_numpy(a) for a in arrays))
        return cls(*placed, float(encoded.record["scaling_factor"]))


@dataclass
class Training:
    """Everything a training step touches."""

    params: Params
    accelerator: object
    runtime: Runtime
    model: torch.nn.Module  # what the step calls: the prepared model, or its torch.compile wrapper
    eager_model: torch.nn.Module  # the prepared model itself, the fallback if compilation fails
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None
    images: torch.Tensor | None  # uint8 N x C x H x W, on the GPU when it fits, else the memory-mapped file
    total_steps: int
    labels: torch.Tensor | None = None  # class-conditional: int64 N, each image's class, beside the images
    class_names: tuple[str, ...] = ()
    compile_pending: bool = False  # True until the first compiled step has run
    latents: LatentSet | None = None  # text-to-image: the encoded set, instead of `images`
    grid_encoders: object | None = None  # text-to-image: the VAE and text encoder, loaded for the first grid
    live: object | None = None  # the dvclive logger, on the main process
    grad_norm: torch.Tensor | None = None  # the last optimiser step's gradient norm (0 where fp16 skipped it)
    progress: dict = field(
        default_factory=lambda: {"step": 0, "seconds": 0.0, "images": 0, "history": [], "throughput": []}
    )

    @property
    def count(self) -> int:
        return len(self.latents.mean if self.latents is not None else self.images)

    @property
    def sample_shape(self) -> tuple:
        """The shape of one UNet input: C x H x W pixels, or the latents' C x h x w."""
        return tuple(self.latents.mean.shape[2:] if self.latents is not None else self.images.shape[1:])


def make_accelerator(params: Params, runtime: Runtime | None = None):
    from accelerate import Accelerator

    runtime = runtime or Runtime.detect()
    # cpu=True where there is no GPU: only then does accelerate run torchrun's processes as gloo ranks
    accelerator = Accelerator(
        mixed_precision=runtime.training_precision(params.train.mixed_precision), cpu=runtime.device.type == "cpu"
    )
    if accelerator.num_processes != params.train.num_processes:  # the config check covers batch divisibility
        raise ConfigError(
            f"this training runs as {accelerator.num_processes} process(es) but `train.num_processes` is "
            f"{params.train.num_processes}: set it to {accelerator.num_processes}, or run `python -m workflow "
            "train`, which launches train.num_processes ranks itself"
        )
    return accelerator


def total_steps(params: Params, num_images: int) -> int:
    """`train.max_steps`, or `train.epochs` passes over the data in optimiser steps."""
    if params.train.max_steps is not None:
        return params.train.max_steps
    # exact: in floats 1.1 x 100 / 10 is 11.000000000000002, one step too many
    steps = math.ceil(Fraction(str(params.train.epochs)) * num_images / params.train.batch_size)
    if steps > STEPS:
        raise ConfigError(
            f"`train.epochs` ({params.train.epochs}) over {num_images:,} images at `train.batch_size` "
            f"{params.train.batch_size} is {steps:,} steps, over the {STEPS:,} that "
            "`train.max_steps` allows"
        )
    return steps


def build_model(params: Params, images: np.ndarray | None, num_classes: int):
    """(the UNet to train, the training noise scheduler): built from params, or the pretrained pipeline's."""
    if params.model.pretrained is None:
        _, channels, resolution, _ = images.shape
        return build_unet(params.model, resolution, channels, num_classes), build_noise_scheduler(params.scheduler)
    unet = load_pretrained_unet(params.paths.base_model)
    if params.train.lora_rank is not None:
        add_lora(unet, params.train.lora_rank)
    return unet, load_pretrained_noise_scheduler(params.paths.base_model)


def setup(
    params: Params,
    images: np.ndarray | None,
    accelerator,
    runtime: Runtime | None = None,
    labels: np.ndarray | None = None,
    class_names: tuple[str, ...] = (),
    encoded: Encodings | None = None,
) -> Training:
    """The model, optimiser, schedules, EMA and dataset of a training, placed as `runtime` (default: detected)
    says; class-conditional (`model.class_conditional`) with `labels`, one per image, and their `class_names`;
    text-to-image (`model.pretrained`) on the `encoded` set instead of `images`."""
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    t, device = params.train, accelerator.device
    runtime = dataclasses.replace(runtime, device=device) if runtime else Runtime.for_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = t.allow_tf32
    torch.manual_seed(params.seed)  # the initial weights (of a LoRA adapter too)
    num_classes = len(class_names) if params.model.class_conditional else 0
    model, noise_scheduler = build_model(params, images, num_classes)
    model = runtime.layout(model.train())  # from_pretrained hands a pretrained UNet over in eval mode
    if t.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = runtime.adamw(
        trainable_parameters(model),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )
    steps = total_steps(params, len(images) if encoded is None else encoded.record["count"])
    lr_scheduler = get_scheduler(
        LR_SCHEDULES[t.lr_schedule], optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=steps
    )
    # The lr schedule is stepped by hand, once per optimiser step: accelerate's prepared scheduler
    # would step once per process, and train.batch_size is already the global batch.
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = None
    if t.ema:
        unwrapped = accelerator.unwrap_model(model)
        ema = EMAModel(
            trainable_parameters(unwrapped),
            decay=t.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=t.ema_inv_gamma,
            power=t.ema_power,
            model_cls=type(unwrapped),
            model_config=unwrapped.config,
        )
        ema.to(device)
    dataset = None if images is None else runtime.place_dataset(torch.from_numpy(np.ascontiguousarray(images)))[0]
    on_device = torch.from_numpy(labels).to(dataset.device) if num_classes else None
    return Training(
        params,
        accelerator,
        runtime,
        maybe_compile(model, t.compile),
        model,
        noise_scheduler,
        optimizer,
        lr_scheduler,
        ema,
        dataset,
        steps,
        labels=on_device,
        class_names=tuple(class_names) if num_classes else (),
        compile_pending=t.compile,
        latents=None if encoded is None else LatentSet.place(encoded, runtime),
    )


def _process_slice(start: int, size: int, accelerator) -> slice:
    """This process's share of the global batch positions [start, start + size)."""
    share = size // accelerator.num_processes
    first = start + accelerator.process_index * share
    return slice(first, first + share)


def pixel_batch(training: Training, index: torch.Tensor, flip, drop, device) -> tuple[torch.Tensor, dict]:
    """(clean images in -1..1, mirrored where `flip` says with train.random_flip; the UNet's class labels)."""
    clean = to_model_range(to_device(training.images[index.to(training.images.device)], device))
    labels = None
    if training.labels is not None:  # "no class" where dropped: one network learns both models
        labels = to_device(training.labels[index.to(training.labels.device)], device)
        labels = drop_labels(labels, drop, len(training.class_names))
    if training.params.train.random_flip:
        clean = apply_flip(clean, flip)
    return clean, {"class_labels": labels}


def latent_batch(training: Training, index: torch.Tensor, flip, draws, device) -> tuple[torch.Tensor, dict]:
    """(latents drawn from each image's cached distribution, its mirrored view's where `flip` says with
    train.random_flip, scaled for the UNet; the cached embedding of one of its captions, picked by the draw)."""
    cache, (vae_noise, uniform) = training.latents, draws
    rows = index.to(cache.mean.device)
    view = flip.long() if training.params.train.random_flip else torch.zeros_like(flip, dtype=torch.long)
    view = view.to(cache.mean.device)
    mean = to_device(cache.mean[rows, view], device).float()
    logvar = to_device(cache.logvar[rows, view], device).float()
    caption = pick_captions(cache.offsets, rows, uniform.to(cache.offsets.device))
    hidden = to_device(cache.text[caption.to(cache.text.device)], device).float()
    return latent_sample(mean, logvar, vae_noise, cache.scaling_factor), {"encoder_hidden_states": hidden}


def _micro_loss(training: Training, index: torch.Tensor, noise, timesteps, flip, drop, draws) -> torch.Tensor:
    device = noise.device
    if training.latents is None:
        clean, condition = pixel_batch(training, index, flip, drop, device)
    else:
        clean, condition = latent_batch(training, index, flip, draws, device)
    return step_loss(training, clean, noise, timesteps, condition)


def step_loss(training: Training, clean: torch.Tensor, noise, timesteps, condition: dict) -> torch.Tensor:
    """The diffusion loss of one micro-batch: `clean` noised to `timesteps` with `noise`, the UNet's
    prediction given `condition` (its class labels or caption embeddings) against the target."""
    p = training.params
    clean, noise = training.runtime.layout(clean), training.runtime.layout(noise)
    noisy = training.noise_scheduler.add_noise(clean, noise, timesteps)
    with training.accelerator.autocast():
        prediction = training.model(noisy, timesteps, return_dict=False, **condition)[0]
    weights = None
    if p.train.min_snr_gamma is not None:
        weights = min_snr_weights(training.noise_scheduler, timesteps, p.train.min_snr_gamma)
    return diffusion_loss(prediction, training_target(training.noise_scheduler, clean, noise, timesteps), weights)


def train_step(training: Training, step: int) -> torch.Tensor:
    """One optimiser step over the global batch of `step`: this process's shard of each micro-batch,
    gradients accumulated locally and synchronised once. Returns the detached mean loss."""
    p, acc = training.params, training.accelerator
    size, micro_batches = p.train.batch_size, p.train.gradient_accumulation_steps
    index = torch.from_numpy(batch_indices(p.seed, step, size, training.count))
    shape = (size, *training.sample_shape)
    timesteps_count = training.noise_scheduler.config.num_train_timesteps
    noise, timesteps, flip = step_noise(p.seed, step, shape, timesteps_count, acc.device, p.train.noise_offset)
    drop, draws = None, None
    if training.labels is not None:
        drop = label_dropout_mask(p.seed, step, size, p.train.label_dropout, acc.device)
    if training.latents is not None:
        draws = latent_draws(p.seed, step, shape, acc.device)
    micro, losses = size // micro_batches, []
    for m in range(micro_batches):
        part = _process_slice(m * micro, micro, acc)
        sync = acc.no_sync(training.eager_model) if m < micro_batches - 1 else contextlib.nullcontext()
        with sync:
            part_drop = None if drop is None else drop[part]
            part_draws = None if draws is None else (draws[0][part], draws[1][part])
            loss = _micro_loss(training, index[part], noise[part], timesteps[part], flip[part], part_drop, part_draws)
            acc.backward(loss / micro_batches)
        losses.append(loss.detach())
    optimizer_step(training)
    return torch.stack(losses).mean()


def optimizer_step(training: Training) -> None:
    """After the step's gradients: clip them, step the optimiser and the lr schedule, update the EMA."""
    weights = trainable_parameters(training.eager_model)
    norm = training.accelerator.clip_grad_norm_(weights, training.params.train.max_grad_norm)
    training.optimizer.step()
    skipped = training.accelerator.optimizer_step_was_skipped  # fp16's GradScaler skips a step that overflowed
    if not skipped:
        training.lr_scheduler.step()
    # Kept on the device, checked with the loss: a non-finite norm means clipping has just scaled the update
    # by max_norm / norm (NaN weights), unless the GradScaler skipped the step, where inf is its normal signal
    training.grad_norm = torch.zeros_like(norm) if skipped else norm.detach()
    training.optimizer.zero_grad(set_to_none=True)
    if training.ema is not None:
        training.ema.step(weights)


def guarded_step(training: Training, step: int) -> torch.Tensor:
    """train_step; the first compiled step falls back to eager mode if compilation fails."""
    if not training.compile_pending:
        return train_step(training, step)

    def eager_step():
        training.optimizer.zero_grad(set_to_none=True)  # whatever the failed attempt accumulated
        training.model = training.eager_model
        return train_step(training, step)

    loss, _ = with_eager_fallback(lambda: train_step(training, step), eager_step, "training")
    training.compile_pending = False
    return loss


def check_ranks_agree(training: Training) -> None:
    """Invariant: data-parallel processes end with identical weights."""
    acc = training.accelerator
    if acc.num_processes == 1:
        return
    total = torch.zeros(2, dtype=torch.float64, device=acc.device)
    peak = torch.zeros((), dtype=torch.float64, device=acc.device)
    for w in acc.unwrap_model(training.model).parameters():  # one at a time: no float64 copy of a whole SD UNet
        w = w.detach().double()
        total += torch.stack([w.sum(), w.square().sum()])
        peak = torch.maximum(peak, w.abs().max())
    fingerprint = torch.cat([total, peak[None]])[None]
    gathered = acc.gather(fingerprint)
    assert torch.equal(gathered, gathered[:1].expand_as(gathered)), f"ranks disagree: {gathered.tolist()}"


def _flush_losses(training: Training, pending: list) -> None:
    """Move the buffered per-step losses and gradient norms to the host in one transfer; stop on a
    non-finite one."""
    if not pending:
        return
    steps, losses, norms, lrs = zip(*pending, strict=True)
    both = torch.stack([torch.stack(losses).float(), torch.stack(norms).float()])
    values, norm_values = training.accelerator.reduce(both, reduction="mean").cpu().tolist()
    for step, loss, norm, lr in zip(steps, values, norm_values, lrs, strict=True):
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss} at step {step}; lower train.learning_rate or use "
                f"train.mixed_precision other than fp16. Earlier checkpoints are intact."
            )
        if not np.isfinite(norm):  # fp16's skipped steps count 0: here under bf16 or float32
            raise FloatingPointError(
                f"gradient norm is {norm} at step {step} (its loss {loss:g} was finite): the update would make "
                "the weights NaN; lower train.learning_rate, or check the data for extreme values. "
                "Earlier checkpoints are intact."
            )
        training.progress["history"].append([step, loss, lr])
    pending.clear()


def train_loop(training: Training, checkpoint_dir: Path) -> None:
    p, acc, last = training.params, training.accelerator, training.total_steps
    start_step = training.progress["step"]
    # a context manager: a failed step (non-finite loss) closes the bar where the error is reported
    with tqdm(total=last, initial=start_step, desc="train", unit="step", disable=not acc.is_local_main_process) as bar:
        pending, started, images = [], time.perf_counter(), 0
        logged_at, logged_images = started, 0
        for step in range(start_step, last):
            lr = training.lr_scheduler.get_last_lr()[0]
            loss = guarded_step(training, step)
            pending.append((step + 1, loss, training.grad_norm, lr))
            images += p.train.batch_size
            done = step + 1
            maybe_fault("train.after_step", done)
            checkpoint = done % p.train.checkpoint_every == 0 or done == last
            if done % p.train.log_every == 0 or checkpoint:
                logged = len(training.progress["history"])
                _flush_losses(training, pending)  # the one host synchronisation per log interval
                now = time.perf_counter()
                rate = (images - logged_images) / (now - logged_at)
                training.progress["throughput"].append([done, rate])
                if training.live is not None:
                    trainlog.log(training.live, training.progress["history"][logged:], [[done, rate]])
                logged_at, logged_images = now, images
                bar.set_postfix(loss=f"{training.progress['history'][-1][1]:.4f}", img_s=f"{rate:.0f}")
                bar.update(done - bar.n)
            if checkpoint:
                _record_time(training, done, started, images)
                save_progress_grid(training, checkpoint_dir / GRIDS, done)  # first: every saved checkpoint has its grid
                started, images, logged_at, logged_images = time.perf_counter(), 0, time.perf_counter(), 0
                checkpoints.save_checkpoint(
                    acc, checkpoint_dir, training.progress, p.train.checkpoints_total_limit, training_states(training)
                )


@contextlib.contextmanager
def ema_weights(training: Training, unet: torch.nn.Module):
    """The EMA weights in `unet` for the duration (store -> copy_to -> restore, bitwise)."""
    if training.ema is None:
        yield unet
        return
    weights = trainable_parameters(unet)
    training.ema.store(weights)
    training.ema.copy_to(weights)
    try:
        yield unet
    finally:
        training.ema.restore(weights)


def save_progress_grid(training: Training, folder: Path, step: int) -> None:
    """The progress grid of `step` from the EMA weights (main process; per-image generators only)."""
    if not training.params.train.progress_grids or not training.accelerator.is_main_process:
        return
    if training.latents is not None:
        save_prompt_grid(training, folder, step)
        return
    unet = training.accelerator.unwrap_model(training.eager_model)
    size, was_training = PROGRESS_SAMPLER.grid_size, unet.training
    names, labels = training.class_names, None
    if names:  # one row per class, the first `size` classes
        labels = np.arange(size * size) // size % len(names)
    with ema_weights(training, unet):
        batches = sample_batches(
            unet,
            training.noise_scheduler.config,
            PROGRESS_SAMPLER,
            training.params.seed,
            size * size,
            training.accelerator.device,
            progress=False,
            labels=labels,
        )
        images = np.concatenate([b for _, b in batches])
    unet.train(was_training)
    rows = [names[c] for c in labels[::size]] if names else None
    write_grid(images, size, trainlog.progress_grid(folder, step), row_labels=rows)


def save_prompt_grid(training: Training, folder: Path, step: int) -> None:
    """A text-to-image progress grid: `sample.prompts` (the first 4), a row of 4 seeds each, DDIM-25 with the
    run's guidance, from the EMA weights; the VAE and text encoder are loaded at the first grid."""
    from workflow.models.latent import load_encoders
    from workflow.models.text_sampling import grid_prompts, prompt_batches, text_pipeline

    p, size = training.params, PROGRESS_SAMPLER.grid_size
    settings = dataclasses.replace(
        PROGRESS_SAMPLER, guidance_scale=p.sample.guidance_scale, negative_prompt=p.sample.negative_prompt
    )
    device = training.accelerator.device
    if training.grid_encoders is None:
        training.grid_encoders = load_encoders(p.paths.base_model, device)
    unet = training.accelerator.unwrap_model(training.eager_model)
    was_training, rows = unet.training, list(p.sample.prompts[:size])
    with ema_weights(training, unet):
        pipe = text_pipeline(p.paths.base_model, unet, settings, device, training.grid_encoders)
        resolution = training.sample_shape[-1] * training.grid_encoders.scale_factor
        batches = prompt_batches(pipe, grid_prompts(rows, size), settings, p.seed, resolution, progress=False)
        images = np.concatenate([b for _, b in batches])
    unet.train(was_training)
    write_grid(images, size, trainlog.progress_grid(folder, step), row_labels=rows)


def _record_time(training: Training, step: int, started: float, images: int) -> None:
    training.runtime.synchronize()
    training.progress["step"] = step
    training.progress["seconds"] += time.perf_counter() - started
    training.progress["images"] += images


def training_states(training: Training) -> dict:
    """What a checkpoint holds beside accelerate's model, optimiser and RNG states."""
    return {"lr_scheduler": training.lr_scheduler, **({"ema": training.ema} if training.ema is not None else {})}


def resume(training: Training, checkpoint_dir: Path) -> Path | None:
    latest = checkpoints.latest_checkpoint(checkpoint_dir)
    if latest is not None:
        training.progress = checkpoints.load_checkpoint(training.accelerator, latest, training_states(training))
        training.progress.setdefault("throughput", [])
    return latest


def summary(training: Training, resumed_from: Path | None, key: str) -> dict:
    history, prog = training.progress["history"], training.progress
    unet = training.accelerator.unwrap_model(training.model)
    tail = [loss for _, loss, _ in history[-FINAL_LOSS_WINDOW:]]
    return {
        "steps": prog["step"],
        "loss_final": float(np.mean(tail)),
        "seconds": prog["seconds"],
        "images_per_second": prog["images"] / prog["seconds"] if prog["seconds"] else 0.0,
        "num_parameters": count_parameters(unet),
        "trainable_parameters": sum(w.numel() for w in trainable_parameters(unet)),
        "run_key": key,
        "resumed_from_step": int(resumed_from.name.split("-")[1]) if resumed_from else 0,
        "device": training.accelerator.device.type,
        "device_name": device_name(training.accelerator.device),
        "software": software_versions(),
        "num_processes": training.accelerator.num_processes,
        "mixed_precision": training.accelerator.mixed_precision,
        "compiled": training.model is not training.eager_model,
        "torch_threads": torch.get_num_threads(),  # CPU results are bitwise reproducible per thread count
        "device_slot": current_slot(),  # which of the machine's device slots ran it (workflow/core/slots.py)
    }


def save_outputs(training: Training, info: dict, checkpoint_dir: Path) -> None:
    """The pipeline with the EMA weights, the training log and the progress grids; main process only."""
    paths = training.params.paths
    # the eager module: unwrap_model keeps a torch.compile wrapper, whose state-dict keys (_orig_mod.*)
    # would make a LoRA adapter that load_lora_weights cannot match to the UNet
    unet = training.accelerator.unwrap_model(training.eager_model)
    with ema_weights(training, unet):
        if training.latents is None:
            save_pipeline(unet, training.noise_scheduler, paths.trained, training.class_names)
        else:
            save_text_to_image(unet, paths.base_model, paths.trained, lora=training.params.train.lora_rank is not None)
    training.live.end()
    with atomic_dir(paths.train_log) as out:
        shutil.copytree(checkpoint_dir / LIVE, out, dirs_exist_ok=True)
        if training.params.train.progress_grids and (checkpoint_dir / GRIDS).is_dir():
            shutil.copytree(checkpoint_dir / GRIDS, out / GRIDS)
        trainlog.write_summary(out, info)


def training_labels(params: Params) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """(each image's class, the class names) for a class-conditional model; (None, ()) otherwise."""
    if not params.model.class_conditional:
        return None, ()
    classes, labels = load_labels(params.paths.labels)
    if not classes:
        raise ConfigError(
            f"`model.class_conditional` is true but `data.source` {params.data.source!r} gave no labels "
            f"({params.paths.labels} is empty): use a labelled source (builtin:mnist, an image folder with one "
            "subfolder per class, or an hf dataset with `data.label_column`)"
        )
    empty = [name for c, name in enumerate(classes) if not np.any(labels == c)]
    if empty:
        raise ConfigError(
            f"class {empty[0]!r} has no decodable image in {params.paths.images} ({len(empty)} such classes); "
            "add images for it, or raise `data.max_images`"
        )
    return labels, tuple(classes)


def check_encoded(params: Params, encoded: Encodings) -> None:
    """The encoded set must be this run's: both views with train.random_flip, the images and captions now
    preprocessed, the pipeline now downloaded; else one error naming the record and the stage to re-run."""
    from workflow.formats.base_model import base_sha256

    record, paths = encoded.record, params.paths
    views = 2 if params.train.random_flip else 1
    now = {
        "views": (record["views"], views, "`train.random_flip`"),
        "images_sha256": (record.get("images_sha256"), sha256_file(paths.images), paths.images),
        "captions_sha256": (record.get("captions_sha256"), sha256_file(paths.captions), paths.captions),
        "base_sha256": (record.get("base_sha256"), base_sha256(paths.base_model), paths.base_model),
    }
    for key, (was, wanted, what) in now.items():
        if was != wanted:
            raise ConfigError(
                f"{paths.latents}: encoded with {key} {was!r}, but {what} now gives {wanted!r}; re-run the encode "
                "stage (`dvc repro` or `snakemake` re-runs it)"
            )


@dataclass
class TrainingData:
    """What a run trains on, checked, memory-mapped, and the run key it gives."""

    images: np.ndarray | None  # uint8 N x C x H x W; None for text-to-image, which trains on `encoded`
    encoded: Encodings | None
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    key: str  # checkpoints.run_key: the folder of checkpoints this run resumes and writes


def training_data(params: Params) -> TrainingData:
    labels, class_names = training_labels(params)
    encoded, latent = None, None
    if params.model.pretrained is not None:  # memory-mapped: its record is what check_size needs
        encoded = load_encodings(params.paths.latents)
        latent = {"base": params.paths.base_model} | {k: encoded.record[k] for k in ("latent_shape", "text_shape")}
    check_size(params, len(class_names), latent, PROGRESS_SAMPLER)  # over a cap: refused before anything is built
    if encoded is None:
        images, data_sha = load_images(params.paths.images, copy_on_write=True), sha256_file(params.paths.images)
    else:  # the encoded set's record names its arrays' content
        check_encoded(params, encoded)
        images, data_sha = None, encoding_sha256(params.paths.latents)
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"{params.paths.labels}: {len(labels)} labels for {len(images)} images; re-run preprocess")
    labels_sha = sha256_file(params.paths.labels) if labels is not None else None
    key = checkpoints.run_key(params, data_sha, labels_sha)
    return TrainingData(images, encoded, labels, class_names, key)


@contextlib.contextmanager
def sole_run(params: Params):
    """Taken by `python -m workflow train` before its device slots and before it launches ranks: a run
    waiting for another of its recipe holds no device, and the ranks it launches meet only once it may
    train (checkpoints.sole_trainer). Yields the lock's descriptor, for the launcher to inherit."""
    data = training_data(params)
    with checkpoints.sole_trainer(checkpoints.run_folder(params.paths.checkpoints, data.key)) as lock:
        yield lock


def run(params: Params) -> dict:
    data = training_data(params)
    checkpoint_dir = checkpoints.run_folder(params.paths.checkpoints, data.key)
    with checkpoints.sole_trainer(checkpoint_dir):  # held already where `python -m workflow train` took it
        accelerator = make_accelerator(params)
        training = setup(
            params, data.images, accelerator, labels=data.labels, class_names=data.class_names, encoded=data.encoded
        )
        resumed_from = resume(training, checkpoint_dir)
        if resumed_from is not None:
            accelerator.print(f"resuming from {resumed_from} (step {training.progress['step']})")
        if accelerator.is_main_process:
            training.live = trainlog.start(
                checkpoint_dir / LIVE, training.progress["history"], training.progress["throughput"]
            )
        train_loop(training, checkpoint_dir)
        check_ranks_agree(training)
        info = summary(training, resumed_from, data.key)
        if accelerator.is_main_process:
            save_outputs(training, info, checkpoint_dir)
        accelerator.wait_for_everyone()
    return info


def headline(info: dict, params: Params) -> str:
    return (
        f"trained {info['steps']} steps: loss {info['loss_final']:.4f}, "
        f"{info['images_per_second']:.1f} images/s over {info['seconds']:.1f} s"
    )
