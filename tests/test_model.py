"""workflow.models.builders's size check: a UNet over model.max_parameters, or a training micro-batch over
train.max_activation_gib, is refused from the config alone, before anything is allocated (issue 18)."""

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from tests.helpers import ROOT, tiny_dict
from workflow.core.config import ConfigError, Model, load_params, params_from_dict
from workflow.formats import checkpoints
from workflow.models.builders import (
    activation_bytes,
    build_unet,
    check_size,
    count_parameters,
    sampling_peak_bytes,
)
from workflow.models.memory import PeakBytes
from workflow.stages.train import PROGRESS_SAMPLER, total_steps


@pytest.mark.parametrize(  # not the text-to-image presets: their UNet is the pretrained pipeline's (test_text_to_image)
    "preset",
    [
        "params.yaml",
        *sorted(
            p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").glob("*.yaml") if "text-to-image" not in p.name
        ),
    ],
)
def test_the_default_and_the_presets_are_within_the_caps(preset):
    params = load_params(ROOT / preset)
    size = check_size(params, grid=PROGRESS_SAMPLER)
    unet = build_unet(params.model, resolution=params.data.resolution, channels=params.data.channels)
    assert size["parameters"] == count_parameters(unet)  # the meta count is the real one
    assert size["parameters"] * 10 < params.model.max_parameters
    assert size["activation_gib"] * 10 < params.train.max_activation_gib
    guided = params.model.class_conditional and params.sample.guidance_scale not in (0.0, 1.0)
    sampling = sampling_peak_bytes(unet, params.sample.batch_size * (2 if guided else 1)) / 2**30
    assert sampling * 10 < params.sample.max_activation_gib


def test_a_huge_unet_is_refused_naming_its_keys_without_allocating():
    """Every value within its bound, yet 143 B parameters: refused in seconds, nothing allocated."""
    raw = tiny_dict(
        model={
            "block_out_channels": [4096] * 8,
            "layers_per_block": 16,
            "norm_num_groups": 32,
            "attention_levels": list(range(8)),
        },
        data={"resolution": 1024},
    )
    with pytest.raises(ConfigError) as error:  # counted on the meta device: were it built, this would not return
        check_size(params_from_dict(raw))
    for words in (
        "143,528,292,353 parameters",
        "`model.max_parameters` (2,000,000,000)",
        "`model.block_out_channels`",
        "`model.layers_per_block` 16",
    ):
        assert words in str(error.value)


def test_a_micro_batch_over_the_activation_cap_is_refused_naming_its_keys():
    params = load_params(ROOT / "configs/tutorial-butterflies-128.yaml")
    raw = params.to_dict()
    raw["train"]["batch_size"] = 1024
    with pytest.raises(ConfigError) as error:
        check_size(params_from_dict(raw))
    for words in (
        "micro-batch of 1024 images",
        "`train.batch_size`",
        "`train.gradient_accumulation_steps`",
        "`data.resolution` 128",
        "`train.max_activation_gib` (256.0)",
    ):
        assert words in str(error.value)
    raw["train"]["gradient_accumulation_steps"] = 8  # the memory knob: 128 images per micro-batch
    assert 0 < check_size(params_from_dict(raw))["activation_gib"] < 256
    accumulated = check_size(params_from_dict(raw))["activation_gib"]
    raw["train"].update(gradient_accumulation_steps=1, num_processes=8)  # or eight devices, 128 images each
    assert check_size(params_from_dict(raw))["activation_gib"] == accumulated


