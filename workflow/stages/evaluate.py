"""Stage evaluate: FID, KID, precision and recall of the samples against the reference, plus train and
sample figures.

    python -m workflow evaluate [--params params.yaml]

Reads the sample PNGs in `paths.samples` (sorted by name), `paths.fid_ref` (from fid_reference),
`<paths.train_log>/summary.json` (from train) and `<paths.samples>/samples.json` (from sample).
Writes `paths.metrics`: one flat JSON object (fid, kid, precision, recall, train_loss_final, ...,
evaluate_seconds: this stage's own wall time, loading the samples included; see METRIC_KEYS).
Precision and recall are Kynkaanniemi et al. (2019), k = 3, on the same Inception features: the share
of samples that look like training images, and of training images the samples cover; over at most
10,000 of each (fid.PR_MAX_ROWS, a seeded subset beyond that: their cost grows with the square).
FID uses the same features function and Inception file as the reference; a reference computed
with other weights is refused.
"""

from __future__ import annotations

import time

from workflow.core.artifacts import write_json
from workflow.core.config import Params
from workflow.core.runtime import default_device, feature_workers
from workflow.formats import trainlog
from workflow.formats.reference_stats import check_weights, load_reference
from workflow.formats.sample_set import load_samples, read_sample_record
from workflow.maths import fid
from workflow.models.inception import load_extractor

TRAIN_KEYS = {
    "loss_final": "train_loss_final",
    "images_per_second": "train_images_per_second",
    "seconds": "train_seconds",
    "steps": "train_steps",
    "num_parameters": "num_parameters",
}
SAMPLE_KEYS = {"seconds": "sample_seconds", "images_per_second": "sample_images_per_second"}
METRIC_KEYS = (
    "fid",
    "kid",
    "precision",  # null where either set has k = 3 or fewer images
    "recall",
    "fid_num_samples",
    "fid_num_reference",
    "fid_weights_sha256",
    "fid_weights_origin",
    *TRAIN_KEYS.values(),
    *SAMPLE_KEYS.values(),
    "evaluate_seconds",
)
INTEGER_METRICS = {"fid_num_samples", "fid_num_reference", "train_steps", "num_parameters"}


def flat_metrics(scores: dict, info: dict, train: dict, sample: dict, seconds: float) -> dict:
    """One flat dict of JSON-native values, keyed as METRIC_KEYS."""
    merged = {
        **scores,
        "fid_weights_sha256": info["sha256"],
        "fid_weights_origin": info["origin"],
        **{TRAIN_KEYS[k]: v for k, v in train.items()},
        **{SAMPLE_KEYS[k]: v for k, v in sample.items()},
        "evaluate_seconds": seconds,
    }
    return {k: _native(k, merged[k]) for k in METRIC_KEYS}


def _native(key: str, value):
    if value is None or isinstance(value, str):
        return value
    return int(value) if key in INTEGER_METRICS else float(value)


def run(params: Params) -> dict:
    started = time.perf_counter()
    paths = params.paths
    extractor, info = load_extractor(params.fid)  # first: it refuses a batch over `fid.max_activation_gib`
    reference = load_reference(paths.fid_ref)
    train = trainlog.read_summary(paths.train_log, TRAIN_KEYS)
    sample = read_sample_record(paths.samples, SAMPLE_KEYS)
    images = load_samples(paths.samples)
    check_weights(reference, info, paths.fid_ref)
    device = default_device()
    feats = fid.features(images, extractor, params.fid.batch_size, device, feature_workers(device))
    scores = fid.score(feats, reference, params.seed)
    metrics = flat_metrics(scores, info, train, sample, time.perf_counter() - started)
    write_json(paths.metrics, metrics)
    return metrics


def headline(metrics: dict, params: Params) -> str:
    return (
        f"evaluate: FID {metrics['fid']:.4f}, KID {metrics['kid']:.6f} over "
        f"{metrics['fid_num_samples']} samples -> {params.paths.metrics}"
    )
