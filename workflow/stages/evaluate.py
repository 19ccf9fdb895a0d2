"""Stage evaluate: FID and KID of the samples against the reference, plus train and sample figures.

    python -m workflow evaluate [--params params.yaml]

Reads the sample PNGs in `paths.samples` (sorted by name), `paths.fid_ref` (from fid_reference),
`<paths.train_log>/summary.json` (from train) and `<paths.samples>/samples.json` (from sample).
Writes `paths.metrics`: one flat JSON object (fid, kid, train_loss_final, ..., evaluate_seconds:
this stage's own wall time, loading the samples included; see METRIC_KEYS).
FID uses the same features function and Inception file as the reference; a reference computed
with other weights is refused.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image

from workflow.maths import fid
from workflow.core.artifacts import read_json, write_json
from workflow.core.config import ConfigError, Params
from workflow.models.inception import load_extractor
from workflow.formats.reference_stats import check_weights, load_reference, score
from workflow.core.runtime import default_device

TRAIN_KEYS = {"loss_final": "train_loss_final", "images_per_second": "train_images_per_second",
              "seconds": "train_seconds", "steps": "train_steps", "num_parameters": "num_parameters"}
SAMPLE_KEYS = {"seconds": "sample_seconds", "images_per_second": "sample_images_per_second"}
METRIC_KEYS = ("fid", "kid", "fid_num_samples", "fid_num_reference", "fid_weights_sha256",
               "fid_weights_origin", *TRAIN_KEYS.values(), *SAMPLE_KEYS.values(), "evaluate_seconds")
INTEGER_METRICS = {"fid_num_samples", "fid_num_reference", "train_steps", "num_parameters"}


def load_samples(folder: str | Path) -> np.ndarray:
    """uint8 (N, 3, H, W) from the *.png files in `folder`, sorted by name (L is replicated to RGB)."""
    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise ConfigError(f"{folder} (`paths.samples`): no *.png samples; the sample stage makes them")
    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise ConfigError(f"{folder}: samples differ in size {sorted(sizes)}; re-run the sample stage")
    return np.stack(arrays).transpose(0, 3, 1, 2)


def read_summary(path: Path, keys, stage: str) -> dict:
    """The `keys` of a JSON summary another stage wrote; a missing file or key names that stage."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; the {stage} stage makes it")
    data = read_json(path)
    missing = [k for k in keys if k not in data]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}; re-run the {stage} stage")
    return {k: data[k] for k in keys}


def flat_metrics(scores: dict, info: dict, train: dict, sample: dict, seconds: float) -> dict:
    """One flat dict of JSON-native values, keyed as METRIC_KEYS."""
    merged = {**scores, "fid_weights_sha256": info["sha256"], "fid_weights_origin": info["origin"],
              **{TRAIN_KEYS[k]: v for k, v in train.items()}, **{SAMPLE_KEYS[k]: v for k, v in sample.items()},
              "evaluate_seconds": seconds}
    return {k: _native(k, merged[k]) for k in METRIC_KEYS}


def _native(key: str, value):
    if isinstance(value, str):
        return value
    return int(value) if key in INTEGER_METRICS else float(value)


def run(params: Params) -> dict:
    started = time.perf_counter()
    paths = params.paths
    reference = load_reference(paths.fid_ref)
    train = read_summary(Path(paths.train_log) / "summary.json", TRAIN_KEYS, "train")
    sample = read_summary(Path(paths.samples) / "samples.json", SAMPLE_KEYS, "sample")
    images = load_samples(paths.samples)
    extractor, info = load_extractor(params.fid)
    check_weights(reference, info, paths.fid_ref)
    device = default_device()
    feats = fid.features(images, extractor, params.fid.batch_size, device, fid.default_num_workers(device))
    scores = score(feats, reference, params.seed)
    metrics = flat_metrics(scores, info, train, sample, time.perf_counter() - started)
    write_json(paths.metrics, metrics)
    return metrics


def headline(metrics: dict, params: Params) -> str:
    return (f"evaluate: FID {metrics['fid']:.4f}, KID {metrics['kid']:.6f} over "
            f"{metrics['fid_num_samples']} samples -> {params.paths.metrics}")
