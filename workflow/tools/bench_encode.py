"""Text-to-image training steps from the encode stage's cache against encoding every step (the reference's way).

    python -m workflow bench encode --pipeline models/local --resolution 512 --batch-size 4 --steps 20
    python -m workflow bench encode --random sd15 ...     # SD 1.5's shapes, random weights (no download)

Both loops fine-tune the same pretrained UNet2DConditionModel (`--pipeline`: a diffusers Stable Diffusion
folder) on the same synthetic captioned images, with the same params, noise, timesteps, flips and caption
picks: ours is `workflow.stages.train.train_step` on the cache the encode stage writes (its own code, run
here in a scratch folder); the peer runs the VAE on the step's images and the text encoder on its captions
first, as train_text_to_image.py does, then the same loss and optimiser step. The two alternate
`--repeats` times; the table shows each loop's images/s (best, and every trial) and their ratio. Encoding
the set once is timed too: the cost the cache pays back.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from workflow.core.config import DEFAULT_PARAMS, Params, load_params, params_from_dict
from workflow.formats.captions import write_captions
from workflow.formats.encodings import load_encodings
from workflow.formats.training_images import write_images
from workflow.maths.diffusion import (
    batch_indices,
    latent_draws,
    latent_sample,
    pick_captions,
    step_noise,
    to_model_range,
)
from workflow.models.builders import trainable_parameters
from workflow.models.latent import encode_captions, encode_images, load_encoders
from workflow.stages import download_model, encode
from workflow.stages.train import Training, make_accelerator, optimizer_step, setup, step_loss, train_step
from workflow.tools.bench_common import publish, run_header, synchronize, synthetic_images
from workflow.tools.random_pipeline import save_random_pipeline

CAPTION_WORDS = ["a", "red", "fox", "cat", "on", "the", "sand", "and", "dog", "grey", "small", "blue"]


def synthetic_captions(n: int, seed: int = 0) -> list[list[str]]:
    """One or two short captions per image, from a fixed vocabulary."""
    rng = np.random.default_rng(seed)
    return [[" ".join(rng.choice(CAPTION_WORDS, size=6)) for _ in range(1 + i % 2)] for i in range(n)]


def bench_params(base: Params, work: Path, pipeline: Path, resolution: int, batch_size: int, lora_rank, total: int):
    """`base` fine-tuning `pipeline` on the scratch folder `work`'s images, batch `batch_size`, `total` steps."""
    raw = base.to_dict()
    raw["paths"] = {key: str(work / value) for key, value in raw["paths"].items()}
    raw["data"].update(resolution=resolution, channels=3, caption_column="text", source="imagefolder:bench")
    raw["data"]["folder"] = "bench"
    raw["model"].update(pretrained=f"folder:{pipeline}", folder=str(pipeline), class_conditional=False)
    raw["train"].update(
        batch_size=batch_size,
        gradient_accumulation_steps=1,
        max_steps=total,
        epochs=None,
        random_flip=True,
        lora_rank=lora_rank,
        progress_grids=False,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
    )
    raw["sample"].update(prompts=["a red fox"], guidance_scale=1.0, classes=[])
    raw["fid"].update(steps_sweep=[], guidance_sweep=[])
    return params_from_dict(raw, source="bench")


def on_the_fly_step(training: Training, encoders, images: torch.Tensor, captions: list[str], offsets, step: int):
    """The reference's step: encode this step's images (mirrored where the flip draw says) and its picked
    captions, then the same loss, backward and optimiser step as train_step (one micro-batch)."""
    p, acc = training.params, training.accelerator
    size, device = p.train.batch_size, acc.device
    index = torch.from_numpy(batch_indices(p.seed, step, size, len(images)))
    shape = (size, *training.sample_shape)
    timesteps_count = training.noise_scheduler.config.num_train_timesteps
    noise, timesteps, flip = step_noise(p.seed, step, shape, timesteps_count, device, p.train.noise_offset)
    vae_noise, uniform = latent_draws(p.seed, step, shape, device)
    batch = images[index].to(device)
    pixels = to_model_range(torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch))
    with acc.autocast():
        mean, logvar = encode_images(encoders.vae, pixels)
        rows = pick_captions(offsets, index, uniform.cpu())
        hidden = encode_captions(encoders, [captions[r] for r in rows])
    clean = latent_sample(mean.float(), logvar.float(), vae_noise, encoders.vae.config.scaling_factor)
    loss = step_loss(training, clean, noise, timesteps, {"encoder_hidden_states": hidden.float()})
    acc.backward(loss)
    optimizer_step(training)
    return loss.detach()


def timed(step, steps: int, warmup: int, device, batch_size: int) -> float:
    """images/s over `steps` steps after `warmup` untimed ones."""
    for s in range(warmup):
        step(s)
    synchronize(device)
    start = time.perf_counter()
    for s in range(warmup, warmup + steps):
        step(s)
    synchronize(device)
    return steps * batch_size / (time.perf_counter() - start)


