"""Sampling: deterministic per image, independent of the batch size, grid = start of the sample set."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_images
from workflow.config import ConfigError
from workflow.sample import make_grid, sample
from workflow.train import train


@pytest.fixture
def trained(tiny_params):
    params = tiny_params()
    write_images(params.paths.images)
    train(params)
    return tiny_params


def read_samples(folder):
    return np.stack([np.array(Image.open(f)) for f in sorted(Path(folder).glob("*.png"))])


@pytest.mark.parametrize("scheduler", ["ddpm", "ddim", "dpm"])
def test_samples_do_not_depend_on_batch_size(trained, scheduler):
    params = trained(sample={"scheduler": scheduler, "batch_size": 6})
    record = sample(params)
    whole = read_samples(params.paths.samples)
    assert whole.shape == (6, 8, 8) and whole.dtype == np.uint8 and record["count"] == 6
    assert len({im.tobytes() for im in whole}) == 6  # distinct images
    sample(trained(sample={"scheduler": scheduler, "batch_size": 4}))
    assert np.array_equal(whole, read_samples(params.paths.samples))
    meta = json.loads((Path(params.paths.samples) / "samples.json").read_text())
    assert meta["scheduler"] == scheduler and meta["num_inference_steps"] == 4


def test_grid_is_the_first_samples(trained):
    params = trained()
    sample(params)
    images = read_samples(params.paths.samples)[..., None]
    grid = np.array(Image.open(params.paths.grid))[..., None]
    assert np.array_equal(grid, make_grid(images, 2))
    assert np.array_equal(grid[2:10, 2:10, 0], images[0, ..., 0])  # top-left cell, after the padding
    assert np.array_equal(grid[2:10, 12:20, 0], images[1, ..., 0])


def test_make_grid_layout_rgb():
    images = np.stack([np.full((3, 3, 3), i, np.uint8) for i in range(4)])
    grid = make_grid(images, 2, padding=1)
    assert grid.shape == (9, 9, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 1 and grid[5, 1, 0] == 2 and grid[5, 5, 0] == 3
    assert grid[0, 0, 0] == 255


def test_missing_pipeline_is_a_clear_error(tiny_params):
    with pytest.raises(ConfigError, match="run the train stage first"):
        sample(tiny_params())