def test_a_global_batch_whose_noise_outgrows_the_cap_is_refused():
    """A step draws its noise for the whole global batch on each device, not a micro-batch's: with the batch
    spread over many micro-batches and devices, that is what fills the memory (3 x 512 x 512 float32: 3 MiB
    an image; a micro-batch of one image keeps 129 GiB here, the middle block's attention)."""
    train = {"batch_size": 2**16, "gradient_accumulation_steps": 1024, "num_processes": 64}
    raw = tiny_dict(model={"attention_levels": []}, data={"resolution": 512, "channels": 3}, train=train)
    with pytest.raises(ConfigError) as error:
        check_size(params_from_dict(raw))
    assert str(error.value) == (
        "a training step draws its noise for the whole `train.batch_size` (65,536 images) on each device: "
        "192.0 GiB beside the micro-batch's 128.8 GiB of activations, over `train.max_activation_gib` (256.0): "
        "lower `train.batch_size`, or raise the cap"
    )
    raw["train"].update(batch_size=2**14, num_processes=16)  # a quarter of it fits
    assert check_size(params_from_dict(raw))["noise_gib"] == 48.0
    raw["train"]["noise_offset"] = 0.1  # the offset is added to a second draw of the same size
    assert check_size(params_from_dict(raw))["noise_gib"] == 96.0


