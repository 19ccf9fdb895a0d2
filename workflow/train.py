"""Train stage: a diffusers UNet2DModel on the cached uint8 images, under HF accelerate.

    python -m workflow train                     # one process (GPU if there is one, else CPU)
    accelerate launch -m workflow train          # several GPUs; train.batch_size is the global batch

Reads params.paths.images; writes params.paths.pipeline (DDPMPipeline.save_pretrained, EMA weights,
safetensors), params.paths.train_log (history.csv: loss and lr per step; summary.json) and
checkpoints under params.paths.checkpoints, from which a re-run resumes automatically.

Every random draw of step s is a function of (seed, s), and the data order of (seed, epoch), so
training k steps, stopping and resuming gives bitwise the weights of an uninterrupted run.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from workflow import checkpoints
from workflow.artifacts import atomic_dir, sha256_file
from workflow.cli import parse_params
from workflow.config import ConfigError, Params
from workflow.diffusion import (apply_flip, batch_indices, diffusion_loss, step_noise,
                                to_model_range, training_target)
from workflow.model import build_noise_scheduler, build_unet, count_parameters

LR_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}
FINAL_LOSS_WINDOW = 50  # train_loss_final is the mean over the last steps, not one noisy value


@dataclass
class Run:
    """Everything a training step touches."""
    params: Params
    accelerator: object
    model: torch.nn.Module
    noise_scheduler: object
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None
    images: torch.Tensor  # uint8 N x C x H x W, on the training device
    progress: dict = field(default_factory=lambda: {"step": 0, "seconds": 0.0, "images": 0, "history": []})


def make_accelerator(params: Params):
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=params.train.mixed_precision)
    if params.train.batch_size % accelerator.num_processes:
        raise ConfigError(f"`train.batch_size` ({params.train.batch_size}) must be divisible by the number "
                          f"of processes ({accelerator.num_processes})")
    return accelerator


def setup(params: Params, images: np.ndarray, accelerator) -> Run:
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    t = params.train
    torch.manual_seed(params.seed)  # the initial weights
    _, channels, resolution, _ = images.shape
    model = build_unet(params.model, resolution=resolution, channels=channels)
    device = accelerator.device
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.adam_weight_decay, eps=t.adam_epsilon,
                                  fused=device.type == "cuda")
    lr_scheduler = get_scheduler(LR_SCHEDULES[t.lr_schedule], optimizer, num_warmup_steps=t.warmup_steps,
                                 num_training_steps=t.max_steps)
    # The lr schedule is stepped by hand, once per optimiser step: accelerate's prepared scheduler
    # would step once per process, and train.batch_size is already the global batch.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(lr_scheduler)
    ema = None
    if t.ema:
        unwrapped = accelerator.unwrap_model(model)
        ema = EMAModel(unwrapped.parameters(), decay=t.ema_max_decay, use_ema_warmup=True,
                       inv_gamma=t.ema_inv_gamma, power=t.ema_power,
                       model_cls=type(unwrapped), model_config=unwrapped.config)
        ema.to(device)
        accelerator.register_for_checkpointing(ema)
    pixels = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return Run(params, accelerator, model, build_noise_scheduler(params.scheduler), optimizer,
               lr_scheduler, ema, pixels)


def train_step(run: Run, step: int) -> torch.Tensor:
    """One optimiser step on this process's shard of the global batch; returns the detached loss."""
    p, acc = run.params, run.accelerator
    size = p.train.batch_size
    shard = slice(acc.process_index * size // acc.num_processes, (acc.process_index + 1) * size // acc.num_processes)
    index = torch.from_numpy(batch_indices(p.seed, step, size, run.images.shape[0])[shard]).to(run.images.device)
    shape = (size, *run.images.shape[1:])
    noise, timesteps, flip = (x[shard] for x in step_noise(p.seed, step, shape, p.scheduler.num_train_timesteps,
                                                            run.images.device))
    clean = to_model_range(run.images[index])
    if p.train.random_flip:
        clean = apply_flip(clean, flip)
    if clean.device.type == "cuda":
        clean, noise = (x.contiguous(memory_format=torch.channels_last) for x in (clean, noise))
    noisy = run.noise_scheduler.add_noise(clean, noise, timesteps)
    with acc.autocast():
        prediction = run.model(noisy, timesteps, return_dict=False)[0]
    loss = diffusion_loss(prediction, training_target(run.noise_scheduler, clean, noise, timesteps))
    acc.backward(loss)
    acc.clip_grad_norm_(run.model.parameters(), p.train.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.model.parameters())
    return loss.detach()


def _flush_losses(run: Run, pending: list) -> None:
    """Move the buffered per-step losses to the host in one transfer; stop on a non-finite loss."""
    if not pending:
        return
    steps, losses, lrs = zip(*pending)
    values = run.accelerator.reduce(torch.stack(losses), reduction="mean").float().cpu().tolist()
    for step, loss, lr in zip(steps, values, lrs):
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"training loss is {loss} at step {step}; lower train.learning_rate or use "
                f"train.mixed_precision other than fp16. Earlier checkpoints are intact.")
        run.progress["history"].append([step, loss, lr])
    pending.clear()


