"""Stage fid_reference: Inception statistics of the training images, the reference FID compares to.

    python -m workflow fid_reference [--params params.yaml]

Reads `paths.images` (uint8 N x C x H x W; a text-to-image run with `data.holdout`: the held-out images,
`paths.holdout_images`, instead; a class-conditional one with `sample.classes`: the images of those
classes, by `paths.labels`) and takes `fid.num_reference` of them (null = all, refused over
1,000,000 as a number is), chosen by a permutation seeded with `seed`. Writes `paths.fid_ref`, an
.npz with mu, sigma (float64), features (float32, for KID), num_images, and weights_sha256 (the
Inception file used; evaluate refuses a reference computed with other weights).
"""

from __future__ import annotations

import numpy as np
import torch

from workflow.core.config import REFERENCE_IMAGES, ConfigError, Params
from workflow.core.runtime import default_device, feature_workers
from workflow.formats.labels import load_labels
from workflow.formats.reference_stats import save_reference
from workflow.formats.training_images import Rows, load_images
from workflow.maths import fid
from workflow.models.inception import load_extractor


def choose_reference(num_images: int, num_reference: int | None, seed: int, which: str) -> np.ndarray:
    """Sorted indices of the reference subset: the first `num_reference` of a seeded permutation."""
    if num_reference is None:
        if num_images > REFERENCE_IMAGES:  # the bound a number gets: their features alone would be N x 2048 float64
            raise ConfigError(
                f"`fid.num_reference` is null (all the {num_images:,} {which}), over its bound of "
                f"{REFERENCE_IMAGES:,}; set it to a number, at most {REFERENCE_IMAGES:,}"
            )
        return np.arange(num_images)
    if num_reference > num_images:
        raise ConfigError(
            f"`fid.num_reference` ({num_reference}) exceeds the {num_images} {which}; "
            "lower it, or set it to null to use them all"
        )
    return np.sort(np.random.default_rng(seed).permutation(num_images)[:num_reference])


def reference_statistics(images, extractor: torch.nn.Module, batch_size: int, device: torch.device) -> dict:
    """The arrays of fid_ref.npz (without weights_sha256) for uint8 (N, C, H, W) images (an array, or Rows
    of one)."""
    feats = fid.features(images, extractor, batch_size, device, feature_workers(device))
    mu, sigma = fid.statistics(feats)
    return {"mu": mu, "sigma": sigma, "features": feats.astype(np.float32), "num_images": np.int64(len(feats))}


def candidates(params: Params, count: int) -> tuple[np.ndarray, str]:
    """(the images the reference is drawn from, what they are): for a class-conditional model with
    `sample.classes`, the images of those classes only, since the sample set holds no other class."""
    if params.data.holdout > 0:
        return np.arange(count), "held-out images (`data.holdout`)"
    if not params.sample.classes:  # (config allows it for a class-conditional model only)
        return np.arange(count), "preprocessed images"
    _, labels = load_labels(params.paths.labels)
    if len(labels) != count:
        raise ConfigError(f"{params.paths.labels}: {len(labels)} labels for {count} images; re-run preprocess")
    chosen = list(params.sample.classes)
    return np.flatnonzero(np.isin(labels, chosen)), f"images of `sample.classes` {chosen}"


def run(params: Params) -> dict:
    path = params.paths.holdout_images if params.data.holdout > 0 else params.paths.images
    images = load_images(path)
    pool, which = candidates(params, len(images))
    index = pool[choose_reference(len(pool), params.fid.num_reference, params.seed, which)]
    if len(index) < 2:
        raise ConfigError(f"{path}: FID statistics need at least 2 images, got {len(index)}")
    extractor, info = load_extractor(params.fid)
    device = default_device()
    stats = reference_statistics(Rows(images, index), extractor, params.fid.batch_size, device)
    stats["weights_sha256"] = np.array(info["sha256"])
    save_reference(params.paths.fid_ref, stats)
    return stats


def headline(stats: dict, params: Params) -> str:
    which = "held-out " if params.data.holdout else ""
    return f"fid_reference: {int(stats['num_images'])} {which}images -> {params.paths.fid_ref}"
