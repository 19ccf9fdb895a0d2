"""Sampling: each image a function of (seed, index), for every sampler; streamed set, grid, DDPMPipeline parity."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_dict, write_images
from workflow.core.artifacts import try_lock
from workflow.core.config import ConfigError, Sample, params_from_dict
from workflow.formats import sample_set
from workflow.formats.pipeline import load_unet
from workflow.formats.png import make_grid
from workflow.formats.sample_set import write_sample_set
from workflow.models.builders import build_sampler
from workflow.models.sampling import image_generators, sample_batches
from workflow.stages.sample import run as sample
from workflow.stages.train import run as train

SAMPLERS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmsolver++", 0.0)]


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory) -> Path:
    """One tiny training for the module: the tests only read its pipeline."""
    folder, cwd = tmp_path_factory.mktemp("trained"), os.getcwd()
    os.chdir(folder)  # the params' paths are relative
    try:
        params = params_from_dict(tiny_dict())
        write_images(params.paths.images)
        train(params)
        return folder / params.paths.trained
    finally:
        os.chdir(cwd)


@pytest.fixture
def trained(tiny_params, trained_once):
    """tiny_params, with that trained pipeline at its paths.trained."""
    shutil.copytree(trained_once, tiny_params().paths.trained)
    return tiny_params


def read_samples(folder):
    return np.stack([np.array(Image.open(f)) for f in sorted(Path(folder).glob("*.png"))])


@pytest.mark.parametrize("sampler, eta", SAMPLERS)
def test_images_depend_on_seed_and_index_only(trained, sampler, eta):
    """Same params -> same images; another batch size -> same images; fewer samples -> the first ones."""
    settings = {"sampler": sampler, "eta": eta}
    params = trained(sample={**settings, "batch_size": 6})
    record = sample(params)
    whole = read_samples(params.paths.samples)
    assert whole.shape == (6, 8, 8) and whole.dtype == np.uint8 and record["count"] == 6
    assert len({im.tobytes() for im in whole}) == 6  # distinct images
    sample(trained(sample={**settings, "batch_size": 4}))
    assert np.array_equal(whole, read_samples(params.paths.samples))
    sample(trained(sample={**settings, "batch_size": 3}, fid={"num_samples": 4}))
    assert np.array_equal(whole[:4], read_samples(params.paths.samples))
    meta = json.loads((Path(params.paths.samples) / "samples.json").read_text())
    assert meta["sampler"] == sampler and meta["num_inference_steps"] == 4
    assert meta["timestep_spacing"] == "leading"  # null: the schedule's own, the spacing it sampled with
    assert meta["eta"] == (eta if sampler == "ddim" else None)  # the samplers other than DDIM ignore it
    assert meta["count"] == 4 and meta["dtype"] == "float32" and meta["device"] == "cpu"


def test_eta_and_the_seed_change_the_images(trained):
    base = trained(sample={"eta": 0.0})
    sample(base)
    deterministic = read_samples(base.paths.samples)
    sample(trained(sample={"eta": 1.0}))
    assert not np.array_equal(deterministic, read_samples(base.paths.samples))
    sample(trained(seed=1, sample={"eta": 0.0}))
    assert not np.array_equal(deterministic, read_samples(base.paths.samples))


@pytest.mark.parametrize(
    "sampler, eta, spacing",
    [("ddpm", 0.0, "leading"), ("ddim", 0.0, "leading"), ("ddim", 1.0, "leading"), ("ddpm", 0.0, "trailing")],
)
def test_our_loop_equals_diffusers_pipelines_on_cpu(trained, sampler, eta, spacing):
    """In float32 our loop is DDPMPipeline (the tutorial's sampler) or DDIMPipeline at that eta and timestep
    spacing, with the same per-image generators."""
    from diffusers import DDIMPipeline, DDPMPipeline

    params = trained()
    unet, config = load_unet(params.paths.trained, torch.device("cpu"))
    settings = Sample(sampler=sampler, num_inference_steps=5, batch_size=3, eta=eta, timestep_spacing=spacing)
    ours = np.concatenate([b for _, b in sample_batches(unet, config, settings, 0, 3, torch.device("cpu"))])
    pipeline = (DDIMPipeline if sampler == "ddim" else DDPMPipeline).from_pretrained(params.paths.trained)
    pipeline.scheduler = build_sampler(sampler, pipeline.scheduler.config, spacing)
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        batch_size=3,
        generator=image_generators(0, range(3)),
        num_inference_steps=5,
        output_type="np",
        **({"eta": eta} if sampler == "ddim" else {}),
    ).images
    assert np.array_equal(ours, np.round(theirs * 255).astype(np.uint8))


def test_grid_is_the_first_samples(trained):
    params = trained()
    sample(params)
    images = read_samples(params.paths.samples)[..., None]
    grid = np.array(Image.open(params.paths.grid))[..., None]
    assert np.array_equal(grid, make_grid(images, 2))
    assert np.array_equal(grid[2:10, 2:10, 0], images[0, ..., 0])  # top-left cell, after the padding
    assert np.array_equal(grid[2:10, 12:20, 0], images[1, ..., 0])


def test_sample_set_is_written_batch_by_batch_and_published_whole(tmp_path):
    """Each batch is on disk (in the partial folder) before the next is made; the folder appears at the end."""
    folder = tmp_path / "samples"

    def batches_from(start):
        assert start == 0
        for first in (0, 2):
            if first:
                written = sorted(p.name for p in tmp_path.rglob("*.png"))
                assert written == ["000000.png", "000001.png"] and not folder.exists()
            yield first, np.full((2, 4, 4, 1), first, np.uint8)

    kept, record = write_sample_set(batches_from, 4, 2, str(folder), range(3), {"sampler": "ddim"}, {})
    assert kept.shape == (3, 4, 4, 1) and kept[2, 0, 0, 0] == 2 and record["count"] == 4
    assert record["resumed_from"] == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(4)] + ["samples.json"]
    assert [p.name for p in (tmp_path / ".samples.partial").iterdir()] == ["lock"]  # no images, no progress


def numbered_batches(calls: list, stop_after: int | None = None, fail=KeyboardInterrupt, total: int = 6, size: int = 2):
    """batches_from for a set of `total` RGB images where image i is all i*10, `size` at a time; it records
    each start it is asked for and, with `stop_after`, raises `fail` after that many batches (an
    interrupted run)."""

    def batches_from(start):
        calls.append(start)
        for n, first in enumerate(range(start, total, size)):
            if stop_after is not None and n == stop_after:
                raise fail
            count = min(size, total - first)
            yield first, np.stack([np.full((4, 4, 3), 10 * (first + k), np.uint8) for k in range(count)])

    return batches_from


def values(folder: Path) -> list[int]:
    return [int(v) for v in read_samples(folder)[:, 0, 0, 0]]


def interrupted(folder: Path, stop_after: int, count: int = 6, settings=None, identity=None) -> None:
    with pytest.raises(KeyboardInterrupt):
        write_sample_set(numbered_batches([], stop_after), count, 2, str(folder), (), settings or {}, identity or {})


def test_an_interrupted_sample_set_resumes_from_its_last_whole_batch(tmp_path):
    folder, settings, identity = tmp_path / "samples", {"sampler": "ddpm"}, {"weights": "abc", "seed": 0}
    calls = []
    with pytest.raises(KeyboardInterrupt):
        write_sample_set(numbered_batches(calls, stop_after=2), 6, 2, str(folder), range(3), settings, identity)
    assert not folder.exists()  # nothing that looks complete
    images = tmp_path / ".samples.partial/images"
    assert sorted(p.name for p in images.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    (images / "000004.png").write_bytes(b"cut short")  # the next batch, killed mid-write
    (images / ".leftover.~1~host~x.tmp").mkdir()  # anything else a killed write left

    kept, record = write_sample_set(numbered_batches(calls), 6, 2, str(folder), range(3), settings, identity)
    assert calls == [0, 4]  # the second run made images 4 and 5 only
    assert record["resumed_from"] == 4 and record["count"] == 6 and record["seconds"] >= 0
    assert [int(k[0, 0, 0]) for k in kept] == [0, 10, 20]  # the grid's images, read back from the first run
    assert values(folder) == [0, 10, 20, 30, 40, 50]
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(6)] + ["samples.json"]


def test_a_partial_set_of_other_settings_is_replaced_only_once_the_new_run_makes_a_batch(tmp_path):
    """Another sampler setting (or weights, seed, batch size, code: the identity) starts afresh, but a run
    that fails before its first batch (a refused setting) leaves the other's partial set to resume."""
    folder, calls = tmp_path / "samples", []
    interrupted(folder, 2, settings={"eta": 0.0})  # images 0-3 of eta 0
    refused = numbered_batches(calls, stop_after=0, fail=ConfigError("refused"))
    with pytest.raises(ConfigError):
        write_sample_set(refused, 6, 2, str(folder), (), {"eta": 1.0}, {})
    _, record = write_sample_set(numbered_batches(calls), 6, 2, str(folder), (), {"eta": 0.0}, {})
    assert calls == [0, 4] and record["resumed_from"] == 4

    calls.clear()
    interrupted(folder, 2, settings={"eta": 0.0})
    _, record = write_sample_set(numbered_batches(calls), 6, 2, str(folder), (), {"eta": 0.0}, {"seed": 1})
    assert calls == [0] and record["resumed_from"] == 0 and values(folder) == [0, 10, 20, 30, 40, 50]


def test_a_partial_set_larger_than_asked_gives_its_first_images(tmp_path):
    """A smaller set is the start of a larger one: 4 images made, 3 asked for, nothing sampled again."""
    folder, calls = tmp_path / "samples", []
    interrupted(folder, 2)
    _, record = write_sample_set(numbered_batches(calls), 3, 2, str(folder), (), {}, {})
    assert calls == [] and record["count"] == 3 and record["resumed_from"] == 3
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:06d}.png" for i in range(3)] + ["samples.json"]


