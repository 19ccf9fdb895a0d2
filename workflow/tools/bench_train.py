"""`bench train`: our training step against the tutorial's loop, in one process on one device.

    python -m workflow bench train                                   # our loop only; seed UNet, 128 px
    python -m workflow bench train --peer bench/peers/tutorial_loop.py \\
        --resolution 32 --batch-size 16 --channels 32 64 64 --steps 20     # the CPU table
    python -m workflow bench train --peer bench/peers/tutorial_loop.py \\
        --resolution 128 --batch-size 128 --peer-batch-size 16             # GPU, seed UNet
    python -m workflow bench train ... --json bench.json                   # the numbers as JSON too
    python -m workflow bench train ... --repeats 3 --threads 1       # best of 3, alternating; 1 thread

A measurement tool, not a pipeline stage, so this is the one command that takes knobs on the
command line. Both loops run on the device accelerate picks (cuda if there is one, else cpu) with
the same UNet: the tutorial's (layers_per_block 2, attention at level n-2, norm groups 32, RGB),
at `--channels` and `--resolution`.

- ours: params.yaml overridden with that model, resolution and batch (bf16 on cuda, "no" on cpu,
  random flip on and one micro-batch, as the tutorial; EMA, torch.compile and the rest as the
  params file says), synthetic uint8 images, `workflow.stages.train.setup` + `train_step` (guarded);
  `--warmup` untimed steps, then `--steps` timed ones between two device synchronisations.
- the peer: `tutorial_images_per_second` from the file given by `--peer` (imported by path: the
  repository ships it as bench/peers/tutorial_loop.py), fed the same images as PNG files in a
  temporary folder. Without `--peer` only our loop is measured and the ratio is n/a.
  With `--repeats K` the two loops alternate K times and each reports its best run: on a shared
  machine, interference only ever slows a run.
- FLOP per training image: `torch.utils.flop_counter.FlopCounterMode` over one forward and backward
  of our UNet at the batch size, divided by it (matmul, convolution and attention FLOP; counted on
  the meta device, so it costs nothing and does not depend on the device measured).
- the limit: a timed large matmul (bf16 on cuda; float32 on cpu, where training runs in float32)
  gives FLOP/s; limit images/s = FLOP/s / FLOP per image, and each loop's share of it.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from workflow.core.config import DEFAULT_PARAMS, ConfigError, Params, load_params
from workflow.core.runtime import default_device
from workflow.models.builders import build_unet, count_parameters
from workflow.tools.bench_common import (
    PEER_NORM_GROUPS,
    SEED_CHANNELS,
    bench_params,
    publish,
    run_header,
    synchronize,
    synthetic_images,
)

MODEL_KEYS = (
    "in_channels",
    "out_channels",
    "layers_per_block",
    "block_out_channels",
    "down_block_types",
    "up_block_types",
    "norm_num_groups",
    "sample_size",
    "attention_head_dim",
    "act_fn",
)


def write_image_folder(images: np.ndarray, folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), "RGB").save(folder / f"{i:05d}.png")
    return folder


def fresh_accelerator_state() -> None:
    """Forget the process-wide accelerate state, so the next Accelerator may pick its own mixed precision.

    Both loops build an Accelerator in this one process, and on cuda they differ (bf16 vs the
    tutorial's fp16), which accelerate otherwise refuses ("already been initialized")."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    gc.collect()  # the previous loop's model and optimiser, before the next one allocates its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def our_images_per_second(params: Params, images: np.ndarray, steps: int, warmup: int) -> float:
    """`workflow.stages.train.setup` + its step: `warmup` untimed steps, then `steps` timed ones.

    The step is `guarded_step`, as in the train stage: `train_step`, or with `train.compile` its
    first call falls back to eager mode if compilation fails."""
    from workflow.stages.train import guarded_step, make_accelerator, setup

    fresh_accelerator_state()
    training = setup(params, images, make_accelerator(params))
    device = training.accelerator.device
    for step in range(warmup):
        guarded_step(training, step)
    synchronize(device)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        loss = guarded_step(training, step)
    synchronize(device)
    seconds = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise FloatingPointError(f"our loop's loss is {loss.item()} after {warmup + steps} steps")
    return steps * params.train.batch_size / seconds


def load_peer(path: str | Path):
    """The tutorial's loop, imported from its file (it is not part of this package)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--peer {path}: no such file (the repository ships it as bench/peers/tutorial_loop.py)")
    spec = importlib.util.spec_from_file_location("tutorial_loop_peer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_same_model(peer, params: Params) -> None:
    """Our UNet must be the peer's, key for key; a mismatch is a user error naming the keys."""
    resolution = params.data.resolution
    try:
        theirs = peer.tutorial_unet(resolution, tuple(params.model.block_out_channels)).config
    except ValueError as exc:
        raise ConfigError(
            f"the peer cannot build its UNet at --channels {list(params.model.block_out_channels)}: "
            f"{exc} (it uses norm groups {PEER_NORM_GROUPS}: give multiples of it)"
        ) from None
    ours = build_unet(params.model, resolution=resolution, channels=3).config
    differ = [k for k in MODEL_KEYS if _plain(ours[k]) != _plain(theirs[k])]
    if differ:
        raise ConfigError(
            f"our UNet differs from the peer's in {', '.join(differ)}: "
            + "; ".join(f"{k}: {ours[k]!r} vs {theirs[k]!r}" for k in differ)
        )


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


@contextlib.contextmanager
def datasets_cache(folder: Path):
    """Point the `datasets` cache at `folder` while the peer loads its image folder (no leftovers in ~)."""
    import datasets.config

    previous = datasets.config.HF_DATASETS_CACHE
    datasets.config.HF_DATASETS_CACHE = folder
    try:
        yield
    finally:
        datasets.config.HF_DATASETS_CACHE = previous


def peer_images_per_second(
    peer, images: np.ndarray, batch_size: int, steps: int, warmup: int, channels: tuple
) -> float:
    """The tutorial's loop on `images` written as PNG files, as its users would feed it a folder."""
    fresh_accelerator_state()
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        folder = write_image_folder(images, Path(tmp) / "images")
        with datasets_cache(Path(tmp) / "hf-datasets-cache"):
            return peer.tutorial_images_per_second(
                str(folder),
                resolution=images.shape[-1],
                batch_size=batch_size,
                steps=steps,
                warmup=warmup,
                num_workers=0,
                channels=tuple(channels),
            )


def flop_per_image(params: Params, batch_size: int) -> float:
    """Matmul/convolution/attention FLOP of one forward + backward of our UNet, per image of the batch.

    Counted on the meta device (shapes only: no memory, no time, any batch). There, attention runs
    as plain batched matmuls, which the counter sees; on cpu it would run a fused kernel the
    counter has no formula for, and miss the attention (about 10% of the FLOP at 32 px)."""
    from torch.utils.flop_counter import FlopCounterMode

    resolution = params.data.resolution
    with torch.device("meta"):
        model = build_unet(params.model, resolution=resolution, channels=3)
        x = torch.randn(batch_size, 3, resolution, resolution)
        t = torch.randint(0, params.scheduler.num_train_timesteps, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        prediction = model(x, t, return_dict=False)[0]
        torch.nn.functional.mse_loss(prediction, x).backward()
    return counter.get_total_flops() / batch_size


def matmul_rate(
    device: torch.device, size: int | None = None, repeats: int | None = None, trials: int = 5
) -> tuple[float, str]:
    """FLOP/s of a large square matmul, the best of `trials` timed blocks: bf16 on cuda, float32 on cpu.

    Returns (rate, dtype name). The best, not the mean: it estimates what the device can do, and
    a machine shared with other work only ever makes a block slower."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = size or (8192 if cuda else 2048)
    repeats = repeats or (20 if cuda else 3)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(trials):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 * repeats / best, str(dtype).removeprefix("torch.")


def measure_loops(
    params: Params, peer, images: np.ndarray, steps: int, warmup: int, peer_batch_size: int, repeats: int
) -> dict:
    """images/s of each loop, `repeats` times, alternating ours and the peer's so both see the same machine."""
    trials = {"ours": [], "peer": []}
    for _ in range(repeats):
        trials["ours"].append(our_images_per_second(params, images, steps, warmup))
        if peer is not None:
            trials["peer"].append(
                peer_images_per_second(peer, images, peer_batch_size, steps, warmup, params.model.block_out_channels)
            )
    return trials


def bench_train(
    base: Params,
    resolution: int = 128,
    batch_size: int = 16,
    steps: int = 40,
    warmup: int = 10,
    channels: tuple = SEED_CHANNELS,
    peer_path: str | Path | None = None,
    peer_batch_size: int | None = None,
    repeats: int = 1,
    matmul_size: int | None = None,
) -> dict:
    """Measure both loops (best of `repeats`), the FLOP per image and the matmul limit; return a dict."""
    device = default_device()
    peer_batch_size = peer_batch_size or batch_size
    params = bench_params(base, resolution, batch_size, tuple(channels), warmup + steps, device.type)
    peer = load_peer(peer_path) if peer_path else None
    if peer is not None:
        check_same_model(peer, params)
    images = synthetic_images(4 * max(batch_size, peer_batch_size), resolution, seed=params.seed)
    trials = measure_loops(params, peer, images, steps, warmup, peer_batch_size, repeats)
    ours, theirs = max(trials["ours"]), max(trials["peer"], default=None)
    flop = flop_per_image(params, batch_size)
    rate, dtype = matmul_rate(device, matmul_size)
    limit = rate / flop
    return {
        **run_header(device, resolution, channels),
        "batch_size": batch_size,
        "peer_batch_size": peer_batch_size if peer else None,
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "mixed_precision": params.train.mixed_precision,
        "ema": params.train.ema,
        "compile": params.train.compile,
        "num_parameters": count_parameters(build_unet(params.model, resolution=resolution, channels=3)),
        "ours_images_per_second": ours,
        "peer_images_per_second": theirs,
        "ours_trials": trials["ours"],
        "peer_trials": trials["peer"] if peer else None,
        "ratio": ours / theirs if theirs else None,
        "flop_per_image": flop,
        "matmul_flop_per_second": rate,
        "matmul_dtype": dtype,
        "limit_images_per_second": limit,
        "ours_share_of_limit": ours / limit,
        "peer_share_of_limit": theirs / limit if theirs else None,
    }


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def format_table(r: dict, command: str) -> str:
    """The result as Markdown: a header naming the run, then one row per loop and the limit."""

    def share(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def ips(best, trials):
        if best is None:
            return "not measured (no --peer)"
        return f"{best:.1f}" if len(trials) == 1 else f"{best:.1f} (best of {', '.join(f'{t:.1f}' for t in trials)})"

    ratio = "n/a (no --peer)" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    rows = [
        f"command: `{command}`",
        f"device: {r['device']} ({r['device_name']}); torch {r['torch']}, diffusers {r['diffusers']}",
        f"model: tutorial UNet, channels {tuple(r['channels'])}, {r['num_parameters']:,} parameters, "
        f"{r['resolution']} px RGB; ours: mixed precision {r['mixed_precision']}, EMA {_on(r['ema'])}, "
        f"torch.compile {_on(r['compile'])} (from the params file)",
        f"{r['warmup']} untimed + {r['steps']} timed steps per loop, {r['repeats']} time(s), alternating",
        "",
        "| loop | batch | img/s | share of the matmul limit |",
        "|---|---:|---:|---:|",
        f"| ours (workflow.stages.train.train_step) | {r['batch_size']} "
        f"| {ips(r['ours_images_per_second'], r['ours_trials'])} "
        f"| {share(r['ours_share_of_limit'])} |",
        f"| tutorial loop (peer) | {r['peer_batch_size'] or r['batch_size']} "
        f"| {ips(r['peer_images_per_second'], r['peer_trials'])} | {share(r['peer_share_of_limit'])} |",
        f"| limit: {r['flop_per_image'] / 1e9:.3f} GFLOP per training image at {r['matmul_flop_per_second'] / 1e12:.3f}"
        f" TFLOP/s {r['matmul_dtype']} matmul | | {r['limit_images_per_second']:,.0f} | 100% |",
        "",
        f"ours / tutorial: {ratio}",
    ]
    if r["device"] == "cpu":
        rows.append(
            "(cpu: the limit uses the float32 matmul rate, as training on cpu runs in float32; "
            "bf16 is measured on cuda)"
        )
    return "\n".join(rows)


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="our training step vs the tutorial's loop")
    train.add_argument("--peer", help="path to tutorial_loop.py (bench/peers/tutorial_loop.py)")
    train.add_argument("--resolution", type=int, default=128)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--peer-batch-size", type=int, help="the tutorial loop's batch (default: --batch-size)")
    train.add_argument("--steps", type=int, default=40, help="timed optimiser steps per loop")
    train.add_argument("--warmup", type=int, default=10, help="untimed steps before timing")
    train.add_argument("--channels", type=int, nargs="+", default=list(SEED_CHANNELS))
    train.add_argument("--params", default=str(DEFAULT_PARAMS), help="the base params file (default: params.yaml)")
    train.add_argument(
        "--repeats", type=int, default=1, help="measure each loop this many times, alternating; report the best"
    )
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    train.add_argument("--json", help="also write the numbers to this JSON file")


MINIMUMS = {"resolution": 1, "batch_size": 1, "peer_batch_size": 1, "steps": 1, "warmup": 0, "repeats": 1, "threads": 1}


def run(args, argv: list) -> None:
    if args.peer and args.warmup < 1:  # the tutorial loop starts its clock when its warm-up steps are done
        raise ConfigError("--warmup must be >= 1 with --peer (the tutorial loop times from the end of its warm-up)")
    result = bench_train(
        load_params(args.params),
        resolution=args.resolution,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        channels=tuple(args.channels),
        peer_path=args.peer,
        peer_batch_size=args.peer_batch_size,
        repeats=args.repeats,
    )
    publish(result, format_table, argv, args.json)
