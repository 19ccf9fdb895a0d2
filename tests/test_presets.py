"""configs/*.yaml: each preset holds only what it changes from the defaults, reproduces its reference
recipe except where its comment says why not, and becomes `dvc exp run -S` arguments that dvc reads back
as the same params."""

import shlex
import shutil

import pytest

from tests.helpers import ROOT
from workflow.core.config import ConfigError, Params, dotted_keys, load_params, load_preset, params_from_dict
from workflow.tools.preset import dvc_set_args

PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
UNET = {
    "model.block_out_channels": [128, 128, 256, 256, 512, 512],
    "model.layers_per_block": 2,
    "model.attention_levels": [4],
    "model.norm_num_groups": 32,  # attention in the 5th down / 2nd up block
    "scheduler.num_train_timesteps": 1000,
    "scheduler.beta_schedule": "linear",
    "scheduler.prediction_type": "epsilon",
}
TEXT_TO_IMAGE = {  # what train_text_to_image.py and its LoRA variant share
    "model.pretrained": "hf:stable-diffusion-v1-5/stable-diffusion-v1-5",
    "data.source": "hf:lambdalabs/naruto-blip-captions",
    "data.caption_column": "text",
    "data.holdout": 0,
    "data.resolution": 512,
    "data.channels": 3,
    "train.random_flip": True,
    "train.lr_schedule": "constant",
    "train.warmup_steps": 0,
    "train.adam_beta1": 0.9,
    "train.adam_beta2": 0.999,
    "train.adam_weight_decay": 1e-2,
    "train.adam_epsilon": 1e-8,
    "train.max_grad_norm": 1.0,
    "train.min_snr_gamma": None,
    "train.noise_offset": 0.0,
    "train.mixed_precision": "fp16",
}
# Each reference's hyperparameters in our keys (../shared/seeds, DESIGN.md section 1).
REFERENCES = {
    # The tutorial: TrainingConfig, Resize((128, 128)) + RandomHorizontalFlip, torch.optim.AdamW(lr=...) with
    # torch's defaults, clip_grad_norm_ 1.0, fp16, no EMA, DDPMPipeline (1000 steps) for a 4x4 grid.
    "tutorial-butterflies-128.yaml": {
        **UNET,
        "seed": 0,
        "data.source": "hf:huggan/smithsonian_butterflies_subset",
        "data.resolution": 128,
        "data.channels": 3,
        "data.center_crop": False,
        "train.random_flip": True,
        "train.batch_size": 16,
        "train.gradient_accumulation_steps": 1,
        "train.epochs": 50,
        "train.max_steps": None,
        "train.learning_rate": 1e-4,
        "train.lr_schedule": "cosine",
        "train.warmup_steps": 500,
        "train.adam_beta1": 0.9,
        "train.adam_beta2": 0.999,
        "train.adam_weight_decay": 0.01,
        "train.adam_epsilon": 1e-8,
        "train.max_grad_norm": 1.0,
        "train.min_snr_gamma": None,
        "train.noise_offset": 0.0,
        "train.mixed_precision": "fp16",
        "train.ema": False,
        "sample.sampler": "ddpm",
        "sample.num_inference_steps": 1000,
        "sample.grid_size": 4,
    },
    # train_unconditional.py as the example's README runs it (--resolution=64 --center_crop --random_flip
    # --train_batch_size=16 --num_epochs=100 --use_ema --learning_rate=1e-4 --lr_warmup_steps=500), the
    # script's defaults otherwise, and the guide's --mixed_precision="fp16".
    "train-unconditional-flowers-64.yaml": {
        **UNET,
        "data.source": "hf:huggan/flowers-102-categories",
        "data.resolution": 64,
        "data.channels": 3,
        "data.center_crop": True,
        "train.random_flip": True,
        "train.batch_size": 16,
        "train.gradient_accumulation_steps": 1,
        "train.epochs": 100,
        "train.max_steps": None,
        "train.learning_rate": 1e-4,
        "train.lr_schedule": "cosine",
        "train.warmup_steps": 500,
        "train.adam_beta1": 0.95,
        "train.adam_beta2": 0.999,
        "train.adam_weight_decay": 1e-6,
        "train.adam_epsilon": 1e-8,
        "train.max_grad_norm": 1.0,
        "train.min_snr_gamma": None,
        "train.noise_offset": 0.0,
        "train.mixed_precision": "fp16",
        "train.ema": True,
        "train.ema_inv_gamma": 1.0,
        "train.ema_power": 0.75,
        "train.ema_max_decay": 0.9999,
        "sample.sampler": "ddpm",
        "sample.num_inference_steps": 1000,
    },
    # Our own recipes, class-conditional: the default MNIST run, and the train_unconditional.py recipe on
    # flowers-102 with its labels, each with a class embedding and an FID sweep over the guidance scale.
    "mnist-classes.yaml": {
        "data.source": "builtin:mnist",
        "model.class_conditional": True,
        "train.label_dropout": 0.1,
        "sample.guidance_scale": 1.0,
        "sample.grid_size": 10,
        "fid.guidance_sweep": [1, 1.5, 2, 3],
    },
    "flowers-102-classes-64.yaml": {
        **UNET,
        "data.source": "hf:nelorth/oxford-flowers",
        "data.label_column": "label",
        "data.resolution": 64,
        "data.channels": 3,
        "data.center_crop": True,
        "train.random_flip": True,
        "model.class_conditional": True,
        "train.label_dropout": 0.1,
        "train.batch_size": 16,
        "train.epochs": 100,
        "train.max_steps": None,
        "train.learning_rate": 1e-4,
        "train.warmup_steps": 500,
        "train.adam_beta1": 0.95,
        "train.adam_weight_decay": 1e-6,
        "train.mixed_precision": "fp16",
        "train.ema": True,
        "sample.sampler": "ddpm",
        "sample.num_inference_steps": 1000,
        "sample.guidance_scale": 2.0,
    },
    # diffusers' text-to-image guide (train_text_to_image.py with the guide's flags) and its LoRA example
    # (train_text_to_image_lora.py as examples/text_to_image/README.md runs it), the scripts' defaults otherwise.
    "text-to-image-naruto-512.yaml": {
        **TEXT_TO_IMAGE,
        "data.center_crop": True,
        "train.batch_size": 4,
        "train.gradient_accumulation_steps": 4,
        "train.gradient_checkpointing": True,
        "train.max_steps": 15000,
        "train.learning_rate": 1e-5,
        "train.ema": True,
        "train.lora_rank": None,
        "train.checkpoint_every": 500,
    },
    "text-to-image-naruto-lora-512.yaml": {
        **TEXT_TO_IMAGE,
        "seed": 42,
        "data.center_crop": False,
        "train.batch_size": 1,
        "train.gradient_accumulation_steps": 1,
        "train.epochs": 100,
        "train.max_steps": None,
        "train.learning_rate": 1e-4,
        "train.ema": False,
        "train.lora_rank": 4,
        "train.checkpoint_every": 5000,
    },
}
# Where a preset departs from its reference: {key: (its value, words its comment must say)}.
SAMPLER = {"sample.sampler": ("dpmsolver++", "DPM-Solver++"), "sample.num_inference_steps": (25, "25 steps")}
BF16 = {"train.mixed_precision": ("bf16", "diffusers#6492")}
DELIBERATE = {
    "tutorial-butterflies-128.yaml": {**BF16, **SAMPLER, "train.ema": (True, "EMA weights")},
    "train-unconditional-flowers-64.yaml": {**BF16, **SAMPLER},
    "mnist-classes.yaml": {},
    "flowers-102-classes-64.yaml": {**BF16, **SAMPLER},
    "text-to-image-naruto-512.yaml": {"data.holdout": (200, "200 of the 1,221 images")},
    "text-to-image-naruto-lora-512.yaml": {
        "data.center_crop": (True, "centre-cropped once, not RandomCrop"),
        "data.holdout": (200, "200 of the 1,221 images"),
    },
}