def test_only_the_images_asked_for_are_kept_in_their_order(tmp_path):
    """The grid's images, wherever they lie in the set (a class grid's are spread over it), and no others:
    from the batches as they are made and, on a resume, from the images already on disk."""
    kept, _ = write_sample_set(numbered_batches([]), 6, 2, str(tmp_path / "fresh"), [4, 1, 5], {}, {})
    assert kept.shape == (3, 4, 4, 3) and [int(k[0, 0, 0]) for k in kept] == [40, 10, 50]
    folder, calls = tmp_path / "samples", []
    interrupted(folder, 2)  # images 0-3 on disk
    kept, record = write_sample_set(numbered_batches(calls), 6, 2, str(folder), [4, 1, 5], {}, {})
    assert calls == [4] and record["resumed_from"] == 4
    assert kept.shape == (3, 4, 4, 3) and [int(k[0, 0, 0]) for k in kept] == [40, 10, 50]


def test_a_set_ended_mid_batch_resumes_from_the_batch_boundary(tmp_path, monkeypatch):
    """5 images in batches of 2 (the last one short), killed before publishing; asked for 6, the run
    makes images 4 and 5 as one batch, as an uninterrupted run of 6 does."""
    folder, calls = tmp_path / "samples", []

    def killed(*_):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(sample_set, "publish_folder", killed)
        write_sample_set(numbered_batches([], total=5), 5, 2, str(folder), (), {}, {})
    assert len(list((tmp_path / ".samples.partial/images").glob("*.png"))) == 5
    _, record = write_sample_set(numbered_batches(calls), 6, 2, str(folder), (), {}, {})
    assert calls == [4] and record["resumed_from"] == 4 and values(folder) == [0, 10, 20, 30, 40, 50]


