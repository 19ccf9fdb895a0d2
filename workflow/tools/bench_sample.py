"""`bench sample` and `bench fid`: our sampler against the tutorial's DDPMPipeline call, and sampling + FID end to end.

    python -m workflow bench sample                       # seed UNet, 64 px, 50 steps, ours batch 256
    python -m workflow bench sample --resolution 16 --channels 32 64 64 --steps 50 --batch-size 64 \\
        --num-images 64 --repeats 2 --threads 2                                   # the CPU table
    python -m workflow bench fid --num-images 10000 --steps 25                   # GPU: 10k samples + FID
    python -m workflow bench fid --resolution 16 --channels 32 64 64 --num-images 250 --reference-images 250
    ... --json out.json                                   # the numbers as JSON too

A measurement tool, not a pipeline stage (knobs on the command line, like `bench train`). The UNet
is the tutorial's (workflow.tools.bench_common.bench_params: layers_per_block 2, attention at level n-2, RGB)
at `--channels` and `--resolution`, with random weights: speed does not depend on them.

- `sample`: ours is workflow.models.sampling.sample_batches with the params file's sample.* (sampler, eta,
  mixed precision, compile) at `--steps` and `--batch-size`, to uint8 host arrays; one untimed
  batch first (compilation, allocator), then `--num-images` timed. The peer is the diffusers
  tutorial's evaluation call, as written: `DDPMPipeline(unet, DDPMScheduler)` in float32,
  `pipeline(batch_size=16, generator=torch.Generator(device="cpu").manual_seed(0),
  num_inference_steps=steps).images` (PIL images), after one untimed 1-step call. Same UNet, same
  number of steps. With `--repeats K` the two alternate K times and each keeps its best.
- `fid`: end-to-end seconds of what `dvc repro` runs after training: the sample stage's
  write_sample_set (sampling + PNGs into a temporary folder), then evaluate's load_samples,
  Inception features and FID/KID against a reference of `--reference-images` synthetic images
  (computed first, untimed: fid_reference is cached between experiments).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np
import torch

from workflow.core.config import DEFAULT_PARAMS, Params, load_params
from workflow.core.runtime import Runtime, default_device, feature_workers
from workflow.maths import fid
from workflow.models.builders import build_noise_scheduler, build_unet, count_parameters
from workflow.models.sampling import sample_batches
from workflow.tools.bench_common import (
    SEED_CHANNELS,
    bench_params,
    publish,
    run_header,
    synchronize,
    synthetic_images,
)

TUTORIAL_GRID = 16  # the tutorial's eval_batch_size: one 4 x 4 grid per call


def bench_model(base: Params, resolution: int, channels: tuple, device: torch.device):
    """(params with the tutorial's UNet, that UNet with seeded random weights, on `device`)."""
    params = bench_params(base, resolution, 16, channels, 1, device.type)
    torch.manual_seed(params.seed)
    return params, build_unet(params.model, resolution=resolution, channels=3).to(device).eval()


def our_sampling(params: Params, unet, device, steps: int, batch_size: int, count: int) -> float:
    """Images/s of sample_batches: untimed, one batch of each size the timed run makes (a compiled
    sampler compiles each shape once); then `count` images."""
    settings = dataclasses.replace(params.sample, num_inference_steps=steps, batch_size=batch_size)
    config = build_noise_scheduler(params.scheduler).config
    warm = count if count <= batch_size else batch_size + count % batch_size
    for _ in sample_batches(unet, config, settings, params.seed, warm, device, progress=False):
        pass
    synchronize(device)
    batches = sample_batches(unet, config, settings, params.seed, count, device, progress=False)  # its checks untimed
    started = time.perf_counter()
    for _ in batches:
        pass
    return count / (time.perf_counter() - started)


def tutorial_sampling(params: Params, unet, device, steps: int, count: int) -> float:
    """Images/s of the tutorial's DDPMPipeline call (float32, batch 16, PIL output), `count` images."""
    from diffusers import DDPMPipeline

    pipeline = DDPMPipeline(
        unet=unet.float().to(memory_format=torch.contiguous_format), scheduler=build_noise_scheduler(params.scheduler)
    ).to(device)
    pipeline.set_progress_bar_config(disable=True)
    call = lambda n: (
        pipeline(
            batch_size=TUTORIAL_GRID,
            num_inference_steps=n,  # noqa: E731
            generator=torch.Generator(device="cpu").manual_seed(params.seed),
        ).images
    )
    call(1)
    synchronize(device)
    started, made = time.perf_counter(), 0
    while made < count:
        made += len(call(steps))
    return made / (time.perf_counter() - started)


def bench_sample(
    base: Params,
    resolution: int,
    channels: tuple,
    steps: int,
    batch_size: int,
    num_images: int,
    peer_images: int,
    repeats: int,
) -> dict:
    device = default_device()
    params, unet = bench_model(base, resolution, channels, device)
    trials = {"ours": [], "tutorial": []}
    for _ in range(repeats):  # alternating: both loops see the same machine
        trials["ours"].append(our_sampling(params, unet, device, steps, batch_size, num_images))
        trials["tutorial"].append(tutorial_sampling(params, unet, device, steps, peer_images))
    ours, theirs = max(trials["ours"]), max(trials["tutorial"])
    return {
        **describe(params, unet, device, resolution, channels, steps),
        "batch_size": batch_size,
        "num_images": num_images,
        "peer_images": peer_images,
        "repeats": repeats,
        "ours_images_per_second": ours,
        "tutorial_images_per_second": theirs,
        "ratio": ours / theirs,
        "ours_trials": trials["ours"],
        "tutorial_trials": trials["tutorial"],
    }


def bench_fid(
    base: Params, resolution: int, channels: tuple, steps: int, batch_size: int, num_images: int, reference_images: int
) -> dict:
    from workflow.formats.sample_set import load_samples, write_sample_set
    from workflow.models.inception import load_extractor

    device = default_device()
    params, unet = bench_model(base, resolution, channels, device)
    extractor, _ = load_extractor(params.fid)
    workers = feature_workers(device)
    ref_feats = fid.features(
        synthetic_images(reference_images, resolution, seed=1), extractor, params.fid.batch_size, device, workers
    )
    reference = {
        "mu": ref_feats.mean(0),
        "sigma": np.cov(ref_feats, rowvar=False),
        "features": ref_feats,
        "num_images": reference_images,
    }
    settings = dataclasses.replace(params.sample, num_inference_steps=steps, batch_size=batch_size)
    config = build_noise_scheduler(params.scheduler).config
    with tempfile.TemporaryDirectory(prefix="bench-fid-") as tmp:
        started = time.perf_counter()
        write_sample_set(
            lambda start: sample_batches(unet, config, settings, params.seed, num_images, device, start=start),
            num_images,
            batch_size,
            f"{tmp}/samples",
            (),
            {},
            {},
        )
        sampled = time.perf_counter()
        feats = fid.features(load_samples(f"{tmp}/samples"), extractor, params.fid.batch_size, device, workers)
        scores = fid.score(feats, reference, params.seed)
        done = time.perf_counter()
    return {
        **describe(params, unet, device, resolution, channels, steps),
        "batch_size": batch_size,
        "num_images": num_images,
        "reference_images": reference_images,
        "fid_batch_size": params.fid.batch_size,
        "sample_seconds": sampled - started,
        "fid_seconds": done - sampled,
        "total_seconds": done - started,
        "fid": scores["fid"],
        "kid": scores["kid"],
    }


def describe(params: Params, unet, device, resolution: int, channels: tuple, steps: int) -> dict:
    s = params.sample
    return {
        **run_header(device, resolution, channels),
        "num_parameters": count_parameters(unet),
        "sampler": s.sampler,
        "eta": s.applied_eta,
        "steps": steps,
        "dtype": str(Runtime.for_device(device).sampling_dtype(s.mixed_precision)).removeprefix("torch."),
        "compile": s.compile,
    }


def _header(r: dict, command: str) -> list[str]:
    return [
        f"command: `{command}`",
        f"device: {r['device']} ({r['device_name']}); torch {r['torch']}, diffusers {r['diffusers']}",
        f"model: tutorial UNet, channels {tuple(r['channels'])}, {r['num_parameters']:,} parameters, "
        f"{r['resolution']} px RGB, random weights",
        "",
    ]


def _best(best: float, trials: list) -> str:
    return f"{best:.2f}" if len(trials) == 1 else f"{best:.2f} (best of {', '.join(f'{t:.2f}' for t in trials)})"


def _sampler_label(r: dict, with_steps: bool = False) -> str:
    """e.g. "dpmsolver++", or with_steps "dpmsolver++-25, torch.compile"."""
    steps = f"-{r['steps']}" if with_steps else ""
    eta = f" (eta {r['eta']})" if r["eta"] else ""
    return f"{r['sampler']}{steps}{eta}{', torch.compile' if r['compile'] else ''}"


def format_sample(r: dict, command: str) -> str:
    return "\n".join(
        _header(r, command)
        + [
            "| sampler | steps | precision | batch | images | img/s |",
            "|---|---:|---|---:|---:|---:|",
            f"| ours: {_sampler_label(r)} | {r['steps']} | {r['dtype']} | {r['batch_size']} | {r['num_images']} "
            f"| {_best(r['ours_images_per_second'], r['ours_trials'])} |",
            f"| tutorial: DDPMPipeline (ddpm) | {r['steps']} | float32 | {TUTORIAL_GRID} | {r['peer_images']} "
            f"| {_best(r['tutorial_images_per_second'], r['tutorial_trials'])} |",
            "",
            f"ours / tutorial: {r['ratio']:.2f}x ({r['repeats']} alternating repeat(s), best of each)",
        ]
    )


def format_fid(r: dict, command: str) -> str:
    return "\n".join(
        _header(r, command)
        + [
            f"| {r['num_images']:,} samples, {_sampler_label(r, with_steps=True)}, {r['dtype']}, "
            f"batch {r['batch_size']} "
            "| seconds |",
            "|---|---:|",
            f"| sampling + writing PNGs (sample stage) | {r['sample_seconds']:.1f} |",
            f"| loading + Inception features + FID/KID (evaluate stage; vs {r['reference_images']:,} reference images) "
            f"| {r['fid_seconds']:.1f} |",
            f"| **total** | **{r['total_seconds']:.1f}** |",
        ]
    )


def add_parsers(sub) -> None:
    for name, text in (
        ("sample", "our sampler vs the tutorial's DDPMPipeline call"),
        ("fid", "seconds for sampling N images + FID, end to end"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--resolution", type=int, default=64)
        p.add_argument("--channels", type=int, nargs="+", default=list(SEED_CHANNELS))
        p.add_argument("--steps", type=int, default=50 if name == "sample" else 25, help="sampling steps")
        p.add_argument("--batch-size", type=int, default=256, help="our sampling batch")
        p.add_argument("--num-images", type=int, default=512 if name == "sample" else 10000)
        p.add_argument("--params", default=str(DEFAULT_PARAMS), help="the sample.* settings (default: params.yaml)")
        p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
        p.add_argument("--json", help="also write the numbers to this JSON file")
        if name == "sample":
            p.add_argument("--peer-images", type=int, default=TUTORIAL_GRID, help="images the tutorial call makes")
            p.add_argument("--repeats", type=int, default=1, help="alternate ours and the tutorial's this many times")
        else:
            p.add_argument("--reference-images", type=int, default=1000)


MINIMUMS = {
    "resolution": 1,
    "steps": 1,
    "batch_size": 1,
    "num_images": 2,
    "threads": 1,
    "peer_images": 1,
    "repeats": 1,
    "reference_images": 2,
}  # FID needs 2 images for a covariance


def run(args, argv: list) -> None:
    base, channels = load_params(args.params), tuple(args.channels)
    common = (base, args.resolution, channels, args.steps, args.batch_size, args.num_images)
    if args.what == "sample":
        result, fmt = bench_sample(*common, args.peer_images, args.repeats), format_sample
    else:
        result, fmt = bench_fid(*common, args.reference_images), format_fid
    publish(result, fmt, argv, args.json)
