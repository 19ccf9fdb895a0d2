"""Class-conditional models with classifier-free guidance: labels from the embedded and folder sources
(the Hub's ClassLabel column: tests/test_hf_mirror.py), label dropout, guidance at w = 1 and w = 0, the
published pipeline sampling as our sampler does, bitwise resume with labels, and bad label inputs."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import tiny_dict, write_images
from workflow.core.config import ConfigError, Model, Sample, Scheduler, load_params, params_from_dict
from workflow.core.runtime import Runtime
from workflow.formats import checkpoints
from workflow.formats.labels import load_labels, write_labels
from workflow.formats.pipeline import load_class_names, load_unet
from workflow.maths.diffusion import guided, label_dropout_mask, sample_classes
from workflow.models.builders import build_noise_scheduler, build_sampler, build_unet, null_class, sampling_peak_bytes
from workflow.models.class_pipeline import ClassConditionalPipeline
from workflow.models.sampling import Denoiser, image_generators, sample_batches, sample_labels, sampled_classes
from workflow.stages import download, preprocess
from workflow.stages.sample import MAX_GRID_ROWS, class_grid_indices
from workflow.stages.sample import run as sample
from workflow.stages.train import run as train

CONDITIONAL = {"class_conditional": True}


def tiny_unet(num_classes: int = 3):
    torch.manual_seed(0)
    model = Model(block_out_channels=(16, 32), attention_levels=(), norm_num_groups=8)
    return build_unet(model, 8, 1, num_classes).eval()


def labelled_images(params, classes=("a", "b", "c"), n=24, labels=None):
    """n images and their labels (default 0, 1, 2, 0, ...), as preprocess writes them."""
    write_images(params.paths.images, n=n)
    write_labels(params.paths.labels, list(classes), labels or [i % len(classes) for i in range(n)])


# --- labels from the sources ---------------------------------------------------------------------------


def test_the_embedded_digits_bring_their_labels(tiny_params):
    import sklearn.datasets

    tiny_params(data={"source": "builtin:digits", "max_images": 40})
    record = download.run(load_params("params.yaml"))
    meta = preprocess.run(load_params("params.yaml"))
    assert record["classes"] == meta["classes"] == 10
    classes, labels = load_labels("data/processed/labels.json")
    assert classes == [str(d) for d in range(10)] and len(labels) == meta["count"] == 40
    raw = json.loads(Path("data/raw/LABELS.json").read_text())["labels"]  # {"digits_00017.png": 7, ...}
    target = sklearn.datasets.load_digits().target
    assert len(raw) == 1797 and all(raw[name] == target[int(name[7:12])] for name in raw)
    kept = preprocess.select_subset(sorted(raw), 40, seed=0)  # the seeded subset, in file order
    assert labels.tolist() == [raw[name] for name in kept]


def folder_of(root: Path, layout: dict) -> None:
    """Image files at the given relative paths (a colour per file, so each decodes to something)."""
    for i, name in enumerate(layout):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (20 * i, 100, 200 - 10 * i)).save(path)


def test_one_subfolder_per_class_gives_the_classes(tiny_params):
    tiny_params(data={"source": "imagefolder:data/images", "max_images": None, "min_images": 2})
    folder_of(Path("data/images"), ["dog/1.png", "cat/2.png", "cat/sub/3.png", "dog/4.png", "bird/5.png"])
    download.run(load_params("params.yaml"))
    meta = preprocess.run(load_params("params.yaml"))
    classes, labels = load_labels("data/processed/labels.json")
    assert classes == ["bird", "cat", "dog"] and meta["classes"] == 3
    assert labels.tolist() == [0, 1, 1, 2, 2]  # files in path order: bird/5, cat/2, cat/sub/3, dog/1, dog/4


def test_a_folder_with_loose_images_has_no_labels(tiny_params):
    tiny_params(data={"source": "imagefolder:data/images", "max_images": None, "min_images": 2})
    folder_of(Path("data/images"), ["dog/1.png", "2.png", "3.png"])
    download.run(load_params("params.yaml"))
    assert preprocess.run(load_params("params.yaml"))["classes"] == 0
    assert not Path("data/raw/LABELS.json").exists()
    assert load_labels("data/processed/labels.json") == ([], pytest.approx(np.array([], dtype=np.int64)))


# --- training: label dropout, conditioning, resume ------------------------------------------------------


def test_label_dropout_drops_its_share_reproducibly():
    masks = torch.stack([label_dropout_mask(0, step, 64, 0.1, "cpu") for step in range(200)])
    assert 0.09 < masks.float().mean().item() < 0.11
    assert torch.equal(masks[7], label_dropout_mask(0, 7, 64, 0.1, "cpu"))
    assert not label_dropout_mask(0, 3, 64, 0.0, "cpu").any() and label_dropout_mask(0, 3, 64, 1.0, "cpu").all()


def test_conditional_training_and_bitwise_resume(tiny_params):
    """Train 12 steps straight; then from the step-8 checkpoint to 12: the same weights, to the bit."""
    params = tiny_params(model=CONDITIONAL)
    labelled_images(params)
    info = train(params)
    assert load_class_names(params.paths.trained) == ["a", "b", "c"]
    unet, _ = load_unet(params.paths.trained, torch.device("cpu"))
    assert unet.config.num_class_embeds == 4 and null_class(unet) == 3
    straight = {k: v.clone() for k, v in unet.state_dict().items()}
    run_dir = Path(params.paths.checkpoints) / info["run_key"]
    shutil.rmtree(run_dir / "step-0000012")
    shutil.rmtree(params.paths.trained)
    assert train(params)["resumed_from_step"] == 8
    resumed, _ = load_unet(params.paths.trained, torch.device("cpu"))
    assert all(torch.equal(straight[k], v) for k, v in resumed.state_dict().items())


def test_the_labels_are_part_of_the_run_key():
    conditional = params_from_dict({"model": CONDITIONAL})
    assert checkpoints.run_key(conditional, "images", "labels-1") != checkpoints.run_key(conditional, "images", "2")
    # label_dropout shapes the weights of a conditional model only
    plain = [params_from_dict({"train": {"label_dropout": rate}}) for rate in (0.1, 0.5)]
    assert checkpoints.run_key(plain[0], "images") == checkpoints.run_key(plain[1], "images")
    labelled = [params_from_dict({"model": CONDITIONAL, "train": {"label_dropout": rate}}) for rate in (0.1, 0.5)]
    assert checkpoints.run_key(labelled[0], "images", "l") != checkpoints.run_key(labelled[1], "images", "l")


# --- guidance -------------------------------------------------------------------------------------------


def test_guidance_one_is_the_conditional_and_zero_the_unconditional_prediction():
    unet = tiny_unet()
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor(500)
    labels, no_class = torch.tensor([0, 1, 2, 1]), torch.full((4,), 3)
    with torch.no_grad():
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t, class_labels=no_class).sample
        assert not torch.allclose(cond, uncond)  # the label reaches the prediction: the cases below differ
        for w, expected in ((1.0, cond), (0.0, uncond)):
            denoiser = Denoiser(unet, Sample(guidance_scale=w), Runtime.for_device(torch.device("cpu")))
            assert torch.equal(denoiser(x, t, labels), expected)
        guided_out = Denoiser(unet, Sample(guidance_scale=3.0), Runtime.for_device(torch.device("cpu")))(x, t, labels)
    assert torch.allclose(guided_out, guided(cond, uncond, 3.0), atol=1e-5)
    assert torch.allclose(guided(cond, uncond, 1.0), cond, atol=1e-6)
    assert torch.equal(guided(cond, uncond, 0.0), uncond)


def test_a_guided_batch_counts_twice_against_the_sampling_cap():
    """Guidance other than w = 0 and 1 runs the conditional and unconditional inputs in one UNet call, so
    a cap that holds one call of the batch refuses it guided, on the call, before any batch is made."""
    unet, labels = tiny_unet(), np.zeros(4, dtype=int)
    config = build_noise_scheduler(Scheduler()).config
    cap = sampling_peak_bytes(unet, 4) / 2**30
    assert sampling_peak_bytes(unet, 8) / 2**30 > cap
    for w in (0.0, 1.0, 3.0):
        settings = Sample(guidance_scale=w, batch_size=4, max_activation_gib=cap)
        if w == 3.0:
            with pytest.raises(ConfigError, match=r"runs the UNet on 8 inputs \(twice the images"):
                sample_batches(unet, config, settings, 0, 4, torch.device("cpu"), labels=labels)
        else:
            sample_batches(unet, config, settings, 0, 4, torch.device("cpu"), labels=labels)


def test_sample_classes_fill_the_grid_in_turn_then_follow_the_training_shares():
    assert sample_classes([3, 7], [1, 1], 5, 1).tolist() == [3, 7, 3, 7, 3]  # equal shares: in turn
    # shares 6:4:2 of 12 samples; the grid's 2 rounds give 2 each, the tail the rest (4, 2, 0) interleaved
    labels = sample_classes([0, 1, 2], [12, 8, 4], 12, 2)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 1, 0]
    assert np.bincount(labels).tolist() == [6, 4, 2]
    # a class rarer than the grid's columns keeps them; the others share what remains by their need
    assert np.bincount(sample_classes([0, 1], [99, 1], 10, 2)).tolist() == [8, 2]
    with pytest.raises(ValueError, match="cannot give 3 samples"):
        sample_classes([0, 1], [1, 1], 3, 2)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_the_published_pipeline_samples_as_our_sampler(sampler):
    """workflow/models/class_pipeline.py (shipped beside the weights) and sample_batches: the same images."""
    unet, scheduler = tiny_unet(), build_noise_scheduler(params_from_dict({}).scheduler)
    settings = Sample(sampler=sampler, num_inference_steps=4, guidance_scale=2.5, batch_size=4)
    labels = np.array([2, 0, 1, 2])
    ours = np.concatenate(
        [
            b
            for _, b in sample_batches(
                unet, scheduler.config, settings, 5, 4, torch.device("cpu"), progress=False, labels=labels
            )
        ]
    )
    pipeline = ClassConditionalPipeline(unet=unet, scheduler=build_sampler(sampler, scheduler.config, "leading"))
    pipeline.set_progress_bar_config(disable=True)
    theirs = pipeline(
        class_labels=labels.tolist(),
        guidance_scale=2.5,
        num_inference_steps=4,
        generator=image_generators(5, range(4)),
        eta=settings.eta,  # the default, 1: DDIM's per-step noise comes from the same generators
        output_type="np",
    ).images
    assert np.array_equal(ours, np.round(theirs * 255).astype(np.uint8))
    with pytest.raises(ValueError, match="class indices in 0..2"):
        pipeline(class_labels=[3], num_inference_steps=1)


@pytest.mark.parametrize("swap", ["PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler"])
def test_the_published_pipeline_takes_any_scheduler(swap):
    """The model card swaps the scheduler: steps that take no generator (PNDM, LMS) or no eta still run,
    and a seeded generator still makes the same images twice."""
    import diffusers

    unet, scheduler = tiny_unet(), build_noise_scheduler(params_from_dict({}).scheduler)
    pipeline = ClassConditionalPipeline(unet=unet, scheduler=getattr(diffusers, swap).from_config(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)

    def images():
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=10, generator=generator, output_type="np"
        ).images

    first = images()
    assert first.shape == (2, 8, 8, 1) and np.isfinite(first).all() and np.array_equal(first, images())


def test_the_published_pipeline_loads_in_half_precision(tmp_path):
    """from_pretrained(torch_dtype=torch.float16), as a GPU user loads it: the UNet runs in its dtype on
    the float32 latents the scheduler steps, to the float32 pipeline's images within half's rounding
    (measured: 0.007 at most)."""
    unet, scheduler = tiny_unet(), build_noise_scheduler(params_from_dict({}).scheduler)
    ClassConditionalPipeline(unet=unet, scheduler=build_sampler("ddim", scheduler.config, "leading")).save_pretrained(
        tmp_path
    )

    def images(dtype):
        pipeline = ClassConditionalPipeline.from_pretrained(tmp_path, torch_dtype=dtype)
        assert pipeline.unet.dtype == dtype
        pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            class_labels=[0, 2], guidance_scale=2.0, num_inference_steps=4, generator=generator, output_type="np"
        ).images

    full, half = images(torch.float32), images(torch.float16)
    assert half.dtype == np.float32 and half.shape == full.shape == (2, 8, 8, 1)
    assert not np.array_equal(half, full) and np.abs(half - full).max() < 0.03


# --- the sample set and its grid -------------------------------------------------------------------------


UNEVEN = [0] * 12 + [1] * 8 + [2] * 4  # 24 training images, classes a:b:c as 3:2:1


def test_the_sample_set_follows_the_training_classes_and_the_grid_has_a_row_per_class(tiny_params):
    """FID compares with training images at their class proportions, so the sample set has them too, after
    the grid's block of every class in turn."""
    params = tiny_params(
        model=CONDITIONAL,
        sample={"guidance_scale": 2.0, "grid_size": 2},
        fid={"num_samples": 12},
        train={"max_steps": 4, "progress_grids": False},
    )
    labelled_images(params, labels=UNEVEN)
    train(params)
    record = sample(params)
    assert record["labels"] == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 1, 0] and record["class_names"] == ["a", "b", "c"]
    assert record["guidance_scale"] == 2.0
    with Image.open(params.paths.grid) as grid:  # 3 rows of 2 samples (8 px, 2 px padding), labels at the left
        assert grid.height == 3 * 10 + 2 and grid.width > 2 * 10 + 2