def test_a_damaged_partial_image_starts_the_set_afresh(tmp_path):
    """A PNG the grid needs, damaged after its batch was counted (a power cut): not a resume that fails
    for ever, a fresh start."""
    folder, calls = tmp_path / "samples", []
    interrupted(folder, 2)
    (tmp_path / ".samples.partial/images/000001.png").write_bytes(b"\x89PNG damaged")
    _, record = write_sample_set(numbered_batches(calls), 6, 2, str(folder), range(3), {}, {})
    assert calls == [0] and record["resumed_from"] == 0 and values(folder) == [0, 10, 20, 30, 40, 50]


def test_a_second_writer_of_the_same_set_is_refused(tmp_path):
    partial = tmp_path / ".samples.partial"
    partial.mkdir()
    with try_lock(partial / "lock"), pytest.raises(ConfigError, match="another process is writing this sample set"):
        write_sample_set(numbered_batches([]), 6, 2, str(tmp_path / "samples"), (), {}, {})
    assert not (tmp_path / "samples").exists()


def test_the_sample_stage_resumes_only_a_set_of_the_same_seed(trained, monkeypatch):
    """The stage's identity reaches the key: killed after its first batch, the set resumes under the same
    params (to the uninterrupted images) and starts afresh under another seed."""
    import workflow.stages.sample as stage

    params = trained(sample={"batch_size": 2})
    sample(params)
    straight = read_samples(params.paths.samples)
    real = stage.sample_batches

    def first_batch_then_killed(*args, **kwargs):
        batches = real(*args, **kwargs)
        yield next(batches)
        raise KeyboardInterrupt

    for seed, resumed in ((1, 0), (0, 2)):
        monkeypatch.setattr(stage, "sample_batches", first_batch_then_killed)
        with pytest.raises(KeyboardInterrupt):
            sample(params)
        monkeypatch.setattr(stage, "sample_batches", real)
        record = sample(trained(seed=seed, sample={"batch_size": 2}))
        assert record["resumed_from"] == resumed
    assert np.array_equal(read_samples(params.paths.samples), straight)


