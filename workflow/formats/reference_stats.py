"""The reference statistics file (`paths.fid_ref`, .npz): mu, sigma (float64), features (float32, for
KID), num_images, and weights_sha256 (the Inception file that made them).

    save_reference("data/processed/fid_ref.npz", stats)             # fid_reference
    reference = load_reference("data/processed/fid_ref.npz")        # evaluate, fid_sweep
    check_weights(reference, info, "data/processed/fid_ref.npz")    # info from workflow.models.inception
    fid.score(sample_features, reference, seed)   # workflow.maths.fid: {fid, kid, fid_num_samples, ...}
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from workflow.core.artifacts import atomic_path
from workflow.core.config import ConfigError

REFERENCE_KEYS = ("mu", "sigma", "features", "num_images", "weights_sha256")


def save_reference(path: str | Path, stats: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: stats[k] for k in REFERENCE_KEYS})  # a file object: np.savez adds no .npz suffix


def load_reference(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} (`paths.fid_ref`): no such file; the fid_reference stage makes it")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # a .npy (or junk) loads as an array, not an archive
            raise ValueError("not an .npz archive")
        with npz:  # an array is read (and its CRC checked) here: a damaged one fails now, not in evaluate's maths
            arrays = {k: npz[k] for k in REFERENCE_KEYS if k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); re-run the fid_reference stage") from None
    missing = [k for k in REFERENCE_KEYS if k not in arrays]
    if missing:
        raise ConfigError(f"{path}: missing arrays {missing}; re-run the fid_reference stage")
    return arrays


def check_weights(reference: dict, info: dict, ref_path: str) -> None:
    """The reference must come from the Inception file now in use (`info` from workflow.models.inception)."""
    ref_sha = str(reference["weights_sha256"])
    if ref_sha != info["sha256"]:
        raise ConfigError(
            f"{ref_path} was computed with Inception weights sha256 {ref_sha}, but the current "
            f"weights ({info['path']}) have sha256 {info['sha256']}; re-run the fid_reference stage"
        )