def test_the_class_grid_keeps_only_the_samples_it_shows():
    """Sample i is of class i mod classes: row r of the grid is samples r, r + classes, ...; with more classes
    than MAX_GRID_ROWS only the rows shown are kept (not the 8,000 of 1,000 classes x 8 columns)."""
    assert class_grid_indices(3, 2) == [0, 3, 1, 4, 2, 5]
    many = class_grid_indices(1000, 8)
    assert len(many) == MAX_GRID_ROWS * 8 == 256
    assert many[:8] == list(range(0, 8000, 1000)) and many[-8:] == list(range(MAX_GRID_ROWS - 1, 8000, 1000))


def test_the_reference_holds_only_the_sampled_classes(tiny_params):
    """With `sample.classes` the sample set holds those classes only: so must what FID compares it with."""
    from workflow.stages import fid_reference

    params = tiny_params(model=CONDITIONAL, sample={"classes": [1, 2]}, fid={"num_reference": None})
    labelled_images(params, labels=UNEVEN)
    assert fid_reference.candidates(params, 24)[0].tolist() == list(range(12, 24))
    assert int(fid_reference.run(params)["num_images"]) == 12
    too_many = r"`fid.num_reference` \(13\) exceeds the 12 images of `sample.classes` \[1, 2\]"
    with pytest.raises(ConfigError, match=too_many):
        fid_reference.run(tiny_params(model=CONDITIONAL, sample={"classes": [1, 2]}, fid={"num_reference": 13}))
    everything = tiny_params(model=CONDITIONAL, fid={"num_reference": None})  # all classes: every image
    assert fid_reference.candidates(everything, 24)[0].tolist() == list(range(24))


