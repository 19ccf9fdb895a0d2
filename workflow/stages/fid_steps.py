"""Stage fid_steps: FID and KID against the number of sampling steps, a DVC plot.

    python -m workflow fid_steps [--params params.yaml]
    dvc exp run -S 'fid.steps_sweep=[10,25,50]' && dvc plots show     # "FID against sampling steps"

For each n in fid.steps_sweep: samples fid.num_samples images from params.paths.trained with
sample.sampler (and sample.eta, batch size, precision, compile) in n steps, which are exactly the
images the sample stage makes with sample.num_inference_steps = n, and scores them against
params.paths.fid_ref as evaluate does. The images stay in memory, batch by batch: PNG is lossless,
so their features equal those of the written samples. Writes params.paths.fid_steps, a CSV with
num_inference_steps, fid, kid, seconds (sampling and scoring of that point).

Off by default: with fid.steps_sweep empty the stage writes the header alone and loads nothing, so
the CPU default run pays nothing for it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from workflow.core.artifacts import atomic_path
from workflow.core.config import Params
from workflow.core.runtime import default_device, feature_workers
from workflow.formats.pipeline import load_unet
from workflow.formats.reference_stats import check_weights, load_reference
from workflow.maths import fid
from workflow.models.inception import load_extractor
from workflow.models.sampling import sample_batches

CSV_COLUMNS = ("num_inference_steps", "fid", "kid", "seconds")


def sweep_point(
    params: Params, steps: int, unet, scheduler_config, extractor, reference: dict, device: torch.device
) -> dict:
    """FID/KID of the sample set made in `steps` steps; the features are taken batch by batch."""
    settings = dataclasses.replace(params.sample, num_inference_steps=steps)
    workers = feature_workers(device)
    started, feats = time.perf_counter(), []
    for _, images in sample_batches(unet, scheduler_config, settings, params.seed, params.fid.num_samples, device):
        chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        feats.append(fid.features(chw, extractor, params.fid.batch_size, device, workers))
    scores = fid.score(np.concatenate(feats), reference, params.seed)
    return {
        "num_inference_steps": steps,
        "fid": scores["fid"],
        "kid": scores["kid"],
        "seconds": time.perf_counter() - started,
    }


def sweep(params: Params) -> list[dict]:
    """One row per entry of fid.steps_sweep, in its order; nothing is loaded when it is empty."""
    if not params.fid.steps_sweep:
        return []
    reference = load_reference(params.paths.fid_ref)
    extractor, info = load_extractor(params.fid)
    check_weights(reference, info, params.paths.fid_ref)
    device = default_device()
    unet, scheduler_config = load_unet(params.paths.trained, device)
    return [
        sweep_point(params, n, unet, scheduler_config, extractor, reference, device) for n in params.fid.steps_sweep
    ]


def sweep_csv(rows: list[dict]) -> str:
    lines = [",".join(CSV_COLUMNS)]
    lines += [f"{r['num_inference_steps']},{r['fid']:.6g},{r['kid']:.6g},{r['seconds']:.3f}" for r in rows]
    return "\n".join(lines) + "\n"


def run(params: Params) -> dict:
    rows = sweep(params)
    with atomic_path(params.paths.fid_steps) as tmp:
        tmp.write_text(sweep_csv(rows))
    return {"points": rows}


def headline(summary: dict, params: Params) -> str:
    points = ", ".join(f"{r['num_inference_steps']} steps: {r['fid']:.2f}" for r in summary["points"])
    points = points or "none (fid.steps_sweep is empty)"
    return f"fid_steps ({params.sample.sampler}): FID {points} -> {params.paths.fid_steps}"
