"""FID and KID maths plus Inception features, the clean-fid way ("clean" mode). No file handling.

    from workflow.maths.fid import features, statistics, frechet_distance, kernel_inception_distance
    feats = features(images, extractor, batch_size=50, device=torch.device("cpu"))
    mu, sigma = statistics(feats)
    fid = frechet_distance(mu, sigma, mu_ref, sigma_ref)

No command of its own: `python -m workflow fid_reference` and `python -m workflow evaluate` use it.

Each image goes uint8 RGB (a grayscale image is replicated to three channels, which is what PIL's
convert("RGB") does) -> clean-fid's "clean" resizer (per-channel float PIL bicubic to 299x299) ->
float 0..255 -> the extractor (workflow.models.inception). KID is clean-fid's kernel_distance; FID is
clean-fid's formula by a faster, equal route (frechet_distance).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.resize import build_resizer
from torch.utils.data import DataLoader, Dataset

FEATURE_DIM = 2048


@functools.cache
def _clean_resizer():
    return build_resizer("clean")


def clean_resize(image_chw: np.ndarray) -> torch.Tensor:
    """uint8 (C, H, W), C = 1 or 3 -> float32 (3, 299, 299) in 0..255, exactly as clean-fid's "clean"."""
    hwc = np.ascontiguousarray(np.asarray(image_chw).transpose(1, 2, 0))
    if hwc.shape[2] == 1:
        hwc = np.repeat(hwc, 3, axis=2)
    resized = _clean_resizer()(hwc)  # float32 (299, 299, 3)
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


class _Resized(Dataset):
    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return clean_resize(self.images[i])


def features(
    images: np.ndarray, extractor: torch.nn.Module, batch_size: int, device: torch.device | str, num_workers: int = 0
) -> np.ndarray:
    """uint8 (N, C, H, W) images (C = 1 or 3) -> float64 (N, 2048) Inception features. `images` may be any
    sequence with that shape and dtype whose items are read as they are indexed (a memory map, the
    Rows of one, a SampleSet): only a batch at a time is in memory, besides the features."""
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected uint8 (N, C, H, W) with C = 1 or 3, got {images.dtype} {images.shape}")
    loader = DataLoader(_Resized(images), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    extractor = extractor.to(device).eval()
    out, done = np.empty((len(images), FEATURE_DIM)), 0
    # cuDNN convolutions run in TF32 by default (and after a train.allow_tf32 run): features ~1e-3 off the
    # float32 ones, so a reference made on one device and samples scored on another would not meet
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        with torch.no_grad():
            for batch in loader:
                feats = extractor(batch.to(device))
                out[done : done + len(feats)] = feats.detach().cpu().numpy()
                done += len(feats)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return out


def statistics(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of (N, D) features, N >= 2."""
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got shape {feats.shape}")
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between two Gaussians: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    The same quantity as clean-fid's frechet_distance, computed another way: the eigenvalues of
    S1 S2 are those of the symmetric S1^(1/2) S2 S1^(1/2), so the trace of the square root is the sum
    of their square roots. Two symmetric eigendecompositions cost about a tenth of scipy's sqrtm
    (a complex Schur form: ~15 s at 2048 dimensions on 2 CPU cores), and they stay well defined for
    the singular covariances of sets smaller than 2048. Tested against the closed form and against
    `cleanfid.fid.compute_fid` (1e-6 relative); the eigenvalues below 0 are rounding, clipped to 0.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)  # symmetrised against rounding
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def kernel_inception_distance(
    feats1: np.ndarray, feats2: np.ndarray, seed: int, num_subsets: int = 100, max_subset_size: int = 1000
) -> float:
    """KID by clean-fid's kernel_distance, its subsets drawn from np.random seeded with `seed`.

    The global NumPy random state is saved and restored, so callers see no side effect.
    """
    if min(len(feats1), len(feats2)) < 2:
        raise ValueError("KID needs at least 2 feature rows on each side")
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(
            cleanfid_fid.kernel_distance(
                np.asarray(feats1, np.float64),
                np.asarray(feats2, np.float64),
                num_subsets=num_subsets,
                max_subset_size=max_subset_size,
            )
        )
    finally:
        np.random.set_state(state)


def score(sample_feats: np.ndarray, reference: dict, seed: int, with_precision_recall: bool = True) -> dict:
    """FID against the reference statistics; KID, and unless told not to precision and recall, against
    its features."""
    mu, sigma = statistics(sample_feats)
    pr = precision_recall_or_none(reference["features"], sample_feats, seed) if with_precision_recall else {}
    return {
        "fid": frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
        "kid": kernel_inception_distance(sample_feats, reference["features"], seed),
        **pr,
        "fid_num_samples": len(sample_feats),
        "fid_num_reference": int(reference["num_images"]),
    }


# --- precision and recall (Kynkaanniemi et al. 2019) -----------------------------------------------
# Written here, not taken from `prdc` (clovaai's reference code, unmaintained since 2020), because
# that builds the whole N x M distance matrix at once; these go through it in row blocks.

PR_NEIGHBOURS = 3  # k of the paper's k-nearest-neighbour manifold estimate
# rows per side at most: the radii cost rows^2 x 2048 (10,000: about a minute on 2 CPU cores; a million
# reference images would take days), so a larger side is a subset, seeded (the paper used 50,000)
PR_MAX_ROWS = 10_000
_BLOCK = 1024  # rows of a distance block: 1024 x M float64


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of `a` and of `b` (float64)."""
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(squared, 0.0))


def knn_radii(feats: np.ndarray, k: int = PR_NEIGHBOURS) -> np.ndarray:
    """Each row's distance to its k-th nearest other row: the radius of its ball in the manifold estimate."""
    feats = np.asarray(feats, np.float64)
    if len(feats) <= k:
        raise ValueError(f"precision and recall need more than k = {k} feature rows on each side, got {len(feats)}")
    radii = np.empty(len(feats))
    for start in range(0, len(feats), _BLOCK):
        block = _distances(feats[start : start + _BLOCK], feats)
        radii[start : start + _BLOCK] = np.partition(block, k, axis=1)[:, k]  # column 0 is the row itself
    return radii


def inside_manifold(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each point lies in at least one centre's ball (distance <= its radius)."""
    points, centres = np.asarray(points, np.float64), np.asarray(centres, np.float64)
    inside = np.empty(len(points), dtype=bool)
    for start in range(0, len(points), _BLOCK):
        inside[start : start + _BLOCK] = (_distances(points[start : start + _BLOCK], centres) <= radii).any(1)
    return inside


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS) -> dict:
    """Improved precision and recall: the share of generated samples inside the real images' manifold
    (fidelity) and of real images inside the generated samples' manifold (diversity), each manifold
    the union of k-nearest-neighbour balls around its points."""
    return {
        "precision": float(inside_manifold(fake, real, knn_radii(real, k)).mean()),
        "recall": float(inside_manifold(real, fake, knn_radii(fake, k)).mean()),
    }


def precision_recall_or_none(real: np.ndarray, fake: np.ndarray, seed: int) -> dict:
    """precision_recall over at most PR_MAX_ROWS of each side (a subset drawn with `seed`), or None for
    both where a side has too few rows for k neighbours (tiny test runs)."""
    if min(len(real), len(fake)) <= PR_NEIGHBOURS:
        return {"precision": None, "recall": None}
    rng = np.random.default_rng(seed)

    def at_most(feats):
        if len(feats) <= PR_MAX_ROWS:
            return feats
        return feats[np.sort(rng.choice(len(feats), PR_MAX_ROWS, replace=False))]

    return precision_recall(at_most(real), at_most(fake))