def train_loop(run: Run, checkpoint_dir: Path) -> None:
    p, acc = run.params, run.accelerator
    start_step = run.progress["step"]
    bar = tqdm(total=p.train.max_steps, initial=start_step, desc="train", unit="step",
               disable=not acc.is_local_main_process)
    pending, started, images = [], time.perf_counter(), 0
    for step in range(start_step, p.train.max_steps):
        lr = run.lr_scheduler.get_last_lr()[0]
        pending.append((step + 1, train_step(run, step), lr))
        images += p.train.batch_size
        done = step + 1
        if done % p.train.log_every == 0 or done == p.train.max_steps or done % p.train.checkpoint_every == 0:
            _flush_losses(run, pending)
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{run.progress['history'][-1][1]:.4f}", img_s=f"{images / elapsed:.0f}")
            bar.update(done - bar.n)
        if done % p.train.checkpoint_every == 0 or done == p.train.max_steps:
            _record_time(run, done, started, images)
            started, images = time.perf_counter(), 0
            checkpoints.save_checkpoint(acc, checkpoint_dir, run.progress, p.train.checkpoints_to_keep)
    bar.close()


def _record_time(run: Run, step: int, started: float, images: int) -> None:
    if run.accelerator.device.type == "cuda":
        torch.cuda.synchronize()
    run.progress["step"] = step
    run.progress["seconds"] += time.perf_counter() - started
    run.progress["images"] += images


def resume(run: Run, checkpoint_dir: Path) -> Path | None:
    latest = checkpoints.latest_checkpoint(checkpoint_dir)
    if latest is not None:
        run.accelerator.load_state(str(latest))
        run.progress = checkpoints.load_progress(latest)
    return latest


def summary(run: Run, resumed_from: Path | None, key: str) -> dict:
    history, prog = run.progress["history"], run.progress
    tail = [loss for _, loss, _ in history[-FINAL_LOSS_WINDOW:]]
    return {
        "steps": prog["step"],
        "loss_final": float(np.mean(tail)),
        "seconds": prog["seconds"],
        "images_per_second": prog["images"] / prog["seconds"] if prog["seconds"] else 0.0,
        "num_parameters": count_parameters(run.accelerator.unwrap_model(run.model)),
        "run_key": key,
        "resumed_from_step": int(resumed_from.name.split("-")[1]) if resumed_from else 0,
        "device": run.accelerator.device.type,
        "num_processes": run.accelerator.num_processes,
        "mixed_precision": run.params.train.mixed_precision,
        "torch_threads": torch.get_num_threads(),  # CPU results are bitwise reproducible per thread count
    }


def save_outputs(run: Run, info: dict) -> None:
    """The pipeline with the EMA weights, and the loss/lr history; main process only."""
    from diffusers import DDPMPipeline

    paths = run.params.paths
    unet = run.accelerator.unwrap_model(run.model)
    if run.ema is not None:
        run.ema.store(unet.parameters())
        run.ema.copy_to(unet.parameters())
    with atomic_dir(paths.pipeline) as out:
        DDPMPipeline(unet=unet.to(memory_format=torch.contiguous_format), scheduler=run.noise_scheduler) \
            .save_pretrained(out, safe_serialization=True)
    if run.ema is not None:
        run.ema.restore(unet.parameters())
    with atomic_dir(paths.train_log) as out:
        (out / "history.csv").write_text(history_csv(run.progress["history"]))
        (out / "summary.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def history_csv(history: list) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["step", "loss", "lr"])
    writer.writerows([step, f"{loss:.6g}", f"{lr:.6g}"] for step, loss, lr in history)
    return buffer.getvalue()


def train(params: Params) -> dict:
    images_path = Path(params.paths.images)
    if not images_path.is_file():
        raise ConfigError(f"{images_path} not found: run the preprocess stage first")
    images = np.load(images_path)
    key = checkpoints.run_key(params, sha256_file(images_path))
    checkpoint_dir = Path(params.paths.checkpoints) / key
    accelerator = make_accelerator(params)
    run = setup(params, images, accelerator)
    resumed_from = resume(run, checkpoint_dir)
    if resumed_from is not None:
        accelerator.print(f"resuming from {resumed_from} (step {run.progress['step']})")
    train_loop(run, checkpoint_dir)
    info = summary(run, resumed_from, key)
    if accelerator.is_main_process:
        save_outputs(run, info)
    accelerator.wait_for_everyone()
    return info


def main(argv=None) -> None:
    info = train(parse_params(argv, __doc__))
    print(f"trained {info['steps']} steps: loss {info['loss_final']:.4f}, "
          f"{info['images_per_second']:.1f} images/s over {info['seconds']:.1f} s")