def test_sampled_classes_must_exist(tiny_params):
    params = tiny_params(model=CONDITIONAL, sample={"classes": [1, 5]}, train={"max_steps": 2})
    labelled_images(params)
    train(params)
    with pytest.raises(ConfigError, match=r"`sample.classes` \[5\]: the model has 3 classes"):
        sample(params)


def test_a_class_without_training_images_is_not_sampled():
    """FID's reference holds no image of it: left out of "every class", refused when chosen."""
    names, labels = ["a", "b", "c"], np.array([0, 2, 0, 2])  # no "b" (e.g. cut by data.max_images)
    params = params_from_dict(tiny_dict(model=CONDITIONAL, fid={"num_samples": 6}, sample={"grid_size": 1}))
    assert sampled_classes(params, names, (names, labels)) == [0, 2]
    assert sample_labels(params, names, (names, labels)).tolist() == [0, 2, 0, 2, 0, 2]
    chosen = params_from_dict(tiny_dict(model=CONDITIONAL, sample={"classes": [0, 1]}))
    with pytest.raises(ConfigError, match=r"`sample.classes` \[1\]: no training image has this class"):
        sampled_classes(chosen, names, (names, labels))
    with pytest.raises(ConfigError, match=r"labels.json: its classes are not those of the trained model"):
        sampled_classes(params, names, (["a", "b", "z"], labels))
    with pytest.raises(ConfigError, match=r"`sample.classes` must hold .* none twice, got \(3, 3, 5\)"):
        params_from_dict(tiny_dict(model=CONDITIONAL, sample={"classes": [3, 3, 5]}))