def saved_by_a_real_forward_pass(unet, batch: int, bf16: bool = False) -> int:
    """Bytes a real CPU forward pass saves for backward (weights aside): activation_bytes off the meta device."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return activation_bytes(unet, batch)


@pytest.mark.parametrize("raw", [tiny_dict(), {}], ids=["tiny", "default"])
def test_the_meta_estimate_bounds_what_a_real_cpu_forward_pass_saves(raw):
    """Meta counts attention as the math kernel does (its N x N weights), the fused CPU kernel saves
    less: the estimate is an upper bound, within 10% on these models; bf16 autocast saves less still."""
    params = params_from_dict(raw)
    shape = {"resolution": params.data.resolution, "channels": params.data.channels}
    torch.manual_seed(0)
    real = saved_by_a_real_forward_pass(build_unet(params.model, **shape), 4)
    with torch.device("meta"):
        meta = build_unet(params.model, **shape)
    estimate = activation_bytes(meta, 4)
    assert real <= estimate <= 1.1 * real
    assert activation_bytes(meta, 40) == 10 * estimate  # linear in the batch
    bf16 = saved_by_a_real_forward_pass(build_unet(params.model, **shape), 4, bf16=True)
    assert bf16 < real


PEAK_OF_A_REAL_PASS = """
import sys, torch
from workflow.core.config import Model
from workflow.models.builders import build_unet
def high_water_mib():  # the process's peak resident memory
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
levels, resolution, batch = eval(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
unet = build_unet(Model(attention_levels=levels), resolution=resolution, channels=1)
with torch.inference_mode():
    unet(torch.zeros(2, 1, resolution, resolution), torch.zeros(2, dtype=torch.long))  # one-time allocations
    x, t = torch.zeros(batch, 1, resolution, resolution), torch.zeros(batch, dtype=torch.long)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the high-water mark restarts from what the process holds now
    before = high_water_mib()
    unet(x, t)
print(high_water_mib() - before)
"""


@pytest.mark.parametrize(
    "levels, resolution, batch", [((2,), 16, 1000), ((0, 1, 2), 32, 200)], ids=["default", "attention-at-32px"]
)
def test_the_sampling_estimate_is_what_a_real_cpu_pass_holds_before_kernel_workspaces(levels, resolution, batch):
    """The meta count is a real CPU pass's count (same kernels, same tensors); the process's peak resident
    memory rises by more (kernel workspaces, the allocator): 1.27x to 1.35x on these when measured, and
    within 2x here. With attention at 32 px (1,024 tokens) the fused kernel holds no N x N weights."""
    unet = build_unet(Model(attention_levels=levels), resolution=resolution, channels=1)
    with torch.inference_mode(), PeakBytes() as real:
        unet(torch.zeros(20, 1, resolution, resolution), torch.zeros(20, dtype=torch.long))
    assert sampling_peak_bytes(unet, 20) == real.peak > 0
    estimate = sampling_peak_bytes(unet, batch) / 2**20
    command = [sys.executable, "-c", PEAK_OF_A_REAL_PASS, repr(levels), str(resolution), str(batch)]
    rise = float(subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT).stdout)
    assert estimate <= rise <= 2 * estimate


def test_the_sampling_count_follows_storages_through_views_copies_and_in_place_ops():
    with torch.inference_mode(), PeakBytes() as counter:
        x = torch.zeros(1000)  # 4,000 bytes
        x = x.view(10, 100)  # the view keeps the storage: still counted
        assert counter.live == 4000
        y = x.reshape(100, 10).t().contiguous()  # a copy: a storage of its own
        assert counter.live == 8000
        y.add_(1)  # in place: nothing new
        del x
        assert counter.live == 4000
        del y
        assert counter.live == 0
    assert counter.peak == 8000


def test_a_progress_grid_over_its_cap_is_refused_before_training_not_at_the_first_checkpoint():
    grid = dataclasses.replace(PROGRESS_SAMPLER, max_activation_gib=1e-6)
    with pytest.raises(ConfigError, match="a progress grid of 16 images .* turn off `train.progress_grids`"):
        check_size(params_from_dict(tiny_dict()), grid=grid)
    check_size(params_from_dict(tiny_dict(train={"progress_grids": False})), grid=grid)


def test_train_refuses_over_a_cap_before_reading_anything(tiny_params, capsys):
    """Through the CLI, with no images on disk: the cap is the first thing checked."""
    from workflow.__main__ import main

    tiny_params(model={"max_parameters": 10_000})
    assert main(["train"]) == 1
    err = capsys.readouterr().err
    assert "error in stage train:" in err and "parameters, over `model.max_parameters` (10,000)" in err
    tiny_params(train={"max_activation_gib": 0.001})
    assert main(["train"]) == 1
    assert "over `train.max_activation_gib` (0.001)" in capsys.readouterr().err


def test_epochs_may_not_add_up_to_more_steps_than_max_steps_allows():
    params = params_from_dict(tiny_dict(train={"max_steps": None, "epochs": 100_000, "batch_size": 1}))
    assert total_steps(params, 100) == 10_000_000
    with pytest.raises(ConfigError, match=r"`train.epochs` \(100000.0\) over 101 images .* 10,100,000 steps"):
        total_steps(params, 101)


def test_the_caps_do_not_change_the_run_key(tmp_path):
    """Raising a cap decides whether a run may start; it must not orphan that run's checkpoints."""
    raw = tiny_dict()
    key = checkpoints.run_key(params_from_dict(raw), "0" * 64)
    raw["model"]["max_parameters"] = 10**9
    raw["train"]["max_activation_gib"] = 8.0
    assert checkpoints.run_key(params_from_dict(raw), "0" * 64) == key
    raw["model"]["layers_per_block"] = 2
    assert checkpoints.run_key(params_from_dict(raw), "0" * 64) != key
    yaml.safe_dump(raw, (tmp_path / "params.yaml").open("w"))
    assert load_params(tmp_path / "params.yaml").model.max_parameters == 10**9


def test_editing_the_training_code_changes_the_run_key(tmp_path):
    """DVC and Snakemake re-run train when its code changes: that run must train afresh, not find the old
    code's finished checkpoint and "resume" it in zero steps. A file train does not import changes nothing."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "workflow", copy / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    script = (
        "from workflow.core.config import params_from_dict\n"
        "from workflow.formats.checkpoints import run_key\n"
        "print(run_key(params_from_dict({}), '0' * 64))"
    )

    def key_of_the_copy() -> str:
        env = {**os.environ, "PYTHONPATH": str(copy)}
        run = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    same_code = key_of_the_copy()
    assert same_code == checkpoints.run_key(params_from_dict({}), "0" * 64)
    report = copy / "workflow/stages/report.py"  # not part of train's code
    report.write_text(report.read_text() + "# edited\n")
    assert key_of_the_copy() == same_code
    diffusion = copy / "workflow/maths/diffusion.py"
    diffusion.write_text(diffusion.read_text() + "# edited\n")
    assert key_of_the_copy() != same_code