def test_a_sampling_batch_over_the_cap_is_refused_before_it_starts(trained):
    params = trained(sample={"max_activation_gib": 1e-4})
    with pytest.raises(
        ConfigError, match=r"a sampling batch of \d+ images runs the UNet .* \(0.0001\): lower `sample.batch_size`"
    ):
        sample(params)
    assert not Path(params.paths.samples).exists()
    assert not list(sample_set.partial_folder(Path(params.paths.samples)).rglob("*.png"))


def test_make_grid_layout_rgb():
    images = np.stack([np.full((3, 3, 3), i, np.uint8) for i in range(4)])
    grid = make_grid(images, 2, padding=1)
    assert grid.shape == (9, 9, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 1 and grid[5, 1, 0] == 2 and grid[5, 5, 0] == 3
    assert grid[0, 0, 0] == 255


def test_missing_pipeline_is_a_clear_error(tiny_params):
    with pytest.raises(ConfigError, match="run the train stage first"):
        sample(tiny_params())


def test_the_other_samplers_ignore_eta(trained):
    """As diffusers' pipelines do: the default eta (1, for DDIM) leaves a DDPM preset's images alone."""
    for sampler in ("ddpm", "dpmsolver++"):
        params = trained(sample={"sampler": sampler, "eta": 0.0})
        sample(params)
        plain = read_samples(params.paths.samples)
        record = sample(trained(sample={"sampler": sampler, "eta": 0.5}))
        assert np.array_equal(plain, read_samples(params.paths.samples)) and record["eta"] is None


def test_the_timestep_spacing_changes_the_images_and_a_ddim_stride_that_misses_is_refused(trained):
    """sample.timestep_spacing reaches the sampler and the record; DDIM with linspace spacing (its fixed
    stride would step past its own timesteps) stops before any image is written."""
    sample(trained())
    leading = read_samples(trained().paths.samples)
    params = trained(sample={"timestep_spacing": "trailing"})
    record = sample(params)
    assert record["timestep_spacing"] == "trailing" and not np.array_equal(read_samples(params.paths.samples), leading)
    shutil.rmtree(params.paths.samples)
    with pytest.raises(ConfigError, match="ddim with timestep spacing 'linspace' in 4 steps"):
        sample(trained(sample={"sampler": "ddim", "timestep_spacing": "linspace"}))
    assert not Path(params.paths.samples).exists()