def effective(preset) -> dict:
    """{dotted key: value} of the params a preset runs with (over the defaults)."""
    return dotted_keys(params_from_dict(load_preset(preset)).to_dict())


def test_every_preset_has_a_reference():
    assert {p.name for p in PRESETS} == set(REFERENCES) == set(DELIBERATE)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_preset_holds_only_what_it_changes_from_the_defaults(preset):
    """Not a copy of params.yaml: a new default then reaches every preset that does not change that key."""
    defaults, ours = dotted_keys(Params().to_dict()), effective(preset)
    assert load_params(ROOT / "params.yaml") == Params()
    keys = list(dotted_keys(load_preset(preset)))
    assert keys and [key for key in keys if ours[key] == defaults[key]] == [], preset.name


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_a_preset_reproduces_its_reference_except_where_its_comment_says_why(preset):
    ours, reference, deliberate = effective(preset), REFERENCES[preset.name], DELIBERATE[preset.name]
    comments = " ".join(line for line in preset.read_text().splitlines() if line.lstrip().startswith("#"))
    for key, value in reference.items():
        if key in deliberate:
            differs, why = deliberate[key]
            assert ours[key] == differs != value, key
            assert why in comments, f"{preset.name}: no comment on {key} ({why!r})"
        else:
            assert ours[key] == value, f"{preset.name}: {key} is {ours[key]!r}, the reference's {value!r}"