# --- bad inputs ---------------------------------------------------------------------------------------------


def test_a_conditional_model_needs_labels(tiny_params):
    params = tiny_params(model=CONDITIONAL)
    write_images(params.paths.images)
    write_labels(params.paths.labels, [], [])
    with pytest.raises(ConfigError, match="`model.class_conditional` is true but `data.source` 'builtin:mnist' gave"):
        train(params)


def test_a_class_without_images_is_named(tiny_params):
    params = tiny_params(model=CONDITIONAL)
    write_images(params.paths.images, n=24)
    write_labels(params.paths.labels, ["a", "b", "empty"], [i % 2 for i in range(24)])
    with pytest.raises(ConfigError, match="class 'empty' has no decodable image"):
        train(params)


@pytest.mark.parametrize(
    "key, value",
    [("sample", {"guidance_scale": 2.0}), ("sample", {"classes": [1]}), ("fid", {"guidance_sweep": [1, 2]})],
)
def test_guidance_settings_need_a_conditional_model(key, value):
    with pytest.raises(ConfigError, match=f"`{key}.{next(iter(value))}` applies to class-conditional models"):
        params_from_dict({key: value})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sample": {"guidance_scale": 2.0}}, r"`sample.guidance_scale` guides with the \"no class\" prediction"),
        ({"fid": {"guidance_sweep": [1, 3]}}, r"`fid.guidance_sweep` guides with the \"no class\" prediction"),
    ],
)
def test_guidance_needs_label_dropout_to_train_the_unconditional_row(overrides, message):
    """Dropout 0 never trains the "no class" row: guidance would mix in untrained weights."""
    with pytest.raises(ConfigError, match=message):
        params_from_dict({"model": CONDITIONAL, "train": {"label_dropout": 0.0}, **overrides})
    params_from_dict({"model": CONDITIONAL, "train": {"label_dropout": 0.0}})  # unguided: a plain conditional model
    params_from_dict({"model": CONDITIONAL, "train": {"label_dropout": 0.1}, **overrides})


def test_dropping_every_label_is_refused():
    with pytest.raises(ConfigError, match="`train.label_dropout` is 1: every label becomes"):
        params_from_dict({"model": CONDITIONAL, "train": {"label_dropout": 1.0}})
    params_from_dict({"train": {"label_dropout": 1.0}})  # an unconditional model has no labels to drop
