"""Shared fixtures: tiny params that run in seconds on a 2-core CPU."""
from __future__ import annotations

import copy
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import settings

from workflow.core.config import params_from_dict

ROOT = Path(__file__).resolve().parents[1]

# Property tests run the same examples on every run and machine (CI included): derandomized, no example
# database carried between runs, and a deadline per example, so a value that makes the code slow fails
# the test instead of hanging it. HYPOTHESIS_PROFILE=explore searches afresh (random, more examples).
settings.register_profile("ci", derandomize=True, database=None, deadline=timedelta(seconds=5), print_blob=True)
settings.register_profile("explore", deadline=timedelta(seconds=5), max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TINY = {
    "seed": 0,
    "data": {"source": "builtin:mnist", "resolution": 8, "channels": 1, "max_images": 32},
    "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_levels": [1],
              "norm_num_groups": 8},
    "train": {"batch_size": 8, "max_steps": 12, "warmup_steps": 2, "log_every": 4,
              "checkpoint_every": 4, "checkpoints_total_limit": 2},
    "sample": {"sampler": "ddim", "num_inference_steps": 4, "grid_size": 2, "batch_size": 6},
    "fid": {"num_samples": 6, "num_reference": 6, "batch_size": 6},
}


def tiny_dict(**overrides) -> dict:
    """TINY with `section={key: value}` overrides merged in."""
    raw = copy.deepcopy(TINY)
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return raw


@pytest.fixture
def tiny_params(tmp_path, monkeypatch):
    """Tiny Params with every relative path landing in tmp_path (the working directory)."""
    monkeypatch.chdir(tmp_path)

    def make(**overrides):
        raw = tiny_dict(**overrides)
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        return params_from_dict(raw)

    return make


def write_images(path: str | Path, n: int = 24, channels: int = 1, size: int = 8, seed: int = 0) -> np.ndarray:
    """A small uint8 N x C x H x W array, as preprocess writes it."""
    images = np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    np.save(path, images)
    return images


@pytest.fixture(scope="session")
def dvc_repo(tmp_path_factory):
    """(repo, snapshot) of one uninterrupted run of the tiny end-to-end config, as `make run` makes it in a
    git checkout (`dvc exp run`, here named "baseline"), shared by the end-to-end tests and the fault
    tests, which compare their interrupted-and-resumed runs with it."""
    from tests.test_e2e import make_repo, sh, snapshot

    repo = make_repo(tmp_path_factory.mktemp("dvc"))
    sh(repo, "dvc", "exp", "run", "-n", "baseline")
    return repo, snapshot(repo)