def test_the_presets_sample_counts():
    """What the README says: FID over 1,000 (butterflies) and 10,000 (flowers) samples, against all images."""
    names = ("tutorial-butterflies-128.yaml", "train-unconditional-flowers-64.yaml")
    butterflies, flowers = (effective(ROOT / "configs" / name) for name in names)
    assert (butterflies["fid.num_samples"], flowers["fid.num_samples"]) == (1000, 10000)
    assert butterflies["fid.num_reference"] is flowers["fid.num_reference"] is None


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_dvc_reads_the_printed_arguments_back_as_the_preset(preset, tmp_path, capsys):
    """`python -m workflow preset FILE` prints `-S key=value` arguments; dvc's own -S parser, applied to
    params.yaml, gives exactly the preset over the defaults."""
    from dvc.utils.hydra import apply_overrides

    from workflow.__main__ import main

    assert main(["preset", str(preset)]) == 0
    args = shlex.split(capsys.readouterr().out)
    assert args[::2] == ["-S"] * (len(args) // 2) and args[1::2] == dvc_set_args(load_preset(preset))[1::2]
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(str(params), args[1::2])
    assert load_params(params) == params_from_dict(load_preset(preset))


@pytest.mark.parametrize(
    "text, words",
    [
        ("train:\n  lr: 0.1\n", ["unknown key `train.lr`", "learning_rate"]),
        ("trian:\n  epochs: 3\n", ["unknown key `trian`"]),
        ("train:\n  batch_size: 0\n", ["`train.batch_size`", "> 0"]),
        ("train: [1, 2]\n", ["`train` must be a mapping"]),
        ("train: {epochs: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_a_preset_mistake_names_the_key_and_the_preset_file(tmp_path, capsys, text, words):
    from workflow.__main__ import main

    preset = tmp_path / "mine.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_preset(preset)
    for word in [str(preset), *words]:
        assert word in str(err.value)
    assert main(["preset", str(preset)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and str(preset) in out.err and words[0] in out.err


def test_a_non_ascii_value_survives_dvc_and_one_dvc_would_change_is_refused(tmp_path):
    """dvc's -S parser keeps `\\u` escapes as text: values go as themselves, and are read back first."""
    from dvc.utils.hydra import apply_overrides

    preset = tmp_path / "photos.yaml"
    preset.write_text("data:\n  source: imagefolder:data/naïve — photos\n  folder: data/naïve — photos\n")
    args = dvc_set_args(load_preset(preset))
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply_overrides(str(params), args[1::2])
    assert load_params(params).data.folder == "data/naïve — photos"

    preset.write_text("data:\n  source: 'imagefolder:C:\\x'\n  folder: 'C:\\x'\n")
    with pytest.raises(ConfigError, match=r"photos.yaml: `data.source` .* does not survive `dvc exp run -S`"):
        dvc_set_args(load_preset(preset), str(preset))
    preset.write_text("data:\n  source: 'imagefolder:${oc.env:HOME}'\n  folder: '${oc.env:HOME}'\n")
    with pytest.raises(ConfigError, match=r"photos.yaml: `data.source` .* does not survive `dvc exp run -S`"):
        dvc_set_args(load_preset(preset), str(preset))  # OmegaConf would resolve it