def bench_encode(
    base: Params,
    pipeline: str | Path,
    resolution: int = 512,
    batch_size: int = 4,
    steps: int = 20,
    warmup: int = 5,
    images: int = 64,
    repeats: int = 1,
    lora_rank: int | None = None,
) -> dict:
    pipeline = Path(pipeline).resolve()
    trials = {"cache": [], "on_the_fly": []}
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as scratch:
        work = Path(scratch)
        params = bench_params(base, work, pipeline, resolution, batch_size, lora_rank, warmup + steps)
        pixels = synthetic_images(images, resolution, seed=params.seed)
        captions = synthetic_captions(images, seed=params.seed)
        write_images(params.paths.images, pixels)
        write_captions(params.paths.captions, captions)
        download_model.run(params)  # the pipeline's parts, as the stage takes them (safetensors only)
        started = time.perf_counter()
        record = encode.run(params)
        encode_seconds = time.perf_counter() - started
        encoded = load_encodings(params.paths.latents)
        flat = [c for image in captions for c in image]
        offsets = torch.from_numpy(np.array(encoded.offsets))
        device = make_accelerator(params).device
        encoders = load_encoders(params.paths.base_model, device)
        on_device = torch.from_numpy(pixels)
        for _ in range(repeats):
            training = setup(params, None, make_accelerator(params), encoded=encoded)
            trials["cache"].append(timed(lambda s, t=training: train_step(t, s), steps, warmup, device, batch_size))
            training = setup(params, None, make_accelerator(params), encoded=encoded)

            def reference(s, t=training):
                return on_the_fly_step(t, encoders, on_device, flat, offsets, s)

            trials["on_the_fly"].append(timed(reference, steps, warmup, device, batch_size))
        unet_parameters = sum(p.numel() for p in training.model.parameters())
        trainable = sum(p.numel() for p in trainable_parameters(training.model))
    cache, fly = max(trials["cache"]), max(trials["on_the_fly"])
    return {
        **run_header(device, resolution, ()),
        "pipeline": str(pipeline),
        "batch_size": batch_size,
        "images": images,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "mixed_precision": params.train.mixed_precision,
        "storage": params.encode.storage,
        "lora_rank": lora_rank,
        "unet_parameters": unet_parameters,
        "trainable_parameters": trainable,
        "latent_shape": record["latent_shape"],
        "encode_seconds": encode_seconds,
        "cache_images_per_second": cache,
        "on_the_fly_images_per_second": fly,
        "cache_trials": trials["cache"],
        "on_the_fly_trials": trials["on_the_fly"],
        "ratio": cache / fly,
    }


def format_table(r: dict, command: str) -> str:
    def ips(best, trials):
        return f"{best:.2f}" if len(trials) == 1 else f"{best:.2f} (best of {', '.join(f'{t:.2f}' for t in trials)})"

    how = f"LoRA rank {r['lora_rank']}" if r["lora_rank"] else "full fine-tune"
    return "\n".join(
        [
            f"command: `{command}`",
            f"device: {r['device']} ({r['device_name']}); torch {r['torch']}, diffusers {r['diffusers']}",
            f"model: {r['pipeline']}, UNet {r['unet_parameters']:,} parameters ({how}: {r['trainable_parameters']:,} "
            f"trained), {r['resolution']} px -> latents {' x '.join(map(str, r['latent_shape']))}; mixed precision "
            f"{r['mixed_precision']}; cache {r.get('storage', 'float32')}",
            f"{r['images']} synthetic captioned images; {r['warmup']} untimed + {r['steps']} timed steps of "
            f"{r['batch_size']} per loop, {r['repeats']} time(s), alternating",
            "",
            "| loop | img/s |",
            "|---|---:|",
            "| from the cache (workflow.stages.train.train_step) | "
            f"{ips(r['cache_images_per_second'], r['cache_trials'])} |",
            f"| encoding every step (the reference's way) | "
            f"{ips(r['on_the_fly_images_per_second'], r['on_the_fly_trials'])} |",
            "",
            f"cache / on the fly: {r['ratio']:.2f}x; encoding the {r['images']} images (both orientations) and their "
            f"captions once took {r['encode_seconds']:.1f} s",
        ]
    )


def add_parser(sub) -> None:
    bench = sub.add_parser("encode", help="text-to-image steps from the cache vs encoding every step")
    which = bench.add_mutually_exclusive_group(required=True)
    which.add_argument("--pipeline", help="a diffusers Stable Diffusion pipeline folder")
    which.add_argument(
        "--random", choices=["sd15", "tiny"], help="a pipeline with random weights at these shapes (random_pipeline.py)"
    )
    bench.add_argument("--resolution", type=int, default=512)
    bench.add_argument("--batch-size", type=int, default=4)
    bench.add_argument("--steps", type=int, default=20, help="timed optimiser steps per loop")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    bench.add_argument("--images", type=int, default=64, help="synthetic captioned images in the set")
    bench.add_argument("--lora-rank", type=int, help="train a LoRA adapter of this rank (default: the whole UNet)")
    bench.add_argument("--params", default=str(DEFAULT_PARAMS), help="the base params file (default: params.yaml)")
    bench.add_argument("--repeats", type=int, default=1, help="measure each loop this many times, alternating")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    bench.add_argument("--json", help="also write the numbers to this JSON file")


MINIMUMS = {"resolution": 8, "batch_size": 1, "steps": 1, "warmup": 0, "images": 1, "repeats": 1, "threads": 1}


def run(args, argv: list) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as scratch:
        pipeline = args.pipeline or save_random_pipeline(Path(scratch) / f"random-{args.random}", args.random)
        measure(args, argv, pipeline)


def measure(args, argv: list, pipeline) -> None:
    result = bench_encode(
        load_params(args.params),
        pipeline,
        resolution=args.resolution,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        images=args.images,
        repeats=args.repeats,
        lora_rank=args.lora_rank,
    )
    publish(result, format_table, argv, args.json)
